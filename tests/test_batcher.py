"""The batcher's scheduling (service/batcher.py) against a backend whose calls take a known time:
live frames keep their budget beside an offline stream that always has work."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest

from facekit import engines
from service.batcher import LATE_SHARE, SHARED, Batcher, StreamQueue, WorkItem
from service.capacity import CostModel

PER_FRAME_S = 0.015  # the shipped generator on this machine's bf16 engine: ~15 ms per frame
FIXED_S = 0.002


class TimedBackend:
    """Sleeps as long as a generator call of that batch size takes; counts the frames."""

    def __init__(self) -> None:
        self.frames = 0
        self.batches: list[int] = []
        self.took = self.nominal = 0.0

    async def generate(
        self, images: np.ndarray, adain: np.ndarray, warped: np.ndarray | None = None, *, priority: int = 1
    ) -> np.ndarray:
        t0 = time.perf_counter()
        await asyncio.sleep(FIXED_S + PER_FRAME_S * len(images))
        self.took += time.perf_counter() - t0
        self.nominal += FIXED_S + PER_FRAME_S * len(images)
        self.frames += len(images)
        self.batches.append(len(images))
        return np.zeros_like(images)

    def overrun(self) -> float:
        """How much longer the calls took than asked (a loaded host's sleeps overrun), >= 1."""
        return max(1.0, self.took / self.nominal)


def item() -> WorkItem:
    return WorkItem(
        points=np.zeros((68, 2), np.float32),
        draw=lambda points: np.zeros((8, 8, 3), np.uint8),
        adain=np.zeros(4, np.float32),
        model=SHARED,
    )


async def consume(queue: StreamQueue, futures: asyncio.Queue, latencies: list[float]) -> None:
    """The stream's reply loop: waits for each frame in order and hands it back."""
    loop = asyncio.get_running_loop()
    while True:
        work, sent = await futures.get()
        await asyncio.wait([work.future])  # a dropped frame's future is cancelled
        if not work.dropped:
            latencies.append(loop.time() - sent)
            queue.delivered()


def assert_live_frames_kept(
    sent: int, back: int, dropped: int, seconds: float, most_dropped: int = 2
) -> None:
    """Every live frame sent (at 25 fps for `seconds`) came back but those dropped (at most
    `most_dropped`) and those still in flight at the end (a budget's worth, 5). Counted against
    the frames sent, not a nominal 25 fps, which a loaded host's sleeps fall short of."""
    assert sent >= 0.6 * 25 * seconds, sent
    assert dropped <= most_dropped and back >= sent - dropped - 5, (back, sent, dropped)


class Run(NamedTuple):
    live: StreamQueue
    latencies: list[float]  # of each live frame that came back
    backend: object
    sent: int  # live frames sent


async def scenario(
    seconds: float = 3.0, backend: object = None, cost: CostModel | None = None, batch_cap: int = 16
) -> Run:
    """A live stream at 25 fps beside an offline stream that always has work, for `seconds`."""
    backend = backend or TimedBackend()
    if cost is None:
        cost = CostModel()
        for batch in (1, 2, 4, 8):  # calibrated, as the service does at start
            cost.observe(batch, FIXED_S + PER_FRAME_S * batch)
    batcher = Batcher(backend=backend, max_batch=16, cost=cost, budget=0.2)  # type: ignore[arg-type]
    batcher.batch_cap = batch_cap
    batcher.start()
    live = batcher.open_stream(depth=8, block=False)
    offline = batcher.open_stream(depth=64, block=True)
    live_sent: asyncio.Queue = asyncio.Queue()
    offline_sent: asyncio.Queue = asyncio.Queue()
    live_latency: list[float] = []
    loop = asyncio.get_running_loop()
    sent = [0]

    async def feed_live() -> None:  # 25 frames a second
        while True:
            work = item()
            await live.put(work)
            live_sent.put_nowait((work, loop.time()))
            sent[0] += 1
            await asyncio.sleep(0.04)

    async def feed_offline() -> None:  # as fast as the queue takes them (BLOCK)
        while True:
            work = item()
            await offline.put(work)
            offline_sent.put_nowait((work, loop.time()))

    tasks = [
        asyncio.create_task(c)
        for c in (
            feed_live(),
            feed_offline(),
            consume(live, live_sent, live_latency),
            consume(offline, offline_sent, []),
        )
    ]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await batcher.close()
    return Run(live, live_latency, backend, sent[0])


def test_with_the_batch_cap_at_one_every_call_is_one_frame_and_both_streams_are_served() -> None:
    """An engine in lanes with TALKINGHEAD_BATCHING=auto (App._calibrate sets the cap): a deep
    offline stream is served one frame per call and the live stream keeps its frames; without the
    cap the same streams make batches of several frames."""
    live, latencies, backend, sent = asyncio.run(scenario(2.0, batch_cap=1))
    assert set(backend.batches) == {1}, backend.batches
    assert_live_frames_kept(sent, len(latencies), live.dropped, 2.0)
    assert backend.frames > len(latencies) + 20, "the offline stream got frames too"
    _, _, uncapped, _ = asyncio.run(scenario(2.0))
    assert max(uncapped.batches) > 1


def test_offline_streams_beside_a_live_one_share_what_is_left_equally() -> None:
    """Two offline streams that always have work, beside a live stream, one frame a call (an
    engine in lanes): each gets half of what the live stream leaves. With a rotating start over
    all streams, the offline stream after the live one in the ring also got the live one's turns:
    119 against 216 frames in 15 s through a real server."""

    async def run() -> tuple[int, list[int]]:
        cost = CostModel()
        for batch in (1, 2, 4, 8):  # calibrated, as the service does at start
            cost.observe(batch, FIXED_S + PER_FRAME_S * batch)
        batcher = Batcher(backend=TimedBackend(), max_batch=16, cost=cost, budget=0.2)  # type: ignore[arg-type]
        batcher.batch_cap = 1
        batcher.start()
        loop = asyncio.get_running_loop()
        live = batcher.open_stream(depth=8, block=False)
        offline = [batcher.open_stream(depth=64, block=True) for _ in range(2)]
        sent = {q: asyncio.Queue() for q in (live, *offline)}
        delivered: dict[StreamQueue, list[float]] = {q: [] for q in sent}
        live_sent = [0]

        async def feed(queue: StreamQueue, period: float) -> None:
            while True:
                work = item()
                await queue.put(work)
                sent[queue].put_nowait((work, loop.time()))
                live_sent[0] += queue is live
                await asyncio.sleep(period)

        tasks = [asyncio.create_task(feed(live, 0.04))]
        tasks += [asyncio.create_task(feed(q, 0.0)) for q in offline]
        tasks += [asyncio.create_task(consume(q, sent[q], delivered[q])) for q in sent]
        await asyncio.sleep(3.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.close()
        return live_sent[0], live.dropped, len(delivered[live]), [len(delivered[q]) for q in offline]

    sent, dropped, live_frames, (first, second) = asyncio.run(run())
    assert_live_frames_kept(sent, live_frames, dropped, 3.0)
    assert min(first, second) >= 20, (first, second)  # 3 s of calls of 17 ms: ~175, ~75 of them live
    # 55 / 54 here (before: 67 / 46, 65 / 46, 59 / 54)
    assert abs(first - second) <= max(3, 0.05 * max(first, second)), (live_frames, first, second)


def test_an_offline_stream_with_work_always_waiting_leaves_the_live_stream_its_frames() -> None:
    live, latencies, backend, sent = asyncio.run(scenario())
    # 3 s at 25 fps: a batch of live + offline frames must not make live frames late
    assert_live_frames_kept(sent, len(latencies), live.dropped, 3.0)
    # A live frame comes out within LATE_SHARE of the budget: the batch in flight and its own.
    # (Before: p99 0.153 s with batches of 40 % of the budget, 0.134 s at 25 % while a starving
    # offline stream took a live stream's share of every batch; now 0.092 s.) As long again as
    # the generator's calls overran what they asked for (a loaded host).
    assert isinstance(backend, TimedBackend)
    assert float(np.percentile(latencies, 99)) < LATE_SHARE * 0.2 * backend.overrun(), backend.overrun()
    # and the offline stream used the rest: the backend was busy most of the time
    assert backend.frames * PER_FRAME_S > 0.7 * 3.0


def run_offline(
    backend: object,
    cost: CostModel,
    draw: Callable[[np.ndarray], np.ndarray],
    batch: int,
    seconds: float,
    *,
    budget: float = 0.0,
    pipeline: bool = False,
) -> int:
    """A deep offline (BLOCK) stream through a batcher for `seconds`; the frames the batcher
    delivered before it closed (each counted when its result is set, not when the reader below
    comes to it: a reader cancelled with its wake-up pending would miss a whole batch)."""

    async def run() -> int:
        batcher = Batcher(backend=backend, max_batch=batch, cost=cost, budget=budget, pipeline=pipeline)  # type: ignore[arg-type]
        batcher.start()
        queue = batcher.open_stream(depth=64, block=True)
        sent: asyncio.Queue = asyncio.Queue()
        delivered = [0]

        def count(future: asyncio.Future) -> None:
            if not future.cancelled() and future.exception() is None:
                delivered[0] += 1

        async def feed() -> None:
            while True:
                work = WorkItem(points=np.zeros((68, 2), np.float32), draw=draw, adain=None, model=SHARED)
                work.future.add_done_callback(count)
                await queue.put(work)
                sent.put_nowait(work)

        async def drain() -> None:  # the client reading, which lets the stream send more
            while True:
                work = await sent.get()
                await work.future
                queue.delivered()

        tasks = [asyncio.create_task(feed()), asyncio.create_task(drain())]
        await asyncio.sleep(seconds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.close()
        return delivered[0]

    return asyncio.run(run())


def sleeping_draw(seconds: float) -> Callable[[np.ndarray], np.ndarray]:
    """A landmark drawing that takes `seconds` (blocking, on whichever thread draws)."""

    def draw(points: np.ndarray) -> np.ndarray:
        time.sleep(seconds)
        return np.zeros((8, 8, 3), np.uint8)

    return draw


@pytest.mark.parametrize("pipeline", [True, False])
def test_the_next_batch_is_drawn_while_the_previous_one_is_in_the_generator(pipeline: bool) -> None:
    """Pipelined (a backend whose inference runs elsewhere), drawing (landmark image and warp, on
    the render threads) overlaps inference: with a deep offline stream the generator is busy nearly
    all the time, not idle while each batch is drawn, and batches stay full. Not pipelined (the
    in-process CPU backend), each batch is drawn between calls."""
    draw_s, generate_s, batch = 0.01, 0.1, 8
    draws: list[tuple[float, float]] = []
    calls: list[tuple[float, float, int]] = []

    def slow_draw(points: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        time.sleep(draw_s)
        draws.append((t0, time.perf_counter()))
        return np.zeros((8, 8, 3), np.uint8)

    class Backend:
        async def generate(
            self,
            images: np.ndarray,
            adain: np.ndarray,
            warped: np.ndarray | None = None,
            *,
            priority: int = 1,
        ) -> np.ndarray:
            t0 = time.perf_counter()
            await asyncio.sleep(generate_s)
            calls.append((t0, time.perf_counter(), len(images)))
            return np.zeros_like(images)

    cost = CostModel()
    for size in (1, batch):
        cost.observe(size, generate_s)
    seconds = 2.0
    run_offline(Backend(), cost, slow_draw, batch, seconds, budget=0.2, pipeline=pipeline)
    busy = sum(end - start for start, end, _ in calls)
    # Drawing a batch of 8 takes 40-80 ms of wall time (2-4 threads): drawn between calls, the
    # generator would be busy at most 0.1 / 0.14 = 71 % of the time.
    assert sum(n for _, _, n in calls[1:]) >= (batch - 1) * len(calls[1:])  # full batches after the first
    overlapping = [d for d in draws if any(s < d[0] < e for s, e, _ in calls)]
    if pipeline:
        assert busy > 0.85 * seconds, (busy, len(calls))
        assert len(overlapping) > len(draws) / 2
    else:
        assert busy < 0.8 * seconds, (busy, len(calls))
        assert not overlapping


class LanedBackend:
    """A generator that runs `lanes` calls side by side, each taking `generate_s`, as
    facekit/engines.py's OpenVINO engine does: a call per lane and one more are started and take
    lanes first come, first served; calls beyond those wait their turn, lower `priority` (live)
    first, unless one has waited engines.STARVE_S (engines.Turns). Records how many it held at
    once."""

    def __init__(self, lanes: int, generate_s: float, reply_s: float = 0.0) -> None:
        self._lanes, self.generate_s = lanes, generate_s
        self.reply_s = reply_s  # after its lane is free, until the caller has the result (a remote one)
        self.free = asyncio.Semaphore(lanes)  # (first come, first served)
        self.started = 0  # calls past their turn: running or queued for a lane
        # a heap: (priority, arrival, when it began to wait, its turn)
        self.turns: list[tuple[int, int, float, asyncio.Future[None]]] = []
        self.arrivals = 0
        self.handed = self.running = self.most_handed = self.most_running = 0
        self.lane_time = 0.0
        self.calls = 0  # that ran in a lane
        self.offline_starts = 0
        self.live_waited_behind: list[int] = []  # per live call: offline calls that took a lane first

    def lanes(self, model: str) -> int:
        return self._lanes

    def overrun(self) -> float:
        """How much longer the calls took in their lanes than asked (a loaded host), >= 1."""
        return max(1.0, self.lane_time / (self.calls * self.generate_s))

    async def _turn(self, priority: int) -> None:
        if self.started < self._lanes + 1:
            self.started += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self.arrivals += 1
        heapq.heappush(self.turns, (priority, self.arrivals, time.perf_counter(), turn))
        await turn  # (the call that leaves hands its place over: `started` stays)

    def _leave(self) -> None:
        if self.turns:
            oldest = min(self.turns, key=lambda waiting: waiting[1])
            if time.perf_counter() - oldest[2] >= engines.STARVE_S:
                self.turns.remove(oldest)
                heapq.heapify(self.turns)
            else:
                oldest = heapq.heappop(self.turns)
            oldest[3].set_result(None)
        else:
            self.started -= 1

    async def generate(
        self, images: np.ndarray, adain: np.ndarray, warped: np.ndarray | None = None, *, priority: int = 1
    ) -> np.ndarray:
        self.handed += 1
        self.most_handed = max(self.most_handed, self.handed)
        handed_at = self.offline_starts
        try:
            await self._turn(priority)
            try:
                async with self.free:
                    if priority == engines.LIVE:
                        self.live_waited_behind.append(self.offline_starts - handed_at)
                    else:
                        self.offline_starts += 1
                    self.running += 1
                    self.most_running = max(self.most_running, self.running)
                    t0 = time.perf_counter()
                    await asyncio.sleep(self.generate_s)
                    self.lane_time += time.perf_counter() - t0
                    self.calls += 1
                    self.running -= 1
            finally:
                self._leave()
            await asyncio.sleep(self.reply_s)
        finally:
            self.handed -= 1
        return np.zeros_like(images)


@pytest.mark.parametrize("lanes", [1, 2])
def test_a_generator_in_lanes_gets_a_batch_per_lane_and_two_more_and_keeps_every_lane_busy(
    lanes: int,
) -> None:
    """An in-process generator that runs calls side by side (Backend.lanes, facekit/engines.py)
    is handed one batch per lane and, with lanes, two more that wait in the backend for the first
    lanes to free: with a deep offline stream every lane is busy nearly all the time, though each
    batch is drawn on the event loop. In one lane, batches are drawn between calls."""
    generate_s, batch, seconds = 0.05, 4, 2.0
    backend, cost = LanedBackend(lanes, generate_s), CostModel()
    for size in (1, batch):
        cost.observe(size, generate_s)
    frames = run_offline(backend, cost, sleeping_draw(0.005), batch, seconds)
    assert backend.most_running == lanes
    assert backend.most_handed == (lanes + 2 if lanes > 1 else 1)
    busy = backend.lane_time / (lanes * seconds)  # of every lane's time
    # A batch of 4 takes 20 ms to draw: drawn only when its lane is free, a lane would be busy at
    # most 0.05 / 0.07 = 71 % of the time.
    if lanes > 1:
        assert busy > 0.85, busy
        # Every call a lane ran delivered its batch, bar those still in the backend at the end
        # (counted against calls run, not the nominal 50 ms, which a loaded host's sleeps overrun).
        assert frames >= batch * (backend.offline_starts - backend.most_handed), (
            frames,
            backend.offline_starts,
        )
    else:
        assert busy < 0.8, busy


@pytest.mark.parametrize(("lanes", "reply_s", "draw_s"), [(1, 0.0, 0.01), (2, 0.01, 0.005)])
def test_a_remote_generator_gets_a_call_per_instance_one_queued_and_the_next_batch_drawn_meanwhile(
    lanes: int, reply_s: float, draw_s: float
) -> None:
    """Pipelined (inference elsewhere: Triton, whose CPU profile runs the generator in two
    instances, TritonBackend.lanes): a call in flight per instance and, with more than one, one
    more queued there, and each batch drawn on the render threads while the calls run, so with a
    deep offline stream every instance is busy nearly all the time. The queued call covers the
    way back: an instance is free before its result reaches the service (10 ms here), and a next
    call sent only then left each instance idle that long (busy <= 0.05 / 0.06 = 83 %). (Before
    instances were counted, one call in flight whatever the instances: a second sat idle.)"""
    generate_s, batch, seconds = 0.05, 4, 2.0
    backend, cost = LanedBackend(lanes, generate_s, reply_s), CostModel()
    for size in (1, batch):
        cost.observe(size, generate_s)
    frames = run_offline(backend, cost, sleeping_draw(draw_s), batch, seconds, pipeline=True)
    assert backend.most_running == lanes
    assert backend.most_handed == (lanes + 1 if lanes > 1 else 1)
    busy = backend.lane_time / (lanes * seconds)  # of every lane's time
    # A batch of 4 takes 10-40 ms to draw in one lane (1-4 threads): drawn only while no call
    # runs, an instance would be busy at most 0.05 / 0.06 = 83 % of the time. In two lanes (a
    # batch every 25 ms, drawn in 5-20 ms) far less.
    assert busy > 0.85, busy
    # Every call a lane ran delivered its batch, bar those still in the backend at the end
    # (counted against calls run, not the nominal 50 ms, which a loaded host's sleeps overrun).
    assert frames >= batch * (backend.offline_starts - backend.most_handed), (frames, backend.offline_starts)


def test_a_remote_generator_that_gains_an_instance_gets_a_call_in_it() -> None:
    """Triton restarted with the generator in two instances instead of one (TritonBackend.lanes
    follows its config): the batcher's calls in flight follow, without a restart of the service."""
    generate_s, batch = 0.05, 4
    backend, cost = LanedBackend(1, generate_s), CostModel()
    for size in (1, batch):
        cost.observe(size, generate_s)

    async def run() -> None:
        batcher = Batcher(backend=backend, max_batch=batch, cost=cost, pipeline=True)  # type: ignore[arg-type]
        batcher.start()
        queue = batcher.open_stream(depth=64, block=True, max_in_flight=64)
        sent: asyncio.Queue = asyncio.Queue()

        async def feed() -> None:
            while True:
                work = WorkItem(
                    points=np.zeros((68, 2), np.float32), draw=sleeping_draw(0.0), adain=None, model=SHARED
                )
                await queue.put(work)
                sent.put_nowait(work)

        async def drain() -> None:
            while True:
                await (await sent.get()).future
                queue.delivered()

        tasks = [asyncio.create_task(feed()), asyncio.create_task(drain())]
        await asyncio.sleep(0.5)
        assert backend.most_running == 1
        # Two instances now: a lane more in the same semaphore (a new semaphore let a call still
        # running in the old one run beside two more: most_running 3 on a loaded host).
        backend._lanes = 2
        backend.free.release()
        await asyncio.sleep(0.5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.close()

    asyncio.run(run())
    assert backend.most_running == 2


def test_the_cost_of_a_call_that_waited_for_a_lane_is_its_own_time_not_its_wait() -> None:
    """Batches handed over while every lane is busy wait in the backend; the cost model (batch
    sizes, capacity, late frames) learns the time each took in its lane, not its wait as well."""
    generate_s, batch = 0.05, 4
    backend, cost = LanedBackend(2, generate_s), CostModel()
    for size in (1, batch):
        cost.observe(size, generate_s)
    run_offline(backend, cost, sleeping_draw(0.0), batch, 1.5)
    assert backend.most_handed == 4  # calls did wait for a lane
    took = backend.lane_time / backend.calls  # 50 ms asked; more where the host is loaded
    assert cost.cost(batch) < 1.15 * took, (cost.cost(batch), took)


def test_live_frames_beside_offline_work_on_slow_lanes_wait_behind_one_queued_call_at_most() -> None:
    """Two lanes of 55 ms calls (this generator on a slow host) and an offline stream that keeps
    both lanes and the two queued calls busy: a live frame at 25 fps may be handed over beside
    them, goes before the offline call waiting its turn and waits for a lane behind the one queued
    in the engine, not first for a call to end. (Handed over only when a call ended, 24 of 71 live
    frames were dropped as late; 21 of 72 with 45 ms calls. Without its priority a live frame
    waited behind both queued calls: p99 0.20-0.23 s against 0.14-0.18.)"""
    generate_s = 0.055
    backend, cost = LanedBackend(2, generate_s), CostModel()
    cost.observe(1, generate_s)
    cost.observe(2, 2 * generate_s)  # batch 1 only: 55 ms is over the budget's share already
    live, latencies, _, sent = asyncio.run(scenario(3.0, backend, cost))
    assert_live_frames_kept(sent, len(latencies), live.dropped, 3.0, most_dropped=3)
    # the budget (as long again as the calls overran what they asked for: a loaded host)
    assert float(np.percentile(latencies, 99)) < 0.2 * backend.overrun(), backend.overrun()
    assert backend.most_handed == 5 and backend.most_running == 2
    # every live call took a lane behind one offline call at most: the one queued in the engine
    assert backend.live_waited_behind and max(backend.live_waited_behind) <= 1, backend.live_waited_behind
    # and offline work kept the lanes busy: live takes 25 of the ~36 frames a second they make
    assert backend.lane_time > 0.85 * 2 * 3.0, backend.lane_time


def test_an_offline_stream_beside_a_live_one_that_takes_every_lane_still_gets_frames() -> None:
    """One frame a call (an engine in lanes) from two lanes of 100 ms calls, 20 frames a second
    (the shipped generator on a loaded 2-core host), and a live stream asking 25: live calls take
    every slot the moment one frees. An offline stream opened then gets a frame within about
    twice BLOCK_STARVE_S, and more after. (Before: none in 60 s through a real server - the live
    frames filled every batch of one, and an offline call in the engine waited behind every live
    one until the backend's 5 s deadline.)"""

    async def run() -> tuple[list[float], int, int]:
        loop = asyncio.get_running_loop()
        backend, cost = LanedBackend(2, 0.1), CostModel()
        cost.observe(1, 0.1)
        batcher = Batcher(backend=backend, max_batch=16, cost=cost, budget=0.2)  # type: ignore[arg-type]
        batcher.batch_cap = 1
        batcher.start()
        live, offline = batcher.open_stream(depth=8, block=False), None
        sent: dict[StreamQueue, asyncio.Queue] = {live: asyncio.Queue()}
        delivered: dict[StreamQueue, list[float]] = {live: []}

        async def feed(queue: StreamQueue, period: float) -> None:
            while True:
                work = item()
                await queue.put(work)
                sent[queue].put_nowait((work, loop.time()))
                await asyncio.sleep(period)

        tasks = [asyncio.create_task(feed(live, 0.04))]
        tasks.append(asyncio.create_task(consume(live, sent[live], delivered[live])))
        await asyncio.sleep(1.0)  # the live calls have every slot
        offline = batcher.open_stream(depth=8, block=True)
        sent[offline], delivered[offline] = asyncio.Queue(), []
        opened = loop.time()
        tasks.append(asyncio.create_task(feed(offline, 0.04)))
        tasks.append(asyncio.create_task(consume(offline, sent[offline], delivered[offline])))
        came: list[float] = []  # when each offline frame came back, from the stream's opening
        while loop.time() - opened < 6.0:
            came += [loop.time() - opened] * (len(delivered[offline]) - len(came))
            await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.close()
        return came, len(delivered[live]), backend.calls

    came, live_frames, calls = asyncio.run(run())
    assert came, "the offline stream got no frame in 6 s"
    assert came[0] < 3.0, came[:3]
    assert len(came) >= 3, came  # and it goes on: about one a second
    assert live_frames >= calls - len(came) - 8, (live_frames, calls, len(came))  # live got the rest


def test_dropped_live_frames_are_counted_by_why_they_were_dropped() -> None:
    """A live stream at 25 fps into a generator that makes 10 frames a second (one lane, 0.1 s a
    call, budget 0.2 s): with room in its queue the frames that could not make the budget are
    dropped before inference as late; with a queue of one, each older frame is dropped as a newer
    one arrives, as overflow. Every drop is reported once, with its reason (the metric's label)."""

    async def run(depth: int) -> tuple[list[str], int, int]:
        loop = asyncio.get_running_loop()
        reasons: list[str] = []
        cost = CostModel()
        cost.observe(1, 0.1)
        batcher = Batcher(
            backend=LanedBackend(1, 0.1),  # type: ignore[arg-type]
            max_batch=1,
            cost=cost,
            budget=0.2,
            on_drop=reasons.append,
        )
        batcher.start()
        live = batcher.open_stream(depth=depth, block=False)
        futures: asyncio.Queue = asyncio.Queue()
        latencies: list[float] = []
        consumer = asyncio.create_task(consume(live, futures, latencies))
        for _ in range(40):
            work = item()
            await live.put(work)
            futures.put_nowait((work, loop.time()))
            await asyncio.sleep(0.04)
        await asyncio.sleep(0.4)
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await batcher.close()
        return reasons, live.dropped, len(latencies)

    reasons, dropped, served = asyncio.run(run(depth=64))
    assert set(reasons) == {"late"} and len(reasons) == dropped >= 15, (reasons, dropped)
    assert served + dropped == 40
    reasons, dropped, served = asyncio.run(run(depth=1))
    assert set(reasons) == {"overflow"} and len(reasons) == dropped >= 15, (reasons, dropped)
    assert served + dropped == 40
