"""Personalisation as long-running operations: start, get, list, watch, cancel (the servicer is thin).

The queue (jobs.queue.JobQueue: a local directory, or Redis) holds the truth; every replica reads
it, so an operation started on one replica can be watched and cancelled on any. Starting one copies
the avatar's face crops and landmarks into the job (what fine-tuning trains on), so the worker
needs nothing else. Operation names are `operations/<job id>`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import math
import re
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from facekit.contract import ModelInfo, avatar_stamp
from facekit.ids import shown, split_id
from jobs.queue import AvatarBusy, JobQueue, QueueFull, pack_input
from jobs.record import ID, PERSONALISE, QUEUED, REMOVE, RUNNING, Job, new_id, steps_for
from service.errors import ServiceError, exhausted, exists, invalid, not_found, precondition, unavailable
from service.store import AvatarRecord
from service.wire import full, redis_error

log = logging.getLogger("talkinghead.service.personalisation")

PREFIX = "operations/"
_NAME = re.compile(rf"operations/({ID.pattern})")  # fullmatch: "$" would let a final "\n" through
WATCH_POLL_S = 0.25
DEFAULT_PAGE, MAX_PAGE = 100, 1000


def job_id_of(name: str) -> str:
    found = _NAME.fullmatch(name)
    if not found:
        raise invalid(f"malformed operation name {shown(name)}; expected operations/<16 hex digits>")
    return found.group(1)


class Personaliser:
    """The operations over one queue. `disabled` (a reason) refuses new ones: no worker can run them."""

    def __init__(self, *, queue: JobQueue, max_queue: int, on_done: Callable[[Job], None]) -> None:
        self.queue = queue
        self.max_queue = max_queue
        self.disabled = ""
        self._on_done = on_done  # a succeeded job seen for the first time (the backend looks again)
        self._seen_done: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="jobs")

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        except (ServiceError, AvatarBusy, QueueFull):
            raise
        except Exception as error:
            # unreachable, or refusing writes (a Redis at its maxmemory): the details are logged
            if not isinstance(error, OSError) and not redis_error(error):
                raise
            log.warning(
                "job queue call %s failed: %s: %s", getattr(fn, "__name__", fn), type(error).__name__, error
            )
            what = "the job queue's storage is full" if full(error) else "the job queue is unavailable"
            raise unavailable(f"{what}; retry later") from error

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.queue.close()

    async def start(self, record: AvatarRecord, info: ModelInfo, *, steps: int, preset: str) -> Job:
        try:  # a request out of range is INVALID_ARGUMENT wherever it is sent
            total = steps_for(steps=steps, preset=preset)
        except ValueError as error:
            raise invalid(str(error)) from error
        if self.disabled:
            raise precondition(f"personalisation is not available on this server: {self.disabled}")
        public = split_id(record.avatar_id)[1]
        if record.model_id != info.model_id:
            raise precondition(
                f"avatar {public!r} was made with model {record.model_id}, the server runs "
                f"{info.model_id}; create the avatar again"
            )
        if len(record.crops) == 0:
            raise precondition(f"avatar {public!r} keeps no photos to fine-tune on; create it again")
        job = Job(
            id=new_id(),
            kind=PERSONALISE,
            avatar_id=record.avatar_id,
            model_id=record.model_id,
            consent_id=str(record.consent.get("record_id", "")),
            avatar_created=record.create_time,
            steps=total,
        )
        data = pack_input(record.crops, record.crop_points)
        try:
            return await self._call(self.queue.submit, job, data, max_active=self.max_queue)  # type: ignore[no-any-return]
        except AvatarBusy as busy:
            raise exists(
                f"avatar {public!r} is already being personalised by {PREFIX}{busy.job_id}; "
                "watch or cancel that operation"
            ) from None
        except QueueFull as full:  # (how busy the server is is not the caller's business: logged)
            log.warning("personalisation of %s refused: the queue is full (%s)", record.avatar_id, full)
            raise exhausted("the personalisation queue is full; retry later") from None

    async def census(self) -> tuple[int, int, float | None]:
        """(queued, running, the oldest queued one's create_time or None) of the personalisations
        in the queue, every replica's; raises what the queue raises (not logged here: the caller
        polls, and says once that it cannot read it)."""
        loop = asyncio.get_running_loop()
        jobs: list[Job] = await loop.run_in_executor(self._pool, self.queue.live)
        queued = [job.create_time for job in jobs if job.state == QUEUED]
        return len(queued), sum(1 for job in jobs if job.state == RUNNING), min(queued, default=None)

    async def active(self, tenant: str) -> int:
        """The tenant's personalisations queued or running."""
        jobs: list[Job] = await self._call(self.queue.live)
        return sum(1 for j in jobs if split_id(j.avatar_id)[0] == tenant)

    async def get(self, name: str, tenant: str) -> Job:
        """The tenant's operation; NOT_FOUND for another tenant's, as for one that does not exist."""
        job: Job | None = await self._call(self.queue.get, job_id_of(name))
        if job is None or job.kind != PERSONALISE or split_id(job.avatar_id)[0] != tenant:
            raise not_found(f"no operation named {shown(name)}")
        if job.done and job.id not in self._seen_done:
            self._seen_done.add(job.id)
            self._on_done(job)
        return job

    async def list(
        self, *, tenant: str, avatar_id: str, page_size: int, page_token: str
    ) -> tuple[list[Job], str]:
        if page_size < 0:
            raise invalid(f"page_size must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        jobs: list[Job] = await self._call(self.queue.list, avatar_id=avatar_id)
        jobs = [j for j in jobs if split_id(j.avatar_id)[0] == tenant]
        before = decode_cursor(page_token)
        if before is not None:
            jobs = [j for j in jobs if (j.create_time, j.id) < before]
        page = jobs[:size]
        token = encode_cursor(page[-1]) if len(jobs) > size else ""
        return page, token

    async def watch(self, name: str, tenant: str) -> AsyncIterator[Job]:
        """The job now, then each change of it, until it is done."""
        last = ""
        while True:
            job = await self.get(name, tenant)
            # (a cancel asked is not shown by the operation until it ends it: no message for it)
            text = dataclasses.replace(job, cancel_requested=False, cancel_reason="").to_json()
            if text != last:
                last = text
                yield job
            if job.done:
                return
            await asyncio.sleep(WATCH_POLL_S)

    async def cancel(self, name: str, tenant: str) -> Job:
        await self.get(name, tenant)  # NOT_FOUND unless it is the tenant's
        job: Job | None = await self._call(self.queue.cancel, job_id_of(name))
        if job is None or job.kind != PERSONALISE:
            raise not_found(f"no operation named {shown(name)}")
        return job

    async def withdraw(self, job: Job, reason: str) -> None:
        """Cancel a job just started whose avatar changed under it (its input goes with it)."""
        await self._call(self.queue.cancel, job.id, reason)

    async def forget_avatar(self, avatar_id: str, created: float) -> None:
        """The avatar's record made at `created` is about to be deleted or replaced: queue the
        REMOVE job that withdraws its generator once the record is gone (the worker waits for
        that, and takes nothing of a record still there). Called before the record goes, so that
        no crash leaves a generator with no job to withdraw it; raises (UNAVAILABLE) when the
        queue cannot take the job: the record must then stay. Its personalisation is cancelled
        once the change happened (App._forget_personalisation): cancelled here, a change then
        refused (a full disk) had ended it "the avatar was replaced" all the same."""
        if not self.disabled:
            remove = Job(id=new_id(), kind=REMOVE, avatar_id=avatar_id, avatar_created=created)
            await self._call(self.queue.submit, remove, b"", max_active=self.max_queue)

    async def cancel_active(self, avatar_id: str, *, reason: str, created: float | None = None) -> None:
        """Cancel the avatar's queued or running personalisation, saying why (`reason`); with
        `created`, only one of the record made then (not one a new record of the id started
        meanwhile)."""
        active = await self._call(self.queue.active, avatar_id)
        if active is None:
            return
        if created is not None:
            job: Job | None = await self._call(self.queue.get, active)
            if job is None or avatar_stamp(job.avatar_created) != avatar_stamp(created):
                return
        await self._call(self.queue.cancel, active, reason)


def encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"before:{job.create_time!r}:{job.id}".encode()).decode()


def decode_cursor(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        kind, when, job_id = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        before = float(when)
        if kind != "before" or not math.isfinite(before) or not ID.fullmatch(job_id):
            raise ValueError(kind)
        return before, job_id
    except (binascii.Error, UnicodeError, ValueError) as error:
        raise invalid(f"malformed page_token {shown(token)}") from error
