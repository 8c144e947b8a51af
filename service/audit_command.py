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

Each line is the event as logged plus `tenant`: its avatar's tenant; for an event without an
avatar (a refused call) the tenant its actor names - a caller authenticated, then refused
(`forbidden`) - or null: a caller that could not be authenticated (an unknown, forged or revoked
key) has no tenant, and `--tenant` never lists it (before, `--tenant default` did).
  TALKINGHEAD_REDIS_URL=redis://redis:6379/0 talkinghead audit --event delete
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from facekit.ids import split_id
from facekit.partial import partial_path, remove_abandoned
from service.audit import EVENTS, AuditLog, FileAuditLog, RedisAuditLog
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
    parser.add_argument("--out", type=Path, help="write here (default: standard output)")


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


def _export(args: argparse.Namespace, log: AuditLog, out: TextIO) -> int:
    """Write the events the flags select to `out`; how many."""
    since = 0.0
    if args.since is not None:
        when = args.since if args.since.tzinfo else args.since.replace(tzinfo=datetime.UTC)
        since = when.timestamp()
    count = 0
    # tenant.id names one tenant's avatar (the default tenant's too: its ids are stored unprefixed)
    one = split_id(args.avatar) if args.avatar and "." in args.avatar else None
    for event in log.read():
        tenant = tenant_of(event)
        if one is not None and (not event["avatar_id"] or split_id(event["avatar_id"]) != one):
            continue
        if one is None and args.avatar and args.avatar != split_id(event["avatar_id"])[1]:
            continue
        if (args.tenant and tenant != args.tenant) or (args.no_tenant and tenant is not None):
            continue
        if args.event and event["event"] not in args.event:
            continue
        if event["time"] < since:
            continue
        out.write(json.dumps({"tenant": tenant, **event}, sort_keys=True) + "\n")
        count += 1
    out.flush()
    return count


def run(args: argparse.Namespace) -> int:
    """The log is opened before --out is touched; --out is written to a hidden file beside it and
    renamed onto it when complete, so a failed export leaves a file that was there as it was."""
    try:
        settings = from_env(audit_log=args.audit_log, redis_url=args.redis_url)  # flags override
        log = open_log(settings)
    except ValueError as error:  # a bad TALKINGHEAD_* setting
        raise SystemExit(f"talkinghead audit: {error}") from None
    if args.out is None:
        try:
            count = _export(args, log, sys.stdout)
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
            count = _export(args, log, handle)
        os.replace(partial, out)
    except (OSError, ValueError) as error:
        raise SystemExit(f"talkinghead audit: {error}; nothing written to {out}") from None
    except Exception as error:
        if (failure := redis_failure("talkinghead audit", settings.redis_url, error)) is None:
            raise
        raise SystemExit(f"{failure}; nothing written to {out}") from None
    finally:
        partial.unlink(missing_ok=True)
    print(f"{count} event(s) -> {out}", file=sys.stderr)
    _skipped(log)
    return 0


def _skipped(log: AuditLog) -> None:
    """Say how many lines of a file log were not events (skipped, where they stopped the export)."""
    if unreadable := getattr(log, "unreadable", 0):
        print(
            f"talkinghead audit: {unreadable} line(s) of the log are not events (damaged): skipped",
            file=sys.stderr,
        )
