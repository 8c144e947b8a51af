"""Check files for the invisible watermark and read their content credentials (C2PA).

For each image (PNG, JPEG, WebP) or video: whether this deployment's watermark is in it, its
32-bit payload (the hash of tenant and avatar the service marked it with) and a confidence; for a
video, the share of checked frames that carry it and the payload read from all of them together
("present in part" when fewer than half carry it but at least two read the same payload alone:
generated frames spliced into real footage). The confidence is 0 when the mark is absent.
Then the file's C2PA manifest, if any: who made it, the digital source type, the model id and
consent record id, the signer, and whether the signature is intact ("Valid") and vouched for by a
trust anchor ("Trusted", with --trust).

The key is the deployment's secret: --key, or better $TALKINGHEAD_WATERMARK_KEY (a flag shows in
process listings). Without one only the content credentials are read. Exit status: 0 when every
file was read, 2 when one could not be, its pixels or its content credentials (the others are
still reported; a damaged file that has content credentials is reported with them, its
watermark "not checked"; one whose credentials could not be read says why; a format that cannot
carry them - .mkv, .mpg, .webm - has none, exit 0). With --json a file that could not be
read at all is an object with its "path" and the "error".

The service marks the frames it renders, so `animate`'s video carries the mark, and so do its
contact sheet's tiles, though the sheet as a whole does not read as marked (verify reports the
mark absent there): cut a tile out to check it.

examples:
  TALKINGHEAD_WATERMARK_KEY=... talkinghead verify out/mona.mp4
  talkinghead verify frame.jpg --key "$SECRET" --json
  talkinghead verify out/mona.mp4 --trust ca.pem --max-frames 25
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from client.arguments import whole_number
from client.credentials import TRUST_ENV, ManifestReport, read_trust_anchors, trust_from_env
from client.outputs import reason
from client.verify import DEFAULT_MAX_FRAMES, FileReport, WatermarkReport, verify_file
from facekit.watermark import KEY_ENV, THRESHOLD, Watermarker, key_from_env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, help="images (PNG/JPEG/WebP) or videos")
    parser.add_argument("--key", help=f"the watermark key (default ${KEY_ENV})")
    parser.add_argument("--json", action="store_true", help="one JSON object per file, one per line")
    parser.add_argument(
        "--max-frames",
        type=whole_number(1),
        default=DEFAULT_MAX_FRAMES,
        help=f"check at most this many frames of a video, spread evenly (default {DEFAULT_MAX_FRAMES})",
    )
    parser.add_argument(
        "--trust", type=Path, help=f"PEM trust anchors for C2PA signers (default ${TRUST_ENV})"
    )


def _mark_lines(mark: WatermarkReport | None, kind: str, error: str | None = None) -> list[str]:
    if error is not None:
        return [f"  watermark: not checked: {error}"]
    if mark is None:
        return [f"  watermark: not checked (no key: --key or ${KEY_ENV})"]
    payload = "unreadable" if mark.payload is None else f"{mark.payload:08x}"
    odds = f"score {mark.score:.1f}" + (" (median)" if kind == "video" else "")
    if mark.partial:  # (the median is the unmarked frames')
        odds += f", confidence {mark.confidence:.6f} (from the frames that read the payload)"
    elif mark.present:
        odds += f", confidence {mark.confidence:.6f}"
    else:
        odds += f", below the threshold {THRESHOLD:g}"
    if kind == "video":
        counted = f"{mark.marked}/{mark.frames} frames marked ({mark.share:.0%})"
        if mark.marked:
            counted += f", payload {payload} ({mark.payload_frames} frames read it alone)"
        state = "present in part" if mark.partial else "present" if mark.present else "absent"
        return [f"  watermark: {state}: {counted}; {odds}"]
    state = f"present, payload {payload}" if mark.present else "absent"
    return [f"  watermark: {state}; {odds}"]


def _credential_lines(credentials: ManifestReport | None, error: str | None, note: str | None) -> list[str]:
    if error is not None:
        return [f"  content credentials: not read ({error})"]
    if credentials is None:
        return ["  content credentials: none" + (f" ({note})" if note else "")]
    signer = credentials.signer.get("common_name", "?") + f" (issuer {credentials.signer.get('issuer', '?')})"
    source = (
        "trained algorithmic media" if credentials.trained_algorithmic_media else "not declared synthetic"
    )
    generation = credentials.generation
    lines = [
        f"  content credentials: {credentials.state}, signed by {signer}",
        f"    made by {credentials.claim_generator}: {source}",
        f"    model id {generation.get('model_id') or '?'}, "
        f"consent record {generation.get('consent_record_id') or 'not recorded'}",
    ]
    if credentials.failures:
        lines.append(f"    validation failures: {', '.join(credentials.failures)}")
    return lines


def describe(report: FileReport) -> str:
    """The human-readable report of one file."""
    frames = (
        f", {report.watermark.frames} frames checked" if report.watermark and report.kind == "video" else ""
    )
    kind = "neither an image nor a video" if report.kind == "other" else report.kind
    lines = [f"{report.path} ({kind}{frames})"]
    lines += _mark_lines(report.watermark, report.kind, report.watermark_error)
    lines += _credential_lines(report.credentials, report.credentials_error, report.credentials_note)
    return "\n".join(lines)


def _trust(args: argparse.Namespace) -> bytes | None:
    """The trust anchors of --trust, else $TALKINGHEAD_C2PA_TRUST's file; ValueError naming which."""
    name = f"--trust {args.trust}" if args.trust else f"${TRUST_ENV}={os.environ.get(TRUST_ENV, '')}"
    try:
        return read_trust_anchors(args.trust) if args.trust else trust_from_env()
    except OSError as error:
        raise ValueError(f"{name}: {reason(error)}") from error
    except ValueError as error:
        raise ValueError(f"{name}: no PEM certificate in it") from error


def run(args: argparse.Namespace) -> int:
    key = args.key or key_from_env()
    try:
        trust = _trust(args)
        watermarker = Watermarker(key=key) if key else None
    except (OSError, ValueError) as error:
        print(f"talkinghead verify: {error}", file=sys.stderr)
        return 2
    status = 0
    for path in args.files:
        try:
            report = verify_file(
                path, key=None, watermarker=watermarker, max_frames=args.max_frames, trust_anchors=trust
            )
        except (OSError, ValueError) as error:
            print(f"talkinghead verify: {error}", file=sys.stderr)
            if args.json:  # (one object per file, as promised: this one says why it was not read)
                print(json.dumps({"path": str(path), "error": str(error)}), flush=True)
            status = 2
            continue
        print(json.dumps(report.to_json()) if args.json else describe(report), flush=True)
        if report.watermark_error is not None:  # its credentials were read, its pixels were not
            status = 2
        if report.credentials_error is not None:  # not "none": they could not be read
            status = 2
    return status
