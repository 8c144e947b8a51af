"""What a worker needs to know of the avatar store: which avatars exist, and which record each is.

Read-only and torch-free: the worker asks it before it withdraws a generator (a REMOVE job, the
sweep of generators left behind) and before it publishes one, so that it never removes the
generator of a record that is still there and never keeps one of a record that is gone. A record
is named by its create time (`created`), which the personalised generator made from it carries as
its stamp (facekit.contract.avatar_stamp, Meta.AVATAR_CREATED).

Reads what the service writes: `LocalAvatarIndex` the directory of service/store.py
(`<id>.npz`, the `meta` member's JSON), `RedisAvatarIndex` the hashes and id index of
service/redis_store.py (jobs.keys.avatar's `meta`, jobs.keys.AVATARS); tests/test_personalise.py
pins both against the service's stores.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from facekit.ids import validate_stored_id
from jobs import keys

log = logging.getLogger("talkinghead.jobs.avatars")

SUFFIX = ".npz"  # service/store.py SUFFIX
STORE_ID_FILE = ".store-id"  # a local store's id (the service's store lists only *.npz)


class AvatarIndex(Protocol):
    def created(self, avatar_id: str) -> float | None:
        """The create time of the avatar's record now (None: there is none). Raises when the
        store cannot be read: the caller then removes nothing."""
        ...

    def count(self) -> int:
        """How many avatars the store holds."""
        ...

    def store_id(self) -> str:
        """This store's id, made the first time it is asked for: the generators fine-tuned on
        its records carry it (Meta.AVATAR_STORE), so a worker sweeping a model repository that
        another deployment shares (`make demo` and `make up` share model_repository/) takes back
        only its own."""
        ...

    def describe(self) -> str: ...


class LocalAvatarIndex:
    """The avatar directory of a service without Redis (TALKINGHEAD_AVATAR_STORE)."""

    def __init__(self, *, root: Path) -> None:
        self.root = Path(root)

    def created(self, avatar_id: str) -> float | None:
        if not self.root.is_dir():  # a store that is not there says nothing: not "no avatar"
            raise FileNotFoundError(f"no avatar store at {self.root}")
        path = self.root / (validate_stored_id(avatar_id) + SUFFIX)
        try:
            with np.load(path, allow_pickle=False) as archive:  # (reads the meta member alone)
                meta: dict[str, Any] = json.loads(archive["meta"].tobytes())
            return float(meta["create_time"])
        except FileNotFoundError:
            return None
        except (zipfile.BadZipFile, ValueError, EOFError, KeyError, TypeError):  # service/store.py UNREADABLE
            # a record that cannot be read is no record a generator may serve (the service answers
            # DATA_LOSS for it, and a delete of it queues the REMOVE job that asks here)
            log.warning("the avatar record %s cannot be read: taken as none", path)
            return None

    def count(self) -> int:
        if not self.root.is_dir():
            raise FileNotFoundError(f"no avatar store at {self.root}")
        return sum(1 for p in self.root.glob("*" + SUFFIX) if not p.name.startswith("."))

    def store_id(self) -> str:
        path = self.root / STORE_ID_FILE
        try:
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as handle:
                handle.write(uuid.uuid4().hex)  # (two first askers: one makes it, both read it)
        except FileExistsError:
            pass
        for _ in range(100):  # the maker may not have written it yet
            text = path.read_text().strip()
            if text:
                return text
            time.sleep(0.01)
        raise RuntimeError(f"{path} is empty")

    def describe(self) -> str:
        return str(self.root)


class RedisAvatarIndex:
    """The avatars of the replicas on Redis (TALKINGHEAD_REDIS_URL), read with the worker's client."""

    def __init__(self, *, client: Any) -> None:
        self.r = client

    def created(self, avatar_id: str) -> float | None:
        meta = self.r.hget(keys.avatar(avatar_id), "meta")
        return None if meta is None else float(json.loads(meta)["create_time"])

    def count(self) -> int:
        return int(self.r.zcard(keys.AVATARS))

    def store_id(self) -> str:
        self.r.set(keys.STORE_ID, uuid.uuid4().hex, nx=True)
        return str(self.r.get(keys.STORE_ID).decode())

    def describe(self) -> str:
        return "Redis"
