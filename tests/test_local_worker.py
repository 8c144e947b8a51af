"""The embedded worker's supervisor (service/local_worker.py) against a stand-in child: a real
process that reports through the worker's own Liveness (worker/liveness.py) what the test's state
file tells it to do. No PyTorch: tests/test_personalise.py runs the real worker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facekit import procstat
from service import local_worker
from service.local_worker import LocalWorker
from service.settings import Settings

# argv: liveness file, ready file, state file, allowance s. The state file says: "progress" (a
# word every 0.1 s), "hang" (blocked for good, as in a call that never returns), or "spin" (busy
# without a word in a second thread at SCHED_IDLE on the first CPU, the main thread waiting for it:
# a step in PyTorch's pool starved by what else runs there); "busy" after "spin": the same thread
# at normal priority (so that what else runs on the machine, the other test workers, cannot keep it
# starved after the test's hog is gone).
CHILD = """
import os, sys, threading, time
from pathlib import Path
from worker.liveness import Liveness
report, ready, state, within = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
alive = Liveness(within, report=report)
ready.touch()
step = 0
while True:
    mode = state.read_text().strip()
    if mode == "progress":
        step += 1
        alive.doing(f"job j1: fine-tuning, step {step} done")
        time.sleep(0.1)
    elif mode == "spin":  # in a thread of its own, the main thread waiting for it (as at a pool's barrier)
        def spin():
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            while state.read_text().strip() == "spin":
                for _ in range(100_000):
                    pass
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            while True:
                pass
        pool = threading.Thread(target=spin)
        pool.start()
        pool.join()
    else:
        time.sleep(3600)
"""
HOG = "import os\nos.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\nwhile True:\n    pass\n"


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process so far; 0 once it is gone."""
    return procstat.cpu_seconds(pid) or 0.0


def test_a_stuck_worker_is_restarted_and_a_starved_or_moving_one_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose word stands longer than it allowed (3 s here) while blocked is killed and
    another started ("stuck"). One that says something new every 0.1 s is left running. One busy
    without a word but kept off its CPU (SCHED_IDLE beside a busy process on that CPU: an
    embedded worker's step beside streams that take the cores) is left running as long as it is
    starved, and killed once it has had its CPU for longer than allowed."""
    monkeypatch.setattr(local_worker, "CHECK_S", 0.2)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    state = tmp_path / "state"
    state.write_text("progress")
    restarts: list[str] = []
    hog: subprocess.Popen[bytes] | None = None

    async def scenario() -> None:
        nonlocal hog
        settings = Settings(jobs=tmp_path, worker_stuck_after=3)
        worker = LocalWorker(settings=settings, on_give_up=pytest.fail, on_restart=restarts.append)
        assert worker.liveness is not None
        worker.cmd = [sys.executable, "-c", CHILD, str(worker.liveness), str(worker.ready), str(state), "3"]
        worker.start()

        async def started(after: int | None) -> int:
            deadline = time.monotonic() + 30
            while True:
                process = worker.process
                if process is not None and process.pid != after and worker.ready.exists():
                    return process.pid
                assert time.monotonic() < deadline, f"no worker after {after} started"
                await asyncio.sleep(0.02)

        async def restarted(count: int) -> float:
            began = time.monotonic()
            while len(restarts) < count:
                assert time.monotonic() - began < 30, restarts
                await asyncio.sleep(0.02)
            return time.monotonic() - began

        try:
            first = await started(None)
            await asyncio.sleep(2.5)  # ~12 reads, each a new word
            assert worker.process is not None and worker.process.pid == first and restarts == []

            state.write_text("hang")
            waited = await restarted(1)
            state.write_text("progress")  # (before the next one starts, 1 s on)
            assert restarts == ["stuck"] and 3.0 <= waited < 8, waited
            second = await started(first)

            hog = subprocess.Popen([sys.executable, "-c", HOG])
            deadline = time.monotonic() + 30
            while cpu_seconds(hog.pid) < 0.3:  # pinned and spinning, not still starting (CI 89154ed)
                assert time.monotonic() < deadline, "the hog never ran"
                await asyncio.sleep(0.02)
            had = began = cpu_seconds(second)
            hogged = cpu_seconds(hog.pid)
            state.write_text("spin")
            # starved: 6 s without a word, nearly all of it off its CPU (the kernel adds a wait to
            # its count only when it ends, every 1.4-3 s here; the supervisor counts it as it goes)
            for _ in range(30):
                await asyncio.sleep(0.2)
                had = max(had, cpu_seconds(second))  # (its last figure while it lived)
            had, hogged = had - began, cpu_seconds(hog.pid) - hogged
            assert worker.process is not None and worker.process.pid == second and restarts == ["stuck"], (
                f"starved stand-in killed; in the 6 s it had {had:.2f} s of CPU, the hog {hogged:.2f} s"
            )
            hog.kill()
            state.write_text("busy")
            waited = await restarted(2)  # 3 s on a CPU: longer where other test workers share it
            assert restarts == ["stuck", "stuck"] and waited < 15, waited
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
            state.write_text("hang")
            await worker.close()
        assert not worker.liveness.exists() and not worker.ready.exists()

    asyncio.run(scenario())
