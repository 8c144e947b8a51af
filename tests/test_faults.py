"""Faults a deployment meets, against the real service: idle, frozen and vanished clients.

- Streams: a stream that sends neither frames nor keepalives ends with DEADLINE_EXCEEDED after
  `stream_idle_timeout` and gives its slot back; keepalives hold it open; a client that stops
  reading, is killed (SIGKILL) or freezes (SIGSTOP, as a machine that drops off the network) gets
  its slot back within about the idle timeout, so max_streams idle clients cannot lock others out.
"""

from __future__ import annotations

import asyncio
import itertools
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
from client.library import landmark_requests
from facekit.sequence import LandmarkSequence
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, DRIVER, PORTRAIT, REPO, ServerThread, test_settings

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
    return server.app.active_streams == 0 and server.metric("talkinghead_active_streams") == 0


@pytest.fixture(scope="module")
def live(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A server with 2 stream slots and a 1.5 s idle timeout, holding the avatar `astro`."""
    store = tmp_path_factory.mktemp("faults") / "store"
    running = ServerThread(
        settings=test_settings(model_repository, store, max_streams=2, stream_idle_timeout=IDLE_S)
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
    try:
        call = c.animation.Animate(requests(), timeout=120)
        assert next(call).HasField("started")  # then never reads again
        t0 = time.monotonic()
        until(lambda: live.app.active_streams == 0, 60)
        freed = time.monotonic() - t0
        sent = live.metric("talkinghead_frames_sent_total")
        print(f"frozen reader: slot back {freed:.1f} s after its last read ({sent:.0f} frames sent)")
        assert freed < IDLE_S + 5
        # and its handler ends too (its status may never get through to a client that reads nothing)
        until(lambda: not live.call(animate_handlers()), 5)
        with live.client() as other:
            assert len(list(other.animate("astro", landmark_requests(short)))) == 2
    finally:
        stop.set()
        c.close()


CLIENT = """
import itertools, sys
from api.talkinghead.v1 import animation_pb2 as pb
from client.library import Client, landmark_requests
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


async def animate_handlers() -> list[str]:
    """The server's Animate calls still being handled (run in its loop)."""
    return [t.get_name() for t in asyncio.all_tasks() if "AnimationService/Animate" in t.get_name()]


def test_liveness_settings_come_from_the_environment_and_flags() -> None:
    import argparse

    from service import settings as settings_module

    env = {"TALKINGHEAD_STREAM_IDLE_TIMEOUT": "12.5"}
    assert settings_module.from_env({}).stream_idle_timeout == 30
    assert settings_module.from_env(env).stream_idle_timeout == 12.5
    parser = argparse.ArgumentParser()
    settings_module.add_arguments(parser)
    args = parser.parse_args(["--stream-idle-timeout", "4"])
    assert settings_module.from_args(args, env).stream_idle_timeout == 4
    with pytest.raises(ValueError, match="stream_idle_timeout must be > 0"):
        settings_module.from_env({"TALKINGHEAD_STREAM_IDLE_TIMEOUT": "0"})
