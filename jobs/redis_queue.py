"""The job queue on Redis Streams with a consumer group: several service replicas, several workers.

Each job is a hash (jobs.keys.job): `record` (the Job's JSON, written by Python only), `state`
(mirrored from the record for the scripts), `owner` (`<worker>:<attempt>:<incarnation>` of the holder),
`attempts`, `cancel` and `input`. Submitting adds one stream entry; a worker reads new entries
with XREADGROUP and, before that, takes over entries whose holder has been silent for
`claim_timeout_s` (XAUTOCLAIM): a worker that dies mid-job loses nothing. A live worker keeps its
entry fresh (`heartbeat`: XCLAIM to itself, allowed only while it is the owner), so a job is never
taken from a live worker and never runs twice at once. Every write of a worker is fenced by its
owner token in a Lua script: a worker that lost its job learns it (Lost) and writes nothing.

A job's stream entry (its id kept in the hash, `entry`) is deleted (XDEL) when the job ends: by
its holder's FINISH (after the XACK), by a CANCEL of a job no worker holds, and by a worker that
reads the entry of a job already ended or expired. Before, nothing trimmed the stream: every job
ever submitted stayed in it (XLEN grew by one per job, forever). An entry a worker holds (an owner
in the hash, the entry pending and unacked) is never deleted from under it: a cancel only asks.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
from typing import Any

import redis

from jobs import keys
from jobs.events import Event
from jobs.queue import AvatarBusy, Gone, Lost, QueueFull, Unreachable
from jobs.record import CANCELLED, CODE_CANCELLED, QUEUED, TERMINAL, Job, cancelled_why

RETENTION_S = 7 * 24 * 3600
_ENDED = "if s == 'SUCCEEDED' or s == 'FAILED' or s == 'CANCELLED' then "

SUBMIT = """
if ARGV[5] == 'personalise' then
  local other = redis.call('GET', KEYS[4])
  if other then return {'busy', other} end
  local n = redis.call('SCARD', KEYS[3])
  if n >= tonumber(ARGV[4]) then return {'full', tostring(n)} end
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  redis.call('SADD', KEYS[3], ARGV[1])
  redis.call('SET', KEYS[4], ARGV[1])
end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'state', 'QUEUED', 'input', ARGV[6], 'attempts', 0)
local entry = redis.call('XADD', KEYS[5], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[1], 'entry', entry)
return {'ok', ''}
"""
CANCEL = (
    """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return 'missing' end
"""
    + _ENDED
    + """return 'ended' end
if redis.call('HEXISTS', KEYS[1], 'owner') == 1 then
  redis.call('HSET', KEYS[1], 'cancel', ARGV[4])
  return 'requested'
end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'state', 'CANCELLED')
redis.call('HDEL', KEYS[1], 'input')
local entry = redis.call('HGET', KEYS[1], 'entry')
if entry then redis.call('XDEL', KEYS[4], entry) end
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 'cancelled'
"""
)
# One write takes a job: the attempt counted, the owner token and the RUNNING record (before, the
# record was a second write: a claim whose second write failed spent an attempt without running).
# ARGV: the owner token `<worker>:<attempt>:<incarnation>`, that attempt, the RUNNING record, and
# '1' for an entry this consumer holds without having taken its job (a claim cut short).
TAKE = (
    """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return 'gone' end
"""
    + _ENDED
    + """return 'gone' end
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner ~= ARGV[1] then
  if ARGV[4] == '1' and owner then return 'held' end
  local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
  if attempts + 1 ~= tonumber(ARGV[2]) then return 'moved' end
end
redis.call('HSET', KEYS[1], 'attempts', ARGV[2], 'owner', ARGV[1], 'record', ARGV[3], 'state', 'RUNNING')
return 'ok'
"""
)
UPDATE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'state', ARGV[3])
if redis.call('HEXISTS', KEYS[1], 'cancel') == 1 then return 0 end
return 1
"""
HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[4], 'JUSTID')
return 1
"""
FINISH = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if ARGV[3] == 'SUCCEEDED' and ARGV[8] == 'personalise' and redis.call('HEXISTS', KEYS[1], 'cancel') == 1 then
  return 2
end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'state', ARGV[3])
redis.call('HDEL', KEYS[1], 'input', 'cancel')
redis.call('SREM', KEYS[2], ARGV[4])
if redis.call('GET', KEYS[3]) == ARGV[4] then redis.call('DEL', KEYS[3]) end
redis.call('XACK', KEYS[4], ARGV[5], ARGV[6])
redis.call('XDEL', KEYS[4], ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 1
"""
# A job handed back (a worker stopping): QUEUED again, its attempt not counted, and its stream entry
# (pending with this worker) made idle for longer than any claim timeout, so the next claim's
# XAUTOCLAIM takes it at once - before the entries queued after it - not after claim_timeout_s.
RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'state', 'QUEUED')
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HDEL', KEYS[1], 'owner')
redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[4], 0, ARGV[5], 'IDLE', ARGV[6], 'JUSTID')
return 1
"""
RELEASE_IDLE_MS = 30 * 24 * 3600 * 1000


# A read unanswered this long fails (UNAVAILABLE for the service's call): on a pooled connection
# whose Redis froze or whose peer vanished without a FIN (half-open) that is the whole wait; it
# was 10 s. Every command is short; a blocking read (claim's XREADGROUP BLOCK) blocks at most
# BLOCK_MAX_S at a time, so that it returns before the socket times out.
SOCKET_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 2.0
BLOCK_MAX_S = SOCKET_TIMEOUT_S - 1.0
HEALTH_CHECK_S = 5.0  # a connection idle this long is PINGed before it is used again


def _job_id(fields: dict[bytes, bytes] | None) -> str:
    return (fields or {}).get(b"job", b"").decode()


def keepalive_options() -> dict[int, int]:
    """TCP keepalive probing after 5 s idle, every 2 s, 3 probes (where the platform has them): an
    idle connection to a peer gone without a word is closed after ~11 s, so the next call
    reconnects (or fails at once) instead of waiting on it."""
    wanted = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3}
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


def connect(url: str) -> redis.Redis:
    """A client for `url` (redis://host:port/db) with timeouts that fail fast when Redis is away."""
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        socket_keepalive_options=keepalive_options(),
        health_check_interval=HEALTH_CHECK_S,
    )


class RedisQueue:
    def __init__(self, *, client: redis.Redis, claim_timeout_s: float = 30.0) -> None:
        self.r: Any = client  # redis-py's annotations type every reply as bytes | str | list ...
        self.claim_timeout_s = claim_timeout_s
        self._held: dict[str, tuple[str, bytes]] = {}  # job id -> (owner token, stream entry id)
        # in each owner token: a take this queue made and never heard back from is its own, not a
        # restarted process's of the same worker name (whose take counts as an attempt)
        self.incarnation = secrets.token_hex(4)
        self._scripts = {
            name: client.register_script(text)
            for name, text in (
                ("submit", SUBMIT),
                ("cancel", CANCEL),
                ("take", TAKE),
                ("update", UPDATE),
                ("heartbeat", HEARTBEAT),
                ("finish", FINISH),
                ("release", RELEASE),
            )
        }
        # Redis not up yet (pods start in any order): the first claim makes the group.
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            self._create_group()

    def _create_group(self) -> None:
        try:
            self.r.xgroup_create(keys.JOB_STREAM, keys.WORKERS_GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def _run(self, name: str, keys_: list[str], args: list[Any]) -> Any:
        return self._scripts[name](keys=keys_, args=args)

    # -- the service's side ----------------------------------------------------------------------
    def submit(self, job: Job, data: bytes, *, max_active: int) -> Job:
        k = [keys.job(job.id), keys.JOBS, keys.ACTIVE, keys.avatar_job(job.avatar_id), keys.JOB_STREAM]
        args = [job.id, job.to_json(), job.create_time, max_active, job.kind, data]
        verdict, detail = self._run("submit", k, args)
        if verdict == b"busy":
            raise AvatarBusy(detail.decode())
        if verdict == b"full":
            raise QueueFull(f"{detail.decode()} personalisations are queued or running")
        return job

    def get(self, job_id: str) -> Job | None:
        record, cancel = self.r.hmget(keys.job(job_id), ["record", "cancel"])
        if record is None:
            return None
        job = Job.from_json(record)
        if cancel is not None:  # ('1': a cancel asked by a server from before reasons were kept)
            reason = cancel.decode(errors="replace")
            job.cancel_requested, job.cancel_reason = True, "" if reason == "1" else reason
        return job

    def _records(self, ids: list[str]) -> tuple[list[Job], list[str]]:
        """The jobs of `ids` that still exist, and the ids of those that expired."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(keys.job(job_id), "record")
        jobs, gone = [], []
        for job_id, record in zip(ids, pipe.execute(), strict=True):
            if record is None:
                gone.append(job_id)
            else:
                jobs.append(Job.from_json(record))
        return jobs, gone

    def live(self) -> list[Job]:
        jobs, _ = self._records(sorted(i.decode() for i in self.r.smembers(keys.ACTIVE)))
        return [j for j in jobs if not j.done]

    def list(self, *, avatar_id: str = "") -> list[Job]:
        jobs, gone = self._records([i.decode() for i in self.r.zrevrange(keys.JOBS, 0, -1)])
        if gone:
            self.r.zrem(keys.JOBS, *gone)
        return [j for j in jobs if avatar_id in ("", j.avatar_id)]

    def active(self, avatar_id: str) -> str | None:
        value = self.r.get(keys.avatar_job(avatar_id))
        return value.decode() if value is not None else None

    def cancel(self, job_id: str, reason: str = "") -> Job | None:
        job = self.get(job_id)
        if job is None or job.done:
            return job
        ended = Job.from_json(job.to_json()).ended(
            CANCELLED, code=CODE_CANCELLED, error=cancelled_why("cancelled while queued", reason)
        )
        k = [keys.job(job_id), keys.ACTIVE, keys.avatar_job(job.avatar_id), keys.JOB_STREAM]
        self._run("cancel", k, [job_id, ended.to_json(), RETENTION_S, reason])
        return self.get(job_id)

    # -- a worker's side -------------------------------------------------------------------------
    def claim(self, worker: str, *, wait_s: float) -> Job | None:
        try:
            return self._claim(worker, wait_s=wait_s)
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            self._create_group()  # a Redis that came back without its data: the group is made again
            return self._claim(worker, wait_s=wait_s)

    def _claim(self, worker: str, *, wait_s: float) -> Job | None:
        self.r.set(keys.worker(worker), str(time.time()), ex=max(keys.WORKER_TTL_S, int(3 * wait_s)))
        for entry_id, job_id in self._strays(worker):
            job = self._take(worker, entry_id, job_id, stray=True)
            if job is not None:
                return job
        stolen = self.r.xautoclaim(
            keys.JOB_STREAM,
            keys.WORKERS_GROUP,
            worker,
            min_idle_time=int(self.claim_timeout_s * 1000),
            start_id="0-0",
            count=1,
        )
        entries = list(stolen[1])
        deadline = time.monotonic() + wait_s
        while not entries:  # blocking reads shorter than the socket timeout, until wait_s is over
            block = min(BLOCK_MAX_S, deadline - time.monotonic())
            read = self.r.xreadgroup(
                keys.WORKERS_GROUP, worker, {keys.JOB_STREAM: ">"}, count=1, block=max(1, int(block * 1000))
            )
            entries = list(read[0][1]) if read else []
            if time.monotonic() >= deadline:
                break
        for entry_id, fields in entries:
            job = self._take(worker, entry_id, _job_id(fields))
            if job is not None:
                return job
        return None

    def _strays(self, worker: str) -> tuple[tuple[bytes, str], ...]:
        """Entries pending with this consumer whose jobs this queue does not hold: delivered by a
        claim cut short (its reply lost, or the take after it refused). Before, they waited out the
        claim timeout (30 s), and a take that had run spent an attempt of the job."""
        held = {entry for _, entry in self._held.values()}
        pending = self.r.xpending_range(
            keys.JOB_STREAM, keys.WORKERS_GROUP, min="-", max="+", count=16, consumername=worker
        )
        ids = [p["message_id"] for p in pending if p["message_id"] not in held]
        if not ids:
            return ()
        pipe = self.r.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(keys.JOB_STREAM, min=entry_id, max=entry_id)
        found = pipe.execute()
        return tuple(
            (entry_id, _job_id(rows[0][1]) if rows else "") for entry_id, rows in zip(ids, found, strict=True)
        )

    def _take(self, worker: str, entry_id: bytes, job_id: str, *, stray: bool = False) -> Job | None:
        """The job of a stream entry this consumer holds, taken: counted as an attempt, owned and
        RUNNING in one script - or None: ended or expired (the entry goes), held by another
        worker (a stray entry: XAUTOCLAIM's idle rule decides), taken meanwhile."""
        for _ in range(3):
            record, attempts, owner = (
                self.r.hmget(keys.job(job_id), ["record", "attempts", "owner"])
                if job_id
                else (None, None, None)
            )
            if record is None:
                verdict = b"gone"
            else:
                attempt = int(attempts or 0) + 1
                if owner is not None and owner.decode() == self._token(worker, attempt - 1):
                    attempt -= 1  # this queue's own take, its reply lost: the same attempt
                job = Job.from_json(record).taken(worker, attempt)
                token = self._token(worker, attempt)
                verdict = self._run(
                    "take", [keys.job(job_id)], [token, attempt, job.to_json(), "1" if stray else "0"]
                )
            if verdict == b"ok":
                self._held[job.id] = (token, entry_id)
                return job
            if verdict == b"gone":  # ended (cancelled while queued, or finished before its holder
                # died) or expired: no one else holds it, its entry goes
                with self.r.pipeline(transaction=True) as pipe:
                    pipe.xack(keys.JOB_STREAM, keys.WORKERS_GROUP, entry_id)
                    pipe.xdel(keys.JOB_STREAM, entry_id)
                    pipe.execute()
                return None
            if verdict == b"held":
                return None
        return None  # moved under three reads in a row: taken by another worker

    def _token(self, worker: str, attempt: int) -> str:
        return f"{worker}:{attempt}:{self.incarnation}"

    def _owner(self, job: Job) -> str:
        if job.id not in self._held:
            raise Lost(f"job {job.id} is not held by this worker")
        return self._held[job.id][0]

    def load_input(self, job: Job) -> bytes:
        data = self.r.hget(keys.job(job.id), "input")
        if data is None:
            raise Lost(f"job {job.id} has no input (ended meanwhile?)")
        return bytes(data)

    def heartbeat(self, job: Job) -> None:
        owner = self._owner(job)
        entry = self._held[job.id][1]
        args = [owner, keys.WORKERS_GROUP, job.worker, entry]
        if not self._run("heartbeat", [keys.job(job.id), keys.JOB_STREAM], args):
            raise self._lost(job)

    def update(self, job: Job) -> bool:
        try:
            verdict = self._run("update", [keys.job(job.id)], [self._owner(job), job.to_json(), job.state])
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise Unreachable(f"Redis: {error}") from error
        if verdict == -1:
            raise self._lost(job)
        return bool(verdict == 1)

    def finish(self, job: Job) -> bool:
        assert job.state in TERMINAL, job.state
        owner, entry = self._owner(job), self._held[job.id][1]
        k = [keys.job(job.id), keys.ACTIVE, keys.avatar_job(job.avatar_id), keys.JOB_STREAM]
        args = [owner, job.to_json(), job.state, job.id, keys.WORKERS_GROUP, entry, RETENTION_S, job.kind]
        verdict = self._run("finish", k, args)  # raising (Redis away, at its memory limit): still held
        if verdict == 2:  # a SUCCEEDED end, cancelled meanwhile: nothing written, still held
            return False
        if not verdict:
            raise self._lost(job)
        self._held.pop(job.id, None)
        return True

    def release(self, job: Job) -> None:
        owner, entry = self._owner(job), self._held[job.id][1]
        job.state, job.stage, job.attempt = QUEUED, "queued", max(0, job.attempt - 1)
        job.start_time, job.first_step_time, job.export_time, job.step, job.losses = 0.0, 0.0, 0.0, 0, {}
        args = [owner, job.to_json(), keys.WORKERS_GROUP, job.worker, entry, RELEASE_IDLE_MS]
        ok = self._run("release", [keys.job(job.id), keys.JOB_STREAM], args)
        if not ok:
            raise self._lost(job)
        self._held.pop(job.id, None)

    def _lost(self, job: Job) -> Lost:
        """Lost (another worker owns the job now), or Gone when the job is not there at all (it
        said "taken over" after Redis had lost its data); no longer held either way."""
        self._held.pop(job.id, None)
        try:
            gone = not self.r.exists(keys.job(job.id))
        except redis.RedisError:  # (which of the two cannot be told; the owner check said not ours)
            gone = False
        if gone:
            return Gone(f"job {job.id} is gone from the queue (Redis lost its data, or its record expired)")
        return Lost(f"job {job.id} was taken over by another worker")

    def publish(self, avatar_id: str, event: str) -> None:
        self.r.publish(keys.EVENTS, Event(avatar_id=avatar_id, event=event, sent=time.time()).to_json())

    def close(self) -> None:
        self.r.close()
