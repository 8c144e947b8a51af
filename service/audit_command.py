"""Export the audit log (who created, personalised, animated and deleted which avatar) as JSON lines.

Reads where the service writes: the Redis stream talkinghead:audit when TALKINGHEAD_REDIS_URL (or
--redis-url) is set, else the file TALKINGHEAD_AUDIT_LOG (or --audit-log, default var/audit.jsonl).
An operator's command: it runs beside the service with the same settings, not through the API.
--out is written whole or not at all (a hidden file beside it, renamed onto it when complete).

examples:
  talkinghead audit --out audit-2026-12.jsonl --since 2026-12-01
  talkinghead audit --avatar mona                 # every event of one avatar, its tombstone included
  talkinghead audit --tenant acme --avatar mona   # (without --tenant: every tenant's `mona`)
  talkinghead audit --no-tenant --since 2026-12-01   # calls refused before their caller was known
  talkinghead audit --until 2026-07-01 --out audit-2026H1.jsonl --remove   # archive, then trim

Each line is the event as logged plus `tenant`: its avatar's tenant; for an event without an
avatar (a refused call) the tenant its actor names - a caller authenticated, then refused
(`forbidden`) - or null: a caller that could not be authenticated (an unknown, forged or revoked
key) has no tenant, and `--tenant` never lists it (before, `--tenant default` did).
  TALKINGHEAD_REDIS_URL=redis://redis:6379/0 talkinghead audit --event delete

The log only grows (~0.5 KB an event, most of them animate_start); `--remove` keeps it bounded while
the service runs: every event before --until is written to a new --out, which is on disk (fsync)
before they are removed from the log - a failure between leaves them in both, never in neither.
It takes no other selection (the log keeps no holes), and never writes over an earlier archive. In
Redis the events are those Redis appended before --until (its clock, not the event's `time`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from facekit.ids import split_id
from facekit.partial import partial_path, remove_abandoned
from service.audit import EVENTS, ArchiveBusy, AuditLog, FileAuditLog, RedisAuditLog, sync_folder
from service.settings import Settings, from_env
from service.wire import redis_failure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--audit-log", type=Path, help="the log file (default $TALKINGHEAD_AUDIT_LOG or var/audit.jsonl)"
    )
    parser.add_argument("--redis-url", help="read the Redis stream instead (default $TALKINGHEAD_REDIS_URL)")
    parser.add_argument(
        "--avatar", help="only events of avatars with this id (in every tenant; tenant.id: in that tenant)"
    )
    whose = parser.add_mutually_exclusive_group()
    whose.add_argument("--tenant", help="only this tenant's events (`default` without API keys)")
    whose.add_argument(
        "--no-tenant",
        action="store_true",
        help="only events of no tenant: calls refused before their caller was authenticated",
    )
    parser.add_argument("--event", choices=EVENTS, action="append", help="only these events (repeatable)")
    parser.add_argument("--since", type=datetime.datetime.fromisoformat, help="ISO 8601 date or time, UTC")
    parser.add_argument(
        "--until",
        type=datetime.datetime.fromisoformat,
        help="only events before this ISO 8601 date or time, UTC",
    )
    parser.add_argument("--out", type=Path, help="write here (default: standard output)")
    parser.add_argument(
        "--remove",
        action="store_true",
        help="archive: move every event before --until to a new --out, then out of the log",
    )


def _seconds(when: datetime.datetime | None) -> float | None:
    """An ISO date or time given without a zone is UTC."""
    if when is None:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=datetime.UTC)).timestamp()


def _check_remove(args: argparse.Namespace) -> None:
    """--remove's conditions, before anything is opened."""
    if not args.remove:
        return
    if args.until is None or args.out is None:
        raise SystemExit(
            "talkinghead audit: --remove needs --until (the events before it) and --out (their archive)"
        )
    if any(getattr(args, name) for name in ("avatar", "tenant", "no_tenant", "event", "since")):
        raise SystemExit(
            "talkinghead audit: --remove moves every event before --until: "
            "it takes no --avatar, --tenant, --no-tenant, --event or --since"
        )
    if (until := _seconds(args.until)) is not None and until > time.time():
        raise SystemExit(
            f"talkinghead audit: --until {args.until.isoformat()} is in the future: "
            "only past events can be moved out"
        )
    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(
            f"talkinghead audit: --out {args.out}: exists; an archive is never written over (name a new file)"
        )


def open_log(settings: Settings) -> AuditLog:
    """The log the service writes with these settings."""
    if settings.redis_url:
        from jobs.redis_queue import connect

        return RedisAuditLog(client=connect(settings.redis_url))
    path = settings.audit_log
    if not path.is_file():
        raise SystemExit(f"talkinghead audit: {path}: no audit log there (see --audit-log)")
    return FileAuditLog(path=path)


def tenant_of(event: dict[str, Any]) -> str | None:
    """The tenant an event belongs to: its avatar's; without an avatar (auth_refused*), the
    `tenant=` its actor names, else None (a caller that could not be authenticated)."""
    if event.get("avatar_id"):
        return split_id(event["avatar_id"])[0]
    for word in str(event.get("actor", "")).split():
        name, _, value = word.partition("=")
        if name == "tenant" and value:
            return value
    return None


def _export(args: argparse.Namespace, events: Iterator[dict[str, Any]], out: TextIO) -> int:
    """Write the events the flags select to `out`; how many. (An archive's events are all of
    them: `log.archive` chose them, by Redis's clock there, and removes every one it gave.)"""
    since = _seconds(args.since) or 0.0
    until = None if args.remove else _seconds(args.until)
    count = 0
    # tenant.id names one tenant's avatar (the default tenant's too: its ids are stored unprefixed)
    one = split_id(args.avatar) if args.avatar and "." in args.avatar else None
    for event in events:
        tenant = tenant_of(event)
        if one is not None and (not event["avatar_id"] or split_id(event["avatar_id"]) != one):
            continue
        if one is None and args.avatar and args.avatar != split_id(event["avatar_id"])[1]:
            continue
        if (args.tenant and tenant != args.tenant) or (args.no_tenant and tenant is not None):
            continue
        if args.event and event["event"] not in args.event:
            continue
        if event["time"] < since or (until is not None and event["time"] >= until):
            continue
        out.write(json.dumps({"tenant": tenant, **event}, sort_keys=True) + "\n")
        count += 1
    out.flush()
    return count


def run(args: argparse.Namespace) -> int:
    """The log is opened before --out is touched; --out is written whole or not at all
    (`_write_whole`); with --remove, the log loses the events only once --out holds them."""
    _check_remove(args)
    try:
        settings = from_env(audit_log=args.audit_log, redis_url=args.redis_url)  # flags override
        log = open_log(settings)
    except ValueError as error:  # a bad TALKINGHEAD_* setting
        raise SystemExit(f"talkinghead audit: {error}") from None
    if args.out is None:
        try:
            count = _export(args, log.read(), sys.stdout)
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, as other Unix tools do. Standard output
            # goes to /dev/null so that Python's flush at exit does not fail on the pipe again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except (OSError, ValueError) as error:
            raise SystemExit(f"talkinghead audit: cannot read the audit log ({error})") from None
        except Exception as error:  # Redis away, timing out, refusing: one line
            if (failure := redis_failure("talkinghead audit", settings.redis_url, error)) is None:
                raise
            raise SystemExit(failure) from None
        print(f"{count} event(s)", file=sys.stderr)
        _skipped(log)
        return 0
    out: Path = args.out
    if out.is_dir():
        raise SystemExit(f"talkinghead audit: --out {out}: is a directory")
    written: list[int] = []

    def keep(events: Iterator[dict[str, Any]]) -> None:
        written.append(
            _write_whole(out, lambda handle: _export(args, events, handle), overwrite=not args.remove)
        )

    try:
        if args.remove:
            removed = log.archive(_seconds(args.until) or 0.0, keep)
        else:
            keep(log.read())
    except ArchiveBusy as error:
        raise SystemExit(f"talkinghead audit: {error}; nothing written, nothing removed") from None
    except (OSError, ValueError, RuntimeError) as error:
        raise SystemExit(_failed(error, out, written)) from None
    except Exception as error:
        if (failure := redis_failure("talkinghead audit", settings.redis_url, error)) is None:
            raise
        raise SystemExit(_failed(failure, out, written)) from None
    if args.remove:
        print(f"{removed} event(s) -> {out}, removed from the log", file=sys.stderr)
    else:
        print(f"{written[0]} event(s) -> {out}", file=sys.stderr)
    _skipped(log, archived=args.remove)
    return 0


def _failed(error: BaseException | str, out: Path, written: list[int]) -> str:
    """The line for an export or archive that failed: before --out was whole, or after (an
    archive whose events could not be removed: they are in both)."""
    why = (
        error if isinstance(error, str) else f"talkinghead audit: {getattr(error, 'strerror', None) or error}"
    )
    if not written:
        return f"{why}; nothing written to {out}"
    return (
        f"{why}; {written[0]} event(s) written to {out} are still in the log too: "
        f"delete {out} before archiving again"
    )


def _write_whole(out: Path, write: Callable[[TextIO], int], *, overwrite: bool = True) -> int:
    """`write(handle)` to a hidden file beside `out`, on disk (fsync, the folder too) and renamed
    onto it when whole: a failed export leaves a file that was there as it was; what it returns.
    Not `overwrite` (an archive): linked there instead, which fails if a file appeared meanwhile."""
    partial = partial_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = partial.open("w")
        remove_abandoned(out)
    except (FileExistsError, NotADirectoryError):
        raise SystemExit(f"talkinghead audit: --out {out}: a parent of it is not a directory") from None
    except OSError as error:
        why = error.strerror or error
        raise SystemExit(f"talkinghead audit: --out {out}: cannot write there ({why})") from None
    try:
        with handle:
            count = write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(partial, out)
        else:
            try:
                os.link(partial, out)
            except FileExistsError:
                raise SystemExit(
                    f"talkinghead audit: --out {out}: a file appeared there during the archive; "
                    "nothing removed"
                ) from None
        sync_folder(out.parent)
    finally:
        partial.unlink(missing_ok=True)
    return count


def _skipped(log: AuditLog, *, archived: bool = False) -> None:
    """Say how many lines of the log were not events: skipped by an export (they stopped it once),
    left in the log by an archive (a Redis archive stops at the first: the rest stays too)."""
    if not (unreadable := getattr(log, "unreadable", 0)):
        return
    if not archived:
        what = "skipped"
    elif isinstance(log, RedisAuditLog):
        what = "the archive stopped at it; it and the events after it stay in the log"
    else:
        what = "left in the log"
    print(
        f"talkinghead audit: {unreadable} line(s) of the log are not events (damaged): {what}",
        file=sys.stderr,
    )
