"""One job, start to end: fine-tune with progress, publish, end; or withdraw a deleted avatar's model;
and, between jobs, the sweep of generators whose avatar record is gone.

Progress is written after every fine-tuning step (step, losses, the time estimate); the write also
tells whether cancellation was asked, which stops the job at that step. A heartbeat thread keeps
the job held while the worker exports (no steps then). Whatever happens the job ends with a state
and a google.rpc code, except when the worker lost it to another worker (Lost): then it writes
nothing more and leaves the job to its new holder; or when the worker is stopping (SIGTERM: the
job goes back to the queue at its next step, QUEUED, its attempt not counted). An end the queue
cannot write (its directory full, Redis away) is kept and written again between other jobs, the
job held meanwhile: never run again for it. A personalisation's generator carries its job's id: an
attempt that finds one an earlier attempt published (that worker stopped or died before the end
was written) ends the job with it instead of fine-tuning again.

The worker reads the avatar store (jobs.avatars: the service's directory, or Redis) to know
which record each avatar is now. The service queues a deleted or replaced record's REMOVE job
before the record goes (so that a crash between the two cannot leave its generator for good):
the job waits for the record it names to go, and then takes every version of the generator not
made for the record the store holds now (all of them when there is none); a record still there
after REMOVE_WAIT_S was not deleted after all (the delete failed, or its server died first) and
keeps its generator. While it waits the worker runs other jobs (`Waiting`: the job stays held and
is checked between them; before, the worker polled for up to 30 s and ran nothing else). A
personalisation whose record is gone or replaced stops before it fine-tunes and before it
publishes. The sweep (at start, then every sweep_interval_s) withdraws
the versions of every generator_<id> stamped for a record the store no longer holds: what a
REMOVE job never came for (a delete before REMOVE jobs were queued first, a worker's crash).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from export import repository
from facekit import contract
from facekit.ids import validate_stored_id
from jobs import events
from jobs.avatars import AvatarIndex
from jobs.queue import JobQueue, Lost, StoreFull, Unreachable, unpack_input
from jobs.record import (
    CANCELLED,
    CODE_CANCELLED,
    CODE_FAILED_PRECONDITION,
    CODE_INTERNAL,
    CODE_RESOURCE_EXHAUSTED,
    CODE_UNAVAILABLE,
    EXPORT_ESTIMATE_S,
    FAILED,
    REMOVE,
    SUCCEEDED,
    Job,
    cancelled_why,
)
from training import checkpoint
from training.finetune import personalise
from training.runtime import Diverged
from worker import SWEEP_INTERVAL_S, models
from worker.liveness import IDLE_S, Liveness
from worker.metrics import HANDED_BACK, LOST, WorkerMetrics

log = logging.getLogger("talkinghead.worker")


# A personalisation whose worker died this many times (killed for memory, say) is not run again.
MAX_ATTEMPTS = 3
# A REMOVE job is queued before its record is deleted: how long it waits for the record to go
# (checked every REMOVE_POLL_S between other jobs, and after each job: it holds none of them up).
REMOVE_WAIT_S = 30.0
REMOVE_POLL_S = 0.1
# After a progress write found the queue unreachable, fine-tuning steps write none for this long (a
# write to a Redis that is away waits out its socket timeout, ~3 s: every step would).
UNREACHABLE_QUIET_S = 5.0


class Cancelled(Exception):
    """The job was cancelled: str() says at what point; `reason`, why, when the worker found it out
    itself (the cancel's own reason, which the queue holds, comes first: `_cancel_reason`)."""

    def __init__(self, what: str, *, reason: str = "") -> None:
        super().__init__(what)
        self.reason = reason


class Stopped(Exception):
    """The worker is stopping (SIGTERM): the job goes back to the queue, its attempt not counted."""


@dataclass
class Ending:
    """A job's end to write (`finish`), what follows it once written (or lost to another worker:
    an event every replica must hear), and what undoes a SUCCEEDED end's publish when the queue
    refuses that end for a cancel asked meanwhile. Not `worked`: ended at its claim, nothing run
    (its metrics have no stage past queued)."""

    job: Job
    then: Callable[[], None] | None = None
    undo: Callable[[], None] | None = None
    worked: bool = True


class Unwritten(Exception):
    """An end the queue could not write (the job directory full, Redis away or at its memory
    limit): the job is still held, and the worker writes it again between other jobs (`Waiting`)."""

    def __init__(self, ending: Ending, error: Exception) -> None:
        super().__init__(f"job {ending.job.id}: its end ({ending.job.state}) not written: {error}")
        self.ending = ending


@dataclass
class Estimates:
    """What this worker measured of its personalisations (0: nothing yet), a running mean, written
    into each job it takes (Job.remaining's estimate before the job's own pace is known, and of
    its export): export + load (it was a fixed 20 s, measured 0.5-2.2 s), claim to step 1 ended,
    and the time per step."""

    export_s: float = 0.0
    start_s: float = 0.0
    step_s: float = 0.0

    def learn(self, job: Job, now: float) -> None:
        """Learn from a job that fine-tuned and published (just before its end is written)."""
        measured = {"export_s": now - job.export_time, "start_s": job.first_step_time - job.start_time}
        if job.steps > 1:
            measured["step_s"] = (job.export_time - job.first_step_time) / (job.steps - 1)
        for name, value in measured.items():
            if value > 0:
                old = getattr(self, name)
                setattr(self, name, value if not old else (old + value) / 2)

    def stamp(self, job: Job) -> None:
        job.export_estimate_s = self.export_s or EXPORT_ESTIMATE_S
        job.start_estimate_s, job.step_estimate_s = self.start_s, self.step_s


@dataclass(frozen=True, kw_only=True)
class Context:
    """What every job needs: the queue, the meta checkpoint (loaded once) and where models go."""

    queue: JobQueue
    meta: dict[str, Any]
    model_id: str
    repository: Path
    profile: str
    tritons: list[str]
    heartbeat_s: float
    device: torch.device
    max_loaded: int = contract.MAX_PERSONALISED  # personalised generators a Triton keeps loaded
    # the avatar store (None: not visible to this worker - a REMOVE then withdraws the versions
    # stamped for its record, and unstamped ones, without waiting; no sweep)
    avatars: AvatarIndex | None = None
    remove_wait_s: float = REMOVE_WAIT_S
    sweep_interval_s: float = SWEEP_INTERVAL_S  # 0: never
    # set when the worker is asked to stop (SIGTERM): a job fine-tuning goes back to the queue at
    # its next step (before, it ran on until the service killed the worker 10 s later, and each
    # such stop counted as one of its MAX_ATTEMPTS)
    stopping: threading.Event = field(default_factory=threading.Event)
    estimates: Estimates = field(default_factory=Estimates)
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)  # served with --metrics-port
    liveness: Liveness = field(default_factory=Liveness)  # what the main thread is doing: /healthz


class Heartbeat:
    """Calls queue.heartbeat(job) every `interval` seconds in a thread until stopped; `lost` is set
    when the job was taken over or is gone, `why` says which."""

    def __init__(self, ctx: Context, job: Job) -> None:
        self.queue, self.job, self.interval, self.metrics = ctx.queue, job, ctx.heartbeat_s, ctx.metrics
        self.lost = threading.Event()
        self.why: Lost = Lost(f"job {job.id} was taken over by another worker")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job.id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.queue.heartbeat(self.job)
            except Lost as error:
                self.why = error
                self.lost.set()
                return
            except Exception as error:  # Redis away for a moment: the claim timeout allows a few misses
                log.warning("heartbeat of job %s failed: %s", self.job.id, error)
                self.metrics.on_queue(False)
            else:
                self.metrics.on_queue(True)


def with_progress_every_step(meta: dict[str, Any]) -> dict[str, Any]:
    """The meta checkpoint with finetune.log_every = 1 (progress after each step; the weights, and so
    the model id, are the same object)."""
    config = copy.deepcopy(meta["config"])
    config["finetune"]["log_every"] = 1
    return {**meta, "config": config}


def run_job(ctx: Context, job: Job, waiting: Waiting | None = None) -> None:
    """Run one claimed job to its end (or until it is lost). A REMOVE job whose record is still
    there goes to `waiting` (serve_jobs': checked again between other jobs); without one it is
    waited for here."""
    log.info("job %s (%s %s, attempt %d) started", job.id, job.kind, job.avatar_id, job.attempt)
    ctx.liveness.doing(f"job {job.id} ({job.kind} {job.avatar_id})")
    later = waiting if waiting is not None else Waiting(ctx)

    def run() -> bool:
        with Heartbeat(ctx, job) as beat:
            if job.kind == REMOVE:
                _remove(ctx, job, later)
            elif _adopt(ctx, job, beat):
                pass
            elif job.attempt > MAX_ATTEMPTS:
                _give_up(ctx, job)
            else:
                _personalise(ctx, job, beat)
        return True

    ctx.metrics.job_running.set(1)
    try:
        _settle(ctx, job, run, later)
    finally:
        ctx.metrics.job_running.set(0)
    if waiting is None:
        later.wait()


def _settle(ctx: Context, job: Job, step: Callable[[], bool], later: Waiting) -> bool:
    """Run a step of the job: whether the job is over for this worker - `step` says so, or it
    raised: lost to another worker (nothing written), handed back (the worker stopping),
    cancelled or failed (ended so). An end the queue could not write goes to `later` (written
    again between other jobs: before, it escaped, and the job stayed RUNNING and held, never
    cancelled, its avatar busy, until the worker restarted)."""
    try:
        try:
            return step()
        except Unwritten:
            raise
        except Lost as error:
            log.warning("%s; %s", error, error.then)
            ctx.metrics.on_end(job, LOST)
        except Stopped as why:
            _hand_back(ctx, job, str(why))
        except Cancelled as why:
            said = cancelled_why(str(why), _cancel_reason(ctx, job) or why.reason)
            _end(ctx, job.ended(CANCELLED, code=CODE_CANCELLED, error=said))
        except Exception as error:
            log.exception("job %s failed", job.id)
            code, message = failure(error)
            _end(ctx, job.ended(FAILED, code=code, error=message))
    except Unwritten as unwritten:
        later.end_later(unwritten.ending, unwritten.__cause__)
    return True


def _cancel_reason(ctx: Context, job: Job) -> str:
    """Why the job's cancel was asked ("the avatar was deleted"), as the queue holds it until the
    end is written; "" when it gave none (CancelOperation) or cannot be read now."""
    try:
        now = ctx.queue.get(job.id)
    except Exception as error:  # (the end is written without it)
        log.warning("job %s: cannot read why it was cancelled: %s", job.id, error)
        return ""
    return now.cancel_reason if now is not None else ""


def _hand_back(ctx: Context, job: Job, why: str) -> None:
    """Give a job back to the queue, QUEUED and its attempt not counted, for the next worker."""
    try:
        ctx.queue.release(job)
    except Lost as error:
        log.warning("%s; %s", error, error.then)
        ctx.metrics.on_end(job, LOST)
        return
    except Exception as error:  # the queue away: its claim times out (the lock goes with the process)
        log.warning(
            "job %s: cannot hand it back (%s: %s); it is taken again later",
            job.id,
            type(error).__name__,
            error,
        )
        return
    log.info("job %s %s; handed back to the queue (the worker is stopping)", job.id, why)
    ctx.metrics.on_end(job, HANDED_BACK)


class Waiting:
    """REMOVE jobs whose record is still there (the delete that queued one has not happened, or
    failed), held (a heartbeat each) and checked again by `check` - between other jobs, so that
    none waits behind them (before, the worker polled the store for up to remove_wait_s, 30 s,
    and ran nothing else) - each until its record goes (its versions are then withdrawn) or its
    remove_wait_s is over (CANCELLED: the record, still there, keeps its generator)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._jobs: dict[str, tuple[Job, float, Heartbeat]] = {}  # id -> job, deadline, heartbeat
        # ends the queue could not write: id -> ending, heartbeat, next try (monotonic), wait after it
        self._ends: dict[str, tuple[Ending, Heartbeat, float, float]] = {}

    def __len__(self) -> int:
        return len(self._jobs) + len(self._ends)

    def end_later(self, ending: Ending, error: BaseException | None) -> None:
        """Hold a job whose end the queue could not write, and write it again between other jobs
        (END_RETRY_S apart, doubling) until it is written or the job is lost to another worker:
        its result is kept - it is not run again, and no attempt is spent."""
        job = ending.job
        if job.id in self._ends:
            _, beat, _, wait = self._ends[job.id]
            wait = min(2 * wait, END_RETRY_S[1])
        else:
            beat, wait = Heartbeat(self.ctx, job), END_RETRY_S[0]
            beat.__enter__()
        self._ends[job.id] = (ending, beat, time.monotonic() + wait, wait)
        log.warning(
            "job %s: cannot write its end (%s, %s): %s; trying again in %.0f s",
            job.id,
            job.state,
            job.error or "no error",
            error,
            wait,
        )

    def add(self, job: Job) -> None:
        beat = Heartbeat(self.ctx, job)
        beat.__enter__()
        self._jobs[job.id] = (job, time.monotonic() + self.ctx.remove_wait_s, beat)
        log.info("job %s: the avatar record is still there; checking again while other jobs run", job.id)

    def check(self) -> None:
        for job_id, entry in list(self._ends.items()):
            ending, beat, when, _ = entry
            if beat.lost.is_set():
                log.warning("%s; %s", beat.why, beat.why.then)
            else:
                if time.monotonic() < when:
                    continue
                _settle(self.ctx, ending.job, functools.partial(_write_end, self.ctx, ending), self)
                if self._ends.get(job_id) is not entry:  # not written yet: end_later put it back
                    continue
            del self._ends[job_id]
            beat.__exit__()
        for job_id, (job, deadline, beat) in list(self._jobs.items()):
            if _settle(self.ctx, job, functools.partial(self._step, job, deadline, beat), self):
                del self._jobs[job_id]
                beat.__exit__()

    def _step(self, job: Job, deadline: float, beat: Heartbeat) -> bool:
        if beat.lost.is_set():
            raise beat.why
        if _record_gone(self.ctx, job):
            name = contract.personalised_name(job.avatar_id)
            _withdraw(
                self.ctx, job, _not_of_current_record(self.ctx, job.avatar_id, name, keep_unstamped=False)
            )
            return True
        if time.monotonic() >= deadline:
            message = "the avatar record is still there (its delete or replace did not happen)"
            log.warning("job %s: %s; its generator stays", job.id, message)
            _end(self.ctx, job.ended(CANCELLED, code=CODE_CANCELLED, error=message))
            return True
        return False

    def wait(self) -> None:
        """Check until every job is over."""
        while self:
            self.check()
            if self:
                time.sleep(REMOVE_POLL_S)

    def close(self) -> None:
        """Stop holding the jobs still waiting: a REMOVE job is handed back (another worker takes
        it at once); an end not written yet is tried once more, then left (the job is taken again
        once this worker is gone: its lock goes with the process, or its claim times out). A
        SUCCEEDED end left so is not lost: its generator, stamped with the job's id, is what the
        next attempt ends the job with, without fine-tuning again (`_adopt`); a FAILED or
        CANCELLED one's job runs again, that attempt counted."""
        for job, _, beat in self._jobs.values():
            beat.__exit__()
            _hand_back(self.ctx, job, "waiting for its record")
        self._jobs.clear()
        for job_id, (ending, beat, _, _) in list(self._ends.items()):
            beat.__exit__()
            with contextlib.suppress(Exception):
                _write_end(self.ctx, ending)
                continue
            log.warning(
                "job %s: its end (%s) still not written; left to the next worker", job_id, ending.job.state
            )
        self._ends.clear()


def failure(error: Exception) -> tuple[int, str]:
    """A failed job's code and message, as its caller reads them (GetOperation): what went wrong,
    not where - no paths, addresses or a library's own words; the worker's log has those."""
    if isinstance(error, StoreFull):  # the job directory, not the repository (it said so before)
        return CODE_UNAVAILABLE, "the job queue's storage is full; personalise again later"
    if isinstance(error, Unreachable):
        return CODE_UNAVAILABLE, "the job queue could not be reached; personalise again later"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return CODE_UNAVAILABLE, "the model repository is full; personalise again later"
    if type(error).__name__ == "InferenceServerException":  # tritonclient's, from load_model
        return CODE_UNAVAILABLE, "the model server could not load the generator; personalise again later"
    if isinstance(error, Diverged):  # (nothing published)
        return CODE_INTERNAL, f"fine-tuning failed: {error}; nothing was published"
    if isinstance(error, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()  # the next job starts from the memory this one held, not from its pieces
        return (
            CODE_RESOURCE_EXHAUSTED,
            "the worker ran out of GPU memory fine-tuning; personalise again later",
        )
    return CODE_INTERNAL, f"internal error: {type(error).__name__} (the worker's log has the details)"


def _end(
    ctx: Context,
    job: Job,
    *,
    then: Callable[[], None] | None = None,
    undo: Callable[[], None] | None = None,
    worked: bool = True,
) -> None:
    """Write the ended job, unless it was taken over meanwhile: its new holder ends it (a failure
    or cancellation found after the takeover used to raise Lost out of run_job and end the
    worker); then `then` (also when taken over). Unwritten when the queue fails to write it."""
    _write_end(ctx, Ending(job, then, undo, worked))


def _write_end(ctx: Context, ending: Ending) -> bool:
    """`_end`'s work. A personalisation's SUCCEEDED end that the queue refuses because its cancel
    came after its last update (before, the cancel was dropped and it succeeded) has its publish
    undone and ends CANCELLED: a cancel asked before an operation is done is honoured."""
    job = ending.job
    try:
        written = ctx.queue.finish(job)
    except Lost as error:
        log.warning("%s; %s", error, error.then)
        ctx.metrics.on_end(job, LOST)
        written = True
    except Exception as error:
        raise Unwritten(ending, error) from error
    else:
        if not written:
            assert ending.undo is not None, f"job {job.id}: a cancelled end nothing can undo"
            ending.undo()
            what = "cancelled as its generator was published (taken back: the avatar keeps the one it had)"
            why = cancelled_why(what, _cancel_reason(ctx, job))
            return _write_end(ctx, Ending(job.ended(CANCELLED, code=CODE_CANCELLED, error=why)))
        log.info("job %s %s after %.1f s %s", job.id, job.state, job.elapsed(), job.error)
        ctx.metrics.on_end(job, worked=ending.worked)
    if ending.then is not None:
        try:
            ending.then()
        except Exception as error:  # (an event lost: replicas reload at their next open)
            log.warning("job %s: after its end: %s: %s", job.id, type(error).__name__, error)
    return True


def _progress(ctx: Context, job: Job, beat: Heartbeat) -> Any:
    steps = ctx.metrics.finetune_steps
    quiet_until = 0.0  # (monotonic) the queue was unreachable: no progress write before then

    def on_step(step: int, losses: dict[str, float]) -> None:
        nonlocal quiet_until
        if beat.lost.is_set():
            raise beat.why
        job.step, job.losses = step, {k: float(v) for k, v in losses.items()}
        ctx.liveness.doing(f"job {job.id}: fine-tuning, step {step} of {job.steps} done")
        steps.inc()
        if step == 1:
            job.first_step_time = time.time()
        if ctx.stopping.is_set() and step < job.steps:
            raise Stopped(f"stopped at step {step} of {job.steps}")
        if time.monotonic() < quiet_until:
            return
        try:
            if not ctx.queue.update(job):
                raise Cancelled(f"cancelled at step {step} of {job.steps}")
        except Unreachable as error:
            # Fine-tuning goes on: the heartbeat holds the job for the claim timeout, and the next
            # write that lands says whether it was cancelled or taken over meanwhile. (A Redis
            # restart or a pause of a few seconds failed every running job, INTERNAL.)
            if not quiet_until:
                log.warning("job %s: progress not written from step %d: %s", job.id, step, error)
            ctx.metrics.on_queue(False)
            quiet_until = time.monotonic() + UNREACHABLE_QUIET_S
        else:
            if quiet_until:
                log.info("job %s: progress written again at step %d", job.id, step)
            quiet_until = 0.0

    return on_step


def _stage(ctx: Context, job: Job) -> bool:
    """Write a job's new stage: False when it was cancelled meanwhile. A queue unreachable for the
    moment is logged and left to the next write (which checks the cancel, or to _succeed's)."""
    try:
        return ctx.queue.update(job)
    except Unreachable as error:
        log.warning("job %s: its stage %r not written: %s", job.id, job.stage, error)
        ctx.metrics.on_queue(False)
        return True


def _personalise(ctx: Context, job: Job, beat: Heartbeat) -> None:
    if job.model_id != ctx.model_id:
        message = (
            f"the avatar was made with model {job.model_id}, this worker fine-tunes {ctx.model_id}: "
            "run the worker with the served model's checkpoint, or create the avatar again"
        )
        _end(ctx, job.ended(FAILED, code=CODE_FAILED_PRECONDITION, error=message))
        return
    name = contract.personalised_name(job.avatar_id)
    if job.published_before < 0:
        job.published_before = (repository.versions(ctx.repository / name) or [0])[-1]
    else:  # taken over: what a lost attempt published goes, or a cancel or failure now would keep it
        _take_back_lost(ctx, job, name)
    ctx.estimates.stamp(job)
    if not _stage(ctx, job):  # (a job cancelled while its worker was dead ends here)
        raise Cancelled("cancelled before fine-tuning" + (" resumed" if job.attempt > 1 else ""))
    _check_record(ctx, job, "before fine-tuning")
    if ctx.stopping.is_set():
        raise Stopped("stopped before fine-tuning")
    frames, points = unpack_input(ctx.queue.load_input(job))
    ckpt = personalise(
        ctx.meta,
        frames,
        points,
        avatar=job.avatar_id,
        steps=job.steps,
        device=ctx.device,
        on_step=_progress(ctx, job, beat),
    )
    ckpt["consent_record"] = job.consent_id
    ckpt["avatar_created"] = job.avatar_created
    ckpt["job"] = job.id  # (a later attempt that finds it published ends with it: _adopt)
    if ctx.avatars is not None:
        ckpt["avatar_store"] = ctx.avatars.store_id()
    job.stage, job.export_time = "exporting", time.time()
    ctx.liveness.doing(f"job {job.id}: exporting its generator")
    if not _stage(ctx, job):
        raise Cancelled("cancelled before export")
    _check_record(ctx, job, "before export")
    published = models.publish(
        ckpt,
        ctx.repository,
        profile=ctx.profile,
        tritons=ctx.tritons,
        max_loaded=ctx.max_loaded,
        loading=lambda: _loading(ctx, job),
    )
    ctx.estimates.learn(job, time.time())
    _succeed(ctx, job, beat, published)


def _loading(ctx: Context, job: Job) -> None:
    """The generator is written; it loads into the Tritons now (2.7 of the 3.5 s after fine-tuning
    on 2 cores): the job says so. A cancel meanwhile, or a failed write, is left to _succeed's
    update, which ends the job either way."""
    job.stage, job.load_time = "loading", time.time()
    ctx.liveness.doing(f"job {job.id}: loading its generator into Triton")
    try:
        ctx.queue.update(job)
    except Lost:
        raise  # (the new holder ends the job with this version: _adopt)
    except Exception as error:
        log.warning("job %s: cannot write its progress (%s: %s)", job.id, type(error).__name__, error)


def _succeed(ctx: Context, job: Job, beat: Heartbeat, published: models.Published) -> None:
    """End a personalisation whose generator is published and loaded: SUCCEEDED, unless it was
    cancelled or taken over meanwhile (its version is then taken back). A progress write the
    queue fails here (its storage full, Redis away) does not fail the job: it used to end FAILED
    with its generator served. Its end is written (or kept, Unwritten) as SUCCEEDED, and the
    queue refuses that end if a cancel came meanwhile (`_write_end` then takes the version back)."""
    name = published.name
    job.stage, job.model_name, job.model_version = "loading", name, published.version

    def undo() -> None:
        models.take_back(published, ctx.repository, tritons=ctx.tritons)
        _taken_back(ctx, job, name)

    try:
        cancelled = not ctx.queue.update(job)
    except Lost:
        raise  # (the new holder ends the job with this version: _adopt)
    except Exception as error:
        log.warning(
            "job %s: cannot write its progress (%s: %s); ending it", job.id, type(error).__name__, error
        )
        cancelled = False
    if cancelled or beat.lost.is_set():  # too late: take this job's version back
        undo()
        raise Cancelled("cancelled before the model was published")
    # (the event even if taken over: it is loaded)
    _end(
        ctx,
        job.ended(SUCCEEDED),
        then=functools.partial(ctx.queue.publish, job.avatar_id, events.PERSONALISED),
        undo=undo,
    )


def _adopt(ctx: Context, job: Job, beat: Heartbeat) -> bool:
    """End a personalisation with the generator an earlier attempt of it published, if one did
    (the latest version, above job.published_before, stamped with the job's id): that attempt's
    worker was stopped or lost before the job's end was written (its storage full, then SIGTERM;
    or killed). Before, the next attempt took that generator back and fine-tuned again from step
    0 (minutes), publishing another. The generator is loaded again in every Triton (its worker
    may have died before); a cancel asked meanwhile, or a record gone, takes it back as
    `_personalise` would. Whether it found one."""
    if job.published_before < 0:
        return False
    name = contract.personalised_name(job.avatar_id)
    found = models.stamps(ctx.repository, name, contract.Meta.JOB)
    version = max(found, default=0)  # (the latest: the one the avatar is served)
    if version <= job.published_before or found[version] != job.id:
        return False
    log.info(
        "job %s: %s version %d was published by its attempt before; ending with it", job.id, name, version
    )
    written = ctx.repository / name / str(version)
    job.stage, job.load_time = "loading", time.time()  # (no fine-tuning, no export in this attempt)
    try:
        if not ctx.queue.update(job):
            raise Cancelled("cancelled while its worker was lost")
        _check_record(ctx, job, "as its generator was found published")
    except Cancelled:
        _take_back_lost(ctx, job, name)
        raise
    models.load_everywhere(
        ctx.repository, name, tritons=ctx.tritons, written=written, max_loaded=ctx.max_loaded
    )
    job.step = job.steps
    _succeed(ctx, job, beat, models.Published(name, version, written))
    return True


def _give_up(ctx: Context, job: Job) -> None:
    """End a personalisation that took its worker down MAX_ATTEMPTS times, taking back what those
    attempts published. Before, every restarted worker took it again and died on it in turn, and
    the jobs queued behind it never ran."""
    _take_back_lost(ctx, job, contract.personalised_name(job.avatar_id))
    if not ctx.queue.update(job):
        raise Cancelled("cancelled while its worker was lost")
    message = (
        f"the worker stopped {MAX_ATTEMPTS} times while running this personalisation (the worker's "
        "log says why); it is not tried again"
    )
    log.error("job %s: %s", job.id, message)
    _end(ctx, job.ended(FAILED, code=CODE_INTERNAL, error=message), worked=False)


def _take_back_lost(ctx: Context, job: Job, name: str) -> None:
    """Take back the versions of `name` that attempts lost before they ended published (those
    above job.published_before), and tell the replicas."""
    if job.published_before >= 0 and models.take_back_since(
        name, job.published_before, ctx.repository, tritons=ctx.tritons
    ):
        _taken_back(ctx, job, name)


def _taken_back(ctx: Context, job: Job, name: str) -> None:
    """Tell the replicas that a version of the avatar's generator was taken back: one that opened
    it for a stream meanwhile (the embedded backend opens the latest file it finds) drops it."""
    left = repository.versions(ctx.repository / name)
    ctx.queue.publish(job.avatar_id, events.PERSONALISED if left else events.UNPERSONALISED)


def _check_record(ctx: Context, job: Job, when: str) -> None:
    """Stop a personalisation whose avatar record was deleted or replaced (its delete cancels it
    too; this catches a cancel that was lost, and never publishes a generator of a record that
    is gone, for a sweep to find)."""
    if ctx.avatars is None or not job.avatar_created:
        return
    now = ctx.avatars.created(job.avatar_id)
    if now is None or contract.avatar_stamp(now) != contract.avatar_stamp(job.avatar_created):
        raise Cancelled(f"cancelled {when}", reason="the avatar was deleted or replaced")


def _remove(ctx: Context, job: Job, later: Waiting) -> None:
    """Withdraw what a deleted or replaced record leaves of its generator. The service queued this
    before the record went: a record still there is not the job's to touch yet (`later` checks
    it again, for up to ctx.remove_wait_s)."""
    name = contract.personalised_name(job.avatar_id)
    if ctx.avatars is None:  # blind: this job's record's versions, and unstamped ones (older)
        old = contract.avatar_stamp(job.avatar_created) if job.avatar_created else None
        found = models.stamps(ctx.repository, name)
        _withdraw(ctx, job, [v for v, stamp in found.items() if old is None or stamp in (None, old)])
    elif job.avatar_created and not _record_gone(ctx, job):
        later.add(job)
    else:
        _withdraw(ctx, job, _not_of_current_record(ctx, job.avatar_id, name, keep_unstamped=False))


def _withdraw(ctx: Context, job: Job, doomed: list[int]) -> None:
    name = contract.personalised_name(job.avatar_id)
    had = models.withdraw_versions(job.avatar_id, doomed, ctx.repository, tritons=ctx.tritons)
    # (the event even if taken over: replicas must drop what they hold of it now)
    _end(ctx, job.ended(SUCCEEDED), then=functools.partial(_taken_back, ctx, job, name) if had else None)


def _record_gone(ctx: Context, job: Job) -> bool:
    """Whether the record job.avatar_created names is gone from the store (deleted or replaced)."""
    assert ctx.avatars is not None
    now = ctx.avatars.created(job.avatar_id)
    return now is None or contract.avatar_stamp(now) != contract.avatar_stamp(job.avatar_created)


def _not_of_current_record(ctx: Context, avatar_id: str, name: str, *, keep_unstamped: bool) -> list[int]:
    """The versions of `name` not made for the avatar's record now: every version when it has
    none. The versions are listed before the store is read, so a version published meanwhile is
    not judged, and any listed was published after its record was written (a personalisation
    starts from a stored record): one made for the record now is always seen as such."""
    assert ctx.avatars is not None
    found = models.stamps(ctx.repository, name)
    if not found:
        return []
    # A version made for another store's record (a model repository that two deployments share:
    # `make demo` and `make up`) is never this worker's to take; one that names no store (made
    # before stores were stamped) a REMOVE job of its avatar may take, the sweep does not.
    mine, stores = ctx.avatars.store_id(), models.stamps(ctx.repository, name, contract.Meta.AVATAR_STORE)
    allowed = {mine} if keep_unstamped else {mine, None}
    found = {v: stamp for v, stamp in found.items() if stores.get(v) in allowed}
    now = ctx.avatars.created(avatar_id)
    if now is None:
        return [v for v, stamp in found.items() if stamp is not None or not keep_unstamped]
    current = contract.avatar_stamp(now)
    return [v for v, stamp in found.items() if stamp != current and (stamp is not None or not keep_unstamped)]


def sweep(ctx: Context) -> list[str]:
    """Withdraw the versions of every generator_<id> stamped for an avatar record the store no
    longer holds (deleted, or replaced by another record); the generators it took from. Unstamped
    versions are left: made by hand (`talkinghead export` of a checkpoint fine-tuned elsewhere,
    which may come before its avatar) or before stamps, their record cannot be told. An empty
    store sweeps nothing: more likely the wrong store (another Redis database, a directory not
    the service's) than a deployment whose every avatar is gone. First, generators withdrawn from
    the repository that a Triton which missed the withdrawal still holds are unloaded there
    (models.unload_orphans)."""
    models.unload_orphans(ctx.repository, tritons=ctx.tritons)
    if ctx.avatars is None:
        return []
    names = [n for n in repository.models(ctx.repository) if n.startswith(contract.PERSONALISED_PREFIX)]
    if not names:
        return []
    if ctx.avatars.count() == 0:
        log.warning(
            "sweep: the avatar store (%s) holds no avatar and the repository %d personalised "
            "generator(s): not sweeping (is it the service's store?)",
            ctx.avatars.describe(),
            len(names),
        )
        return []
    swept = []
    for name in names:
        avatar_id = name[len(contract.PERSONALISED_PREFIX) :]
        try:
            validate_stored_id(avatar_id)
        except ValueError:
            continue
        doomed = _not_of_current_record(ctx, avatar_id, name, keep_unstamped=True)
        if not doomed:
            continue
        log.warning(
            "sweep: %s version(s) %s were made for an avatar record the store no longer holds "
            "(deleted or replaced, its withdrawal lost): withdrawing them",
            name,
            ", ".join(map(str, doomed)),
        )
        if models.withdraw_versions(avatar_id, doomed, ctx.repository, tritons=ctx.tritons):
            left = repository.versions(ctx.repository / name)
            ctx.queue.publish(avatar_id, events.PERSONALISED if left else events.UNPERSONALISED)
            swept.append(name)
    return swept


def model_id_of(meta: dict[str, Any]) -> str:
    return checkpoint.fingerprint(meta)


QUEUE_RETRY_S = (1.0, 30.0)  # the wait after the queue failed: first, and most (doubling between)
END_RETRY_S = (1.0, 30.0)  # the wait before writing an end the queue failed to write again


def serve_jobs(ctx: Context, name: str, running: Callable[[], bool]) -> None:
    """Claim and run jobs while `running()`. A queue that cannot be reached (Redis restarting, a
    network blip) is retried with a growing wait, not the end of the worker: before, the first
    failed claim ended the process (a Kubernetes pod in CrashLoopBackOff, its restarts spaced out
    to minutes). A job in hand when it failed stays held in the queue until its claim times out,
    then runs again (its publish writes nothing twice)."""
    wait = QUEUE_RETRY_S[0]
    next_sweep = time.monotonic()
    waiting = Waiting(ctx)
    try:
        _serve(ctx, name, running, waiting, wait, next_sweep)
    finally:
        waiting.close()


def _serve(
    ctx: Context, name: str, running: Callable[[], bool], waiting: Waiting, wait: float, next_sweep: float
) -> None:
    while running():
        if ctx.sweep_interval_s > 0 and time.monotonic() >= next_sweep:
            next_sweep = time.monotonic() + ctx.sweep_interval_s
            ctx.liveness.doing("sweeping generators whose avatar record is gone")
            try:
                sweep(ctx)
            except Exception as error:  # the store or the repository away: the next sweep
                log.warning("sweep of generators left behind failed: %s: %s", type(error).__name__, error)
        try:
            if waiting:
                ctx.liveness.doing("checking the REMOVE jobs waiting for their record to go")
            waiting.check()  # REMOVE jobs whose record was still there: gone by now?
            ctx.liveness.doing("waiting for a job", within_s=IDLE_S)
            job = ctx.queue.claim(name, wait_s=2 * REMOVE_POLL_S if waiting else 1.0)
            ctx.metrics.on_claim()
            if job is not None:
                run_job(ctx, job, waiting)
            wait = QUEUE_RETRY_S[0]
        except Exception as error:
            log.warning("the job queue failed: %s: %s; retrying in %.0f s", type(error).__name__, error, wait)
            ctx.metrics.on_queue(False)
            deadline = time.monotonic() + wait
            while running() and time.monotonic() < deadline:
                time.sleep(0.1)
            wait = min(2 * wait, QUEUE_RETRY_S[1])
