"""`talkinghead serve` as a child process of a test, for what only a process of its own shows: its
resident set size, its log, whether it is still alive.

The child runs this checkout's code (PYTHONPATH, whatever the virtual environment's editable
install points at) through a small launcher that can turn the cyclic garbage collector off (only
reference counting frees memory then) and, as a debug hook of the test harness only (no RPC),
collects on SIGUSR1: a full collection, then glibc's malloc_trim, then one line appended to a file
the test waits for. glibc serves allocations of 128 KiB and more by mmap in the child
(MALLOC_MMAP_THRESHOLD_), so memory freed is returned to the system at once and the RSS measures
what the server holds, not what its allocator keeps for reuse.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from client.library import Client
from tests.redis_fixtures import free_port
from tests.service_fixtures import REPO

LAUNCHER = """
import ctypes, gc, os, signal, sys
if os.environ.get("TEST_NO_GC"):
    gc.disable()

def collect(signum, frame):
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open(os.environ["TEST_COLLECTED"], "a") as done:
        done.write("collected\\n")

signal.signal(signal.SIGUSR1, collect)
from talkinghead.cli import main
sys.exit(main(sys.argv[1:]))
"""


class ServerProcess:
    def __init__(
        self,
        *,
        repository: Path,
        root: Path,
        cycle_collector: bool = True,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        output: int | None = None,
    ) -> None:
        """`output`: a file descriptor its stdout and stderr go to instead of `self.log`."""
        self.port = free_port()
        self.metrics_port = free_port()
        self.log = root / "server.log"
        self._collected = root / "collected"
        settings = {
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
            "TEST_COLLECTED": str(self._collected),
            "TALKINGHEAD_GRPC_PORT": str(self.port),
            "TALKINGHEAD_METRICS_PORT": str(self.metrics_port),
            "TALKINGHEAD_MODEL_REPOSITORY": str(repository),
            "TALKINGHEAD_AVATAR_STORE": str(root / "avatars"),
            "TALKINGHEAD_JOBS": str(root / "jobs"),
            "TALKINGHEAD_AUDIT_LOG": str(root / "audit.jsonl"),
            "TALKINGHEAD_WORKER": "external",
            "TALKINGHEAD_ENGINE": "onnxruntime",
            **({} if cycle_collector else {"TEST_NO_GC": "1"}),
            **(env or {}),
        }
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, "serve", "--inference-threads", "1", *args],
                cwd=REPO,
                env={**os.environ, **settings},
                stdout=out if output is None else output,
                stderr=subprocess.STDOUT,
            )
        self.address = f"127.0.0.1:{self.port}"
        self.client = Client(target=self.address, timeout=120)
        deadline = time.monotonic() + 120
        while True:  # a child that exits (a bad flag, a missing file) fails the test at once, not in 120 s
            if self.process.poll() is not None:
                self.client.close()
                raise AssertionError(
                    f"the server exited with status {self.process.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                self.client.wait_ready(1.0)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(
                        f"the server did not start: {self.log.read_text()[-2000:]}"
                    ) from None

    @property
    def rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for {self.process.pid}")

    def collect(self, timeout: float = 30.0) -> int:
        """The RSS after a full collection in the server (the SIGUSR1 hook)."""
        count = self._count()
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while self._count() == count:
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not collect")
            time.sleep(0.05)
        return self.rss

    def _count(self) -> int:
        return len(self._collected.read_text().splitlines()) if self._collected.exists() else 0

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
