"""Every bad input gets the right status code and a message saying what was wrong; none crashes
the server or leaks a stream (the active-streams gauge returns to 0)."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from api.talkinghead.v1 import animation_pb2 as pb
from api.talkinghead.v1 import avatar_pb2
from api.talkinghead.v1.landmarks_pb2 import Landmarks
from client.library import Client, landmark_requests, to_landmarks
from facekit.sequence import LandmarkSequence
from service.errors import ServiceError
from service.landmarks import MAX_FRAME_SIDE, frame_range, parse_points
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, ServerThread, png_bytes, test_settings

CODE = grpc.StatusCode


def expect(code: grpc.StatusCode, *words: str):
    """Context manager: the block raises an RpcError with `code` whose message has every word."""

    class Checker:
        def __enter__(self) -> None:
            return None

        def __exit__(self, kind, error, trace) -> bool:
            assert isinstance(error, grpc.RpcError), f"expected {code.name}, got {error!r}"
            assert error.code() == code, (error.code(), error.details())
            for word in words:
                assert word in error.details(), (word, error.details())
            return True

    return Checker()


def frame(
    points: np.ndarray | list[float], sequence: int = 0, size: tuple[int, int] = (256, 256)
) -> pb.AnimateRequest:
    xy = points if isinstance(points, list) else np.asarray(points, np.float32).reshape(-1).tolist()
    return pb.AnimateRequest(
        landmarks=pb.LandmarkFrame(
            sequence=sequence, landmarks=Landmarks(xy=xy), frame_width=size[0], frame_height=size[1]
        )
    )


def raw_stream(client: Client, requests: list[pb.AnimateRequest]) -> list[pb.AnimateResponse]:
    return list(client.animation.Animate(iter(requests), timeout=60))


def config(avatar_id: str, **fields: object) -> pb.AnimateRequest:
    return pb.AnimateRequest(config=pb.StreamConfig(avatar_id=avatar_id, **fields))  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def no_leaked_streams(server: ServerThread) -> Iterator[None]:
    yield
    deadline = time.monotonic() + 5
    while server.metric_total("talkinghead_active_streams") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric_total("talkinghead_active_streams") == 0
    assert server.app.active_streams == 0


# -- avatars -----------------------------------------------------------------------------------
def test_bad_avatar_requests(client: Client) -> None:
    portrait = PORTRAIT.read_bytes()
    with expect(CODE.INVALID_ARGUMENT, "invalid avatar id"):
        client.create_avatar("../etc", [portrait], consent=CONSENT)
    with expect(CODE.INVALID_ARGUMENT, "1-32 images", "got 0"):
        client.create_avatar("none", [], consent=CONSENT)
    with expect(CODE.INVALID_ARGUMENT, "1-32 images", "got 33"):
        client.create_avatar("many", [b"x"] * 33, consent=CONSENT)
    with expect(CODE.INVALID_ARGUMENT, "image 1", "cannot decode"):
        client.create_avatar("junk", [portrait, b"definitely not a JPEG"], consent=CONSENT)
    with expect(CODE.INVALID_ARGUMENT, "image 0", "exceeds the limit"):
        client.create_avatar("huge", [b"\xff" * (3 * 1024 * 1024)], consent=CONSENT)
    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, format="GIF")
    with expect(CODE.INVALID_ARGUMENT, "image 0", "unsupported image format GIF"):
        client.create_avatar("gif", [gif.getvalue()], consent=CONSENT)
    with expect(CODE.INVALID_ARGUMENT, "image 0", "no face found"):
        client.create_avatar("blank", [png_bytes(np.full((200, 200, 3), 128, np.uint8))], consent=CONSENT)
    with expect(CODE.INVALID_ARGUMENT, "image 0 landmarks", "expected 136 values", "got 134"):
        client.create_avatar("short", [portrait], landmarks=[np.zeros((67, 2))], consent=CONSENT)
    nan = np.full((68, 2), 100.0)
    nan[5, 1] = np.nan
    with expect(CODE.INVALID_ARGUMENT, "point 5 is NaN or infinite"):
        client.create_avatar("nan", [portrait], landmarks=[nan], consent=CONSENT)
    with expect(CODE.INVALID_ARGUMENT, "display_name"):
        client.create_avatar("named", [portrait], display_name="x" * 300, consent=CONSENT)
    with expect(CODE.NOT_FOUND, "no avatar with id 'ghost'"):
        client.get_avatar("ghost")
    with expect(CODE.NOT_FOUND, "ghost"):
        client.delete_avatar("ghost")
    with expect(CODE.INVALID_ARGUMENT, "malformed page_token"):
        client.list_page(10, "garbage!!")
    assert [a for a in client.list_avatars() if a.avatar_id in {"none", "junk", "huge", "blank", "nan"}] == []


def test_supplied_landmarks_skip_detection(client: Client) -> None:
    blank = png_bytes(np.full((256, 256, 3), 90, np.uint8))  # no detectable face, landmarks given
    points = LandmarkSequence.load(Path(__file__).parents[1] / "facekit/assets/demo_driver.npz").points[0]
    created = client.create_avatar("given", [blank], landmarks=[points], consent=CONSENT)
    assert created.images[0].landmarks_supplied and created.images[0].faces_found == 0


# -- streams -----------------------------------------------------------------------------------
def test_frame_before_config(client: Client, avatar: str, driver: LandmarkSequence) -> None:
    with expect(CODE.FAILED_PRECONDITION, "first message", "`config`", "got `landmarks`"):
        raw_stream(client, [frame(driver.points[0])])
    with expect(CODE.FAILED_PRECONDITION, "must be `config`, got an empty AnimateRequest"):
        raw_stream(client, [pb.AnimateRequest()])
    # a float field's value as the client sent it, not its double: 0.99, not 0.9900000095367432
    with expect(CODE.INVALID_ARGUMENT, "config.expected_fps must be 1-120", "got 0.99"):
        raw_stream(client, [config(avatar, expected_fps=0.99)])
    smoothing = pb.LandmarkSmoothing(min_cutoff_hz=1.0, beta=100.01)
    with expect(CODE.INVALID_ARGUMENT, "config.smoothing.beta must be 0-100, got 100.01"):
        raw_stream(client, [config(avatar, smoothing=smoothing)])


def test_unknown_avatar_and_bad_config(client: Client, avatar: str) -> None:
    with expect(CODE.NOT_FOUND, "no avatar with id 'nobody'"):
        raw_stream(client, [config("nobody")])
    with expect(CODE.INVALID_ARGUMENT, "invalid avatar id"):
        raw_stream(client, [config("Bad Id")])
    with expect(CODE.INVALID_ARGUMENT, "JPEG quality", "got 101"):
        raw_stream(client, [config(avatar, quality=101)])
    with expect(CODE.INVALID_ARGUMENT, "JPEG quality must be 60-100", "watermark", "got 10"):
        raw_stream(client, [config(avatar, quality=10)])  # the frames' mark was not found below 20-30
    with expect(CODE.INVALID_ARGUMENT, "queue_depth", "got 65"):
        raw_stream(client, [config(avatar, queue_depth=65)])
    with expect(CODE.INVALID_ARGUMENT, "config.encoding"):
        raw_stream(client, [config(avatar, encoding=7)])
    # a face crop of the driver is an ABSOLUTE option: with RELATIVE it was taken and ignored
    with expect(CODE.INVALID_ARGUMENT, "config.crop_to_face is only used with motion = MOTION_MODE_ABSOLUTE"):
        raw_stream(client, [config(avatar, motion=pb.MOTION_MODE_RELATIVE, crop_to_face=True)])
    with expect(CODE.INVALID_ARGUMENT, "config.neutral is only used with motion = MOTION_MODE_RELATIVE"):
        raw_stream(client, [config(avatar, neutral=Landmarks(xy=[1.0] * 136))])
    with expect(CODE.INVALID_ARGUMENT, "config.neutral: expected 136 values"):
        raw_stream(
            client,
            [
                config(
                    avatar,
                    motion=pb.MOTION_MODE_RELATIVE,
                    neutral=Landmarks(xy=[1.0] * 10),
                    neutral_frame_width=256,
                    neutral_frame_height=256,
                )
            ],
        )


@pytest.mark.parametrize("size", [None, (256, 256), (640, 360)])
def test_landmarks_on_the_edge_of_the_allowed_range_are_taken_and_one_float_beyond_refused(
    size: tuple[int, int] | None,
) -> None:
    limit = np.full(2, 8.0 * MAX_FRAME_SIDE)
    low, high = (-limit, limit) if size is None else frame_range(size)
    centre = np.float32((low + high) / 2)
    for axis in (0, 1):
        for edge, outwards in ((low[axis], -np.inf), (high[axis], np.inf)):
            points = np.tile(centre, (68, 1))
            points[7, axis] = edge
            assert np.array_equal(parse_points(points.ravel().tolist(), what="f", frame=size), points)
            points[7, axis] = np.nextafter(np.float32(edge), np.float32(outwards))
            with pytest.raises(ServiceError) as refused:
                parse_points(points.ravel().tolist(), what="f", frame=size)
            assert ("point 7" if size else "coordinates beyond") in refused.value.message


@pytest.mark.parametrize(
    ("points", "size", "words"),
    [
        ([1.0] * 134, (256, 256), ["frame 3 landmarks", "expected 136 values", "got 134", "(67 points)"]),
        ([1.0] * 137, (256, 256), ["expected 136 values", "got 137"]),
        ([float("nan")] + [1.0] * 135, (256, 256), ["point 0 is NaN or infinite"]),
        ([1.0] * 100 + [float("inf")] + [1.0] * 35, (256, 256), ["point 50 is NaN or infinite"]),
        ([1.0] * 136, (0, 256), ["frame 3", "frame size", "got 0x256"]),
    ],
)
def test_bad_landmark_frames_end_the_stream_after_earlier_frames(
    client: Client,
    avatar: str,
    driver: LandmarkSequence,
    points: list[float],
    size: tuple[int, int],
    words: list[str],
) -> None:
    good = [frame(driver.points[i], i) for i in range(3)]
    replies: list[pb.AnimateResponse] = []
    with expect(CODE.INVALID_ARGUMENT, *words):
        for reply in client.animation.Animate(
            # BLOCK: a live stream may drop a burst's late frames by policy; here every good one counts.
            iter([config(avatar, overflow=pb.OVERFLOW_POLICY_BLOCK), *good, frame(points, 3, size)]),
            timeout=60,
        ):
            replies.append(reply)
    assert [r.frame.sequence for r in replies if r.HasField("frame")] == [
        0,
        1,
        2,
    ]  # delivered before the error


def test_second_config_and_empty_message(client: Client, avatar: str, driver: LandmarkSequence) -> None:
    with expect(CODE.FAILED_PRECONDITION, "already configured"):
        raw_stream(client, [config(avatar), frame(driver.points[0]), config(avatar)])
    with expect(CODE.INVALID_ARGUMENT, "empty AnimateRequest"):
        raw_stream(client, [config(avatar), pb.AnimateRequest()])


def test_keepalive_is_accepted(client: Client, avatar: str, driver: LandmarkSequence) -> None:
    replies = raw_stream(
        client, [config(avatar), pb.AnimateRequest(keepalive=pb.Keepalive()), frame(driver.points[0], 7)]
    )
    assert replies[0].HasField("started") and [r.frame.sequence for r in replies[1:]] == [7]


def test_bad_driving_frames(client: Client, avatar: str) -> None:
    junk = pb.AnimateRequest(driving_frame=pb.DrivingFrame(sequence=4, image=b"not an image"))
    with expect(CODE.INVALID_ARGUMENT, "driving frame 4", "cannot decode"):
        raw_stream(client, [config(avatar), junk])
    blank = pb.AnimateRequest(
        driving_frame=pb.DrivingFrame(sequence=0, image=png_bytes(np.zeros((96, 96, 3), np.uint8)))
    )
    with expect(CODE.FAILED_PRECONDITION, "driving frame 0", "no face found"):
        raw_stream(client, [config(avatar), blank])
    huge = pb.AnimateRequest(driving_frame=pb.DrivingFrame(sequence=1, image=b"\x00" * (3 * 1024 * 1024)))
    with expect(CODE.RESOURCE_EXHAUSTED, "exceeds the limit", "at most 2097152 bytes"):  # before parsing
        raw_stream(client, [config(avatar), huge])


def test_face_lost_mid_stream_reuses_the_last_landmarks(client: Client, avatar: str) -> None:
    face = pb.DrivingFrame(sequence=0, image=PORTRAIT.read_bytes())
    blank = pb.DrivingFrame(sequence=1, image=png_bytes(np.zeros((96, 96, 3), np.uint8)))
    replies = raw_stream(
        client,
        [config(avatar), pb.AnimateRequest(driving_frame=face), pb.AnimateRequest(driving_frame=blank)],
    )
    frames = [r.frame for r in replies if r.HasField("frame")]
    assert [(f.sequence, f.face_missing) for f in frames] == [(0, False), (1, True)]


def test_cancelled_stream_is_released(
    server: ServerThread, client: Client, avatar: str, driver: LandmarkSequence
) -> None:
    seq = LandmarkSequence(np.concatenate([driver.points] * 3), driver.frame_size, driver.fps)
    call = client.animation.Animate(
        iter([config(avatar, overflow=pb.OVERFLOW_POLICY_BLOCK)] + [r for r in landmark_requests(seq)])
    )
    next(call)  # started
    next(call)  # one frame, then hang up with hundreds still queued
    call.cancel()
    # the fixture checks that the stream slot and gauge are released


def test_stream_limit(model_repository: Path, tmp_path: Path, driver: LandmarkSequence) -> None:
    running = ServerThread(settings=test_settings(model_repository, tmp_path / "store", max_streams=1))
    try:
        running.wait_ready()
        with running.client() as c:
            c.create_avatar("solo", [PORTRAIT], consent=CONSENT)
            release = threading.Event()

            def held() -> Iterator[pb.AnimateRequest]:
                yield config("solo")
                release.wait(30)

            first = c.animation.Animate(held())
            assert next(first).HasField("started")
            with pytest.raises(grpc.RpcError) as full:
                raw_stream(c, [config("solo", paste_back=True)])
            assert full.value.code() == CODE.RESOURCE_EXHAUSTED, full.value.details()
            assert full.value.details() == "the server is at its limit of 1 concurrent streams; retry later"
            assert ("retry-after", "5") in tuple(full.value.trailing_metadata() or ())
            # refused before the avatar is read (its portrait decoded): a full server is cheap to ask
            with expect(CODE.RESOURCE_EXHAUSTED, "limit of 1 concurrent streams"):
                raw_stream(c, [config("nobody")])
            release.set()
            assert list(first) == []
            # the slot is free again
            assert (
                len(
                    list(
                        c.animate(
                            "solo",
                            landmark_requests(LandmarkSequence(driver.points[:1], driver.frame_size, 25)),
                        )
                    )
                )
                == 1
            )
    finally:
        running.stop()


def test_avatar_of_another_model_is_refused(server: ServerThread, client: Client, avatar: str) -> None:
    from dataclasses import replace

    from service.store import LocalAvatarStore

    store = LocalAvatarStore(root=server.settings.avatar_store)
    base = store.get(avatar)
    assert base is not None
    store.put(replace(base, avatar_id="foreign", model_id="0123456789abcdef"), replace=True)
    with expect(CODE.FAILED_PRECONDITION, "made with model 0123456789abcdef", "create the avatar again"):
        raw_stream(client, [config("foreign")])


def test_backend_failure_mid_stream_is_unavailable_then_recovers(
    model_repository: Path, tmp_path: Path, driver: LandmarkSequence
) -> None:
    """The model is taken away under a running server (its session closed): streams get UNAVAILABLE,
    the server keeps running, and works again once the model is back."""
    running = ServerThread(settings=test_settings(model_repository, tmp_path / "store"))
    try:
        running.wait_ready()
        backend = running.app.backend
        with running.client() as c:
            c.create_avatar("fragile", [PORTRAIT], consent=CONSENT)
            session = backend._sessions.pop("generator")
            one = LandmarkSequence(driver.points[:2], driver.frame_size, 25)
            with expect(CODE.UNAVAILABLE, "generator is not loaded"):
                list(c.animate("fragile", landmark_requests(one)))
            assert (
                running.metric('talkinghead_backend_errors_total{kind="unavailable",operation="generate"}')
                >= 1
            )
            backend._sessions["generator"] = session
            assert len(list(c.animate("fragile", landmark_requests(one)))) == 2
            assert running.app.active_streams == 0
    finally:
        running.stop()


def test_avatar_request_message_is_well_formed() -> None:
    # guards the proto: field numbers are part of the wire contract
    fields = {f.name: f.number for f in avatar_pb2.CreateAvatarRequest.DESCRIPTOR.fields}
    assert fields == {"avatar_id": 1, "images": 2, "display_name": 3, "replace": 4, "consent": 5}
    fields = {f.name: f.number for f in pb.AnimatedFrame.DESCRIPTOR.fields}
    assert fields["sequence"] == 1 and fields["dropped_before"] == 8
    assert to_landmarks(np.zeros((68, 2))).xy == [0.0] * 136
