"""Faults a deployment meets, against the real service: idle, frozen and vanished clients, a model
backend that is too slow, dies or freezes, and a service killed mid-write.

- Streams: a stream that sends neither frames nor keepalives ends with DEADLINE_EXCEEDED after
  `stream_idle_timeout` and gives its slot back; keepalives hold it open; a client that stops
  reading, is killed (SIGKILL) or freezes (SIGSTOP, as a machine that drops off the network) gets
  its slot back within about the idle timeout, so max_streams idle clients cannot lock others out.
- Backend (ONNX Runtime in-process): a call past `backend_timeout` is cut (UNAVAILABLE, not a
  hang) and health says NOT_SERVING while a call is in flight longer than `backend_stall`; the
  service serves again right after. Slow (marker slow): a slow batch of a personalised generator
  does not hold up the shared generator's batches.
- Triton (the bundled server, started as in tests/test_service_triton.py; skips where it is not
  installed): SIGKILL and SIGSTOP mid-stream give the stream UNAVAILABLE and health NOT_SERVING
  within 2 s; streams work again within 5 s of Triton's return (restart / SIGCONT).
- The avatar store's filesystem full (a real tmpfs; skips where the test cannot mount one):
  CreateAvatar gets UNAVAILABLE saying so, nothing partial is left, stored avatars still stream.
- `talkinghead serve` SIGKILLed while it writes an avatar (its fsync held open): after a restart
  the avatar is not listed and not found, the avatars written before are whole, and the id can be
  created again.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from api.talkinghead.v1 import animation_pb2 as pb
from api.talkinghead.v1.animation_pb2_grpc import AnimationServiceStub
from client.library import Client, landmark_requests
from deploy.local import tritonserver
from facekit import contract
from facekit.sequence import LandmarkSequence
from service.backends.base import BackendUnavailable, ReadyGate
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import (
    CONSENT,
    DRIVER,
    PORTRAIT,
    REPO,
    ServerThread,
    copy_base_models,
    fill,
    test_settings,
    tmpfs,
    worker_context,
)
from tests.test_service_triton import VENV as TRITON_VENV
from tests.test_service_triton import Triton
from tests.test_worker_jobs import CHECKPOINT
from tests.test_worker_jobs import photos as photos

CODE = grpc.StatusCode
IDLE_S = 1.5  # the test servers' stream_idle_timeout


def config(avatar_id: str, **fields: object) -> pb.AnimateRequest:
    return pb.AnimateRequest(config=pb.StreamConfig(avatar_id=avatar_id, **fields))  # type: ignore[arg-type]


def frames_forever(seq: LandmarkSequence, *, pace: bool = True) -> Iterator[pb.AnimateRequest]:
    for lap in itertools.count():
        yield from landmark_requests(seq, pace=pace, start=lap * len(seq.points))


def until(condition: Callable[[], bool], timeout: float, step: float = 0.02) -> float:
    """Seconds until `condition()` held; AssertionError after `timeout`."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout:g} s")
        time.sleep(step)
    return time.monotonic() - t0


def slots_free(server: ServerThread) -> bool:
    return server.app.active_streams == 0 and server.metric_total("talkinghead_active_streams") == 0


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """Channels and calls of ended streams are finalised here, not inside a later import (CPython
    3.11.7 raises "AST constructor recursion depth mismatch" when a finaliser runs during ast.parse)."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def live(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A server with 2 stream slots and a 1.5 s idle timeout, holding the avatar `astro` (admission
    control off: these live streams are about slots and deadlines, not capacity)."""
    store = tmp_path_factory.mktemp("faults") / "store"
    running = ServerThread(
        settings=test_settings(
            model_repository, store, max_streams=2, stream_idle_timeout=IDLE_S, admission=False
        )
    )
    try:
        running.wait_ready()
        with running.client() as c:
            c.create_avatar("astro", [PORTRAIT], consent=CONSENT)
        yield running
    finally:
        running.stop()


@pytest.fixture
def short(driver: LandmarkSequence) -> LandmarkSequence:
    return LandmarkSequence(driver.points[:2], driver.frame_size, driver.fps)


# -- streams -------------------------------------------------------------------------------------
def test_idle_streams_end_with_deadline_exceeded_and_give_their_slots_back(
    live: ServerThread, short: LandmarkSequence
) -> None:
    """Config only, then silence: today's 64 such clients would lock every other client out."""
    ended: dict[int, tuple[grpc.StatusCode, str, float]] = {}
    hold = threading.Event()

    def idle_client(index: int) -> None:
        def requests() -> Iterator[pb.AnimateRequest]:
            yield config("astro")
            hold.wait(60)  # sends nothing more, keeps its side open

        t0 = time.monotonic()
        try:
            list(live.client().animation.Animate(requests(), timeout=60))
            ended[index] = (CODE.OK, "", time.monotonic() - t0)
        except grpc.RpcError as error:
            ended[index] = (error.code(), error.details() or "", time.monotonic() - t0)

    threads = [threading.Thread(target=idle_client, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        until(lambda: live.app.active_streams == 2, 10)
        with pytest.raises(grpc.RpcError) as full, live.client() as c:
            list(c.animation.Animate(iter([config("astro")]), timeout=10))
        assert full.value.code() == CODE.RESOURCE_EXHAUSTED
        for thread in threads:
            thread.join(IDLE_S + 10)
        for code, message, seconds in ended.values():
            assert code == CODE.DEADLINE_EXCEEDED, (code, message)
            assert "no frame or keepalive for 1.5 s" in message and "send keepalive" in message, message
            assert IDLE_S <= seconds < IDLE_S + 2, seconds
        assert len(ended) == 2
        until(lambda: slots_free(live), 2)
        with live.client() as c:  # a new client is admitted and served
            assert len(list(c.animate("astro", landmark_requests(short)))) == 2
        assert live.metric('talkinghead_streams_total{code="DEADLINE_EXCEEDED"}') >= 2
    finally:
        hold.set()


def test_a_quiet_stream_has_the_whole_idle_timeout_after_its_last_reply(
    live: ServerThread, driver: LandmarkSequence
) -> None:
    """A BLOCK stream sends 64 frames at once (paste-back: ~2 s to render here), then nothing, its
    side open. The idle timeout runs only while no reply is owed (animation.proto): the stream
    ends DEADLINE_EXCEEDED the whole timeout after its last reply. Before, the quiet time counted
    from its last request, so a stream whose replies took longer than the timeout was cut off
    anywhere from 0 s to the timeout after its last reply (0.05-0.4 s of 1.5 here)."""
    hold = threading.Event()
    seq = LandmarkSequence(driver.points[:64], driver.frame_size, driver.fps)

    def requests() -> Iterator[pb.AnimateRequest]:
        yield config("astro", paste_back=True, queue_depth=64, overflow=pb.OVERFLOW_POLICY_BLOCK)
        yield from landmark_requests(seq, pace=False)
        hold.wait(30)

    got: list[float] = []
    try:
        with pytest.raises(grpc.RpcError) as ended, live.client() as c:
            for reply in c.animation.Animate(requests(), timeout=60):
                if reply.HasField("frame"):
                    got.append(time.monotonic())
        quiet = time.monotonic() - got[-1]
    finally:
        hold.set()
    assert ended.value.code() == CODE.DEADLINE_EXCEEDED, ended.value.details()
    assert len(got) == 64 and got[-1] - got[0] > 0.5, (len(got), got[-1] - got[0])
    assert IDLE_S - 0.1 <= quiet < IDLE_S + 1, quiet
    until(lambda: slots_free(live), 2)


def test_keepalives_hold_a_quiet_stream_open(live: ServerThread, short: LandmarkSequence) -> None:
    def requests() -> Iterator[pb.AnimateRequest]:
        yield config("astro")
        end = time.monotonic() + 3 * IDLE_S
        while time.monotonic() < end:  # nothing to animate for 3 idle timeouts, but alive
            yield pb.AnimateRequest(keepalive=pb.Keepalive())
            time.sleep(IDLE_S / 4)
        yield from landmark_requests(short)

    with live.client() as c:
        replies = list(c.animation.Animate(requests(), timeout=60))
    assert [r.frame.sequence for r in replies if r.HasField("frame")] == [0, 1]
    until(lambda: slots_free(live), 2)


def test_a_client_that_stops_reading_gives_its_slot_back(
    live: ServerThread, driver: LandmarkSequence, short: LandmarkSequence
) -> None:
    """It goes on sending frames but reads none of the replies (raw RGB pasted into the 512 px
    portrait: 786 KB each): once its gRPC receive window is full (a few MB) flow control holds the
    server's write, and the write deadline (the idle timeout) ends the stream."""
    stop = threading.Event()

    def requests() -> Iterator[pb.AnimateRequest]:
        yield config(
            "astro",
            encoding=pb.OUTPUT_ENCODING_RAW_RGB,
            overflow=pb.OVERFLOW_POLICY_DROP_OLDEST,
            paste_back=True,
        )
        for request in frames_forever(driver):
            if stop.is_set():
                return
            yield request

    c = live.client()
    stalled = 'talkinghead_streams_total{code="DEADLINE_EXCEEDED"}'
    before = live.metric(stalled) if stalled in live.metrics() else 0.0
    try:
        call = c.animation.Animate(requests(), timeout=120)
        assert next(call).HasField("started")  # then never reads again
        t0 = time.monotonic()
        until(lambda: live.app.active_streams == 0, 60)
        freed = time.monotonic() - t0
        sent = live.metric("talkinghead_frames_sent_total")
        print(f"frozen reader: slot back {freed:.1f} s after its last read ({sent:.0f} frames sent)")
        assert freed < IDLE_S + 5
        # ended by the write deadline, not as a cancel (counted as the call ends: its status waits
        # up to STATUS_WAIT_S behind the replies the client does not take)
        until(lambda: live.metric(stalled, 0.0) >= before + 1, 10)
        assert live.metric(stalled) == before + 1
        # and its handler ends too (its status may never get through to a client that reads nothing)
        until(lambda: not live.call(animate_handlers()), 5)
        with live.client() as other:
            assert len(list(other.animate("astro", landmark_requests(short)))) == 2
    finally:
        stop.set()
        c.close()


def test_a_live_client_that_stops_reading_but_floods_holds_a_bounded_backlog(
    live: ServerThread, driver: LandmarkSequence
) -> None:
    """A live stream whose client reads no reply but sends as fast as it can: the reply loop
    blocks on its write, and the reader appended an entry for every request (dropped or not)
    until the write deadline: 186,000 frames, +136-190 MB (helper-74). The reader now waits at
    MAX_OWED replies owed, and gRPC's flow control holds the client."""
    from service.stream import MAX_OWED

    stop, sent = threading.Event(), [0]

    def requests() -> Iterator[pb.AnimateRequest]:
        yield config(  # (the most a stream may reserve: read at up to 150 a second)
            "astro",
            encoding=pb.OUTPUT_ENCODING_RAW_RGB,
            overflow=pb.OVERFLOW_POLICY_DROP_OLDEST,
            expected_fps=120,
        )
        for request in frames_forever(driver, pace=False):
            if stop.is_set():
                return
            sent[0] += 1
            yield request

    async def owed() -> list[int]:
        return [
            len(w.stream.outstanding)
            for ws in live.app.streams._by_avatar.values()
            for w in ws
            if w.stream is not None
        ]

    c = live.client()
    try:
        call = c.animation.Animate(requests(), timeout=120)
        assert next(call).HasField("started")  # then never reads again
        most = 0
        while live.app.active_streams:  # until the write deadline ends it
            most = max([most, *live.call(owed())])
            time.sleep(0.01)
        print(f"flooding reader: {sent[0]} frames sent, at most {most} replies owed")
        assert sent[0] > MAX_OWED, "the client sent more than the backlog may hold"
        assert 0 < most <= MAX_OWED
    finally:
        stop.set()
        c.close()


def test_a_live_stream_is_read_no_faster_than_the_rate_it_reserved(
    live: ServerThread, driver: LandmarkSequence
) -> None:
    """Admission trusted expected_fps: streams declaring 1 fps and sending all they could took
    ~20 fps each of the generator, and an honest stream beside them lost half its frames
    (helper-74). A live stream is now read at most at 1.25x the rate it reserved, after a
    second's burst: what it sends faster waits in gRPC's flow control, and nothing is lost."""
    from service.stream import RATE_BURST_S, RATE_SLACK

    def timed(fps: float, frames: int, pace: bool) -> tuple[float, list[pb.AnimateResponse]]:
        seq = LandmarkSequence(driver.points[:frames], driver.frame_size, fps)
        requests = [config("astro", overflow=pb.OVERFLOW_POLICY_DROP_OLDEST, expected_fps=fps)]
        started = time.monotonic()
        with live.client() as c:
            call = c.animation.Animate(iter([*requests, *landmark_requests(seq, pace=pace)]), timeout=120)
            replies = [r for r in call if r.HasField("frame")]
        return time.monotonic() - started, replies

    rate = 4 * RATE_SLACK
    took, replies = timed(4.0, 20, pace=False)  # 20 frames at once, 4 a second declared
    least = (20 - rate * RATE_BURST_S) / rate  # after the burst, 5 a second
    assert took >= least - 0.2, f"read in {took:.1f} s, not in {least:.1f} s or more"
    assert len(replies) + sum(r.frame.dropped_before for r in replies) == 20, "every frame accounted for"
    assert replies[-1].frame.sequence == 19
    honest, got = timed(25.0, 10, pace=True)  # sends at its rate: not held back
    assert len(got) + sum(r.frame.dropped_before for r in got) == 10
    assert honest < 0.4 + 3.0, honest  # (10 frames at 25 fps: 0.4 s, and a loaded machine's slack)


CLIENT = """
import itertools, sys
from api.talkinghead.v1 import animation_pb2 as pb
from client.library import Client, landmark_requests
from deploy.local import tritonserver
from facekit.sequence import LandmarkSequence

address, driver = sys.argv[1:3]
seq = LandmarkSequence.load(driver)
def requests():
    yield pb.AnimateRequest(config=pb.StreamConfig(avatar_id="astro", encoding=pb.OUTPUT_ENCODING_RAW_RGB))
    for lap in itertools.count():
        yield from landmark_requests(seq, pace=True, start=lap * len(seq.points))
with Client(target=address) as c:
    for n, reply in enumerate(c.animation.Animate(requests())):
        print(n, flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_client_process_that_dies_or_freezes_gives_its_slot_back(
    live: ServerThread, short: LandmarkSequence, sig: signal.Signals
) -> None:
    """SIGKILL closes the client's socket (the server hears it at once); SIGSTOP is a client whose
    machine dropped off the network: no frames, no reads, no acks, no FIN."""
    process = subprocess.Popen(
        [sys.executable, "-c", CLIENT, live.address, str(DRIVER)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for _ in range(5):  # streaming: started + 4 frames
            assert process.stdout.readline(), "the client process ended early"
        assert live.app.active_streams == 1
        process.send_signal(sig)
        freed = until(lambda: live.app.active_streams == 0, IDLE_S + 10)
        print(f"client {sig.name}: slot back after {freed:.2f} s")
        assert freed < IDLE_S + 3
        with live.client() as c:
            assert len(list(c.animate("astro", landmark_requests(short)))) == 2
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_a_client_that_cancels_mid_stream_frees_its_slot_without_an_error_logged(
    live: ServerThread, driver: LandmarkSequence, short: LandmarkSequence, caplog: pytest.LogCaptureFixture
) -> None:
    """A viewer who closes the call while frames are still coming is ordinary: the slot comes back
    and the server logs no ERROR (no traceback for a write that found the client gone)."""
    caplog.set_level("INFO", logger="talkinghead")

    async def watch_three_frames_and_leave() -> int:
        async with grpc.aio.insecure_channel(live.address) as channel:
            call = AnimationServiceStub(channel).Animate()
            await call.write(config("astro", overflow=pb.OVERFLOW_POLICY_BLOCK))
            got = 0
            async for response in call:
                if response.HasField("started"):
                    for request in itertools.islice(frames_forever(driver, pace=False), 60):
                        await call.write(request)
                elif response.HasField("frame"):
                    got += 1
                    if got == 3:
                        call.cancel()
                        break
            return got

    for _ in range(3):
        assert asyncio.run(watch_three_frames_and_leave()) == 3
        until(lambda: slots_free(live), 10)
    errors = [r for r in caplog.records if r.name.startswith("talkinghead") and r.levelno >= 40]
    assert not errors, [r.getMessage() for r in errors]
    with live.client() as c:  # and the server streams on
        assert len(list(c.animate("astro", landmark_requests(short)))) == len(short.points)


async def animate_handlers() -> list[str]:
    """The server's Animate calls still being handled (run in its loop)."""
    return [t.get_name() for t in asyncio.all_tasks() if "AnimationService/Animate" in t.get_name()]


def test_liveness_settings_come_from_the_environment_and_flags() -> None:
    import argparse

    from service import settings as settings_module

    env = {"TALKINGHEAD_STREAM_IDLE_TIMEOUT": "12.5", "TALKINGHEAD_BACKEND_TIMEOUT": "2"}
    default = settings_module.from_env({})
    assert (default.stream_idle_timeout, default.backend_timeout, default.backend_stall) == (30, 5, 1.5)
    s = settings_module.from_env(env)
    assert (s.stream_idle_timeout, s.backend_timeout) == (12.5, 2)
    parser = argparse.ArgumentParser()
    settings_module.add_arguments(parser)
    args = parser.parse_args(["--stream-idle-timeout", "4", "--backend-timeout", "3", "--backend-stall", "1"])
    s = settings_module.from_args(args, env)
    assert (s.stream_idle_timeout, s.backend_timeout, s.backend_stall) == (4, 3, 1)
    for name in ("STREAM_IDLE_TIMEOUT", "BACKEND_TIMEOUT"):
        with pytest.raises(ValueError, match=f"{name.lower()} must be > 0"):
            settings_module.from_env({f"TALKINGHEAD_{name}": "0"})


# -- backend: ONNX Runtime in-process ------------------------------------------------------------
class HealthWatch:
    """Polls gRPC health every 50 ms in a thread: [(seconds since start, status)]."""

    def __init__(self, server: ServerThread) -> None:
        self.client, self.t0 = server.client(), time.monotonic()
        self.seen: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self.client.health()
            except grpc.RpcError as error:
                status = error.code().name
            self.seen.append((time.monotonic() - self.t0, status))
            time.sleep(0.05)

    def first(self, status: str, after: float = 0.0) -> float | None:
        """Seconds since start when `status` was first seen at or after `after`."""
        return next((t for t, s in self.seen if s == status and t >= after), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


class StreamRun:
    """One Animate stream in a thread: config, then `requests`; its replies, end status and time."""

    def __init__(self, client: Client, requests: Iterator[pb.AnimateRequest]) -> None:
        self.client, self.requests = client, requests
        self.frames: list[tuple[float, pb.AnimatedFrame]] = []
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.ended = 0.0
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for reply in self.client.animation.Animate(self.requests, timeout=120):
                if reply.HasField("frame"):
                    self.frames.append((time.monotonic(), reply.frame))
            self.code = CODE.OK
        except grpc.RpcError as error:
            self.code, self.details = error.code(), error.details() or ""
        self.ended = time.monotonic()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the stream did not end within {timeout:g} s"


def test_the_backend_gate_cuts_late_and_abandoned_calls_and_lets_the_caller_cancel() -> None:
    """ReadyGate.call, which every model call goes through: past its deadline, or abandoned (Triton
    went away), a call fails BackendUnavailable at once and its `give_up` runs; the caller's own
    cancellation stays a cancellation, and the work is cancelled with it."""

    class Gate(ReadyGate):
        def __init__(self) -> None:
            self.init_gate(timeout_s=0.2, stall_s=10.0)

    async def scenario() -> None:
        gate, gave_up = Gate(), []
        hang = asyncio.get_running_loop().create_future()
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable, match=r"did not answer within 0\.2 s") as late:
            await gate.call("generator", hang, give_up=lambda: gave_up.append("late"))
        assert 0.15 < time.monotonic() - t0 < 2.0 and hang.cancelled() and gave_up == ["late"]
        assert "did not answer" in late.value.reason

        hang = asyncio.get_running_loop().create_future()
        pending = asyncio.ensure_future(gate.call("embedder", hang, give_up=lambda: gave_up.append("gone")))
        await asyncio.sleep(0.01)
        gate.abandon_calls("Triton at x went away")
        with pytest.raises(BackendUnavailable, match="embedder: Triton at x went away") as gone:
            await pending
        assert gone.value.reason == "it went away" and gave_up == ["late", "gone"]

        hang = asyncio.get_running_loop().create_future()
        pending = asyncio.ensure_future(gate.call("generator", hang, give_up=lambda: gave_up.append("x")))
        await asyncio.sleep(0.01)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert hang.cancelled() and gave_up == ["late", "gone"] and not gate._calls

        assert await gate.call("generator", asyncio.sleep(0.01, result=7)) == 7  # and a normal call

    asyncio.run(scenario())


def test_a_model_call_past_the_backend_timeout_is_cut_and_health_follows(
    model_repository: Path, tmp_path: Path, driver: LandmarkSequence, short: LandmarkSequence
) -> None:
    """A batch of ~60 frames on one inference thread takes seconds: past backend_stall (0.5 s)
    health says NOT_SERVING, at backend_timeout (1 s) the call is terminated and the stream gets
    UNAVAILABLE; the service serves again at once. (Before: the stream simply waited.) Batches
    are sized so that their measured cost stays well under the deadline, so the backend here is
    far slower than its cost model says (1 ms a frame): a GPU throttled, a machine overloaded."""
    settings = test_settings(
        model_repository,
        tmp_path / "store",
        max_batch=64,
        inference_threads=1,
        backend_timeout=1.0,
        backend_stall=0.5,
    )
    running = ServerThread(settings=settings)
    watch: HealthWatch | None = None
    try:
        running.wait_ready()
        running.app.cost.cost = lambda batch: 0.001 * batch  # (what calibration measured is ignored)
        with running.client() as c:
            c.create_avatar("astro", [PORTRAIT], consent=CONSENT)
            c.wait_ready(10)
            many = LandmarkSequence(driver.points[:64], driver.frame_size, driver.fps)
            watch = HealthWatch(running)
            requests = itertools.chain(
                [config("astro", overflow=pb.OVERFLOW_POLICY_BLOCK, queue_depth=64)],
                landmark_requests(many),
            )
            stream = StreamRun(c, requests)
            stream.join(30)
            took = stream.ended - stream.t0
            assert stream.code == CODE.UNAVAILABLE, (stream.code, stream.details, len(stream.frames))
            assert "did not answer within 1 s" in stream.details, stream.details
            assert took < 5, took
            not_serving = watch.first("NOT_SERVING")
            assert not_serving is not None and not_serving < took, watch.seen
            back = until(lambda: c.health() == "SERVING", 2)
            assert len(list(c.animate("astro", landmark_requests(short)))) == 2
            print(
                f"cut after {took:.2f} s with {len(stream.frames)} frames delivered; NOT_SERVING seen at "
                f"{not_serving:.2f} s; SERVING again {back:.2f} s after the cut"
            )
        assert (
            running.metric('talkinghead_backend_errors_total{kind="unavailable",operation="generate"}') >= 1
        )
        until(lambda: slots_free(running), 2)
    finally:
        if watch is not None:
            watch.stop()
        running.stop()


@pytest.mark.slow
def test_a_slow_batch_of_one_model_does_not_hold_up_another(
    personalised_repository: tuple[Path, str], tmp_path: Path, driver: LandmarkSequence
) -> None:
    """A personalised generator runs batches of ~48 frames (seconds each, one inference thread);
    meanwhile single frames of another avatar on the shared generator come back in well under that
    (before: they waited behind the personalised batch in the one batcher task and one thread)."""
    repository, fine = personalised_repository
    settings = test_settings(
        repository,
        tmp_path / "store",
        max_batch=48,
        batching="always",  # the big batch is the point, whether or not batches pay here
        inference_threads=1,
        backend_timeout=60,
        backend_stall=60,
    )
    running = ServerThread(settings=settings)
    try:
        running.wait_ready()
        with running.client() as c:
            assert c.create_avatar(fine, [PORTRAIT], consent=CONSENT).personalised
            c.create_avatar("astro", [PORTRAIT], consent=CONSENT)
            many = LandmarkSequence(driver.points[:96], driver.frame_size, driver.fps)
            busy = StreamRun(
                c,
                itertools.chain(
                    [config(fine, overflow=pb.OVERFLOW_POLICY_BLOCK, queue_depth=64)], landmark_requests(many)
                ),
            )
            until(lambda: len(busy.frames) >= 1, 30)  # the next batch is the big one
            time.sleep(0.3)
            one = LandmarkSequence(driver.points[:1], driver.frame_size, driver.fps)
            latencies = []
            for _ in range(3):
                t0 = time.monotonic()
                assert len(list(c.animate("astro", landmark_requests(one)))) == 1
                latencies.append(time.monotonic() - t0)
            busy.join(120)
            assert busy.code == CODE.OK and len(busy.frames) == 96, (busy.code, busy.details)
        big = max(busy.frames, key=lambda f: f[1].batch_size)[1]
        seconds = big.timings.inference_us / 1e6
        print(
            f"personalised batch of {big.batch_size}: {seconds:.2f} s; shared single frames meanwhile: "
            + ", ".join(f"{t:.2f} s" for t in latencies)
        )
        assert big.batch_size >= 24 and max(latencies) < seconds / 2, (big.batch_size, seconds, latencies)
    finally:
        running.stop()


# -- backend: Triton -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    """The bundled Triton on free ports with a private repository, for this module to kill."""
    try:
        tritonserver.server_root(TRITON_VENV)
    except FileNotFoundError as err:
        pytest.skip(f"bundled Triton server unavailable: {err}")
    work = tmp_path_factory.mktemp("triton-faults")
    server = Triton(repository=copy_base_models(model_repository, work / "repo"), state=work / "state")
    server.start()
    try:
        yield server
    finally:
        if server.server is not None:
            os.kill(server.server.process.pid, signal.SIGCONT)
        server.stop()


def take_away(triton: Triton, sig: signal.Signals) -> None:
    assert triton.server is not None
    os.kill(triton.server.process.pid, sig)
    if sig == signal.SIGKILL:
        triton.server.process.wait()
        triton.server = None


def orphaned_stubs(triton: Triton) -> list[int]:
    """Python-backend stub processes a killed Triton left running (they hold its backend files)."""
    folder = str(triton.state.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "exe").startswith(folder):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def give_back(triton: Triton, sig: signal.Signals) -> None:
    if sig == signal.SIGKILL:
        try:  # a restarted pod starts clean: the old stubs notice their parent is gone, or go now
            until(lambda: not orphaned_stubs(triton), 10, step=0.1)
        except AssertionError:
            for pid in orphaned_stubs(triton):
                os.kill(pid, signal.SIGKILL)
            until(lambda: not orphaned_stubs(triton), 5)
        triton.start()  # returns once Triton reports ready
    else:
        assert triton.server is not None
        os.kill(triton.server.process.pid, signal.SIGCONT)


def works(c: Client, seq: LandmarkSequence) -> bool:
    try:
        return len(list(c.animate("tri", landmark_requests(seq)))) == len(seq.points)
    except grpc.RpcError:
        return False


@pytest.mark.triton
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_triton_killed_or_frozen_mid_stream(
    triton: Triton,
    model_repository: Path,
    tmp_path: Path,
    driver: LandmarkSequence,
    short: LandmarkSequence,
    sig: signal.Signals,
) -> None:
    """A stream at 10 fps; Triton gets `sig`: the stream ends UNAVAILABLE and health says NOT_SERVING
    within 2 s (before: a frozen Triton held the stream for the 30 s call timeout, and health stayed
    SERVING as long); once Triton is back (restarted ready / SIGCONT) streams work within 5 s."""
    settings = test_settings(model_repository, tmp_path / "store", backend="triton", triton_url=triton.url)
    running = ServerThread(settings=settings)
    watch: HealthWatch | None = None
    try:
        running.wait_ready(timeout=60)
        with running.client() as c:
            c.wait_ready(timeout=10)
            c.create_avatar("tri", [PORTRAIT], consent=CONSENT)
            slow = LandmarkSequence(driver.points, driver.frame_size, 10.0)
            stream = StreamRun(c, itertools.chain([config("tri")], frames_forever(slow)))
            until(lambda: len(stream.frames) >= 5, 30)
            watch = HealthWatch(running)
            until(lambda: watch.first("SERVING") is not None, 5)
            hit = time.monotonic() - watch.t0
            take_away(triton, sig)
            stream.join(10)
            unavailable = stream.ended - watch.t0 - hit
            assert stream.code == CODE.UNAVAILABLE, (stream.code, stream.details)
            # what went wrong, not where: no address, no Triton client's words
            assert stream.details.startswith("the model backend is unavailable: it "), stream.details
            assert triton.url.split(":")[0] not in stream.details, stream.details
            until(lambda: watch.first("NOT_SERVING", hit) is not None, 5)
            not_serving = watch.first("NOT_SERVING", hit) - hit  # type: ignore[operator]
            assert unavailable <= 2.0 and not_serving <= 2.0, (unavailable, not_serving)
            until(lambda: running.app.active_streams == 0, 2)
            assert not works(c, short)  # while it is away: UNAVAILABLE, not a hang

            give_back(triton, sig)
            returned = time.monotonic()
            recovered = until(lambda: works(c, short), 30, step=0.1)
            serving = until(lambda: c.health() == "SERVING", 5)
            print(
                f"Triton {sig.name}: stream UNAVAILABLE after {unavailable:.2f} s ({stream.details!r}), "
                f"NOT_SERVING after {not_serving:.2f} s; back: a stream works {recovered:.2f} s after "
                f"its return, SERVING {time.monotonic() - returned:.2f} s after"
            )
            assert recovered <= 5.0 and serving <= 5.0, (recovered, serving)
    finally:
        if watch is not None:
            watch.stop()
        running.stop()
        if triton.server is None:
            triton.start()
        else:
            os.kill(triton.server.process.pid, signal.SIGCONT)


@pytest.mark.triton
def test_a_worker_whose_triton_freezes_as_it_loads_ends_the_job_unavailable(
    triton: Triton, tmp_path: Path, photos: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2-step personalisation run by the worker's code, its Triton frozen (SIGSTOP: a machine cut
    off) before the generator loads. Before, the worker's calls to Triton had no deadline: each
    waited for gRPC's 20 s connect timeout (the load, then the unload taking the version back: 40
    s "loading"), and a call Triton had accepted before it froze waited for ever while the job's
    heartbeat went on beating. Now every call gives up after --triton-timeout (2 s here): the job
    ends FAILED with UNAVAILABLE within a few seconds, the version it wrote is taken back (the
    repository holds no generator Triton never loaded), and once Triton is back the same
    personalisation succeeds and is served there."""
    from jobs.local import LocalQueue
    from jobs.record import CODE_UNAVAILABLE, FAILED, PERSONALISE, SUCCEEDED, Job, new_id
    from training import checkpoint
    from worker import models
    from worker.jobs_run import model_id_of, run_job, with_progress_every_step

    monkeypatch.setattr(models, "timeout_s", 2.0)
    meta = checkpoint.load(CHECKPOINT)
    queue = LocalQueue(root=tmp_path / "jobs")
    ctx = worker_context(
        queue,
        triton.repository,
        meta=with_progress_every_step(meta),
        model_id=model_id_of(meta),
        tritons=[triton.url],
    )
    name = contract.personalised_name("frozen")

    def personalise() -> Job:
        job = queue.submit(
            Job(id=new_id(), kind=PERSONALISE, avatar_id="frozen", model_id=ctx.model_id, steps=2),
            photos,
            max_active=2,
        )
        held = queue.claim("w", wait_s=1)
        assert held is not None and held.id == job.id
        if frozen:  # (fine-tuning and the export never call Triton)
            take_away(triton, signal.SIGSTOP)
        running = threading.Thread(target=run_job, args=(ctx, held), daemon=True)
        running.start()
        running.join(120)
        ended = queue.get(job.id)
        assert ended is not None
        return ended

    frozen = True
    try:
        failed = personalise()
    finally:
        give_back(triton, signal.SIGSTOP)
    assert failed.state == FAILED and failed.error_code == CODE_UNAVAILABLE, (failed.state, failed.error)
    assert failed.error == "the model server could not load the generator; personalise again later"
    assert failed.end_time - failed.load_time < 10.0, failed.end_time - failed.load_time
    assert not (triton.repository / name).exists()

    frozen = False
    monkeypatch.setattr(models, "timeout_s", contract.TRITON_LOAD_TIMEOUT_S)  # (a load takes 1-3 s here)
    done = personalise()
    try:
        assert done.state == SUCCEEDED, (done.state, done.error)
        assert models.TritonClient(triton.url).is_model_ready(name)
    finally:
        models.withdraw("frozen", triton.repository, tritons=[triton.url])


# -- the service killed mid-write ------------------------------------------------------------------
# `talkinghead serve` whose fsync of its second avatar file takes 60 s: a slow disk, so that the kill
# below lands inside the store's write for certain (the file written, not yet renamed into place).
SLOW_DISK_SERVE = """
import itertools, os, sys, time
store, real_fsync, writes = os.environ["TALKINGHEAD_AVATAR_STORE"], os.fsync, itertools.count(1)
def fsync(fd):
    path = os.readlink(f"/proc/self/fd/{fd}")
    if os.path.dirname(path) == store and os.path.basename(path).startswith(".tmp-"):
        if next(writes) == 2:
            print("writing", path, flush=True)
            time.sleep(60)
    return real_fsync(fd)
os.fsync = fsync
from talkinghead.cli import main
sys.exit(main(["serve"]))
"""


def serve(tmp_path: Path, repository: Path, port: int, *, slow_disk: bool) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TALKINGHEAD_GRPC_PORT": str(port),
        "TALKINGHEAD_METRICS_PORT": "0",
        "TALKINGHEAD_MODEL_REPOSITORY": str(repository),
        "TALKINGHEAD_AVATAR_STORE": str((tmp_path / "store").resolve()),
        "TALKINGHEAD_JOBS": str(tmp_path / "jobs"),
        "TALKINGHEAD_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "TALKINGHEAD_WORKER": "external",
        "TALKINGHEAD_ENGINE": "onnxruntime",  # no engines timed at each start
    }
    argv = ["-c", SLOW_DISK_SERVE] if slow_disk else ["-m", "talkinghead.cli", "serve"]
    return subprocess.Popen(
        [sys.executable, *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_service_killed_mid_avatar_write_leaves_no_partial_avatar(
    model_repository: Path, tmp_path: Path, short: LandmarkSequence
) -> None:
    """SIGKILL while CreateAvatar("halfway") writes (temporary file complete, not renamed): after a
    restart "halfway" is neither listed nor served and can be created again; "before" is whole."""
    from tests.test_service_triton import free_port

    port = free_port()
    target = f"127.0.0.1:{port}"
    store = tmp_path / "store"
    first = serve(tmp_path, model_repository, port, slow_disk=True)
    ended: list[grpc.StatusCode] = []

    def create_halfway(c: Client) -> None:
        try:
            c.create_avatar("halfway", [PORTRAIT], consent=CONSENT)
        except grpc.RpcError as error:
            ended.append(error.code())

    try:
        with Client(target=target, timeout=60) as c:
            c.wait_ready(60)
            c.create_avatar("before", [PORTRAIT], display_name="Before", consent=CONSENT)
            creating = threading.Thread(target=create_halfway, args=(c,), daemon=True)
            creating.start()
            assert first.stdout is not None
            line = first.stdout.readline()  # the write has begun: its temporary file is complete
            assert line.startswith("writing"), line
            temporary = Path(line.split(" ", 1)[1].strip())
            assert temporary.exists() and not (store / "halfway.npz").exists()
            first.send_signal(signal.SIGKILL)
            first.wait()
            creating.join(30)
            assert ended == [CODE.UNAVAILABLE]  # the caller learns that it did not happen
    finally:
        first.kill()
        first.wait()

    second = serve(tmp_path, model_repository, port, slow_disk=False)
    try:
        with Client(target=target, timeout=60) as c:
            c.wait_ready(60)
            assert [a.avatar_id for a in c.list_avatars()] == ["before"]  # "halfway" is not listed
            with pytest.raises(grpc.RpcError) as missing:
                c.get_avatar("halfway")
            assert missing.value.code() == CODE.NOT_FOUND
            with pytest.raises(grpc.RpcError) as stream:
                list(c.animate("halfway", landmark_requests(short)))
            assert stream.value.code() == CODE.NOT_FOUND
            before = c.get_avatar("before", include_preview=True)
            assert before.display_name == "Before" and before.image_count == 1 and before.preview_png
            assert len(list(c.animate("before", landmark_requests(short)))) == 2
            # the id is free: created again, it is whole and animates
            assert c.create_avatar("halfway", [PORTRAIT], consent=CONSENT).avatar_id == "halfway"
            assert [a.avatar_id for a in c.list_avatars()] == ["before", "halfway"]
            assert len(list(c.animate("halfway", landmark_requests(short)))) == 2
    finally:
        second.terminate()
        second.wait(30)


def test_a_full_store_refuses_new_avatars_and_keeps_the_stored_ones(
    model_repository: Path, tmp_path: Path, short: LandmarkSequence
) -> None:
    """The avatar store's filesystem fills up (a real 1 MiB tmpfs): CreateAvatar gets UNAVAILABLE
    "the server's storage is full" (before: INTERNAL "OSError"), no temporary file is left, the
    avatar stored before still streams, and once there is room a new avatar is created."""
    with tmpfs(tmp_path / "store", "1m") as store:
        running = ServerThread(settings=test_settings(model_repository, store))
        try:
            running.wait_ready()
            with running.client() as c:
                c.create_avatar("before", [PORTRAIT], consent=CONSENT)
                filler = fill(store / "filler")
                with pytest.raises(grpc.RpcError) as refused:
                    c.create_avatar("after", [PORTRAIT], consent=CONSENT)
                assert refused.value.code() == CODE.UNAVAILABLE, refused.value.details()
                assert refused.value.details() == "the server's storage is full; retry later"
                assert not list(store.glob(".tmp-*")), "a partial avatar file was left"
                assert [a.avatar_id for a in c.list_avatars()] == ["before"]
                assert len(list(c.animate("before", landmark_requests(short)))) == len(short.points)

                filler.unlink()
                c.create_avatar("after", [PORTRAIT], consent=CONSENT)
                assert [a.avatar_id for a in c.list_avatars()] == ["after", "before"]
        finally:
            running.stop()


def _refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value.code(), refused.value.details()


def test_a_change_the_disk_refuses_happens_whole_or_not_at_all(
    model_repository: Path, tmp_path: Path
) -> None:
    """helper-81, on real tmpfs volumes: a replace refused for a full store cancelled the avatar's
    personalisation all the same ("the avatar was replaced"); a read-only store answered INTERNAL
    "OSError" with a traceback; an audit log that could take no intent let the create go on with
    no event ever. Now each is UNAVAILABLE saying which storage, and nothing changed."""
    with (
        tmpfs(tmp_path / "store", "2m") as store,
        tmpfs(tmp_path / "audit", "1m") as audit,
    ):
        settings = test_settings(model_repository, store, audit_log=audit / "audit.jsonl")
        running = ServerThread(settings=settings)
        try:
            running.wait_ready()
            with running.client() as c:
                c.create_avatar("mona", [PORTRAIT], consent=CONSENT)
                queued = c.personalise("mona")  # no worker: it stays queued
                filler = fill(store / "filler")
                replace = lambda: c.create_avatar("mona", [PORTRAIT], consent=CONSENT, replace=True)  # noqa: E731
                assert _refused(replace) == (CODE.UNAVAILABLE, "the server's storage is full; retry later")
                assert not c.get_operation(queued.name).done, "a refused replace cancelled it"
                filler.unlink()

                subprocess.run(["mount", "-o", "remount,ro", str(store)], check=True)
                try:
                    code, details = _refused(lambda: c.create_avatar("ro", [PORTRAIT], consent=CONSENT))
                    assert (code, details) == (
                        CODE.UNAVAILABLE,
                        "the server's storage refused the request; retry later",
                    )
                finally:
                    subprocess.run(["mount", "-o", "remount,rw", str(store)], check=True)

                filler = fill(audit / "filler")
                code, details = _refused(lambda: c.create_avatar("unlogged", [PORTRAIT], consent=CONSENT))
                assert code == CODE.UNAVAILABLE and details.startswith(
                    "the audit log cannot be written (its storage is full)"
                )
                assert [a.avatar_id for a in c.list_avatars()] == ["mona"], "created with no audit event"
                filler.unlink()

                replace()  # room again: the replace happens, and its personalisation goes with it
                ended = c.get_operation(queued.name)
                assert ended.done and "the avatar was replaced" in ended.error.message
        finally:
            running.stop()


def test_a_damaged_record_is_named_and_its_owner_can_delete_or_replace_it(
    model_repository: Path, tmp_path: Path, short: LandmarkSequence
) -> None:
    """A record cut short or overwritten with noise (helper-81): ListAvatars failed INTERNAL
    "BadZipFile" for the whole tenant, and get, animate, delete and replace of the id INTERNAL with
    a traceback each: no way out but the operator's shell. Now the listing leaves it out, a read
    of it is DATA_LOSS naming the avatar, a delete removes it (its tombstone says it could not be
    read) and a replace writes over it. A directory in a record's place (an operator's mistake)
    reads the same; its delete or replace failed INTERNAL: now the directory is moved aside,
    hidden and kept, and the delete or replace ends."""
    store = tmp_path / "store"
    settings = test_settings(model_repository, store)
    first = ServerThread(settings=settings)
    try:
        first.wait_ready()
        with first.client() as c:
            for name in ("cut", "noise", "kept"):
                c.create_avatar(name, [PORTRAIT], consent=CONSENT)
    finally:
        first.stop()
    cut = store / "cut.npz"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (store / "noise.npz").write_bytes(os.urandom(5000))
    for name in ("folder", "dir"):
        (store / f"{name}.npz").mkdir()
        (store / f"{name}.npz" / "notes.txt").write_text(f"an operator's {name}")
    running = ServerThread(settings=settings)  # (a new one: nothing cached)
    try:
        running.wait_ready()
        with running.client() as c:
            assert [a.avatar_id for a in c.list_avatars()] == ["kept"]
            unreadable = "the stored record of avatar {!r} cannot be read (damaged or cut short): "
            for name in ("cut", "noise", "folder", "dir"):
                expected = (
                    CODE.DATA_LOSS,
                    unreadable.format(name) + "delete it, or create it again with replace",
                )
                assert _refused(lambda: c.get_avatar(name)) == expected  # noqa: B023
                assert _refused(lambda: list(c.animate(name, landmark_requests(short)))) == expected  # noqa: B023
                assert _refused(lambda: c.create_avatar(name, [PORTRAIT], consent=CONSENT)) == expected  # noqa: B023
            for name in ("noise", "folder"):
                c.delete_avatar(name)
                assert _refused(lambda: c.get_avatar(name))[0] == CODE.NOT_FOUND  # noqa: B023
            for name in ("cut", "dir"):
                c.create_avatar(name, [PORTRAIT], consent=CONSENT, replace=True)
            assert [a.avatar_id for a in c.list_avatars()] == ["cut", "dir", "kept"]
            aside = sorted(p.read_text() for p in store.glob(".aside-*.npz-*/notes.txt"))
            assert aside == ["an operator's dir", "an operator's folder"]
            assert len(list(c.animate("cut", landmark_requests(short)))) == len(short.points)
        events = [json.loads(line) for line in settings.audit_log.read_text().splitlines()]
        tombstone = next(e for e in events if e["event"] == "delete" and e["avatar_id"] == "noise")
        assert tombstone["detail"]["unreadable"] is True
        replaced = [e for e in events if e["event"] == "replace" and e["avatar_id"] == "cut"]
        assert replaced and replaced[-1]["detail"]["replaced"]["unreadable"] is True
    finally:
        running.stop()
