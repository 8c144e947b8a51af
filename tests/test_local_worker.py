"""The embedded worker's supervisor (service/local_worker.py) against a stand-in child: a real
process serving a real /healthz (facekit/metrics_http.py, as `talkinghead worker` does) whose
answer the test sets through a file. No PyTorch: tests/test_personalise.py runs the real worker."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from service import local_worker
from service.local_worker import LocalWorker
from service.settings import Settings

# argv: port file, ready file, state file. /healthz answers 503 with the state file's text while
# it has any, else 200; the port is written aside and renamed, as the worker does.
CHILD = """
import sys, time
from pathlib import Path
from prometheus_client import CollectorRegistry
from facekit import metrics_http
port_file, ready, state = map(Path, sys.argv[1:4])
health = lambda: state.read_text().strip() or None
server, _ = metrics_http.serve("127.0.0.1", 0, CollectorRegistry(), health)
port = server.server_port
aside = port_file.with_name(port_file.name + ".tmp")
aside.write_text(f"{port}\\n")
aside.replace(port_file)
ready.touch()
while True:
    time.sleep(1)
"""


def test_a_stuck_or_silent_worker_is_killed_and_restarted_and_a_healthy_one_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's /healthz says "stuck: ..." (a job's step, export or Triton load that went past
    --stuck-after): the supervisor kills it and starts another, counted as "stuck". A worker that
    answers nothing (SIGSTOPped) is killed after MISSES unanswered questions ("unanswered"). One
    that answers 200 is asked again and again and left running."""
    monkeypatch.setattr(local_worker, "CHECK_S", 0.2)
    monkeypatch.setattr(local_worker, "ANSWER_S", 0.5)
    state = tmp_path / "state"
    state.write_text("")
    settings = Settings(jobs=tmp_path, worker_stuck_after=60)
    restarts: list[str] = []

    async def scenario() -> None:
        worker = LocalWorker(settings=settings, on_give_up=pytest.fail, on_restart=restarts.append)
        assert worker.port_file is not None
        repo = Path(__file__).resolve().parents[1]
        worker.cmd = [sys.executable, "-c", CHILD, str(worker.port_file), str(worker.ready), str(state)]
        monkeypatch.setenv("PYTHONPATH", str(repo))
        worker.start()

        async def started(after: int | None) -> int:
            deadline = time.monotonic() + 30
            while True:
                process = worker.process
                if process is not None and process.pid != after and worker.ready.exists():
                    return process.pid
                assert time.monotonic() < deadline, f"no worker after {after} started"
                await asyncio.sleep(0.05)

        try:
            first = await started(None)
            await asyncio.sleep(2.0)  # ~10 questions, each answered 200
            assert worker.process is not None and worker.process.pid == first and restarts == []

            state.write_text("stuck: job 0123: fine-tuning step 3, no progress for 61.0 s (allowed 60 s)")
            second = await started(first)
            assert restarts == ["stuck"]
            state.write_text("")

            await asyncio.sleep(1.0)
            assert worker.process is not None and worker.process.pid == second
            os.kill(second, signal.SIGSTOP)  # alive, and answers nothing
            stopped = time.monotonic()
            await started(second)
            waited = time.monotonic() - stopped
            assert restarts == ["stuck", "unanswered"]
            # MISSES questions CHECK_S apart, each given ANSWER_S, and the 1 s before a restart
            assert 1.5 <= waited < 10, waited
        finally:
            await worker.close()
        assert not worker.port_file.exists() and not worker.ready.exists()

    asyncio.run(scenario())


async def _no_answer() -> None:
    """A listener that takes the connection and never answers."""
    server = await asyncio.start_server(lambda r, w: asyncio.sleep(3600), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await local_worker.ask_health(port, 0.3) is None
        closed = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        empty = closed.sockets[0].getsockname()[1]
        assert await local_worker.ask_health(empty, 0.3) is None, "closed without a status line"
        closed.close()
    finally:
        server.close()


def test_a_health_question_without_an_answer_is_none() -> None:
    asyncio.run(_no_answer())
