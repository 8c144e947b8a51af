"""The per-replica avatar cache: bounded by bytes, and a read that raced a delete never puts the
deleted avatar back (the service takes a stamp before reading the store). The local store clears
the unfinished writes a killed process left."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.store import AvatarCache, AvatarRecord


def _record(avatar_id: str, floats: int = 100) -> AvatarRecord:
    return AvatarRecord(
        avatar_id=avatar_id,
        adain=np.zeros(floats, np.float32),
        embedding=np.zeros(4, np.float32),
        points=np.zeros((68, 2), np.float32),
        model_id="m",
        image_size=128,
        create_time=0.0,
    )


def test_a_read_that_raced_a_delete_is_not_cached() -> None:
    cache = AvatarCache(max_bytes=1 << 20)
    stamp = cache.stamp()  # a Get starts reading "ada" from the store ...
    cache.discard("ada")  # ... a Delete of "ada" lands meanwhile ...
    cache.put(_record("ada"), stamp=stamp)  # ... and the Get's (stale) record arrives
    assert cache.get("ada") is None
    cache.put(_record("ada"), stamp=cache.stamp())
    assert cache.get("ada") is not None


def test_an_untrusted_cache_serves_and_keeps_nothing() -> None:
    """While the avatar events are not heard (`trusted()` false) nothing is served from the cache
    nor put in it: a record read then may be changed elsewhere without this replica hearing."""
    live = [True]
    cache = AvatarCache(max_bytes=1 << 20, trusted=lambda: live[0])
    cache.put(_record("ada"))
    live[0] = False
    assert cache.get("ada") is None, "served while the events are not heard"
    cache.put(_record("bob"))
    live[0] = True
    assert cache.get("bob") is None, "kept a record read while the events were not heard"


def test_the_cache_is_bounded_by_bytes() -> None:
    one = _record("a")
    cache = AvatarCache(max_bytes=int(one.nbytes * 2.5))
    for name in "abc":
        cache.put(_record(name))
    assert len(cache) == 2 and cache.get("a") is None and cache.nbytes <= cache.max_bytes
    cache.put(_record("huge", floats=10**6))
    assert cache.get("huge") is None, "a record larger than the bound is not kept"


def test_a_store_removes_the_unfinished_writes_a_killed_process_left(tmp_path: Path) -> None:
    import os
    import time

    from service.store import STALE_TMP_S, LocalAvatarStore

    LocalAvatarStore(root=tmp_path).put(_record("kept"), replace=False)
    stale, young = tmp_path / ".tmp-dead.npz", tmp_path / ".tmp-writing.npz"
    for tmp in (stale, young):
        tmp.write_bytes(b"half an archive")
    old = time.time() - STALE_TMP_S - 60
    os.utime(stale, (old, old))
    store = LocalAvatarStore(root=tmp_path)
    assert store.swept == 1 and not stale.exists()
    assert young.exists()  # maybe another replica's write in flight
    assert store.ids() == ["kept"] and store.get("kept") is not None
