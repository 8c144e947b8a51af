"""The job queue both sides use: the service submits, reads and cancels; workers claim and end.

Two implementations: jobs.local.LocalQueue (a directory, one machine: the embedded default) and
jobs.redis_queue.RedisQueue (Redis Streams with a consumer group: several replicas and workers).
Their guarantees are the same: one queued or running personalisation per avatar (AvatarBusy),
at most `max_active` jobs queued or running (QueueFull), a job held by one worker at a time
(a worker that dies releases it: a file lock is dropped by the OS, a stream entry is claimed by
another worker after `claim_timeout_s`), and every write of a worker fenced by its attempt, so a
worker that lost its job cannot overwrite the new holder's progress (Lost). Methods are blocking.
"""

from __future__ import annotations

import io
from typing import Protocol

import numpy as np

from jobs.record import Job


class AvatarBusy(Exception):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"operation {job_id} is already personalising this avatar")
        self.job_id = job_id


class QueueFull(Exception):
    pass


class Lost(Exception):
    """This worker no longer holds the job (it was presumed dead and another worker took it)."""

    then = "leaving it to its new holder"


class Gone(Lost):
    """The job is no longer in the queue at all (Redis lost its data, or the record expired): no
    worker holds it, and nothing more is written for it."""

    then = "nothing more is written for it"


class Unreachable(Exception):
    """The queue could not be reached for a moment (Redis away: a restart, a failover, a pause past
    its socket timeout); the call may be made again. A worker's progress writes ride it out."""


class StoreFull(OSError):
    """The queue's own storage is full (a job directory's filesystem: ENOSPC, EDQUOT) - not the
    model repository, which a job's failure must not blame."""


def pack_input(frames: np.ndarray, points: np.ndarray) -> bytes:
    """The photos fine-tuning trains on: frames (K, S, S, 3) uint8, points (K, 68, 2) float32."""
    assert frames.ndim == 4 and frames.dtype == np.uint8 and points.shape == (len(frames), 68, 2)
    buffer = io.BytesIO()
    np.savez(buffer, frames=frames, points=np.asarray(points, np.float32))
    return buffer.getvalue()


def unpack_input(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return archive["frames"], archive["points"]


class JobQueue(Protocol):
    # -- the service's side ----------------------------------------------------------------------
    def submit(self, job: Job, data: bytes, *, max_active: int) -> Job:
        """Queue `job` with its packed input; AvatarBusy or QueueFull (nothing written) otherwise.
        REMOVE jobs are neither limited nor counted."""
        ...

    def get(self, job_id: str) -> Job | None: ...

    def live(self) -> list[Job]:
        """PERSONALISE jobs queued or running (not the week of ended ones `list` returns)."""
        ...

    def list(self, *, avatar_id: str = "") -> list[Job]:
        """PERSONALISE jobs, newest first."""
        ...

    def cancel(self, job_id: str, reason: str = "") -> Job | None:
        """Cancel a queued job now, ask a running one to stop; the job as it is then (None: unknown).
        `reason` ("the avatar was deleted") ends the operation's error, whoever writes its end:
        "cancelled while queued: ..." here, "cancelled at step 3 of 40: ..." by its worker."""
        ...

    def active(self, avatar_id: str) -> str | None:
        """The id of the avatar's queued or running personalisation, if any."""
        ...

    # -- a worker's side -------------------------------------------------------------------------
    def claim(self, worker: str, *, wait_s: float) -> Job | None:
        """The next job this worker now holds (RUNNING, attempt + 1), or None after `wait_s`."""
        ...

    def load_input(self, job: Job) -> bytes: ...

    def heartbeat(self, job: Job) -> None:
        """Keep holding a job (every claim_timeout_s / 3 at least); Lost if it was taken over."""
        ...

    def update(self, job: Job) -> bool:
        """Write a held job's progress; False when it was cancelled meanwhile; Lost if not held;
        Unreachable when the queue could not be reached (nothing known: write it again later)."""
        ...

    def finish(self, job: Job) -> bool:
        """Write the ended job, release it and its avatar; Lost if not held. A SUCCEEDED job whose
        cancellation was asked meanwhile is not written: False (the job still held, for its worker
        to take its generator back and end it CANCELLED). Any other failure (the store full or away)
        raises and leaves the job held as it was, for the worker to finish again."""
        ...

    def release(self, job: Job) -> None:
        """Hand a held job back, QUEUED, as if this attempt had not begun (its attempt not counted),
        for the next claim of any worker to take at once (a worker stopping gracefully); Lost if
        not held."""
        ...

    def publish(self, avatar_id: str, event: str) -> None:
        """Tell every replica that something about an avatar changed (jobs.events)."""
        ...

    def close(self) -> None: ...
