"""Avatars in Redis, shared by every service replica (TALKINGHEAD_REDIS_URL).

One hash per avatar (jobs.keys.avatar): `meta` (the JSON the local store keeps), the arrays as raw
bytes (`adain`, `embedding`, `points`, `crops`, `crop_points`; shapes in meta) and `preview_png`,
`portrait_jpeg`; the ids in a sorted set for paging. A put or delete is one MULTI/EXEC transaction
(WATCH guards put(replace=False)): a replica killed mid-create leaves either the whole avatar or
nothing. The same transaction publishes the avatar event (jobs.events) that makes every replica
drop its cached copy.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import redis

from jobs import events, keys
from jobs.events import Event
from service.errors import CorruptRecord
from service.store import UNREADABLE, AvatarRecord, from_meta, meta_fields

_ARRAYS = {  # field -> dtype
    "adain": np.float32,
    "embedding": np.float32,
    "points": np.float32,
    "crops": np.uint8,
    "crop_points": np.float32,
}


def to_fields(record: AvatarRecord) -> dict[str, bytes]:
    arrays = {name: np.ascontiguousarray(getattr(record, name), dtype) for name, dtype in _ARRAYS.items()}
    meta = {**record.meta(), "shapes": {name: list(a.shape) for name, a in arrays.items()}}
    return {
        "meta": json.dumps(meta).encode(),
        "preview_png": record.preview_png,
        "portrait_jpeg": record.portrait_jpeg,
        **{name: a.tobytes() for name, a in arrays.items()},
    }


def from_fields(raw: dict[bytes, bytes]) -> AvatarRecord:
    meta: dict[str, Any] = json.loads(raw[b"meta"])
    arrays: dict[str, Any] = {
        name: np.frombuffer(raw[name.encode()], dtype).reshape(meta["shapes"][name]).copy()
        for name, dtype in _ARRAYS.items()
    }
    cx, cy, side = meta["portrait_box"]
    return AvatarRecord(
        **meta_fields(meta),
        preview_png=raw.get(b"preview_png", b""),
        portrait_jpeg=raw.get(b"portrait_jpeg", b""),
        portrait_box=(float(cx), float(cy), int(side)),
        **arrays,
    )


def _event(avatar_id: str, name: str) -> str:
    return Event(avatar_id=avatar_id, event=name, sent=time.time()).to_json()


class RedisAvatarStore:
    def __init__(self, *, client: redis.Redis) -> None:
        self.r: Any = client  # redis-py's annotations type every reply as bytes | str | list ...

    def ping(self) -> None:
        """Raise unless Redis answers (service/storage.py's probe)."""
        self.r.ping()

    def put(self, record: AvatarRecord, *, replace: bool) -> bool:
        key, fields = keys.avatar(record.avatar_id), to_fields(record)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    if not replace and pipe.exists(key):
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.delete(key)
                    pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                    pipe.zadd(keys.AVATARS, {record.avatar_id: 0})
                    pipe.publish(keys.EVENTS, _event(record.avatar_id, events.CHANGED))
                    pipe.execute()
                    return True
                except redis.WatchError:  # another replica wrote the id meanwhile: check again
                    continue

    def get(self, avatar_id: str) -> AvatarRecord | None:
        raw = self.r.hgetall(keys.avatar(avatar_id))
        try:
            return from_fields(raw) if raw else None  # type: ignore[arg-type]
        except UNREADABLE as error:  # (a hash written by hand, or by another release)
            raise CorruptRecord.reading(avatar_id, f"Redis {keys.avatar(avatar_id)}", error) from None

    def listing(self, avatar_id: str) -> AvatarRecord | None:
        meta = self.r.hget(keys.avatar(avatar_id), "meta")
        try:
            return from_meta(json.loads(meta)) if meta is not None else None
        except UNREADABLE as error:
            raise CorruptRecord.reading(avatar_id, f"Redis {keys.avatar(avatar_id)}", error) from None

    def delete(self, avatar_id: str) -> bool:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(keys.avatar(avatar_id))
            pipe.zrem(keys.AVATARS, avatar_id)
            pipe.publish(keys.EVENTS, _event(avatar_id, events.DELETED))
            deleted, _, _ = pipe.execute()
        return bool(deleted)

    def ids(self) -> list[str]:
        return [i.decode() for i in self.r.zrangebylex(keys.AVATARS, "-", "+")]
