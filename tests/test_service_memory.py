"""A failed request frees its memory at once, not when the cycle collector runs; a large
CreateAvatar costs the server about what it sent, not several times that.

The server runs as its own process (tests/service_process.py) with the cyclic garbage collector
disabled, so only reference counting frees anything: an exception whose traceback sits in a
reference cycle (a stored error that refers to its own frame, an abort inside an `except` block)
would keep every frame's locals - a 6000 x 6000 photo decoded is 108 MB - for as long as the
process lives. The resident set size (/proc/<pid>/status) after a series of failing requests must
stay near what it was before them.

`test_a_large_create_costs_about_its_size` measures the peak RSS (VmHWM) a fresh server reaches
for one CreateAvatar of ~60 MB: what a create in flight costs a pod (TALKINGHEAD_MAX_CREATES).
"""

from __future__ import annotations

import gc
import io
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from api.talkinghead.v1 import animation_pb2 as pb
from api.talkinghead.v1 import avatar_pb2
from client.library import Client, to_landmarks
from facekit.sequence import LandmarkSequence
from service.errors import ServiceError, detached, invalid
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, DRIVER, PORTRAIT
from tests.service_process import ServerProcess

BIG_SIDE = 6000  # a flat 6000 x 6000 PNG: 116 KB on the wire, 108 MB decoded
FAILURES = 6
BOUND = 100 * 2**20  # RSS growth allowed over FAILURES failed CreateAvatar calls: less than one photo
MAX_BATCH = 2


@pytest.fixture(scope="module")
def no_gc_server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(
        repository=model_repository,
        root=tmp_path_factory.mktemp("nogc"),
        cycle_collector=False,
        env={"TALKINGHEAD_MAX_BATCH": str(MAX_BATCH)},
    )
    try:
        # paste-back streams of this avatar hold its 1024 x 1024 photo (3 MB decoded)
        photo = io.BytesIO()
        Image.open(PORTRAIT).convert("RGB").resize((1024, 1024)).save(photo, format="JPEG", quality=90)
        server.client.create_avatar("steady", [photo.getvalue()], consent=CONSENT)
        yield server
    finally:
        server.stop()


def flat_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 120, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


def face_points(scale: float = 1.0) -> np.ndarray:
    return LandmarkSequence.load(DRIVER).points[0] * scale  # a face in a 256 x 256 frame


def failing_create(client: Client, big: bytes) -> grpc.StatusCode:
    """A big photo that decodes (its landmarks given: no detection), then a second that does not."""
    request = avatar_pb2.CreateAvatarRequest(
        avatar_id="leak",
        images=[
            avatar_pb2.SourceImage(data=big, landmarks=to_landmarks(face_points(10))),
            avatar_pb2.SourceImage(data=b"not an image"),
        ],
        consent=CONSENT,
    )
    try:
        client.avatars.CreateAvatar(request, timeout=120)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def failing_stream(client: Client) -> grpc.StatusCode:
    """A paste-back stream (the avatar's photo decoded for it) whose second frame is malformed."""
    good = pb.LandmarkFrame(
        sequence=0, landmarks=to_landmarks(face_points()), frame_width=256, frame_height=256
    )
    bad = pb.LandmarkFrame(
        sequence=1, landmarks=to_landmarks(face_points()[:60]), frame_width=256, frame_height=256
    )
    requests = [
        pb.AnimateRequest(config=pb.StreamConfig(avatar_id="steady", paste_back=True)),
        pb.AnimateRequest(landmarks=good),
        pb.AnimateRequest(landmarks=bad),
    ]
    try:
        for _ in client.animation.Animate(iter(requests), timeout=120):
            pass
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def settle(server: ServerProcess) -> int:
    time.sleep(0.5)  # the server finishes its side of the last call
    return server.rss


def test_failed_creates_free_the_decoded_photo(no_gc_server: ServerProcess) -> None:
    big = flat_png(BIG_SIDE)
    for _ in range(2):  # warm-up
        assert failing_create(no_gc_server.client, big) == grpc.StatusCode.INVALID_ARGUMENT
    before = settle(no_gc_server)
    codes = [failing_create(no_gc_server.client, big) for _ in range(FAILURES)]
    after = settle(no_gc_server)
    print(f"\n{FAILURES} failed CreateAvatar: RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert after - before < BOUND, (
        f"{FAILURES} failed CreateAvatar calls ({len(big) // 1024} KB each) grew the server by "
        f"{(after - before) / 2**20:.0f} MiB"
    )


def test_failed_streams_free_their_memory(no_gc_server: ServerProcess) -> None:
    for _ in range(8):  # warm-up: the generator's and paste-back's first allocations
        assert failing_stream(no_gc_server.client) == grpc.StatusCode.INVALID_ARGUMENT
    before = settle(no_gc_server)
    codes = [failing_stream(no_gc_server.client) for _ in range(4 * FAILURES)]
    after = settle(no_gc_server)
    print(f"\n{4 * FAILURES} failed Animate streams: RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert after - before < 24 * 2**20, (
        f"failed streams grew the server by {(after - before) / 2**20:.0f} MiB"
    )


def test_a_create_of_many_photos_runs_the_embedder_in_batches(no_gc_server: ServerProcess) -> None:
    """32 photos make max_batch-sized embedder calls: ONNX Runtime keeps the memory of the largest
    batch it ever ran (a batch of 32 grows the server by ~250 MiB, for good)."""
    photo = io.BytesIO()
    Image.open(PORTRAIT).convert("RGB").resize((96, 96)).save(photo, format="JPEG")
    points = face_points(96 / 256)
    client = no_gc_server.client
    client.create_avatar(
        "pair", [photo.getvalue()] * MAX_BATCH, landmarks=[points] * MAX_BATCH, consent=CONSENT
    )
    before = settle(no_gc_server)
    created = client.create_avatar("many", [photo.getvalue()] * 32, landmarks=[points] * 32, consent=CONSENT)
    after = settle(no_gc_server)
    print(f"\na CreateAvatar of 32 photos: RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert created.image_count == 32
    assert after - before < 60 * 2**20, f"32 photos grew the server by {(after - before) / 2**20:.0f} MiB"


def test_a_kept_error_holds_no_frames() -> None:
    """errors.detached: what a stream keeps of its reader's error has the error's class and
    attributes (a retry-after among them) but none of the frames the error was raised through."""

    class Photo:
        pass

    refs: list[weakref.ref[Photo]] = []

    def retry_in(error: ServiceError, seconds: int) -> ServiceError:
        error.retry_after = seconds  # type: ignore[attr-defined]
        return error

    def fail() -> None:
        photo = Photo()  # a local of a frame the error passes through
        refs.append(weakref.ref(photo))
        raise retry_in(invalid("no face"), 3)

    gc.disable()
    try:
        try:
            fail()
        except ServiceError as error:
            kept = detached(error)
        assert refs[0]() is None, "the kept error holds the frame's locals"
    finally:
        gc.enable()
    assert (type(kept), kept.code, kept.message, kept.retry_after) == (  # type: ignore[attr-defined]
        ServiceError,
        grpc.StatusCode.INVALID_ARGUMENT,
        "no face",
        3,
    )
    assert kept.__traceback__ is None and kept.__context__ is None


PHOTOS = 7  # 4000 x 3000 JPEGs of ~8.6 MB: a 60 MB request, 84 million pixels (the limit is 100)
PHOTO_SIZE = (4000, 3000)


def noisy_jpeg(seed: int, size: tuple[int, int] = PHOTO_SIZE) -> bytes:
    """A JPEG that compresses badly (~0.7 bytes a pixel at quality 90): many pixels, many bytes."""
    width, height = size
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    pixels = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)
    pixels ^= rng.integers(0, 40, pixels.shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def peak_rss(server: ServerProcess) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for {server.process.pid}")


def test_a_large_create_costs_about_its_size(model_repository: Path, tmp_path: Path) -> None:
    """One CreateAvatar of 60 MB (7 photos of 12 million pixels) raised a server's peak RSS by
    406-417 MB, 6.5 times the request: the request was held twice (the received bytes and the
    parsed message) for the whole call and each photo was decoded into five copies at once.

    What stays: gRPC's own receive briefly holds the message three times (its buffer, a bytearray it
    fills, the bytes it hands over) before any of the server's code runs; afterwards the parsed
    request (1 x) and one photo at a time decoding (its pixels as Pillow holds them, 4 bytes each,
    and the RGB array: 7 bytes a pixel, 84 MB here). The bound is the larger of the two plus an
    allowance of 64 MiB for what the allocator keeps of the transport's small buffers and the
    crops and portrait: 3 x 60 MB + 64 MiB = 246 MB."""
    photos = [noisy_jpeg(0)] * PHOTOS  # the server decodes each on its own
    size = sum(map(len, photos))
    width, height = PHOTO_SIZE
    assert 55e6 < size < 64 * 2**20 - 64 * 2**10, size
    decoding = 7 * width * height
    bound = max(3 * size, size + decoding) + 64 * 2**20
    points = face_points(height / 256)
    server = ServerProcess(repository=model_repository, root=tmp_path)
    try:
        # warm-up: the embedder's first run at this batch size, the portrait path, the store
        small = io.BytesIO()
        Image.open(PORTRAIT).convert("RGB").resize((256, 256)).save(small, format="JPEG")
        server.client.create_avatar(
            "warm", [small.getvalue()] * PHOTOS, landmarks=[face_points()] * PHOTOS, consent=CONSENT
        )
        time.sleep(0.5)
        Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")  # the peak from here on
        before = peak_rss(server)
        created = server.client.create_avatar("large", photos, landmarks=[points] * PHOTOS, consent=CONSENT)
        rise = peak_rss(server) - before
    finally:
        server.stop()
    print(f"\na CreateAvatar of {size / 1e6:.1f} MB ({PHOTOS} photos): peak RSS +{rise / 1e6:.0f} MB")
    assert created.image_count == PHOTOS
    assert rise <= bound, (
        f"a CreateAvatar of {size / 1e6:.1f} MB raised the server's peak memory by {rise / 1e6:.0f} MB "
        f"({rise / size:.1f} x the request); the bound is {bound / 1e6:.0f} MB"
    )
