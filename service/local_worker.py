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
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from service.settings import Settings

log = logging.getLogger("talkinghead.service.worker")
QUICK_FAILURE_S = 20.0  # a worker that exits sooner than this after starting failed to start
GIVE_UP_AFTER = 3
STOP_GRACE_S = 10.0


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


def command(settings: Settings) -> list[str]:
    cmd = [sys.executable, "-m", "talkinghead.cli", "worker", "--jobs", str(settings.jobs)]
    cmd += ["--ready-file", str(ready_file(settings))]
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
    def __init__(self, *, settings: Settings, on_give_up: Callable[[str], None]) -> None:
        self.cmd = command(settings)
        self.ready = ready_file(settings)
        self.on_give_up = on_give_up
        self.process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="local-worker")

    async def _supervise(self) -> None:
        quick, delay = 0, 1.0
        while True:
            started = time.monotonic()
            self.ready.unlink(missing_ok=True)
            self.process = await asyncio.create_subprocess_exec(*self.cmd, stdin=asyncio.subprocess.DEVNULL)
            log.info("embedded worker started (pid %d): %s", self.process.pid, " ".join(self.cmd))
            code = await self.process.wait()
            lived = time.monotonic() - started
            was_ready = self.ready.exists()
            self.ready.unlink(missing_ok=True)
            quick = quick + 1 if lived < QUICK_FAILURE_S and not was_ready else 0
            if quick >= GIVE_UP_AFTER:
                why = f"the embedded worker exited (code {code}) {quick} times within seconds of starting"
                log.error("%s; giving up (does this image have PyTorch? see the log above)", why)
                self.on_give_up(why + " (see the server log)")
                return
            delay = min(delay * 2, 30.0) if quick else 1.0
            log.warning(
                "embedded worker exited with code %s after %.0f s; restarting in %.0f s", code, lived, delay
            )
            await asyncio.sleep(delay)

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
        self.ready.unlink(missing_ok=True)
