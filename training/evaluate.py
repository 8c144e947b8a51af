"""Validation figures for the model card: self-reenactment of people kept out of training.

For each validation clip: fine-tune on T frames (spread over the clip), then drive the personalised
generator with the landmarks of the clip's other frames and compare with the real frames: share of
frames where dlib finds a face, landmark error normalised by inter-ocular distance, SSIM, PSNR and
identity similarity (CSIM, dlib's face-recognition embedding). The same figures for the
meta-learned model before fine-tuning (psi = P·ê from the T frames) show what fine-tuning adds.

example:
  python -m training.evaluate --checkpoint models/talkinghead-small.pt \\
      --data data/preprocessed-128 --out models/validation.json --samples models/validation.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facekit.detect import LandmarkDetector, make_detector
from facekit.rasterize import draw_batch
from facekit.video import contact_sheet, save_png
from training import checkpoint
from training.data import load_frames
from training.finetune import generate, personalise
from training.metrics import evaluate_reenactment
from training.runtime import from_uint8, setup_logging

log = logging.getLogger("talkinghead.evaluate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=Path("models/talkinghead-small.pt"))
    parser.add_argument("--data", type=Path, help="preprocessed folder (default: the config's meta.data)")
    parser.add_argument("--clips", nargs="*", help="clip ids (default: the config's validation_videos)")
    parser.add_argument("--shots", type=int, default=8, help="T frames to fine-tune on (default 8)")
    parser.add_argument("--drive", type=int, default=32, help="other frames to re-enact per clip")
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("models/validation.json"))
    parser.add_argument("--samples", type=Path, help="PNG grid of real / generated frames")


def split(n: int, shots: int, drive: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of T fine-tuning frames spread over the clip, and up to `drive` other frames."""
    train = np.unique(np.linspace(0, n - 1, shots).round().astype(int))
    rest = np.setdiff1d(np.arange(n), train)
    test = rest[np.unique(np.linspace(0, len(rest) - 1, min(drive, len(rest))).round().astype(int))]
    return train, test


@torch.no_grad()
def meta_psi(meta: dict[str, Any], frames: np.ndarray, points: np.ndarray) -> torch.Tensor:
    """psi = P·ê of the meta-learned model, ê the mean embedding of `frames` (no fine-tuning)."""
    emb, gen, _ = checkpoint.build_networks(meta, with_discriminator=False)
    assert emb is not None
    cfg = checkpoint.config_of(meta).model
    landmarks = from_uint8(draw_batch(points, cfg.image_size, cfg.draw_style))
    return gen.project(emb(from_uint8(frames), landmarks).mean(0, keepdim=True))


def evaluate_clip(
    meta: dict[str, Any], clip_dir: Path, detector: LandmarkDetector, args: argparse.Namespace
) -> dict[str, Any]:
    frames, points = load_frames(clip_dir)
    train, test = split(len(frames), args.shots, args.drive)
    psi_meta = meta_psi(meta, frames[train], points[train])
    _, before = generate(meta, psi_meta, points[test])
    personal = personalise(meta, frames[train], points[train], avatar="validation", steps=args.steps)
    _, after = generate(personal, personal["adain"], points[test])
    result = {
        "clip": clip_dir.name,
        "shots": len(train),
        "driven_frames": len(test),
        "before_finetune": _finite(
            evaluate_reenactment(before, frames[test], points[test], detector).as_dict()
        ),
        "after_finetune": _finite(
            evaluate_reenactment(after, frames[test], points[test], detector).as_dict()
        ),
        "finetune_seconds": round(personal["metrics"]["seconds"], 1),
    }
    log.info("%s: %s", clip_dir.name, json.dumps(result))
    picks = np.linspace(0, len(test) - 1, 6).round().astype(int)
    result["_rows"] = [
        [frames[test][i] for i in picks],
        [before[i] for i in picks],
        [after[i] for i in picks],
    ]
    return result


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for phase in ("before_finetune", "after_finetune"):
        keys = [k for k in results[0][phase] if k != "frames"]
        summary[phase] = {k: _nanmean([r[phase][k] for r in results]) for k in keys}
    return summary


def _nanmean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return round(float(np.mean(finite)), 4) if finite else None


def run(args: argparse.Namespace) -> int:
    setup_logging()
    meta = checkpoint.load(args.checkpoint)
    cfg = checkpoint.config_of(meta)
    data = args.data or Path(cfg.meta.data)
    clips = args.clips or list(cfg.meta.validation_videos)
    detector = make_detector("dlib")  # loads dlib's models once for every clip
    results = [evaluate_clip(meta, data / clip, detector, args) for clip in clips]
    rows, labels = [], []
    for r in results:
        rows += r.pop("_rows")
        labels += [f"{r['clip'][:12]} real", "before FT", "after FT"]
    report = {
        "checkpoint": str(args.checkpoint),
        "step": meta.get("step"),
        "clips": results,
        "mean": summarise(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    if args.samples:
        save_png(args.samples, contact_sheet(rows, labels=labels, cell=cfg.model.image_size))
    log.info("mean: %s", json.dumps(report["mean"]))
    return 0


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf -> None (strict JSON), floats rounded for the model card."""
    return {
        k: (round(float(v), 4) if math.isfinite(v) else None) if isinstance(v, float) else v
        for k, v in d.items()
    }


def _json_default(v: Any) -> Any:
    return float(v) if isinstance(v, np.floating) else str(v)


if __name__ == "__main__":
    import sys

    from talkinghead.cli import run_module

    raise SystemExit(run_module("training.evaluate", sys.argv[1:], prog="python -m training.evaluate"))
