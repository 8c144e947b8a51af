"""Animate an avatar on a running service with a driving video or landmark file; write a video.

The driver is a video (its frames are sent, the service finds the landmarks) or a landmark file
(.npz as written by `talkinghead landmarks`, format in facekit/sequence.py; a plain .npy (N, 68, 2)
needs --frame-size). Frames come back in order and are written to --out (H.264 via PyAV) at the
driver's frame rate; a progress bar runs meanwhile and the achieved frames per second are printed.

--relative transfers the driver's motion (relative to its first frame, which should be a neutral
face) onto the avatar's own face shape: use it whenever someone else drives the avatar.
--live sends at the driver's frame rate and lets the service drop frames it cannot keep up with
(as a live call would); by default every frame is rendered (offline). --paste-back returns the
avatar's whole source photo (up to 1024 px) with the face moving in it; --smooth filters the
driver's landmark jitter (One-Euro).

Provenance (client/provenance.py): with $TALKINGHEAD_WATERMARK_KEY set, the written video is checked
for the service's invisible watermark; with a signing certificate ($TALKINGHEAD_C2PA_CERT and
$TALKINGHEAD_C2PA_KEY, or --c2pa-cert/--c2pa-key) the video and contact sheet get C2PA content
credentials (model id, the avatar's consent record id); `talkinghead verify` reads both back.

example:
  talkinghead animate --avatar mona --driver facekit/assets/demo_driver.npz --out out/mona.mp4 \\
      --relative --contact-sheet out/mona.png
  talkinghead animate --avatar mona --driver talking.mp4 --out out/mona.mp4 --relative
  talkinghead animate --avatar mona --driver talking.mp4 --out out/mona.mp4 --relative --paste-back --smooth
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

from api.talkinghead.v1 import animation_pb2 as pb
from client.arguments import add_server_arguments, connect
from client.library import Frame, describe_error, image_requests, landmark_requests
from client.provenance import add_provenance_arguments, finish_outputs
from facekit.sequence import LandmarkSequence
from facekit.video import VideoWriter, contact_sheet, iter_video, read_video, save_png

SHEET_FRAMES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--avatar", required=True, help="avatar id")
    parser.add_argument("--driver", type=Path, required=True, help="video, .npz or .npy landmark file")
    parser.add_argument("--out", type=Path, required=True, help="output video (.mp4)")
    parser.add_argument("--contact-sheet", type=Path, help="also write a PNG: driving landmarks over frames")
    parser.add_argument(
        "--relative", action="store_true", help="keep the avatar's face shape (another driver)"
    )
    parser.add_argument(
        "--crop-to-face", action="store_true", help="absolute mode: crop around the driver's face"
    )
    parser.add_argument("--frame-size", help="WIDTHxHEIGHT of a .npy driver's frame, e.g. 256x256")
    parser.add_argument("--max-frames", type=int, default=0, help="drive at most this many frames (0 = all)")
    parser.add_argument(
        "--live", action="store_true", help="send at the driver's fps, drop what cannot be kept up"
    )
    parser.add_argument("--encoding", choices=("jpeg", "png", "raw"), default="jpeg", help="wire format")
    parser.add_argument(
        "--paste-back", action="store_true", help="the whole source photo moving, not the face crop"
    )
    parser.add_argument(
        "--smooth",
        type=float,
        nargs="?",
        const=1.0,
        metavar="HZ",
        help="One-Euro filter on the driver's landmarks (min cutoff, default 1.0 Hz) against jitter",
    )
    add_provenance_arguments(parser)


def _driver(args: argparse.Namespace) -> tuple[Iterator[pb.AnimateRequest], int, float]:
    """-> (requests, frame count, fps)."""
    path: Path = args.driver
    if path.suffix.lower() in (".npz", ".npy"):
        size = None
        if args.frame_size:
            width, _, height = args.frame_size.lower().partition("x")
            size = (int(width), int(height))
        seq = LandmarkSequence.load(path, frame_size=size)
        if args.max_frames:
            seq = LandmarkSequence(seq.points[: args.max_frames], seq.frame_size, seq.fps)
        return landmark_requests(seq, pace=args.live), len(seq), seq.fps
    _, fps = read_video(path, max_frames=1)
    count = sum(1 for _ in iter_video(path, max_frames=args.max_frames))
    return image_requests(iter_video(path, max_frames=args.max_frames)), count, fps


def _even(size: int) -> int:
    return size + size % 2


def run(args: argparse.Namespace) -> int:
    try:
        requests, total, fps = _driver(args)
    except (OSError, ValueError) as error:
        print(f"talkinghead animate: {error}", file=sys.stderr)
        return 2
    sheet = args.contact_sheet is not None
    picks = set(np.linspace(0, total - 1, SHEET_FRAMES).round().astype(int).tolist()) if sheet else set()
    kept: list[Frame] = []
    writer: VideoWriter | None = None
    received = dropped = 0
    started = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with connect(args) as client, tqdm(total=total, unit="frame") as bar:
            if not args.consent_record:  # the manifest names the avatar's own record
                args.consent_record = client.get_avatar(args.avatar).consent.record_id or None
            frames = client.animate(
                args.avatar,
                requests,
                encoding=args.encoding,
                overflow="drop-oldest" if args.live else "block",
                motion="relative" if args.relative else "absolute",
                queue_depth=16 if not args.live else 0,
                crop_to_face=args.crop_to_face,
                include_landmark_image=sheet,
                paste_back=args.paste_back,
                smoothing=args.smooth,
            )
            for frame in frames:
                height, width = frame.image.shape[:2]
                if writer is None:
                    writer = VideoWriter(args.out, fps=fps, size=(_even(width), _even(height)))
                image = frame.image
                if height % 2 or width % 2:
                    image = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)))
                writer.write(image)
                if frame.sequence in picks:
                    kept.append(frame)
                received += 1
                dropped += frame.dropped_before
                bar.update(1 + frame.dropped_before)
    except grpc.RpcError as error:
        print(f"talkinghead animate: {describe_error(error)}", file=sys.stderr)
        return 1
    finally:
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - started
    print(
        f"{received} frames in {elapsed:.1f} s: {received / max(elapsed, 1e-9):.1f} fps"
        + (f", {dropped} dropped" if dropped else "")
        + f"; wrote {args.out}"
    )
    if sheet and kept:
        rows = [[f.landmark_image for f in kept if f.landmark_image is not None], [f.image for f in kept]]
        save_png(
            args.contact_sheet,
            contact_sheet(rows, labels=["driving", "generated"], cell=min(max(kept[0].image.shape[:2]), 256)),
        )
        print(f"wrote {args.contact_sheet}")
    written = ([args.out] if writer is not None else []) + ([args.contact_sheet] if sheet and kept else [])
    return finish_outputs(
        args, model_id=client.last_started.model_id if client.last_started else "", paths=written
    )
