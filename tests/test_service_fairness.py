"""One tenant's backlog of face detection does not hold up another tenant's request.

Four tenants each try to keep two CreateAvatar calls of five large photos in flight (a tenant may
have two; the server takes fewer when busy, but always one of a tenant with none); a fifth tenant
then creates an avatar from one small photo. Photos are detected one at a time, tenants served in
turn, so the fifth tenant's photo waits for about one photo of each other tenant, not for all of
their work, and it is neither refused nor queued behind them.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import grpc
from PIL import Image

from api.talkinghead.v1 import avatar_pb2
from client.library import Client
from service.auth import FileRing, issue
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, ServerThread, test_settings

HOSTILE_CALLERS, CALLS_EACH, PHOTOS_EACH = 4, 2, 5


def big_face() -> bytes:
    """The portrait at 1600 x 1600: a face the detector finds, in ~0.5 s of its time."""
    buffer = io.BytesIO()
    Image.open(PORTRAIT).convert("RGB").resize((1600, 1600)).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def test_a_small_create_is_not_queued_behind_other_tenants_backlog(
    model_repository: Path, tmp_path: Path
) -> None:
    ring = FileRing(path=tmp_path / "keys.json")
    tenants = [f"bulk{n}" for n in range(HOSTILE_CALLERS)] + ["small"]
    keys = {tenant: ring.update(lambda r, t=tenant: issue(r, t))[1] for tenant in tenants}
    settings = test_settings(model_repository, tmp_path / "store", api_keys=str(ring.path))
    running = ServerThread(settings=settings)
    clients = {
        tenant: Client(target=running.address, api_key=keys[tenant], timeout=300) for tenant in tenants
    }
    hostile: list[grpc.Future] = []
    try:
        running.wait_ready()
        clients["small"].create_avatar("warm", [PORTRAIT], consent=CONSENT)  # loads the detector
        photo = big_face()
        for tenant in tenants[:HOSTILE_CALLERS]:
            for k in range(CALLS_EACH):
                request = avatar_pb2.CreateAvatarRequest(
                    avatar_id=f"bulk-{k}",
                    images=[avatar_pb2.SourceImage(data=photo)] * PHOTOS_EACH,
                    consent=CONSENT,
                )
                hostile.append(clients[tenant].avatars.CreateAvatar.future(request, timeout=300))
        time.sleep(1.0)  # their photos are queued (the first one running)
        t0 = time.monotonic()
        created = clients["small"].create_avatar("small", [PORTRAIT], consent=CONSENT)
        waited = time.monotonic() - t0
        made = sum(call.done() and call.exception() is None for call in hostile)
        print(
            f"\nthe small CreateAvatar took {waited:.1f} s; {made} of {len(hostile)} bulk calls made theirs"
        )
        assert created.avatar_id == "small"
        # In turn: the small photo went ahead of nearly all of the bulk work (FIFO: after all of it).
        assert made <= HOSTILE_CALLERS, (
            f"the small CreateAvatar ({waited:.1f} s) finished after {made} of {len(hostile)} bulk calls "
            "of other tenants"
        )
    finally:
        for call in hostile:
            call.cancel()
        for client in clients.values():
            client.close()
        running.stop()
