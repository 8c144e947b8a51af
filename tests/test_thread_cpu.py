"""The server's CPU split (service/metrics.py ThreadCpu): its own Python threads' work is the
service's, the threads that call the engine count as the engine's, and the counts only grow when
threads end."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from client.bench import cpu_by_threads
from service.metrics import ENGINE_CALLS, ThreadCpu

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
