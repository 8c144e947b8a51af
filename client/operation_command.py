"""Personalisation operations on a running service: list them, show one, follow one, cancel one.

Start one with `talkinghead avatar personalise ID` (add --wait to follow it). Exit status: 1 when
the call fails, or when `get` or `watch` shows an operation that ended without its generator
(FAILED, or CANCELLED); else 0 (a cancel the service accepted too: a queued operation ends
CANCELLED, a running one stops soon).
`watch` says when the connection is lost and retries for --retry-for seconds (60), then gives up
(exit 1) naming the operation, which goes on without it; Ctrl-C stops watching (exit 130), not
the operation.

examples:
  talkinghead operation list                     # newest first; --avatar mona for one avatar's
  talkinghead operation get operations/1f2e3d4c5b6a7980
  talkinghead operation watch operations/1f2e3d4c5b6a7980     # progress bar until done
  talkinghead operation cancel operations/1f2e3d4c5b6a7980
"""

from __future__ import annotations

import argparse
import sys

import grpc

from client.arguments import add_server_arguments, connect, server_parent
from client.library import describe_error, operation_error
from client.progress import add_reconnect_argument, describe, follow_to_end


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    sub = parser.add_subparsers(dest="action", required=True)
    parent = server_parent()
    listing = sub.add_parser("list", parents=[parent], help="operations, newest first")
    listing.add_argument("--avatar", default="", help="only this avatar's")
    for action, text in (("get", "show one"), ("watch", "follow one until done"), ("cancel", "cancel one")):
        command = sub.add_parser(action, parents=[parent], help=text)
        command.add_argument("name", help="operations/<id>")
        if action == "watch":
            add_reconnect_argument(command)


def run(args: argparse.Namespace) -> int:
    prog = f"talkinghead operation {args.action}"
    try:
        with connect(args) as client:
            if args.action == "list":
                count = 0
                for operation in client.list_operations(avatar_id=args.avatar):
                    print(describe(operation))
                    count += 1
                print(f"{count} operation(s)")
                return 0
            if args.action == "watch":
                followed = follow_to_end(
                    client, args.name, prog=prog, retry_for=args.retry_for, gave_up="gave up watching"
                )
                if isinstance(followed, int):
                    return followed
                operation = followed
            elif args.action == "cancel":
                operation = client.cancel_operation(args.name)
            else:
                operation = client.get_operation(args.name)
            print(describe(operation))
            if args.action == "cancel":
                return 0
            return 1 if operation.done and operation_error(operation) else 0
    except grpc.RpcError as error:
        print(f"talkinghead operation {args.action}: {describe_error(error)}", file=sys.stderr)
        return 1
