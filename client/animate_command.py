"""Animate an avatar on a running service with a driving video or landmark file; write a video.

The driver is a video (its frames are sent, the service finds the landmarks) or a landmark file
(.npz as written by `talkinghead landmarks`, format in facekit/sequence.py; a plain .npy (N, 68, 2)
needs --frame-size, and holds no frame rate: --fps, default 25). Frames come back in order and
are written to --out (H.264 via PyAV; .mp4, .mov, .m4v, .mkv, .avi, .mpg or .mpeg) at the
driver's frame rate; a progress bar runs meanwhile and the achieved frames per second are printed.

--out and --contact-sheet are written whole or not at all: the frames go to a hidden file beside
--out (.NAME.partial-HOST-PID.EXT), signed there when signing is configured, and renamed onto it once
the stream has ended well. An error of the service (or a lost connection), a failed signing,
Ctrl-C or SIGTERM removes it (and the folders made for it) and says "nothing written"; what a
SIGKILL leaves, the next run writing the same --out removes. A file
already at --out or --contact-sheet is refused unless --overwrite (it is then replaced only by a
complete output), and an output that is the driver is always refused. Paths, the driver and the
signing certificate (a trial signature) are checked before the service is called. Exit status: 0
done, 1 the service, a write or the signing failed, 2 a bad argument or input file, 130
interrupted, 143 terminated (SIGTERM).

--relative transfers the driver's motion (relative to its first frame, which should be a neutral
face) onto the avatar's own face shape: use it whenever someone else drives the avatar.
--live sends at the driver's frame rate (a video's frames too), reserving that rate of the service's
live capacity (StreamConfig.expected_fps), and lets the service drop frames it cannot keep up with
(as a live call would); the video keeps the driver's timing (each frame at its
driver frame's time, shown until the next that came back), so it lasts as long as the driver. By
default every frame is rendered (offline). --paste-back returns the avatar's whole source photo
(up to 1024 px) with the face moving in it; --smooth filters the driver's landmark jitter
(One-Euro; HZ 0.01-30, default 1.0; 0 = off).

Provenance (client/provenance.py): with $TALKINGHEAD_WATERMARK_KEY set, the written video is checked
for the service's invisible watermark; with a signing certificate ($TALKINGHEAD_C2PA_CERT and
$TALKINGHEAD_C2PA_KEY, or --c2pa-cert/--c2pa-key) the video and contact sheet get C2PA content
credentials (model id, the avatar's consent record id); `talkinghead verify` reads both back.

examples:
  talkinghead animate --avatar mona --driver facekit/assets/demo_driver.npz --out out/mona.mp4 \\
      --relative --contact-sheet out/mona.png
  talkinghead animate --avatar mona --driver facekit/assets/demo_driver.npz --out out/mona.mp4 \\
      --relative --overwrite                  # again, replacing out/mona.mp4
  talkinghead animate --avatar mona --driver talking.mp4 --out out/mona.mp4 --relative
  talkinghead animate --avatar mona --driver talking.mp4 --out out/mona.mp4 --relative --paste-back --smooth
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import av
import grpc
import numpy as np
from tqdm import tqdm

from api.talkinghead.v1 import animation_pb2 as pb
from client.arguments import add_server_arguments, connect, whole_number
from client.credentials import SigningCredentials, mime_type
from client.library import MAX_EXPECTED_FPS, Frame, describe_error, image_requests, landmark_requests
from client.outputs import PendingFile, Terminated, terminate_raises
from client.provenance import add_provenance_arguments, finish_outputs, signing_credentials
from facekit.sequence import DEFAULT_FPS, LandmarkSequence
from facekit.video import VideoWriter, check_writable, contact_sheet, iter_video, read_video, save_png

SHEET_FRAMES = 8


def _frame_size(text: str) -> tuple[int, int]:
    """--frame-size: WIDTHxHEIGHT, both > 0."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text, flags=re.ASCII)
    if match is None or min(int(match[1]), int(match[2])) <= 0:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 256x256, got {text!r}")
    return int(match[1]), int(match[2])


def _fps(text: str) -> float:
    """--fps: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected frames per second, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _smoothing(text: str) -> float:
    """--smooth HZ: 0 (off) or 0.01-30, the range the service takes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of Hz, got {text!r}") from None
    if not math.isfinite(value) or not (value == 0 or 0.01 <= value <= 30):
        raise argparse.ArgumentTypeError(f"must be 0.01-30 Hz (or 0: off), got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--avatar", required=True, help="avatar id")
    parser.add_argument("--driver", type=Path, required=True, help="video, .npz or .npy landmark file")
    parser.add_argument("--out", type=Path, required=True, help="output video (.mp4)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out and --contact-sheet when they exist"
    )
    parser.add_argument(
        "--contact-sheet", type=Path, help="also write a PNG (.png): driving landmarks over frames"
    )
    motion = parser.add_mutually_exclusive_group()  # the service refuses the two together
    motion.add_argument(
        "--relative", action="store_true", help="keep the avatar's face shape (another driver)"
    )
    motion.add_argument(
        "--crop-to-face", action="store_true", help="absolute mode: crop around the driver's face"
    )
    parser.add_argument(
        "--frame-size", type=_frame_size, help="WIDTHxHEIGHT of a .npy driver's frame, e.g. 256x256"
    )
    parser.add_argument(
        "--fps",
        type=_fps,
        help=f"frames per second of a .npy driver (it holds none; default {DEFAULT_FPS:g})",
    )
    parser.add_argument(
        "--max-frames",
        type=whole_number(0, " (0 = all)"),
        default=0,
        help="drive at most this many frames (0 = all)",
    )
    parser.add_argument(
        "--live", action="store_true", help="send at the driver's fps, drop what cannot be kept up"
    )
    parser.add_argument("--encoding", choices=("jpeg", "png", "raw"), default="jpeg", help="wire format")
    parser.add_argument(
        "--paste-back", action="store_true", help="the whole source photo moving, not the face crop"
    )
    parser.add_argument(
        "--smooth",
        type=_smoothing,
        nargs="?",
        const=1.0,
        metavar="HZ",
        help="One-Euro filter on the driver's landmarks against jitter: min cutoff 0.01-30 Hz "
        "(without HZ: 1.0; 0: off)",
    )
    add_provenance_arguments(parser)


def _driver(args: argparse.Namespace) -> tuple[Iterator[pb.AnimateRequest], int, float]:
    """-> (requests, frame count, fps)."""
    path: Path = args.driver
    if args.fps is not None and path.suffix.lower() != ".npy":
        raise ValueError(f"--fps is for a .npy driver; {path} states its own frame rate")
    if path.suffix.lower() in (".npz", ".npy"):
        if path.suffix.lower() == ".npy" and args.frame_size is None and path.is_file():
            raise ValueError(f"{path}: a .npy file holds no frame size; pass --frame-size WIDTHxHEIGHT")
        seq = LandmarkSequence.load(path, frame_size=args.frame_size, fps=args.fps)
        if args.max_frames:
            seq = LandmarkSequence(seq.points[: args.max_frames], seq.frame_size, seq.fps)
        return landmark_requests(seq, pace=args.live), len(seq), seq.fps
    _, fps = read_video(path, max_frames=1)
    count = sum(1 for _ in iter_video(path, max_frames=args.max_frames))
    frames = iter_video(path, max_frames=args.max_frames)
    return image_requests(frames, fps=fps if args.live else None), count, fps


def _even(size: int) -> int:
    return size + size % 2


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: links, symlinks and `..` (also after a folder not made yet)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _exists(path: Path) -> bool:
    """Whether anything is at `path` (a dangling symlink too; `..` after a folder not made yet)."""
    return os.path.lexists(path) or os.path.lexists(path.resolve())


def _check_outputs(args: argparse.Namespace, signing: SigningCredentials | None) -> None:
    """ValueError for an output the writers (or the C2PA signer) cannot make, or must not replace
    (an input; an existing file without --overwrite), found before any work."""
    sheet: Path | None = args.contact_sheet
    inputs = [("the driver", args.driver)]
    inputs += [
        (f"{flag} file", path)
        for flag, path in (("--c2pa-cert", args.c2pa_cert), ("--c2pa-key", args.c2pa_key))
    ]
    for flag, path in (("--out", args.out), ("--contact-sheet", sheet)):
        if path is None:
            continue
        if path.is_dir():
            raise ValueError(f"{flag} {path}: is a directory")
        for what, source in inputs:
            if source is not None and _same_file(path, source):
                raise ValueError(f"{flag} {path}: is {what} ({source}); write the output elsewhere")
        if not args.overwrite and _exists(path):
            raise ValueError(f"{flag} {path}: exists; pass --overwrite to replace it")
    check_writable(args.out)
    if sheet is not None and sheet.suffix.lower() != ".png":
        raise ValueError(f"--contact-sheet {sheet}: the contact sheet is a PNG; name it .png")
    if signing is not None:
        for path in (args.out, *([sheet] if sheet is not None else [])):
            mime_type(path)


def run(args: argparse.Namespace) -> int:
    with terminate_raises(), contextlib.ExitStack() as stack:
        try:
            signing = signing_credentials(args, trial=True)
            _check_outputs(args, signing)
            video = stack.enter_context(PendingFile(args.out, flag="--out", overwrite=args.overwrite))
            sheet = None
            if args.contact_sheet is not None:
                sheet = stack.enter_context(
                    PendingFile(args.contact_sheet, flag="--contact-sheet", overwrite=args.overwrite)
                )
            requests, total, fps = _driver(args)
        except (OSError, ValueError) as error:
            print(f"talkinghead animate: {error}", file=sys.stderr)
            return 2
        return _animate(args, requests, total, fps, video, sheet)


def _animate(
    args: argparse.Namespace,
    requests: Iterator[pb.AnimateRequest],
    total: int,
    fps: float,
    video: PendingFile,
    sheet: PendingFile | None,
) -> int:
    picks = set(np.linspace(0, total - 1, SHEET_FRAMES).round().astype(int).tolist()) if sheet else set()
    kept: list[Frame] = []
    writer: VideoWriter | None = None
    received = dropped = 0
    started = time.perf_counter()
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
                include_landmark_image=sheet is not None,
                paste_back=args.paste_back,
                smoothing=args.smooth,
                # what a live stream reserves of the server's capacity: the driver's own rate
                expected_fps=min(max(fps, 1.0), MAX_EXPECTED_FPS) if args.live else 0.0,
            )
            with contextlib.closing(frames):  # ends the stream (and its request thread) on any exit
                for frame in frames:
                    height, width = frame.image.shape[:2]
                    if writer is None:
                        writer = VideoWriter(video.partial, fps=fps, size=(_even(width), _even(height)))
                    image = frame.image
                    if height % 2 or width % 2:
                        image = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)))
                    # At the driver frame's time (the sequence number is its index), so frames the
                    # service dropped (--live) leave the one before on screen and the timing true.
                    # The first frame starts the video, whichever driver frame it answers.
                    writer.write(image, pts=frame.sequence if writer.frames_written else 0)
                    if frame.sequence in picks:
                        kept.append(frame)
                    received += 1
                    dropped += frame.dropped_before
                    bar.update(1 + frame.dropped_before)
            model_id = client.last_started.model_id if client.last_started else ""
        if writer is None:
            raise ValueError("the service sent no frames")
        writer.close()
        outputs = [video]
        if sheet is not None and kept:
            rows = [[f.landmark_image for f in kept if f.landmark_image is not None], [f.image for f in kept]]
            cell = min(max(kept[0].image.shape[:2]), 256)
            save_png(sheet.partial, contact_sheet(rows, labels=["driving", "generated"], cell=cell))
            outputs.append(sheet)
        # Checked and signed while still partial files: a signing that fails leaves the files that
        # were at --out and --contact-sheet as they were.
        status = finish_outputs(
            args, model_id=model_id, paths=[o.partial for o in outputs], names=[o.path for o in outputs]
        )
        if status:
            return _failed(args, "", received, total, status=status)
        for output in outputs:
            output.commit()
    except grpc.RpcError as error:
        return _failed(args, describe_error(error), received, total, status=1)
    except Terminated:
        return _failed(args, "terminated", received, total, status=143)
    except KeyboardInterrupt:
        return _failed(args, "interrupted", received, total, status=130)
    except (OSError, ValueError, av.FFmpegError) as error:
        return _failed(args, str(error), received, total, status=1)
    finally:
        if writer is not None:
            with contextlib.suppress(Exception):  # already closed, or abandoned with its file
                writer.close()
    elapsed = time.perf_counter() - started
    print(
        f"{received} frames in {elapsed:.1f} s: {received / max(elapsed, 1e-9):.1f} fps"
        + (f", {dropped} dropped (the frame before each stays on screen)" if dropped else "")
        + f"; wrote {args.out}"
    )
    if sheet is not None and kept:
        print(f"wrote {args.contact_sheet}")
    elif sheet is not None:
        print(
            f"no contact sheet: none of the frames picked for {args.contact_sheet} came back", file=sys.stderr
        )
    return 0


def _failed(args: argparse.Namespace, why: str, received: int, total: int, *, status: int) -> int:
    """Say what went wrong (`why`: "" when already said), how far the stream got, and that no
    output was written."""
    targets = f"{args.out}" + (f" or {args.contact_sheet}" if args.contact_sheet is not None else "")
    print(
        f"talkinghead animate: {why + ' ' if why else ''}({received} of {total} frames received); "
        f"nothing written to {targets}",
        file=sys.stderr,
    )
    return status
