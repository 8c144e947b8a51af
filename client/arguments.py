"""Command-line arguments every client command shares: where the service is and how to reach it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from client.library import DEFAULT_SERVER, Client


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("TALKINGHEAD_SERVER", DEFAULT_SERVER),
        help="service address host:port (default $TALKINGHEAD_SERVER or 127.0.0.1:50051)",
    )
    parser.add_argument("--tls-ca", type=Path, help="PEM root certificate: connect with TLS")


def connect(args: argparse.Namespace) -> Client:
    """A client for the service the parsed `add_server_arguments` flags name."""
    return Client(target=args.server, tls_ca=args.tls_ca)
