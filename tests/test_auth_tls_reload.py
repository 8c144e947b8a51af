"""TLS files renewed under a running server (cert-manager updating a mounted Secret): new
connections get the new certificate (and client CA) within seconds, without a restart; files
caught half written, or a key that does not match, leave the last good ones in use.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from client.library import Client
from service import server as server_module
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import ServerThread, test_settings
from tests.test_auth import _authority, _leaf

RELOADED_WITHIN_S = 5.0


def _issue(folder: Path) -> dict[str, Path]:
    """A server CA, a server certificate it signed, a client CA and a client certificate (acme)."""
    folder.mkdir()
    server_cert, server_key = _leaf(folder, "server", _authority(folder, "server-ca"), server=True)
    client_cert, client_key = _leaf(folder, "acme", _authority(folder, "clients-ca"))
    return {
        "server-ca": folder / "server-ca.crt",
        "tls.crt": server_cert,
        "tls.key": server_key,
        "ca.crt": folder / "clients-ca.crt",
        "client.crt": client_cert,
        "client.key": client_key,
    }


def _install(
    files: dict[str, Path], live: Path, names: tuple[str, ...] = ("tls.crt", "tls.key", "ca.crt")
) -> None:
    """Replace the live files, each atomically (a new inode, as a Secret volume update makes)."""
    for name in names:
        shutil.copyfile(files[name], live / f".{name}.new")
        os.replace(live / f".{name}.new", live / name)


def _answers(port: int, files: dict[str, Path]) -> bool:
    """A new connection trusting only `files`' server CA, with `files`' client certificate, works."""
    client = Client(
        target=f"localhost:{port}",
        tls_ca=files["server-ca"],
        tls_cert=files["client.crt"],
        tls_key=files["client.key"],
        timeout=5,
    )
    try:
        list(client.list_avatars())
        return True
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error  # the handshake failed
        return False
    finally:
        client.close()


def _eventually(check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + RELOADED_WITHIN_S
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.3)
    return False


def test_renewed_tls_files_serve_new_connections_and_broken_ones_are_not_served(
    model_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = _issue(tmp_path / "old"), _issue(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    _install(old, live)
    settings = test_settings(
        model_repository,
        tmp_path / "avatars",
        tls_cert=live / "tls.crt",
        tls_key=live / "tls.key",
        tls_client_ca=live / "ca.crt",
    )
    caplog.set_level(logging.INFO, logger="talkinghead.service")
    # the files looked at every 0.2 s, not every 1 s: a broken file is waited for 0.5 s, not 2.5 s
    monkeypatch.setattr(server_module, "TLS_CHECK_S", 0.2)
    server = ServerThread(settings=settings)
    port = server.server.grpc_port
    try:
        assert _answers(port, old) and not _answers(port, new)
        _install(new, live)  # renewed: another CA, certificate and client CA
        assert _eventually(lambda: _answers(port, new)), "the renewed certificate was not served"
        assert not _answers(port, old)
        # a certificate caught half written, then a certificate that does not match the key
        (live / "tls.crt").write_bytes(old["tls.crt"].read_bytes()[:200])
        time.sleep(2.5 * server_module.TLS_CHECK_S)  # looked at again
        assert _answers(port, new)  # the last good pair still serves
        _install(old, live, ("tls.crt",))  # old certificate, new key
        time.sleep(2.5 * server_module.TLS_CHECK_S)  # looked at again
        assert _answers(port, new)
        refused = [r for r in caplog.records if "cannot be served" in r.getMessage()]
        assert len(refused) == 2 and all(r.levelno == logging.ERROR for r in refused)
        _install(old, live)  # a consistent set again: served
        assert _eventually(lambda: _answers(port, old))
    finally:
        server.stop()
