"""A real redis-server on 127.0.0.1 for the tests (Debian's package; `make redis` installs it).

Import from a test module: `from tests.redis_fixtures import *  # noqa: F403`. The server keeps
nothing on disk and is flushed before each test that takes `redis_url`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[1]


def allotted_ports() -> range | None:
    """TALKINGHEAD_TEST_PORTS (`19500-19599`: hosts that allot ports), this xdist worker's share of
    it (gw1 of 2: the upper half), so that two workers never start on the same port."""
    first, _, last = os.environ.get("TALKINGHEAD_TEST_PORTS", "").partition("-")
    if not first:
        return None
    ports = range(int(first), int(last or first) + 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = max(1, len(ports) // workers)
    return ports[int(worker) * share : (int(worker) + 1) * share] or ports


def free_port() -> int:
    """A free port: any, or one of this worker's TALKINGHEAD_TEST_PORTS (allotted_ports)."""
    ports = allotted_ports()
    for port in ports if ports is not None else [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError(f"no free port in TALKINGHEAD_TEST_PORTS={os.environ['TALKINGHEAD_TEST_PORTS']}")


def redis_binary() -> str:
    """redis-server; installs Debian's package through `make redis` when there is none."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None and shutil.which("make"):
        subprocess.run(["make", "-s", "redis"], cwd=REPO, capture_output=True, timeout=600, check=False)
        found = shutil.which("redis-server")
    if found is None:
        pytest.skip("no redis-server and `make redis` could not install Debian's package (apt-get)")
    return found


class RedisServer:
    def __init__(self, *, workdir: Path, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            *args,
        ]
        self.process = subprocess.Popen(
            [*cmd, "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0 and self._answers_as_itself():
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port} (taken by another process?)")

    def _answers_as_itself(self) -> bool:
        """The Redis on the port is this one, not another that held it first (this one then exits)."""
        try:
            with redis.Redis(port=self.port, socket_timeout=2) as client:
                return int(client.info("server")["process_id"]) == self.process.pid
        except redis.RedisError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(workdir=tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    from jobs.redis_queue import connect

    client = connect(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url
