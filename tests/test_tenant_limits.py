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


def _create_at_once(client: Client, names: list[str]) -> list[tuple[str, str]]:
    def create(name: str) -> tuple[str, str]:
        try:
            client.create_avatar(name, [PORTRAIT], consent=CONSENT)
            return "OK", ""
        except grpc.RpcError as error:
            return error.code().name, error.details() or ""

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(create, names))


def test_creates_at_once_keep_the_tenants_avatar_limit(limited: tuple[ServerThread, dict]) -> None:
    """Creates at once against max_avatars all passed the count taken before their face detection
    (8 against a limit of 2 left the tenant with 8). Creates in flight now count: of two at once
    against a limit of 1, one is made."""
    server, tokens = limited
    with Client(target=server.address, api_key=tokens["initech"]) as initech:
        initech.create_avatar("kept", [PORTRAIT], consent=CONSENT)  # 1 of its 2
        results = _create_at_once(initech, ["rush0", "rush1"])
        assert sorted(code for code, _ in results) == ["OK", "RESOURCE_EXHAUSTED"], results
        assert any("limit of 2 avatars" in details for _, details in results), results
        assert len(list(initech.list_avatars())) == 2
        initech.delete_avatar("kept")
        initech.create_avatar("after", [PORTRAIT], consent=CONSENT)  # room again, nothing held
        for avatar in initech.list_avatars():
            initech.delete_avatar(avatar.avatar_id)


def test_many_creates_at_once_are_refused_before_their_photos_are_read(
    limited: tuple[ServerThread, dict],
) -> None:
    """Each CreateAvatar holds its photos (up to 64 MiB) until its turn at face detection: 12 at
    once raised its peak by 2.0 GB. A tenant has at most 2 in flight; the rest are refused at once,
    before their request is read, with a retry hint, and nothing stays held."""
    server, tokens = limited
    with Client(target=server.address, api_key=tokens["acme"]) as acme:
        results = _create_at_once(acme, [f"burst{i}" for i in range(8)])
        refused = [details for code, details in results if code == "RESOURCE_EXHAUSTED"]
        assert refused and all("being created on this server; retry in 2 s" in d for d in refused), results
        assert {code for code, _ in results} == {"OK", "RESOURCE_EXHAUSTED"}, results
        for i in range(3):  # one after another: each is let in
            acme.create_avatar(f"calm{i}", [PORTRAIT], consent=CONSENT)
        for avatar in acme.list_avatars():
            acme.delete_avatar(avatar.avatar_id)
    assert server.metric('talkinghead_quota_refusals_total{quota="creates_in_flight",tenant="acme"}') == len(
        refused
    )


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
