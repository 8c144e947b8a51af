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
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

EVENTS = ("create", "replace", "personalise", "animate_start", "delete")
REDIS_STREAM = "talkinghead:audit"


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


class AuditLog(Protocol):
    def append(self, event: AuditEvent) -> None: ...

    def read(self) -> Iterator[dict[str, Any]]:
        """Every event, oldest first."""
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

    def read(self) -> Iterator[dict[str, Any]]:
        after = "-"
        while batch := self.r.xrange(REDIS_STREAM, min=after, max="+", count=1000):
            for _, fields in batch:
                yield json.loads(fields[b"event"])
            last = batch[-1][0]
            after = "(" + (last.decode() if isinstance(last, bytes) else last)  # exclusive
