"""Detect 68 facial landmarks (iBUG 300-W order) in images or in one video.

Writes a landmark sequence (`--out`, .npz) that `talkinghead` clients and tools replay, and
optionally the landmark drawings the networks see (`--draw`). The default dlib model is trained on
iBUG 300-W, licensed for non-commercial use only.

examples:
  talkinghead landmarks portrait.jpg --out portrait.npz --draw drawn/
  talkinghead landmarks talk.mp4 --every 2 --out talk.npz

The .npz holds:
  points       float32 (N, 68, 2)  pixel coordinates (x, y) in the source frames
  frame_size   int32 [width, height] (of the first frame when stills differ in size)
  frame_sizes  int32 (N, 2)        [width, height] of each frame
  frame_index  int32 (N,)          video frame number, or index of the image in the arguments
  sources      str (N,)            the file each row comes from, by its base name ("clip.mp4 (frame 3)")
  fps          float32             the video's frame rate / --every; 25 for stills (fps must be > 0)

A frame without a face is left out and reported ("no face found in ..."). Exit status 1 when an
image has no face, or when no frame of a video has one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facekit.detect import DETECTORS, FAN_WEIGHTS, LandmarkDetector, make_detector
from facekit.sequence import DEFAULT_FPS
from facekit.video import is_video, iter_video, read_image, video_info

_MAX_REPORTED = 20  # "no face" lines printed per input before summarising
Frames = Iterator[tuple[int, str, np.ndarray]]  # (index, description, RGB uint8 (H, W, 3))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, help="image files, or one video file")
    parser.add_argument("--detector", choices=sorted(DETECTORS), default="dlib", help="default: dlib")
    parser.add_argument(
        "--boxes",
        choices=("sfd", "dlib"),
        default="sfd",
        help=f"face-alignment only: boxes from S3FD (needs s3fd weights) or dlib (needs only {FAN_WEIGHTS})",
    )
    parser.add_argument("--out", type=Path, help="write the landmark sequence to this .npz file")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--draw", type=Path, metavar="DIR", help="write frame + landmark drawing PNGs here")
    parser.add_argument("--every", type=int, default=1, help="video: keep every Nth frame (default 1)")
    parser.add_argument("--max-frames", type=int, default=0, help="video: stop after N kept frames (0: all)")


@dataclass(kw_only=True)
class Found:
    """Landmarks of the frames that had a face."""

    points: list[np.ndarray]  # each (68, 2)
    sizes: list[tuple[int, int]]  # (width, height)
    indices: list[int]
    sources: list[str]
    missing: list[str]  # descriptions of frames without a face


def _detect_all(detector: LandmarkDetector, frames: Frames, draw: Path | None, video: bool) -> Found:
    """Largest face of every frame; with `draw`, also write `draw/<name>.png` for each face found."""
    found = Found(points=[], sizes=[], indices=[], sources=[], missing=[])
    for index, source, image in frames:
        faces = detector.detect(image)
        if not faces:
            found.missing.append(source)
            continue
        found.points.append(faces[0].points)
        found.sizes.append((image.shape[1], image.shape[0]))
        found.indices.append(index)
        found.sources.append(source)
        if draw is not None:
            name = f"{index:06d}" if video else f"{index:03d}_{Path(source).stem}"
            rgb = _drawing(image, faces[0].points)
            cv2.imwrite(str(draw / f"{name}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return found


def _drawing(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Frame with the landmark drawing over it, beside the drawing alone: uint8 (H, 2W, 3) RGB."""
    from facekit.rasterize import draw_landmarks

    h, w = image.shape[:2]
    lines = draw_landmarks(points, max(h, w))[:h, :w]  # (H, W, 3)
    over = np.where(lines.any(axis=2, keepdims=True), lines, image)
    return np.concatenate([over, lines], axis=1)


def _frames(inputs: list[Path], every: int, max_frames: int) -> tuple[Frames, float]:
    """(index, description, RGB frame) of every input, lazily, and the fps (DEFAULT_FPS for stills)."""
    if any(is_video(p) for p in inputs) and len(inputs) > 1:
        raise ValueError("give one video, or only images")
    for path in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
    if is_video(inputs[0]):
        video = inputs[0]
        fps = video_info(video).fps / every
        frames = enumerate(iter_video(video, every=every, max_frames=max_frames))
        return ((k * every, f"{video.name} (frame {k * every})", img) for k, img in frames), fps
    return ((i, p.name, read_image(p)) for i, p in enumerate(inputs)), DEFAULT_FPS


def _save(out: Path, found: Found, fps: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    sizes = np.array(found.sizes, np.int32).reshape(-1, 2)  # (N, 2)
    np.savez(
        out,
        points=np.array(found.points, np.float32).reshape(-1, 68, 2),
        frame_size=sizes[0] if len(sizes) else np.zeros(2, np.int32),
        frame_sizes=sizes,
        frame_index=np.array(found.indices, np.int32),
        sources=np.array(found.sources, dtype=str),
        fps=np.float32(fps),
    )


def _report(found: Found) -> None:
    for source in found.missing[:_MAX_REPORTED]:
        print(f"no face found in {source}", file=sys.stderr)
    if len(found.missing) > _MAX_REPORTED:
        print(f"... and {len(found.missing) - _MAX_REPORTED} more frames without a face", file=sys.stderr)
    total = len(found.points) + len(found.missing)
    print(f"faces found in {len(found.points)}/{total} frames")


def run(args: argparse.Namespace) -> int:
    import av

    if args.out is not None and args.out.suffix != ".npz":  # (numpy added it: "wrote seq" made seq.npz)
        print(f"talkinghead landmarks: --out {args.out}: name a .npz file", file=sys.stderr)
        return 2
    if args.out is not None and args.out.exists() and not args.overwrite:  # (replaced without a word)
        print(
            f"talkinghead landmarks: --out {args.out}: exists; pass --overwrite to replace it",
            file=sys.stderr,
        )
        return 2
    video = is_video(args.inputs[0])
    options = {"face_detector": args.boxes} if args.detector == "face-alignment" else {}
    try:
        frames, fps = _frames(args.inputs, args.every, args.max_frames)
        detector = make_detector(args.detector, **options)
        if args.draw is not None:
            args.draw.mkdir(parents=True, exist_ok=True)
        found = _detect_all(detector, frames, args.draw, video)
    except (ValueError, OSError, RuntimeError, av.FFmpegError) as err:
        print(f"talkinghead landmarks: {err}", file=sys.stderr)
        return 2
    _report(found)
    if args.out is not None and found.points:
        _save(args.out, found, fps)
        print(f"wrote {args.out}")
    return 1 if (not found.points if video else found.missing) else 0
