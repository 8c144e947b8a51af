"""Work is bounded by what was sent: pixel limits per photo and per CreateAvatar are checked from
the headers before anything is decoded, and client landmarks must lie in or near the picture they
describe (INVALID_ARGUMENT saying the allowed range), so a few numbers cannot ask for a huge crop."""

from __future__ import annotations

import io
import struct
import time
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from api.talkinghead.v1 import animation_pb2 as pb
from api.talkinghead.v1.landmarks_pb2 import Landmarks
from client.library import Client
from facekit.sequence import LandmarkSequence
from service.errors import ServiceError
from service.images import MAX_PIXELS_PER_BYTE, probe_image
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT

CODE = grpc.StatusCode


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height and holds no picture: it can be probed, never decoded. It
    is padded (an empty private chunk) to the bytes a picture that size would take at least
    (service/images.py MAX_PIXELS_PER_BYTE), so that only the limit a test is about refuses it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    padding = chunk(b"prIv", bytes(min(width * height // MAX_PIXELS_PER_BYTE + 1, 1 << 20)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + padding + chunk(b"IEND", b"")


def refused(call: object) -> grpc.RpcError:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as error:
        return error
    raise AssertionError("the call succeeded")


def test_all_photos_together_are_limited_before_any_is_decoded(client: Client) -> None:
    # three photos of 36 million pixels each pass the per-photo limit (40 million), not the
    # per-request one (100 million); none could be decoded: the headers alone decide
    photos = [png_header(6000, 6000)] * 3
    error = refused(lambda: client.create_avatar("wide", photos, consent=CONSENT))
    assert error.code() == CODE.INVALID_ARGUMENT
    assert error.details() == (
        "the images have 108000000 pixels in all (6000x6000, 6000x6000, 6000x6000); the limit per "
        "request is 100000000 pixels: send fewer or smaller photos"
    )
    error = refused(lambda: client.create_avatar("bomb", [png_header(60_000, 60_000)], consent=CONSENT))
    assert error.code() == CODE.INVALID_ARGUMENT
    assert "image 0" in error.details() and "limit of 40000000 pixels" in error.details()


def test_supplied_landmarks_must_lie_near_their_photo(client: Client, driver: LandmarkSequence) -> None:
    face = driver.points[0]  # a face in a 256 x 256 frame; the portrait is 512 x 512
    spread = face * 80.0  # a face 20,000 px across: was a 36,000 px crop and seconds of work
    t0 = time.monotonic()
    error = refused(lambda: client.create_avatar("vast", [PORTRAIT], landmarks=[spread], consent=CONSENT))
    assert error.code() == CODE.INVALID_ARGUMENT
    assert "image 0 landmarks: point" in error.details()
    assert "outside the allowed range x -256 to 768, y -256 to 768" in error.details()
    assert time.monotonic() - t0 < 5
    far = face - 131_000.0  # was INTERNAL "Unable to allocate 621 GiB"
    error = refused(lambda: client.create_avatar("far", [PORTRAIT], landmarks=[far], consent=CONSENT))
    assert error.code() == CODE.INVALID_ARGUMENT and "allowed range" in error.details()
    # within the range, but a face almost twice the photo: its crop would be 3.4 times the photo
    centred = (face - (face.min(0) + face.max(0)) / 2) / np.ptp(face, axis=0).max() * 950 + 256
    error = refused(lambda: client.create_avatar("giant", [PORTRAIT], landmarks=[centred], consent=CONSENT))
    assert error.code() == CODE.INVALID_ARGUMENT
    assert "needs a crop of 1710 px a side; a 512x512 photo allows at most 1024 px" in error.details()
    # a face partly outside the photo is fine
    shifted = face * 2 - 150.0
    created = client.create_avatar("edge", [PORTRAIT], landmarks=[shifted], consent=CONSENT, replace=True)
    assert created.images[0].landmarks_supplied


def frame(points: np.ndarray, sequence: int, size: tuple[int, int] = (256, 256)) -> pb.AnimateRequest:
    return pb.AnimateRequest(
        landmarks=pb.LandmarkFrame(
            sequence=sequence,
            landmarks=Landmarks(xy=np.asarray(points, np.float32).reshape(-1).tolist()),
            frame_width=size[0],
            frame_height=size[1],
        )
    )


@pytest.mark.parametrize(
    ("scale", "offset", "size", "words"),
    [
        (80.0, 0.0, (256, 256), ["frame 2 landmarks: point", "allowed range x -128 to 384, y -128 to 384"]),
        (1.0, -131_000.0, (256, 256), ["allowed range x -128 to 384, y -128 to 384"]),
        (1.0, 1500.0, (1280, 720), ["allowed range x -640 to 1920, y -360 to 1080", "(the 1280x720 frame"]),
    ],
)
def test_stream_landmarks_must_lie_near_their_frame(
    client: Client,
    avatar: str,
    driver: LandmarkSequence,
    scale: float,
    offset: float,
    size: tuple[int, int],
    words: list[str],
) -> None:
    requests = [
        pb.AnimateRequest(config=pb.StreamConfig(avatar_id=avatar, crop_to_face=True)),
        frame(driver.points[0], 0),
        frame(driver.points[1], 1),
        frame(driver.points[2] * scale + offset, 2, size),
    ]
    replies = []
    with pytest.raises(grpc.RpcError) as raised:
        for reply in client.animation.Animate(iter(requests), timeout=60):
            replies.append(reply)
    assert raised.value.code() == CODE.INVALID_ARGUMENT
    for word in words:
        assert word in raised.value.details()
    assert [r.frame.sequence for r in replies if r.HasField("frame")] == [0, 1]


def test_the_neutral_face_must_lie_near_its_frame(
    client: Client, avatar: str, driver: LandmarkSequence
) -> None:
    config = pb.StreamConfig(
        avatar_id=avatar,
        motion=pb.MOTION_MODE_RELATIVE,
        neutral=Landmarks(xy=(driver.points[0] * 80).reshape(-1).tolist()),
        neutral_frame_width=256,
        neutral_frame_height=256,
    )
    with pytest.raises(grpc.RpcError) as raised:
        list(client.animation.Animate(iter([pb.AnimateRequest(config=config)]), timeout=60))
    assert raised.value.code() == CODE.INVALID_ARGUMENT
    assert raised.value.details().startswith("config.neutral: point")
    assert "allowed range x -128 to 384" in raised.value.details()


def test_probe_reads_the_size_from_the_header_the_way_decoding_turns_it() -> None:
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 40 x 20 JPEG shows as 20 x 40
    Image.new("RGB", (40, 20)).save(buffer, format="JPEG", exif=exif.tobytes())
    limits = {"max_bytes": 1 << 20, "max_pixels": 1 << 20, "what": "image 0"}
    assert probe_image(buffer.getvalue(), **limits) == (20, 40)  # type: ignore[arg-type]
    assert probe_image(png_header(7, 9), **limits) == (7, 9)  # type: ignore[arg-type]
    with pytest.raises(ServiceError, match="1048576 pixels"):
        probe_image(png_header(2048, 1024), **limits)  # type: ignore[arg-type]
