"""The personalisation worker's /metrics (worker/metrics.py, `talkinghead worker --metrics-port`):
what a real worker process exports after real jobs on a real Redis - one that succeeds (2
fine-tuning steps, exported, published), one that fails - and once that Redis is gone; and a
port already taken."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from export.repository import python_files
from jobs.record import FAILED, SUCCEEDED
from jobs.redis_queue import RedisQueue, connect
from tests import test_worker_jobs as worker_jobs
from tests.redis_fixtures import RedisServer, free_port
from tests.service_fixtures import *  # noqa: F403
from tests.test_worker_jobs import CHECKPOINT, JOB_S, REPO, START_S, _job, _stop, _until, _worker

# the worker tests' fixtures: the demo portrait as a job's input, the checkpoint's model id, a
# model repository with the base models
photos, model_id, repo = worker_jobs.photos, worker_jobs.model_id, worker_jobs.repo

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples | None:
    """Every sample of http://127.0.0.1:port/metrics: (name, labels) -> value; None: no answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def test_a_worker_exports_its_jobs_steps_and_whether_it_reaches_its_queue(
    tmp_path: Path, repo: Path, photos: bytes, model_id: str
) -> None:
    """A job that succeeds: counted succeeded, its stages observed once each, 2 fine-tuning steps,
    no job running after it, the queue up with a claim poll seconds ago. A job made with another
    model: counted failed, its time observed up to where it failed (before, a failed job's stages
    were not observed at all). Redis stopped: the queue gauge turns 0 (the worker lives on, retrying)."""
    redis = RedisServer(workdir=tmp_path / "redis")
    port = free_port()
    log = tmp_path / "worker.log"
    # an avatar's generator an older release wrote: its runner and helper are refreshed at start
    older = repo / "generator_olga" / "1"
    older.mkdir(parents=True)
    for name in ("model.onnx", "model.py", "talkinghead_cpus.py"):
        (older / name).write_text("an older release's")
    worker = _worker(log, "--redis-url", redis.url, "--repository", str(repo), "--metrics-port", str(port))
    try:
        _until("/metrics served", lambda: scrape(port) is not None or worker.poll() is not None, START_S, log)
        assert worker.poll() is None, log.read_text()[-2000:]
        _until("the runners refreshed", lambda: "Triton runner written into" in log.read_text(), 60, log)
        for name, source in python_files().items():
            assert (older / name).read_text() == source.read_text(), name
        assert (older / "model.onnx").read_text() == "an older release's"
        assert scrape(port)[("talkinghead_worker_job_running", frozenset())] == 0  # type: ignore[index]
        service = RedisQueue(client=connect(redis.url))
        good = service.submit(_job(model_id, "mia", 2), photos, max_active=2)
        _until("the job ended", lambda: service.get(good.id).done, START_S + JOB_S, log)  # type: ignore[union-attr]
        assert service.get(good.id).state == SUCCEEDED  # type: ignore[union-attr]
        bad = service.submit(_job("another-model", "noa", 2), photos, max_active=2)
        _until("the job ended", lambda: service.get(bad.id).done, JOB_S, log)  # type: ignore[union-attr]
        assert service.get(bad.id).state == FAILED  # type: ignore[union-attr]
        ended_at = time.time()
        _until("a claim poll after it", lambda: _polled_since(port, ended_at), 30, log)

        m = scrape(port)
        assert m is not None
        ended = "talkinghead_worker_jobs_total"
        assert value(m, ended, kind="personalise", outcome="succeeded") == 1
        assert value(m, ended, kind="personalise", outcome="failed") == 1
        for outcome in ("cancelled", "handed_back", "lost"):
            assert value(m, ended, kind="personalise", outcome=outcome) == 0
        assert value(m, ended, kind="remove", outcome="succeeded") == 0
        stages = ("queued", "fine_tuning", "exporting", "loading")
        for outcome, observed in (("succeeded", stages), ("failed", ("queued", "fine_tuning"))):
            for stage in (*stages, "total"):
                count = value(m, "talkinghead_worker_job_stage_seconds_count", outcome=outcome, stage=stage)
                want = 1 if stage in (*observed, "total") else 0
                assert count == want, f"{outcome} {stage}: {count} observations, not {want}"
            # each stage up to the next; the failed job's last one (the model check) up to its end
            total = value(m, "talkinghead_worker_job_stage_seconds_sum", outcome=outcome, stage="total")
            parts = sum(
                value(m, "talkinghead_worker_job_stage_seconds_sum", outcome=outcome, stage=stage)
                for stage in stages
            )
            assert 0 < parts <= total + 1e-6 and parts >= total - 0.05, (outcome, parts, total)
        assert value(m, "talkinghead_worker_job_stage_seconds_count", outcome="cancelled", stage="total") == 0
        assert value(m, "talkinghead_worker_finetune_steps_total") == 2
        assert value(m, "talkinghead_worker_job_running") == 0
        assert value(m, "talkinghead_worker_queue_up") == 1
        assert time.time() - value(m, "talkinghead_worker_last_claim_timestamp_seconds") < 30
        assert value(m, "process_resident_memory_bytes") > 0
        assert any(name == "python_info" for name, _ in m)
        assert value(m, "talkinghead_worker_stuck") == 0
        assert value(m, "talkinghead_worker_seconds_since_progress") < 30  # a claim poll, 1-2 s apart
        assert health(port) == (200, "ok")

        redis.stop()
        _until("the queue seen down", lambda: _queue_up(port) == 0, 60, log)
        assert worker.poll() is None, "the worker lives on, retrying its queue"
        claimed = scrape(port)[("talkinghead_worker_last_claim_timestamp_seconds", frozenset())]  # type: ignore[index]
        time.sleep(2.5)
        assert scrape(port)[("talkinghead_worker_last_claim_timestamp_seconds", frozenset())] == claimed  # type: ignore[index]
    finally:
        _stop(worker)
        if redis.process.poll() is None:
            redis.stop()


def health(port: int) -> tuple[int, str] | None:
    """GET /healthz on the worker's metrics port -> (status, body); None: no answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return reply.status, reply.read().decode().strip()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode().strip()
    except OSError:
        return None


def test_a_worker_stuck_in_a_job_says_so_on_healthz_and_recovers_after_it(
    tmp_path: Path, repo: Path, photos: bytes, model_id: str
) -> None:
    """A Triton that takes the connection and never answers holds the worker in its job's load
    (the heartbeat thread goes on holding the job): with --stuck-after 1, /healthz answers 503
    naming the job, its stage and how long - what the chart's liveness probe restarts the pod on -
    and talkinghead_worker_stuck is 1. When the call's deadline (--triton-timeout) ends the job,
    the worker polls for jobs again and /healthz is 200 again. Idle, it stays 200: a claim poll
    is allowed 120 s, not --stuck-after."""
    redis = RedisServer(workdir=tmp_path / "redis")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (the kernel does) and never says a word
    port = free_port()
    log = tmp_path / "worker.log"
    worker = _worker(
        log,
        *("--redis-url", redis.url, "--repository", str(repo), "--metrics-port", str(port)),
        *("--stuck-after", "1", "--triton-timeout", "6"),
        *("--triton-url", f"127.0.0.1:{silent.getsockname()[1]}"),
    )
    try:
        _until("/metrics served", lambda: health(port) is not None or worker.poll() is not None, START_S, log)
        _until("polling for jobs", lambda: ", queue redis://" in log.read_text(), START_S, log)
        time.sleep(2.5)  # idle for longer than --stuck-after: still alive
        assert health(port) == (200, "ok")
        service = RedisQueue(client=connect(redis.url))
        job = service.submit(_job(model_id, "mia", 2), photos, max_active=2)
        said: list[str] = []

        def stuck_in_the_load() -> bool:
            answer = health(port)
            if answer is not None and answer[0] == 503:
                said.append(answer[1])
            return any("loading its generator into Triton" in text for text in said)

        _until("503 naming the load", stuck_in_the_load, START_S + JOB_S, log)
        text = said[-1]
        assert text.startswith(f"stuck: job {job.id}: loading its generator into Triton, no progress for ")
        assert text.endswith("(allowed 1 s)")
        assert value(scrape(port), "talkinghead_worker_stuck") == 1  # type: ignore[arg-type]
        _until("the job ended", lambda: service.get(job.id).done, 120, log)  # type: ignore[union-attr]
        assert service.get(job.id).state == FAILED  # type: ignore[union-attr]
        _until("alive again", lambda: health(port) == (200, "ok"), 30, log)
        assert value(scrape(port), "talkinghead_worker_stuck") == 0  # type: ignore[arg-type]
    finally:
        _stop(worker)
        silent.close()
        redis.stop()


def _polled_since(port: int, since: float) -> bool:
    m = scrape(port)
    return m is not None and m[("talkinghead_worker_last_claim_timestamp_seconds", frozenset())] > since


def _queue_up(port: int) -> float | None:
    m = scrape(port)
    return None if m is None else m[("talkinghead_worker_queue_up", frozenset())]


def test_a_metrics_port_already_taken_ends_the_worker_with_status_2_naming_it(tmp_path: Path) -> None:
    """Not a traceback: one line naming the address and port, exit status 2, before the
    checkpoint is loaded or a queue is read, and before PyTorch and the training code are imported
    (python -X importtime lists every import; before, torch was among them: ~2 s)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-X", "importtime", "-m", "talkinghead.cli", "worker"]
        cmd += [
            "--jobs",
            str(tmp_path / "jobs"),
            "--checkpoint",
            str(CHECKPOINT),
            "--metrics-port",
            str(port),
        ]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=START_S)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert errors == [f"talkinghead worker: cannot bind metrics to 127.0.0.1:{port}: Address already in use"]
    imported = {
        line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")
    }
    assert "worker.metrics" in imported  # (the list is read)
    assert not {"torch", "training", "onnx"} & imported, sorted({"torch", "training", "onnx"} & imported)
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "jobs").exists(), "it stopped before it opened the queue"


def worker_refusal(tmp_path: Path, *args: str) -> tuple[int, list[str], set[str]]:
    """`talkinghead worker --jobs <tmp>/jobs ARGS` under -X importtime: (status, its stderr lines
    but the import times, the modules it imported)."""
    cmd = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "talkinghead.cli",
        "worker",
        "--jobs",
        str(tmp_path / "jobs"),
    ]
    done = subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=START_S)
    lines = done.stderr.splitlines()
    imported = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    return done.returncode, [line for line in lines if not line.startswith("import time:")], imported


def test_an_avatar_store_that_is_not_there_ends_the_worker_before_it_makes_its_queue(
    tmp_path: Path,
) -> None:
    """A mistyped --avatars is one line and status 1, before PyTorch is imported and before the
    job directory is made (it made var/jobs, then refused)."""
    missing = tmp_path / "avatarz"
    status, errors, imported = worker_refusal(
        tmp_path, "--avatars", str(missing), "--checkpoint", str(CHECKPOINT)
    )
    assert status == 1, errors
    assert errors == [
        f"talkinghead worker: --avatars {missing}: no such directory (the service's avatar store)"
    ]
    assert "torch" not in imported
    assert not (tmp_path / "jobs").exists(), "it stopped before it opened the queue"


def test_a_checkpoint_that_is_not_there_ends_the_worker_in_one_line(tmp_path: Path) -> None:
    """A worker run from another folder than the checkout (--checkpoint's default is relative)
    loaded PyTorch and the queue, then died in a traceback."""
    missing = tmp_path / "talkinghead-small.pt"
    status, errors, imported = worker_refusal(tmp_path, "--checkpoint", str(missing))
    assert status == 1, errors
    assert errors == [f"talkinghead worker: --checkpoint {missing}: no such file (the model it fine-tunes)"]
    assert "torch" not in imported
    assert not (tmp_path / "jobs").exists()


def test_a_job_that_ended_without_succeeding_has_its_time_up_to_where_it_stopped() -> None:
    """Stages of a personalisation cancelled while fine-tuning, one failed while exporting and one
    ended with a generator an earlier attempt published (no fine-tuning): each stage up to the
    next, the last one begun up to the end; a removal adds none."""
    from jobs.record import CANCELLED, PERSONALISE, REMOVE, Job
    from worker.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    t = 1000.0

    def ended(name: str, kind: str, state: str, **times: float) -> Job:
        return Job(id=name * 16, kind=kind, avatar_id=name, state=state, create_time=t, **times)

    jobs = [
        ended("a", PERSONALISE, CANCELLED, start_time=t + 2, end_time=t + 9),
        ended("b", PERSONALISE, FAILED, start_time=t + 1, export_time=t + 30, end_time=t + 34),
        ended("c", PERSONALISE, SUCCEEDED, start_time=t + 1, load_time=t + 2, end_time=t + 5),
        ended("d", REMOVE, SUCCEEDED, start_time=t + 1, end_time=t + 2),
    ]
    for job in jobs:
        metrics.on_end(job)
    sums = {
        (s.labels["outcome"], s.labels["stage"]): s.value
        for family in metrics.registry.collect()
        if family.name == "talkinghead_worker_job_stage_seconds"
        for s in family.samples
        if s.name.endswith("_sum") and s.value
    }
    assert sums == {
        ("cancelled", "queued"): 2.0,
        ("cancelled", "fine_tuning"): 7.0,
        ("cancelled", "total"): 9.0,
        ("failed", "queued"): 1.0,
        ("failed", "fine_tuning"): 29.0,
        ("failed", "exporting"): 4.0,
        ("failed", "total"): 34.0,
        ("succeeded", "queued"): 1.0,
        ("succeeded", "loading"): 3.0,
        ("succeeded", "total"): 5.0,
    }


def test_an_idle_worker_still_answers_its_scrapes_at_normal_priority(tmp_path: Path) -> None:
    """`--cpu-scheduling idle` put every thread under SCHED_IDLE, the /metrics server's too: on
    busy cores it answered no scrape within Prometheus' timeout (the local stack's worker target
    down 9 scrapes of 21, TalkingheadTargetDown pending), and an idle thread cannot be raised back
    unprivileged. The server's thread keeps its policy; the rest (fine-tuning) is idle."""
    port = free_port()
    log = tmp_path / "worker.log"
    worker = _worker(
        log, "--jobs", str(tmp_path / "jobs"), "--cpu-scheduling", "idle", "--metrics-port", str(port)
    )
    try:
        _until("CPU scheduling set", lambda: "CPU scheduling: idle" in log.read_text(), START_S, log)
        _until("/metrics served", lambda: scrape(port) is not None, START_S, log)
        policies = {}
        for task in Path(f"/proc/{worker.pid}/task").iterdir():
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                policies[int(task.name)] = os.sched_getscheduler(int(task.name))
        assert policies[worker.pid] == os.SCHED_IDLE  # the main thread: the fine-tuning
        assert os.SCHED_OTHER in policies.values(), policies  # the metrics server's
    finally:
        _stop(worker)
