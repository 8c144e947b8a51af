"""Cross-stream batching: frames of many streams (and avatars) share generator calls; order per stream.

Each stream owns a `StreamQueue`: a bounded deque of frames waiting for the generator, and a count
of frames taken but not yet delivered (`in_flight`, bounded too, so a client that stops reading
cannot make results pile up). The `Batcher` task loops: take frames round-robin (least recently
served first) from the queues of streams with room - all for the same model: the shared generator
(frames of any avatar, each with its own psi) or one personalised generator - up to `max_batch`, and
start a call task that draws their landmark images and, for a warp-guided model, warps each avatar's
reference onto them (a frame dropped while waiting is never drawn), runs them as one call and
resolves each frame's future. When inference runs elsewhere (Triton, a GPU:
`Backend.remote_inference`) drawing runs on a small thread pool, off the event loop, and is
pipelined with inference: while a model's batch is in the generator, its next batch is collected and
drawn, timed to be ready as the call ends (a batch of 16 takes ~16 ms to draw and warp on one CPU
core, time a GPU would sit idle). In-process on the CPU it is not: drawing and inference share the
cores, and overlapping them on 2 cores left throughput where it was and made live frames slower
(BENCHMARKS.md). There, a generator that runs calls side by side in lanes (`Backend.lanes`: an
engine's calls each on a share of the cores, facekit/engines.py) is handed a batch per lane and two
more (engines.in_flight): one waits in the engine and starts the moment a lane frees, the other
waits its turn and is started by the call that ends, so a lane never waits for this loop to collect
and draw the next; a batch with live frames may be one more still and goes before waiting offline
ones (`priority`, engines.Turns), so a live frame beside offline work waits for a lane behind at
most the one call queued in the engine, not first for a call to end. Each model has at most that
many batches in the generator (pipelined, one per lane - a remote model's instances - and, with
several, one more queued in Triton, where live calls go before offline ones, and one being drawn),
and all models together
`max_concurrent` calls in the generator, so a slow batch of one model (a personalised generator, a
stalled call waiting for its deadline) never holds up the batches of another. No timer: a model's
next batch is whatever arrived while its previous one ran, so one stream gets batch 1 and its lowest
latency, while load grows batches (and throughput) by itself. A stream's frames leave its queue in
order; batches in lanes may finish out of order, and the stream's reply loop awaits its frames in
order (service/stream.py), so replies stay in order.

Overflow: with DROP_OLDEST a full queue discards its oldest waiting frame (counted, reported in the
next reply); with BLOCK `put` waits for room, which stops the stream's reader and lets gRPC flow
control push back on the client.

Latency budget (live streams, service/capacity.py): every call feeds a cost model (seconds per
call by batch size); batches are capped at the size whose call fits BATCH_SHARE of the budget, a
live frame that would come out of its batch past the budget is dropped before inference when a
newer frame of its stream waits behind it (the newest is always drawn), and live
streams' frames are taken before offline (BLOCK) ones, which use what is left (an offline stream
whose oldest frame has waited BLOCK_STARVE_S gets one frame beside the live ones in every batch,
and goes before them once where it got none for as long, so offline streams slow down but never
stop; engines.Turns does the same for an offline call waiting for a lane).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from facekit import engines
from facekit.cpus import usable_cpus
from service.backends.base import EXPECTED_S, Backend
from service.capacity import BATCH_SHARE, CostModel
from service.metrics import DROPPED_LATE, DROPPED_OVERFLOW

log = logging.getLogger("talkinghead.service.batcher")
SHARED = ""  # model key of the shared generator; personalised models: personalised_key


def personalised_key(avatar_id: str, made_for: str) -> str:
    """The model key of the streams on `generator_<avatar_id>` opened on the avatar record stamped
    `made_for` (contract.avatar_stamp): frames of a record that replaced it under the same id are
    never batched with theirs, and the backend is asked for that record's generator only."""
    return f"{avatar_id}@{made_for}"


def split_key(model: str) -> tuple[str, str]:
    """(avatar id, made_for) of a personalised model key."""
    avatar_id, _, made_for = model.partition("@")
    return avatar_id, made_for


# Generator calls in flight at once: the shared model's (up to 5 in 2 lanes) and another model's.
MAX_CONCURRENT_CALLS = 6
RENDER_THREADS = min(4, usable_cpus())  # draw and warp a batch's frames in parallel (the pod's CPUs)
RENDER_CHUNK = 4  # frames per drawing job: a batch of 16 spreads over 4 threads
_DRAW_WEIGHT = 0.3  # of the newest batch in the running mean of drawing time per frame
LATE_SHARE = 0.6  # of the budget a live frame may take to its generated image, when a newer one waits
BLOCK_STARVE_S = 1.0  # an offline frame waiting this long is taken beside live ones: never starved
# Of the backend's deadline (Backend.timeout_s) one batch may be expected to cost: offline batches
# of TALKINGHEAD_MAX_BATCH 48 cost 1.7 s on a busy 2-core machine and could pass the 5 s deadline
# (both streams ended UNAVAILABLE); capped at 1 s of the 5 they cannot, and their calls stay
# under the stall threshold (base.STALL_FACTOR x the expected cost).
TIMEOUT_SHARE = 0.2


@dataclass(eq=False, kw_only=True)
class WorkItem:
    points: np.ndarray  # (68, 2) float32 landmarks in the model's S x S crop
    draw: Callable[[np.ndarray], np.ndarray]  # points -> landmark image (S, S, 3) uint8
    adain: np.ndarray | None  # (D,) float32 for the shared generator, None for a personalised one
    model: str  # SHARED or a personalised generator's personalised_key
    warp: Callable[[np.ndarray], np.ndarray] | None = None  # points -> the avatar's warped reference
    landmark_image: np.ndarray | None = None  # drawn when the batcher takes the frame
    warped: np.ndarray | None = None  # warped when the batcher takes the frame (warp-guided models)
    live: bool = False  # of a live (DROP_OLDEST) stream: its call goes before offline ones
    rasterize_s: float = 0.0
    enqueued: float = field(default_factory=time.perf_counter)
    future: asyncio.Future[BatchResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    dropped: bool = False

    def render(self) -> np.ndarray:
        """The landmark image, drawn on first use: a frame dropped while waiting is never drawn.
        With `warp`, the avatar's reference is warped onto the points then too."""
        if self.landmark_image is None:
            t0 = time.perf_counter()
            self.landmark_image = self.draw(self.points)
            if self.warp is not None:
                self.warped = self.warp(self.points)
            self.rasterize_s = time.perf_counter() - t0
        return self.landmark_image


@dataclass(frozen=True, kw_only=True)
class BatchResult:
    image: np.ndarray  # (S, S, 3) uint8
    taken: float  # perf_counter when the batcher took the frame
    inference_s: float  # the batch's generator call
    batch_size: int


class StreamQueue:
    def __init__(self, *, batcher: Batcher, depth: int, block: bool, max_in_flight: int) -> None:
        self._batcher = batcher
        self.depth, self.block, self.max_in_flight = depth, block, max_in_flight
        self.pending: collections.deque[WorkItem] = collections.deque()
        self.in_flight = 0
        self.dropped = 0  # since the stream began
        self.served = 0  # the batcher's count of frames taken when this queue's last was (fair order)
        self.taken_at = time.perf_counter()  # when a frame was last taken (or the stream opened)
        self._room = asyncio.Event()
        self.closed = False

    async def put(self, item: WorkItem) -> None:
        """Queue a frame; BLOCK waits for room, DROP_OLDEST discards the oldest waiting frame."""
        while self.block and len(self.pending) >= self.depth and not self.closed:
            self._room.clear()
            await self._room.wait()
        if self.closed:
            raise RuntimeError("stream queue closed")
        if len(self.pending) >= self.depth:
            self.drop_head(DROPPED_OVERFLOW)
        self.pending.append(item)
        self._batcher.peak_pending = max(self._batcher.peak_pending, len(self.pending))
        self._batcher.wake()

    def drop_head(self, reason: str) -> None:
        """Discard the oldest waiting frame (counted by `reason`; the stream reports it in its next
        reply)."""
        old = self.pending.popleft()
        old.dropped = True
        old.future.cancel()
        self.dropped += 1
        self._room.set()
        self._batcher.on_drop(reason)

    def ready(self) -> bool:
        return bool(self.pending) and self.in_flight < self.max_in_flight

    def take(self) -> WorkItem:
        item = self.pending.popleft()
        item.live = not self.block
        self.taken_at = time.perf_counter()
        self.in_flight += 1
        self._room.set()
        return item

    def delivered(self) -> None:
        """The stream handed one taken frame's reply to gRPC (or gave up on it)."""
        self.in_flight -= 1
        self._batcher.wake()

    def close(self) -> None:
        self.closed = True
        for item in self.pending:
            item.future.cancel()
        self.pending.clear()
        self._room.set()
        self._batcher.unregister(self)


class Batcher:
    def __init__(
        self,
        *,
        backend: Backend,
        max_batch: int,
        on_batch: Callable[[str, int, float], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        max_concurrent: int = MAX_CONCURRENT_CALLS,
        cost: CostModel | None = None,
        budget: float = 0.0,
        pipeline: bool | None = None,
    ) -> None:
        self.backend = backend
        # Draw a model's next batch while its previous one is in the generator (default: when the
        # backend's inference runs elsewhere, Backend.remote_inference).
        self.pipeline = getattr(backend, "remote_inference", False) if pipeline is None else pipeline
        self.max_batch = max_batch
        self.batch_cap = max_batch  # frames per call at most (1 for an engine in lanes: App._calibrate)
        self.cost = cost or CostModel()  # fed by every call; sizes batches to the budget
        self.budget = budget  # live frames' latency budget, seconds (0: none)
        self.max_concurrent = max_concurrent
        self._streams: list[StreamQueue] = []
        self.peak_pending = 0  # most frames one stream ever had waiting (bounded by its depth)
        self._taken = 0  # frames taken from every queue: StreamQueue.served's clock
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._busy: set[str] = set()  # models with a batch being drawn (or waiting for the generator)
        # Per model: a batch per lane in the generator, and how many that was sized for (a
        # backend's lanes may change: Triton restarted with another instance count).
        self._generator: dict[str, tuple[asyncio.Semaphore, int]] = {}
        self._running: collections.Counter[str] = collections.Counter()  # per model: batches in it
        self._in_backend: collections.Counter[str] = collections.Counter()  # per model: calls made
        # Per model: the clocks of calls queued in the backend behind busy lanes; each starts as
        # an earlier call of the model ends (the cost model wants a call's own time, not its wait).
        self._queued: dict[str, collections.deque[_Clock]] = collections.defaultdict(collections.deque)
        # Per model: when its next batch may be collected - as late as lets it be drawn by the time
        # the batch in the generator comes out, so frames that arrive meanwhile still ride in it.
        self._not_before: dict[str, float] = {}
        # Pipelined, per model: when each of its calls in the generator is expected to end.
        self._ends: dict[str, list[float]] = collections.defaultdict(list)
        self.draw_per_frame = 0.0  # seconds of drawing per frame of a batch (wall, all threads)
        self._calls_allowed = asyncio.Semaphore(max_concurrent)  # batches in any generator at once
        self._render = (
            ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="render") if self.pipeline else None
        )
        self._calls: set[asyncio.Task[None]] = set()
        self._on_batch = on_batch or (lambda model, size, seconds: None)
        self._on_drop = on_drop or (lambda reason: None)
        self._on_error = on_error or (lambda error: None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batcher")

    async def close(self) -> None:
        tasks = [*self._calls, *([self._task] if self._task is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._render is not None:
            self._render.shutdown(wait=False, cancel_futures=True)

    def open_stream(self, *, depth: int, block: bool, max_in_flight: int | None = None) -> StreamQueue:
        """A stream's queue; by default up to a batch of its frames in flight per batch its model
        may have at once (pipelined, one per lane in the generator and the next being drawn; in
        lanes, `_slots` and one drawn ahead) before it waits for the client to read."""
        lanes = self.lanes(SHARED)
        default = (self._slots(SHARED) + 1 if self.pipeline or lanes > 1 else 1) * self.max_batch
        queue = StreamQueue(batcher=self, depth=depth, block=block, max_in_flight=max_in_flight or default)
        self._streams.append(queue)
        return queue

    def unregister(self, queue: StreamQueue) -> None:
        if queue in self._streams:
            self._streams.remove(queue)

    def wake(self) -> None:
        self._work.set()

    def lanes(self, model: str) -> int:
        """Batches of `model` the backend runs side by side (Backend.lanes; 1 when it has none)."""
        lanes = getattr(self.backend, "lanes", None)
        return max(1, int(lanes(split_key(model)[0] if model else SHARED))) if lanes is not None else 1

    def _slots(self, model: str) -> int:
        """Batches of `model` handed to the backend at once: one per lane and, with lanes, two
        more (engines.in_flight), queued in the backend, so a lane that frees starts the next
        call at once and the one after it is started by the call that ends - not a round trip
        through this event loop later, which is busy drawing, encoding and reading frames (one
        queued call: live + offline 79.7-82.2 frames/s against 78.4-79.3 with the next batch only
        drawn ahead; two: a lane idle 0.5-1 % of the time instead of 2-4 % beside one live
        stream, BENCHMARKS.md). Pipelined: one per lane (a remote backend's model instances)
        and, with more than one (Triton's CPU instances), one more, queued in Triton (live calls
        before offline ones there: contract.TRITON_PRIORITY_*). The next batch is drawn here,
        timed to be ready as a lane frees; without the queued call each instance idled for the
        round trip to this process between calls (live + offline through Triton 0.81-0.91 of raw
        Triton against 0.84-0.98 with it, for live p99 77-113 against 113-171 ms; BENCHMARKS.md)."""
        lanes = self.lanes(model)
        if self.pipeline:
            return lanes + 1 if lanes > 1 else lanes
        return engines.in_flight(lanes)

    def _live_slots(self, model: str) -> int:
        """Batches of `model` the backend may hold when the last is of live frames only: in lanes,
        one more than `_slots`. Offline batches keep every lane and the queued calls busy; without
        this a live frame waited for a call to end before it was even collected, then behind the
        queued offline calls for a lane: up to three calls, past the budget where calls are slow
        (two sleeping lanes of 55 ms calls beside a deep offline stream: 24 of ~71 live frames
        dropped as late, 1 with this; tests/test_batcher.py)."""
        slots = self._slots(model)
        return slots + 1 if not self.pipeline and self.lanes(model) > 1 else slots

    def _lane_free(self, model: str, *, live: bool = False) -> bool:
        """Whether a batch of `model` may be collected now (none is being drawn or waiting):
        pipelined, always (one at a time: drawn while the lanes are busy, then it waits for one,
        `_schedule_next` times it); otherwise when
        the backend may take one more of its batches (`_slots`; `_live_slots` for live frames)."""
        if self.pipeline:
            return True
        return self._running[model] < (self._live_slots(model) if live else self._slots(model))

    def on_drop(self, reason: str) -> None:
        self._on_drop(reason)

    def batch_limit(self) -> int:
        """batch_cap, at most the batch expected to cost TIMEOUT_SHARE of the backend's deadline,
        and while live streams are open the largest batch whose call fits the live budget's share
        (offline streams alone get the rest: throughput is all they ask)."""
        timeout = float(getattr(self.backend, "timeout_s", 0.0) or 0.0)
        cap = self.cost.max_batch(TIMEOUT_SHARE * timeout, self.batch_cap) if timeout else self.batch_cap
        if not self.budget or all(q.block for q in self._streams):
            return cap
        return min(cap, self.cost.max_batch(self.budget * BATCH_SHARE, self.batch_cap))

    def _late(self, item: WorkItem, batch_size: int, now: float) -> bool:
        """A live frame that would come out of a batch of `batch_size` past its budget."""
        if not self.budget:
            return False
        # A budget below two lone calls cannot be met by anyone: then only queueing counts as late.
        # The margin keeps the spread of call times and encoding inside the budget.
        budget = max(self.budget, 2 * self.cost.cost(1))
        return now - item.enqueued + self.cost.cost(batch_size) > LATE_SHARE * budget

    def _collect(self) -> list[WorkItem]:
        """Up to batch_limit() frames of one model with no batch being drawn, round-robin over the
        streams with room: live streams' frames first (late ones dropped before inference), then
        offline (BLOCK) streams' with what is left."""
        # Least recently served first (stable: ties keep arrival order). A rotating start over all
        # streams was not fair within a class: the offline stream after a live one in the ring
        # got the live one's turns as well (119 against 216 frames in 15 s beside a live stream).
        order = sorted(self._streams, key=lambda q: q.served)
        limit, now = self.batch_limit(), time.perf_counter()
        batch: list[WorkItem] = []
        model: str | None = None
        # A starving offline stream gets one frame beside the live ones (so it never stops), after
        # them, not a live stream's share: with a deep queue every offline frame starves, and as the
        # live streams' equal it pushed live frames into the next batch, past their budget (in
        # a batch of one, 12 of 71 live frames dropped when it came first by the fair order).
        starving = {
            q for q in order if q.block and q.pending and now - q.pending[0].enqueued > BLOCK_STARVE_S
        }
        # One that got no frame for BLOCK_STARVE_S even so goes before them, once: live frames fill
        # every batch where batches are of one frame (an engine in lanes) or the live streams are as
        # many as a batch holds, and live calls took every slot; its stream stopped (one live
        # stream on a loaded 2-core host: no offline frame in 60 s).
        overdue = [q for q in order if q in starving and now - q.taken_at > BLOCK_STARVE_S]
        first = overdue + [q for q in order if not q.block]
        first += [q for q in order if q in starving and q not in overdue]
        for queues in (first, [q for q in order if q.block]):
            progress = True
            while progress and len(batch) < limit:
                progress = False
                for queue in queues:
                    if len(batch) >= limit:
                        break
                    if queues is first and queue.block and queue not in starving:
                        continue  # its one frame of this pass is taken
                    if not queue.block:
                        # Late frames with a newer one behind them go; the newest is always drawn.
                        while len(queue.pending) > 1 and self._late(queue.pending[0], len(batch) + 1, now):
                            queue.drop_head(DROPPED_LATE)
                    if not queue.ready():
                        continue
                    head = queue.pending[0].model
                    # (a timer may fire a little before its time: a millisecond's grace)
                    if head in self._busy or self._not_before.get(head, 0.0) > now + 0.001:
                        continue
                    # (a frame joining a batch adds no call; an overdue one takes a live one's)
                    if not self._lane_free(head, live=not queue.block or bool(batch) or queue in overdue):
                        continue
                    if model is not None and head != model:
                        continue
                    item = queue.take()
                    self._taken += 1
                    queue.served = self._taken
                    model = item.model
                    batch.append(item)
                    starving.discard(queue)
                    progress = True
        return batch

    async def _loop(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            while len(self._busy) < self.max_concurrent:
                batch = self._collect()
                if not batch:
                    break
                model = batch[0].model
                self._busy.add(model)  # until the batch is drawn and its turn in the generator came
                call = asyncio.create_task(self._run(batch), name=f"batch:{model or 'shared'}")
                self._calls.add(call)
                call.add_done_callback(functools.partial(self._finished, model))

    def _finished(self, model: str, call: asyncio.Task[None]) -> None:
        if call.cancelled():  # (cancelled before it ran: _run's own finally did not)
            self._busy.discard(model)
        self._calls.discard(call)
        self.wake()

    def _schedule_next(self, model: str, size: int) -> float:
        """The model's batch of `size` goes into the generator now: while it has a lane free its
        next batch is collected at once, else when drawing it (at the batch limit) would end as
        the first of its calls in the generator does. Returns when this call should end."""
        now = time.perf_counter()
        end = now + self.cost.cost(size)
        ends = self._ends[model]
        ends.append(end)
        lead = 0.0
        if self._running[model] >= self.lanes(model):
            lead = min(ends) - now - self.draw_per_frame * self.batch_limit()
        if lead > 0.001:
            self._not_before[model] = now + lead
            asyncio.get_running_loop().call_later(lead, self.wake)
        else:
            self._not_before.pop(model, None)
        self.wake()
        return end

    async def _draw(self, batch: list[WorkItem]) -> tuple[np.ndarray, np.ndarray | None]:
        """The batch's landmark images (B, S, S, 3) and, for a warp-guided model, its warped
        references (else None); pipelined, drawn on the render threads in chunks of RENDER_CHUNK."""
        if self._render is not None:  # pipelined
            loop = asyncio.get_running_loop()
            chunks = [batch[i : i + RENDER_CHUNK] for i in range(0, len(batch), RENDER_CHUNK)]
            await asyncio.gather(
                *(loop.run_in_executor(self._render, _render_all, chunk) for chunk in chunks)
            )
        # Not pipelined (inference on these cores): drawn here, on the event loop, between calls. On
        # the render threads, on 2 cores, live p99 was 15-40 ms worse and encoding a reply took
        # 0.5-0.9 ms instead of 0.2, for no more frames (BENCHMARKS.md).
        images = _stacked([item.render() for item in batch])  # (pipelined: drawn above, no work)
        warps = [item.warped for item in batch if item.warped is not None]
        return images, (_stacked(warps) if len(warps) == len(batch) else None)

    async def _run(self, batch: list[WorkItem]) -> None:
        taken = time.perf_counter()
        model = batch[0].model
        started = taken
        slots = self._live_slots(model)
        held = self._generator.get(model)
        if held is None or held[1] != slots:  # (calls in a replaced one release that one)
            held = self._generator[model] = (asyncio.Semaphore(slots), slots)
        generator = held[0]
        try:
            try:
                images, warped = await self._draw(batch)
                drawn = time.perf_counter()
                per_frame = (drawn - taken) / len(batch)
                self.draw_per_frame += (_DRAW_WEIGHT if self.draw_per_frame else 1.0) * (
                    per_frame - self.draw_per_frame
                )
                await generator.acquire()  # the backend may take another of the model's batches
            except BaseException:
                self._busy.discard(model)
                self.wake()
                raise
            self._running[model] += 1
            # In the generator: the model's next batch may be collected - pipelined, drawn while
            # this one runs (from when it will be drawn just in time); else when a slot is free.
            self._busy.discard(model)
            end = self._schedule_next(model, len(batch)) if self.pipeline else None
            if end is None:
                self.wake()
            try:
                async with self._calls_allowed:
                    started = time.perf_counter()
                    clock = _Clock(started)
                    if self._in_backend[model] >= self.lanes(model):  # queued behind busy lanes
                        self._queued[model].append(clock)
                    self._in_backend[model] += 1
                    priority = engines.LIVE if any(item.live for item in batch) else engines.OFFLINE
                    EXPECTED_S.set(self.cost.cost(len(batch)))  # (this task's: the backend's stall threshold)
                    if model == SHARED:
                        adain = _stacked([item.adain for item in batch])  # type: ignore[misc]  # (B, D)
                        call: Awaitable[np.ndarray] = self.backend.generate(
                            images, adain, warped, priority=priority
                        )
                    else:
                        avatar_id, made_for = split_key(model)
                        call = self.backend.generate_personalised(
                            avatar_id, images, warped, priority=priority, made_for=made_for
                        )
                    try:
                        frames = await call  # (B, S, S, 3)
                    finally:
                        self._in_backend[model] -= 1
                        queued = self._queued[model]
                        if clock in queued:  # (failed before a lane took it)
                            queued.remove(clock)
                        elif queued:  # this call's lane goes to the oldest queued call (the one
                            # queued in the engine; a live call that passed offline ones waiting
                            # their turn starts a call later: the two clocks' sum stays right)
                            queued.popleft().started = time.perf_counter()
                        started = clock.started
            finally:
                generator.release()
                if end is not None:
                    self._ends[model].remove(end)
                self._running[model] -= 1
                self._not_before.pop(model, None)
                self.wake()  # its lane is free: the model's next batch may be collected
        except Exception as error:
            self._on_error(error)  # logged and counted here, once per batch
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
                    # Marked retrieved: a stream that ended on the batch's first frame never looks
                    # at the others, whose "exception never retrieved" would be logged from a finaliser.
                    item.future.exception()
            return
        seconds = time.perf_counter() - started
        self.cost.observe(len(batch), seconds)
        self._on_batch(model, len(batch), seconds)
        for item, frame in zip(batch, frames, strict=True):
            if not item.future.done():
                result = BatchResult(image=frame, taken=taken, inference_s=seconds, batch_size=len(batch))
                item.future.set_result(result)


class _Clock:
    """When a generator call started: when it was made, or, queued behind busy lanes, when one
    freed. An object of its own, equal only to itself (no __eq__), so a deque of them finds and
    removes this call's clock, not another with the same start time."""

    __slots__ = ("started",)

    def __init__(self, started: float) -> None:
        self.started = started


def _stacked(arrays: list[np.ndarray]) -> np.ndarray:
    """np.stack, and for one array (every call of an engine in lanes) a view of it with a batch axis."""
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)


def _render_all(items: list[WorkItem]) -> None:
    for item in items:
        item.render()
