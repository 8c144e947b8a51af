"""Avatar store: the persistent record of each avatar, behind an interface, plus an LRU cache.

`LocalAvatarStore` keeps one `<id>.npz` file per avatar in a directory. Writes go to a temporary
file in the same directory and `os.replace` it into place, so a crash never leaves a half-written
avatar and a restart loses none. `service.redis_store.RedisAvatarStore` backs several replicas
(TALKINGHEAD_REDIS_URL) with the same fields.

File format (`.npz`, no pickles): `adain` float32 (D,), `embedding` float32 (512,), `points`
float32 (68, 2) first photo's landmarks in the crop, `crops` uint8 (K, S, S, 3) every photo's face
crop and `crop_points` float32 (K, 68, 2) their landmarks (what a warp-guided generator warps and
fine-tuning trains on), `portrait_jpeg` uint8 (n,) the first photo at <= 1024 px (paste-back),
`preview_png` uint8 (n,) and `meta` uint8 (n,) holding UTF-8 JSON (id, display name, creation time,
model id, image size, per-image reports, the portrait's crop box). Files written before crops were
kept read with K = 0 crops and no portrait.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import threading
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from facekit.ids import validate_stored_id
from facekit.partial import remove_stale
from service.errors import CorruptRecord

SUFFIX = ".npz"
STALE_TMP_S = 3600.0
# What reading a record that is not whole raises (a file cut short or damaged, a member missing, a
# directory in its place): CorruptRecord then, not INTERNAL (the read of every other record goes on).
UNREADABLE = (zipfile.BadZipFile, ValueError, EOFError, KeyError, TypeError, IsADirectoryError)
log = logging.getLogger("talkinghead.service.store")


def write_durably(path: Path, data: bytes, *, suffix: str = "") -> None:
    """`data` at `path` whole or not at all, and on disk (fsync) before it is renamed there; the
    temporary file beside it is named .tmp-*`suffix` (LocalAvatarStore._sweep removes those of the store)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StoreGone(ConnectionError):
    """The avatar directory itself is not there (a volume unmounted, the folder moved): the store
    cannot be reached, which a call must not answer as "no such avatar" or an empty list (a
    ConnectionError: UNAVAILABLE, and the storage probe told at once: service/wire.py)."""


@dataclass(frozen=True, eq=False, kw_only=True)
class AvatarRecord:
    avatar_id: str
    adain: np.ndarray  # (D,) float32: psi = mean of the embedder's AdaIN outputs over the photos
    embedding: np.ndarray  # (512,) float32: mean embedding ê
    points: np.ndarray  # (68, 2) float32: the first photo's landmarks in its crop (image_size px)
    model_id: str
    image_size: int
    create_time: float  # seconds since the epoch, UTC
    display_name: str = ""
    images: list[dict[str, Any]] = field(default_factory=list)  # per-photo reports (ImageReport fields)
    preview_png: bytes = b""
    crops: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0, 3), np.uint8))  # (K, S, S, 3)
    crop_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 68, 2), np.float32))  # (K, 68, 2)
    portrait_jpeg: bytes = b""  # the first photo, long side <= 1024 px
    portrait_box: tuple[float, float, int] = (0.0, 0.0, 0)  # its face crop box (cx, cy, side), pixels
    consent: dict[str, Any] = field(default_factory=dict)  # service.consent.check's record ({}: older files)

    @property
    def nbytes(self) -> int:
        """Memory the record holds, for the cache bound."""
        arrays = (self.adain, self.embedding, self.points, self.crops, self.crop_points)
        return int(sum(a.nbytes for a in arrays) + len(self.preview_png) + len(self.portrait_jpeg))

    def meta(self) -> dict[str, Any]:
        return {
            "avatar_id": self.avatar_id,
            "model_id": self.model_id,
            "image_size": self.image_size,
            "create_time": self.create_time,
            "display_name": self.display_name,
            "images": self.images,
            "portrait_box": list(self.portrait_box),
            "consent": self.consent,
        }


def from_meta(meta: dict[str, Any]) -> AvatarRecord:
    """A record of a stored record's metadata (AvatarRecord.meta) alone: ListAvatars read every
    record whole for it (32 of 32 photos each: 51 MB read for an 8 KB reply, helper-74)."""
    empty: dict[str, Any] = {"adain": np.zeros(0, np.float32), "embedding": np.zeros(0, np.float32)}
    return AvatarRecord(points=np.zeros((0, 2), np.float32), **empty, **meta_fields(meta))


def meta_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """The AvatarRecord fields a stored record's metadata holds (files of older releases lack some)."""
    return {
        "avatar_id": meta["avatar_id"],
        "model_id": meta["model_id"],
        "image_size": int(meta["image_size"]),
        "create_time": float(meta["create_time"]),
        "display_name": meta.get("display_name", ""),
        "images": meta.get("images", []),
        "consent": meta.get("consent", {}),
    }


class AvatarStore(Protocol):
    """Persistent avatars. Methods are blocking (the service calls them in a worker thread)."""

    def put(self, record: AvatarRecord, *, replace: bool) -> bool:
        """Store `record`; False (nothing written) when the id exists and replace is False."""
        ...

    def get(self, avatar_id: str) -> AvatarRecord | None: ...

    def listing(self, avatar_id: str) -> AvatarRecord | None:
        """The record's metadata alone (ListAvatars): its arrays and photos are not read, and left
        empty (the record is never cached nor streamed)."""
        ...

    def delete(self, avatar_id: str) -> bool:
        """True when something was deleted."""
        ...

    def ids(self) -> list[str]:
        """All avatar ids, sorted."""
        ...


class LocalAvatarStore:
    """One `<id>.npz` per avatar in `root` (created if missing). A write goes to a `.tmp-*` file
    that replaces the avatar's file when complete; temp files a killed process left behind (older
    than STALE_TMP_S: a write takes milliseconds) are removed when a store opens the folder. A
    directory found in an avatar's place is never removed: a delete or replace renames it
    `.aside-<id>.npz-<hex>` (hidden from the listing) for an operator to look at."""

    def __init__(self, *, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # serialises exists-check + replace for put(replace=False)
        self.swept = self._sweep()

    def ping(self) -> None:
        """Raise StoreGone unless the avatar directory is there: service/storage.py's probe, and
        what a call asks when a file is not found (no such avatar, or no directory at all)."""
        if not self.root.is_dir():
            raise StoreGone(f"the avatar directory {self.root} is not there")

    def _sweep(self) -> int:
        """Remove stale temp files; returns how many (another replica's write in flight is young)."""
        removed = remove_stale(self.root, f".tmp-*{SUFFIX}", STALE_TMP_S)
        if removed:
            log.warning("removed %d unfinished write(s) a killed process left in %s", removed, self.root)
        return removed

    def _path(self, avatar_id: str) -> Path:
        return self.root / (validate_stored_id(avatar_id) + SUFFIX)

    def _move_aside(self, path: Path) -> None:
        """A directory in a record's place (an operator's doing: the service writes files) is
        renamed to a hidden name beside it and kept, so that its avatar's owner can still delete
        or replace the avatar (unlink and os.replace fail on a directory: INTERNAL before)."""
        aside = path.with_name(f".aside-{path.name}-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:  # (another process sharing the folder moved it meanwhile)
            return
        log.warning("the record %s was a directory; moved aside to %s", path, aside)

    def put(self, record: AvatarRecord, *, replace: bool) -> bool:
        path = self._path(record.avatar_id)
        buffer = io.BytesIO()
        np.savez(
            buffer,
            adain=np.asarray(record.adain, np.float32),
            embedding=np.asarray(record.embedding, np.float32),
            points=np.asarray(record.points, np.float32),
            preview_png=np.frombuffer(record.preview_png, np.uint8),
            crops=np.asarray(record.crops, np.uint8),
            crop_points=np.asarray(record.crop_points, np.float32),
            portrait_jpeg=np.frombuffer(record.portrait_jpeg, np.uint8),
            meta=np.frombuffer(json.dumps(record.meta()).encode(), np.uint8),
        )
        with self._lock:
            if path.exists() and not replace:
                return False
            if path.is_dir():
                self._move_aside(path)
            try:
                write_durably(path, buffer.getvalue(), suffix=SUFFIX)
            except FileNotFoundError:  # (else INTERNAL)
                self.ping()
                raise
        return True

    def listing(self, avatar_id: str) -> AvatarRecord | None:
        path = self._path(avatar_id)
        try:
            with np.load(path, allow_pickle=False) as archive:  # (members read lazily)
                return from_meta(json.loads(archive["meta"].tobytes()))
        except FileNotFoundError:
            self.ping()  # (the folder gone is the store away, not an avatar deleted meanwhile)
            return None
        except UNREADABLE as error:
            raise CorruptRecord.reading(avatar_id, str(path), error) from None

    def get(self, avatar_id: str) -> AvatarRecord | None:
        path = self._path(avatar_id)
        try:
            return self._read(path)
        except FileNotFoundError:
            self.ping()
            return None
        except UNREADABLE as error:
            raise CorruptRecord.reading(avatar_id, str(path), error) from None

    def _read(self, path: Path) -> AvatarRecord:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(archive["meta"].tobytes())
            files = set(archive.files)
            kept = {  # absent from files written before crops were kept
                name: archive[name] for name in ("crops", "crop_points") if name in files
            }
            if "portrait_jpeg" in files:
                kept["portrait_jpeg"] = archive["portrait_jpeg"].tobytes()
                cx, cy, side = meta["portrait_box"]
                kept["portrait_box"] = (float(cx), float(cy), int(side))
            return AvatarRecord(
                adain=archive["adain"],
                embedding=archive["embedding"],
                points=archive["points"],
                preview_png=archive["preview_png"].tobytes(),
                **meta_fields(meta),
                **kept,
            )

    def delete(self, avatar_id: str) -> bool:
        with self._lock:
            path = self._path(avatar_id)
            try:
                path.unlink()
            except FileNotFoundError:
                self.ping()
                return False
            except IsADirectoryError:
                self._move_aside(path)
        return True

    def ids(self) -> list[str]:
        found = sorted(
            p.name[: -len(SUFFIX)] for p in self.root.glob("*" + SUFFIX) if not p.name.startswith(".")
        )
        if not found:  # (globbing a folder that is not there finds nothing too)
            self.ping()
        return found


class AvatarCache:
    """LRU of avatar records bounded by their total bytes (one record larger than the bound is not kept).

    `on_change(entries, bytes, hit)` reports to metrics; hit is None for evictions/insertions.
    `trusted()` false (the avatar events that keep it right are interrupted: service/events.py):
    nothing is served from it nor put in it, so reads go to the store.
    """

    def __init__(
        self,
        *,
        max_bytes: int,
        on_change: Callable[[int, int, bool | None], None] | None = None,
        trusted: Callable[[], bool] = lambda: True,
    ) -> None:
        self.max_bytes = max_bytes
        self.trusted = trusted
        self._items: OrderedDict[str, AvatarRecord] = OrderedDict()
        self._bytes = 0
        self._on_change = on_change or (lambda entries, size, hit: None)
        self._generation = 0  # discards and clears so far (see stamp)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, avatar_id: str) -> AvatarRecord | None:
        record = self._items.get(avatar_id) if self.trusted() else None
        if record is not None:
            self._items.move_to_end(avatar_id)
        self._on_change(len(self._items), self._bytes, record is not None)
        return record

    def stamp(self) -> int:
        """Taken before reading a record from the store; `put(record, stamp=...)` then keeps the
        record only if nothing was discarded meanwhile (a Get racing a Delete must not put the
        deleted avatar back)."""
        return self._generation

    def put(self, record: AvatarRecord, *, stamp: int | None = None) -> None:
        if (stamp is not None and stamp != self._generation) or not self.trusted():
            return
        self._remove(record.avatar_id)
        if record.nbytes <= self.max_bytes:
            self._items[record.avatar_id] = record
            self._bytes += record.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
        self._on_change(len(self._items), self._bytes, None)

    def clear(self) -> None:
        self._generation += 1
        self._items.clear()
        self._bytes = 0
        self._on_change(0, 0, None)

    def discard(self, avatar_id: str) -> None:
        """Forget the avatar (changed or deleted): also refuses puts of records read before now."""
        self._generation += 1
        if self._remove(avatar_id):
            self._on_change(len(self._items), self._bytes, None)

    def _remove(self, avatar_id: str) -> bool:
        old = self._items.pop(avatar_id, None)
        if old is not None:
            self._bytes -= old.nbytes
        return old is not None
