"""Export the audit log (who created, personalised, animated and deleted which avatar) as JSON lines.

Reads where the service writes: the Redis stream talkinghead:audit when TALKINGHEAD_REDIS_URL (or
--redis-url) is set, else the file TALKINGHEAD_AUDIT_LOG (or --audit-log, default var/audit.jsonl).
An operator's command: it runs beside the service with the same settings, not through the API.

example:
  talkinghead audit --out audit-2026-12.jsonl --since 2026-12-01
  talkinghead audit --avatar mona                 # every event of one avatar, its tombstone included
  TALKINGHEAD_REDIS_URL=redis://redis:6379/0 talkinghead audit --event delete
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from service.audit import EVENTS, AuditLog, FileAuditLog, RedisAuditLog
from service.settings import from_env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--audit-log", type=Path, help="the log file (default $TALKINGHEAD_AUDIT_LOG or var/audit.jsonl)"
    )
    parser.add_argument("--redis-url", help="read the Redis stream instead (default $TALKINGHEAD_REDIS_URL)")
    parser.add_argument("--avatar", help="only this avatar's events")
    parser.add_argument("--event", choices=EVENTS, action="append", help="only these events (repeatable)")
    parser.add_argument("--since", type=datetime.datetime.fromisoformat, help="ISO 8601 date or time, UTC")
    parser.add_argument("--out", type=Path, help="write here (default: standard output)")


def open_log(args: argparse.Namespace) -> AuditLog:
    """The log the service writes with the same settings (flags override TALKINGHEAD_*)."""
    settings = from_env(audit_log=args.audit_log, redis_url=args.redis_url)
    if settings.redis_url:
        from jobs.redis_queue import connect

        return RedisAuditLog(client=connect(settings.redis_url))
    path = settings.audit_log
    if not path.is_file():
        raise SystemExit(f"talkinghead audit: {path}: no audit log there (see --audit-log)")
    return FileAuditLog(path=path)


def run(args: argparse.Namespace) -> int:
    since = 0.0
    if args.since is not None:
        when = args.since if args.since.tzinfo else args.since.replace(tzinfo=datetime.UTC)
        since = when.timestamp()
    out = args.out.open("w") if args.out else sys.stdout
    count = 0
    try:
        for event in open_log(args).read():
            if args.avatar and event["avatar_id"] != args.avatar:
                continue
            if args.event and event["event"] not in args.event:
                continue
            if event["time"] < since:
                continue
            out.write(json.dumps(event, sort_keys=True) + "\n")
            count += 1
    finally:
        if args.out:
            out.close()
    print(f"{count} event(s)" + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0
