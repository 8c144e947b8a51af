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
    tokens = {
        "initech": ring.update(lambda r: issue(r, "initech"))[1],
        "acme": ring.update(lambda r: issue(r, "acme"))[1],
    }
    ring.update(lambda r: set_quotas(r, "initech", max_avatars=2, creates_per_minute=0))
    ring.update(lambda r: set_quotas(r, "acme", max_personalisations=2, creates_per_minute=0))
    settings = test_settings(model_repository, root / "avatars", api_keys=str(ring.path), worker="external")
    server = ServerThread(settings=settings)  # (no worker takes the jobs: they stay queued)
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


def test_a_tenant_holds_at_most_its_share_of_the_personalisation_queue(
    limited: tuple[ServerThread, dict],
) -> None:
    """One tenant queued TALKINGHEAD_MAX_QUEUE personalisations and every other tenant's were
    refused, told how many the server had queued. Now a tenant holds max_personalisations (2
    here); the third is refused naming the quota, and cancelling one makes room."""
    server, tokens = limited
    with Client(target=server.address, api_key=tokens["acme"]) as acme:
        for name in ("p0", "p1", "p2"):
            acme.create_avatar(name, [PORTRAIT], consent=CONSENT)
        first = acme.personalise("p0")
        acme.personalise("p1")
        with pytest.raises(grpc.RpcError) as refused:
            acme.personalise("p2")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 personalisations queued or running" in (refused.value.details() or "")
        assert int(dict(refused.value.trailing_metadata() or ())["retry-after"]) >= 1
        acme.cancel_operation(first.name)
        acme.personalise("p2")  # room again
        for operation in acme.list_operations():
            if not operation.done:
                acme.cancel_operation(operation.name)
    with Client(target=server.address, api_key=tokens["initech"]) as initech:
        initech.create_avatar("own", [PORTRAIT], consent=CONSENT)
        initech.cancel_operation(initech.personalise("own").name)  # another tenant is not held back
        initech.delete_avatar("own")
    assert server.metric('talkinghead_quota_refusals_total{quota="personalisations",tenant="acme"}') == 1
