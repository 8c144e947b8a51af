"""A failed request frees its memory at once, not when the cycle collector runs.

The server runs as its own process with the cyclic garbage collector disabled, so only reference
counting frees anything: an exception whose traceback sits in a reference cycle (a stored error
that refers to its own frame, an abort inside an `except` block) would keep every frame's locals -
a 6000 x 6000 photo decoded is 108 MB - for as long as the process lives. The resident set size
(/proc/<pid>/status) after a series of failing requests must stay near what it was before them.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
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
from tests.redis_fixtures import free_port
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, DRIVER, PORTRAIT, REPO

BIG_SIDE = 6000  # a flat 6000 x 6000 PNG: 116 KB on the wire, 108 MB decoded
FAILURES = 6
BOUND = 100 * 2**20  # RSS growth allowed over FAILURES failed CreateAvatar calls: less than one photo
SERVE = "import gc, sys; gc.disable(); from talkinghead.cli import main; sys.exit(main(sys.argv[1:]))"


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class NoGcServer:
    """`talkinghead serve` in a child process whose cyclic garbage collector is off."""

    def __init__(self, *, repository: Path, root: Path) -> None:
        self.port = free_port()
        self.log = root / "server.log"
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),  # this checkout, whatever the virtual environment points at
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "TALKINGHEAD_GRPC_PORT": str(self.port),
            "TALKINGHEAD_METRICS_PORT": "0",
            "TALKINGHEAD_MODEL_REPOSITORY": str(repository),
            "TALKINGHEAD_AVATAR_STORE": str(root / "avatars"),
            "TALKINGHEAD_JOBS": str(root / "jobs"),
            "TALKINGHEAD_AUDIT_LOG": str(root / "audit.jsonl"),
            "TALKINGHEAD_WORKER": "external",
            # memory freed goes back to the system at once (no heap kept for reuse), so the RSS is
            # what the process still holds: glibc serves allocations of 128 KiB and more by mmap
            "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
        }
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", SERVE, "serve", "--inference-threads", "1"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.client = Client(target=f"127.0.0.1:{self.port}", timeout=120)
        try:
            self.client.wait_ready(120)
        except TimeoutError:
            self.stop()
            raise AssertionError(f"the server did not start: {self.log.read_text()[-2000:]}") from None

    @property
    def rss(self) -> int:
        return rss(self.process.pid)

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def no_gc_server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NoGcServer]:
    server = NoGcServer(repository=model_repository, root=tmp_path_factory.mktemp("nogc"))
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


def settle(server: NoGcServer) -> int:
    time.sleep(0.5)  # the server finishes its side of the last call
    return server.rss


def test_failed_creates_free_the_decoded_photo(no_gc_server: NoGcServer) -> None:
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


def test_failed_streams_free_their_memory(no_gc_server: NoGcServer) -> None:
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
