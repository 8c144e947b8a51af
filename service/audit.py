"""The audit log: an append-only record of who made, personalised, animated and deleted which face.

One event per line of JSON: `time` (seconds since the epoch, UTC), `event` (create, replace,
personalise, animate_start, delete), `avatar_id`, `actor` (the tenant and the caller's
address), `model_id`, `consent_id` (the avatar's consent record) and `detail`. A delete leaves a
tombstone: the event names the consent record and what was removed, so the log still says on whose
authority a face existed after every trace of it is gone. A replace is the old record's tombstone
too (`detail.replaced`: its consent record and what was removed).

Where it lives: a file opened with O_APPEND (`TALKINGHEAD_AUDIT_LOG`, one write + fsync per event),
or, with `TALKINGHEAD_REDIS_URL`, the Redis stream `talkinghead:audit` (XADD without trimming), which
every replica appends to. Nothing in the service rewrites or trims either. `talkinghead audit export`
writes it out for an operator.

The events of a create, a replace and a delete (a tombstone) are written ahead (`intend`) before
the change they record, and settled (`settle`) once it is done and the event appended: a process that dies
between the change and its event leaves the intent behind, and the service's recovery
(service/app.py App.recover_audit) appends the event then - marked `detail.recovered` - when the
store shows the change happened, or drops it when it did not. Intents are kept beside the log:
the folder `<log>.pending/` (one JSON file each), or the Redis hash `talkinghead:audit:pending`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from service.store import write_durably

EVENTS = ("create", "replace", "personalise", "animate_start", "delete")
REDIS_STREAM = "talkinghead:audit"
REDIS_PENDING = "talkinghead:audit:pending"


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    event: str
    avatar_id: str
    actor: str
    model_id: str = ""
    consent_id: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.event not in EVENTS:
            raise ValueError(f"unknown audit event {self.event!r}; one of {', '.join(EVENTS)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AuditEvent:
        return cls(**raw)


@dataclass(frozen=True, kw_only=True)
class Intent:
    """An event written ahead of the change it records. The change happened when the store no
    longer holds the record created at `gone` (a delete), or holds the one created at `made` (a
    create or replace: the new record)."""

    key: str  # jobs.record.new_id()
    event: AuditEvent
    gone: float = 0.0
    made: float = 0.0
    written: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Intent:
        raw = json.loads(text)
        return cls(**{**raw, "event": AuditEvent.from_dict(raw["event"])})


class AuditLog(Protocol):
    def append(self, event: AuditEvent) -> None: ...

    def read(self) -> Iterator[dict[str, Any]]:
        """Every event, oldest first."""
        ...

    def intend(self, intent: Intent) -> None:
        """Keep `intent` until it is settled (written through: it survives the process)."""
        ...

    def settle(self, key: str) -> None:
        """Forget an intent (its event was appended, or its change did not happen)."""
        ...

    def intents(self) -> list[Intent]:
        """The intents not settled, oldest first (unreadable ones are skipped)."""
        ...


class FileAuditLog:
    """JSON lines in one file, appended with O_APPEND (whole lines: one write each) and fsync."""

    def __init__(self, *, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, event: AuditEvent) -> None:
        line = (event.to_json() + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    @property
    def pending(self) -> Path:
        return self.path.with_name(self.path.name + ".pending")

    def _intent_path(self, key: str) -> Path:
        if not key.isalnum():
            raise ValueError(f"malformed intent key {key!r}")
        return self.pending / f"{key}.json"

    def intend(self, intent: Intent) -> None:
        path = self._intent_path(intent.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(path, intent.to_json().encode())  # (no .json suffix: intents() globs those)

    def settle(self, key: str) -> None:
        self._intent_path(key).unlink(missing_ok=True)

    def intents(self) -> list[Intent]:
        found = []
        for path in self.pending.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                found.append(Intent.from_json(path.read_bytes()))
        return sorted(found, key=lambda i: i.written)

    def read(self) -> Iterator[dict[str, Any]]:
        try:
            with self.path.open("rb") as handle:
                for line in handle:
                    if line.endswith(b"\n"):  # a line cut by a crash mid-write is not an event
                        yield json.loads(line)
        except FileNotFoundError:
            return


class RedisAuditLog:
    """The Redis stream talkinghead:audit, shared by every replica."""

    def __init__(self, *, client: Any) -> None:
        self.r = client

    def append(self, event: AuditEvent) -> None:
        self.r.xadd(REDIS_STREAM, {"event": event.to_json()})

    def intend(self, intent: Intent) -> None:
        self.r.hset(REDIS_PENDING, intent.key, intent.to_json())

    def settle(self, key: str) -> None:
        self.r.hdel(REDIS_PENDING, key)

    def intents(self) -> list[Intent]:
        found = []
        for text in self.r.hvals(REDIS_PENDING):
            with contextlib.suppress(ValueError, TypeError, KeyError):
                found.append(Intent.from_json(text))
        return sorted(found, key=lambda i: i.written)

    def read(self) -> Iterator[dict[str, Any]]:
        after = "-"
        while batch := self.r.xrange(REDIS_STREAM, min=after, max="+", count=1000):
            for _, fields in batch:
                yield json.loads(fields[b"event"])
            last = batch[-1][0]
            after = "(" + (last.decode() if isinstance(last, bytes) else last)  # exclusive
