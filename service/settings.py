"""Service settings: one frozen object from environment variables, overridden by command-line flags.

Environment variables (the Helm chart sets these; flags of `talkinghead serve` override them):

    TALKINGHEAD_HOST              127.0.0.1        address the gRPC server binds (loopback: 127.x.x.x,
                                                   ::1 or the name `localhost`; any other name or address
                                                   counts as exposed)
    TALKINGHEAD_METRICS_HOST      (the gRPC host)  address the Prometheus /metrics server binds (it
                                                   lists tenant names and their frame counts: e.g.
                                                   127.0.0.1 or a pod-network address keeps it off the
                                                   interfaces clients reach)
    TALKINGHEAD_GRPC_PORT         50051            gRPC port (0 = any free port)
    TALKINGHEAD_METRICS_PORT      8080             Prometheus /metrics port (0 = any free port)
    TALKINGHEAD_BACKEND           onnxruntime      onnxruntime (in-process) | triton
    TALKINGHEAD_ENGINE            auto             in-process engine of the generators: auto (the fastest
                                                   of those allowed, timed at start) | onnxruntime |
                                                   openvino | openvino-bf16 (facekit/engines.py)
    TALKINGHEAD_ENGINE_LANES      0                generator calls run side by side, each on its share
                                                   of the inference threads; 0 = 2 where there are
                                                   2+ threads (facekit/engines.py: more frames/s,
                                                   a lone frame slower)
    TALKINGHEAD_INFERENCE_THREADS 0                ONNX Runtime threads of the in-process backend; 0 = one
                                                   per CPU this process may use: its affinity and its
                                                   cgroup's CPU quota (limits.cpu), not the node's cores
    TALKINGHEAD_TRITON_URL        127.0.0.1:8001   Triton gRPC host:port (backend = triton): an address
                                                   literal is one Triton; a name (a headless Service)
                                                   or a comma-separated list is every Triton behind
                                                   it, resolved again every 15 s, each call on the
                                                   least busy (service/backends/tritons.py)
    TALKINGHEAD_MODEL_REPOSITORY  model_repository Triton-layout model repository (onnxruntime)
    TALKINGHEAD_AVATAR_STORE      var/avatars      directory of stored avatars
    TALKINGHEAD_CACHE_BYTES       67108864         AdaIN-parameter cache bound, bytes
    TALKINGHEAD_MAX_STREAMS       64               concurrent Animate streams; more: RESOURCE_EXHAUSTED
    TALKINGHEAD_MAX_BATCH         16               frames per generator call, 1-256
    TALKINGHEAD_STREAM_IDLE_TIMEOUT 30             seconds an Animate stream may go without a frame or
                                                   keepalive (or without taking a reply) before it
                                                   ends with DEADLINE_EXCEEDED and frees its slot
    TALKINGHEAD_BACKEND_TIMEOUT   5                seconds each model call (generate, embed) may take;
                                                   then it is cut and answered UNAVAILABLE
    TALKINGHEAD_LOG_LEVEL         INFO             DEBUG | INFO | WARNING | ERROR
    TALKINGHEAD_LOG_FORMAT        text             text (a person reads it) | json (one object a line, for
                                                   Loki, Elasticsearch; the embedded worker's too)
    TALKINGHEAD_ACCESS_LOG        1                one line per call as it ends (logger
                                                   talkinghead.access: method, code, duration, peer,
                                                   tenant...; health checks at DEBUG); 0: none
    TALKINGHEAD_TLS_CERT          (unset)          PEM certificate chain; with TLS_KEY serves TLS (the
                                                   files, and TLS_CLIENT_CA, are reread when they change:
                                                   a renewed certificate serves new connections)
    TALKINGHEAD_TLS_KEY           (unset)          PEM private key
    TALKINGHEAD_TLS_TERMINATED_UPSTREAM  0         1: TLS ends in front of this server (a mesh sidecar, a
                                                   TLS-terminating load balancer), so API keys (and
                                                   --production) may be served over plaintext beyond
                                                   loopback; without it, and without TLS_CERT, such a
                                                   server refuses to start
    TALKINGHEAD_REDIS_URL         (unset)          redis://host:port/db: avatars and the personalisation
                                                   queue in Redis, shared by every replica
    TALKINGHEAD_WORKER            embedded         embedded: run a local `talkinghead worker` process
                                                   (without REDIS_URL); external: workers run elsewhere;
                                                   none: personalisation is refused (FAILED_PRECONDITION)
    TALKINGHEAD_JOBS              var/jobs         job directory of the local queue (no REDIS_URL)
    TALKINGHEAD_WORKER_CHECKPOINT models/talkinghead-small.pt  meta checkpoint the embedded worker tunes
    TALKINGHEAD_WORKER_THREADS    1                the embedded worker's PyTorch threads (0: PyTorch's
                                                   default, every core)
    TALKINGHEAD_WORKER_PRIORITY   idle             the embedded worker's claim on the CPU: idle (only
                                                   what streams leave, offline ones included), low
                                                   (a small share beside them), normal (the server's
                                                   own); service/local_worker.py has the figures
    TALKINGHEAD_WORKER_STUCK_AFTER 900             s a step, export or load of the embedded worker's job
                                                   may go without progress before it is killed and
                                                   restarted (0: never), as a worker pod's probe does
    TALKINGHEAD_MAX_QUEUE         16               queued + running personalisations (RESOURCE_EXHAUSTED)
    TALKINGHEAD_MAX_CREATES       4                CreateAvatar calls in flight on this server (each
                                                   holds its photos, up to 64 MiB); a tenant with none
                                                   in flight gets one while there are fewer than twice
                                                   this; more: RESOURCE_EXHAUSTED before the request
                                                   is read
    TALKINGHEAD_MAX_CREATES_PER_TENANT 2           of those, one tenant's
    TALKINGHEAD_API_KEYS          (unset)          key ring of API keys and tenant quotas: a JSON file
                                                   path, or `redis` (in TALKINGHEAD_REDIS_URL); see
                                                   `talkinghead keys` and service/auth.py
    TALKINGHEAD_TLS_CLIENT_CA     (unset)          PEM CA: TLS clients must present a certificate it
                                                   signed (mTLS); its common name is the tenant
    TALKINGHEAD_TLS_BOUND_CERTS_ONLY  0            1: accept only client certificates whose common name
                                                   the key ring binds (`talkinghead keys bind-cert`); 0:
                                                   any the client CA signed, its common name the tenant
                                                   (for a CA that signs only this service's clients)
    TALKINGHEAD_ALLOW_UNAUTHENTICATED  0           listen beyond loopback without API keys or client
                                                   certificates (every caller is tenant `default`)
    TALKINGHEAD_REFLECTION        1                gRPC server reflection on (1) or off (0)
    TALKINGHEAD_LATENCY_BUDGET_MS 200              live streams' latency budget: batch sizes fit it,
                                                   late frames are dropped before inference
    TALKINGHEAD_ADMISSION         1                refuse a live stream the measured capacity cannot
                                                   serve (RESOURCE_EXHAUSTED); 0: admit every one
    TALKINGHEAD_MAX_PERSONALISED_LOADED 8          personalised generators kept loaded (in-process:
                                                   ~100 MiB each, OpenVINO, committed model; on
                                                   Triton: all replicas' there); beyond it those not
                                                   called for 60 s are unloaded, least recent first
    TALKINGHEAD_BATCHING          auto             auto: one frame per generator call where the
                                                   engine runs calls side by side in lanes (in-
                                                   process), up to MAX_BATCH otherwise (Triton);
                                                   always: up to MAX_BATCH
    TALKINGHEAD_CPU_SCHEDULING    batch            Linux scheduling policy of the server's threads:
                                                   batch (SCHED_BATCH: a wake-up waits for the next
                                                   tick instead of preempting the inference threads)
                                                   or normal
    TALKINGHEAD_SHUTDOWN_DRAIN    0                seconds after SIGTERM the server still takes new
                                                   calls, its health NOT_SERVING, while a load balancer
                                                   (Kubernetes endpoints) stops sending them; a second
                                                   signal ends the drain (the chart sets 5)
    TALKINGHEAD_SHUTDOWN_GRACE    5                seconds running streams then get to finish
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from facekit.contract import MAX_PERSONALISED
from facekit.cpus import usable_cpus
from facekit.engines import ENGINES, resolve_lanes
from facekit.liveness import STUCK_AFTER_S
from facekit.logs import FORMATS as LOG_FORMATS
from jobs.keys import shown_url

BACKENDS = ("onnxruntime", "triton")
WORKERS = ("embedded", "external", "none")
CPU_SCHEDULING = ("batch", "normal")  # of facekit.scheduling.POLICIES: the server's threads
BATCHING = ("auto", "always")
WORKER_PRIORITIES = ("idle", "low", "normal")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PREFIX = "TALKINGHEAD_"


def is_loopback(host: str) -> bool:
    """Only this machine can reach `host`: a loopback address literal (127.0.0.0/8, ::1), or the
    name `localhost`. Any other name counts as exposed, whatever it resolves to (a name like
    `127.example.com` is not loopback)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare(host)).is_loopback
    except ValueError:
        return False


def bare(host: str) -> str:
    """`host` without the brackets an IPv6 literal may come in ("[::1]" -> "::1"): what a socket binds."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_port(host: str, port: int) -> str:
    """host:port, an IPv6 literal in brackets ("[::1]:50051"), as gRPC and URLs need it: gRPC read
    "::1:50051" as a misformatted name and the server said the port was in use."""
    host = bare(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    metrics_host: str = ""  # "" = the gRPC host (`metrics_bind`)
    grpc_port: int = 50051
    metrics_port: int = 8080
    backend: str = "onnxruntime"
    engine: str = "auto"  # the onnxruntime backend's engine for generators (facekit/engines.py)
    engine_lanes: int = 0  # generator calls side by side (facekit/engines.py); 0 = auto
    inference_threads: int = 0  # ONNX Runtime intra-op threads; 0 = one per usable CPU (facekit/cpus.py)
    triton_url: str = "127.0.0.1:8001"
    model_repository: Path = Path("model_repository")
    avatar_store: Path = Path("var/avatars")
    cache_bytes: int = 64 * 1024 * 1024
    max_streams: int = 64
    max_batch: int = 16
    stream_idle_timeout: float = 30.0  # no frame/keepalive (or no reply taken) this long: the stream ends
    backend_timeout: float = 5.0  # deadline of every model call (generate, embed)
    latency_budget_ms: int = 200  # live streams (service/capacity.py)
    admission: bool = True  # admission control of live streams from the measured capacity
    max_personalised_loaded: int = MAX_PERSONALISED  # personalised generators kept loaded
    cpu_scheduling: str = "batch"  # the threads' Linux scheduling policy (serve_command.set_cpu_scheduling)
    batching: str = "auto"  # auto: one frame per call for an engine in lanes (App._calibrate)
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (facekit/logs.py)
    access_log: bool = True  # one line per call, logger talkinghead.access (service/access_log.py)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    redis_url: str = ""
    worker: str = "embedded"
    jobs: Path = Path("var/jobs")
    worker_checkpoint: Path = Path("models/talkinghead-small.pt")
    worker_threads: int = 1  # the embedded worker's PyTorch threads (service/local_worker.py)
    worker_priority: str = "idle"  # the embedded worker's CPU claim (service/local_worker.py)
    worker_stuck_after: float = STUCK_AFTER_S  # its --stuck-after
    max_queue: int = 16
    max_creates: int = 4  # CreateAvatar calls in flight (App.create_slot)
    max_creates_per_tenant: int = 2
    audit_log: Path = Path("var/audit.jsonl")  # without Redis; with it the stream talkinghead:audit
    production: bool = False  # refuse to start without a watermark key (TALKINGHEAD_WATERMARK_KEY)
    # the watermark key without TALKINGHEAD_WATERMARK_KEY (outside production): made there once
    watermark_key_file: Path = Path("var/watermark.key")
    api_keys: str = ""  # key ring: a JSON file path or "redis"; "" = no API keys
    tls_client_ca: Path | None = None
    tls_terminated_upstream: bool = False  # TLS ends in a proxy in front: keys may arrive in plaintext
    tls_bound_certs_only: bool = False  # only client certificates the key ring binds
    allow_unauthenticated: bool = False
    reflection: bool = True
    shutdown_grace: float = 5.0  # seconds in-flight streams get to finish on SIGTERM (after the drain)
    shutdown_drain: float = 0.0  # seconds after SIGTERM new calls are still taken, health NOT_SERVING
    # Flag-only settings (no environment variable): limits and tuning.
    max_image_bytes: int = 10 * 1024 * 1024  # per encoded image (avatar photos, driving frames)
    max_image_pixels: int = 40_000_000  # per decoded image (checked from its header)
    max_request_pixels: int = 100_000_000  # all the photos of one CreateAvatar together (headers)
    max_images: int = 32  # photos per avatar
    max_detect_queue: int = 32  # photos / driving frames one caller may have waiting for detection
    backend_stall: float = 1.5  # a model call in flight this long reports the backend NOT_SERVING
    detector: str = "dlib"  # landmark detector for photos and driving frames

    @property
    def lanes(self) -> int:
        """engine_lanes, with 0 (auto) resolved: 2 lanes where there are 2 or more threads."""
        return resolve_lanes(self.inference_threads or usable_cpus(), self.engine_lanes)

    def __post_init__(self) -> None:
        problems = []
        if self.backend not in BACKENDS:
            problems.append(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.engine not in ("auto", *ENGINES):
            problems.append(f"engine must be auto or one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not 0 <= self.engine_lanes <= 64:
            problems.append(f"engine_lanes must be 0-64 (0 = auto), got {self.engine_lanes}")
        if self.inference_threads < 0:
            problems.append(
                f"inference_threads must be >= 0 (0 = one per usable CPU), got {self.inference_threads}"
            )
        for name in ("grpc_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{name} must be 0-65535, got {getattr(self, name)}")
        if self.log_level not in LOG_LEVELS:
            problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            problems.append(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if not 1 <= self.max_batch <= 256:
            problems.append(f"max_batch must be 1-256, got {self.max_batch}")
        if self.cpu_scheduling not in CPU_SCHEDULING:
            problems.append(
                f"cpu_scheduling must be one of {', '.join(CPU_SCHEDULING)}, got {self.cpu_scheduling!r}"
            )
        if self.batching not in BATCHING:
            problems.append(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if self.worker not in WORKERS:
            problems.append(f"worker must be one of {', '.join(WORKERS)}, got {self.worker!r}")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            problems.append(
                f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}"
            )
        for name in ("stream_idle_timeout", "backend_timeout", "backend_stall"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("shutdown_grace", "shutdown_drain"):
            if not 0 <= getattr(self, name) <= 3600:
                problems.append(f"{name} must be 0-3600 seconds, got {getattr(self, name)}")
        if not 10 <= self.latency_budget_ms <= 60_000:
            problems.append(f"latency_budget_ms must be 10-60000, got {self.latency_budget_ms}")
        if not 0 <= self.worker_threads <= 256:
            problems.append(
                f"worker_threads must be 0-256 (0 = PyTorch's default), got {self.worker_threads}"
            )
        if not 0 <= self.worker_stuck_after <= 86_400:
            problems.append(
                f"worker_stuck_after must be 0-86400 seconds (0 = never), got {self.worker_stuck_after}"
            )
        if self.worker_priority not in WORKER_PRIORITIES:
            problems.append(
                f"worker_priority must be one of {', '.join(WORKER_PRIORITIES)}, got {self.worker_priority!r}"
            )
        if self.max_queue < 1:
            problems.append(f"max_queue must be >= 1, got {self.max_queue}")
        if not 1 <= self.max_creates_per_tenant <= self.max_creates:
            problems.append(
                "max_creates and max_creates_per_tenant must be >= 1, the tenant's no more than the "
                f"server's, got {self.max_creates} and {self.max_creates_per_tenant}"
            )
        if self.max_personalised_loaded < 1:
            problems.append(f"max_personalised_loaded must be >= 1, got {self.max_personalised_loaded}")
        if (
            min(self.max_image_bytes, self.max_image_pixels, self.max_request_pixels, self.max_detect_queue)
            < 1
        ):
            problems.append(
                "max_image_bytes, max_image_pixels, max_request_pixels and max_detect_queue must be >= 1"
            )
        if self.max_streams < 1 or self.cache_bytes < 0 or self.max_images < 1:
            problems.append("max_streams and max_images must be >= 1 and cache_bytes >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("TLS needs both a certificate (TLS_CERT) and a key (TLS_KEY)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("client certificates (TLS_CLIENT_CA) need TLS (TLS_CERT and TLS_KEY)")
        if self.api_keys == "redis" and not self.redis_url:
            problems.append("API_KEYS=redis needs REDIS_URL")
        if not self.authenticated and not self.loopback and not self.allow_unauthenticated:
            problems.append(
                f"refusing to listen on {self.host} without authentication: set API_KEYS (API keys) or "
                "TLS_CLIENT_CA (client certificates), or ALLOW_UNAUTHENTICATED=1 to accept anyone"
            )
        if self.plaintext_exposed:
            what = "API keys" if self.api_keys else "production mode"
            problems.append(
                f"refusing to serve {what} over plaintext on {self.host}: anyone on the path reads the "
                "keys; set TLS_CERT and TLS_KEY, or TLS_TERMINATED_UPSTREAM=1 when a proxy in front of "
                "this server (a mesh sidecar, a TLS-terminating load balancer) terminates TLS"
            )
        if self.tls_bound_certs_only and (self.tls_client_ca is None or not self.api_keys):
            problems.append(
                "TLS_BOUND_CERTS_ONLY needs client certificates (TLS_CLIENT_CA) and the key ring that "
                "binds them (API_KEYS)"
            )
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def authenticated(self) -> bool:
        """Callers must prove who they are (API keys or client certificates)."""
        return bool(self.api_keys) or self.tls_client_ca is not None

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def plaintext_exposed(self) -> bool:
        """API keys (or production mode) beyond loopback with no TLS here nor in front: refused."""
        return (
            (bool(self.api_keys) or self.production)
            and not self.tls
            and not self.loopback
            and not self.tls_terminated_upstream
        )

    @property
    def metrics_bind(self) -> str:
        """The address /metrics binds: TALKINGHEAD_METRICS_HOST, else the gRPC host (unbracketed)."""
        return bare(self.metrics_host or self.host)

    @property
    def embedded_worker(self) -> bool:
        """This process runs its own worker: the local queue (no Redis) and TALKINGHEAD_WORKER=embedded."""
        return not self.redis_url and self.worker == "embedded"

    def describe(self) -> str:
        """One log line: every field, name=value (a password in redis_url masked)."""
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["redis_url"] = shown_url(self.redis_url)
        return " ".join(f"{name}={value}" for name, value in shown.items())


_ENV_FIELDS = (
    "host",
    "shutdown_grace",
    "shutdown_drain",
    "metrics_host",
    "grpc_port",
    "metrics_port",
    "backend",
    "engine",
    "engine_lanes",
    "inference_threads",
    "triton_url",
    "model_repository",
    "avatar_store",
    "cache_bytes",
    "max_streams",
    "max_batch",
    "stream_idle_timeout",
    "latency_budget_ms",
    "admission",
    "max_personalised_loaded",
    "cpu_scheduling",
    "batching",
    "backend_timeout",
    "log_level",
    "log_format",
    "access_log",
    "tls_cert",
    "tls_key",
    "redis_url",
    "worker",
    "jobs",
    "worker_checkpoint",
    "worker_threads",
    "worker_priority",
    "worker_stuck_after",
    "max_queue",
    "max_creates",
    "max_creates_per_tenant",
    "production",
    "watermark_key_file",
    "audit_log",
    "api_keys",
    "tls_client_ca",
    "tls_terminated_upstream",
    "tls_bound_certs_only",
    "allow_unauthenticated",
    "reflection",
)


def _convert(name: str, raw: str) -> object:
    kind = {f.name: f.type for f in dataclasses.fields(Settings)}[name]
    text = str(kind)
    if "bool" in text:
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError("expected 1/0, true/false or yes/no")
        return raw.lower() in ("1", "true", "yes")
    if "int" in text:
        return int(raw)
    if "float" in text:
        return float(raw)
    if "Path" in text:
        return Path(raw) if raw else None
    if name == "log_format":
        return raw.lower()
    return raw.upper() if name == "log_level" else raw


def from_env(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from TALKINGHEAD_* variables, then `overrides` (None values are ignored)."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name in _ENV_FIELDS:
        key = PREFIX + name.upper()
        if environ.get(key, "") != "":
            try:
                values[name] = _convert(name, environ[key])
            except ValueError as error:
                raise ValueError(f"invalid {key}={environ[key]!r}: {error}") from error
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)  # type: ignore[arg-type]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for `talkinghead serve`; each defaults to None = keep the environment's value."""
    group = parser.add_argument_group("settings (flags override TALKINGHEAD_* environment variables)")
    group.add_argument("--host", help="gRPC bind address (default 127.0.0.1)")
    group.add_argument(
        "--metrics-host", help="/metrics bind address (default: the gRPC host; it lists tenant names)"
    )
    group.add_argument("--grpc-port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    group.add_argument("--metrics-port", type=int, help="Prometheus port (default 8080; 0 = any free)")
    group.add_argument("--backend", choices=BACKENDS, help="model backend (default onnxruntime)")
    group.add_argument(
        "--engine",
        choices=("auto", *ENGINES),
        help="in-process generator engine (default auto: the fastest allowed, timed at start)",
    )
    group.add_argument(
        "--engine-lanes",
        type=int,
        help="generator calls run side by side, each on its share of the threads (default 0: auto, 2)",
    )
    group.add_argument(
        "--triton-url",
        help="Triton gRPC host:port[,host:port...] (default 127.0.0.1:8001; a name: each of its addresses)",
    )
    group.add_argument("--model-repository", type=Path, help="model repository (default model_repository)")
    group.add_argument("--avatar-store", type=Path, help="avatar directory (default var/avatars)")
    group.add_argument("--cache-bytes", type=int, help="AdaIN cache bound in bytes (default 64 MiB)")
    group.add_argument("--max-streams", type=int, help="concurrent Animate streams (default 64)")
    group.add_argument("--max-batch", type=int, help="frames per generator call (default 16)")
    group.add_argument("--latency-budget-ms", type=int, help="live streams' latency budget, ms (default 200)")
    group.add_argument(
        "--no-admission",
        dest="admission",
        action="store_false",
        default=None,
        help="admit every live stream, even beyond the measured capacity",
    )
    group.add_argument(
        "--stream-idle-timeout",
        type=float,
        help="seconds a stream may send no frame or keepalive (or take no reply) before it ends (default 30)",
    )
    group.add_argument(
        "--max-personalised-loaded",
        type=int,
        help="personalised generators kept loaded, in-process or on Triton (default 8; idle ones unloaded)",
    )
    group.add_argument(
        "--batching",
        choices=BATCHING,
        help="auto (default): one frame per call where the engine runs calls in lanes; always: batches",
    )
    group.add_argument(
        "--cpu-scheduling",
        choices=CPU_SCHEDULING,
        help="the server threads' Linux scheduling policy (default batch: wake-ups do not preempt inference)",
    )
    group.add_argument("--backend-timeout", type=float, help="seconds each model call may take (default 5)")
    group.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, help="default INFO")
    group.add_argument(
        "--log-format",
        type=str.lower,
        choices=LOG_FORMATS,
        help="text (default) or json: one object a line, for a log pipeline (the embedded worker's too)",
    )
    group.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one line per call as it ends, logger talkinghead.access (default on)",
    )
    group.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key)")
    group.add_argument("--tls-key", type=Path, help="PEM private key")
    group.add_argument(
        "--redis-url", help="redis://host:port/db: shared avatars and job queue (default unset)"
    )
    group.add_argument("--worker", choices=WORKERS, help="personalisation worker (default embedded)")
    group.add_argument("--jobs", type=Path, help="local job directory (default var/jobs)")
    group.add_argument("--worker-checkpoint", type=Path, help="checkpoint the embedded worker fine-tunes")
    group.add_argument(
        "--worker-priority",
        choices=WORKER_PRIORITIES,
        help="the embedded worker's claim on the CPU (default idle: only what streams leave)",
    )
    group.add_argument(
        "--worker-threads", type=int, help="the embedded worker's PyTorch threads (default 1; 0 = every core)"
    )
    group.add_argument(
        "--worker-stuck-after",
        type=float,
        help="s the embedded worker's job may go without progress before it is restarted "
        "(default 900; 0 = never)",
    )
    group.add_argument(
        "--audit-log", type=Path, help="audit log file without Redis (default var/audit.jsonl)"
    )
    group.add_argument("--max-queue", type=int, help="queued + running personalisations (default 16)")
    group.add_argument("--max-creates", type=int, help="CreateAvatar calls in flight (default 4)")
    group.add_argument(
        "--max-creates-per-tenant", type=int, help="CreateAvatar calls in flight of one tenant (default 2)"
    )
    group.add_argument(
        "--production",
        action="store_true",
        default=None,
        help="production mode: refuse to start without TALKINGHEAD_WATERMARK_KEY, or beyond loopback "
        "without TLS (here or, --tls-terminated-upstream, in front) (default off)",
    )
    group.add_argument(
        "--watermark-key-file",
        type=Path,
        help="without TALKINGHEAD_WATERMARK_KEY (not in production) frames are marked with the key in "
        "this file, made there once, mode 0600 (default var/watermark.key)",
    )
    group.add_argument(
        "--api-keys", help="key ring of API keys: a JSON file, or `redis` (default: no API keys)"
    )
    group.add_argument("--tls-client-ca", type=Path, help="PEM CA client certificates must chain to (mTLS)")
    group.add_argument(
        "--tls-terminated-upstream",
        action="store_true",
        default=None,
        help="TLS ends in a proxy in front (mesh sidecar, TLS load balancer): serve API keys over "
        "plaintext beyond loopback (default off: such a server refuses to start)",
    )
    group.add_argument(
        "--tls-bound-certs-only",
        action="store_true",
        default=None,
        help="accept only client certificates whose common name the key ring binds (default off: any "
        "the client CA signed, its common name the tenant)",
    )
    group.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=None,
        help="listen beyond loopback with no authentication (every caller is tenant `default`)",
    )
    group.add_argument(
        "--no-reflection", dest="reflection", action="store_false", default=None, help="turn reflection off"
    )
    group.add_argument("--max-image-bytes", type=int, help="per encoded image (default 10 MiB)")
    group.add_argument("--max-image-pixels", type=int, help="per decoded image (default 40,000,000)")
    group.add_argument(
        "--max-request-pixels", type=int, help="all photos of one CreateAvatar (default 100,000,000)"
    )
    group.add_argument(
        "--max-detect-queue", type=int, help="face detections one caller may have waiting (default 32)"
    )
    group.add_argument(
        "--inference-threads",
        type=int,
        help="ONNX Runtime threads (default 0: one per usable CPU: affinity, cgroup quota)",
    )
    group.add_argument(
        "--shutdown-grace", type=float, help="seconds streams get to finish on SIGTERM (default 5)"
    )
    group.add_argument(
        "--shutdown-drain",
        type=float,
        help="seconds after SIGTERM new calls are still taken, health NOT_SERVING (default 0)",
    )
    group.add_argument(
        "--backend-stall",
        type=float,
        help="seconds a model call may be in flight before health says NOT_SERVING (default 1.5)",
    )


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    names = {f.name for f in dataclasses.fields(Settings)}
    return from_env(environ, **{k: v for k, v in vars(args).items() if k in names})
