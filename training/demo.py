"""The demo, run with the model directly: fine-tune on one portrait, drive it, write a video.

Fine-tunes the committed meta-learned model on the portrait (T = 1), transfers the driving
landmarks' motion onto the portrait's own face shape (facekit.motion.transfer_motion), generates a
frame per driving frame and writes <out>/demo.mp4 (driving landmarks | generated face), a PNG
contact sheet and the personalised checkpoint.

example:
  python -m training.demo --portrait facekit/assets/demo_portrait.png \\
      --driver facekit/assets/demo_driver.npz --out out/demo-direct
  make demo-direct PORTRAIT=me.jpg DRIVER=talking.mp4     # a video or a landmark file drives it
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import cv2
import numpy as np

from facekit.arguments import whole_number
from facekit.detect import make_detector
from facekit.motion import transfer_motion
from facekit.sequence import LandmarkSequence
from facekit.video import VideoWriter, contact_sheet, read_image, read_video, save_png
from training import checkpoint
from training.finetune import generate, personalise, prepare_images
from training.runtime import setup_logging

log = logging.getLogger("talkinghead.demo")
VIDEO_SCALE = 2  # small models generate 128 px; the video shows them at 2x


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=Path("models/talkinghead-small.pt"))
    parser.add_argument("--portrait", type=Path, required=True, help="photo or painting of one face")
    parser.add_argument("--driver", type=Path, required=True, help="landmark file (.npz/.npy) or video")
    parser.add_argument("--steps", type=whole_number(1), help="fine-tuning steps (default: the config's)")
    parser.add_argument(
        "--max-frames", type=whole_number(0), default=0, help="drive at most this many frames (0: all)"
    )
    parser.add_argument("--out", type=Path, default=Path("out/demo-direct"))


def load_driver(path: Path, max_frames: int) -> LandmarkSequence:
    if path.suffix.lower() in (".npz", ".npy"):
        seq = LandmarkSequence.load(path)
        return seq if not max_frames else LandmarkSequence(seq.points[:max_frames], seq.frame_size, seq.fps)
    frames, fps = read_video(path, max_frames=max_frames)
    detector = make_detector("dlib")
    points, kept = [], 0
    for frame in frames:
        faces = detector.detect(frame)
        if faces:
            points.append(faces[0].points)
            kept += 1
        elif points:  # hold the last pose through a missed detection
            points.append(points[-1])
    if not points:
        raise ValueError(f"no face found in any frame of {path}")
    log.info("driver %s: landmarks in %d of %d frames", path, kept, len(frames))
    h, w = frames[0].shape[:2]
    return LandmarkSequence(np.stack(points), (w, h), fps)


def run(args: argparse.Namespace) -> int:
    setup_logging()
    try:  # every input read and checked before the fine-tuning, each fault in one line
        meta = checkpoint.load_meta(args.checkpoint, "the demo")
        size = checkpoint.config_of(meta).model.image_size
        portrait = read_image(args.portrait)
        frames, points = prepare_images([portrait], [str(args.portrait)], make_detector("dlib"), size)
        driver = load_driver(args.driver, args.max_frames)
    except (ValueError, OSError) as error:
        raise SystemExit(f"python -m training.demo: {error}") from None
    started = time.monotonic()
    personal = personalise(
        meta,
        frames,
        points,
        avatar="demo",
        steps=args.steps,
        on_step=lambda s, losses: log.info("fine-tune step %d g_total=%.3f", s, losses["g_total"]),
    )
    log.info("fine-tuned on %s in %.0f s", args.portrait, time.monotonic() - started)
    driven = transfer_motion(driver.points, points[0])  # (N, 68, 2) in the portrait's crop
    started = time.monotonic()
    drawn, generated = generate(personal, driven)
    log.info("generated %d frames in %.1f s", len(generated), time.monotonic() - started)
    write_outputs(args.out, frames[0], drawn, generated, driver.fps, personal)
    return 0


def write_outputs(
    out: Path, portrait: np.ndarray, drawn: np.ndarray, generated: np.ndarray, fps: float, personal: dict
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    s = generated.shape[1] * VIDEO_SCALE
    up = lambda im: cv2.resize(im, (s, s), interpolation=cv2.INTER_CUBIC)  # noqa: E731
    with VideoWriter(out / "demo.mp4", fps=fps, size=(3 * s, s)) as video:
        for lmk, frame in zip(drawn, generated, strict=False):
            video.write(np.concatenate([up(portrait), up(lmk), up(frame)], axis=1))
    picks = np.linspace(0, len(generated) - 1, 8).round().astype(int)
    sheet = contact_sheet(
        [[portrait], [drawn[i] for i in picks], [generated[i] for i in picks]],
        labels=["portrait", "driving", "generated"],
        cell=generated.shape[1],
    )
    save_png(out / "contact_sheet.png", sheet)
    checkpoint.save(out / "avatar.pt", personal)
    log.info("wrote %s, %s and %s", out / "demo.mp4", out / "contact_sheet.png", out / "avatar.pt")


if __name__ == "__main__":
    import sys

    from talkinghead.cli import run_module

    raise SystemExit(run_module("training.demo", sys.argv[1:], prog="python -m training.demo"))
