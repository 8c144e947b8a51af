"""The personalisation worker's life around a job: a job directory or Redis that fails to take its
end, a graceful stop in the middle of fine-tuning, the time-left estimate it feeds, a cancel
that comes after the last progress write, and the temp folders of killed exports. Real worker
processes (`talkinghead worker`), a real tmpfs and a real Redis where the behaviour depends on
them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis as redis_py

from jobs import keys
from jobs.local import LocalQueue
from jobs.queue import pack_input
from jobs.record import (
    CANCELLED,
    CODE_CANCELLED,
    CODE_UNAVAILABLE,
    EXPORT_ESTIMATE_S,
    FAILED,
    PERSONALISE,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    new_id,
)
from jobs.redis_queue import RedisQueue, connect
from tests.redis_fixtures import *  # noqa: F403
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import (
    PORTRAIT,
    REPO,
    copy_base_models,
    fake_generator,
    fill,
    tmpfs,
    worker_context,
)

CHECKPOINT = REPO / "models/talkinghead-small.pt"
START_S = 300.0  # a worker process starting (PyTorch, the checkpoint) on a loaded 2-core machine
JOB_S = 600.0  # a short job's whole run there


@pytest.fixture(scope="module")
def photos() -> bytes:
    """The demo portrait as a job's packed input (one face crop at the model's size)."""
    from PIL import Image

    from facekit.detect import make_detector
    from training.finetune import prepare_images

    portrait = np.asarray(Image.open(PORTRAIT).convert("RGB"))
    frames, points = prepare_images([portrait], ["portrait"], make_detector("dlib"), 128)
    return pack_input(frames, points)


@pytest.fixture(scope="module")
def model_id() -> str:
    from training import checkpoint
    from worker.jobs_run import model_id_of

    return model_id_of(checkpoint.load(CHECKPOINT))


def _job(model_id: str, avatar_id: str, steps: int) -> Job:
    return Job(id=new_id(), kind=PERSONALISE, avatar_id=avatar_id, model_id=model_id, steps=steps)


def _worker(log: Path, *args: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "talkinghead.cli", "worker", *args, "--checkpoint", str(CHECKPOINT)]
    cmd += ["--threads", "1", "--sweep-interval", "0"]
    with log.open("a") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def _until(what: str, check: object, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s\n{tail}"
        time.sleep(0.1)


@pytest.fixture
def repo(model_repository: Path, tmp_path: Path) -> Path:
    return copy_base_models(model_repository, tmp_path / "repo")


# -- 1. an end the queue cannot take ------------------------------------------------------------------


def test_a_job_directory_full_for_a_while_ends_the_job_once_it_has_room(
    tmp_path: Path, repo: Path, photos: bytes, model_id: str
) -> None:
    """The job directory (a 4 MB tmpfs of its own) fills up while a real worker fine-tunes. The
    progress write fails, so the job fails - but its end could not be written either: it escaped
    the job, the serve loop swallowed it, and the job stayed RUNNING and held (never cancelled,
    its avatar refused AvatarBusy, counted against max_queue) until the worker restarted. Now the
    worker holds that end and writes it once there is room: FAILED UNAVAILABLE, naming the job
    queue's storage (it said "the model repository is full"), and the avatar can be personalised
    again - by the same worker, still running."""
    with tmpfs(tmp_path / "jobs", "4m") as jobs:
        queue = LocalQueue(root=jobs)
        job = queue.submit(_job(model_id, "alice", 2000), photos, max_active=2)
        log = tmp_path / "worker.log"
        worker = _worker(log, "--jobs", str(jobs), "--repository", str(repo))
        try:
            _until("the job fine-tuning", lambda: queue.get(job.id).step >= 1, START_S, log)  # type: ignore[union-attr]
            filler = fill(jobs / ".filler")
            _until(
                "the worker failing to write the end",
                lambda: "cannot write its end" in log.read_text(),
                JOB_S,
                log,
            )
            held = queue.get(job.id)
            assert held is not None and held.state == RUNNING, "nothing can be written while it is full"
            filler.unlink()
            _until("the job ended", lambda: queue.get(job.id).done, JOB_S, log)  # type: ignore[union-attr]
            done = queue.get(job.id)
            assert done is not None and done.state == FAILED and done.error_code == CODE_UNAVAILABLE
            assert done.error == "the job queue's storage is full; personalise again later"
            assert done.attempt == 1 and queue.live() == [] and queue.active("alice") is None
            again = queue.submit(_job(model_id, "alice", 2), photos, max_active=2)
            _until("the next job", lambda: queue.get(again.id).done, JOB_S, log)  # type: ignore[union-attr]
            assert queue.get(again.id).state == SUCCEEDED, log.read_text()[-3000:]  # type: ignore[union-attr]
            assert worker.poll() is None
        finally:
            _stop(worker)


def test_an_end_redis_refuses_is_written_again_and_the_job_not_run_again(
    redis_url: str, tmp_path: Path
) -> None:
    """Redis at its memory limit (a real one: maxmemory) when a job ends: the end was lost with
    the job still held - it ran again, whole, after the claim timed out, spending an attempt. Now
    the worker keeps the end and writes it once Redis takes writes again: ended once, attempt 1,
    and no worker takes it again."""
    from worker.jobs_run import Waiting, run_job

    service = RedisQueue(client=connect(redis_url))
    worker = RedisQueue(client=connect(redis_url), claim_timeout_s=0.5)
    job = service.submit(_job("another-model", "bob", 3), b"input", max_active=2)
    held = worker.claim("w1", wait_s=1)
    assert held is not None and held.id == job.id
    ctx = worker_context(worker, tmp_path / "repo")
    waiting = Waiting(ctx)
    admin = redis_py.Redis.from_url(redis_url)
    admin.config_set("maxmemory", 1)
    try:
        run_job(ctx, held, waiting)  # (the job fails at once: the worker runs another model)
        assert len(waiting) == 1, "its end is kept"
        assert service.get(job.id).state == RUNNING  # type: ignore[union-attr]
    finally:
        admin.config_set("maxmemory", 0)
    deadline = time.monotonic() + 60
    while waiting:
        assert time.monotonic() < deadline, "the end was not written again"
        waiting.check()
        time.sleep(0.1)
    done = service.get(job.id)
    assert done is not None and done.state == FAILED and done.attempt == 1
    assert "this worker fine-tunes m1" in done.error
    time.sleep(0.6)  # past the claim timeout: nothing left to take over
    assert RedisQueue(client=connect(redis_url), claim_timeout_s=0.5).claim("w2", wait_s=0.5) is None
    assert service.active("bob") is None


@pytest.mark.parametrize("then", ["lost", "lost and cancelled", "another job's version"])
def test_a_generator_a_lost_attempt_published_ends_the_job_without_fine_tuning_again(
    then: str, redis_url: str, tmp_path: Path
) -> None:
    """A worker publishes a job's generator (stamped with the job's id) and is lost before the end
    is written (stopped with its end unwritten, or killed). The next attempt took that generator
    back and fine-tuned again (here it would fail: the test's worker has no checkpoint). Now it
    ends the job SUCCEEDED with that generator, on any attempt; a cancel asked meanwhile still
    takes it back and ends the job CANCELLED. A version no attempt of this job stamped is still
    taken back, as before."""
    from worker.jobs_run import run_job

    service = RedisQueue(client=connect(redis_url))
    repo = tmp_path / "repo"
    fake_generator(repo, "hana", 1, created=None)  # an earlier personalisation's
    job = service.submit(_job("m1", "hana", 3), b"input", max_active=2)
    lost = RedisQueue(client=connect(redis_url), claim_timeout_s=0.5)
    held = lost.claim("w1", wait_s=1)
    assert held is not None
    held.published_before = 1  # (as an attempt writes it before fine-tuning)
    assert lost.update(held)
    redis_py.Redis.from_url(redis_url).hset(keys.job(job.id), "attempts", 3)  # (its last allowed one)
    stamped = job.id if then != "another job's version" else new_id()
    fake_generator(repo, "hana", 2, created=None, job=stamped)  # what w1 published before it was lost
    if then == "lost and cancelled":
        assert service.cancel(job.id).cancel_requested  # type: ignore[union-attr]
    time.sleep(0.6)  # w1 is silent: past its claim timeout
    worker = RedisQueue(client=connect(redis_url), claim_timeout_s=0.5)
    taken = worker.claim("w2", wait_s=1)
    assert taken is not None and taken.id == job.id and taken.attempt == 4
    ctx = worker_context(worker, repo)
    run_job(ctx, taken)
    done = service.get(job.id)
    versions = sorted(p.name for p in (repo / "generator_hana").iterdir() if p.name.isdigit())
    assert done is not None and service.active("hana") is None
    if then == "lost":
        assert (done.state, done.model_name, done.model_version, done.step) == (
            SUCCEEDED,
            "generator_hana",
            2,
            3,
        ), done.error
        assert versions == ["1", "2"]
        # its time: queued, then loading (before, read as fine-tuning by the stage metrics)
        observed = {
            s.labels["stage"]
            for family in ctx.metrics.registry.collect()
            if family.name == "talkinghead_worker_job_stage_seconds"
            for s in family.samples
            if s.name.endswith("_count") and s.value and s.labels["outcome"] == "succeeded"
        }
        assert observed == {"queued", "loading", "total"} and done.load_time >= done.start_time > 0
    elif then == "lost and cancelled":
        assert (done.state, done.error_code) == (CANCELLED, CODE_CANCELLED)
        assert versions == ["1"]
    else:
        assert done.state == FAILED and versions == ["1"]


# -- 2. a graceful stop ---------------------------------------------------------------------------------


def test_a_stopped_worker_hands_its_job_back_without_spending_an_attempt(
    tmp_path: Path, repo: Path, photos: bytes, model_id: str
) -> None:
    """SIGTERM (the service's stop, a rolling deploy) while a real worker fine-tunes: it ran the
    job on until the service killed it 10 s later, the job restarted from step 0 and each stop
    counted as one of its 3 attempts - the third stop failed the job ("the worker stopped 3
    times"). Now the worker stops at its next step and hands the job back, QUEUED, attempt 0;
    after three such stops the next worker takes it as its first attempt."""
    jobs = tmp_path / "jobs"
    queue = LocalQueue(root=jobs)
    job = queue.submit(_job(model_id, "carol", 2000), photos, max_active=2)
    for n in range(3):
        log = tmp_path / f"worker{n}.log"
        worker = _worker(log, "--jobs", str(jobs), "--repository", str(repo))
        try:
            _until("the job fine-tuning", lambda: queue.get(job.id).step >= 1, START_S, log)  # type: ignore[union-attr]
            assert queue.get(job.id).attempt == 1  # type: ignore[union-attr]
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the worker still runs 60 s after SIGTERM\n{log.read_text()[-3000:]}")
        finally:
            _stop(worker)
        back = queue.get(job.id)
        assert back is not None and (back.state, back.stage, back.attempt, back.step) == (
            QUEUED,
            "queued",
            0,
            0,
        )
        assert "handed back to the queue" in log.read_text()
    taken = LocalQueue(root=jobs).claim("next", wait_s=1)
    assert taken is not None and taken.id == job.id and taken.attempt == 1


def test_a_worker_stopped_with_an_end_unwritten_leaves_its_result_to_the_next_worker(
    tmp_path: Path, repo: Path, photos: bytes, model_id: str
) -> None:
    """The job directory fills up while a real worker exports a job's generator: the generator is
    published and loaded, but the job's end cannot be written. The worker is stopped (SIGTERM)
    before there is room again. The next worker took the job as lost: it took the generator back
    (the avatar lost it meanwhile), fine-tuned again from step 0 and published another file - or,
    the directory having filled before the last progress write, the job had been failed with its
    generator served. Now the next worker finds the generator this job published and ends the job
    SUCCEEDED with that very file, without fine-tuning again."""
    with tmpfs(tmp_path / "jobs", "4m") as jobs:
        queue = LocalQueue(root=jobs)
        job = queue.submit(_job(model_id, "ivan", 2), photos, max_active=2)
        log = tmp_path / "worker1.log"
        worker = _worker(log, "--jobs", str(jobs), "--repository", str(repo))
        try:
            deadline = time.monotonic() + START_S + JOB_S
            while (now := queue.get(job.id)) is not None and now.stage != "exporting":  # type: ignore[union-attr]
                assert not now.done, f"the job ended before its export\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no export\n{log.read_text()[-3000:]}"
                time.sleep(0.01)
            filler = fill(jobs / ".filler")
            _until("the end not written", lambda: "cannot write its end" in log.read_text(), JOB_S, log)
            model = repo / "generator_ivan" / "1" / "model.onnx"
            assert model.is_file(), "its generator is published"
            published = model.stat()
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the worker still runs 60 s after SIGTERM\n{log.read_text()[-3000:]}")
        finally:
            _stop(worker)
        assert queue.get(job.id).state == RUNNING  # type: ignore[union-attr]
        filler.unlink()
        log = tmp_path / "worker2.log"
        worker = _worker(log, "--jobs", str(jobs), "--repository", str(repo))
        try:
            _until("the job ended", lambda: queue.get(job.id).done, START_S + JOB_S, log)  # type: ignore[union-attr]
        finally:
            _stop(worker)
        done = queue.get(job.id)
        assert done is not None and done.state == SUCCEEDED, log.read_text()[-3000:]
        assert (done.model_name, done.model_version, done.step) == ("generator_ivan", 1, 2)
        assert sorted(p.name for p in model.parent.parent.iterdir() if p.name.isdigit()) == ["1"]
        again = model.stat()
        assert (again.st_ino, again.st_mtime_ns) == (published.st_ino, published.st_mtime_ns), (
            "the generator was taken back and made again"
        )
        assert "exported generator_ivan" not in log.read_text(), "fine-tuned and exported again"
        assert queue.active("ivan") is None


def test_a_stopped_worker_hands_its_redis_job_back_for_the_next_claim(
    tmp_path: Path, repo: Path, photos: bytes, model_id: str, redis_url: str
) -> None:
    """The same with Redis: the job is QUEUED with its attempt not counted, and the next claim
    takes it at once (its stream entry made idle), not after the claim timeout (here 600 s)."""
    service = RedisQueue(client=connect(redis_url))
    job = service.submit(_job(model_id, "dave", 2000), photos, max_active=2)
    log = tmp_path / "worker.log"
    worker = _worker(log, "--redis-url", redis_url, "--repository", str(repo), "--claim-timeout", "600")
    try:
        _until("the job fine-tuning", lambda: service.get(job.id).step >= 1, START_S, log)  # type: ignore[union-attr]
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker still runs 60 s after SIGTERM\n{log.read_text()[-3000:]}")
    finally:
        _stop(worker)
    back = service.get(job.id)
    assert back is not None and (back.state, back.attempt, back.step) == (QUEUED, 0, 0)
    assert service.active("dave") == job.id, "still the avatar's personalisation"
    taken = RedisQueue(client=connect(redis_url), claim_timeout_s=600).claim("next", wait_s=1)
    assert taken is not None and taken.id == job.id and taken.attempt == 1
    assert service.cancel(job.id).cancel_requested  # type: ignore[union-attr]


def test_a_redis_pause_mid_fine_tuning_does_not_fail_the_job(
    tmp_path: Path, repo: Path, photos: bytes, model_id: str, redis_server: object, redis_url: str
) -> None:
    """Redis frozen for 5 s (SIGSTOP: a failover, a pause past the client's 3 s socket timeout)
    while a real worker fine-tunes. Before, the step's progress write raised TimeoutError and the
    job ended FAILED "INTERNAL: internal error: TimeoutError" (helper-76). Now fine-tuning goes on,
    the progress is written again once Redis answers, and the job succeeds in its first attempt."""
    service = RedisQueue(client=connect(redis_url))
    job = service.submit(_job(model_id, "erin", 24), photos, max_active=2)  # steps past the pause
    log = tmp_path / "worker.log"
    worker = _worker(log, "--redis-url", redis_url, "--repository", str(repo))
    process = redis_server.process  # type: ignore[attr-defined]
    try:
        _until("the job fine-tuning", lambda: service.get(job.id).step >= 2, START_S, log)  # type: ignore[union-attr]
        process.send_signal(signal.SIGSTOP)
        try:  # 5 s at least, and until a step's write has met it (a step took over 5 s on busy cores)
            paused = time.monotonic()
            while time.monotonic() - paused < 5 or (
                "progress not written from step" not in log.read_text() and time.monotonic() - paused < 25
            ):
                time.sleep(0.2)
        finally:
            process.send_signal(signal.SIGCONT)
        _until("the job ended", lambda: service.get(job.id).done, JOB_S, log)  # type: ignore[union-attr]
    finally:
        _stop(worker)
    done = service.get(job.id)
    assert done is not None and done.state == SUCCEEDED and done.attempt == 1, (done, log.read_text()[-3000:])
    assert "progress not written from step" in log.read_text()


# -- 3. the time left -----------------------------------------------------------------------------------


def test_the_time_left_uses_the_workers_own_measures() -> None:
    """The estimate added a fixed 20 s of export (it takes 0.5-2.2 s now) and said 0 until step 2.
    The worker's measures from its earlier jobs replace both: its export time, and before this
    job's pace is known its start-up time and time per step. With none (its first job) the export
    counts EXPORT_ESTIMATE_S and the time before step 2 is unknown (0), as the API documents."""
    job = Job(id="0123456789abcdef", kind=PERSONALISE, avatar_id="a", steps=11, state=RUNNING)
    job.start_time = 100.0
    assert job.remaining(now=101.0) == 0.0, "nothing measured yet: unknown"
    job.export_estimate_s, job.start_estimate_s, job.step_estimate_s = 1.5, 3.0, 0.5
    assert job.remaining(now=101.0) == pytest.approx(2.0 + 10 * 0.5 + 1.5)  # start-up left, 10 steps, export
    assert job.remaining(now=110.0) == pytest.approx(10 * 0.5 + 1.5), "start-up overran: not below the steps"
    job.step, job.first_step_time = 1, 104.0
    assert job.remaining(now=106.0) == pytest.approx(5.0 - 2.0 + 1.5)
    job.step = 6  # its own pace now: 5 steps in 10 s
    assert job.remaining(now=114.0) == pytest.approx(5 * 2.0 + 1.5)
    job.step, job.export_time = 11, 120.0
    assert job.remaining(now=121.0) == pytest.approx(0.5)
    job.export_estimate_s = 0.0  # (a record an older worker wrote)
    assert job.remaining(now=121.0) == pytest.approx(EXPORT_ESTIMATE_S - 1.0)


def test_the_worker_writes_its_measured_export_time_into_the_next_job(
    tmp_path: Path, repo: Path, photos: bytes, model_id: str
) -> None:
    """A real worker runs two jobs: the first carries the default export estimate, the second the
    export + load time the worker measured on the first (not 20 s), and its pace."""
    jobs = tmp_path / "jobs"
    queue = LocalQueue(root=jobs)
    first = queue.submit(_job(model_id, "erin", 3), photos, max_active=2)
    log = tmp_path / "worker.log"
    worker = _worker(log, "--jobs", str(jobs), "--repository", str(repo))
    try:
        _until("the first job", lambda: queue.get(first.id).done, START_S + JOB_S, log)  # type: ignore[union-attr]
        second = queue.submit(_job(model_id, "frank", 3), photos, max_active=2)
        _until("the second job", lambda: queue.get(second.id).done, JOB_S, log)  # type: ignore[union-attr]
    finally:
        _stop(worker)
    one, two = queue.get(first.id), queue.get(second.id)
    assert one is not None and two is not None and one.state == two.state == SUCCEEDED, log.read_text()[
        -3000:
    ]
    assert (one.export_estimate_s, one.step_estimate_s, one.start_estimate_s) == (EXPORT_ESTIMATE_S, 0.0, 0.0)
    measured = one.end_time - one.export_time
    assert two.export_estimate_s == pytest.approx(measured, abs=0.2), (two.export_estimate_s, measured)
    assert two.step_estimate_s == pytest.approx((one.export_time - one.first_step_time) / 2, rel=0.01)
    assert two.start_estimate_s == pytest.approx(one.first_step_time - one.start_time, rel=0.01)


# -- 5. a cancel after the last progress write --------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_a_cancel_after_the_last_progress_write_is_not_dropped(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A cancel that came between a job's last progress write (stage loading: its generator is
    published and loaded) and its end used to be dropped: the job SUCCEEDED. The queue now
    refuses that end; the worker takes the version back (the avatar keeps the one it had) and
    ends the job CANCELLED, saying so."""
    from worker import models
    from worker.jobs_run import _end

    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        service, queue = RedisQueue(client=connect(url)), RedisQueue(client=connect(url))
    else:
        service, queue = LocalQueue(root=tmp_path / "jobs"), LocalQueue(root=tmp_path / "jobs")  # type: ignore[assignment]
    repo = tmp_path / "repo"
    fake_generator(repo, "gina", 1, created=None)
    job = service.submit(_job("m1", "gina", 3), b"input", max_active=2)
    held = queue.claim("w", wait_s=1)
    assert held is not None
    written = fake_generator(repo, "gina", 2, created=None) / "2"  # (fake_generator made the folder)
    published = models.Published("generator_gina", 2, written)
    held.stage = "loading"
    assert queue.update(held)
    service.cancel(job.id, "the avatar was deleted")
    _end(
        worker_context(queue, repo),
        held.ended(SUCCEEDED),
        undo=lambda: models.take_back(published, repo, tritons=[]),
    )
    done = service.get(job.id)
    assert done is not None and done.state == CANCELLED and done.error_code == CODE_CANCELLED
    assert done.error.startswith("cancelled as its generator was published (taken back")
    assert done.error.endswith("): the avatar was deleted"), done.error
    assert sorted(p.name for p in (repo / "generator_gina").iterdir() if p.name.isdigit()) == ["1"]
    assert service.active("gina") is None


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_a_cancelled_operation_says_why_whoever_ends_it(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A personalisation cancelled because its avatar was deleted ended "cancelled while queued" or
    "cancelled at step 1 of 3", as one cancelled by CancelOperation: its watcher could not tell
    which. The cancel's reason is kept by the queue for whoever writes the end: the queue itself
    (queued) or the worker (running), and a cancel without one reads as before."""
    from worker.jobs_run import Cancelled, Waiting, _settle

    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        service, queue = RedisQueue(client=connect(url)), RedisQueue(client=connect(url))
    else:
        service, queue = LocalQueue(root=tmp_path / "jobs"), LocalQueue(root=tmp_path / "jobs")  # type: ignore[assignment]
    queued = service.submit(_job("m1", "ida", 3), b"input", max_active=2)
    ended = service.cancel(queued.id, "the avatar was deleted")
    assert ended is not None and ended.error == "cancelled while queued: the avatar was deleted"
    ctx = worker_context(queue, tmp_path / "repo")
    for reason, error in [
        ("the avatar was replaced", "cancelled at step 1 of 3: the avatar was replaced"),
        ("", "cancelled at step 1 of 3"),  # (CancelOperation's)
    ]:
        job = service.submit(_job("m1", "ida", 3), b"input", max_active=2)
        held = queue.claim("w", wait_s=1)
        assert held is not None and held.id == job.id
        asked = service.cancel(job.id, reason)
        assert asked is not None and asked.cancel_requested and not asked.done

        def step_one(held: Job = held) -> bool:  # as the worker's progress callback does
            if not queue.update(held):
                raise Cancelled("cancelled at step 1 of 3")
            return True

        _settle(ctx, held, step_one, Waiting(ctx))
        done = service.get(job.id)
        assert done is not None and (done.state, done.error) == (CANCELLED, error)
        assert service.active("ida") is None


# -- 4. a worker killed while exporting -----------------------------------------------------------------


def test_export_folders_of_killed_workers_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    """A worker killed while exporting left its temp folder (5.6 MB of ONNX for the small model,
    ~150 MB for the paper's) for good, one more each time the embedded worker was restarted. A
    worker starting now removes those whose owner is gone (a real process, killed), and leaves
    one a live worker is exporting into."""
    from worker import models

    code = (
        "import sys, time, tempfile\n"
        f"tempfile.tempdir = {str(tmp_path)!r}\n"
        "from worker.models import export_folder\n"
        "with export_folder() as tmp:\n"
        "    (tmp / 'generator_x.onnx').write_bytes(bytes(1000)); print(tmp, flush=True); time.sleep(600)\n"
    )
    owners = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        killed, live = (Path(p.stdout.readline().strip()) for p in owners)  # type: ignore[union-attr]
        owners[0].kill()
        owners[0].wait()
        assert killed.is_dir() and live.is_dir()
        assert models.sweep_exports(tmp_path) == [killed]
        assert not killed.exists() and (live / "generator_x.onnx").exists()
    finally:
        for owner in owners:
            _stop(owner)  # type: ignore[arg-type]
    assert models.sweep_exports(tmp_path) == [live]


def test_a_job_says_loading_while_its_generator_loads_into_the_tritons(
    tmp_path: Path, repo: Path, photos: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After fine-tuning a job exports its generator, then loads it into every Triton, which takes
    most of that time (2.7 of 3.5 s on 2 cores). A client polling the operation saw "exporting"
    all along; it sees "loading" once the generator is written (the load time kept for the
    worker's metrics). A 2-step job run in this process; the load takes 0.3 s here."""
    from training import checkpoint
    from worker import models
    from worker.jobs_run import model_id_of, run_job, with_progress_every_step

    meta = checkpoint.load(CHECKPOINT)
    queue = LocalQueue(root=tmp_path / "jobs")
    job = queue.submit(_job(model_id_of(meta), "lena", 2), photos, max_active=2)
    seen: list[tuple[str, bool]] = []
    load = models.load_everywhere

    def slow_load(*args: object, **kwargs: object) -> None:
        now = queue.get(job.id)
        assert now is not None
        seen.append((now.stage, now.load_time > now.export_time > 0))
        time.sleep(0.3)
        load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(models, "load_everywhere", slow_load)
    ctx = worker_context(queue, repo, meta=with_progress_every_step(meta), model_id=model_id_of(meta))
    held = queue.claim("w", wait_s=1)
    assert held is not None and held.id == job.id
    run_job(ctx, held)
    done = queue.get(job.id)
    assert seen == [("loading", True)], seen
    assert done is not None and done.state == SUCCEEDED
    assert done.end_time - done.load_time >= 0.3
