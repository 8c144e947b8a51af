"""Python client of the talkinghead service (blocking API over a gRPC channel).

    from pathlib import Path
    from client import Client, consent_record, landmark_requests
    from facekit.sequence import LandmarkSequence

    with Client(target="127.0.0.1:50051") as client:
        consent = consent_record(subject="Mona Lisa (Leonardo)", basis="public-domain",
                                 source="https://collections.louvre.fr/ark:/53355/cl010062370",
                                 collected_by="studio@example.com")
        client.create_avatar("mona", [Path("mona1.jpg"), Path("mona2.png")], consent=consent)
        done = client.personalise("mona", preset="fast", wait=True)  # fine-tune its own generator
        seq = LandmarkSequence.load("driver.npz")
        for frame in client.animate("mona", landmark_requests(seq), motion="relative"):
            frame.image  # uint8 (H, W, 3) RGB, in the order the landmarks were sent

Errors are grpc.RpcError with the server's status code and message (`describe_error` formats one);
ValueError for arguments refused before any call, and for any call on a closed Client. A Client
may be shared by threads: each call is independent (one gRPC channel carries them all).
Torch-free: imports facekit and the generated stubs (api/) only, never the server (service/).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import cv2
import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from api.talkinghead.v1 import animation_pb2 as pb
from api.talkinghead.v1 import animation_pb2_grpc, avatar_pb2, avatar_pb2_grpc, personalisation_pb2_grpc
from api.talkinghead.v1 import personalisation_pb2 as ops
from api.talkinghead.v1.landmarks_pb2 import Landmarks
from facekit.sequence import LandmarkSequence

DEFAULT_SERVER = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# HTTP/2 keepalive: a ping after this many seconds without traffic, and the connection is given up
# when its ack does not come within KEEPALIVE_TIMEOUT_S, so a call over a dead network path (no
# FIN, no RST: a partition, a peer powered off) ends UNAVAILABLE within ~30 s instead of hanging.
# The server accepts pings every 10 s or more (service/server.py KEEPALIVE).
KEEPALIVE_TIME_S = 20.0
KEEPALIVE_TIMEOUT_S = 10.0
RECONNECT_TIMEOUT_S = 60.0  # wait_operation: how long a lost server is retried before giving up
REQUEST_THREAD_JOIN_S = 5.0  # animate: how long an ended stream waits for the request thread
MAX_EXPECTED_FPS = 120.0  # StreamConfig.expected_fps's range is 1-120
ENCODINGS = {
    "jpeg": pb.OUTPUT_ENCODING_JPEG,
    "png": pb.OUTPUT_ENCODING_PNG,
    "raw": pb.OUTPUT_ENCODING_RAW_RGB,
}
OVERFLOW = {"drop-oldest": pb.OVERFLOW_POLICY_DROP_OLDEST, "block": pb.OVERFLOW_POLICY_BLOCK}
MOTION = {"absolute": pb.MOTION_MODE_ABSOLUTE, "relative": pb.MOTION_MODE_RELATIVE}
BASES = {
    "personal": avatar_pb2.CONSENT_BASIS_PERSONAL_CONSENT,
    "public-domain": avatar_pb2.CONSENT_BASIS_PUBLIC_DOMAIN,
    "licensed": avatar_pb2.CONSENT_BASIS_LICENSED,
}


T = TypeVar("T")


def choice(table: dict[str, T], value: str, what: str) -> T:
    """table[value], or a ValueError naming what may be chosen (not a bare KeyError)."""
    if value not in table:
        raise ValueError(f"{what} must be one of {', '.join(table)}, got {value!r}")
    return table[value]


def consent_record(
    *,
    subject: str,
    basis: str,
    collected_by: str,
    statement_version: str = "",
    document: bytes | str | Path | None = None,
    source: str = "",
    collect_time: float | None = None,
) -> avatar_pb2.ConsentRecord:
    """A consent record for create_avatar. basis: personal (with statement_version and the signed
    `document`, whose SHA-256 is sent, never the document), public-domain or licensed (with source)."""
    record = avatar_pb2.ConsentRecord(
        subject=subject,
        basis=choice(BASES, basis, "basis"),  # type: ignore[arg-type]
        collected_by=collected_by,
        statement_version=statement_version,
        source=source,
    )
    if document is not None:
        record.document_sha256 = hashlib.sha256(_file_bytes(document)).hexdigest()
    record.collect_time.FromNanoseconds(int((time.time() if collect_time is None else collect_time) * 1e9))
    return record


def demo_portrait_consent() -> avatar_pb2.ConsentRecord:
    """The consent record of facekit/assets/demo_portrait.png (demo, bench, tests): a NASA photograph."""
    return consent_record(
        subject="Eileen Collins, NASA astronaut portrait (facekit/assets/demo_portrait.png)",
        basis="public-domain",
        source="NASA photograph via scikit-image data.astronaut(); work of the US federal government",
        collected_by="talkinghead project",
        collect_time=1_764_547_200.0,  # 2025-12-01
    )


PRESETS = {
    "fast": ops.PERSONALISATION_PRESET_FAST,
    "balanced": ops.PERSONALISATION_PRESET_BALANCED,
    "best": ops.PERSONALISATION_PRESET_BEST,
}


def decode_frame(data: bytes, encoding: int, size: tuple[int, int]) -> np.ndarray:
    """A reply's frame bytes -> uint8 RGB (height, width, 3); size = (width, height)."""
    width, height = size
    if encoding == pb.OUTPUT_ENCODING_RAW_RGB:  # (a copy: writable, as a decoded JPEG's or PNG's is)
        return np.frombuffer(data, np.uint8).reshape(height, width, 3).copy()
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("cannot decode the frame")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def to_landmarks(points: np.ndarray) -> Landmarks:
    """(68, 2) pixel points -> the wire message."""
    return Landmarks(xy=np.asarray(points, np.float32).reshape(-1).tolist())


def operation_error(operation: ops.Operation) -> str:
    """'' for a successful (or unfinished) operation, else 'CODE: message' (google.rpc codes)."""
    if not operation.HasField("error"):
        return ""
    try:
        name = next(c.name for c in grpc.StatusCode if c.value[0] == operation.error.code)
    except StopIteration:
        name = f"CODE {operation.error.code}"
    return f"{name}: {operation.error.message}"


def describe_error(error: grpc.RpcError) -> str:
    """'CODE: message' of a failed call."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    return f"{code.name if code else 'ERROR'}: {details}"


@dataclass(frozen=True, kw_only=True)
class Frame:
    """One generated frame, decoded."""

    sequence: int
    capture_time_us: int
    image: np.ndarray  # uint8 (H, W, 3) RGB: (S, S) the face crop, or with paste_back the photo's size
    landmark_image: np.ndarray | None  # uint8 (S, S, 3) RGB, when requested
    timings: pb.StageTimings  # server-side microseconds per stage
    dropped_before: int
    batch_size: int
    face_missing: bool
    received: float  # time.perf_counter() when the reply arrived
    started: pb.StreamStarted | None = None  # this frame's stream's StreamStarted


def landmark_requests(
    seq: LandmarkSequence, *, pace: bool = False, start: int = 0, clock: bool = True
) -> Iterator[pb.AnimateRequest]:
    """A landmark sequence as stream requests (sequence numbers = frame index), optionally at its fps."""
    width, height = seq.frame_size
    t0 = time.perf_counter()
    for index, points in enumerate(seq.points):
        if pace:
            delay = t0 + index / seq.fps - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        frame = pb.LandmarkFrame(
            sequence=start + index,
            capture_time_us=int(time.perf_counter() * 1e6) if clock else 0,
            landmarks=to_landmarks(points),
            frame_width=width,
            frame_height=height,
        )
        yield pb.AnimateRequest(landmarks=frame)


def image_requests(
    frames: Iterable[np.ndarray], *, quality: int = 90, fps: float | None = None
) -> Iterator[pb.AnimateRequest]:
    """RGB frames (H, W, 3) as JPEG driving frames (sequence numbers = frame index): the server
    finds their landmarks. With `fps` they are sent at that rate, as a live source would send
    them (as landmark_requests(pace=True) does); without, as fast as they come."""
    if fps is not None and not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0, got {fps}")
    return _image_requests(frames, quality=quality, fps=fps)


def _image_requests(
    frames: Iterable[np.ndarray], *, quality: int, fps: float | None
) -> Iterator[pb.AnimateRequest]:
    t0 = time.perf_counter()
    for index, rgb in enumerate(frames):
        if fps is not None:
            delay = t0 + index / fps - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
        )
        assert ok
        frame = pb.DrivingFrame(
            sequence=index, capture_time_us=int(time.perf_counter() * 1e6), image=buf.tobytes()
        )
        yield pb.AnimateRequest(driving_frame=frame)


def _file_bytes(data: bytes | str | Path) -> bytes:
    return data if isinstance(data, bytes) else Path(data).read_bytes()


class _Calls(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the same metadata (the API key, an admin's tenant) to every call of a channel, and
    refuses calls once the Client is closed (gRPC said "Cannot invoke RPC on closed channel!")."""

    def __init__(self, metadata: Sequence[tuple[str, str]], closed: threading.Event) -> None:
        self.metadata, self.closed = list(metadata), closed

    def _details(self, details: Any) -> Any:
        if self.closed.is_set():
            method = str(details.method).rpartition("/")[2]
            raise ValueError(
                f"{method}: this Client is closed (close() or its with block ended); make a new one"
            )
        return details._replace(metadata=[*(details.metadata or ()), *self.metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def check_api_key(key: str) -> None:
    """ValueError unless `key` can go in a gRPC header: printable ASCII, no spaces around it (gRPC
    itself refuses anything else with an INTERNAL "Illegal header value", after connecting)."""
    bad = [c for c in key if not (" " <= c <= "~")]
    if bad:
        raise ValueError(
            f"the API key holds {len(bad)} character(s) that are not printable ASCII "
            f"(first {bad[0]!r}); an API key is printable ASCII"
        )
    if key != key.strip():
        raise ValueError("the API key starts or ends with a space")


def call_metadata(api_key: str | None = None, tenant: str | None = None) -> list[tuple[str, str]]:
    """Metadata that authenticates a call: the API key, and the tenant an admin acts for."""
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
    return metadata + ([("x-talkinghead-tenant", tenant)] if tenant else [])


class Client:
    def __init__(
        self,
        *,
        target: str = DEFAULT_SERVER,
        tls_ca: Path | None = None,
        timeout: float = 60.0,
        api_key: str | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tenant: str | None = None,
        keepalive_time: float = KEEPALIVE_TIME_S,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT_S,
    ) -> None:
        """`api_key`: sent as `authorization: Bearer ...` on every call; `tls_ca`: PEM root
        certificate(s) to verify the server with (TLS); `tls_cert`/`tls_key`: a client certificate
        (mTLS), given together: they imply TLS, verified with `tls_ca` or, without it, the system's
        roots; `tenant`: the tenant an admin key acts for. ValueError for a certificate without
        its key (or the reverse), or an API key that is not printable ASCII. `keepalive_time` /
        `keepalive_timeout` (s): HTTP/2 pings that end a call over a dead connection (UNAVAILABLE)."""
        if (tls_cert is None) != (tls_key is None):
            given, missing = ("tls_cert", "tls_key") if tls_key is None else ("tls_key", "tls_cert")
            raise ValueError(f"{given} needs {missing}: a client certificate and its key come together")
        if api_key is not None:
            check_api_key(api_key)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", round(keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", round(keepalive_timeout * 1000)),
            # Any ping unanswered (a bandwidth probe may be the one in flight, and holds the
            # keepalive's back) ends the connection as soon: gRPC's default waits 60 s.
            ("grpc.http2.ping_timeout_ms", round(keepalive_timeout * 1000)),
        ]
        if tls_ca is not None or tls_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes() if tls_ca is not None else None,
                private_key=Path(tls_key).read_bytes() if tls_key is not None else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert is not None else None,
            )
            channel = grpc.secure_channel(target, credentials, options=options)
        else:
            channel = grpc.insecure_channel(target, options=options)
        self._closed = threading.Event()
        self.channel = grpc.intercept_channel(channel, _Calls(call_metadata(api_key, tenant), self._closed))
        self._raw_channel = channel
        self.timeout = timeout
        self.avatars = avatar_pb2_grpc.AvatarServiceStub(self.channel)
        self.animation = animation_pb2_grpc.AnimationServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.operations = personalisation_pb2_grpc.PersonalisationServiceStub(self.channel)
        self.last_started: pb.StreamStarted | None = None

    def close(self) -> None:
        self._closed.set()
        self._raw_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """SERVING / NOT_SERVING / ... of the server (or one of its services); `timeout` (s): the
        call's deadline (default: the Client's)."""
        response = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=self.timeout if timeout is None else timeout,
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server reports SERVING, for `timeout` s at most (TimeoutError then: a
        server that does not answer at all holds no call past it)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (
                    self.health(timeout=max(0.01, min(self.timeout, deadline - time.monotonic())))
                    == "SERVING"
                ):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the server was not SERVING within {timeout:g} s")
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    # -- avatars ------------------------------------------------------------------------------
    def create_avatar(
        self,
        avatar_id: str,
        images: Sequence[bytes | str | Path],
        *,
        consent: avatar_pb2.ConsentRecord,
        landmarks: Sequence[np.ndarray | None] | None = None,
        display_name: str = "",
        replace: bool = False,
    ) -> avatar_pb2.Avatar:
        """Make an avatar from 1-32 encoded photos (bytes or file paths), optionally with landmarks each
        (`landmarks`: one (68, 2) array or None per photo), on the authority of `consent` (see
        consent_record)."""
        if landmarks is not None and len(landmarks) != len(images):
            raise ValueError(
                f"landmarks: one per image (or None), got {len(landmarks)} for {len(images)} images"
            )
        sources = []
        for index, image in enumerate(images):
            source = avatar_pb2.SourceImage(data=_file_bytes(image))
            if landmarks is not None and landmarks[index] is not None:
                source.landmarks.CopyFrom(to_landmarks(landmarks[index]))  # type: ignore[arg-type]
            sources.append(source)
        request = avatar_pb2.CreateAvatarRequest(
            avatar_id=avatar_id, images=sources, display_name=display_name, replace=replace, consent=consent
        )
        return self.avatars.CreateAvatar(request, timeout=self.timeout)

    def get_avatar(self, avatar_id: str, *, include_preview: bool = False) -> avatar_pb2.Avatar:
        request = avatar_pb2.GetAvatarRequest(avatar_id=avatar_id, include_preview=include_preview)
        return self.avatars.GetAvatar(request, timeout=self.timeout)

    def list_page(self, page_size: int = 0, page_token: str = "") -> avatar_pb2.ListAvatarsResponse:
        request = avatar_pb2.ListAvatarsRequest(page_size=page_size, page_token=page_token)
        return self.avatars.ListAvatars(request, timeout=self.timeout)

    def list_avatars(self, page_size: int = 0) -> Iterator[avatar_pb2.Avatar]:
        """Every avatar, fetching page after page."""
        token = ""
        while True:
            page = self.list_page(page_size, token)
            yield from page.avatars
            token = page.next_page_token
            if not token:
                return

    def delete_avatar(self, avatar_id: str) -> None:
        self.avatars.DeleteAvatar(avatar_pb2.DeleteAvatarRequest(avatar_id=avatar_id), timeout=self.timeout)

    # -- personalisation (long-running operations) ---------------------------------------------
    def personalise(
        self,
        avatar_id: str,
        *,
        steps: int | None = None,
        preset: str = "",
        wait: bool = False,
        on_progress: Callable[[ops.Operation], None] | None = None,
        timeout: float | None = None,
    ) -> ops.Operation:
        """Start fine-tuning the avatar's own generator (`steps`, 1-2000, or a preset: fast,
        balanced, best; default balanced). wait=True follows it (on_progress gets every update;
        TimeoutError after `timeout` s) and returns the finished operation; check `.error` /
        `.response` (see `operation_error`)."""
        request = ops.PersonaliseAvatarRequest(avatar_id=avatar_id)
        if steps is not None:  # 0 too: the service refuses it rather than running its default
            request.steps = steps
        elif preset:
            request.preset = choice(PRESETS, preset, "preset")
        operation: ops.Operation = self.operations.PersonaliseAvatar(request, timeout=self.timeout)
        if not wait:
            return operation
        # (on_progress: the watch's first message is the operation as it is now)
        return self.wait_operation(operation.name, on_progress=on_progress, timeout=timeout)

    def get_operation(self, name: str) -> ops.Operation:
        return self.operations.GetOperation(ops.GetOperationRequest(name=name), timeout=self.timeout)

    def list_operations(self, *, avatar_id: str = "", page_size: int = 0) -> Iterator[ops.Operation]:
        """Every operation (of one avatar), newest first, page after page."""
        token = ""
        while True:
            request = ops.ListOperationsRequest(avatar_id=avatar_id, page_size=page_size, page_token=token)
            page = self.operations.ListOperations(request, timeout=self.timeout)
            yield from page.operations
            token = page.next_page_token
            if not token:
                return

    def watch_operation(self, name: str, *, timeout: float | None = None) -> Iterator[ops.Operation]:
        """The operation now, then at each change, until done (a server stream); `timeout` (s):
        the whole watch's deadline (DEADLINE_EXCEEDED after it; default none)."""
        yield from self.operations.WatchOperation(ops.WatchOperationRequest(name=name), timeout=timeout)

    def wait_operation(
        self,
        name: str,
        *,
        on_progress: Callable[[ops.Operation], None] | None = None,
        timeout: float | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT_S,
        on_reconnect: Callable[[grpc.RpcError], None] | None = None,
    ) -> ops.Operation:
        """Follow an operation until it is done (TimeoutError after `timeout` s). A watch cut
        short (a replica restarting, the connection lost) resumes: the server is retried every
        second for up to `reconnect_timeout` s since it last answered (on_reconnect gets the
        error at the start of each outage), then its UNAVAILABLE error is raised; the operation
        goes on without the watcher, to be watched again later."""
        last: ops.Operation | None = None
        deadline = None if timeout is None else time.monotonic() + timeout
        lost: float | None = None  # when the server stopped answering (None: it answers)
        while last is None or not last.done:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"{name} was not done within {timeout:g} s")
            try:
                for operation in self.operations.WatchOperation(
                    ops.WatchOperationRequest(name=name), timeout=left
                ):
                    lost = None
                    last = operation
                    if on_progress is not None:
                        on_progress(operation)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(f"{name} was not done within {timeout:g} s") from error
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                now = time.monotonic()
                if lost is None:
                    lost = now
                    if on_reconnect is not None:
                        on_reconnect(error)
                if now - lost >= reconnect_timeout:
                    raise
                time.sleep(min(1.0, max(0.0, lost + reconnect_timeout - now)))
        return last

    def cancel_operation(self, name: str) -> ops.Operation:
        return self.operations.CancelOperation(ops.CancelOperationRequest(name=name), timeout=self.timeout)

    # -- animation ----------------------------------------------------------------------------
    def animate(
        self,
        avatar_id: str,
        requests: Iterable[pb.AnimateRequest],
        *,
        encoding: str = "jpeg",
        quality: int = 0,
        overflow: str = "block",
        motion: str = "absolute",
        queue_depth: int = 0,
        crop_to_face: bool = False,
        include_landmark_image: bool = False,
        paste_back: bool = False,
        smoothing: float | None = None,
        expected_fps: float = 0.0,
        timeout: float | None = None,
        join_timeout: float = REQUEST_THREAD_JOIN_S,
    ) -> Generator[Frame, None, None]:
        """Stream `requests` (landmark_requests / image_requests) -> decoded frames, in order.

        overflow "block" (default) loses nothing (offline rendering); "drop-oldest" keeps latency
        bounded for live input. paste_back returns the avatar's whole source photo with the face
        blended in; smoothing (a One-Euro min_cutoff_hz, 0.01-30 Hz, e.g. 1.0; None or 0: off)
        filters driver jitter. Each Frame carries its stream's StreamStarted (`started`), also
        kept in `self.last_started` (the latest stream's of this Client). `timeout` (s): the whole
        stream's deadline (DEADLINE_EXCEEDED after it; default none). ValueError at once for an
        encoding, overflow or motion that is none of the choices.

        An exception `requests` raises ends the stream and is raised here, as it was raised (not
        gRPC's UNKNOWN "Exception iterating requests!"). The stream stops pulling `requests` when
        the call ends (done, failed, or the caller stops iterating: the call is then cancelled),
        and the thread gRPC pulls them on is waited for, up to `join_timeout` s: none of the
        caller's code runs after this returns or raises, unless `requests` is blocked for longer
        (a source waiting for its next frame holds the end until it yields, or join_timeout).
        """
        config = pb.StreamConfig(
            avatar_id=avatar_id,
            encoding=choice(ENCODINGS, encoding, "encoding"),  # type: ignore[arg-type]
            quality=quality,
            overflow=choice(OVERFLOW, overflow, "overflow"),  # type: ignore[arg-type]
            motion=choice(MOTION, motion, "motion"),  # type: ignore[arg-type]
            queue_depth=queue_depth,
            crop_to_face=crop_to_face,
            include_landmark_image=include_landmark_image,
            paste_back=paste_back,
            expected_fps=expected_fps,
        )
        if smoothing:  # the server reads an absent filter as off, and 0 Hz as its default, 1.0
            config.smoothing.min_cutoff_hz = smoothing
        return self._animate(config, requests, timeout, join_timeout)

    def _animate(
        self,
        config: pb.StreamConfig,
        requests: Iterable[pb.AnimateRequest],
        timeout: float | None,
        join_timeout: float,
    ) -> Generator[Frame, None, None]:
        # gRPC pulls `requests` on a thread of its own, which would go on running the caller's
        # code (decoding, encoding, pacing) after the call ended. When the interpreter exits
        # meanwhile (the CLI, on an error) that thread is torn down inside it: C++ code (OpenCV,
        # FFmpeg) aborts the process (SIGABRT, "terminate called without an active exception").
        # So the stream stops taking requests when the call ends and the thread is waited for.
        stop = threading.Event()
        lock = threading.Lock()
        pulling: list[threading.Thread] = []  # the thread that runs stream(), once it started
        failed: list[Exception] = []  # what `requests` raised
        calls: list[Any] = []

        def stream() -> Iterator[pb.AnimateRequest]:
            with lock:
                if stop.is_set():
                    return
                pulling.append(threading.current_thread())
            try:
                yield pb.AnimateRequest(config=config)
                for request in requests:
                    if stop.is_set():
                        return
                    yield request
            except Exception as error:  # the caller's source failed: the call ends, and says why
                failed.append(error)
                with lock:
                    stop.set()
                    if not calls:
                        raise  # (before the call was made: gRPC cancels it)
                calls[0].cancel()
            finally:
                close = getattr(requests, "close", None)
                if close is not None and stop.is_set():
                    close()  # a generator (an open video): released on this thread

        call = self.animation.Animate(stream(), timeout=timeout)
        with lock:
            calls.append(call)
        try:
            started: pb.StreamStarted | None = None
            for response in call:
                if response.HasField("started"):
                    self.last_started = started = response.started
                    continue
                f = response.frame
                side = started.image_size if started is not None else 0  # the landmark images' side
                yield Frame(
                    sequence=f.sequence,
                    capture_time_us=f.capture_time_us,
                    image=decode_frame(f.image, f.encoding, (f.width, f.height)),
                    landmark_image=decode_frame(f.landmark_image, f.encoding, (side, side))
                    if f.landmark_image
                    else None,
                    timings=f.timings,
                    dropped_before=f.dropped_before,
                    batch_size=f.batch_size,
                    face_missing=f.face_missing,
                    received=time.perf_counter(),
                    started=started,
                )
            if failed:  # (the server ended the stream first)
                raise failed[0]
        except grpc.RpcError:
            if failed:  # (the call ended because the caller's source raised: that is the error)
                raise failed[0] from None
            raise
        finally:
            with lock:
                stop.set()
            call.cancel()  # nothing when it has ended; else the server hears that the client left
            for thread in pulling:
                if thread is not threading.current_thread():
                    thread.join(join_timeout)
