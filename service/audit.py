"""The audit log: an append-only record of who made, personalised, animated and deleted which face.

One event per line of JSON: `time` (seconds since the epoch, UTC), `event` (create, replace,
personalise, animate_start, delete; auth_refused and auth_refused_suppressed: calls refused for
their credentials, bounded - RefusalAudit -, with avatar_id ""), `avatar_id`, `actor` (the tenant
and the caller's address; a refused call's names no tenant unless its caller was authenticated
first - `forbidden` -: one that could not be has none), `model_id`, `consent_id` (the avatar's
consent record) and `detail`. A delete leaves a tombstone: the event names the consent record and
what was removed, so the log still says on whose authority a face existed after every trace of it
is gone. A replace is the old record's tombstone too (`detail.replaced`: its consent record and
what was removed).

Where it lives: a file opened with O_APPEND (`TALKINGHEAD_AUDIT_LOG`, one write + fsync per event),
or, with `TALKINGHEAD_REDIS_URL`, the Redis stream `talkinghead:audit` (XADD without trimming), which
every replica appends to. The service never rewrites or trims either: `talkinghead audit` writes it
out for an operator, and `talkinghead audit --until DATE --out FILE --remove` moves the events
before DATE out of it (`archive`: into FILE first, durably, then out of the log) while the service
runs, so that an operator keeps the log's size bounded without losing a line of it.

The events of a create, a replace and a delete (a tombstone) are written ahead (`intend`) before
the change they record, and settled (`settle`) once it is done and the event appended: a process that dies
between the change and its event leaves the intent behind, and the service's recovery
(service/app.py App.recover_audit) appends the event then - marked `detail.recovered` - when the
store shows the change happened, or drops it when it did not. Intents are kept beside the log:
the folder `<log>.pending/` (one JSON file each), or the Redis hash `talkinghead:audit:pending`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from facekit.partial import remove_stale
from service.refusals import peer_address
from service.store import STALE_TMP_S, write_durably

log = logging.getLogger("talkinghead.service.audit")

EVENTS = (
    "create",
    "replace",
    "personalise",
    "animate_start",
    "delete",
    "auth_refused",  # a call refused for its credentials (RefusalAudit): avatar_id ""
    "auth_refused_suppressed",  # how many more were refused than RefusalAudit wrote one by one
)
# Refused credentials (RefusalAudit): at most AUTH_PER_KEY events per caller address and
# credential, and AUTH_MAX in all, per AUTH_WINDOW_S; the rest counted, then said in at most
# AUTH_MAX_SUMMARIES + 1 `auth_refused_suppressed` events per window. A flood of bad keys adds at
# most ~80 lines a minute to the log, whatever it sends.
AUTH_PER_KEY = 5
AUTH_MAX = 60
AUTH_WINDOW_S = 60.0
AUTH_MAX_SUMMARIES = 20
AUTH_MAX_KEYS = 1024
REDIS_STREAM = "talkinghead:audit"
REDIS_PENDING = "talkinghead:audit:pending"
REDIS_ARCHIVING = "talkinghead:audit:archiving"  # held (SET NX, expiring) while an archive runs
ARCHIVE_LEASE_S = 3600

# `archive(until, keep)`: `keep` is given the events to move out and has stored them durably when
# it returns; only then are they removed from the log.
Keep = Callable[[Iterator[dict[str, Any]]], None]


class ArchiveBusy(RuntimeError):
    """Another archive of the same log is running."""


def _event_of(line: bytes) -> dict[str, Any] | None:
    """The event a line of the log holds, or None: not JSON, or without its event, avatar_id and
    time (damaged, or written by hand)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return None
    when = event.get("time")
    if (
        not isinstance(event.get("avatar_id"), str)
        or not isinstance(when, (int, float))
        or isinstance(when, bool)
    ):
        return None
    return event


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

    def archive(self, until: float, keep: Keep) -> int:
        """Move the events of before `until` out: `keep` stores them, then they leave the log."""
        ...


class FileAuditLog:
    """JSON lines in one file, appended with O_APPEND (whole lines: one write each) and fsync."""

    def __init__(self, *, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.unreadable = 0  # lines the last read() skipped

    def append(self, event: AuditEvent) -> None:
        """Append one whole line, or raise leaving the file as it was: a disk that filled mid-line
        took part of it (os.write wrote what fitted), and the next event was appended onto the cut
        line, which no export could read past."""
        line = (event.to_json() + "\n").encode()
        with self._lock:
            fd = self._open_locked()
            try:
                written = os.write(fd, line)
                if written != len(line):  # where this write began: (O_APPEND) its end less its bytes
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR) - written)
                    raise OSError(errno.ENOSPC, f"only {written} of the event's {len(line)} bytes fitted")
                os.fsync(fd)
            finally:
                os.close(fd)

    def _open_locked(self) -> int:
        """The log's file, opened to append and locked (flock, released when closed). `archive`
        swaps a new file in under this lock: a writer that had opened the one swapped out finds
        the name no longer its file's once it holds the lock, and opens again."""
        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                mine, named = os.fstat(fd), os.stat(self.path)
                if (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino):
                    return fd
            except FileNotFoundError:  # renamed away between the open and the stat
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def archive(self, until: float, keep: Keep) -> int:
        """Move the events of before `until` (their `time`, seconds since the epoch) out of the
        log; how many. `keep` is given them and has stored them when it returns; only then is the
        log rewritten without them, beside it, and swapped in - a crash between leaves them in
        both places, never in neither. Lines that are not events stay in the log. The service
        appends meanwhile: its lock is held only to copy what it appended during the archive
        and to swap the files, so a stream's start waits for that, not for the whole rewrite."""
        guard = self.path.with_name(self.path.name + ".archive.lock")
        with guard.open("a") as held:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ArchiveBusy(f"another archive of {self.path} is running") from None
            for left in self.path.parent.glob(f".{self.path.name}.archive-*.tmp"):  # a killed one's
                left.unlink(missing_ok=True)
            with self.path.open("rb") as source:
                return self._archive(source, until, keep)

    def _archive(self, source: Any, until: float, keep: Keep) -> int:
        """One pass over the log: the events to move go to `keep`, every other whole line to the
        new log beside it (whose owner and mode are the old one's - an archive run as root made
        it root's 0644, and the service could no longer append -, set before anything is kept)."""
        seen = os.fstat(source.fileno())
        moved, end = 0, 0
        self.unreadable = 0  # damaged lines, left in the log
        tmp = self.path.with_name(f".{self.path.name}.archive-{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as kept:
                if (seen.st_uid, seen.st_gid) != (os.geteuid(), os.getegid()):
                    os.fchown(fd, seen.st_uid, seen.st_gid)
                os.fchmod(fd, stat.S_IMODE(seen.st_mode))

                def older() -> Iterator[dict[str, Any]]:
                    nonlocal moved, end
                    for line in source:
                        if not line.endswith(b"\n"):  # an append under way: it and what follows stay
                            break
                        end += len(line)
                        if (event := _event_of(line)) is not None and event["time"] < until:
                            moved += 1
                            yield event
                            continue
                        if event is None:
                            self.unreadable += 1
                        kept.write(line)

                _hand_over(older(), keep)
                if moved == 0:
                    return 0
                lock = self._open_locked()  # from here on the service's appends wait
                try:
                    now = os.fstat(lock)
                    if (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
                        raise RuntimeError(f"{self.path} was replaced during the archive; nothing removed")
                    source.seek(end)
                    kept.write(source.read())  # what was appended meanwhile
                    kept.flush()
                    os.fsync(fd)
                    os.replace(tmp, self.path)
                    sync_folder(self.path.parent)
                finally:
                    os.close(lock)
        finally:
            tmp.unlink(missing_ok=True)
        return moved

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
        remove_stale(self.pending, ".tmp-*", STALE_TMP_S)  # what a process killed mid-write left
        for path in self.pending.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                found.append(Intent.from_json(path.read_bytes()))
        return sorted(found, key=lambda i: i.written)

    def read(self) -> Iterator[dict[str, Any]]:
        """The events, in order. A line that is not one (cut by a crash or a full disk before
        appends were whole, or damaged by hand) is skipped and counted in `unreadable`: one bad
        line ended every export before."""
        self.unreadable = 0
        try:
            with self.path.open("rb") as handle:
                for line in handle:
                    if not line.endswith(b"\n"):  # a line cut by a crash mid-write is not an event
                        continue
                    if (event := _event_of(line)) is None:
                        self.unreadable += 1
                        continue
                    yield event
        except FileNotFoundError:
            return


def _hand_over(events: Iterator[dict[str, Any]], keep: Keep) -> None:
    """keep(events), which must take every one: those it left would be removed unkept."""
    keep(events)
    if next(events, None) is not None:
        raise RuntimeError("the archive did not take every event; nothing removed")


def sync_folder(folder: Path) -> None:
    """fsync a folder: a rename in it is on disk once this returns."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RedisAuditLog:
    """The Redis stream talkinghead:audit, shared by every replica."""

    def __init__(self, *, client: Any) -> None:
        self.r = client
        self.unreadable = 0  # entries the last read() or archive() could not read

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

    def _entries(self, upto: str = "+") -> Iterator[tuple[str, dict[str, Any] | None]]:
        """(stream id, event or None where the entry is not one), in order, below `upto`."""
        after = "-"
        while batch := self.r.xrange(REDIS_STREAM, min=after, max=upto, count=1000):
            for entry, fields in batch:
                entry = entry.decode() if isinstance(entry, bytes) else entry
                yield entry, _event_of(fields.get(b"event", b""))
            after = "(" + entry  # exclusive

    def read(self) -> Iterator[dict[str, Any]]:
        """The events, in order; an entry that is not one (written by hand) is skipped and
        counted in `unreadable` (it ended the export with a JSON error before)."""
        self.unreadable = 0
        for _, event in self._entries():
            if event is None:
                self.unreadable += 1
                continue
            yield event

    def archive(self, until: float, keep: Keep) -> int:
        """FileAuditLog.archive for the stream: the entries Redis appended before `until` (their
        stream ids, Redis's clock, which also makes every later append fall after it), up to the
        first one that is not an event (it and what follows stay; counted in `unreadable`), then
        XTRIM MINID. One archive at a time, held by a key that expires should this one die."""
        seconds, micros = self.r.time()
        if until > seconds + micros / 1e6:
            raise ValueError("the archive's end is in the future of the Redis server's clock")
        token = secrets.token_hex(8)
        if not self.r.set(REDIS_ARCHIVING, token, nx=True, ex=ARCHIVE_LEASE_S):
            raise ArchiveBusy("another archive of the Redis audit stream is running")
        try:
            self.unreadable = 0
            bound = f"{int(until * 1000)}-0"
            moved = 0

            def older() -> Iterator[dict[str, Any]]:
                nonlocal bound, moved
                for entry, event in self._entries("(" + bound):
                    if event is None:
                        self.unreadable += 1
                        bound = entry
                        return
                    moved += 1
                    yield event

            _hand_over(older(), keep)
            if moved:
                self.r.xtrim(REDIS_STREAM, minid=bound, approximate=False)
            return moved
        finally:
            if self.r.get(REDIS_ARCHIVING) == token.encode():
                self.r.delete(REDIS_ARCHIVING)


class RefusalAudit:
    """Audit events for calls refused for their credentials (service/auth.py Authenticator.refused):
    `auth_refused` with the caller's address (actor: `peer=...`, and `tenant=...` first where the
    caller was authenticated and then refused, `forbidden`; none where it could not be - a
    forged key's id names a tenant, but the caller is not it), the reason, the method and the
    credential's
    id (`key:<key id>` of a ring key, `cert:<common name>`, `token:<12 hex of the SHA-256 of what was
    sent>` for a token that names no key - never a secret, nor anything it can be read back from -,
    `none`). Bounded (AUTH_*): what is over the limits is counted and written as
    `auth_refused_suppressed` (count, reasons) when its window ends (`flush`, every second from the
    key-ring task). Writes go to the audit log off the event loop (its executor) when one runs."""

    def __init__(
        self,
        *,
        log_: AuditLog,
        per_key: int | None = None,
        max_events: int | None = None,
        window_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log_
        self.per_key = AUTH_PER_KEY if per_key is None else per_key
        self.max_events = AUTH_MAX if max_events is None else max_events
        self.window_s = AUTH_WINDOW_S if window_s is None else window_s
        self.clock = clock
        self._start = clock()
        self._written = 0
        # (address, credential, tenant: an authenticated caller's, or "") -> events written
        self._counts: dict[tuple[str, str, str], int] = {}
        self._suppressed: dict[tuple[str, str, str], dict[str, int]] = {}  # -> reason -> refusals

    def record(self, *, peer: str, credential: str, reason: str, method: str, tenant: str = "") -> None:
        self.flush()
        key = (peer_address(peer), credential, tenant)
        if key not in self._counts and len(self._counts) >= AUTH_MAX_KEYS:
            key = ("*", "*", "")  # more callers at once than are told apart: counted together
        written = self._counts.get(key, 0)
        if written >= self.per_key or self._written >= self.max_events or key == ("*", "*", ""):
            reasons = self._suppressed.setdefault(key, {})
            reasons[reason] = reasons.get(reason, 0) + 1
            return
        self._counts[key] = written + 1
        self._written += 1
        detail = {"reason": reason, "credential": credential, "method": method}
        actor = f"tenant={tenant} peer={peer}" if tenant else f"peer={peer}"
        self._write(AuditEvent(event="auth_refused", avatar_id="", actor=actor, detail=detail))

    def flush(self) -> None:
        """At the end of a window: write what it suppressed, and start the next."""
        now = self.clock()
        if now - self._start < self.window_s:
            return
        window, self._start = now - self._start, now
        suppressed, self._suppressed, self._counts, self._written = self._suppressed, {}, {}, 0
        ranked = sorted(suppressed.items(), key=lambda kv: -sum(kv[1].values()))
        told, rest = ranked[:AUTH_MAX_SUMMARIES], ranked[AUTH_MAX_SUMMARIES:]
        if rest:
            merged: dict[str, int] = {}
            for _, reasons in rest:
                for reason, n in reasons.items():
                    merged[reason] = merged.get(reason, 0) + n
            told.append((("*", "*", ""), merged))
        for (address, credential, tenant), reasons in told:
            detail = {
                "refused": sum(reasons.values()),
                "reasons": reasons,
                "credential": credential,
                "window_s": round(window, 1),
            }
            actor = f"tenant={tenant} peer={address}" if tenant else f"peer={address}"
            self._write(AuditEvent(event="auth_refused_suppressed", avatar_id="", actor=actor, detail=detail))

    def _write(self, event: AuditEvent) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._append(event)
            return
        loop.run_in_executor(None, self._append, event)

    def _append(self, event: AuditEvent) -> None:
        try:
            self.log.append(event)
        except Exception as error:
            log.error("could not write the audit event %s: %s", event.event, error)
