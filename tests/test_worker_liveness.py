"""worker/liveness.py: what the worker's /healthz says from what its main thread last said it was
doing (the process and HTTP path: tests/test_worker_metrics.py), and facekit/liveness.py's count of
the time a process waited for a CPU, against real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from facekit import metrics_http
from facekit.liveness import RunQueueWait, read_report
from worker.liveness import Liveness


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stage_is_stuck_only_past_its_own_allowance_and_progress_clears_it() -> None:
    clock = Clock()
    alive = Liveness(60, clock=clock, waited=lambda: 0.0)
    clock.now += 59
    assert alive.stuck() is None  # starting: the checkpoint loads within --stuck-after
    alive.doing("waiting for a job", within_s=5)
    clock.now += 6
    assert alive.stuck() == "stuck: waiting for a job, no progress for 6.0 s (allowed 5 s)"
    alive.doing("job j1: fine-tuning, step 1 of 4 done")
    clock.now += 60
    assert alive.stuck() is None and alive.seconds_since() == 60
    clock.now += 1
    assert (
        alive.stuck() == "stuck: job j1: fine-tuning, step 1 of 4 done, no progress for 61.0 s (allowed 60 s)"
    )
    alive.doing("job j1: fine-tuning, step 2 of 4 done")
    assert alive.stuck() is None


def test_time_spent_waiting_for_a_cpu_is_not_counted_and_each_word_is_reported(tmp_path: Path) -> None:
    """The embedded worker's main thread runs at SCHED_IDLE: beside streams that take the cores a
    step waits for a CPU for minutes, and that is not being stuck. What it says is also written
    to the report file its supervisor reads (service/local_worker.py)."""
    clock, waited = Clock(), [5.0]
    report = tmp_path / "liveness"
    alive = Liveness(60, clock=clock, waited=lambda: waited[0], report=report)
    assert read_report(report) == (0, 60.0, "starting")
    alive.doing("job j1: fine-tuning, step 1 of 4 done")
    assert read_report(report) == (1, 60.0, "job j1: fine-tuning, step 1 of 4 done")
    clock.now += 600
    waited[0] += 590  # 10 s on a CPU (or blocked), 590 s runnable and kept off one
    assert alive.stuck() is None and alive.seconds_since() == 600
    clock.now += 51
    assert alive.stuck() == (
        "stuck: job j1: fine-tuning, step 1 of 4 done, no progress for 61.0 s (allowed 60 s; "
        "590 s more waiting for a CPU not counted)"
    )
    alive.doing("waiting for a job", within_s=5)
    assert read_report(report) == (2, 5.0, "waiting for a job") and alive.stuck() is None


# argv: the CPU, a file to touch once at SCHED_IDLE, "spin" or "sleep".
IDLE = """
import os, sys, time
from pathlib import Path
os.sched_setaffinity(0, {int(sys.argv[1])})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
Path(sys.argv[2]).touch()
while True:
    if sys.argv[3] == "sleep":
        time.sleep(3600)
"""
HOG = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def test_a_wait_for_a_cpu_counts_while_it_goes_on_not_only_once_it_ends(tmp_path: Path) -> None:
    """A SCHED_IDLE process beside a busy one on its CPU gets the CPU for a moment every ~1.4 s (more
    with more beside it); the kernel adds each wait to its count only then, and a supervisor that
    read that count alone saw seconds of starvation as seconds of silence (with a short allowance,
    it killed a worker that was only starved). A sleeping process waits for nothing."""
    cpu = min(os.sched_getaffinity(0))
    children: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        children.append(subprocess.Popen([sys.executable, "-c", *argv]))
        return children[-1]

    def when(ready: Path) -> None:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)

    try:
        spinning, sleeping = start(IDLE, str(cpu), str(tmp_path / "spin"), "spin"), None
        when(tmp_path / "spin")
        sleeping = start(IDLE, str(cpu), str(tmp_path / "sleep"), "sleep")
        when(tmp_path / "sleep")
        hog = start(HOG, str(cpu))
        while int(Path(f"/proc/{hog.pid}/schedstat").read_text().split()[0]) < 0.3e9:
            time.sleep(0.02)  # until the hog has started and spun a while
        starved, idle = RunQueueWait(spinning.pid), RunQueueWait(sleeping.pid)
        began, first, idle_first = time.monotonic(), starved(), idle()
        assert first is not None and idle_first is not None
        short = []
        while (elapsed := time.monotonic() - began) < 4:
            waited = starved()
            assert waited is not None
            short.append(elapsed - (waited - first))  # what the count leaves out of the time starved
            time.sleep(0.1)
        assert max(short[5:]) < 0.5, [round(s, 2) for s in short]
        assert idle() == idle_first
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert RunQueueWait(spinning.pid)() is None  # the process gone


def test_stuck_after_zero_never_reports_stuck() -> None:
    clock = Clock()
    alive = Liveness(0, clock=clock, waited=lambda: 0.0)
    alive.doing("job j1: exporting its generator")
    clock.now += 10**6
    assert alive.stuck() is None


def test_healthz_answers_beside_metrics_on_one_port() -> None:
    """200 "ok" while alive, 503 with the reason when stuck; every other path is still /metrics;
    without a health check /healthz is /metrics too (the server's port, as before)."""
    said: list[str | None] = [None]
    registry = CollectorRegistry()
    Counter("talkinghead_worker_example_total", "an example", registry=registry).inc()
    server, _ = metrics_http.serve("127.0.0.1", 0, registry, lambda: said[0])
    plain, _ = metrics_http.serve("127.0.0.1", 0, registry)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as reply:
            assert (reply.status, reply.read()) == (200, b"ok\n")
        said[0] = "stuck: job j1: exporting its generator, no progress for 901.0 s (allowed 900 s)"
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
            raise AssertionError("503 expected")
        except urllib.error.HTTPError as error:
            assert error.code == 503 and error.read().decode().strip() == said[0]
        for url in (f"{base}/metrics", f"http://127.0.0.1:{plain.server_address[1]}/healthz"):
            with urllib.request.urlopen(url, timeout=5) as reply:
                assert reply.status == 200
                assert b"talkinghead_worker_example_total 1.0" in reply.read()
    finally:
        for s in (server, plain):
            s.shutdown()
            s.server_close()
