"""The embedded worker: `talkinghead serve` without Redis runs `talkinghead worker` as a child.

The worker is training code (PyTorch) and so never runs inside this process: the service starts
it as a separate process on the same job directory and model repository, restarts it when it
exits (1, 2, 4 ... 30 s apart), and stops it with the service. A worker that cannot even start
(no PyTorch in this image, a checkpoint it cannot read: it exits before it says it is ready, in
`--ready-file`) is given up after a few quick failures; personalisation is then refused with
FAILED_PRECONDITION and the reason, and the operations already queued end FAILED with it
(server.py `_no_worker`). One that started and died on a job (killed for memory) is restarted
however soon it died: the job's attempts end it (the worker's MAX_ATTEMPTS). Before, three such
deaths within 20 s of their starts gave up personalisation for the server's life and left the
job RUNNING for good, its cancel never acted on. A checkpoint that is not there at all
is known at start: no worker is started. The child also stops when its parent is gone
(`--parent-pid`: a service killed with SIGKILL leaves no worker behind once its job ends).

A worker that is alive but stuck is restarted too, as a worker pod's liveness probe restarts it:
the child writes what it is doing at each step to `--liveness-file` (facekit/liveness.py), and
every CHECK_S the supervisor reads it; once the same word has stood longer than the allowance it
came with (a job's step, export or load into Triton: TALKINGHEAD_WORKER_STUCK_AFTER), not counting
the time the worker's threads waited for a CPU, the worker is killed. Its job's heartbeat
stops with it and the restarted worker takes the job over (another attempt). Before, a hung step
or a Triton that took the connection and never answered held the job RUNNING, personalisation
stopped for the server's life, and nothing said so. Not its /healthz over HTTP: the worker's main
thread runs under SCHED_IDLE, holds the interpreter between PyTorch calls, and beside streams
that take both cores the answer took up to 4 s (an HTTP answer needs the interpreter); its CPU
waits, by the kernel's count, need nothing from it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from facekit.liveness import Quiet, RunQueueWait, describe, read_report
from service.settings import Settings

log = logging.getLogger("talkinghead.service.worker")
QUICK_FAILURE_S = 20.0  # a worker that exits sooner than this after starting failed to start
GIVE_UP_AFTER = 3
STOP_GRACE_S = 10.0
CHECK_S = 10.0  # between reads of the worker's liveness file
# talkinghead_embedded_worker_restarts_total's `reason`: it exited (or was killed from outside), or
# its liveness file said the same for longer than allowed
RESTART_REASONS = ("exited", "stuck")


# TALKINGHEAD_WORKER_PRIORITY -> the worker's policy. Measured with `talkinghead bench` section 5
# (2-core VM, openvino fp32 in 2 lanes; one live stream at 25 fps, 15 s, a 100-step job) and one
# offline stream (8 frames in flight, 20 s) beside a job, one PyTorch thread unless said:
#   normal (the server's SCHED_BATCH, nice 0; PyTorch's 2 threads, as before 2026-12-04): live
#     p50 / p99 170-198 / 259-317 ms, 10 frames dropped, 3-5 steps;
#   low (SCHED_BATCH, nice 10): live 52-53 / 77-88 ms, 0 dropped, 24-25 steps; beside the offline stream
#     3 steps in 20 s (it served 909-915 frames against 954);
#   idle (SCHED_IDLE): live 48-50 / 59-60 ms, 0 dropped, 23-25 steps; beside the offline stream
#     0 steps: a job waits until offline streams end. Admission's measured capacity stays true.
# One thread: with 2 at SCHED_IDLE the job made 3 steps in 36 s beside the live stream (each step
# waits for both threads, and one is always the one preempted); with 1, 62 (64 with no stream;
# 2 threads and no stream: 100 steps and the export within 35 s).
PRIORITIES = {
    "idle": ["--cpu-scheduling", "idle"],
    "low": ["--cpu-scheduling", "batch", "--nice", "10"],
    "normal": [],  # the server's own policy, inherited
}


def ready_file(settings: Settings) -> Path:
    """Where the embedded worker says it started (in the job directory it already writes)."""
    return settings.jobs / f".worker-ready-{os.getpid()}"


def liveness_file(settings: Settings) -> Path:
    """Where the embedded worker writes what it is doing (facekit/liveness.py `write_report`)."""
    return settings.jobs / f".worker-liveness-{os.getpid()}"


def command(settings: Settings) -> list[str]:
    cmd = [sys.executable, "-m", "talkinghead.cli", "worker", "--jobs", str(settings.jobs)]
    cmd += ["--ready-file", str(ready_file(settings))]
    if settings.worker_stuck_after > 0:
        cmd += ["--liveness-file", str(liveness_file(settings))]
    cmd += ["--stuck-after", f"{settings.worker_stuck_after:g}"]
    cmd += ["--avatars", str(settings.avatar_store)]  # what it checks before it withdraws a generator
    cmd += ["--repository", str(settings.model_repository), "--checkpoint", str(settings.worker_checkpoint)]
    if settings.backend == "triton":
        for url in settings.triton_url.split(","):  # a list of Tritons: the worker loads in each
            cmd += ["--triton-url", url.strip()]
        cmd += ["--max-personalised-loaded", str(settings.max_personalised_loaded)]
    cmd += PRIORITIES[settings.worker_priority]
    if settings.worker_threads:
        cmd += ["--threads", str(settings.worker_threads)]
    log_args = ["--log-level", settings.log_level, "--log-format", settings.log_format]  # as the server's
    return [*cmd, *log_args, "--parent-pid", str(os.getpid())]


class LocalWorker:
    def __init__(
        self,
        *,
        settings: Settings,
        on_give_up: Callable[[str], None],
        on_restart: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.cmd = command(settings)
        self.ready = ready_file(settings)
        self.liveness = liveness_file(settings) if settings.worker_stuck_after > 0 else None
        self.on_give_up, self.on_restart = on_give_up, on_restart
        self.process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._killed_for: str | None = None  # why the watch killed the worker now ending

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="local-worker")

    async def _supervise(self) -> None:
        quick, delay = 0, 1.0
        while True:
            started = time.monotonic()
            self._forget_files()
            self.process = process = await asyncio.create_subprocess_exec(
                *self.cmd, stdin=asyncio.subprocess.DEVNULL
            )
            log.info("embedded worker started (pid %d): %s", process.pid, " ".join(self.cmd))
            watch = asyncio.create_task(self._watch(process), name="local-worker-health")
            try:
                code = await process.wait()
            finally:
                watch.cancel()
            lived = time.monotonic() - started
            was_ready = self.ready.exists()
            self._forget_files()
            reason, self._killed_for = self._killed_for or "exited", None
            quick = quick + 1 if lived < QUICK_FAILURE_S and not was_ready else 0
            if quick >= GIVE_UP_AFTER:
                why = f"the embedded worker exited (code {code}) {quick} times within seconds of starting"
                log.error("%s; giving up (does this image have PyTorch? see the log above)", why)
                self.on_give_up(why + " (see the server log)")
                return
            self.on_restart(reason)
            delay = min(delay * 2, 30.0) if quick else 1.0
            log.warning(
                "embedded worker exited with code %s after %.0f s; restarting in %.0f s", code, lived, delay
            )
            await asyncio.sleep(delay)

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        """Kill `process` once its liveness file has said the same for longer than it allowed,
        less the time its threads waited for a CPU."""
        if self.liveness is None:
            return
        seen, quiet = None, Quiet(RunQueueWait(process.pid))
        while process.returncode is None:
            await asyncio.sleep(CHECK_S)
            report = read_report(self.liveness)
            if report is None:
                continue  # not written yet (its first second of imports)
            sequence, within, what = report
            if sequence != seen:  # a new word since the last read: the clock starts again
                seen = sequence
                quiet.reset()
                continue
            seconds, starved = quiet.seconds()
            if seconds > within and process.returncode is None:
                why = describe(what, seconds, within, starved)
                log.error("embedded worker (pid %d) %s; killing it to restart it", process.pid, why)
                self._killed_for = "stuck"
                process.kill()
                return

    def _forget_files(self) -> None:
        self.ready.unlink(missing_ok=True)
        if self.liveness is not None:
            self.liveness.unlink(missing_ok=True)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        process = self.process
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_S)
            except TimeoutError:
                process.kill()
                await process.wait()
        self._forget_files()
