"""Admission control of live streams from the measured capacity (service/capacity.py) through a
real server: a live stream the backend cannot serve besides the admitted ones is refused with a
retry hint instead of degrading them; offline (BLOCK) streams are always admitted; a closed stream
gives its reservation back; the figures are in /metrics.

The streams ask 120 frames/s each (the most a stream may): two of them exceed what any CPU serves
from the 128 px generator (~41 frames/s at the 2-core fp32 bound), whatever this machine's speed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from api.talkinghead.v1 import animation_pb2 as pb
from client.library import to_landmarks
from facekit.sequence import LandmarkSequence
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, ServerThread, test_settings


def _requests(
    config: pb.StreamConfig, driver: LandmarkSequence, stop: threading.Event
) -> Iterator[pb.AnimateRequest]:
    yield pb.AnimateRequest(config=config)
    index = 0
    while not stop.is_set():
        points = driver.points[index % len(driver.points)]
        frame = pb.LandmarkFrame(
            sequence=index,
            landmarks=to_landmarks(points),
            frame_width=driver.frame_size[0],
            frame_height=driver.frame_size[1],
        )
        yield pb.AnimateRequest(landmarks=frame)
        index += 1
        time.sleep(0.04)


@pytest.fixture(scope="module")
def admitting(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    server = ServerThread(
        settings=test_settings(model_repository, tmp_path_factory.mktemp("adm") / "avatars")
    )
    server.wait_ready()
    with server.client() as client:
        client.create_avatar("adm", [PORTRAIT], consent=CONSENT)
    deadline = time.monotonic() + 30
    while server.metric("talkinghead_capacity_fps") == 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # the start-up calibration
    yield server
    server.stop()


def test_a_live_stream_beyond_capacity_is_refused_and_block_streams_are_not(admitting, driver) -> None:
    server = admitting
    capacity = server.metric("talkinghead_capacity_fps")
    assert 0 < capacity < 200
    live = pb.StreamConfig(avatar_id="adm", overflow=pb.OVERFLOW_POLICY_DROP_OLDEST, expected_fps=120)
    stop = threading.Event()
    with server.client() as first_client, server.client() as second_client:
        first = first_client.animation.Animate(_requests(live, driver, stop), timeout=60)
        started = next(first).started
        assert started.latency_budget_ms == 200
        assert server.metric("talkinghead_committed_fps") == 120
        with pytest.raises(grpc.RpcError) as refused:
            list(second_client.animation.Animate(_requests(live, driver, threading.Event()), timeout=30))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "live capacity" in refused.value.details()
        assert int(dict(refused.value.trailing_metadata())["retry-after"]) >= 1
        assert server.metric("talkinghead_admission_refusals_total") >= 1
        # An offline stream reserves nothing and is admitted; the live one keeps getting frames.
        offline = pb.StreamConfig(avatar_id="adm", overflow=pb.OVERFLOW_POLICY_BLOCK)
        block_stop = threading.Event()
        block = second_client.animation.Animate(_requests(offline, driver, block_stop), timeout=60)
        assert next(block).started.latency_budget_ms == 0
        assert next(block).HasField("frame") and next(first).HasField("frame")
        stop.set()
        list(first)
        block_stop.set()
        list(block)
    deadline = time.monotonic() + 5
    while server.metric("talkinghead_committed_fps") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("talkinghead_committed_fps") == 0
    # The reservation came back: a new live stream is admitted.
    again = threading.Event()
    with server.client() as client:
        call = client.animation.Animate(_requests(live, driver, again), timeout=60)
        assert next(call).HasField("started") and next(call).HasField("frame")
        again.set()
        list(call)


@pytest.mark.parametrize(
    ("overflow", "fps"),
    [
        (pb.OVERFLOW_POLICY_DROP_OLDEST, 500),
        (pb.OVERFLOW_POLICY_BLOCK, -5),  # a BLOCK stream reserves nothing, but the range is the range
        (pb.OVERFLOW_POLICY_BLOCK, float("nan")),
    ],
)
def test_expected_fps_out_of_range_is_invalid(admitting, driver, overflow: int, fps: float) -> None:
    bad = pb.StreamConfig(avatar_id="adm", overflow=overflow, expected_fps=fps)
    with admitting.client() as client, pytest.raises(grpc.RpcError) as error:
        list(client.animation.Animate(_requests(bad, driver, threading.Event()), timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected_fps" in error.value.details()


@pytest.mark.parametrize("overflow", [pb.OVERFLOW_POLICY_DROP_OLDEST, pb.OVERFLOW_POLICY_BLOCK])
def test_a_call_cancelled_while_its_stream_opens_gives_everything_back(
    admitting, driver, overflow: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that lands after the stream's slot and reservation were taken, before the stream
    existed (while its audit event was written): both were kept for good, so a few cancels
    locked every later live stream out ("25 of 23 frames/s reserved"), and 64 every stream."""
    server = admitting
    app = server.app
    writing, cancelled = threading.Event(), threading.Event()
    real_append = app.audit.append

    def append_after_the_cancel(entry: object) -> None:
        if getattr(entry, "event", "") == "animate_start":
            writing.set()
            cancelled.wait(30)
        real_append(entry)

    monkeypatch.setattr(app.audit, "append", append_after_the_cancel)
    config = pb.StreamConfig(avatar_id="adm", overflow=overflow, expected_fps=120)
    with server.client() as client:
        for _ in range(3):
            writing.clear()
            cancelled.clear()
            call = client.animation.Animate(_requests(config, driver, threading.Event()), timeout=60)
            assert writing.wait(30)
            call.cancel()
            cancelled.set()
            with pytest.raises(grpc.RpcError) as error:
                list(call)
            assert error.value.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        server.metric_total("talkinghead_active_streams") or server.metric("talkinghead_committed_fps")
    ):
        time.sleep(0.1)
    assert server.metric_total("talkinghead_active_streams") == 0
    assert server.metric("talkinghead_committed_fps") == 0
    monkeypatch.undo()
    stop = threading.Event()
    with server.client() as client:  # and the next live stream of 120 frames/s is admitted
        live = pb.StreamConfig(avatar_id="adm", overflow=pb.OVERFLOW_POLICY_DROP_OLDEST, expected_fps=120)
        call = client.animation.Animate(_requests(live, driver, stop), timeout=60)
        assert next(call).HasField("started")
        stop.set()
        list(call)


def test_the_capacity_gauge_follows_what_calls_teach_the_cost_model(admitting) -> None:
    """Calls slower than at calibration (other work on the cores) lower the capacity admission
    holds; the gauge shows it within seconds, not only when a stream next begins or ends."""
    server = admitting
    app = server.app
    before = server.metric("talkinghead_capacity_fps")
    learnt = dict(vars(app.cost))

    async def slower_calls() -> None:
        for _ in range(100):
            app.cost.observe(1, 0.5)

    try:
        server.call(slower_calls())
        deadline = time.monotonic() + 5
        while server.metric("talkinghead_capacity_fps") > before / 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.metric("talkinghead_capacity_fps") == pytest.approx(app.admission.capacity)
        assert app.admission.capacity < before / 2
    finally:
        vars(app.cost).update(learnt)
