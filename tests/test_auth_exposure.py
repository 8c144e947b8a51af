"""What a server exposes beyond loopback: API keys only over TLS (here or in a proxy in front),
loopback decided by the address, not by how the name starts, and /metrics on an address of its own.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from client.library import Client
from service.auth import FileRing, issue
from service.settings import Settings, from_env
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import REPO, ServerThread, test_settings


def own_address() -> str | None:
    """An IPv4 address of this machine other than loopback (connecting a UDP socket sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if ipaddress.ip_address(address).is_loopback else address


def test_serve_refuses_api_keys_over_plaintext_beyond_loopback(tmp_path: Path) -> None:
    flags = [
        "--host",
        "0.0.0.0",
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        "--api-keys",
        str(tmp_path / "k"),
    ]
    serve = subprocess.run(
        [sys.executable, "-m", "talkinghead.cli", "serve", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert serve.returncode != 0
    assert "refusing to serve API keys over plaintext on 0.0.0.0" in serve.stderr
    assert "TLS_TERMINATED_UPSTREAM" in serve.stderr  # it says how to proceed


def test_production_mode_beyond_loopback_needs_tls(tmp_path: Path) -> None:
    keys = str(tmp_path / "keys.json")
    with pytest.raises(ValueError, match="refusing to serve production mode over plaintext"):
        Settings(host="0.0.0.0", production=True, allow_unauthenticated=True)
    with pytest.raises(ValueError, match=re.escape("serve API keys over plaintext on 10.0.0.5")):
        Settings(host="10.0.0.5", api_keys=keys, production=True)
    tls = {"tls_cert": tmp_path / "tls.crt", "tls_key": tmp_path / "tls.key"}
    Settings(host="0.0.0.0", api_keys=keys, production=True, **tls)  # type: ignore[arg-type]
    Settings(host="0.0.0.0", api_keys=keys, production=True, tls_terminated_upstream=True)
    Settings(host="127.0.0.1", api_keys=keys, production=True)  # loopback: nobody else on the path
    terminated = from_env(
        {
            "TALKINGHEAD_TLS_TERMINATED_UPSTREAM": "1",
            "TALKINGHEAD_HOST": "0.0.0.0",
            "TALKINGHEAD_API_KEYS": keys,
        }
    )
    assert terminated.tls_terminated_upstream and not terminated.tls


@pytest.mark.parametrize("host", ["127.attacker.example", "127.0.0.1.nip.io", "localhost.example", "0.0.0.0"])
def test_a_name_that_looks_like_loopback_needs_authentication(host: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"refusing to listen on {host} without authentication")):
        Settings(host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_addresses_need_no_authentication(host: str) -> None:
    assert Settings(host=host).loopback


def test_metrics_bind_the_grpc_host_unless_told_otherwise() -> None:
    assert Settings(host="0.0.0.0", allow_unauthenticated=True).metrics_bind == "0.0.0.0"
    moved = from_env({"TALKINGHEAD_METRICS_HOST": "127.0.0.1"}, host="0.0.0.0", allow_unauthenticated=True)
    assert moved.metrics_bind == "127.0.0.1" and moved.host == "0.0.0.0"


def test_tls_terminated_upstream_starts_with_a_notice_and_metrics_stay_on_loopback(
    model_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ring = FileRing(path=tmp_path / "keys.json")
    token = ring.update(lambda r: issue(r, "acme"))[1]
    settings = test_settings(
        model_repository,
        tmp_path / "avatars",
        host="0.0.0.0",
        api_keys=str(ring.path),
        tls_terminated_upstream=True,
        metrics_host="127.0.0.1",
    )
    caplog.set_level(logging.INFO, logger="talkinghead.service")
    server = ServerThread(settings=settings)
    try:
        notices = [r for r in caplog.records if "TLS_TERMINATED_UPSTREAM=1" in r.getMessage()]
        assert len(notices) == 1 and notices[0].levelno == logging.WARNING
        assert "plaintext on 0.0.0.0" in notices[0].getMessage()
        assert "talkinghead_frames_sent_total" in server.metrics()  # on 127.0.0.1
        address = own_address()
        if address is None:
            pytest.skip("this machine has no address but loopback: cannot check where /metrics is not")
        with Client(target=f"{address}:{server.server.grpc_port}", api_key=token, timeout=30) as acme:
            assert list(acme.list_avatars()) == []  # gRPC answers on every interface
        with pytest.raises(OSError):  # /metrics (tenant names, their frame counts) does not
            urllib.request.urlopen(f"http://{address}:{server.server.metrics_port}/metrics", timeout=5)
    finally:
        server.stop()
