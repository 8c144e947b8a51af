"""Assemble and run the server: gRPC (avatars, animation, health, reflection) + Prometheus /metrics.

    settings = from_env()
    asyncio.run(serve(settings))          # until SIGTERM / SIGINT

`Server` is the same thing as an object tests and the benchmark start and stop in-process.
`TlsFiles` serves the TLS certificate, key and client CA as they are on disk now: a renewed
certificate (cert-manager updating the mounted Secret) serves new connections without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from api.talkinghead.v1 import animation_pb2, avatar_pb2, personalisation_pb2
from facekit.watermark import KEY_ENV, Watermarker, require_key
from jobs.queue import JobQueue
from jobs.record import CODE_FAILED_PRECONDITION, PERSONALISE, SUCCEEDED
from service import wire
from service.access_log import AccessLog
from service.app import App
from service.audit import AuditLog, FileAuditLog, RedisAuditLog, RefusalAudit
from service.auth import Authenticator, AuthInterceptor, ring_store
from service.backends.base import Backend
from service.events import FileEvents, RedisEvents
from service.local_worker import RESTART_REASONS, LocalWorker
from service.metrics import Metrics
from service.personalisation import Personaliser
from service.personalisation_servicer import PersonalisationServicer
from service.rpc_metrics import RpcMetrics
from service.servicer import AnimationServicer, AvatarServicer
from service.settings import Settings, bare, host_port
from service.storage import StorageWatch, probe_of
from service.store import AvatarStore, LocalAvatarStore
from service.wire import MAX_MESSAGE_BYTES

log = logging.getLogger("talkinghead.service")
DESCRIPTORS = (
    avatar_pb2.DESCRIPTOR.services_by_name["AvatarService"],
    animation_pb2.DESCRIPTOR.services_by_name["AnimationService"],
    personalisation_pb2.DESCRIPTOR.services_by_name["PersonalisationService"],
)
SERVICES = tuple(service.full_name for service in DESCRIPTORS)
# The health entry the chart's startup and liveness probes ask: SERVING from start to shutdown,
# whatever the backend and the storage do. Answered on the event loop, like every call: a loop
# that is wedged answers nothing, where a TCP connect still succeeds (the kernel accepts it).
LIVENESS = "liveness"
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
# talkinghead_rpcs_total's `method` label: every method the server serves (others count as `other`)
METHODS = tuple(
    f"{service.full_name}/{method.name}"
    for service in (*DESCRIPTORS, HEALTH, REFLECTION)
    for method in service.methods
)
HEALTH_POLL_S = 0.25  # health follows the backend within this (a stall: NOT_SERVING within 2 s)
JOBS_POLL_S = 5.0  # talkinghead_personalisation_jobs follows the job queue within this
STOP_TASKS_S = 5.0  # Server.stop waits this long at most for its background tasks to end
# Connection liveness (HTTP/2, below the streams' own idle deadline; service/README.md):
KEEPALIVE = [
    # Ping every connection after 20 s without a ping; no ack within 10 s closes it: a client
    # that vanished without closing its socket (power, network) frees its streams within 30 s.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging a stream that sends no data
    # Clients may ping too, without calls, at most every 10 s (more often: GOAWAY).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # A connection without calls for 5 min is closed (GOAWAY; the client reconnects on its next call).
    ("grpc.max_connection_idle_ms", 300_000),
    # Every connection is closed after about 1 h (gRPC adds +-10 % jitter) so that clients behind a
    # load balancer spread over new replicas; streams still open get 10 more minutes, then end
    # UNAVAILABLE: a longer call reopens its stream.
    ("grpc.max_connection_age_ms", 3_600_000),
    ("grpc.max_connection_age_grace_ms", 600_000),
]


TLS_CHECK_S = 1.0  # the TLS files are looked at (stat) at most this often, on a new connection


class BindError(OSError):
    """A port the server was given cannot be listened on (in use, or not an address of this host)."""


def check_port_free(what: str, host: str, port: int) -> None:
    """BindError now when no address `host` names can listen on `port` (another process listens
    there, or the address is not this machine's): before the server makes its key file and state
    folders or loads a model, which it did and then stopped at its bind. As gRPC's bind, one
    address of several is enough ("localhost" is 127.0.0.1 and ::1, and a host without IPv6 binds
    the first alone). The bind itself decides in the end (a port taken between the two fails
    there, as before); a name that does not resolve, or another error, is left to it too.
    SO_REUSEADDR as both binds use it: a port left in TIME_WAIT by a server just stopped is free."""
    if port == 0:
        return
    try:
        found = socket.getaddrinfo(bare(host) or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return
    failures = set()
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                failures.add(error.errno)
                continue
        return  # one address can listen
    where = host_port(host, port)
    if errno.EADDRINUSE in failures:
        raise BindError(f"cannot bind {what} to {where}: the port is in use")
    if failures == {errno.EADDRNOTAVAIL}:
        raise BindError(f"cannot bind {what} to {where}: the address is not this machine's")


def _stat(path: Path | None) -> tuple[int, int, int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()  # through symlinks: a Kubernetes Secret volume swaps its ..data link
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


def _no_password() -> bytes:
    raise ValueError("the private key is encrypted (gRPC needs it unencrypted)")


@dataclass(eq=False)
class TlsFiles:
    """The server's certificate chain, key and client CA (mTLS), for
    grpc.dynamic_ssl_server_credentials: gRPC calls `fetch` before each new connection's handshake,
    from its own threads. When the files changed (their stat: modified, changed, size, inode) they
    are read, checked (the key matches the certificate, the PEM parses: a pair caught half
    written, or a key that does not go with the new certificate, is not served) and served from
    then on; files that fail the check are logged once and the last good ones stay in use until
    the files change again. Connections already open keep the certificate they began with."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    _served: object = None  # the stat of the files in use
    _refused: object = None  # a stat whose files failed the check (logged once)
    _checked: float = -TLS_CHECK_S
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _stamp(self) -> tuple[object, ...]:
        return (_stat(self.cert), _stat(self.key), _stat(self.client_ca))

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The files' configuration now; ValueError saying what is wrong with them."""
        try:
            cert, key = self.cert.read_bytes(), self.key.read_bytes()
            ca = self.client_ca.read_bytes() if self.client_ca is not None else None
            check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            check.load_cert_chain(self.cert, self.key, password=_no_password)
            if ca is not None:
                check.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
            if (self.cert.read_bytes(), self.key.read_bytes()) != (cert, key):
                raise ValueError("they changed while being read")
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            raise ValueError(f"{self.cert}, {self.key}: {error}") from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        with self._lock:
            stamp = self._stamp()
            config = self.load()
            self._served = stamp
            self._checked = time.monotonic()
            log.info("TLS certificate %s", self._fingerprint())
            return config

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate_configuration_fetcher: new files' configuration, or None (unchanged)."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < TLS_CHECK_S:
                return None
            self._checked = now
            stamp = self._stamp()
            if stamp in (self._served, self._refused):
                return None
            try:
                config = self.load()
            except ValueError as error:
                self._refused = stamp
                log.error(
                    "the TLS files changed but cannot be served (serving the last good ones): %s", error
                )
                return None
            except Exception as error:  # never into gRPC's thread: it would fail the handshake
                log.error("reading the TLS files failed (serving the last good ones): %r", error)
                return None
            self._served = stamp
            log.info("TLS files changed: serving certificate %s to new connections", self._fingerprint())
            return config

    def _fingerprint(self) -> str:
        digest = hashlib.sha256(self.cert.read_bytes()).hexdigest()[:16]
        return f"{self.cert} (sha256 {digest}...)" + (
            f", client CA {self.client_ca}" if self.client_ca else ""
        )


def make_backend(settings: Settings) -> Backend:
    if settings.backend == "triton":
        from service.backends.tritons import make_triton_backend

        # An address literal: that one Triton; a name (the chart's headless Service) or a list: every
        # Triton behind it, re-resolved, each call on the least busy (service/backends/tritons.py).
        return make_triton_backend(
            settings.triton_url,
            timeout_s=settings.backend_timeout,
            stall_s=settings.backend_stall,
            max_personalised=settings.max_personalised_loaded,
        )
    from service.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(
        repository=settings.model_repository,
        engine=settings.engine,
        threads=settings.inference_threads,
        lanes=settings.lanes,
        timeout_s=settings.backend_timeout,
        stall_s=settings.backend_stall,
        max_personalised=settings.max_personalised_loaded,
    )


def make_auth(
    settings: Settings, metrics: Metrics | None = None, audit: AuditLog | None = None
) -> Authenticator:
    store = ring_store(settings.api_keys, settings.redis_url) if settings.api_keys else None
    auth = Authenticator(
        store=store,
        client_certs=settings.tls_client_ca is not None,
        bound_certs_only=settings.tls_bound_certs_only,
        on_refusal=metrics.on_auth_refusal if metrics is not None else None,
        audit=RefusalAudit(log_=audit) if audit is not None else None,
    )
    if not auth.enabled:
        log.warning(
            "authentication is off: every caller is the implicit tenant 'default' with the admin role "
            + (
                "(fine on %s; set TALKINGHEAD_API_KEYS or TALKINGHEAD_TLS_CLIENT_CA before exposing it)"
                if settings.loopback
                else "on %s, reachable beyond this machine (TALKINGHEAD_ALLOW_UNAUTHENTICATED)"
            ),
            settings.host,
        )
    else:
        log.info(
            "authentication: %s",
            " and ".join(
                what
                for what, on in (
                    (f"API keys ({settings.api_keys})", store is not None),
                    (
                        f"client certificates of {settings.tls_client_ca}"
                        + (" bound in the key ring" if settings.tls_bound_certs_only else ""),
                        auth.client_certs,
                    ),
                )
                if on
            ),
        )
    return auth


def make_state(settings: Settings) -> tuple[AvatarStore, JobQueue, AuditLog]:
    """Avatars, jobs and the audit log: in Redis when TALKINGHEAD_REDIS_URL is set, else files on
    this machine."""
    if settings.redis_url:
        from jobs.redis_queue import RedisQueue, connect
        from service.redis_store import RedisAvatarStore

        client = connect(settings.redis_url)
        return RedisAvatarStore(client=client), RedisQueue(client=client), RedisAuditLog(client=client)
    from jobs.local import LocalQueue

    return (
        LocalAvatarStore(root=settings.avatar_store),
        LocalQueue(root=settings.jobs),
        FileAuditLog(path=settings.audit_log),
    )


@dataclass(kw_only=True)
class Server:
    settings: Settings
    backend: Backend | None = None  # default: make_backend(settings)
    grpc_port: int = 0  # bound ports, known after start()
    metrics_port: int = 0
    app: App = field(init=False)
    _server: grpc.aio.Server = field(init=False)
    _health: health.aio.HealthServicer = field(init=False)
    _metrics_http: Any = field(init=False, default=None)
    _monitor: asyncio.Task[None] | None = field(init=False, default=None)
    storage: StorageWatch = field(init=False)
    _storage_task: asyncio.Task[None] | None = field(init=False, default=None)
    _jobs_task: asyncio.Task[None] | None = field(init=False, default=None)
    _draining: bool = field(init=False, default=False)
    _published: tuple[bool, bool] | None = field(init=False, default=None)  # (backend, storage) in health
    _events: asyncio.Task[None] | None = field(init=False, default=None)
    tls_files: TlsFiles | None = field(init=False, default=None)
    worker: LocalWorker | None = field(init=False, default=None)

    async def start(self) -> None:
        s = self.settings
        log.info("settings: %s", s.describe())
        check_port_free("gRPC", s.host, s.grpc_port)
        check_port_free("metrics", s.metrics_bind, s.metrics_port)
        # MissingKeyError: production mode without TALKINGHEAD_WATERMARK_KEY, or an unusable key file:
        # before any model is loaded
        key, origin = require_key(production=s.production, key_file=s.watermark_key_file)
        watermarker = Watermarker(key=key)
        log.info(
            "every generated frame carries the watermark of key %s (from %s)", watermarker.fingerprint, origin
        )
        if origin == str(s.watermark_key_file):
            log.info('to check the mark in a video: export %s="$(cat %s)"', KEY_ENV, origin)
        metrics = Metrics()
        store, queue, audit = make_state(s)
        backend = self.backend or make_backend(s)
        personaliser = Personaliser(
            queue=queue,
            max_queue=s.max_queue,
            on_done=lambda job: (
                backend.forget_personalised(job.avatar_id) if job.state == SUCCEEDED else None
            ),
        )
        if s.worker == "none":
            personaliser.disabled = "no personalisation worker runs here (TALKINGHEAD_WORKER=none)"
        auth = make_auth(s, metrics, audit)
        self.app = App(
            settings=s,
            auth=auth,
            backend=backend,
            store=store,
            metrics=metrics,
            personaliser=personaliser,
            audit=audit,
            watermarker=watermarker,
        )
        limits = wire.Limits.from_settings(s)
        options = [
            # gRPC sets SO_REUSEPORT by default: a second server on a port in use bound it too and
            # the kernel split the calls between the two (an avatar deleted on one, listed on the other)
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", limits.largest),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *KEEPALIVE,
        ]
        self.storage = StorageWatch(probe_of(store), on_change=lambda up: metrics.storage_up.set(int(up)))
        metrics.storage_up.set(1)
        metrics.events_live.set_function(lambda: 1.0 if self.app.events_live() else 0.0)
        # RpcMetrics first: the outermost, it counts (and access-logs) the calls AuthInterceptor
        # refuses as well
        self._rpc_metrics = RpcMetrics(
            metrics,
            METHODS,
            on_storage_failure=self.storage.failed,
            access=AccessLog(METHODS) if s.access_log else None,
        )
        interceptors = [self._rpc_metrics, AuthInterceptor(auth)]
        self._server = grpc.aio.server(options=options, interceptors=interceptors)
        # requests are parsed in service/wire.py (size limits, INVALID_ARGUMENT when malformed)
        for service, servicer in zip(
            DESCRIPTORS,
            (
                AvatarServicer(app=self.app),
                AnimationServicer(app=self.app),
                PersonalisationServicer(app=self.app),
            ),
            strict=True,
        ):
            wire.add_service(self._server, service, servicer, limits)
        self._health = health.aio.HealthServicer()
        # health too: a probe that sends junk gets INVALID_ARGUMENT, not INTERNAL and a traceback
        wire.add_service(self._server, HEALTH, self._health, limits)
        await self._health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._set_health(False)
        if s.reflection:  # through wire as well: a malformed request is INVALID_ARGUMENT, not INTERNAL
            names = (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME)
            wire.add_service(self._server, REFLECTION, reflection.aio.ReflectionServicer(names), limits)
        address = host_port(s.host, s.grpc_port)
        try:
            if s.tls:
                assert s.tls_cert is not None and s.tls_key is not None
                self.tls_files = TlsFiles(cert=s.tls_cert, key=s.tls_key, client_ca=s.tls_client_ca)
                try:
                    first = self.tls_files.initial()
                except ValueError as error:
                    raise BindError(f"cannot serve TLS on {address}: {error}") from None
                credentials = grpc.dynamic_ssl_server_credentials(
                    first,
                    self.tls_files.fetch,
                    require_client_authentication=s.tls_client_ca is not None,
                )
                self.grpc_port = self._server.add_secure_port(address, credentials)
            else:
                self.grpc_port = self._server.add_insecure_port(address)
        except RuntimeError:  # gRPC's "Failed to bind to address ..." (its reason goes to its log)
            self.grpc_port = 0
        if self.grpc_port == 0:
            raise BindError(
                f"cannot bind gRPC to {address}: the port is in use or the address is not this machine's"
            )
        try:
            self._metrics_http, self.metrics_port = metrics.serve(s.metrics_bind, s.metrics_port)
        except OSError as error:
            where = host_port(s.metrics_bind, s.metrics_port)
            raise BindError(f"cannot bind metrics to {where}: {error.strerror or error}") from None
        await self.app.start()
        auth.start()
        self._start_personalisation()
        await self._server.start()
        if s.tls_terminated_upstream and not s.tls:
            log.warning(
                "TLS is terminated in front of this server (TALKINGHEAD_TLS_TERMINATED_UPSTREAM=1): "
                "credentials arrive over plaintext on %s; only that proxy may reach this port",
                host_port(s.host, self.grpc_port),
            )
        self._storage_task = asyncio.create_task(self.storage.run(), name="storage-probe")
        self._monitor = asyncio.create_task(self._watch_backend(), name="health-monitor")
        self._jobs_task = asyncio.create_task(self._watch_jobs(), name="jobs-census")
        log.info(
            "serving gRPC on %s (%s), metrics on http://%s/metrics, backend %s",
            host_port(s.host, self.grpc_port),
            "TLS" if s.tls else "plaintext",
            host_port(s.metrics_bind, self.metrics_port),
            s.backend,
        )

    def _start_personalisation(self) -> None:
        """Follow avatar events; run the embedded worker unless workers run elsewhere."""
        s, app = self.settings, self.app
        source: RedisEvents | FileEvents
        if s.redis_url:
            redis_events = RedisEvents(url=s.redis_url, on_event=app.on_event, on_reset=app.on_events_lost)
            app.events_live = redis_events.subscribed.is_set  # the cache is trusted only while subscribed
            source = redis_events
        else:
            source = FileEvents(root=s.jobs, on_event=app.on_event, on_reset=app.on_events_lost)
        self._events = asyncio.create_task(source.run(), name="avatar-events")
        if s.embedded_worker:
            if not s.worker_checkpoint.is_file():  # (`serve` run outside the checkout, a typo)
                path = s.worker_checkpoint
                why = f"the worker's checkpoint {path} is not there (TALKINGHEAD_WORKER_CHECKPOINT)"
                log.warning("personalisation is off: %s", why)
                self._no_worker(why)
                return
            restarts = self.app.metrics.worker_restarts
            for reason in RESTART_REASONS:  # each series from 0: a first restart is an increase
                restarts.labels(reason)
            self.worker = LocalWorker(
                settings=s, on_give_up=self._no_worker, on_restart=lambda why: restarts.labels(why).inc()
            )
            self.worker.start()

    def _no_worker(self, why: str) -> None:
        """No worker will run personalisations here: refuse new ones and end those queued (their
        clients waited for ever: the embedded worker, crashing at its start, had given up)."""
        from jobs.local import LocalQueue

        personaliser = self.app.personaliser
        personaliser.disabled = why
        if not isinstance(personaliser.queue, LocalQueue):
            return
        try:
            ended = personaliser.queue.fail_queued(
                kind=PERSONALISE, code=CODE_FAILED_PRECONDITION, error=f"no worker can run it: {why}"
            )
        except OSError as error:
            log.warning("cannot end the queued personalisations: %s", error)
            return
        if ended:
            log.warning("%d queued personalisation(s) failed: no worker can run them", len(ended))

    async def _set_health(self, backend: bool, storage: bool = True) -> None:
        """Health: the overall "" entry follows the backend (and the drain); each talkinghead
        service also needs the storage (avatars, streams' avatars, the job queue are in it), so a
        client that checks a service's health learns that it would get UNAVAILABLE. The overall
        entry, which Kubernetes' readiness probe asks, does not follow the storage: with Redis
        shared by every replica, pulling them all from the Service helps no one (every call
        would be refused at connect instead of told "storage unreachable; retry later", health
        included), and each would have to be added back when Redis returns."""
        if self._draining:
            backend = False
        self._published = (backend, storage)
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        await self._health.set("", serving if backend else not_serving)
        for name in SERVICES:
            await self._health.set(name, serving if backend and storage else not_serving)

    async def _watch_backend(self) -> None:
        """Health follows the backend: NOT_SERVING until it is ready, whenever it goes away and while
        a call is stalled (`Backend.is_ready` never blocks; a poll that fails counts as not ready),
        and, per service, the storage (StorageWatch). Each fall from ready is counted by reason
        (talkinghead_backend_not_ready_total). Over several Tritons (TritonPool) each one's own
        readiness is published too (talkinghead_triton_ready): health says SERVING while any serves."""
        ready: bool | None = None
        while True:
            try:
                now = self.app.backend.is_ready()
            except Exception as error:
                log.error("backend readiness check failed: %s", error)
                now = False
            if now != ready:
                self.app.metrics.backend_ready.set(1 if now else 0)
                stalled = getattr(self.app.backend, "stalled", lambda: None)()
                why = f" ({stalled})" if stalled and not now else ""
                if ready and not now:
                    self.app.metrics.backend_not_ready.labels("stalled" if stalled else "unavailable").inc()
                log.info("backend %s is %s%s", self.app.backend.name, "ready" if now else "NOT ready", why)
                ready = now
            readiness = getattr(self.app.backend, "readiness", None)  # TritonPool: each Triton
            if readiness is not None:
                try:
                    self.app.metrics.on_tritons(readiness())
                except Exception as error:
                    log.error("Triton readiness check failed: %s", error)
            if (now, self.storage.up) != self._published:
                await self._set_health(now, self.storage.up)
            await asyncio.sleep(HEALTH_POLL_S)

    async def _watch_jobs(self) -> None:
        """The job queue's personalisations, queued and running, and how long the oldest queued one
        has waited, in /metrics (talkinghead_personalisation_*): the worker is another process,
        and this is where an operator sees jobs wait for one. NaN while the queue cannot be read."""
        personaliser, metrics = self.app.personaliser, self.app.metrics
        failing = False
        while True:
            try:
                metrics.on_jobs(*await personaliser.census())
                if failing:
                    log.info("the job queue can be read again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as error:
                metrics.on_jobs_unknown()
                if not failing:
                    log.warning(
                        "cannot read the job queue for its metrics: %s: %s", type(error).__name__, error
                    )
                failing = True
            await asyncio.sleep(JOBS_POLL_S)

    async def drain(self) -> None:
        """Say NOT_SERVING for good (the backend watch stops), still taking calls."""
        self._draining = True
        if self._monitor is not None:
            self._monitor.cancel()
        await self._set_health(False)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking new calls, give running ones `grace` seconds, then release everything."""
        grace = self.settings.shutdown_grace if grace is None else grace
        await self._health.enter_graceful_shutdown()
        watchers = [t for t in (self._monitor, self._storage_task, self._jobs_task) if t is not None]
        for task in watchers:
            task.cancel()
        self._rpc_metrics.stopping(grace)
        await self._server.stop(grace)
        if self._events is not None:
            self._events.cancel()
            watchers.append(self._events)
        if self.worker is not None:
            await self.worker.close()
        await self.app.close()
        watchers += self.app.auth.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if watchers:  # each ended, not only told to (bounded: one stuck in I/O must not hold the stop)
            _, stuck = await asyncio.wait(watchers, timeout=STOP_TASKS_S)
            if stuck:
                log.warning(
                    "stopped with background tasks still ending: %s", ", ".join(t.get_name() for t in stuck)
                )
        log.info("stopped")

    async def wait(self) -> None:
        await self._server.wait_for_termination()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = Server(settings=settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if settings.shutdown_drain > 0:
        # Still serving, health NOT_SERVING: calls routed here before the load balancer (the pod's
        # endpoints) learns of the shutdown are answered, not refused at connect.
        log.info(
            "signal received: health NOT_SERVING, still taking calls for %.1f s (a second signal ends it)",
            settings.shutdown_drain,
        )
        await server.drain()
        stop.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.shutdown_drain)
    log.info("shutting down (grace %.1f s)", settings.shutdown_grace)
    await server.stop()
