"""Command-line arguments every client command shares: where the service is and how to reach it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from client.library import DEFAULT_SERVER, Client, check_api_key
from client.outputs import reason
from facekit.arguments import whole_number as whole_number  # (the client's commands import it here)


def add_server_arguments(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """The connection flags. `defaults=False` adds them to a subcommand as well, so they may follow
    the action (`avatar list --server ...`) without resetting what was given before it."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--server",
        default=default(os.environ.get("TALKINGHEAD_SERVER", "").strip() or DEFAULT_SERVER),
        help="service address host:port (default $TALKINGHEAD_SERVER, unset or empty: 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--tls-ca", type=Path, default=default(None), help="PEM root certificate: connect with TLS"
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=default(None),
        help="PEM client certificate (mTLS, with --tls-key): TLS, the server verified with --tls-ca or "
        "the system's roots",
    )
    parser.add_argument("--tls-key", type=Path, default=default(None), help="PEM private key of --tls-cert")
    parser.add_argument(
        "--api-key-file",
        type=Path,
        default=default(None),
        help="file holding the API key (default: $TALKINGHEAD_API_KEY, which holds the key itself)",
    )
    parser.add_argument(
        "--tenant", default=default(None), help="the tenant an admin key acts for (x-talkinghead-tenant)"
    )
    if defaults:
        parser.set_defaults(prog=parser.prog)  # "talkinghead avatar": how connect's errors begin


def server_parent() -> argparse.ArgumentParser:
    """A parent parser for subcommands: the connection flags, accepted after the action too."""
    parent = argparse.ArgumentParser(add_help=False)
    add_server_arguments(parent, defaults=False)
    return parent


def _read(args: argparse.Namespace, flag: str) -> bytes | None:
    """The file a connection flag names (None when not given); SystemExit(2), saying why, when it
    cannot be read."""
    path: Path | None = getattr(args, flag.removeprefix("--").replace("-", "_"))
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        print(f"{getattr(args, 'prog', 'talkinghead')}: {flag} {path}: {reason(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def _fail(args: argparse.Namespace, message: str) -> NoReturn:
    print(f"{getattr(args, 'prog', 'talkinghead')}: {message}", file=sys.stderr)
    raise SystemExit(2)


def connect(args: argparse.Namespace) -> Client:
    """A client for the service the parsed `add_server_arguments` flags name (SystemExit(2), saying
    why, when a file they name cannot be read, a client certificate comes without its key or the
    reverse, or the API key is not printable ASCII)."""
    for flag in ("--tls-ca", "--tls-cert", "--tls-key"):
        _read(args, flag)
    if (args.tls_cert is None) != (args.tls_key is None):
        given, missing = ("--tls-cert", "--tls-key") if args.tls_key is None else ("--tls-key", "--tls-cert")
        _fail(args, f"{given} needs {missing}: a client certificate and its key come together")
    key_file = _read(args, "--api-key-file")
    if key_file is not None:
        key, source = key_file.decode(errors="replace").strip(), f"--api-key-file {args.api_key_file}"
    else:
        key, source = os.environ.get("TALKINGHEAD_API_KEY", "").strip(), "$TALKINGHEAD_API_KEY"
    if key:
        try:
            check_api_key(key)
        except ValueError as error:
            _fail(args, f"{source}: {error}")
    try:
        return Client(
            target=args.server,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            api_key=key or None,
            tenant=args.tenant,
        )
    except ValueError as error:
        _fail(args, str(error))
