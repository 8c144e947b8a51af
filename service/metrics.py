"""Prometheus metrics of one server instance (own registry, so tests can run several servers).

Names follow Prometheus conventions: base units (seconds, bytes), `_total` for counters.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, Metric

from facekit import metrics_http, procstat
from service.auth import REFUSAL_REASONS

# Per-frame stages: 0.5 ms .. 60 s. The top finite bucket bounds what histogram_quantile can say:
# it reaches the largest latency budget settings allow (60 s), or TalkingheadLatencyHigh, whose
# threshold is the budget, could never fire for a budget at or above it.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# talkinghead_backend_not_ready_total's `reason`, talkinghead_backend_errors_total's labels
BACKEND_NOT_READY = ("stalled", "unavailable")
BACKEND_OPERATIONS, BACKEND_ERRORS = ("embed", "generate"), ("unavailable", "error")
STAGES = ("decode", "landmarks", "rasterize", "inference", "encode", "end_to_end")
# Why a frame was dropped (talkinghead_frames_dropped_total's `reason`): its stream's queue was full
# under DROP_OLDEST, it could not be generated within the live latency budget, or its tenant's
# frames-per-second quota had no room (live streams).
DROPPED_OVERFLOW, DROPPED_LATE, DROPPED_QUOTA = "overflow", "late", "quota"
# talkinghead_frame_seconds' `stream`: a live (DROP_OLDEST) stream's frame, held to the latency
# budget, or an offline (BLOCK) stream's, which may wait for capacity on purpose.
LIVE, OFFLINE = "live", "offline"
# talkinghead_personalisation_jobs' `state`.
QUEUED, RUNNING = "queued", "running"


# Thread name prefix of the threads that call the in-process engine (service/backends/onnxruntime.py):
# their CPU is the engine's (under ONNX Runtime in lanes of one thread, the inference itself).
ENGINE_CALLS = "engine-call"


class ThreadCpu:
    """`talkinghead_cpu_seconds_total` by `threads`: this process's CPU split between the service's
    own work (its Python threads: the event loop reading, drawing, warping, marking, encoding and
    writing; rendering, storage, detection) and the engine (the threads that call the in-process
    engine, the engine's own threads, and gRPC's native threads, which take little). With
    in-process inference on CPU the engine shares the cores with the service's work: this says
    what the service takes from it. Read from /proc at each scrape; nothing off Linux."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[int, float] = {}  # live service thread -> its CPU seconds at the last read
        self._ended = 0.0  # CPU seconds of service threads gone since (as last read)
        self._engine = 0.0  # as last reported

    def service_seconds(self) -> float:
        with self._lock:
            now: dict[int, float] = {}
            for thread in threading.enumerate():
                if thread.native_id is not None and not thread.name.startswith(ENGINE_CALLS):
                    cpu = procstat.cpu_seconds("self", thread.native_id)
                    if cpu is not None:
                        now[thread.native_id] = cpu
            for tid, cpu in self._seen.items():
                if now.get(tid, -1.0) < cpu:  # ended (or its id reused by a newer thread)
                    self._ended += cpu
            self._seen = now
            return self._ended + sum(now.values())

    def collect(self) -> Iterator[Metric]:
        service = self.service_seconds()  # first: the process's total, read after, includes it
        total = procstat.cpu_seconds("self")
        if total is None:
            return
        with self._lock:  # the threads run between the two reads: a counter never goes back
            self._engine = engine = max(self._engine, total - service)
        family = CounterMetricFamily(
            "talkinghead_cpu_seconds",
            "CPU seconds of this process: service (its own work on its Python threads) and engine "
            "(the in-process engine's threads and those calling it, gRPC's native threads; CPU of a "
            "service thread that ended after the last scrape is counted here)",
            labels=["threads"],
        )
        family.add_metric(["service"], service)
        family.add_metric(["engine"], engine)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # process_* (resident memory, CPU, open files, start time) and python_info, as a Python
        # service's default registry has them: a memory limit is sized and watched by them
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.stage_seconds = Histogram(
            "talkinghead_stage_seconds",
            "Time per stage: decode/landmarks (driving images), rasterize, inference (per batch), "
            "encode, end_to_end (request read to reply handed to gRPC), per frame",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.frame_seconds = Histogram(
            "talkinghead_frame_seconds",
            "A frame's request read to its reply handed to gRPC (the end_to_end stage), by stream: "
            "live (DROP_OLDEST, held to the latency budget) or offline (BLOCK, may wait for capacity)",
            ["stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "talkinghead_queue_seconds",
            "Time a frame waited in its stream's queue and the batcher before the generator took it",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.frames_received = Counter(
            "talkinghead_frames_received_total", "Driving frames received", ["kind"], registry=r
        )
        self.frames_sent = Counter("talkinghead_frames_sent_total", "Generated frames sent", registry=r)
        self.frames_dropped = Counter(
            "talkinghead_frames_dropped_total",
            "Driving frames discarded unanswered, by reason: overflow (the stream's queue was full under "
            "DROP_OLDEST), late (not possible within the live latency budget), quota (the tenant's fps)",
            ["reason"],
            registry=r,
        )
        self.active_streams = Gauge(
            "talkinghead_active_streams",
            "Open Animate streams, by stream: live (DROP_OLDEST, admitted against the capacity) or "
            "offline (BLOCK)",
            ["stream"],
            registry=r,
        )
        self.streams_total = Counter(
            "talkinghead_streams_total",
            "Animate calls ended, by gRPC status code: every call, those refused at open included "
            "(talkinghead_rpcs_total's Animate series)",
            ["code"],
            registry=r,
        )
        self.rpcs_total = Counter(
            "talkinghead_rpcs_total",
            "gRPC calls ended, by method (service/method of the proto, `other` for an unknown one) and "
            "gRPC status code; refusals for credentials included",
            ["method", "code"],
            registry=r,
        )
        self.batch_size = Histogram(
            "talkinghead_batch_size",
            "Frames per generator call",
            ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.cache_entries = Gauge("talkinghead_cache_entries", "Avatars in the AdaIN cache", registry=r)
        self.cache_bytes = Gauge("talkinghead_cache_bytes", "Bytes held by the AdaIN cache", registry=r)
        self.cache_hits = Counter("talkinghead_cache_hits_total", "AdaIN cache hits", registry=r)
        self.cache_misses = Counter("talkinghead_cache_misses_total", "AdaIN cache misses", registry=r)
        self.backend_errors = Counter(
            "talkinghead_backend_errors_total",
            "Failed model calls, by operation (embed, generate) and kind (unavailable, error)",
            ["operation", "kind"],
            registry=r,
        )
        self.personalised_loaded = Gauge(
            "talkinghead_personalised_generators_loaded",
            "Personalised generators this replica has loaded or, on Triton, uses (at most "
            "TALKINGHEAD_MAX_PERSONALISED_LOADED, more only while all are in use)",
            registry=r,
        )
        self.backend_ready = Gauge(
            "talkinghead_backend_ready", "1 when the model backend can serve, else 0", registry=r
        )
        self.triton_ready = Gauge(
            "talkinghead_triton_ready",
            "Per Triton behind TALKINGHEAD_TRITON_URL (a name or a list: service/backends/tritons.py), "
            "by `address` (address:port): 1 while this replica can use it (the models loaded, "
            "answering, no call stalled), else 0; only the Tritons the name resolves to now. A single "
            "Triton at an address literal (a sidecar) exports none: talkinghead_backend_ready is it",
            ["address"],
            registry=r,
        )
        self.backend_not_ready = Counter(
            "talkinghead_backend_not_ready_total",
            "Times the backend went from ready to not ready (health NOT_SERVING), by reason: stalled "
            "(a call in flight past its stall threshold), unavailable (not loaded, server away)",
            ["reason"],
            registry=r,
        )
        self.storage_up = Gauge(
            "talkinghead_storage_up",
            "1 while the server's storage (Redis, or the avatar directory) answers, else 0: probed every "
            "second, and 0 at once when a call finds it unreachable",
            registry=r,
        )
        self.events_live = Gauge(
            "talkinghead_avatar_events_live",
            "1 while the avatar events are followed (the Redis subscription confirmed live; always 1 "
            "without Redis), else 0: cached avatars are not trusted then",
            registry=r,
        )
        self.personalisation_jobs = Gauge(
            "talkinghead_personalisation_jobs",
            "Personalisations in the job queue (every replica's: the queue is shared) by state: queued "
            "(no worker has taken it) or running (as the queue records it: a job whose worker died "
            "counts until another worker takes it over); read every few seconds, NaN while the queue "
            "cannot be read",
            ["state"],
            registry=r,
        )
        self.oldest_queued = Gauge(
            "talkinghead_personalisation_oldest_queued_seconds",
            "How long the oldest queued personalisation has waited since it was started (0: none "
            "queued; NaN while the queue cannot be read)",
            registry=r,
        )
        self.oldest_queued.set_function(self._waited)
        self.worker_restarts = Counter(
            "talkinghead_embedded_worker_restarts_total",
            "Restarts of the embedded personalisation worker (service/local_worker.py) by reason: "
            "exited (it died), stuck (killed: its job made no progress for "
            "TALKINGHEAD_WORKER_STUCK_AFTER s, time waiting for a CPU not counted); only on a "
            "server that runs one",
            ["reason"],
            registry=r,
        )
        self.avatars_created = Counter("talkinghead_avatars_created_total", "Avatars created", registry=r)
        self.audit_failures = Counter(
            "talkinghead_audit_write_failures_total",
            "Audit events, and the intents written ahead of a create, replace or delete, that could not "
            "be written",
            registry=r,
        )
        self.avatar_events = Histogram(
            "talkinghead_avatar_event_delay_seconds",
            "From an avatar event's sending (changed, deleted, personalised, unpersonalised) to this "
            "replica acting on it",
            ["event"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tenant_streams = Gauge(
            "talkinghead_tenant_streams", "Open Animate streams per tenant", ["tenant"], registry=r
        )
        self.tenant_frames = Counter(
            "talkinghead_tenant_frames_total", "Driving frames received per tenant", ["tenant"], registry=r
        )
        self.quota_refusals = Counter(
            "talkinghead_quota_refusals_total",
            "Calls refused, or frames dropped (live streams) or held back (blocking streams, once a frame) "
            "by a tenant quota (streams, fps, creates_per_minute, creates_in_flight, avatars, "
            "personalisations)",
            ["tenant", "quota"],
            registry=r,
        )
        self.capacity_fps = Gauge(
            "talkinghead_capacity_fps",
            "Frames per second the backend delivers within the live latency budget (measured)",
            registry=r,
        )
        self.committed_fps = Gauge(
            "talkinghead_committed_fps", "Frames per second reserved by admitted live streams", registry=r
        )
        self.admission_refusals = Counter(
            "talkinghead_admission_refusals_total",
            "Live streams refused because the measured capacity could not serve them",
            registry=r,
        )
        self.auth_failures = Counter(
            "talkinghead_auth_failures_total",
            "Calls refused UNAUTHENTICATED or PERMISSION_DENIED for their credentials, and open "
            "streams ended because theirs were revoked, by reason: "
            "missing, malformed, unknown_key, wrong_secret, revoked_key, bad_cert, unbound_cert, "
            "revoked_cert, forbidden (service/auth.py)",
            ["reason"],
            registry=r,
        )
        r.register(ThreadCpu())
        # Every series exported from the start; the per-frame paths use these children, not
        # .labels() (a lock and a dict lookup each, seven a frame).
        self.stage = {stage: self.stage_seconds.labels(stage) for stage in STAGES}
        self.frame = {stream: self.frame_seconds.labels(stream) for stream in (LIVE, OFFLINE)}
        self.open_streams = {stream: self.active_streams.labels(stream) for stream in (LIVE, OFFLINE)}
        self.received = {kind: self.frames_received.labels(kind) for kind in ("landmarks", "image")}
        self.batch_sizes = {model: self.batch_size.labels(model) for model in ("shared", "personalised")}
        reasons = (DROPPED_OVERFLOW, DROPPED_LATE, DROPPED_QUOTA)
        self.dropped = {reason: self.frames_dropped.labels(reason) for reason in reasons}
        self.auth_refusals = {reason: self.auth_failures.labels(reason) for reason in REFUSAL_REASONS}
        # (what alerts count with increase(), which leaves out the step of a series appearing at 1)
        for reason in BACKEND_NOT_READY:
            self.backend_not_ready.labels(reason)
        for operation in BACKEND_OPERATIONS:
            for kind in BACKEND_ERRORS:
                self.backend_errors.labels(operation, kind)
        self._tritons: set[str] = set()  # the addresses talkinghead_triton_ready has a series of
        self.jobs = {state: self.personalisation_jobs.labels(state) for state in (QUEUED, RUNNING)}
        self._oldest_queued: float | None = None  # its job's create_time (time.time()); NaN: unknown

    def on_drop(self, reason: str) -> None:
        self.dropped[reason].inc()

    def on_auth_refusal(self, reason: str) -> None:
        self.auth_refusals[reason].inc()

    def on_tritons(self, readiness: dict[str, bool]) -> None:
        """talkinghead_triton_ready: one series per Triton in `readiness` (address -> serves), none
        for an address no longer there (addresses are pods: few, but they change)."""
        for address in self._tritons - readiness.keys():
            self.triton_ready.remove(address)
        for address, ready in readiness.items():
            self.triton_ready.labels(address).set(1 if ready else 0)
        self._tritons = set(readiness)

    def on_jobs(self, queued: int, running: int, oldest_queued: float | None) -> None:
        """The job queue as last read: its personalisations queued and running, and the oldest
        queued one's create_time (None: none queued)."""
        self.jobs[QUEUED].set(queued)
        self.jobs[RUNNING].set(running)
        self._oldest_queued = oldest_queued

    def on_jobs_unknown(self) -> None:
        """The job queue could not be read: NaN, not the last figures (no alert compares true)."""
        for child in self.jobs.values():
            child.set(math.nan)
        self._oldest_queued = math.nan

    def _waited(self) -> float:
        oldest = self._oldest_queued  # (read once: the event loop replaces it meanwhile)
        if oldest is None or math.isnan(oldest):
            return 0.0 if oldest is None else math.nan
        return max(0.0, time.time() - oldest)

    def on_cache(self, entries: int, size: int, hit: bool | None) -> None:
        self.cache_entries.set(entries)
        self.cache_bytes.set(size)
        if hit is True:
            self.cache_hits.inc()
        elif hit is False:
            self.cache_misses.inc()

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Start the /metrics HTTP server in a daemon thread -> (server, bound port)."""
        server, _thread = metrics_http.serve(host, port, self.registry)
        return server, int(server.server_address[1])
