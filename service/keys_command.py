"""Manage API keys, client-certificate bindings and denials, and tenant quotas (the key ring of
service/auth.py).

The ring is the file or Redis key the server reads (TALKINGHEAD_API_KEYS); a running server sees a
change within a second or two: a revoked key, or a denied or unbound certificate, is refused and
the streams it has open (Animate, WatchOperation) end UNAUTHENTICATED. `issue` prints the key
once: only its SHA-256 is kept.

examples:
  talkinghead keys issue --tenant acme                  # prints thk_..., give it to acme
  talkinghead keys issue --tenant ops --role admin      # an operator's key (may act for any tenant)
  talkinghead keys list
  talkinghead keys revoke 3f9a1c0b2d4e
  talkinghead keys quota --tenant acme --max-streams 8 --max-fps 200
  talkinghead keys bind-cert --common-name studio-01.acme.example --tenant acme
  talkinghead keys unbind-cert --common-name studio-01.acme.example
  talkinghead keys deny-cert studio-01.acme.example      # revoke a client certificate's name
  talkinghead keys undeny-cert studio-01.acme.example
  TALKINGHEAD_API_KEYS=redis TALKINGHEAD_REDIS_URL=redis://redis:6379/0 talkinghead keys list
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from service.auth import (
    ROLES,
    USER,
    Quotas,
    bind_cert,
    deny_cert,
    issue,
    revoke,
    ring_store,
    set_quotas,
    unbind_cert,
    undeny_cert,
)
from service.wire import redis_failure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keys",
        default=os.environ.get("TALKINGHEAD_API_KEYS", ""),
        help="the key ring: a JSON file, or `redis` (default $TALKINGHEAD_API_KEYS)",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("TALKINGHEAD_REDIS_URL", ""), help="with --keys redis"
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("issue", help="make a key for a tenant; prints it once")
    p.add_argument("--tenant", required=True, help="the tenant the key acts as")
    p.add_argument("--role", choices=ROLES, default=USER, help="default %(default)s")
    p.add_argument("--note", default="", help="who or what the key is for")
    p = sub.add_parser("revoke", help="revoke a key by its id")
    p.add_argument("key_id", help="the key's id (`keys list`), not its secret")
    sub.add_parser("list", help="keys (never their secrets), bindings and quotas, as JSON")
    p = sub.add_parser("bind-cert", help="map a client certificate's common name to a tenant and role")
    p.add_argument("--common-name", required=True, help="the client certificate's subject CN")
    p.add_argument("--tenant", required=True, help="the tenant its calls act as")
    p.add_argument("--role", choices=ROLES, default=USER, help="default %(default)s")
    p = sub.add_parser(
        "unbind-cert",
        help="remove a common name's binding: the name is its own tenant again (with "
        "TALKINGHEAD_TLS_BOUND_CERTS_ONLY: refused)",
    )
    p.add_argument("--common-name", required=True, help="the client certificate's subject CN")
    p = sub.add_parser(
        "deny-cert",
        help="revoke client certificates of a common name, bound or not: its new calls are refused "
        "and its open streams end UNAUTHENTICATED within a second or two",
    )
    p.add_argument("common_name", help="the client certificate's subject CN")
    p = sub.add_parser("undeny-cert", help="accept a denied common name again")
    p.add_argument("common_name", help="the client certificate's subject CN")
    p = sub.add_parser("quota", help="set a tenant's quotas (0 = no limit beyond the server's)")
    p.add_argument("--tenant", required=True, help="the tenant whose quotas are set")
    for field in dataclasses.fields(Quotas):
        kind = float if field.type in (float, "float") else int
        p.add_argument(
            "--" + field.name.replace("_", "-"), type=quota_value(kind), help=f"default {field.default}"
        )


def quota_value(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type: a finite number >= 0 (argparse says what is wrong and exits 2)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = no limit), got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# action -> (the ring change, what a no-op says, what success says)
CERT_ACTIONS: dict[str, tuple[Callable[[dict[str, Any], str], bool], str, str]] = {
    "unbind-cert": (unbind_cert, "no binding for the common name", "unbound"),
    "deny-cert": (deny_cert, "already denied:", "denied"),
    "undeny-cert": (undeny_cert, "not denied:", "no longer denied:"),
}


def run(args: argparse.Namespace) -> int:
    if not args.keys:
        raise SystemExit("talkinghead keys: name the key ring with --keys or TALKINGHEAD_API_KEYS")
    try:
        store = ring_store(args.keys, args.redis_url)
        if args.action == "issue":
            key_id, token = store.update(lambda ring: issue(ring, args.tenant, args.role, args.note))
            print(
                f"issued key {key_id} for tenant {args.tenant} ({args.role}); it is shown only now:",
                file=sys.stderr,
            )
            print(token)
        elif args.action == "revoke":
            if not store.update(lambda ring: revoke(ring, args.key_id)):
                raise SystemExit(f"talkinghead keys: no active key {args.key_id!r}")
            print(f"revoked {args.key_id}", file=sys.stderr)
        elif args.action == "bind-cert":
            store.update(lambda ring: bind_cert(ring, args.common_name, args.tenant, args.role))
            print(f"bound {args.common_name} to tenant {args.tenant} ({args.role})", file=sys.stderr)
        elif args.action in CERT_ACTIONS:
            change, failed, done = CERT_ACTIONS[args.action]
            if not store.update(lambda ring: change(ring, args.common_name)):
                raise SystemExit(f"talkinghead keys: {failed} {args.common_name!r}")
            print(f"{done} {args.common_name}", file=sys.stderr)
        elif args.action == "quota":
            values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Quotas)}
            quotas = store.update(lambda ring: set_quotas(ring, args.tenant, **values))
            print(json.dumps(dataclasses.asdict(quotas)))
        else:
            print(json.dumps(_listing(store.load()), indent=1))
    except ValueError as error:
        raise SystemExit(f"talkinghead keys: {error}") from None
    except OSError as error:  # the key ring's file or folder (it was a traceback)
        why = f"{error.strerror}: {error.filename}" if error.strerror and error.filename else str(error)
        raise SystemExit(f"talkinghead keys: key ring {args.keys}: {why}") from None
    except Exception as error:
        if (failure := redis_failure("talkinghead keys", args.redis_url, error)) is None:
            raise
        raise SystemExit(failure) from None
    return 0


def _listing(ring: dict[str, Any]) -> dict[str, Any]:
    def when(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else ""

    keys = [
        {
            "key_id": key_id,
            "tenant": entry["tenant"],
            "role": entry["role"],
            "created": when(entry["created"]),
            "revoked": when(entry["revoked"]),
            "note": entry.get("note", ""),
        }
        for key_id, entry in sorted(ring["keys"].items(), key=lambda kv: kv[1]["created"])
    ]
    return {
        "keys": keys,
        "certs": ring["certs"],
        "denied_certs": {name: when(entry["denied"]) for name, entry in ring.get("denied_certs", {}).items()},
        "tenants": ring["tenants"],
    }
