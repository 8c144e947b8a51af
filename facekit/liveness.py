"""Whether a thread that should make progress has gone quiet: the rule the personalisation worker's
/healthz (worker/liveness.py) and the embedded worker's supervisor (service/local_worker.py) share,
and the small file by which the worker tells its supervisor what it is doing.

Quiet time is wall time less the time the process's threads spent runnable but kept off a CPU
(their run-queue waits, /proc/<pid>/task/*/schedstat, summed). The embedded worker runs under
SCHED_IDLE: beside streams that take both cores a fine-tuning step waits minutes for a CPU, by
design (a job waits until the streams leave room), and counting that wait would call a starved
worker stuck and kill it. Every thread's, not the main thread's alone: with PyTorch's pool
(TALKINGHEAD_WORKER_THREADS above 1) the main thread sleeps at the pool's barrier while the pool's
threads are the starved ones. A process blocked in a call that never returns (a Triton that took
the connection and never answers), or a stopped one, waits on no run queue: its quiet time is its
wall time, less what a thread that wakes now and then (the job's heartbeat) waits when it does.
The kernel adds a wait to the count only when it ends (the thread gets a CPU): a SCHED_IDLE thread
beside one busy process on its CPU gets one every ~1.4 s, beside three every ~2.5 s, so the count
alone lagged by seconds and a short allowance could kill a starved worker. `RunQueueWait` also
counts the wait under way: a thread runnable at two reads that had no CPU time in between waited
all along.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

# A job's stage without progress before its worker counts as stuck: the slowest step, export or load,
# and more (the worker's --stuck-after, the server's TALKINGHEAD_WORKER_STUCK_AFTER).
STUCK_AFTER_S = 900.0


class RunQueueWait:
    """Seconds the threads of a process have waited for a CPU while runnable, summed, so far (of
    the threads alive now), the waits under way included as far as this object has seen them;
    None where /proc cannot say (off Linux, the process gone). Call it at least every few seconds:
    a wait under way counts from the first call that found the thread runnable."""

    def __init__(self, pid: int | str = "self", *, clock: Callable[[], float] = time.monotonic) -> None:
        self._tasks, self._clock = Path(f"/proc/{pid}/task"), clock
        self._held: dict[str, tuple[str, float]] = {}  # runnable thread -> (its schedstat, since)

    def __call__(self) -> float | None:
        now = self._clock()
        try:
            tasks = list(self._tasks.iterdir())
        except OSError:
            return None
        total, found, held = 0.0, False, {}
        for task in tasks:
            try:
                stat = (task / "schedstat").read_text()
                state = (task / "stat").read_text().rpartition(")")[2].split()[0]
                total += int(stat.split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                continue  # (a thread that ended meanwhile)
            found = True
            if state == "R":  # on a CPU or waiting for one; the same schedstat: no CPU since
                before = self._held.get(task.name)
                since = before[1] if before is not None and before[0] == stat else now
                held[task.name] = (stat, since)
                total += now - since
        self._held = held
        return total if found else None


class Quiet:
    """Seconds since `reset()` that were not spent waiting for a CPU (`waited`: a process's
    RunQueueWait). Where `waited` says None, wall time."""

    def __init__(
        self, waited: Callable[[], float | None], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._waited, self._clock = waited, clock
        self._since, self._waited_at = clock(), waited()

    def reset(self) -> None:
        self._since, self._waited_at = self._clock(), self._waited()

    def wall(self) -> float:
        """Seconds since the last reset, waits for a CPU included."""
        return self._clock() - self._since

    def seconds(self) -> tuple[float, float]:
        """(quiet seconds, seconds kept off a CPU) since the last reset."""
        wall = self.wall()
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
