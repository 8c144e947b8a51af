"""Prometheus metrics of one personalisation worker (own registry, so tests can run several).

Served over HTTP only when the worker is given --metrics-port (worker/command.py): off by default,
so the embedded worker `talkinghead serve` starts exports nothing. The server exports the queue's
census (talkinghead_personalisation_jobs); these say what this worker did with the jobs it took,
where their time went, and whether it reaches its queue. Names follow Prometheus conventions, as
service/metrics.py: base units (seconds), `_total` for counters. No torch here.
"""

from __future__ import annotations

import math
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from facekit import metrics_http
from jobs.record import CANCELLED, FAILED, PERSONALISE, REMOVE, SUCCEEDED, Job
from worker.liveness import Liveness

# talkinghead_worker_jobs_total's `outcome`: the job's end as this worker wrote it (succeeded,
# failed, cancelled), handed back to the queue at a stop (SIGTERM: QUEUED again, its attempt not
# counted), or lost (taken over by another worker after this one fell silent: it ends it).
HANDED_BACK, LOST = "handed_back", "lost"
OUTCOMES = {SUCCEEDED: "succeeded", FAILED: "failed", CANCELLED: "cancelled"}
KINDS = (PERSONALISE, REMOVE)
# talkinghead_worker_job_stage_seconds' `stage`, from the job record's timings (jobs/record.py):
# queued (created -> this attempt's claim), fine_tuning (claim -> export began: the input read,
# the model set up, every step), exporting (the ONNX export into the repository), loading (into
# every Triton, and the end written), total (created -> ended).
STAGES = ("queued", "fine_tuning", "exporting", "loading", "total")
# A personalisation: seconds (a 2-step job on a GPU, the export) to an hour (400 steps on a CPU).
JOB_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.server_thread = 0  # the /metrics server's native thread id, once `serve` started it
        # process_* (resident memory, CPU, open files, start time) and python_info, as the server's:
        # a worker's memory limit (PyTorch, the checkpoint, a fine-tuning) is sized and watched by them
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.jobs_total = Counter(
            "talkinghead_worker_jobs_total",
            "Jobs this worker is done with, by kind (personalise, remove) and outcome: succeeded, "
            "failed, cancelled (the end it wrote), handed_back (the worker stopping: QUEUED again, "
            "its attempt not counted) or lost (taken over by another worker, which ends it)",
            ["kind", "outcome"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "talkinghead_worker_job_stage_seconds",
            "Time of each personalisation this worker ended, by outcome (succeeded, failed, "
            "cancelled) and stage: queued (created to this attempt's claim), fine_tuning (claim to "
            "export: input, set-up, every step), exporting (ONNX into the repository), loading (into "
            "every Triton, and the end written), total (created to ended); a job failed or cancelled "
            "has the stages it began, the last up to its end",
            ["outcome", "stage"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.finetune_steps = Counter(
            "talkinghead_worker_finetune_steps_total", "Fine-tuning steps this worker has done", registry=r
        )
        self.job_running = Gauge(
            "talkinghead_worker_job_running",
            "1 while this worker runs a job it claimed (fine-tuning, exporting, loading, removing), else 0",
            registry=r,
        )
        self.queue_up = Gauge(
            "talkinghead_worker_queue_up",
            "1 when this worker's last call to its job queue (a claim poll, a running job's heartbeat) "
            "succeeded, 0 when it failed (Redis or the job directory unreachable; retried with a "
            "growing wait, up to 30 s); NaN before the first",
            registry=r,
        )
        self.last_claim = Gauge(
            "talkinghead_worker_last_claim_timestamp_seconds",
            "Unix time of this worker's last claim poll that reached the queue, a job found or not (the "
            "worker's start until the first); no poll while it runs a job",
            registry=r,
        )
        self.stuck = Gauge(
            "talkinghead_worker_stuck",
            "1 while the worker's main thread has gone without progress for longer than what it is "
            "doing allows (/healthz answers 503; the liveness probe restarts it), else 0",
            registry=r,
        )
        self.since_progress = Gauge(
            "talkinghead_worker_seconds_since_progress",
            "Seconds since the worker's main thread last made progress (a claim poll, a fine-tuning "
            "step, a stage of a job begun)",
            registry=r,
        )
        self.queue_up.set(math.nan)
        self.last_claim.set(time.time())
        # every series exported from the start (a rate over a series born mid-window misses its first)
        self.ended = {
            (k, o): self.jobs_total.labels(k, o)
            for k in KINDS
            for o in (*OUTCOMES.values(), HANDED_BACK, LOST)
        }
        self.stage = {
            (outcome, stage): self.stage_seconds.labels(outcome, stage)
            for outcome in OUTCOMES.values()
            for stage in STAGES
        }

    def on_end(self, job: Job, outcome: str | None = None, *, worked: bool = True) -> None:
        """A job this worker is done with: its end written (outcome from its state), or `outcome`.
        A personalisation it ended adds its stages (those its record has times for: one ended with
        the generator an earlier attempt published did not fine-tune): each up to the next, the
        last one begun up to the end (where a failed or cancelled job stopped). Not `worked` (ended
        at its claim, given up after its attempts): queued and total only."""
        kind = job.kind if job.kind in KINDS else PERSONALISE
        self.ended[kind, outcome or OUTCOMES[job.state]].inc()
        if outcome is not None or job.state not in OUTCOMES or job.kind != PERSONALISE:
            return
        ended = OUTCOMES[job.state]
        began = [job.create_time, job.start_time, job.export_time, job.load_time]
        last = max((i for i, t in enumerate(began) if t), default=-1)
        spans = {"total": (job.create_time, job.end_time)}
        for i, stage in enumerate(STAGES[:4] if worked else ()):
            if began[i] and i < last and began[i + 1]:
                spans[stage] = (began[i], began[i + 1])
            elif i == last and i > 0:  # (queued ends at a claim: a job never claimed was not queued by us)
                spans[stage] = (began[i], job.end_time)
        if not worked:
            spans["queued"] = (job.create_time, job.start_time)
        for stage, (start, end) in spans.items():
            if start and end >= start:
                self.stage[ended, stage].observe(end - start)

    def on_claim(self) -> None:
        """A claim poll that reached the queue."""
        self.queue_up.set(1)
        self.last_claim.set(time.time())

    def on_queue(self, up: bool) -> None:
        self.queue_up.set(1 if up else 0)

    def serve(self, host: str, port: int, liveness: Liveness | None = None) -> tuple[Any, int]:
        """Start the /metrics HTTP server (and, with `liveness`, /healthz) in a daemon thread ->
        (server, bound port). The thread's native id is `server_thread`: it and the threads it
        starts per scrape keep their CPU policy when the worker lowers its own."""
        health = None
        if liveness is not None:
            health = liveness.stuck
            self.stuck.set_function(lambda: float(liveness.stuck() is not None))
            self.since_progress.set_function(liveness.seconds_since)
        server, thread = metrics_http.serve(host, port, self.registry, health)
        self.server_thread = int(thread.native_id or 0)
        return server, int(server.server_address[1])
