"""Client certificates an operator can take back: `talkinghead keys deny-cert` refuses a common name
(bound or not), `unbind-cert` removes a binding (a stream open under it ends), and
TALKINGHEAD_TLS_BOUND_CERTS_ONLY accepts only bound names, on a running mTLS server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from client.library import Client, landmark_requests
from service.auth import FileRing, bind_cert
from service.settings import Settings
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, REPO, ServerThread, test_settings
from tests.test_auth import _authority, _leaf

WAIT_S = 5.0  # the ring is reread every second


@dataclass
class Mtls:
    server: ServerThread
    ring: FileRing
    folder: Path
    certs: dict[str, tuple[Path, Path]]  # common name -> (certificate, key)

    def client(self, common_name: str) -> Client:
        cert, key = self.certs[common_name]
        target = f"localhost:{self.server.server.grpc_port}"
        return Client(
            target=target, tls_ca=self.folder / "server-ca.crt", tls_cert=cert, tls_key=key, timeout=30
        )

    def keys(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "talkinghead.cli", "keys", "--keys", str(self.ring.path), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )


def start_mtls(model_repository: Path, folder: Path, names: list[str], **settings: object) -> Mtls:
    """An mTLS server with the key ring binding studio-* to acme; a client certificate per name."""
    clients_ca = _authority(folder, "clients-ca")
    server_cert, server_key = _leaf(folder, "server", _authority(folder, "server-ca"), server=True)
    ring = FileRing(path=folder / "keys.json")
    for name in names:
        if name.startswith("studio-"):
            ring.update(lambda r, n=name: bind_cert(r, n, "acme"))
    config = test_settings(
        model_repository,
        folder / "avatars",
        tls_cert=server_cert,
        tls_key=server_key,
        tls_client_ca=folder / "clients-ca.crt",
        api_keys=str(ring.path),
        **settings,
    )
    server = ServerThread(settings=config)
    server.wait_ready()
    return Mtls(server, ring, folder, {name: _leaf(folder, name, clients_ca) for name in names})


@pytest.fixture(scope="module")
def mtls(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mtls]:
    names = ["acme", "studio-01", "studio-02", "studio-03"]
    running = start_mtls(model_repository, tmp_path_factory.mktemp("mtls"), names)
    with running.client("acme") as acme:
        acme.create_avatar("cert-made", [PORTRAIT], consent=CONSENT)
    yield running
    running.server.stop()


def refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str] | None:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details()
    return None


def eventually(check: Callable[[], object]) -> object:
    deadline = time.monotonic() + WAIT_S
    while not (found := check()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def test_a_denied_common_name_is_refused_even_when_bound(mtls: Mtls) -> None:
    with mtls.client("studio-01") as studio, mtls.client("acme") as acme:
        assert studio.get_avatar("cert-made").avatar_id == "cert-made"  # bound to acme
        denied = mtls.keys("deny-cert", "studio-01")
        assert denied.returncode == 0, denied.stderr
        assert eventually(lambda: refusal(lambda: studio.get_avatar("cert-made"))) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "the client certificate was revoked",
        )
        assert acme.get_avatar("cert-made").avatar_id == "cert-made"  # other names unaffected
        assert "studio-01" in json.loads(mtls.keys("list").stdout)["denied_certs"]
        assert mtls.keys("deny-cert", "studio-01").returncode == 1  # already denied: says so
        assert mtls.keys("undeny-cert", "studio-01").returncode == 0
        assert eventually(lambda: refusal(lambda: studio.get_avatar("cert-made")) is None)


def test_an_unbound_common_name_is_its_own_tenant_again(mtls: Mtls) -> None:
    with mtls.client("studio-02") as studio:
        assert studio.get_avatar("cert-made").avatar_id == "cert-made"
        unbound = mtls.keys("unbind-cert", "--common-name", "studio-02")
        assert unbound.returncode == 0, unbound.stderr
        # now tenant `studio-02`, which has no such avatar
        assert eventually(lambda: refusal(lambda: studio.get_avatar("cert-made"))) == (
            grpc.StatusCode.NOT_FOUND,
            "no avatar with id 'cert-made'",
        )
        assert mtls.keys("unbind-cert", "--common-name", "studio-02").returncode == 1  # nothing to unbind


def test_an_open_stream_ends_when_its_certificate_is_unbound(mtls: Mtls, driver) -> None:
    with mtls.client("studio-03") as studio:
        frames = studio.animate("cert-made", landmark_requests(driver, pace=True), motion="relative")
        for _ in range(3):
            next(frames)  # streaming acme's avatar, as acme
        assert mtls.keys("unbind-cert", "--common-name", "studio-03").returncode == 0
        unbound = time.monotonic()
        with pytest.raises(grpc.RpcError) as stopped:
            for _ in frames:
                pass
        took = time.monotonic() - unbound
    assert stopped.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stopped.value.details() == "the client certificate's binding was removed or changed"
    assert took <= 3.0, took  # the ring is reread every second (before: the stream went on as acme)


def test_bound_certificates_only_refuses_an_unbound_common_name(
    model_repository: Path, tmp_path: Path
) -> None:
    running = start_mtls(model_repository, tmp_path, ["acme", "studio-01"], tls_bound_certs_only=True)
    try:
        with running.client("acme") as acme:  # signed by the client CA, but bound to nothing
            assert refusal(lambda: list(acme.list_avatars())) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate's common name is bound to no tenant on this server",
            )
        with running.client("studio-01") as studio:
            assert list(studio.list_avatars()) == []
    finally:
        running.server.stop()
    with pytest.raises(ValueError, match="TLS_BOUND_CERTS_ONLY needs client certificates"):
        Settings(tls_bound_certs_only=True, api_keys=str(tmp_path / "keys.json"))
