"""A tenant's limits hold under concurrency, through a real server with API keys."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client.library import Client
from service.auth import FileRing, issue, set_quotas
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, ServerThread, test_settings


@pytest.fixture(scope="module")
def limited(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, dict]]:
    root = tmp_path_factory.mktemp("limits")
    ring = FileRing(path=root / "keys.json")
    tokens = {"initech": ring.update(lambda r: issue(r, "initech"))[1]}
    ring.update(lambda r: set_quotas(r, "initech", max_avatars=2, creates_per_minute=0))
    server = ServerThread(settings=test_settings(model_repository, root / "avatars", api_keys=str(ring.path)))
    server.wait_ready()
    yield server, tokens
    server.stop()


def test_creates_at_once_keep_the_tenants_avatar_limit(limited: tuple[ServerThread, dict]) -> None:
    """8 creates at once against max_avatars 2 all passed the count taken before their face
    detection: the tenant ended with 8. Creates in flight now count."""
    server, tokens = limited
    with Client(target=server.address, api_key=tokens["initech"]) as initech:

        def create(i: int) -> str:
            try:
                initech.create_avatar(f"rush{i}", [PORTRAIT], consent=CONSENT)
                return "OK"
            except grpc.RpcError as error:
                assert "limit of 2 avatars" in (error.details() or ""), error.details()
                return error.code().name

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(create, range(8)))
        assert sorted(codes) == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 6, codes
        made = [a.avatar_id for a in initech.list_avatars()]
        assert len(made) == 2
        initech.delete_avatar(made[0])
        initech.create_avatar("after", [PORTRAIT], consent=CONSENT)  # room again, nothing held
        for avatar in initech.list_avatars():
            initech.delete_avatar(avatar.avatar_id)
