"""One Animate stream: config -> reader task (parse, map, rasterize, queue) -> ordered replies.

    reader task:  request -> landmarks (parsed, or decoded + detected in the detect pool)
                  -> DrivingMapper -> WorkItem -> StreamQueue.put (may drop/block)
    batcher:      draw_landmarks (only frames that are not dropped) -> generator call
    reply loop:   oldest outstanding frame -> await its batch -> encode -> AnimateResponse

A bad frame stops the reader; frames read before it are still delivered, then the stream ends with
the error's status. A client that sends nothing (no frame, no keepalive) for `idle_timeout`
seconds while the stream owes it no reply ends the stream with DEADLINE_EXCEEDED (a client that
stops taking replies is caught by the servicer's write deadline). `end(error)` ends it from outside
(App: its avatar was deleted or replaced): no frame is sent after it. Whatever ends the stream
(client cancel, error, idle, its avatar changed, server shutdown), `close()` releases the queue and
the stream slot exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from api.talkinghead.v1 import animation_pb2 as pb
from facekit.contract import ModelInfo
from facekit.pasteback import Portrait, paste_back
from facekit.smoothing import OneEuro, OneEuroParams
from facekit.warp import warp_nearest
from service.backends.base import BackendUnavailable
from service.batcher import BatchResult, StreamQueue, WorkItem
from service.capacity import expected_fps
from service.driving import DrivingMapper
from service.errors import ServiceError, backend_unavailable, detached, idle, invalid, precondition
from service.images import encode_frame
from service.landmarks import check_frame_size, parse_points
from service.metrics import DROPPED_QUOTA, LIVE, OFFLINE, Metrics

log = logging.getLogger("talkinghead.service.stream")
DEFAULT_DEPTH, MAX_DEPTH = 4, 64
# Replies a stream may owe (frames queued, in the generator, or dropped and not yet told) before
# its reader waits: a live client that stopped reading its replies (its writes stalled) while it
# kept sending made the reader append an entry a request until the write deadline (186,000 frames:
# +136-190 MB of RSS, helper-74). Above any queue depth and what the generator holds of a stream.
MAX_OWED = 2 * MAX_DEPTH
# A live stream reserves its expected_fps of the measured capacity, and gets it: it is read at most
# at RATE_SLACK x that rate (after a burst of RATE_BURST_S of frames); what it sends faster waits in
# gRPC's flow control, not in the generator. Admission trusted the declared rate: three streams
# declaring 1 fps and sending all they could took ~20 fps each, and an honest 25 fps stream beside
# them went from p50 22 ms, no drops, to p50 157 ms with half its frames dropped (helper-74).
RATE_SLACK, RATE_BURST_S = 1.25, 1.0
# The lowest JPEG quality served: at 20 the frames' watermark was found in 6 of 10 (128 px crop), at
# 30 in 10 of 10 at scores 6.9-9.7 (threshold 6), at 50 9.4-11.3 on the demo avatar; but on a
# brightened one (x1.6, its highlights clipped) 22 of 24 128 px crops at 50 (lowest 5.22), 24 of 24
# at 60 (lowest 6.36) and its paste-back frames 6.41-6.79 at 50, 6.74-7.14 at 60.
MIN_JPEG_QUALITY = 60
INLINE_ENCODE_MAX = 256  # frames up to this side are encoded on the event loop (~0.2 ms), larger in a pool


async def next_request(iterator: AsyncIterator[pb.AnimateRequest]) -> pb.AnimateRequest | None:
    """The next request, None at the end of the stream."""
    return await anext(iterator, None)


def _us(seconds: float) -> int:
    return max(0, min(int(seconds * 1e6), 2**32 - 1))


@dataclass(eq=False, kw_only=True)
class Outstanding:
    """A frame read from the client whose reply is not sent yet."""

    sequence: int
    capture_time_us: int
    read: float  # perf_counter when the request was read
    decode_s: float = 0.0
    landmarks_s: float = 0.0
    rasterize_s: float = 0.0
    face_missing: bool = False
    item: WorkItem | None = None  # set once the frame is queued

    @property
    def work(self) -> WorkItem:
        assert self.item is not None
        return self.item


@dataclass(kw_only=True)
class StreamSetup:
    config: pb.StreamConfig
    encoding: int
    quality: int
    depth: int
    block: bool
    fps: float  # config.expected_fps checked (0 -> the default): what a live stream reserves


def check_config(config: pb.StreamConfig) -> StreamSetup:
    encoding = config.encoding or pb.OUTPUT_ENCODING_JPEG
    if encoding not in pb.OutputEncoding.values():
        raise invalid(f"config.encoding: unknown value {encoding}")
    if config.overflow not in pb.OverflowPolicy.values():
        raise invalid(f"config.overflow: unknown value {config.overflow}")
    if config.motion not in pb.MotionMode.values():
        raise invalid(f"config.motion: unknown value {config.motion}")
    if encoding == pb.OUTPUT_ENCODING_JPEG and not (
        config.quality == 0 or MIN_JPEG_QUALITY <= config.quality <= 100
    ):
        raise invalid(
            f"config.quality: JPEG quality must be {MIN_JPEG_QUALITY}-100 (0 = default 90; below "
            f"{MIN_JPEG_QUALITY} the frames' watermark is not reliably found), got {config.quality}"
        )
    if encoding == pb.OUTPUT_ENCODING_PNG and not 0 <= config.quality <= 9:
        raise invalid(f"config.quality: PNG level must be 0-9 (0 = default 1), got {config.quality}")
    if not 0 <= config.queue_depth <= MAX_DEPTH:
        raise invalid(
            f"config.queue_depth must be 1-{MAX_DEPTH} (0 = default {DEFAULT_DEPTH}), "
            f"got {config.queue_depth}"
        )
    if config.HasField("neutral") and config.motion != pb.MOTION_MODE_RELATIVE:
        raise invalid("config.neutral is only used with motion = MOTION_MODE_RELATIVE")
    if config.crop_to_face and config.motion == pb.MOTION_MODE_RELATIVE:  # (it was ignored)
        raise invalid("config.crop_to_face is only used with motion = MOTION_MODE_ABSOLUTE")
    if config.HasField("smoothing"):
        cutoff, beta = config.smoothing.min_cutoff_hz, config.smoothing.beta
        # a float field: the 0.01 a client sends arrives as float32(0.01), just below the double
        if not (cutoff == 0 or np.float32(0.01) <= cutoff <= 30):
            got = str(np.float32(cutoff))  # as sent: 0.0099, not 0.00989999994635582
            raise invalid(f"config.smoothing.min_cutoff_hz must be 0.01-30 (0 = default 1.0), got {got}")
        if config.smoothing.HasField("beta") and not 0 <= beta <= 100:
            raise invalid(f"config.smoothing.beta must be 0-100, got {np.float32(beta)}")
    return StreamSetup(
        config=config,
        encoding=encoding,
        quality=config.quality,
        depth=config.queue_depth or DEFAULT_DEPTH,
        block=config.overflow == pb.OVERFLOW_POLICY_BLOCK,
        fps=expected_fps(config.expected_fps),
    )


def driving_mapper(config: pb.StreamConfig, info: ModelInfo, avatar_points: np.ndarray) -> DrivingMapper:
    """The stream's mapping of driving landmarks into the model's crop (config.neutral checked here)."""
    neutral = None
    if config.HasField("neutral"):
        size = check_frame_size(
            config.neutral_frame_width, config.neutral_frame_height, what="config.neutral"
        )
        neutral = (parse_points(config.neutral.xy, what="config.neutral", frame=size), size)
    return DrivingMapper(
        size=info.image_size,
        relative=config.motion == pb.MOTION_MODE_RELATIVE,
        crop_to_face=config.crop_to_face,
        crop_scale=info.crop_scale,
        avatar_points=avatar_points,
        neutral=neutral,
    )


def smoother(config: pb.StreamConfig) -> OneEuro | None:
    """The stream's landmark filter (config.smoothing, checked by check_config), or None."""
    if not config.HasField("smoothing"):
        return None
    s = config.smoothing
    defaults = OneEuroParams()
    return OneEuro(
        OneEuroParams(
            min_cutoff=s.min_cutoff_hz or defaults.min_cutoff,
            beta=s.beta if s.HasField("beta") else defaults.beta,
        )
    )


def warp_one(refs: np.ndarray, ref_points: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The avatar's reference nearest to crop points (68, 2), warped onto them: (S, S, 3) uint8."""
    return warp_nearest(refs, ref_points, points[None])[0]


def _detached(error: BaseException) -> ServiceError:
    """A failed frame's error as a new ServiceError: the batch's exception (and the frames of its
    traceback) stays with the batch, not with this stream's reply loop."""
    if isinstance(error, BackendUnavailable):
        return backend_unavailable(error.reason)
    if isinstance(error, ServiceError):
        return detached(error)
    log.error("frame failed: %s: %s", type(error).__name__, error, exc_info=error)
    return ServiceError(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")


@dataclass(frozen=True, kw_only=True)
class DrivingLandmarks:
    """A driving image, decoded and searched for a face."""

    size: tuple[int, int]  # (width, height) of the decoded image
    points: np.ndarray | None  # (68, 2) of the largest face, None when no face was found
    decode_s: float
    landmarks_s: float


# (image bytes, what) -> the image's landmarks: App.driving_landmarks (the detect pool)
FindLandmarks = Callable[[bytes, str], Awaitable[DrivingLandmarks]]


@dataclass(eq=False, kw_only=True)
class Stream:
    """One admitted stream (App.open_stream makes it) and only what it uses: its queue in the
    batcher, the model's landmark drawing, landmark finding for driving images, the metrics, and
    `release`, which gives the stream slot back to App (called once, by close)."""

    setup: StreamSetup
    adain: np.ndarray | None  # (D,) for the shared generator, None for a personalised one
    model: str
    mapper: DrivingMapper
    queue: StreamQueue
    started: pb.StreamStarted
    draw: Callable[[np.ndarray], np.ndarray]  # crop points (68, 2) -> landmark image (S, S, 3) uint8
    warp: Callable[[np.ndarray], np.ndarray] | None  # crop points -> warped reference (warp-guided)
    portrait: Portrait | None  # paste_back: the source photo the face is blended into (box marked)
    paste_region: str  # facekit.pasteback region: "crop" (warp-guided G) or "face"
    smoother: OneEuro | None  # config.smoothing
    mark: Callable[[np.ndarray], np.ndarray]  # the watermark of the stream's tenant and avatar (App._marker)
    find_landmarks: FindLandmarks
    metrics: Metrics
    # the tenant's frame rate quota (True: the same frame asks again): 0.0 = go, else seconds to wait
    pace: Callable[[bool], float]
    release: Callable[[str], None]  # the gRPC status code name the stream ended with
    idle_timeout: float  # Settings.stream_idle_timeout
    outstanding: collections.deque[Outstanding] = field(default_factory=collections.deque)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    popped: asyncio.Event = field(default_factory=asyncio.Event)  # the reply loop took one off
    error: ServiceError | None = None  # what ended the reader (copied: no traceback, no cycle)
    ended: ServiceError | None = None  # `end`: the stream is over whatever the reader does
    reading_done: bool = False
    dropped_total: int = 0
    closed: bool = False
    last_seen: tuple[np.ndarray, tuple[int, int]] | None = (
        None  # driving: the last face found and its frame size
    )
    _tokens: float | None = None  # the live rate's bucket: frames it may still send now (None: full)
    _refilled: float = 0.0  # perf_counter() of its last refill
    _waiting_since: float | None = None  # loop.time() when the reader began waiting for a request
    _watchdog: asyncio.TimerHandle | None = None
    _idle: bool = False  # the watchdog ended the read

    def end(self, error: ServiceError) -> None:
        """End the stream from outside (its avatar was deleted or replaced): the reply loop sends
        no frame from now on and raises `error` (the servicer then stops the reader and closes)."""
        if self.ended is None:
            self.ended = error
        self.changed.set()

    def close(self, code: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.close()
        self.release(code)

    # -- reading ------------------------------------------------------------------------------
    async def read(self, requests: AsyncIterator[pb.AnimateRequest]) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.current_task()
        assert reader is not None
        # One timer for the stream, not a timed wait per request: a task and a timed wait per
        # request cost the event loop more than parsing the request did.
        self._waiting_since = loop.time()
        self._watchdog = loop.call_later(self.idle_timeout, self._watch_idle, reader)
        try:
            async for request in requests:
                self._waiting_since = None
                await self._handle(request)
                self._waiting_since = loop.time()
        except asyncio.CancelledError:
            if not self._idle:
                raise
            reader.uncancel()  # the watchdog's cancel, not the stream's: the stream ends as idle
            self.error = idle(self.idle_timeout)
        except ServiceError as error:
            # a copy without the traceback: the stream keeps it, and its frames refer to the stream
            self.error = detached(error)
        except Exception as error:
            if not self.closed:  # a closed queue refuses frames: the stream is ending anyway
                log.error("stream reader failed: %s: %s", type(error).__name__, error, exc_info=error)
                self.error = ServiceError(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self.reading_done = True
            self.changed.set()

    async def _handle(self, request: pb.AnimateRequest) -> None:
        read = time.perf_counter()
        kind = request.WhichOneof("message")
        # received before the quota may drop it: received - sent - dropped stays >= 0
        if kind == "landmarks":
            self.metrics.received["landmarks"].inc()
        elif kind == "driving_frame":
            self.metrics.received["image"].inc()
        if kind in ("landmarks", "driving_frame"):
            read = await self._within_rate(read)
            if not await self._within_quota(read):
                return
        if kind == "landmarks":
            await self._landmark_frame(request.landmarks, read)
        elif kind == "driving_frame":
            await self._driving_frame(request.driving_frame, read)
        elif kind == "config":
            raise precondition("the stream is already configured; send config only once, first")
        elif kind is None:
            raise invalid("empty AnimateRequest: set config, landmarks, driving_frame or keepalive")
        # keepalive: nothing to do

    def _watch_idle(self, reader: asyncio.Task[None]) -> None:
        """The reader's idle timer: waiting idle_timeout for a request while no reply is owed (since
        the last request, or the last owed reply if later) ends the stream (the read is cancelled:
        a request stream cannot be read on after that); while a request is being handled or
        replies are owed, it looks again idle_timeout later, and after a recent request when
        idle_timeout will have passed since."""
        loop = asyncio.get_running_loop()
        quiet = 0.0 if self._waiting_since is None else loop.time() - self._waiting_since
        if quiet < self.idle_timeout or self.outstanding:
            wait = self.idle_timeout - quiet if 0.0 < quiet < self.idle_timeout else self.idle_timeout
            self._watchdog = loop.call_later(wait, self._watch_idle, reader)
            return
        self._idle = True
        reader.cancel()

    async def _within_rate(self, read: float) -> float:
        """A live stream's frame, taken at most at RATE_SLACK x the rate it reserved (a token bucket
        of RATE_BURST_S of frames): beyond it the reader waits (nothing is dropped for it; the
        batcher's overflow and late drops still apply). The frame's read time, after any wait."""
        if self.setup.block:
            return read
        rate = self.setup.fps * RATE_SLACK
        burst = max(rate * RATE_BURST_S, float(self.setup.depth))
        tokens = burst if self._tokens is None else min(burst, self._tokens + (read - self._refilled) * rate)
        if tokens < 1.0:
            await asyncio.sleep((1.0 - tokens) / rate)
            read, tokens = time.perf_counter(), 1.0
        self._tokens, self._refilled = tokens - 1.0, read
        return read

    async def _drop(self, read: float, reason: str) -> None:
        """A live stream's frame dropped before it was parsed: owed as a reply slot, so that the
        next reply counts it in dropped_before."""
        await self._room()
        dropped = Outstanding(sequence=-1, capture_time_us=0, read=read)
        dropped.item = WorkItem(points=np.zeros((68, 2), np.float32), draw=self.draw, adain=None, model="")
        dropped.item.future.cancel()
        self.outstanding.append(dropped)
        self.changed.set()
        self.metrics.on_drop(reason)

    async def _within_quota(self, read: float) -> bool:
        """The tenant's frames-per-second quota: a blocking stream waits for its turn, a live one
        drops the frame (the client sees it in the next reply's dropped_before)."""
        retry = False
        while (wait := self.pace(retry)) > 0.0:
            if not self.setup.block:
                await self._drop(read, DROPPED_QUOTA)
                return False
            await asyncio.sleep(wait)
            retry = True
        return True

    async def _landmark_frame(self, frame: pb.LandmarkFrame, read: float) -> None:
        what = f"frame {frame.sequence}"
        size = check_frame_size(frame.frame_width, frame.frame_height, what=what)
        points = parse_points(frame.landmarks.xy, what=f"{what} landmarks", frame=size)
        pending = Outstanding(sequence=frame.sequence, capture_time_us=frame.capture_time_us, read=read)
        await self._enqueue(points, size, pending)

    async def _driving_frame(self, frame: pb.DrivingFrame, read: float) -> None:
        what = f"driving frame {frame.sequence}"
        found = await self.find_landmarks(frame.image, what)
        self.metrics.stage["decode"].observe(found.decode_s)
        self.metrics.stage["landmarks"].observe(found.landmarks_s)
        if found.points is not None:
            self.last_seen = (found.points, found.size)
        elif self.last_seen is None:
            raise precondition(f"{what}: no face found in the stream's first driving frame")
        # no face: the last one found holds its pose, in the frame it was found in (mapped with
        # this frame's size, a face from a 512 px frame shrank to a corner of a 2048 px one)
        points, size = self.last_seen
        pending = Outstanding(
            sequence=frame.sequence,
            capture_time_us=frame.capture_time_us,
            read=read,
            decode_s=found.decode_s,
            landmarks_s=found.landmarks_s,
            face_missing=found.points is None,
        )
        await self._enqueue(points, size, pending)

    async def _enqueue(self, points: np.ndarray, size: tuple[int, int], pending: Outstanding) -> None:
        t0 = time.perf_counter()
        if self.smoother is not None:
            t = pending.capture_time_us / 1e6 if pending.capture_time_us > 0 else pending.read
            points = self.smoother.filter(points, t)
        crop_points = self.mapper(points, size)
        pending.rasterize_s = time.perf_counter() - t0  # motion mapping; drawing is added when drawn
        pending.item = WorkItem(
            points=crop_points, draw=self.draw, warp=self.warp, adain=self.adain, model=self.model
        )
        await self._room()
        self.outstanding.append(pending)
        self.changed.set()
        await self.queue.put(pending.item)

    async def _room(self) -> None:
        """Wait while the stream owes MAX_OWED replies: its client is not taking them. gRPC's flow
        control then holds the client's sends, until the reply loop goes on or the write deadline
        ends the stream."""
        while len(self.outstanding) >= MAX_OWED:
            self.popped.clear()
            await self.popped.wait()

    # -- replying -----------------------------------------------------------------------------
    async def replies(self) -> AsyncIterator[pb.AnimateResponse]:
        loop = asyncio.get_running_loop()
        dropped_before = 0
        while True:
            if self.ended is not None:
                raise detached(self.ended)
            if not self.outstanding:
                if self.reading_done:
                    break
                self.changed.clear()
                await self.changed.wait()
                continue
            head = self.outstanding[0]
            future = head.work.future
            if not future.done():
                try:
                    await future  # (not asyncio.wait: a waiter future and callbacks per frame)
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if not future.cancelled() or (current is not None and current.cancelling()):
                        raise  # this stream is being cancelled; else its frame was dropped
                except Exception:  # the frame failed: its error is taken from the future below
                    pass
            self.outstanding.popleft()
            self.popped.set()
            if not self.outstanding and self._waiting_since is not None:
                # the idle timeout runs while no reply is owed: from now, not from the last request
                self._waiting_since = loop.time()
            if future.cancelled():  # dropped by the overflow policy
                dropped_before += 1
                self.dropped_total += 1
                continue
            if self.ended is not None:  # (ended while its frame was in the generator)
                raise detached(self.ended)
            error = future.exception()
            if error is not None:
                self.queue.delivered()
                raise _detached(error)
            response = await self._reply(head, future.result(), dropped_before)
            if self.ended is not None:  # (ended while the frame was encoded in a thread)
                raise detached(self.ended)
            dropped_before = 0
            yield response
            self.queue.delivered()
        if self.error is not None:  # raised as a copy: the stored one gets no traceback
            raise detached(self.error)

    async def _reply(self, head: Outstanding, result: BatchResult, dropped_before: int) -> pb.AnimateResponse:
        setup = self.setup
        t0 = time.perf_counter()
        inline = self.portrait is None and result.image.shape[0] <= INLINE_ENCODE_MAX
        if inline:
            data = self._finish(result.image, head.work.points)
        else:
            data = await asyncio.to_thread(self._finish, result.image, head.work.points)
        lmk = b""
        if setup.config.include_landmark_image:
            lmk = encode_frame(head.work.render(), setup.encoding, setup.quality)
        done = time.perf_counter()
        encode_s, queue_s, total_s = done - t0, result.taken - head.work.enqueued, done - head.read
        rasterize_s = head.rasterize_s + head.work.rasterize_s
        metrics = self.metrics
        stage = metrics.stage
        stage["rasterize"].observe(rasterize_s)
        stage["encode"].observe(encode_s)
        stage["end_to_end"].observe(total_s)
        metrics.frame[OFFLINE if setup.block else LIVE].observe(total_s)
        metrics.queue_seconds.observe(queue_s)
        metrics.frames_sent.inc()
        return pb.AnimateResponse(
            frame=pb.AnimatedFrame(
                sequence=head.sequence,
                capture_time_us=head.capture_time_us,
                image=data,
                encoding=setup.encoding,  # type: ignore[arg-type]  # a checked OutputEncoding value
                width=self.started.output_width,
                height=self.started.output_height,
                timings=pb.StageTimings(
                    decode_us=_us(head.decode_s),
                    landmarks_us=_us(head.landmarks_s),
                    rasterize_us=_us(rasterize_s),
                    queue_us=_us(queue_s),
                    inference_us=_us(result.inference_s),
                    encode_us=_us(encode_s),
                    total_us=_us(total_s),
                ),
                dropped_before=dropped_before,
                dropped_total=self.dropped_total,
                batch_size=result.batch_size,
                face_missing=head.face_missing,
                landmark_image=lmk,
            )
        )

    def _finish(self, face: np.ndarray, points: np.ndarray) -> bytes:
        """The frame the client gets: pasted into the portrait (paste_back), watermarked, encoded.

        In paste-back the generated crop is marked before it is pasted (+0.1 ms at 128 px) into a
        portrait whose crop box carries the same mark (App._portrait): the face cut out of the
        frame at its crop box then carries a mark of its own (the whole frame's is ~3 x too large
        there for the detector's 85% search), and the whole frame is marked after, as without."""
        if self.portrait is None:
            frame = face
        else:
            frame = paste_back(self.portrait, self.mark(face), points, region=self.paste_region)
        return encode_frame(self.mark(frame), self.setup.encoding, self.setup.quality)


@dataclass(eq=False, kw_only=True)
class Watch:
    """A stream opening or open on an avatar, in App's OpenStreams: ended when the avatar record it
    streams is deleted or replaced (here or on another replica)."""

    avatar_id: str  # the stored id
    stamp: str | None = None  # contract.avatar_stamp of the record it streams, once read
    stale: bool = False  # the avatar changed while its record was being read: read it again
    ended: ServiceError | None = None
    stream: Stream | None = None

    def end(self, error: ServiceError) -> None:
        if self.ended is None:
            self.ended = error
        if self.stream is not None:
            self.stream.end(error)


class OpenStreams:
    """Streams by stored avatar id, from before their record is read until they close."""

    def __init__(self) -> None:
        self._by_avatar: dict[str, set[Watch]] = {}

    def watch(self, avatar_id: str) -> Watch:
        watch = Watch(avatar_id=avatar_id)
        self._by_avatar.setdefault(avatar_id, set()).add(watch)
        return watch

    def attach(self, watch: Watch, stream: Stream) -> None:
        """The stream is made: one ended while it opened ends now."""
        watch.stream = stream
        if watch.ended is not None:
            stream.end(watch.ended)

    def forget(self, watch: Watch) -> None:
        """The stream closed (or never opened): no longer followed. Its link to the stream goes
        too: the stream's `release` holds the watch, so the two were a reference cycle that kept
        each closed stream's frames and portrait until the cyclic GC ran (+78 MiB for 24 failed
        paste-back streams with it off: tests/test_service_memory.py)."""
        watch.stream = None
        watches = self._by_avatar.get(watch.avatar_id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._by_avatar[watch.avatar_id]

    def of(self, avatar_id: str) -> list[Watch]:
        return list(self._by_avatar.get(avatar_id, ()))

    def avatars(self) -> list[str]:
        return list(self._by_avatar)

    def __len__(self) -> int:
        return sum(map(len, self._by_avatar.values()))
