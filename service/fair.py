"""Fair scheduling of blocking work (face detection): callers take turns, not first come first served.

    detect = FairExecutor(pool=ThreadPoolExecutor(1), max_queued=32)
    faces = await detect.run(caller, find_faces, image)

Each caller (a string: today the tenant and peer App.actor_of names, with authentication the
tenant) has its own FIFO queue; callers with queued jobs are served round-robin, one job each in
turn, on at most `workers` threads of `pool` (dlib's models are shared: the service runs one). So
a job waits for at most one job of every other busy caller plus the one running, however long the
other callers' backlogs are; the service queues one job per photo or driving frame, never a whole
request. A caller may have at most `max_queued` jobs waiting: the next is refused with
RESOURCE_EXHAUSTED. A job whose caller stops waiting (the call ended, was cancelled) is dropped
if it has not started.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from service.errors import exhausted, unavailable

T = TypeVar("T")


@dataclass(eq=False)
class _Job:
    call: Callable[[], Any]
    future: asyncio.Future[Any]


class FairExecutor:
    def __init__(self, *, pool: concurrent.futures.Executor, max_queued: int, workers: int = 1) -> None:
        if max_queued < 1 or workers < 1:
            raise ValueError(f"max_queued and workers must be >= 1, got {max_queued}, {workers}")
        self.pool = pool
        self.max_queued = max_queued
        self.workers = workers
        self._queues: dict[str, collections.deque[_Job]] = {}
        self._turns: collections.deque[str] = collections.deque()  # callers with queued jobs, in turn
        self._running = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def queued(self, caller: str) -> int:
        """Jobs of `caller` waiting (not running)."""
        return len(self._queues.get(caller, ()))

    async def run(self, caller: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a pool thread when `caller`'s turn comes; its result or its exception."""
        queue = self._queues.get(caller)
        if queue is not None and len(queue) >= self.max_queued:
            raise exhausted(
                f"{len(queue)} requests of this caller are already waiting for face detection (the "
                f"limit is {self.max_queued}); retry when they are done"
            )
        self._loop = asyncio.get_running_loop()
        job = _Job(call=lambda: fn(*args), future=self._loop.create_future())
        if queue is None:
            queue = self._queues[caller] = collections.deque()
            self._turns.append(caller)
        queue.append(job)
        self._dispatch()
        try:
            return await job.future  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            self._drop(caller, job)
            raise
        finally:
            # the future holds the job's exception, whose traceback will hold this frame: let go
            # of it here, or the two keep each other (and the job's locals) until a collection
            del job, queue

    def _drop(self, caller: str, job: _Job) -> None:
        queue = self._queues.get(caller)
        if queue is not None and job in queue:
            queue.remove(job)
            if not queue:
                del self._queues[caller]
                self._turns.remove(caller)

    def _dispatch(self) -> None:
        while self._running < self.workers and self._turns:
            caller = self._turns.popleft()
            queue = self._queues[caller]
            job = queue.popleft()
            if queue:
                self._turns.append(caller)  # its next job after one of every other caller's
            else:
                del self._queues[caller]
            if job.future.done():  # cancelled while it waited
                continue
            try:
                done = self.pool.submit(job.call)
            except RuntimeError:  # the pool is shut down: the server is stopping
                job.future.set_exception(unavailable("the server is shutting down"))
                continue
            self._running += 1
            done.add_done_callback(functools.partial(self._finished_threadsafe, job))

    def _finished_threadsafe(self, job: _Job, finished: concurrent.futures.Future[Any]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            self._loop.call_soon_threadsafe(self._finished, job, finished)

    def _finished(self, job: _Job, finished: concurrent.futures.Future[Any]) -> None:
        self._running -= 1
        if not job.future.done():
            if finished.cancelled():
                job.future.cancel()
            elif (error := finished.exception()) is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(finished.result())
        self._dispatch()

    def close(self) -> None:
        """Cancel every job that has not started."""
        for queue in self._queues.values():
            for job in queue:
                job.future.cancel()
        self._queues.clear()
        self._turns.clear()
