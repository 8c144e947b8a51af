"""Whether the worker's main thread still moves: what /healthz on its metrics port answers, and the
chart's liveness probe asks.

A claimed job is held by a heartbeat thread (worker/jobs_run.py `Heartbeat`) whatever the main
thread does, so a fine-tuning step, an export or a Triton load that never returned (a wedged GPU
call, a write to a storage that hangs) kept its job RUNNING and held for good, and the worker took
no other; from outside it looked like a worker exporting a large model. Now the main thread says
what it is doing and how long that may go on without another word (`doing`): a claim poll between
jobs IDLE_S, each fine-tuning step, the export and the load into Triton `stuck_after_s`
(--stuck-after). Past that, `stuck()` names it and /healthz answers 503; the kubelet restarts the
container, the heartbeat stops with it, and the job's claim times out to another worker. Time its
threads spent waiting for a CPU does not count (facekit/liveness.py: the embedded worker runs
under SCHED_IDLE, and a step starved by streams is not stuck). With a report file (the embedded
worker's `--liveness-file`), each word is also written there for the supervisor, which applies the
same rule from outside (service/local_worker.py). No torch here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

from facekit.liveness import STUCK_AFTER_S, Quiet, RunQueueWait, describe, write_report

# Between jobs: a claim poll (at most a few seconds), a queue retry wait (at most 30 s) and the
# checks of REMOVE jobs waiting for their record, with room to spare.
IDLE_S = 120.0


class Liveness:
    """What the main thread last said it was doing, since when, and for how long it may; the
    process's waits for a CPU (`waited`, default facekit.liveness.RunQueueWait) not counted."""

    def __init__(
        self,
        stuck_after_s: float = STUCK_AFTER_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        waited: Callable[[], float | None] | None = None,
        report: Path | None = None,
    ) -> None:
        self.stuck_after_s, self._report = stuck_after_s, report
        self._lock = threading.Lock()
        self._quiet = Quiet(RunQueueWait() if waited is None else waited, clock=clock)
        self._what, self._within, self._sequence = "starting", stuck_after_s, 0
        self._write()

    def doing(self, what: str, *, within_s: float | None = None) -> None:
        """The main thread starts `what` (or makes progress in it), which may take `within_s`
        (default stuck_after_s) before its next word."""
        with self._lock:
            self._what = what
            self._within = self.stuck_after_s if within_s is None else within_s
            self._quiet.reset()
            self._sequence += 1
        self._write()

    def _write(self) -> None:
        # A failed write (the job folder, where the job's own progress goes too, full) reads as no
        # progress to the supervisor, which kills the worker once the allowance is past.
        if self._report is not None:
            with contextlib.suppress(OSError):
                write_report(self._report, self._sequence, self._within, self._what)

    def seconds_since(self) -> float:
        """Since the main thread's last word (wall time, waits for a CPU included)."""
        with self._lock:
            return self._quiet.wall()

    def stuck(self) -> str | None:
        """None while the main thread moves; else what it has been doing for too long, and how
        long. Never stuck with stuck_after_s 0 (--stuck-after 0: the check is off)."""
        with self._lock:
            what, within = self._what, self._within
            quiet, starved = self._quiet.seconds()
        if self.stuck_after_s <= 0 or quiet <= within:
            return None
        return describe(what, quiet, within, starved)
