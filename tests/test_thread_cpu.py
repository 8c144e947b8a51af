"""The server's threads on the CPU: the split of their time (service/metrics.py ThreadCpu) - its
own Python threads' work is the service's, the threads that call the engine count as the
engine's, and the counts only grow when threads end - and their scheduling policy."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from client.bench import cpu_by_threads
from client.library import landmark_requests
from facekit.sequence import LandmarkSequence
from service.metrics import ENGINE_CALLS, ThreadCpu
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, REPO, WORKER_TIMEOUT_S, thread_policies
from tests.service_process import ServerProcess

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _scrape(registry: CollectorRegistry) -> dict[str, float]:
    """The metric as the bench reads it from a server's /metrics page."""
    return cpu_by_threads(generate_latest(registry).decode())


def _worker(name: str, seconds: float) -> tuple[threading.Thread, threading.Event]:
    """A thread that burns `seconds` of CPU, says so, and stays until told to leave."""
    done, leave = threading.Event(), threading.Event()

    def work() -> None:
        _burn(seconds)
        done.set()
        leave.wait(10)

    thread = threading.Thread(target=work, name=name)
    thread.start()
    assert done.wait(30)
    return thread, leave


def test_a_service_threads_work_is_the_services_and_stays_counted_after_it_ends() -> None:
    registry = CollectorRegistry()
    registry.register(ThreadCpu())
    first = _scrape(registry)
    assert set(first) == {"service", "engine"}
    thread, leave = _worker("render_0", 0.3)
    while_alive = _scrape(registry)
    assert while_alive["service"] - first["service"] >= 0.25
    leave.set()
    thread.join()
    after = _scrape(registry)
    assert after["service"] >= while_alive["service"]  # an ended thread's CPU is kept, not lost
    assert after["engine"] >= while_alive["engine"]


def test_the_threads_that_call_the_engine_count_as_the_engine() -> None:
    registry = CollectorRegistry()
    registry.register(ThreadCpu())
    first = _scrape(registry)
    thread, leave = _worker(f"{ENGINE_CALLS}_0", 0.3)  # as ONNX Runtime runs a lane of one thread
    try:
        now = _scrape(registry)
        assert now["engine"] - first["engine"] >= 0.25
        assert now["service"] - first["service"] < 0.25
    finally:
        leave.set()
        thread.join()


@pytest.mark.parametrize(("setting", "policy"), [(None, os.SCHED_BATCH), ("normal", os.SCHED_OTHER)])
def test_the_server_runs_its_threads_under_the_configured_scheduling_policy(
    model_repository: Path, tmp_path: Path, setting: str | None, policy: int
) -> None:
    """By default every thread of a running server - the event loop, gRPC's, the engine's, ones
    started after the setting (a stream's) - is SCHED_BATCH: its wake-ups do not preempt the
    inference threads. TALKINGHEAD_CPU_SCHEDULING=normal leaves them SCHED_OTHER."""
    env = {"TALKINGHEAD_CPU_SCHEDULING": setting} if setting else {}
    server = ServerProcess(repository=model_repository, root=tmp_path, env=env)
    try:
        server.client.create_avatar("sched", [PORTRAIT], consent=CONSENT)
        driver = LandmarkSequence.load(REPO / "facekit/assets/demo_driver.npz")
        seq = LandmarkSequence(driver.points[:3], driver.frame_size, driver.fps)
        frames = list(server.client.animate("sched", landmark_requests(seq), encoding="raw"))
        assert len(frames) == 3
        assert thread_policies(server.process.pid) == {policy}
        assert f"CPU scheduling: {setting or 'batch'}" in server.log.read_text()
    finally:
        server.stop()


WORKER_PRIORITIES = [
    # (the local stack's way: a session of its own; its group lowered with it)
    (["--cpu-scheduling", "idle"], os.SCHED_IDLE, 0, True),
    # (the embedded worker's way: the server's session, whose group it must leave alone)
    (["--cpu-scheduling", "batch", "--nice", "10"], os.SCHED_BATCH, 10, False),
]


def _autogroup(pid: int | str) -> str:
    return Path(f"/proc/{pid}/autogroup").read_text().strip()  # "/autogroup-287 nice 0"


@pytest.mark.parametrize(("flags", "policy", "nice", "own_session"), WORKER_PRIORITIES)
def test_the_worker_runs_every_thread_at_the_priority_asked(
    tmp_path: Path, flags: list[str], policy: int, nice: int, own_session: bool
) -> None:
    """`talkinghead worker` as the server (TALKINGHEAD_WORKER_PRIORITY idle / low) or the local
    stack starts it: every thread, PyTorch's and the queue's included, under the policy and nice
    value asked; started in a session of its own, that session's scheduling group lowered too
    (under autogroup a policy only ranks threads within their group), and in its parent's session
    the parent's group left as it was."""
    if not Path("/proc/self/autogroup").exists():
        pytest.skip("no autogroup in this kernel")
    ours = _autogroup("self")
    cmd = [sys.executable, "-m", "talkinghead.cli", "worker", "--jobs", str(tmp_path / "jobs")]
    cmd += ["--repository", str(tmp_path / "repo"), "--checkpoint", str(REPO / "models/talkinghead-small.pt")]
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [*cmd, *flags], cwd=REPO, stderr=out, stdout=out, start_new_session=own_session
        )
    try:
        # (at SCHED_IDLE: under 21 s in CI's runs, over 120 s beside two busy loops)
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while "queue" not in log.read_text():  # its start-up line: the model loaded, the queue open
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        threads = [int(t.name) for t in Path(f"/proc/{worker.pid}/task").iterdir()]
        assert len(threads) > 1
        assert thread_policies(worker.pid) == {policy}
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {nice}
        group = _autogroup(worker.pid)
        if own_session:
            assert group != ours and group.endswith(" nice 19"), group
        else:
            assert group == ours == _autogroup("self"), (group, ours)
    finally:
        worker.terminate()
        worker.wait(30)
