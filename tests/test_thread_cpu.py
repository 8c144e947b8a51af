"""The server's CPU split (service/metrics.py ThreadCpu): a Python thread's work is counted as the
service's own, and the counts only grow when threads end."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from service.metrics import ThreadCpu

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _scrape(registry: CollectorRegistry) -> dict[str, float]:
    lines = generate_latest(registry).decode().splitlines()
    prefix = 'talkinghead_cpu_seconds_total{threads="'
    return {
        line[len(prefix) :].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(prefix)
    }


def test_a_python_threads_work_is_the_services_and_stays_counted_after_it_ends() -> None:
    registry = CollectorRegistry()
    registry.register(ThreadCpu())
    first = _scrape(registry)
    assert set(first) == {"python", "native"}
    done, leave = threading.Event(), threading.Event()

    def work() -> None:
        _burn(0.3)
        done.set()
        leave.wait(10)

    thread = threading.Thread(target=work)
    thread.start()
    assert done.wait(30)
    while_alive = _scrape(registry)
    assert while_alive["python"] - first["python"] >= 0.25
    leave.set()
    thread.join()
    after = _scrape(registry)
    assert after["python"] >= while_alive["python"]  # an ended thread's CPU is kept, not lost
    assert after["native"] >= while_alive["native"]
