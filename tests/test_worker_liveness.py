"""worker/liveness.py: what the worker's /healthz says from what its main thread last said it was
doing (the process and HTTP path: tests/test_worker_metrics.py)."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from facekit import metrics_http
from facekit.liveness import read_report
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
