"""Manage avatars on a running service: create from photos, list, show, delete, personalise.

examples:
  talkinghead avatar create mona mona1.jpg --name "Mona Lisa" --subject "Mona Lisa (Leonardo)" \\
      --basis public-domain --source https://collections.louvre.fr/ark:/53355/cl010062370 \\
      --collected-by studio@example.com
  talkinghead avatar create ada ada.jpg --subject "Ada Example" --basis personal \\
      --statement-version 2026-11 --document ada-consent-signed.pdf --collected-by hr@example.com
  talkinghead avatar list
  talkinghead avatar get mona --preview mona_crop.png   # --overwrite: replace the file if it is there
  talkinghead avatar personalise mona --wait          # fine-tune its own generator, with a progress bar
                                                      # (--retry-for 60: how long a lost server is retried)
  talkinghead avatar personalise mona --preset fast   # or --steps 300; returns the operation's name
  talkinghead avatar delete mona
  talkinghead avatar --server host:50051 list        # default 127.0.0.1:50051 ($TALKINGHEAD_SERVER)
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import grpc

from api.talkinghead.v1 import avatar_pb2
from client.arguments import add_server_arguments, connect, server_parent
from client.library import BASES, PRESETS, Client, consent_record, describe_error, operation_error
from client.outputs import PendingFile
from client.progress import add_reconnect_argument, describe, follow_to_end


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    sub = parser.add_subparsers(dest="action", required=True)
    parent = server_parent()
    create = sub.add_parser("create", parents=[parent], help="make an avatar from 1-32 photos of one person")
    create.add_argument("avatar_id", help="1-63 characters of a-z 0-9 _ - (starts with a letter or digit)")
    create.add_argument("photos", type=Path, nargs="+", help="JPEG, PNG or WebP files")
    create.add_argument("--name", default="", help="display name")
    create.add_argument("--replace", action="store_true", help="replace an existing avatar with this id")
    consent = create.add_argument_group("consent record (required: on whose authority the face is animated)")
    consent.add_argument(
        "--subject", required=True, help="who the photos depict (name, or artwork and author)"
    )
    consent.add_argument("--basis", required=True, choices=list(BASES), help="the legal ground")
    consent.add_argument("--statement-version", default="", help="personal: the consent statement's version")
    consent.add_argument(
        "--document", type=Path, help="personal: the signed statement (only its SHA-256 is sent)"
    )
    consent.add_argument("--source", default="", help="public-domain, licensed: where the work comes from")
    consent.add_argument("--collected-by", required=True, help="who collected the record")
    consent.add_argument(
        "--collected-at",
        type=datetime.datetime.fromisoformat,
        help="when it was collected, ISO 8601 (default: now)",
    )
    sub.add_parser("list", parents=[parent], help="list every avatar")
    get = sub.add_parser("get", parents=[parent], help="show one avatar")
    get.add_argument("avatar_id", help="the avatar's id")
    get.add_argument("--preview", type=Path, help="write the face crop the model sees to this PNG")
    get.add_argument("--overwrite", action="store_true", help="replace --preview when it exists")
    delete = sub.add_parser("delete", parents=[parent], help="delete an avatar")
    delete.add_argument("avatar_id", help="the avatar's id")
    tune = sub.add_parser(
        "personalise", parents=[parent], help="fine-tune the avatar's own generator (an operation)"
    )
    tune.add_argument("avatar_id", help="the avatar's id")
    amount = tune.add_mutually_exclusive_group()
    amount.add_argument("--steps", type=int, help="fine-tuning steps, 1-2000 (default: the preset's)")
    amount.add_argument(
        "--preset", choices=list(PRESETS), default="", help="fast | balanced (default) | best"
    )
    tune.add_argument("--wait", action="store_true", help="follow it with a progress bar until it is done")
    add_reconnect_argument(tune)


def _when(avatar: avatar_pb2.Avatar) -> str:
    return avatar.create_time.ToDatetime(tzinfo=datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _show(avatar: avatar_pb2.Avatar) -> None:
    kind = "personalised generator" if avatar.personalised else "shared generator"
    name = f" ({avatar.display_name})" if avatar.display_name else ""
    print(
        f"{avatar.avatar_id}{name}: {avatar.image_count} photo(s), {avatar.image_size} px, {kind}, "
        f"model {avatar.model_id}, created {_when(avatar)}"
    )
    if avatar.consent.record_id:
        c = avatar.consent
        ground = c.source or f"statement {c.statement_version}, document sha256 {c.document_sha256[:12]}..."
        basis = avatar_pb2.ConsentBasis.Name(c.basis).removeprefix("CONSENT_BASIS_").lower()
        print(f"  consent {c.record_id}: {c.subject}; {basis} ({ground}); collected by {c.collected_by}")
    for report in avatar.images:
        found = "landmarks given" if report.landmarks_supplied else f"{report.faces_found} face(s)"
        print(f"  image {report.index}: {report.width}x{report.height}, {found}, crop {report.crop_side} px")
        for warning in report.warnings:
            print(f"    warning: {warning}")


def _personalise(client: Client, args: argparse.Namespace) -> int:
    prog = "talkinghead avatar personalise"
    operation = client.personalise(args.avatar_id, steps=args.steps, preset=args.preset)
    if not args.wait:
        print(describe(operation))
        print(f"follow it: talkinghead operation watch {operation.name}")
        return 0
    print(describe(operation), flush=True)  # named at once: a wait cut short must not lose it
    followed = follow_to_end(
        client, operation.name, prog=prog, retry_for=args.retry_for, gave_up="gave up waiting", known=True
    )
    if isinstance(followed, int):
        return followed
    operation = followed
    print(describe(operation))
    failure = operation_error(operation)
    if failure:
        print(f"{prog}: {failure}", file=sys.stderr)
        return 1
    return 0


def _missing(path: Path) -> str | None:
    """Why `path` is not a file to read ("no such file", "is a directory"), or None."""
    if path.is_dir():
        return "is a directory"
    return None if path.is_file() else "no such file"


def _consent_flags(args: argparse.Namespace) -> str | None:
    """What the consent flags lack or have too many of for --basis (the server would refuse the
    record naming its proto fields), or None."""
    if args.basis == "personal":
        lacking = [
            flag
            for flag, value in (
                ("--statement-version", args.statement_version),
                ("--document", args.document),
            )
            if not value
        ]
        if lacking:
            return f"--basis personal needs {' and '.join(lacking)} (the signed consent statement)"
        if args.source:
            return "--source is for --basis public-domain and licensed, not personal"
        return None
    if not args.source.strip():
        return f"--basis {args.basis} needs --source (where the work comes from)"
    if args.statement_version or args.document is not None:
        return f"--statement-version and --document are for --basis personal, not {args.basis}"
    return None


def run(args: argparse.Namespace) -> int:
    if args.action == "create" and (why := _consent_flags(args)):
        print(f"talkinghead avatar create: {why}", file=sys.stderr)
        return 2
    preview: PendingFile | None = None
    if args.action == "get" and args.preview is not None:
        if args.preview.suffix.lower() != ".png":
            print(
                f"talkinghead avatar get: --preview {args.preview}: the preview is a PNG; name it .png",
                file=sys.stderr,
            )
            return 2
        try:
            preview = PendingFile(args.preview, flag="--preview", overwrite=args.overwrite)
        except ValueError as error:
            print(f"talkinghead avatar get: {error}", file=sys.stderr)
            return 2
    try:
        return _run(args, preview)
    finally:
        if preview is not None:
            preview.discard()


def _run(args: argparse.Namespace, preview: PendingFile | None) -> int:
    try:
        with connect(args) as client:
            if args.action == "create":
                for path in [*args.photos, *([args.document] if args.document is not None else [])]:
                    why = _missing(path)
                    if why:
                        print(f"talkinghead avatar: {path}: {why}", file=sys.stderr)
                        return 2
                when = args.collected_at
                if when is not None and when.tzinfo is None:
                    when = when.replace(tzinfo=datetime.UTC)
                record = consent_record(
                    subject=args.subject,
                    basis=args.basis,
                    collected_by=args.collected_by,
                    statement_version=args.statement_version,
                    document=args.document,
                    source=args.source,
                    collect_time=when.timestamp() if when is not None else None,
                )
                _show(
                    client.create_avatar(
                        args.avatar_id,
                        args.photos,
                        consent=record,
                        display_name=args.name,
                        replace=args.replace,
                    )
                )
            elif args.action == "list":
                count = 0
                for avatar in client.list_avatars():
                    marker = " *personalised" if avatar.personalised else ""
                    print(
                        f"{avatar.avatar_id:<24} {avatar.image_count:>2} photo(s)  {_when(avatar)}  "
                        f"{avatar.display_name}{marker}"
                    )
                    count += 1
                print(f"{count} avatar(s)")
            elif args.action == "get":
                avatar = client.get_avatar(args.avatar_id, include_preview=preview is not None)
                _show(avatar)
                if preview is not None:
                    try:
                        preview.write_bytes(avatar.preview_png)
                    except ValueError as error:
                        print(f"talkinghead avatar get: {error}", file=sys.stderr)
                        return 1
                    print(f"wrote {args.preview}")
            elif args.action == "personalise":
                return _personalise(client, args)
            else:
                client.delete_avatar(args.avatar_id)
                print(f"deleted {args.avatar_id}")
    except grpc.RpcError as error:
        print(f"talkinghead avatar {args.action}: {describe_error(error)}", file=sys.stderr)
        return 1
    return 0
