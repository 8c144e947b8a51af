"""Avatars and the personalisation queue on a real redis-server: atomic writes, the queue's
guarantees (one job per avatar, a bounded queue, a dead worker's job taken over, fenced writes,
cancellation), and two service replicas sharing avatars with their caches invalidated."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis as redis_py

from client.library import landmark_requests
from facekit.sequence import LandmarkSequence
from jobs import keys
from jobs.events import CHANGED as CHANGED_EVENT
from jobs.events import Event
from jobs.queue import AvatarBusy, Gone, Lost, QueueFull, pack_input, unpack_input
from jobs.record import CANCELLED, PERSONALISE, QUEUED, REMOVE, RUNNING, SUCCEEDED, Job, new_id
from jobs.redis_queue import RedisQueue, connect
from service import events as events_module
from service.audit import RedisAuditLog
from service.auth import FileRing, issue
from service.events import PING_S, RETRY_S, RedisEvents
from service.redis_store import RedisAvatarStore
from service.store import AvatarRecord
from tests.redis_fixtures import *  # noqa: F403
from tests.redis_fixtures import RedisServer, free_port
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import (
    CONSENT,
    PORTRAIT,
    ServerThread,
    fake_generator,
    test_settings,
    worker_context,
)

DATA = pack_input(np.zeros((1, 128, 128, 3), np.uint8), np.zeros((1, 68, 2), np.float32))


def record(avatar_id: str, k: int = 2) -> AvatarRecord:
    rng = np.random.default_rng(len(avatar_id))
    return AvatarRecord(
        avatar_id=avatar_id,
        adain=rng.normal(size=2240).astype(np.float32),
        embedding=rng.normal(size=512).astype(np.float32),
        points=rng.uniform(0, 128, (68, 2)).astype(np.float32),
        model_id="m1",
        image_size=128,
        create_time=time.time(),
        display_name="name",
        images=[{"index": 0, "faces_found": 1}],
        preview_png=b"\x89PNG...",
        crops=rng.integers(0, 255, (k, 128, 128, 3), dtype=np.uint8),
        crop_points=rng.uniform(0, 128, (k, 68, 2)).astype(np.float32),
        portrait_jpeg=b"\xff\xd8jpeg",
        portrait_box=(10.5, 20.5, 167),
    )


def test_avatar_store_keeps_every_field_and_writes_whole(redis_url: str) -> None:
    store = RedisAvatarStore(client=connect(redis_url))
    original = record("ada")
    assert store.put(original, replace=False)
    assert not store.put(record("ada", k=1), replace=False), "an existing id is not overwritten"
    got = store.get("ada")
    assert got is not None
    for name in ("adain", "embedding", "points", "crops", "crop_points"):
        assert np.array_equal(getattr(got, name), getattr(original, name)), name
        assert getattr(got, name).dtype == getattr(original, name).dtype, name
    assert got.meta() == original.meta() and got.preview_png == original.preview_png
    assert got.portrait_jpeg == original.portrait_jpeg
    assert store.put(record("ada", k=1), replace=True) and len(store.get("ada").crops) == 1  # type: ignore[union-attr]
    store.put(record("bob"), replace=False)
    assert store.ids() == ["ada", "bob"]
    assert store.delete("ada") and not store.delete("ada") and store.get("ada") is None
    assert store.ids() == ["bob"]


@pytest.mark.parametrize("kind", ["redis", "local"])
def test_a_listing_reads_a_records_metadata_alone(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """ListAvatars read every record whole (crops, portrait) for its metadata: 32 records of 32
    photos were 51 MB read for an 8 KB reply (helper-74). `listing` reads the metadata alone and
    says what `get` says of it; a record that is not there is None."""
    from service.store import LocalAvatarStore

    store: Any = (
        RedisAvatarStore(client=connect(request.getfixturevalue("redis_url")))
        if kind == "redis"
        else LocalAvatarStore(root=tmp_path / "avatars")
    )
    original = dataclasses.replace(
        record("ada", k=4), consent={"record_id": "cr-1", "basis": "public_domain"}
    )
    assert store.put(original, replace=True)
    listed = store.listing("ada")
    assert listed is not None
    for name in ("avatar_id", "model_id", "image_size", "create_time", "display_name", "images", "consent"):
        assert getattr(listed, name) == getattr(original, name), name
    assert listed.crops.size == 0 and listed.adain.size == 0 and listed.portrait_jpeg == b""
    assert store.listing("nobody") is None


def test_queue_one_job_per_avatar_and_a_bounded_queue(redis_url: str) -> None:
    queue = RedisQueue(client=connect(redis_url))
    first = queue.submit(Job(id=new_id(), kind=PERSONALISE, avatar_id="a", steps=3), DATA, max_active=2)
    with pytest.raises(AvatarBusy) as busy:
        queue.submit(Job(id=new_id(), kind=PERSONALISE, avatar_id="a", steps=3), DATA, max_active=2)
    assert busy.value.job_id == first.id
    queue.submit(Job(id=new_id(), kind=PERSONALISE, avatar_id="b", steps=3), DATA, max_active=2)
    with pytest.raises(QueueFull):
        queue.submit(Job(id=new_id(), kind=PERSONALISE, avatar_id="c", steps=3), DATA, max_active=2)
    queue.submit(Job(id=new_id(), kind=REMOVE, avatar_id="c"), b"", max_active=2)  # never limited
    assert [j.avatar_id for j in queue.list()] == ["b", "a"] and queue.active("a") == first.id
    cancelled = queue.cancel(first.id)
    assert cancelled is not None and cancelled.state == CANCELLED and cancelled.error_code == 1
    assert queue.active("a") is None, "a cancelled job frees its avatar"
    assert [j.avatar_id for j in queue.live()] == ["b"], "live: queued or running personalisations"
    queue.submit(Job(id=new_id(), kind=PERSONALISE, avatar_id="a", steps=3), DATA, max_active=2)


def test_a_dead_workers_job_is_taken_over_and_the_old_holder_is_fenced(redis_url: str) -> None:
    service = RedisQueue(client=connect(redis_url))
    job = service.submit(Job(id=new_id(), kind=PERSONALISE, avatar_id="a", steps=3), DATA, max_active=4)
    one = RedisQueue(client=connect(redis_url), claim_timeout_s=0.5)
    two = RedisQueue(client=connect(redis_url), claim_timeout_s=0.5)
    held = one.claim("one", wait_s=1)
    assert held is not None and held.id == job.id and held.attempt == 1 and held.state == RUNNING
    assert two.claim("two", wait_s=0.2) is None, "nothing else is queued"
    for _ in range(4):  # a live worker's heartbeats keep its job
        time.sleep(0.3)
        one.heartbeat(held)
        assert two.claim("two", wait_s=0.05) is None
    time.sleep(0.8)  # `one` falls silent (as if killed) past the claim timeout
    taken = two.claim("two", wait_s=1)
    assert taken is not None and taken.id == job.id and taken.attempt == 2 and taken.worker == "two"
    frames, points = unpack_input(two.load_input(taken))
    assert frames.shape == (1, 128, 128, 3) and points.shape == (1, 68, 2)
    with pytest.raises(Lost, match="was taken over by another worker"):
        one.update(held)  # the old holder wakes up: it may write nothing
    taken.step = 3
    assert two.update(taken)
    two.finish(taken.ended(SUCCEEDED))
    done = service.get(job.id)
    assert done is not None and done.state == SUCCEEDED and done.attempt == 2 and service.active("a") is None
    assert connect(redis_url).xpending(keys.JOB_STREAM, keys.WORKERS_GROUP)["pending"] == 0
    assert connect(redis_url).xlen(keys.JOB_STREAM) == 0, "the ended job's entry is gone"


class Faulty(redis_py.Redis):
    """A client of the real Redis whose `fail`-th command from now raises ConnectionError: before
    sending it (`ran=False`: Redis refused it or the connection dropped first) or after it ran with
    its reply lost (`ran=True`)."""

    fail = 0
    ran = False
    sent: list[str]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        self.fail -= 1
        if self.fail == 0 and not self.ran:
            raise redis_py.ConnectionError("connection dropped (injected)")
        reply = super().execute_command(*args, **options)
        if self.fail == 0:
            raise redis_py.ConnectionError("reply lost (injected)")
        return reply


def test_a_job_redis_lost_is_called_gone_not_taken_over(redis_url: str) -> None:
    """After Redis lost its data (a restart without persistence), its worker said the job "was
    taken over by another worker; leaving it to its new holder": there is none (helper-76)."""
    service = RedisQueue(client=connect(redis_url))
    service.submit(Job(id=new_id(), kind=PERSONALISE, avatar_id="a", steps=3), DATA, max_active=4)
    worker = RedisQueue(client=connect(redis_url))
    held = worker.claim("one", wait_s=1)
    assert held is not None
    connect(redis_url).flushall()
    with pytest.raises(Gone, match="is gone from the queue") as gone:
        worker.heartbeat(held)
    assert gone.value.then == "nothing more is written for it"
    with pytest.raises(Lost, match="is not held by this worker"):  # (and no longer held)
        worker.update(held)


def test_a_claim_cut_short_spends_no_attempt_and_the_job_runs_at_once(redis_url: str) -> None:
    """Taking a job was two writes (count the attempt and own it; then the RUNNING record): a claim
    whose second write failed spent one of the job's 3 attempts without running it, and the entry
    stayed pending with the worker until the 30-s claim timeout. Now, whichever of a claim's Redis
    commands fails, sent or with its reply lost, the next claim runs the job at once as attempt 1."""
    service = RedisQueue(client=connect(redis_url))
    client = Faulty(port=int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    client.sent = []
    worker = RedisQueue(client=client)  # the default 30-s claim timeout
    service.submit(Job(id=new_id(), kind=PERSONALISE, avatar_id="warm", steps=3), DATA, max_active=8)
    warm = worker.claim("w", wait_s=1)  # loads the scripts, counts what a claim sends
    assert warm is not None
    worker.finish(warm.ended(SUCCEEDED))
    client.sent.clear()
    service.submit(Job(id=new_id(), kind=PERSONALISE, avatar_id="count", steps=3), DATA, max_active=8)
    counted = worker.claim("w", wait_s=1)
    assert counted is not None
    commands = list(client.sent)
    worker.finish(counted.ended(SUCCEEDED))
    cases = [(k, ran) for k in range(1, len(commands) + 1) for ran in (False, True)]
    for k, ran in cases:
        job = service.submit(
            Job(id=new_id(), kind=PERSONALISE, avatar_id=f"a{k}-{int(ran)}", steps=3), DATA, max_active=8
        )
        client.fail, client.ran = k, ran
        with pytest.raises(redis_py.ConnectionError):
            worker.claim("w", wait_s=1)
        case = f"command {k} of {commands} failing {'after it ran' if ran else 'unsent'}"
        stored = service.get(job.id)
        assert stored is not None and stored.attempt <= 1, case
        started = time.monotonic()
        taken = worker.claim("w", wait_s=1)
        assert taken is not None and taken.id == job.id, f"{case}: not taken again at once"
        assert time.monotonic() - started < 1.0, case
        assert taken.attempt == 1 and taken.state == RUNNING, f"{case}: attempt {taken.attempt}"
        shown = service.get(job.id)
        assert shown is not None and shown.state == RUNNING and shown.worker == "w" and shown.attempt == 1, (
            case
        )
        assert worker.update(taken), case
        worker.finish(taken.ended(SUCCEEDED))
        done = service.get(job.id)
        assert done is not None and done.state == SUCCEEDED and done.attempt == 1, case
    r = connect(redis_url)
    assert r.xpending(keys.JOB_STREAM, keys.WORKERS_GROUP)["pending"] == 0
    assert r.xlen(keys.JOB_STREAM) == 0


def test_workers_claiming_at_once_take_each_job_once_and_a_dead_ones_job_once(redis_url: str) -> None:
    """Four workers claim from one queue at once (threads, each its own connection): every job is
    taken by exactly one of them as attempt 1; then the job of one that fell silent is taken over
    by exactly one other, as attempt 2, while they all keep claiming."""
    service = RedisQueue(client=connect(redis_url))
    submitted = {
        service.submit(Job(id=new_id(), kind=PERSONALISE, avatar_id=f"p{i}", steps=3), DATA, max_active=32).id
        for i in range(24)
    }
    workers = [RedisQueue(client=connect(redis_url)) for _ in range(4)]  # (30 s claim timeout)
    taken: list[tuple[int, Job]] = []
    lock = threading.Lock()

    def claim_all(n: int, until: float, keep: bool) -> None:
        while time.monotonic() < until:
            job = workers[n].claim(f"w{n}", wait_s=0.1)
            if job is None:
                continue
            with lock:
                taken.append((n, job))
            if not keep:
                workers[n].finish(job.ended(SUCCEEDED))

    threads = [threading.Thread(target=claim_all, args=(n, time.monotonic() + 1.5, True)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j.id for _, j in taken) == sorted(submitted), "each job taken once"
    assert {j.attempt for _, j in taken} == {1}
    silent, (_, lost) = taken[0][0], taken[0]
    for n, job in taken[1:]:
        workers[n].finish(job.ended(SUCCEEDED))
    taken.clear()
    others = [n for n in range(4) if n != silent]
    for n in others:
        workers[n].claim_timeout_s = 0.5
    time.sleep(0.7)  # past that claim timeout: `silent` never heartbeat its job
    threads = [threading.Thread(target=claim_all, args=(n, time.monotonic() + 1.2, False)) for n in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(j.id, j.attempt) for _, j in taken] == [(lost.id, 2)], "taken over once, as attempt 2"
    done = service.get(lost.id)
    assert done is not None and done.state == SUCCEEDED and done.attempt == 2
    with pytest.raises(Lost):
        workers[silent].update(lost)
    r = connect(redis_url)
    assert r.xpending(keys.JOB_STREAM, keys.WORKERS_GROUP)["pending"] == 0 and r.xlen(keys.JOB_STREAM) == 0


def test_the_job_stream_keeps_only_jobs_not_yet_ended(redis_url: str) -> None:
    """Every job used to stay in the stream for good (XADD without trimming, no XDEL): after 14
    finished jobs XLEN was 14 with nothing pending, forever. Now an entry goes when its job ends -
    finished by its holder, cancelled while queued, or read by a worker after it ended - while the
    entry of a job a worker holds stays (pending, unacked) until that worker ends it."""
    r = connect(redis_url)
    service = RedisQueue(client=connect(redis_url))
    worker = RedisQueue(client=connect(redis_url))

    def submit(kind: str, avatar_id: str) -> Job:
        data = DATA if kind == PERSONALISE else b""
        return service.submit(Job(id=new_id(), kind=kind, avatar_id=avatar_id, steps=3), data, max_active=8)

    for i in range(3):  # finished by the worker that held them
        submit(PERSONALISE if i % 2 else REMOVE, f"done{i}")
        held = worker.claim("w", wait_s=1)
        assert held is not None
        worker.finish(held.ended(SUCCEEDED))
    assert r.xlen(keys.JOB_STREAM) == 0
    queued = submit(PERSONALISE, "queued")
    assert r.xlen(keys.JOB_STREAM) == 1
    service.cancel(queued.id)  # no worker held it: cancelled and gone from the stream at once
    assert r.xlen(keys.JOB_STREAM) == 0
    older = submit(PERSONALISE, "older")  # as one submitted before entries were recorded in the hash
    r.hdel(keys.job(older.id), "entry")
    service.cancel(older.id)
    assert r.xlen(keys.JOB_STREAM) == 1
    assert worker.claim("w", wait_s=0.2) is None, "an ended job is not run"
    assert r.xlen(keys.JOB_STREAM) == 0, "the worker that read the ended job's entry deleted it"

    running = submit(PERSONALISE, "running")
    held = worker.claim("w", wait_s=1)
    assert held is not None and held.id == running.id
    asked = service.cancel(running.id)  # held: cancellation is only asked, the entry stays
    assert asked is not None and asked.state == RUNNING and asked.cancel_requested
    assert r.xlen(keys.JOB_STREAM) == 1
    assert r.xpending(keys.JOB_STREAM, keys.WORKERS_GROUP)["pending"] == 1
    worker.heartbeat(held)  # still its entry to keep fresh
    worker.finish(held.ended(CANCELLED, code=1, error="cancelled at step 1"))
    assert r.xlen(keys.JOB_STREAM) == 0
    assert r.xpending(keys.JOB_STREAM, keys.WORKERS_GROUP)["pending"] == 0


def test_the_worker_of_replicas_reads_their_avatars_and_a_remove_job_waits_for_its_record(
    redis_url: str, tmp_path: Path
) -> None:
    """The external worker of replicas on Redis reads the avatars in the same Redis (as the
    replicas' store writes them). A delete queues its REMOVE job before the record goes: the job
    waits for that, then withdraws the generator. The audit log's intents live there too."""
    import threading

    from jobs.avatars import RedisAvatarIndex
    from service.audit import AuditEvent, Intent
    from worker.jobs_run import run_job

    store = RedisAvatarStore(client=connect(redis_url))
    index = RedisAvatarIndex(client=connect(redis_url))
    assert index.count() == 0
    gone = record("gone")
    assert store.put(gone, replace=False)
    assert index.created("gone") == gone.create_time and index.created("other") is None and index.count() == 1
    folder = fake_generator(tmp_path / "repo", "gone", 1, gone.create_time)
    service = RedisQueue(client=connect(redis_url))
    job = Job(id=new_id(), kind=REMOVE, avatar_id="gone", avatar_created=gone.create_time)
    service.submit(job, b"", max_active=4)
    worker = RedisQueue(client=connect(redis_url))
    held = worker.claim("w", wait_s=1)
    assert held is not None and held.id == job.id
    deleting = threading.Timer(0.5, lambda: store.delete("gone"))
    deleting.start()
    t0 = time.monotonic()
    run_job(worker_context(worker, tmp_path / "repo", avatars=index, remove_wait_s=10), held)
    deleting.join()
    assert time.monotonic() - t0 >= 0.4, "the job did not wait for the record to go"
    assert not folder.exists()
    assert service.get(job.id).state == SUCCEEDED  # type: ignore[union-attr]

    audit = RedisAuditLog(client=connect(redis_url))
    intent = Intent(key=new_id(), event=AuditEvent(event="delete", avatar_id="gone", actor="t"), gone=1.5)
    audit.intend(intent)
    assert audit.intents() == [intent]
    audit.settle(intent.key)
    assert audit.intents() == []


def test_a_job_that_fails_after_another_worker_took_it_over_leaves_the_worker_running(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that finds its job failed (or cancelled) after another took it over writes nothing
    and goes on; before, the fenced finish raised Lost out of run_job and ended the worker."""
    from worker.jobs_run import run_job

    service = RedisQueue(client=connect(redis_url))
    job = Job(id=new_id(), kind=PERSONALISE, avatar_id="late", steps=3, model_id="m1")
    service.submit(job, b"not an npz", max_active=4)
    one = RedisQueue(client=connect(redis_url), claim_timeout_s=0.5)
    two = RedisQueue(client=connect(redis_url), claim_timeout_s=0.5)
    held = one.claim("one", wait_s=1)
    assert held is not None
    time.sleep(0.8)  # silent past the claim timeout
    taken = two.claim("two", wait_s=1)
    assert taken is not None and taken.attempt == 2
    with caplog.at_level("WARNING", logger="talkinghead.worker"):
        run_job(worker_context(one, tmp_path), held)  # its input fails to unpack: FAILED, then Lost
    assert "leaving it to its new holder" in caplog.text
    current = service.get(job.id)
    assert current is not None and current.state == RUNNING and current.worker == "two"
    two.finish(taken.ended(SUCCEEDED))


def test_a_job_out_of_gpu_memory_ends_resource_exhausted_saying_so(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fine-tuning that runs out of GPU memory (raised here where the step would raise it: no GPU
    on this machine) ends RESOURCE_EXHAUSTED "ran out of GPU memory ... again later", not INTERNAL
    with the exception's name."""
    import torch

    from jobs.record import FAILED
    from worker import jobs_run

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(jobs_run, "personalise", out_of_memory)
    service = RedisQueue(client=connect(redis_url))
    job = service.submit(
        Job(id=new_id(), kind=PERSONALISE, avatar_id="big", steps=3, model_id="m1"), DATA, max_active=4
    )
    worker = RedisQueue(client=connect(redis_url))
    held = worker.claim("w", wait_s=1)
    assert held is not None and held.id == job.id
    jobs_run.run_job(worker_context(worker, tmp_path), held)
    done = service.get(job.id)
    assert done is not None and done.state == FAILED
    assert (done.error_code, done.error) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        "the worker ran out of GPU memory fine-tuning; personalise again later",
    )


def test_the_worker_waits_out_its_queue_going_away_and_takes_jobs_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stops under a worker: it logs and tries again with a growing wait instead of ending
    (a pod in CrashLoopBackOff before); back - here empty, its consumer group made again - the
    worker takes the next job and ends it."""
    import threading

    from worker import jobs_run

    # its waits a quarter (0.25 s first, not 1 s): tries at 0, 0.25, 0.75, 1.75 s, ...
    monkeypatch.setattr(jobs_run, "QUEUE_RETRY_S", (0.25, 30.0))
    redis = RedisServer(workdir=tmp_path / "redis")
    queue = RedisQueue(client=connect(redis.url), claim_timeout_s=1.0)
    service = RedisQueue(client=connect(redis.url))  # the server's, made once at its start
    stop = threading.Event()
    worker = threading.Thread(
        target=jobs_run.serve_jobs,
        args=(worker_context(queue, tmp_path / "repo"), "w1", lambda: not stop.is_set()),
    )
    try:
        with caplog.at_level("WARNING", logger="talkinghead.worker"):
            worker.start()
            time.sleep(0.5)
            redis.stop()
            time.sleep(1.25)  # three failed tries
            assert worker.is_alive(), "the worker ended with its queue away"
            assert "the job queue failed" in caplog.text
            redis = RedisServer(workdir=tmp_path / "redis", port=redis.port)  # back, empty
            job = service.submit(Job(id=new_id(), kind=REMOVE, avatar_id="gone"), b"", max_active=4)
            deadline = time.monotonic() + 30
            while (done := service.get(job.id)) is None or done.state != SUCCEEDED:
                assert time.monotonic() < deadline, f"the job was not run: {done}"
                time.sleep(0.2)
            assert worker.is_alive()
    finally:
        stop.set()
        worker.join(10)
        redis.stop()


def test_a_stalled_redis_fails_a_call_within_seconds_and_a_long_claim_still_waits(tmp_path: Path) -> None:
    """redis-server frozen (SIGSTOP: as a half-open connection, or a host gone without a FIN): a
    read on the pooled connection fails within ~3 s, so the call gets UNAVAILABLE that soon
    (before: the 10 s socket timeout, measured 10.01 s). A claim that waits longer than the socket
    timeout for a job still waits its whole time without a timeout error (its blocking read is cut
    into reads shorter than the socket timeout)."""
    server = RedisServer(workdir=tmp_path / "redis")
    try:
        client = connect(server.url)
        store, queue = RedisAvatarStore(client=client), RedisQueue(client=client)
        t0 = time.monotonic()
        assert queue.claim("w", wait_s=4.5) is None
        assert 4.4 < time.monotonic() - t0 < 6, "the claim waited its time, no more"
        assert store.get("nobody") is None  # a pooled connection, used and idle
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises((redis_py.TimeoutError, redis_py.ConnectionError)):
                store.get("nobody")
            took = time.monotonic() - t0
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert took < 4.0, f"a call on a frozen Redis failed only after {took:.1f} s"
        assert store.get("nobody") is None, "back: the next call works"
    finally:
        server.stop()


def test_cancelling_a_running_job_stops_it_at_its_next_write(redis_url: str) -> None:
    service = RedisQueue(client=connect(redis_url))
    worker = RedisQueue(client=connect(redis_url))
    queued = service.submit(Job(id=new_id(), kind=PERSONALISE, avatar_id="a", steps=9), DATA, max_active=4)
    assert service.get(queued.id).state == QUEUED  # type: ignore[union-attr]
    held = worker.claim("w", wait_s=1)
    assert held is not None and worker.update(held)
    asked = service.cancel(queued.id)
    assert asked is not None and asked.state == RUNNING and asked.cancel_requested
    assert worker.update(held) is False, "the worker learns it at its next progress write"
    worker.finish(held.ended(CANCELLED, code=1, error="cancelled at step 1"))
    assert service.get(queued.id).state == CANCELLED and service.active("a") is None  # type: ignore[union-attr]


def test_two_replicas_share_avatars_and_drop_stale_cache_within_a_second(
    model_repository: Path, tmp_path: Path, redis_url: str, driver: LandmarkSequence
) -> None:
    replicas = [
        ServerThread(settings=test_settings(model_repository, tmp_path / f"store{i}", redis_url=redis_url))
        for i in (1, 2)
    ]
    try:
        for replica in replicas:
            replica.wait_ready()
        one, two = (r.client() for r in replicas)
        one.create_avatar("shared", [PORTRAIT], display_name="first", consent=CONSENT)
        seq = LandmarkSequence(driver.points[:3], driver.frame_size, driver.fps)
        frames = list(two.animate("shared", landmark_requests(seq), encoding="raw"))
        assert [f.sequence for f in frames] == [0, 1, 2], "created on replica 1, animated on replica 2"
        assert two.get_avatar("shared").display_name == "first"  # now cached on replica 2
        one.create_avatar("shared", [PORTRAIT], display_name="second", replace=True, consent=CONSENT)
        t0 = time.monotonic()
        while two.get_avatar("shared").display_name != "second":
            assert time.monotonic() - t0 < 1.0, "replica 2 still serves the replaced avatar after 1 s"
            time.sleep(0.01)
        one.delete_avatar("shared")
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as gone:
            while time.monotonic() - t0 < 1.0:
                two.get_avatar("shared")
                time.sleep(0.01)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert replicas[1].metric('talkinghead_avatar_event_delay_seconds_count{event="deleted"}') >= 1
        shared_log = [
            e for e in RedisAuditLog(client=connect(redis_url)).read() if e["avatar_id"] == "shared"
        ]
        events = [e["event"] for e in shared_log]
        assert events == ["create", "animate_start", "replace", "delete"], "both replicas append to one log"
        assert shared_log[-1]["detail"]["tombstone"] and shared_log[-1]["consent_id"].startswith("cr-")
    finally:
        for replica in replicas:
            replica.stop()


def test_redis_gone_calls_get_unavailable_without_its_address_and_work_resumes(
    model_repository: Path, tmp_path: Path, driver: LandmarkSequence
) -> None:
    """Redis stops under a running server: calls that need it get UNAVAILABLE (before: INTERNAL)
    with a message that says what is missing, not its address nor the client library's words. A new
    stream of a cached avatar too: with the events interrupted the cache is not trusted (a deletion
    may have been missed). Once Redis is back on the same port the same calls work again."""
    redis = RedisServer(workdir=tmp_path / "redis")
    running = ServerThread(settings=test_settings(model_repository, tmp_path / "store", redis_url=redis.url))
    seq = LandmarkSequence(driver.points[:3], driver.frame_size, driver.fps)
    try:
        running.wait_ready()
        c = running.client()
        c.create_avatar("kept", [PORTRAIT], consent=CONSENT)
        redis.stop()
        calls = {
            "create": lambda: c.create_avatar("new", [PORTRAIT], consent=CONSENT),
            "list": lambda: list(c.list_avatars()),
            "delete": lambda: c.delete_avatar("kept"),
            "personalise": lambda: c.personalise("kept"),
            "animate": lambda: list(c.animate("kept", landmark_requests(seq), encoding="raw")),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as error:
                call()
            code, details = error.value.code(), error.value.details()
            assert code == grpc.StatusCode.UNAVAILABLE, (name, code, details)
            assert details == "the server's storage is unreachable; retry later", (name, details)

        redis = RedisServer(workdir=tmp_path / "redis", port=redis.port)  # back, empty
        c.create_avatar("new", [PORTRAIT], consent=CONSENT)
        assert [a.avatar_id for a in c.list_avatars()] == ["new"]
        assert c.personalise("new").name.startswith("operations/")
        frames = list(c.animate("new", landmark_requests(seq), encoding="raw"))
        assert [f.sequence for f in frames] == [0, 1, 2]
    finally:
        running.stop()
        redis.stop()


def test_no_cached_avatar_is_served_once_redis_was_flushed_or_while_it_is_gone(
    model_repository: Path, tmp_path: Path, driver: LandmarkSequence
) -> None:
    """The cache is trusted only while the events that keep it right are heard. Redis flushed
    under a live subscription (FLUSHALL): the avatar is NOT_FOUND within ~PING_S, the marker key
    read with each ping being gone (before: served from the cache for as long as the replica
    ran). Redis stopped: GetAvatar and a new stream of a cached avatar get UNAVAILABLE (before:
    both served from the cache, the stream's animate_start audit write failing)."""
    redis = RedisServer(workdir=tmp_path / "redis")
    running = ServerThread(settings=test_settings(model_repository, tmp_path / "store", redis_url=redis.url))
    seq = LandmarkSequence(driver.points[:3], driver.frame_size, driver.fps)
    hits = "talkinghead_cache_hits_total"
    try:
        running.wait_ready()
        t0 = time.monotonic()
        while not getattr(running.app, "events_live", lambda: True)():  # (the cache is used from then)
            assert time.monotonic() - t0 < 5, "no subscription to the avatar events"
            time.sleep(0.01)
        c = running.client()
        c.create_avatar("kept", [PORTRAIT], consent=CONSENT)
        time.sleep(0.1)  # (its own `changed` event dropped what the create cached)
        c.get_avatar("kept")
        before = running.metric(hits)
        c.get_avatar("kept")
        assert running.metric(hits) == before + 1, "served from the cache"
        connect(redis.url).flushall()
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as gone:
            while time.monotonic() - t0 < PING_S + 2:
                c.get_avatar("kept")
                time.sleep(0.05)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND, gone.value.details()

        c.create_avatar("kept", [PORTRAIT], consent=CONSENT)
        time.sleep(0.1)
        assert len(list(c.animate("kept", landmark_requests(seq), encoding="raw"))) == 3
        before = running.metric(hits)
        c.get_avatar("kept")
        assert running.metric(hits) == before + 1, "served from the cache"
        redis.stop()
        t0 = time.monotonic()
        while getattr(running.app, "events_live", lambda: False)():
            assert time.monotonic() - t0 < 2, "the lost subscription was not noticed"
            time.sleep(0.01)
        calls = {
            "get": lambda: c.get_avatar("kept"),
            "animate": lambda: list(c.animate("kept", landmark_requests(seq), encoding="raw")),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE, (name, error.value.details())
    finally:
        running.stop()
        redis.stop()


def test_avatar_events_wait_out_a_redis_outage_quietly_and_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While Redis is away a replica's event subscriber retries with growing waits and warns once
    (before: a WARNING every second for the whole outage); it drops the cache as the subscription
    is lost (a change it does not hear of may happen from then on) and once it is back (events
    were missed), not at every try between; it says the outage is over and hears events."""
    # the waits halved (0.5 s first, 2.5 s most, not 1 s and 5 s): the same tries in half the time
    retry = (RETRY_S[0] / 2, RETRY_S[1] / 2)
    monkeypatch.setattr(events_module, "RETRY_S", retry)
    port = free_port()
    heard: list[str] = []
    resets: list[float] = []

    async def scenario() -> None:
        redis = await asyncio.to_thread(RedisServer, workdir=tmp_path / "redis", port=port)
        source = RedisEvents(
            url=redis.url,
            on_event=lambda e: heard.append(e.avatar_id),
            on_reset=lambda: resets.append(time.monotonic()),
        )
        task = asyncio.create_task(source.run())
        try:
            await asyncio.wait_for(source.subscribed.wait(), timeout=5)
            assert len(resets) == 1, "a new subscription drops what was cached before it"
            await asyncio.to_thread(redis.stop)
            await asyncio.sleep(2.0)  # tries at 0, 0.5, 1.5 s (waits 0.5, 1, 2 s)
            assert not source.subscribed.is_set() and len(resets) == 2, "dropped once, as it was lost"
            redis = await asyncio.to_thread(RedisServer, workdir=tmp_path / "redis", port=port)
            await asyncio.wait_for(source.subscribed.wait(), timeout=retry[1] + 2)
            event = Event(avatar_id="a", event=CHANGED_EVENT, sent=time.time())
            await asyncio.to_thread(connect(redis.url).publish, keys.EVENTS, event.to_json())
            for _ in range(50):
                if heard:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.to_thread(redis.stop)

    with caplog.at_level(logging.DEBUG, logger="talkinghead.service.events"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "interrupted" in warnings[0], warnings
    retries = [r for r in caplog.records if r.levelno == logging.DEBUG and "next try" in r.getMessage()]
    assert len(retries) == 2, [r.getMessage() for r in retries]  # 3 failed tries, waits growing
    assert any("resumed after" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert len(resets) == 3, "a resubscription drops the cache once"
    assert heard == ["a"]


def test_a_server_started_before_its_redis_serves_once_redis_is_up(
    model_repository: Path, tmp_path: Path
) -> None:
    """Pods start in any order: a server whose Redis is not up yet starts (before: a traceback and
    exit 1 from making the job queue's consumer group), answers UNAVAILABLE meanwhile, and works
    once Redis answers."""
    port = free_port()
    running = ServerThread(
        settings=test_settings(model_repository, tmp_path / "store", redis_url=f"redis://127.0.0.1:{port}/0")
    )
    redis: RedisServer | None = None
    try:
        running.wait_ready()
        c = running.client()
        with pytest.raises(grpc.RpcError) as error:
            c.create_avatar("early", [PORTRAIT], consent=CONSENT)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value.details()
        redis = RedisServer(workdir=tmp_path / "redis", port=port)
        c.create_avatar("early", [PORTRAIT], consent=CONSENT)
        assert [a.avatar_id for a in c.list_avatars()] == ["early"]
        assert c.personalise("early").name.startswith("operations/")
    finally:
        running.stop()
        if redis is not None:
            redis.stop()


def test_a_queue_that_cannot_be_reached_is_unavailable_without_its_address(tmp_path: Path) -> None:
    """Operations on a Redis queue that is gone: UNAVAILABLE, saying the queue is unavailable, not
    where it was nor what redis-py said (that goes to the log)."""
    import asyncio

    from service.errors import ServiceError
    from service.personalisation import Personaliser

    redis = RedisServer(workdir=tmp_path / "redis")
    queue = RedisQueue(client=connect(redis.url))
    redis.stop()
    personaliser = Personaliser(queue=queue, max_queue=4, on_done=lambda job: None)
    try:
        with pytest.raises(ServiceError) as error:
            asyncio.run(personaliser.get(f"operations/{new_id()}", "tenant"))
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
        assert error.value.message == "the job queue is unavailable; retry later"
    finally:
        personaliser.close()


def test_a_redis_at_its_memory_limit_refuses_new_avatars_and_keeps_the_stored_ones(
    model_repository: Path, tmp_path: Path, driver: LandmarkSequence
) -> None:
    """A Redis at its maxmemory that may evict nothing (as avatars must not be): CreateAvatar gets
    UNAVAILABLE "the server's storage is full" (before: INTERNAL "ResponseError"); the avatars
    stored before stay whole and stream."""
    redis = RedisServer(
        workdir=tmp_path / "redis", args=("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    )
    running = ServerThread(settings=test_settings(model_repository, tmp_path / "store", redis_url=redis.url))
    seq = LandmarkSequence(driver.points[:3], driver.frame_size, driver.fps)
    try:
        running.wait_ready()
        c = running.client()
        made = []
        with pytest.raises(grpc.RpcError) as refused:
            for i in range(100):
                c.create_avatar(f"a{i:02d}", [PORTRAIT], consent=CONSENT)
                made.append(f"a{i:02d}")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert refused.value.details() == "the server's storage is full; retry later"
        assert made and [a.avatar_id for a in c.list_avatars()] == made
        assert len(connect(redis.url).keys(keys.PREFIX + "avatar:*")) == len(made), (
            "the refused one left a record"
        )
        frames = list(c.animate(made[0], landmark_requests(seq), encoding="raw"))
        assert [f.sequence for f in frames] == [0, 1, 2]
    finally:
        running.stop()
        redis.stop()


def test_a_stopped_server_has_ended_every_task_it_started(
    model_repository: Path, tmp_path: Path, redis_url: str
) -> None:
    """Server.stop() told its background tasks to stop (the storage probe, the avatar events, the
    key ring, the health and job watchers, the calibration) and returned before they had: a server
    stopped in a process that goes on (an embedding, the tests) left them pending on a loop that
    was then closed ("Task was destroyed but it is pending!"). Now it returns once each has ended."""
    ring = FileRing(path=tmp_path / "keys.json")
    ring.update(lambda r: issue(r, "acme"))
    settings = test_settings(
        model_repository, tmp_path / "store", redis_url=redis_url, api_keys=str(ring.path)
    )
    running = ServerThread(settings=settings)
    running.wait_ready()

    async def stop() -> list[str]:
        await running.server.stop(1.0)
        return sorted(t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task())

    try:
        left = running.call(stop())
    finally:
        running.loop.call_soon_threadsafe(running.loop.stop)
        running.thread.join(10)
        running.loop.close()
    assert left == []


def test_a_test_redis_on_a_port_another_holds_fails_rather_than_use_the_other(tmp_path: Path) -> None:
    """Test infrastructure: a RedisServer whose port another Redis already holds (two xdist workers
    given the same port) says so, instead of taking the other's answer for its own start and
    handing out the other's URL (its tests would then flush each other's data)."""
    first = RedisServer(workdir=tmp_path / "first")
    try:
        with pytest.raises(RuntimeError, match=f"did not start on port {first.port}"):
            RedisServer(workdir=tmp_path / "second", port=first.port)
    finally:
        first.stop()


def test_allotted_test_ports_are_split_between_the_xdist_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.redis_fixtures import allotted_ports

    monkeypatch.delenv("TALKINGHEAD_TEST_PORTS", raising=False)
    assert allotted_ports() is None  # any free port
    monkeypatch.setenv("TALKINGHEAD_TEST_PORTS", "19500-19599")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    shares = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        shares.append(allotted_ports())
    assert shares == [range(19500, 19550), range(19550, 19600)]
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT")
    assert allotted_ports() == range(19500, 19600)  # one process: all of it
