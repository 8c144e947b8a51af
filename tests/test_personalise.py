"""Personalisation through the API with the embedded worker (`talkinghead serve`'s default): an
operation's progress, its result serving new streams, the errors, cancellation, and deletion
withdrawing the avatar's generator. Real server, real worker process, 2 fine-tuning steps."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from api.talkinghead.v1 import personalisation_pb2 as ops
from client.library import Client, landmark_requests, operation_error
from facekit.contract import avatar_stamp
from facekit.liveness import read_report
from facekit.sequence import LandmarkSequence
from jobs.local import LocalQueue
from jobs.record import PERSONALISE, Job
from service import local_worker
from service.store import LocalAvatarStore
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import (
    CONSENT,
    DRIVER,
    PORTRAIT,
    WORKER_TIMEOUT_S,
    ServerThread,
    copy_base_models,
    fake_generator,
    fill,
    stored_record,
    test_settings,
    thread_policies,
    tmpfs,
    worker_context,
)


@pytest.fixture(scope="module")
def embedded(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A server with its own repository copy and the embedded worker (a `talkinghead worker` child)."""
    work = tmp_path_factory.mktemp("embedded")
    repository = copy_base_models(model_repository, work / "repo")
    settings = test_settings(repository, work / "store", worker="embedded", max_queue=2)
    running = ServerThread(settings=settings)
    running.wait_ready()
    yield running
    running.stop()


def test_a_tenants_avatar_is_personalised_served_and_withdrawn(
    model_repository: Path, tmp_path: Path
) -> None:
    """A tenant's avatar is stored as `acme.mona`, its generator `generator_acme.mona`, a name the
    model repository refused ("invalid model name"): with API keys no avatar of a tenant could be
    personalised or have its generator withdrawn (helper-75). The default tenant's could."""
    from service.auth import FileRing, issue

    ring = FileRing(path=tmp_path / "keys.json")
    key = ring.update(lambda r: issue(r, "acme"))[1]
    repository = copy_base_models(model_repository, tmp_path / "repo")
    settings = test_settings(repository, tmp_path / "store", worker="embedded", api_keys=str(ring.path))
    running = ServerThread(settings=settings)
    try:
        running.wait_ready()
        with Client(target=running.address, api_key=key, timeout=120) as acme:
            acme.create_avatar("mona", [PORTRAIT], consent=CONSENT)
            done = acme.personalise("mona", steps=2, wait=True, timeout=WORKER_TIMEOUT_S)
            assert operation_error(done) == "", operation_error(done)
            assert done.response.model_name == "generator_acme.mona"
            driver = LandmarkSequence.load(DRIVER)
            two = LandmarkSequence(driver.points[:2], driver.frame_size, driver.fps)
            assert len(list(acme.animate("mona", landmark_requests(two)))) == 2
            assert acme.last_started is not None and acme.last_started.personalised
            acme.delete_avatar("mona")
            deadline = time.monotonic() + WORKER_TIMEOUT_S
            while (left := sorted(p.name for p in repository.iterdir())) != ["embedder", "generator"]:
                assert time.monotonic() < deadline, f"the deleted avatar's generator is still there: {left}"
                time.sleep(0.2)
    finally:
        running.stop()


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()  # type: ignore[operator]
    return error.value.code()  # type: ignore[no-any-return]


def _cursor(when: str, job_id: str = "0123456789abcdef") -> str:
    return base64.urlsafe_b64encode(f"before:{when}:{job_id}".encode()).decode()


def test_requests_are_checked(server: ServerThread, client: Client, avatar: str) -> None:
    assert code_of(lambda: client.personalise("nobody")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.personalise("Bad Id")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.personalise(avatar, steps=5000)) == grpc.StatusCode.INVALID_ARGUMENT
    bad = ops.PersonaliseAvatarRequest(avatar_id=avatar, steps=-3)
    assert code_of(lambda: client.operations.PersonaliseAvatar(bad)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.get_operation("operations/x")) == grpc.StatusCode.INVALID_ARGUMENT
    unknown = "operations/0123456789abcdef"
    assert code_of(lambda: client.get_operation(unknown)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.cancel_operation(unknown)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: list(client.watch_operation(unknown))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.get_operation(unknown + "\n")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.cancel_operation(unknown + "\n")) == grpc.StatusCode.INVALID_ARGUMENT
    # a long name is refused as malformed, not echoed whole into a reply larger than gRPC allows
    # (RESOURCE_EXHAUSTED "received metadata size exceeds hard limit")
    for name in ("operations/" + "0" * 17_000, "operations/" + "\u00e9" * 6_000):
        with pytest.raises(grpc.RpcError) as error:
            client.get_operation(name)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(error.value.details() or "") < 300
    for token in ("x" * 17_000, _cursor("nan"), _cursor("inf"), _cursor("1.5", "not-a-job-id")):
        request = ops.ListOperationsRequest(page_token=token)
        with pytest.raises(grpc.RpcError) as error:
            client.operations.ListOperations(request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, token[:40]
        assert len(error.value.details() or "") < 300
    store = LocalAvatarStore(root=server.settings.avatar_store)
    base = store.get(avatar)
    assert base is not None
    store.put(replace(base, avatar_id="old-model", model_id="0000000000000000"), replace=True)
    assert code_of(lambda: client.personalise("old-model")) == grpc.StatusCode.FAILED_PRECONDITION
    assert not list(client.list_operations()), "nothing was queued by a refused request"


def test_a_personalisation_racing_a_delete_does_not_keep_the_deleted_photos_queued(
    server: ServerThread, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete that ran while a personalisation was being submitted looked for the avatar's
    queued job before it was written: the job stayed QUEUED with the deleted person's photos for a
    worker to fine-tune on, and the id, created again, could not be personalised (ALREADY_EXISTS)."""
    client.create_avatar("gone-soon", [PORTRAIT], consent=CONSENT)
    submitting, deleted = threading.Event(), threading.Event()
    real_submit = LocalQueue.submit

    def submit_after_the_delete(self: LocalQueue, job: Job, data: bytes, *, max_active: int) -> Job:
        if job.kind == PERSONALISE and job.avatar_id == "gone-soon":
            submitting.set()
            deleted.wait(30)
        return real_submit(self, job, data, max_active=max_active)

    monkeypatch.setattr(LocalQueue, "submit", submit_after_the_delete)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        starting = pool.submit(client.personalise, "gone-soon")
        assert submitting.wait(60)
        client.delete_avatar("gone-soon")
        deleted.set()
        with pytest.raises(grpc.RpcError) as error:
            starting.result(60)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "deleted" in (error.value.details() or "")
    [operation] = client.list_operations(avatar_id="gone-soon")
    assert operation.done and operation.error.code == grpc.StatusCode.CANCELLED.value[0], operation
    assert operation.error.message == "cancelled while queued: the avatar was deleted"
    job_id = operation.name.removeprefix("operations/")
    assert not (Path(server.settings.jobs) / f"{job_id}.input.npz").exists(), "its photos are gone"
    monkeypatch.undo()
    client.create_avatar("gone-soon", [PORTRAIT], consent=CONSENT)  # the id is free again
    started = client.personalise("gone-soon")
    assert client.cancel_operation(started.name).name == started.name
    client.delete_avatar("gone-soon")


def _died_after_publishing(jobs: Path, repo: Path, avatar_id: str, version: int) -> Job:
    """A worker takes the avatar's job, writes generator_<avatar>/<version>, and is killed."""
    dead = LocalQueue(root=jobs)
    held = dead.claim(f"worker-{version}", wait_s=1)
    assert held is not None and held.avatar_id == avatar_id
    if held.published_before < 0:
        held.published_before = 0  # as the worker records at its first attempt: no generator before
    assert dead.update(held)
    written = repo / f"generator_{avatar_id}" / str(version)
    written.mkdir(parents=True)
    (written / "model.onnx").write_bytes(b"fine-tuned")
    dead.close()  # the process is gone: the OS lets go of its lock
    return held


def _new_job(queue: LocalQueue, avatar_id: str) -> Job:
    from jobs.queue import pack_input
    from jobs.record import new_id

    data = pack_input(np.zeros((1, 128, 128, 3), np.uint8), np.zeros((1, 68, 2), np.float32))
    job = Job(id=new_id(), kind=PERSONALISE, avatar_id=avatar_id, steps=3, model_id="m1")
    return queue.submit(job, data, max_active=2)


def _events(jobs: Path) -> list[tuple[str, str]]:
    from jobs.events import Event
    from jobs.local import EVENTS_FILE

    told = [Event.from_json(line) for line in (jobs / EVENTS_FILE).read_text().splitlines()]
    return [(e.avatar_id, e.event) for e in told if e]


def test_a_job_cancelled_while_its_worker_was_dead_takes_back_what_that_worker_published(
    tmp_path: Path,
) -> None:
    """The embedded worker dies after writing the avatar's new generator, before its job said so;
    the caller cancels. The queue used to end the job at once ("cancelled while queued", the lock
    free) and no worker came back to it: the cancelled personalisation stayed published, served to
    every new stream. Now the restarted worker takes it, takes the version back, tells the
    replicas, and ends it CANCELLED."""
    from jobs.events import UNPERSONALISED
    from jobs.record import CANCELLED, RUNNING
    from worker.jobs_run import run_job

    jobs, repo = tmp_path / "jobs", tmp_path / "repo"
    service = LocalQueue(root=jobs)
    job = _new_job(service, "dead")
    _died_after_publishing(jobs, repo, "dead", 1)
    asked = service.cancel(job.id)
    assert asked is not None and asked.state == RUNNING and asked.cancel_requested
    restarted = LocalQueue(root=jobs)
    taken = restarted.claim("restarted", wait_s=1)
    assert taken is not None and taken.id == job.id and taken.attempt == 2
    run_job(worker_context(restarted, repo), taken)
    done = service.get(job.id)
    assert (
        done is not None and done.state == CANCELLED and done.error == "cancelled before fine-tuning resumed"
    )
    assert not (repo / "generator_dead").exists(), "the cancelled personalisation is still published"
    assert _events(jobs) == [("dead", UNPERSONALISED)]
    assert service.active("dead") is None and not (jobs / f"{job.id}.input.npz").exists()


def test_a_job_that_took_its_worker_down_three_times_fails_and_the_queue_goes_on(tmp_path: Path) -> None:
    """A personalisation whose worker is killed each time it runs it (out of memory, say) was taken
    again by every restarted worker, forever, and the job queued behind it never ran. The fourth
    worker to take it ends it FAILED saying so and takes back what the dead attempts published."""
    from jobs.events import UNPERSONALISED
    from jobs.record import FAILED
    from worker.jobs_run import MAX_ATTEMPTS, run_job

    jobs, repo = tmp_path / "jobs", tmp_path / "repo"
    service = LocalQueue(root=jobs)
    poison = _new_job(service, "heavy")
    time.sleep(0.01)  # (jobs are taken oldest first)
    behind = _new_job(service, "light")
    for version in range(1, MAX_ATTEMPTS + 1):
        _died_after_publishing(jobs, repo, "heavy", version)
    worker = LocalQueue(root=jobs)
    taken = worker.claim("last", wait_s=1)
    assert taken is not None and taken.id == poison.id and taken.attempt == MAX_ATTEMPTS + 1
    ctx = worker_context(worker, repo)
    run_job(ctx, taken)
    done = service.get(poison.id)
    assert done is not None and done.state == FAILED and done.error_code == grpc.StatusCode.INTERNAL.value[0]
    observed = {  # nothing ran in this attempt: no fine-tuning time (it read the claim-to-end ms so)
        s.labels["stage"]: s.value
        for family in ctx.metrics.registry.collect()
        if family.name == "talkinghead_worker_job_stage_seconds"
        for s in family.samples
        if s.name.endswith("_count") and s.labels["outcome"] == "failed" and s.value
    }
    assert observed == {"queued": 1, "total": 1}
    assert done.error == (
        "the worker stopped 3 times while running this personalisation (the worker's log says why); "
        "it is not tried again"
    )
    assert not (repo / "generator_heavy").exists()
    assert _events(jobs) == [("heavy", UNPERSONALISED)]
    assert [j.id for j in service.live()] == [behind.id], "the failed job no longer counts"
    nxt = worker.claim("last", wait_s=1)
    assert nxt is not None and nxt.id == behind.id and nxt.attempt == 1


def _run_one(queue: LocalQueue, ctx: object) -> Job:
    from worker.jobs_run import run_job

    held = queue.claim("w", wait_s=1)
    assert held is not None, "no job to run"
    run_job(ctx, held)  # type: ignore[arg-type]
    done = queue.get(held.id)
    assert done is not None and done.done
    return done


def test_a_remove_job_waits_for_its_record_to_go_and_takes_only_what_that_record_leaves(
    tmp_path: Path,
) -> None:
    """The service queues a record's REMOVE job before it deletes or replaces the record (a crash
    between the two used to lose the job). Run before the record goes, the job waits for it; a
    record still there after the wait (its delete failed) keeps its generator. After a replace it
    takes the old record's versions only, never the new record's; after a delete, everything."""
    from jobs.avatars import LocalAvatarIndex
    from jobs.events import PERSONALISED, UNPERSONALISED
    from jobs.record import CANCELLED, REMOVE, SUCCEEDED, new_id

    jobs, repo, avatars = tmp_path / "jobs", tmp_path / "repo", tmp_path / "avatars"
    store, queue = LocalAvatarStore(root=avatars), LocalQueue(root=jobs)
    ctx = worker_context(queue, repo, avatars=LocalAvatarIndex(root=avatars), remove_wait_s=0.5)
    first = stored_record(store, "ann", 1000.25)
    folder = fake_generator(repo, "ann", 1, first.create_time)

    def remove(record: object) -> Job:
        created = record.create_time  # type: ignore[attr-defined]
        return queue.submit(
            Job(id=new_id(), kind=REMOVE, avatar_id="ann", avatar_created=created), b"", max_active=2
        )

    remove(first)  # a delete that then failed: the record stays, and so does its generator
    done = _run_one(queue, ctx)
    assert done.state == CANCELLED and "still there" in done.error
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt"]

    remove(first)  # a replace: queued, then (while the job waits) the new record written, and
    second = replace(first, create_time=2000.5)  # personalised at once

    def replaced() -> None:
        store.put(second, replace=True)
        fake_generator(repo, "ann", 2, second.create_time)

    timer = threading.Timer(0.2, replaced)
    timer.start()
    done = _run_one(queue, replace(ctx, remove_wait_s=10))
    timer.join()
    assert done.state == SUCCEEDED
    assert [p.name for p in folder.iterdir() if p.name.isdigit()] == ["2"], "the new record's version stays"

    remove(second)  # a delete
    assert store.delete("ann")
    assert _run_one(queue, ctx).state == SUCCEEDED
    assert not folder.exists()
    assert _events(jobs) == [("ann", PERSONALISED), ("ann", UNPERSONALISED)]


def test_a_remove_job_waiting_for_its_record_holds_up_no_other_job(tmp_path: Path) -> None:
    """A REMOVE job whose record is still there (its delete queued it, then failed) is checked
    again between other jobs instead of holding the worker: another avatar's REMOVE queued after
    it ends at once (before: only once the first had waited its whole remove_wait_s, 30 s by
    default), and the first still ends CANCELLED after its wait, its record's generator kept."""
    from jobs.avatars import LocalAvatarIndex
    from jobs.record import CANCELLED, REMOVE, RUNNING, SUCCEEDED, new_id
    from worker.jobs_run import serve_jobs

    jobs, repo, avatars = tmp_path / "jobs", tmp_path / "repo", tmp_path / "avatars"
    store, queue = LocalAvatarStore(root=avatars), LocalQueue(root=jobs)
    index = LocalAvatarIndex(root=avatars)
    ctx = worker_context(queue, repo, avatars=index, remove_wait_s=3.0, sweep_interval_s=0)
    ann = stored_record(store, "ann", 1000.25)  # its delete failed: the record stays
    kept = fake_generator(repo, "ann", 1, ann.create_time)
    gone = fake_generator(repo, "bob", 1, 1500.5)  # bob's record was deleted

    def remove(avatar_id: str, created: float) -> Job:
        job = Job(id=new_id(), kind=REMOVE, avatar_id=avatar_id, avatar_created=created)
        return queue.submit(job, b"", max_active=2)

    first = remove("ann", ann.create_time)
    time.sleep(0.01)  # (queued after it)
    second = remove("bob", 1500.5)
    stop = threading.Event()
    worker = threading.Thread(target=serve_jobs, args=(ctx, "w", lambda: not stop.is_set()))
    t0 = time.monotonic()
    worker.start()
    try:
        while not (bob := queue.get(second.id)).done:  # type: ignore[union-attr]
            assert time.monotonic() - t0 < 10, "bob's REMOVE never ran"
            time.sleep(0.05)
        waiting = queue.get(first.id)
        assert waiting is not None and waiting.state == RUNNING, "ann's REMOVE, still waiting, held it up"
        assert bob.state == SUCCEEDED and not gone.exists()  # type: ignore[union-attr]
        while not (done := queue.get(first.id)).done:  # type: ignore[union-attr]
            assert time.monotonic() - t0 < 10, "ann's REMOVE never ended"
            time.sleep(0.05)
        assert done.state == CANCELLED and "still there" in done.error  # type: ignore[union-attr]
        assert time.monotonic() - t0 >= 3.0, "it waited its remove_wait_s"
        assert sorted(p.name for p in kept.iterdir()) == ["1", "config.pbtxt"]
    finally:
        stop.set()
        worker.join(40)


def test_the_worker_sweeps_generators_of_avatar_records_the_store_no_longer_holds(tmp_path: Path) -> None:
    """What no REMOVE job came for - an avatar deleted by a server killed before it queued one
    (before REMOVE jobs were queued first), a replaced record's generator whose job was lost -
    is swept by the worker at its start and then every sweep_interval_s: the versions stamped for
    a record the store no longer holds. Unstamped ones (made by hand) stay; an empty store (the
    wrong one, most likely) sweeps nothing."""
    from jobs.avatars import LocalAvatarIndex
    from jobs.events import PERSONALISED, UNPERSONALISED
    from worker.jobs_run import serve_jobs, sweep

    jobs, repo, avatars = tmp_path / "jobs", tmp_path / "repo", tmp_path / "avatars"
    store, queue = LocalAvatarStore(root=avatars), LocalQueue(root=jobs)
    index = LocalAvatarIndex(root=avatars)
    ctx = worker_context(queue, repo, avatars=index)
    mine = index.store_id()
    fake_generator(repo, "gone", 1, 1000.0, mine)  # deleted
    fake_generator(repo, "hand", 1, None)  # exported by hand; no avatar yet
    assert sweep(ctx) == [], "an empty store sweeps nothing"
    kept = stored_record(store, "kept", 1100.0)
    fake_generator(repo, "kept", 1, kept.create_time, mine)
    fake_generator(repo, "again", 1, 1200.0, mine)  # replaced by the record below, personalised again
    fake_generator(repo, "again", 2, stored_record(store, "again", 1300.0).create_time, mine)
    fake_generator(repo, "legacy", 1, None)  # made before stamps, its avatar still there
    stored_record(store, "legacy", 1400.0)
    # another deployment's, sharing the repository (make demo and make up): not this store's record
    fake_generator(repo, "theirs", 1, 1500.0, "another-store")
    fake_generator(repo, "unnamed", 1, 1600.0)  # made before stores were stamped

    calls = iter([True, False])
    serve_jobs(ctx, "w", lambda: next(calls))  # a worker that starts, sweeps, finds no job, stops
    assert sorted(p.name for p in repo.iterdir() if not p.name.startswith(".")) == [
        "generator_again",
        "generator_hand",
        "generator_kept",
        "generator_legacy",
        "generator_theirs",
        "generator_unnamed",
    ]
    assert [p.name for p in (repo / "generator_again").iterdir() if p.name.isdigit()] == ["2"]
    assert sorted(_events(jobs)) == [("again", PERSONALISED), ("gone", UNPERSONALISED)]
    assert sweep(ctx) == [], "nothing left to sweep"


def test_a_personalisation_of_a_record_gone_stops_before_it_fine_tunes(tmp_path: Path) -> None:
    """A delete cancels the avatar's personalisation, but one submitted as the record went (or a
    cancel lost with its server) would fine-tune on the deleted photos and publish a generator
    for a record that is gone: the worker looks at the store first. The index it reads is what
    the service's store writes."""
    from jobs.avatars import LocalAvatarIndex
    from jobs.record import CANCELLED

    jobs, avatars = tmp_path / "jobs", tmp_path / "avatars"
    store, queue = LocalAvatarStore(root=avatars), LocalQueue(root=jobs)
    index = LocalAvatarIndex(root=avatars)
    record = stored_record(store, "late", 1500.125)
    assert index.created("late") == record.create_time and index.count() == 1
    assert index.created("nobody") is None
    job = _new_job(queue, "late")
    job.avatar_created = record.create_time
    queue._write(job)  # (as the service submits it: with its record's create time)
    stored_record(store, "late", 1600.0)  # replaced meanwhile
    done = _run_one(queue, worker_context(queue, tmp_path / "repo", avatars=index))
    assert done.state == CANCELLED and done.error == (
        "cancelled before fine-tuning: the avatar was deleted or replaced"
    ), done.error


class Crash(BaseException):
    """The server process dies here (nothing after it runs; what it wrote stays)."""


@pytest.mark.parametrize("change", ["delete", "replace"])
def test_a_server_killed_mid_change_leaves_no_generator_of_the_old_record_and_its_audit_event(
    model_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """The server dies right after the store deleted (or overwrote) a personalised avatar's
    record. It used to delete the record first and queue the REMOVE job after: killed between
    the two, the generator stayed for good, no job would withdraw it, a second delete was
    NOT_FOUND and the audit log had no tombstone. Now the job is queued and the audit event
    written ahead first: after the restart the worker withdraws the generator, and the restarted
    server appends the event the dead one did not (`recovered`)."""
    import json

    from jobs.avatars import LocalAvatarIndex
    from jobs.events import UNPERSONALISED
    from service import app as app_module
    from service.auth import ANONYMOUS

    repo = copy_base_models(model_repository, tmp_path / "repo")
    settings = test_settings(repo, tmp_path / "store")
    store = LocalAvatarStore(root=settings.avatar_store)
    running = ServerThread(settings=settings)
    try:
        running.wait_ready()
        with running.client() as c:
            c.create_avatar("mona", [PORTRAIT], consent=CONSENT)
        old = store.get("mona")
        assert old is not None
        folder = fake_generator(repo, "mona", 1, old.create_time)  # personalised
        app = running.app
        if change == "delete":
            real = app.store.delete

            def delete_then_die(avatar_id: str) -> bool:
                real(avatar_id)
                raise Crash

            monkeypatch.setattr(app.store, "delete", delete_then_die)
            with pytest.raises(Crash):
                running.call(app.delete_avatar("mona", principal=ANONYMOUS, actor="test"))
            assert store.get("mona") is None
        else:
            real_put = app.store.put

            def put_then_die(record: object, *, replace: bool) -> bool:
                real_put(record, replace=replace)
                raise Crash

            monkeypatch.setattr(app.store, "put", put_then_die)
            from api.talkinghead.v1 import avatar_pb2

            request = avatar_pb2.CreateAvatarRequest(
                avatar_id="mona",
                images=[avatar_pb2.SourceImage(data=PORTRAIT.read_bytes())],
                replace=True,
                consent=CONSENT,
            )
            with pytest.raises(Crash):
                running.call(app.create_avatar(request, principal=ANONYMOUS, actor="test"))
            now = store.get("mona")
            assert now is not None and now.create_time != old.create_time
    finally:
        running.stop()
    assert folder.exists()
    log = settings.audit_log
    assert [e["event"] for e in map(json.loads, log.read_text().splitlines())] == ["create"]

    queue = LocalQueue(root=settings.jobs)  # the worker, restarted
    ctx = worker_context(queue, repo, avatars=LocalAvatarIndex(root=settings.avatar_store), remove_wait_s=1)
    _run_one(queue, ctx)
    assert not folder.exists(), "the old record's generator is still in the repository"
    assert _events(settings.jobs)[-1] == ("mona", UNPERSONALISED)

    monkeypatch.setattr(app_module, "PENDING_GRACE_S", 0.0)
    restarted = ServerThread(settings=settings)
    try:
        deadline = time.monotonic() + 30
        while len(events := [json.loads(line) for line in log.read_text().splitlines()]) < 2:
            assert time.monotonic() < deadline, "the restarted server did not append the lost event"
            time.sleep(0.1)
    finally:
        restarted.stop()
    assert [e["event"] for e in events] == ["create", change]
    lost = events[1]
    assert lost["detail"]["recovered"] is True
    if change == "delete":  # the tombstone, naming the deleted record's consent
        assert lost["consent_id"] == old.consent["record_id"] and lost["detail"]["tombstone"] is True
    else:
        assert lost["detail"]["replaced"]["consent_id"] == old.consent["record_id"]


def test_personalise_watch_stream_and_delete(embedded: ServerThread, driver: LandmarkSequence) -> None:
    repository = embedded.settings.model_repository
    with embedded.client() as c:
        for name in ("tune", "wait", "full"):
            c.create_avatar(name, [PORTRAIT], consent=CONSENT)
        started = c.personalise("tune", steps=2)
        assert started.metadata.state == ops.OPERATION_STATE_QUEUED and started.metadata.total_steps == 2
        assert code_of(lambda: c.personalise("tune")) == grpc.StatusCode.ALREADY_EXISTS
        queued = c.personalise("wait", preset="best")  # the worker runs one job at a time: this waits
        assert queued.metadata.total_steps == 150
        assert code_of(lambda: c.personalise("full")) == grpc.StatusCode.RESOURCE_EXHAUSTED
        cancelled = c.cancel_operation(queued.name)
        assert cancelled.done and cancelled.error.code == grpc.StatusCode.CANCELLED.value[0]
        assert cancelled.error.message == "cancelled while queued"  # (no reason: the caller knows why)
        again = c.personalise("wait", steps=2)  # queued behind "tune" (or just taken by the worker)
        c.delete_avatar("wait")
        gone = c.wait_operation(again.name, timeout=WORKER_TIMEOUT_S)
        assert gone.error.code == grpc.StatusCode.CANCELLED.value[0], gone
        assert gone.error.message.endswith(": the avatar was deleted"), gone.error.message

        seen: list[ops.Operation] = []
        done = c.wait_operation(started.name, on_progress=seen.append, timeout=WORKER_TIMEOUT_S)
        finished = time.monotonic()
        assert operation_error(done) == "" and done.response.model_name == "generator_tune", done
        steps = [o.metadata.step for o in seen]
        assert steps == sorted(steps) and 1 in steps and steps[-1] == 2, steps
        assert {o.metadata.stage for o in seen} >= {"fine-tuning", "done"}
        assert any(o.metadata.losses for o in seen), "progress carries the losses"
        assert done.metadata.attempt == 1 and done.metadata.elapsed.seconds >= 0
        # the worker takes only the CPU the streams leave: every thread of it (PyTorch's pool
        # included, started after the setting) is SCHED_IDLE, and PyTorch runs one thread
        worker = embedded.server.worker
        assert worker is not None and worker.process is not None
        assert thread_policies(worker.process.pid) == {os.SCHED_IDLE}
        assert "--threads 1" in " ".join(worker.cmd)
        # and says what it is doing, in the file its supervisor reads (service/local_worker.py)
        assert worker.liveness is not None
        report = read_report(worker.liveness)
        assert report is not None and report[0] > 2 and report[1] in (120.0, 900.0), (
            report
        )  # (idle or a stage)

        seq = LandmarkSequence(driver.points[:3], driver.frame_size, driver.fps)
        frames = c.animate("tune", landmark_requests(seq), encoding="raw")
        first = next(frames)
        assert time.monotonic() - finished < 2.0, "the first personalised frame within 2 s"
        assert c.last_started is not None and c.last_started.personalised
        rest = [first, *frames]
        shared = list(c.animate("full", landmark_requests(seq), encoding="raw"))
        assert c.last_started is not None and not c.last_started.personalised
        pairs = zip(rest, shared, strict=True)
        diff = np.mean([np.abs(a.image.astype(int) - b.image.astype(int)).mean() for a, b in pairs])
        assert diff > 0.5, "the personalised generator draws differently from the shared one"
        assert c.get_avatar("tune").personalised and not c.get_avatar("full").personalised
        model = onnx.load(str(sorted((repository / "generator_tune").glob("*/model.onnx"))[-1]))
        stamped = {p.key: p.value for p in model.metadata_props}
        assert stamped["talkinghead.consent_record"] == c.get_avatar("tune").consent.record_id
        tuned = LocalAvatarStore(root=embedded.settings.avatar_store).get("tune")
        assert tuned is not None  # and the avatar record it was fine-tuned on (no other of the id)
        assert stamped["talkinghead.avatar_created"] == avatar_stamp(tuned.create_time)
        listed = [o.name for o in c.list_operations(avatar_id="tune")]
        assert listed == [started.name]

        c.delete_avatar("tune")
        deadline = time.monotonic() + 30
        while (repository / "generator_tune").exists():
            assert time.monotonic() < deadline, "the deleted avatar's generator is still in the repository"
            time.sleep(0.2)


@pytest.mark.parametrize("source", ["published", "template"])
def test_a_workers_first_job_starts_from_a_generator_published_before(
    personalised_repository: tuple[Path, str],
    personal_ckpt: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    source: str,
) -> None:
    """A worker that has traced nothing yet (just started) publishes an avatar's generator from
    the graph of one the repository already holds for the same base model - another avatar's, or
    where there is none the template beside the shared generator (`talkinghead export` writes it;
    here another avatar's generator stands in): no tracing, and the frames are PyTorch's."""
    from export import repository, to_onnx
    from export.command import real_inputs
    from facekit import contract, cpus
    from worker import models

    repo = tmp_path / "repo"
    shutil.copytree(personalised_repository[0], repo)
    published = expected = repo / "generator_astro-fine"
    for version in repository.versions(repo / "generator"):  # none but the one below
        (repo / "generator" / str(version) / repository.TEMPLATE_FILE).unlink(missing_ok=True)
    if source == "template":
        (shared,) = repository.versions(repo / "generator")
        template = repo / "generator" / str(shared) / repository.TEMPLATE_FILE
        shutil.move(published / "1" / contract.MODEL_FILE, template)
        shutil.rmtree(published)
        expected = template
    monkeypatch.setattr(to_onnx, "TEMPLATES", to_onnx.Templates())  # a worker process just started
    with caplog.at_level("INFO"):
        name, version, written = models.publish(personal_ckpt, repo, profile="python", tritons=[])
    assert (name, version, written) == ("generator_alice", 1, repo / "generator_alice" / "1")
    # Triton's runner and the CPU helper it sizes its threads by (export/repository.py)
    assert (written / "model.py").read_text() == repository.PYTHON_MODEL.read_text()
    assert (written / "talkinghead_cpus.py").read_text() == Path(cpus.__file__).read_text()
    assert f"starts from the graph of {expected}" in caplog.text
    assert "from an earlier export's graph" in caplog.text  # written, not traced
    (graph,) = to_onnx.graphs(personal_ckpt)
    inputs = real_inputs(personal_ckpt)[contract.KIND_PERSONALISED]
    path = repo / name / str(version) / contract.MODEL_FILE
    (parity,) = to_onnx.parity(graph, path, {n: inputs[n] for n in graph.inputs})
    assert parity.max_abs <= 2 and parity.mean_abs < 0.01
    stamped = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert stamped["talkinghead.avatar"] == "alice"


def test_a_model_repository_on_its_own_filesystem_full_then_with_room(
    model_repository: Path, tmp_path: Path
) -> None:
    """The repository a volume of its own, as in Kubernetes (a real tmpfs; skips where the test
    cannot mount one). Full: the operation ends UNAVAILABLE "the model repository is full" - not
    INTERNAL with the worker's paths -, nothing half-written is left, the avatar still streams.
    With room: the job publishes and deleting the avatar withdraws its generator (before, both
    staged their folders beside the repository: EXDEV here, a read-only root in the chart)."""
    with tmpfs(tmp_path / "repo", "48m") as repo:
        copy_base_models(model_repository, repo)
        running = ServerThread(settings=test_settings(repo, tmp_path / "store", worker="embedded"))
        try:
            running.wait_ready()
            filler = fill(repo / ".filler")
            with running.client() as c:
                c.create_avatar("crowded", [PORTRAIT], consent=CONSENT)
                done = c.personalise("crowded", steps=2, wait=True, timeout=WORKER_TIMEOUT_S)
                assert operation_error(done) == (
                    "UNAVAILABLE: the model repository is full; personalise again later"
                ), operation_error(done)
                assert sorted(p.name for p in repo.iterdir() if not p.name.startswith(".")) == [
                    "embedder",
                    "generator",
                ]
                driver = LandmarkSequence.load(DRIVER)
                two = LandmarkSequence(driver.points[:2], driver.frame_size, driver.fps)
                assert len(list(c.animate("crowded", landmark_requests(two)))) == 2

                filler.unlink()
                done = c.personalise("crowded", steps=2, wait=True, timeout=WORKER_TIMEOUT_S)
                assert done.response.model_name == "generator_crowded", operation_error(done)
                assert len(list(c.animate("crowded", landmark_requests(two)))) == 2
                assert c.last_started is not None and c.last_started.personalised
                c.delete_avatar("crowded")
                # gone from the repository (one rename), then from the disk: the hidden folder the
                # rename made is deleted after the unload, so the listing is waited on, not read once
                deadline = time.monotonic() + WORKER_TIMEOUT_S
                while (left := sorted(p.name for p in repo.iterdir())) != ["embedder", "generator"]:
                    assert time.monotonic() < deadline, (
                        f"the deleted avatar's generator is still there: {left}"
                    )
                    time.sleep(0.2)
        finally:
            running.stop()


def test_the_time_left_counts_the_export_down_once_it_began(tmp_path: Path) -> None:
    """The estimate added a fixed export time to the steps left, so a job exporting (steps done)
    said ~20 s left to its end; now the export's estimate counts down from when it began, a
    retaken attempt starts over, and an export past its estimate says 0 (unknown)."""
    from jobs.record import EXPORT_ESTIMATE_S, RUNNING

    job = Job(id="0123456789abcdef", kind=PERSONALISE, avatar_id="a", steps=10, state=RUNNING)
    job.first_step_time, job.step = 100.0, 6  # 5 steps in 10 s since step 1: 2 s a step
    assert job.remaining(now=110.0) == 4 * 2.0 + EXPORT_ESTIMATE_S
    job.export_estimate_s = 8.0  # what its worker measured (tests/test_worker_jobs.py)
    job.step, job.export_time = 10, 130.0
    assert job.remaining(now=135.0) == 8.0 - 5.0
    assert job.remaining(now=130.0 + 8.0 + 1) == 0.0
    _new_job(LocalQueue(root=tmp_path), "b")
    dead = LocalQueue(root=tmp_path)
    held = dead.claim("w1", wait_s=1)
    assert held is not None
    held.stage, held.export_time, held.losses = "exporting", 130.0, {"g_total": 1.5}
    assert dead.update(held)
    dead.close()  # the worker died while exporting
    taken = LocalQueue(root=tmp_path).claim("w2", wait_s=1)
    assert taken is not None and taken.attempt == 2 and taken.export_time == 0.0, "it starts over"
    assert taken.losses == {}, "step 0 of the new attempt, not the lost one's losses"


def test_a_worker_killed_soon_after_each_start_is_restarted_and_the_job_ends(
    model_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded worker SIGKILLed (killed for memory, say) within seconds of taking the job,
    three times. Before, three exits within 20 s of their starts read as "cannot start": the server
    gave personalisation up for its life (FAILED_PRECONDITION to every new one) and the job stayed
    RUNNING for good, its cancel never acted on (helper-76). A worker that said it was ready is
    restarted however soon it died; the job's third loss ends it FAILED, and the avatar can be
    personalised again on the same server. The second time the worker is not killed but stopped
    (SIGSTOP: alive, and as stuck as a call that never returns): its supervisor kills it once its
    step has stood longer than TALKINGHEAD_WORKER_STUCK_AFTER (15 s here)."""
    import signal

    # every death "soon" after its start here (a worker takes 10-20 s to fine-tune its first step)
    monkeypatch.setattr(local_worker, "QUICK_FAILURE_S", 600.0)
    monkeypatch.setattr(local_worker, "CHECK_S", 0.5)
    repository = copy_base_models(model_repository, tmp_path / "repo")
    settings = test_settings(repository, tmp_path / "store", worker="embedded", worker_stuck_after=15)
    running = ServerThread(settings=settings)
    queue = LocalQueue(root=settings.jobs)
    try:
        running.wait_ready()
        with running.client() as c:
            c.create_avatar("fragile", [PORTRAIT], consent=CONSENT)
            job_id = c.personalise("fragile", steps=400).name.rpartition("/")[2]
            for attempt in (1, 2, 3):
                deadline = time.monotonic() + WORKER_TIMEOUT_S
                while (job := queue.get(job_id)) is None or job.attempt < attempt or job.step < 1:
                    assert time.monotonic() < deadline, f"attempt {attempt} never fine-tuned"
                    time.sleep(0.1)
                worker = running.server.worker
                assert worker is not None and worker.process is not None
                os.kill(worker.process.pid, signal.SIGSTOP if attempt == 2 else signal.SIGKILL)
            done = c.wait_operation(f"operations/{job_id}", timeout=WORKER_TIMEOUT_S)
            error = operation_error(done)
            assert error.startswith("INTERNAL: the worker stopped 3 times"), error
            restarts = {
                reason: running.metric(f'talkinghead_embedded_worker_restarts_total{{reason="{reason}"}}')
                for reason in local_worker.RESTART_REASONS
            }
            assert restarts == {"exited": 2.0, "stuck": 1.0}, restarts
            again = c.personalise("fragile", steps=2, wait=True, timeout=WORKER_TIMEOUT_S)
            assert again.response.model_name == "generator_fragile", operation_error(again)
    finally:
        running.stop()


def test_a_server_whose_worker_cannot_run_says_why_and_ends_what_was_queued(
    model_repository: Path, tmp_path: Path
) -> None:
    """`serve` run outside the checkout (the worker checkpoint's default is a relative path): its
    embedded worker exited three times with a traceback and was given up, while the operation
    PersonaliseAvatar had accepted stayed QUEUED - a client waiting on it waited for ever. A worker
    that cannot start now ends what is queued FAILED (FAILED_PRECONDITION, with why); a checkpoint
    that is not there is known at start, without starting a worker."""
    repository = copy_base_models(model_repository, tmp_path / "repo")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    running = ServerThread(
        settings=test_settings(repository, tmp_path / "store", worker="embedded", worker_checkpoint=broken)
    )
    try:
        running.wait_ready()
        with running.client() as c:
            c.create_avatar("waiting", [PORTRAIT], consent=CONSENT)
            done = c.personalise("waiting", steps=2, wait=True, timeout=120)  # returned: the wait ended
            assert operation_error(done).startswith(
                "FAILED_PRECONDITION: no worker can run it: the embedded worker exited (code 1) 3 times"
            ), operation_error(done)
            with pytest.raises(grpc.RpcError) as refused:
                c.personalise("waiting", steps=2)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        running.stop()

    missing = tmp_path / "elsewhere" / "talkinghead-small.pt"
    running = ServerThread(
        settings=test_settings(repository, tmp_path / "store", worker="embedded", worker_checkpoint=missing)
    )
    try:
        running.wait_ready()
        with running.client() as c:
            with pytest.raises(grpc.RpcError) as refused:
                c.personalise("waiting", steps=2)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert refused.value.details() == (
                "personalisation is not available on this server: the worker's checkpoint "
                f"{missing} is not there (TALKINGHEAD_WORKER_CHECKPOINT)"
            )
        assert running.server.worker is None
    finally:
        running.stop()


def test_a_job_the_queue_folder_cannot_take_leaves_no_input_and_old_temp_files_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's record refused (a full disk) after its input was written: the photos' crops
    stayed in <jobs>/<id>.input.npz for good, a delete of the avatar never reaching them
    (helper-81). And a writer killed mid-write left .tmp-* files no sweep removed."""
    from jobs.queue import StoreFull

    jobs = tmp_path / "jobs"
    queue = LocalQueue(root=jobs)

    def full(job: Job) -> None:
        raise StoreFull(28, "the job directory is full")

    monkeypatch.setattr(queue, "_write", full)
    with pytest.raises(StoreFull):
        queue.submit(Job(id="a" * 16, kind=PERSONALISE, avatar_id="mona", steps=3), b"crops", max_active=4)
    assert not list(jobs.glob("*.input.npz"))
    monkeypatch.undo()
    stale, fresh = jobs / ".tmp-killed", jobs / ".tmp-writing"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    queue.submit(Job(id="b" * 16, kind=PERSONALISE, avatar_id="mona", steps=3), b"crops", max_active=4)
    assert not stale.exists() and fresh.exists()
