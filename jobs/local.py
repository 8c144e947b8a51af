"""The job queue in a directory, for one machine: the service and its embedded worker process.

<root>/<id>.json        the job record (written whole: temp file + rename)
<root>/<id>.input.npz   the photos it trains on (removed when it ends)
<root>/<id>.lock        flock'ed by the worker that holds the job; the OS releases it when
                        that worker dies, so another (or the restarted) worker takes it over
<root>/<id>.cancel      present once cancellation was asked for a running job
<root>/.queue.lock      serialises submit and cancel (the busy / full checks)
<root>/events.jsonl     avatar events (jobs.events), appended; the service follows the file.
                        Past MAX_EVENTS_BYTES the publisher replaces it with a new, empty file
                        (atomically, under <root>/.events.lock, which every publisher holds to
                        append): the service reads the old one to its end, then the new one
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from facekit.partial import remove_stale
from jobs.events import Event
from jobs.queue import AvatarBusy, Lost, QueueFull, StoreFull
from jobs.record import (
    CANCELLED,
    CODE_CANCELLED,
    FAILED,
    ID,
    PERSONALISE,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    Job,
    cancelled_why,
)

EVENTS_FILE = "events.jsonl"
EVENTS_LOCK = ".events.lock"
MAX_EVENTS_BYTES = 1 << 20  # ~10,000 events; then the file starts anew
POLL_S = 0.2
RETENTION_S = 7 * 24 * 3600  # ended jobs are forgotten after a week
STALE_TMP_S = 3600.0  # a temporary file this old is a killed writer's (a write takes milliseconds)


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _start_anew(path: Path) -> None:
    """Replace `path` with a new, empty file (readable as the old one was)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        try:
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def try_lock(path: Path) -> IO[bytes] | None:
    """An exclusive flock on `path` (created), or None when another process holds it."""
    handle = path.open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


class LocalQueue:
    def __init__(self, *, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._held: dict[str, IO[bytes]] = {}

    def _path(self, job_id: str, suffix: str) -> Path:
        if not ID.fullmatch(job_id):
            raise KeyError(job_id)
        return self.root / f"{job_id}{suffix}"

    @contextlib.contextmanager
    def _queue_lock(self) -> Iterator[None]:
        with (self.root / ".queue.lock").open("ab") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _write(self, job: Job) -> None:
        try:
            write_atomic(self._path(job.id, ".json"), job.to_json().encode())
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(error.errno, f"the job directory {self.root} is full") from error
            raise

    def _jobs(self) -> list[Job]:
        found = []
        for path in self.root.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, TypeError):
                found.append(Job.from_json(path.read_bytes()))
        return sorted(found, key=lambda j: j.create_time)

    # -- the service's side ----------------------------------------------------------------------
    def submit(self, job: Job, data: bytes, *, max_active: int) -> Job:
        with self._queue_lock():
            self._prune()
            if job.kind == PERSONALISE:
                live = self.live()
                busy = [j for j in live if j.avatar_id == job.avatar_id]
                if busy:
                    raise AvatarBusy(busy[0].id)
                if len(live) >= max_active:
                    raise QueueFull(f"{len(live)} personalisations are queued or running")
            data_path = self._path(job.id, ".input.npz")
            try:
                write_atomic(data_path, data)
                self._write(job)
            except BaseException:  # (a full disk: the photos' crops were left with no job, for good)
                data_path.unlink(missing_ok=True)
                raise
        return job

    def fail_queued(self, *, kind: str, code: int, error: str) -> list[Job]:
        """End every queued job of `kind` FAILED with `error`: the server that owns this queue
        knows no worker will run them (its embedded worker gave up, or cannot start). Before, a
        client waiting on one waited for ever. A job a worker holds, or left running, is not
        touched (a worker that died may have published its generator: the next takes it back)."""
        ended = []
        with self._queue_lock():
            for job in self._jobs():
                if job.kind != kind or job.state != QUEUED:
                    continue
                lock = try_lock(self._path(job.id, ".lock"))
                if lock is None:
                    continue
                with lock:
                    current = self.get(job.id)
                    if current is None or current.state != QUEUED:
                        continue
                    self._write(current.ended(FAILED, code=code, error=error))
                    self._path(job.id, ".input.npz").unlink(missing_ok=True)
                self._path(job.id, ".lock").unlink(missing_ok=True)
                ended.append(current)
        return ended

    def get(self, job_id: str) -> Job | None:
        try:
            job = Job.from_json(self._path(job_id, ".json").read_bytes())
        except (KeyError, FileNotFoundError):
            return None
        with contextlib.suppress(FileNotFoundError):  # (no cancel asked)
            job.cancel_reason = self._path(job_id, ".cancel").read_text(errors="replace")
            job.cancel_requested = True
        return job

    def live(self) -> list[Job]:
        return [j for j in self._jobs() if j.kind == PERSONALISE and not j.done]

    def list(self, *, avatar_id: str = "") -> list[Job]:
        jobs = [j for j in self._jobs() if j.kind == PERSONALISE and avatar_id in ("", j.avatar_id)]
        return jobs[::-1]

    def active(self, avatar_id: str) -> str | None:
        live = [j for j in self.live() if j.avatar_id == avatar_id]
        return live[0].id if live else None

    def cancel(self, job_id: str, reason: str = "") -> Job | None:
        with self._queue_lock():
            job = self.get(job_id)
            if job is None or job.done:
                return job
            lock = try_lock(self._path(job_id, ".lock"))
            if lock is None or job.state == RUNNING:
                # A worker runs it: it stops at its next step. Or one ran it and died, perhaps
                # after publishing a generator: the next worker takes that back, then ends it.
                if lock is not None:
                    lock.close()
                self._path(job_id, ".cancel").write_text(reason)
                job.cancel_requested, job.cancel_reason = True, reason
                return job
            with lock:
                job = self.get(job_id)
                if job is not None and not job.done:
                    why = cancelled_why("cancelled while queued", reason)
                    self._write(job.ended(CANCELLED, code=CODE_CANCELLED, error=why))
                    self._path(job_id, ".input.npz").unlink(missing_ok=True)
            self._path(job_id, ".lock").unlink(missing_ok=True)
            return job

    def _prune(self) -> None:
        old = time.time() - RETENTION_S
        for job in self._jobs():
            if job.done and job.end_time < old:
                self._path(job.id, ".json").unlink(missing_ok=True)
        remove_stale(self.root, ".tmp-*", STALE_TMP_S)  # what a writer killed mid-write left

    # -- a worker's side -------------------------------------------------------------------------
    def claim(self, worker: str, *, wait_s: float) -> Job | None:
        deadline = time.monotonic() + wait_s
        while True:
            for job in self._jobs():
                if job.state in (QUEUED, RUNNING) and job.id not in self._held:
                    taken = self._take(job.id, worker)
                    if taken is not None:
                        return taken
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S)

    def _take(self, job_id: str, worker: str) -> Job | None:
        lock = try_lock(self._path(job_id, ".lock"))
        if lock is None:
            return None
        job = self.get(job_id)
        if job is None or job.done:
            lock.close()
            return None
        job.taken(worker, job.attempt + 1)
        try:
            self._write(job)
        except BaseException:  # (its directory full): not taken - before, it stayed held, never run
            lock.close()
            raise
        self._held[job_id] = lock
        return job

    def _check_held(self, job: Job) -> None:
        if job.id not in self._held:
            raise Lost(f"job {job.id} is not held by this worker")

    def load_input(self, job: Job) -> bytes:
        return self._path(job.id, ".input.npz").read_bytes()

    def heartbeat(self, job: Job) -> None:
        self._check_held(job)  # the flock holds it for as long as this process lives

    def update(self, job: Job) -> bool:
        self._check_held(job)
        self._write(job)
        return not self._path(job.id, ".cancel").exists()

    def finish(self, job: Job) -> bool:
        self._check_held(job)
        assert job.state in TERMINAL, job.state
        with self._queue_lock():  # (a cancel asked now is seen here, or comes after the end)
            if job.kind == PERSONALISE and job.state == SUCCEEDED and self._path(job.id, ".cancel").exists():
                return False
            self._write(job)  # failing (the directory full), the job stays held: finish it again
        for suffix in (".input.npz", ".cancel", ".lock"):
            self._path(job.id, suffix).unlink(missing_ok=True)
        self._held.pop(job.id).close()
        return True

    def release(self, job: Job) -> None:
        self._check_held(job)
        job.state, job.stage, job.attempt = QUEUED, "queued", max(0, job.attempt - 1)
        job.start_time, job.first_step_time, job.export_time, job.step, job.losses = 0.0, 0.0, 0.0, 0, {}
        self._write(job)
        self._held.pop(job.id).close()

    def publish(self, avatar_id: str, event: str) -> None:
        line = Event(avatar_id=avatar_id, event=event, sent=time.time()).to_json() + "\n"
        path = self.root / EVENTS_FILE
        # Held to append and to rotate: no publisher appends to a file after it was replaced (the
        # follower, having read the old file to its end, would never see that line).
        with (self.root / EVENTS_LOCK).open("ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())  # one small O_APPEND write: lines never interleave
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size > MAX_EVENTS_BYTES:
                _start_anew(path)

    def close(self) -> None:
        for handle in self._held.values():
            handle.close()
        self._held.clear()
