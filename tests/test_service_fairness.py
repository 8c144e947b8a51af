"""One caller's backlog of face detection does not hold up another's request.

Four callers (each its own connection, so its own caller key until tenants exist) keep two
CreateAvatar calls of five large photos each in flight; a fifth caller then creates an avatar from
one small photo. Photos are detected one at a time, callers served in turn, so the fifth caller's
photo waits for about one photo of each other caller, not for all of their forty.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import grpc
from PIL import Image

from api.talkinghead.v1 import avatar_pb2
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, ServerThread, test_settings

HOSTILE_CALLERS, CALLS_EACH, PHOTOS_EACH = 4, 2, 5


def big_face() -> bytes:
    """The portrait at 1600 x 1600: a face the detector finds, in ~0.5 s of its time."""
    buffer = io.BytesIO()
    Image.open(PORTRAIT).convert("RGB").resize((1600, 1600)).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def test_a_small_create_is_not_queued_behind_other_callers_backlog(
    model_repository: Path, tmp_path: Path
) -> None:
    running = ServerThread(settings=test_settings(model_repository, tmp_path / "store"))
    clients = [running.client() for _ in range(HOSTILE_CALLERS + 1)]
    hostile: list[grpc.Future] = []
    try:
        running.wait_ready()
        clients[-1].create_avatar("warm", [PORTRAIT], consent=CONSENT)  # loads the detector
        photo = big_face()
        for n, client in enumerate(clients[:HOSTILE_CALLERS]):
            for k in range(CALLS_EACH):
                request = avatar_pb2.CreateAvatarRequest(
                    avatar_id=f"bulk-{n}-{k}",
                    images=[avatar_pb2.SourceImage(data=photo)] * PHOTOS_EACH,
                    consent=CONSENT,
                )
                hostile.append(client.avatars.CreateAvatar.future(request, timeout=300))
        time.sleep(1.0)  # their photos are queued (the first one running)
        t0 = time.monotonic()
        created = clients[-1].create_avatar("small", [PORTRAIT], consent=CONSENT)
        waited = time.monotonic() - t0
        unfinished = sum(not call.done() for call in hostile)
        print(f"\nthe small CreateAvatar took {waited:.1f} s; {unfinished} of {len(hostile)} bulk calls left")
        assert created.avatar_id == "small"
        # In turn: the small photo went ahead of nearly all of the bulk work (FIFO: after all of it).
        assert unfinished >= len(hostile) - HOSTILE_CALLERS, (
            f"the small CreateAvatar ({waited:.1f} s) finished after {len(hostile) - unfinished} of "
            f"{len(hostile)} bulk calls of other callers"
        )
    finally:
        for call in hostile:
            call.cancel()
        for client in clients:
            client.close()
        running.stop()
