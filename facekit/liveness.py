"""Whether a thread that should make progress has gone quiet: the rule the personalisation worker's
/healthz (worker/liveness.py) and the embedded worker's supervisor (service/local_worker.py) share,
and the small file by which the worker tells its supervisor what it is doing.

Quiet time is wall time less the time the thread spent runnable but kept off the CPU (its run
queue wait, /proc/<pid>/task/<tid>/schedstat). The embedded worker runs under SCHED_IDLE: beside
streams that take both cores a fine-tuning step waits minutes for a CPU, by design (a job waits
until the streams leave room), and counting that wait would call a starved worker stuck and kill
it. A thread blocked in a call that never returns (a Triton that took the connection and never
answers), or a stopped process, waits on no run queue: its quiet time is its wall time. The kernel
adds a wait to the count when it ends (the thread gets a CPU), so the count lags by the wait under
way: ~1.4 s for a SCHED_IDLE thread beside one busy process on its CPU, against allowances of
minutes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path


def run_queue_wait(pid: int | str = "self", thread: int | None = None) -> float | None:
    """Seconds a thread (the process's main thread without `thread`) has waited for a CPU while
    runnable, so far; None where /proc cannot say (off Linux, the thread gone)."""
    tid = pid if thread is None else thread
    try:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def this_thread_waits() -> Callable[[], float | None]:
    """run_queue_wait of the calling thread, as a callable any thread may call."""
    tid = threading.get_native_id()
    return lambda: run_queue_wait("self", tid)


class Quiet:
    """Seconds since `reset()` that were not spent waiting for a CPU (`waited`: a thread's
    run_queue_wait). Where `waited` says None, wall time."""

    def __init__(
        self, waited: Callable[[], float | None], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._waited, self._clock = waited, clock
        self._since, self._waited_at = clock(), waited()

    def reset(self) -> None:
        self._since, self._waited_at = self._clock(), self._waited()

    def seconds(self) -> tuple[float, float]:
        """(quiet seconds, seconds kept off a CPU) since the last reset."""
        wall = self._clock() - self._since
        now, then = self._waited(), self._waited_at
        starved = 0.0 if now is None or then is None else min(wall, max(0.0, now - then))
        return wall - starved, starved


def describe(what: str, quiet: float, within: float, starved: float) -> str:
    """What /healthz and the supervisor's log say of a thread past its allowance."""
    also = f"; {starved:.0f} s more waiting for a CPU not counted" if starved >= 1 else ""
    return f"stuck: {what}, no progress for {quiet:.1f} s (allowed {within:g} s{also})"


# The report file: "<sequence> <allowance s>\n<what>\n", replaced whole (written aside, renamed).
def write_report(path: Path, sequence: int, within_s: float, what: str) -> None:
    aside = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    aside.write_text(f"{sequence} {within_s:g}\n{what}\n")
    aside.replace(path)


def read_report(path: Path) -> tuple[int, float, str] | None:
    """(sequence, allowance s, what) of a report file; None while there is none (or not whole)."""
    try:
        head, _, what = path.read_text().partition("\n")
        sequence, within = head.split()
        return int(sequence), float(within), what.strip()
    except (OSError, ValueError):
        return None
