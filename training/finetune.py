"""Personalise a meta-learned model on T images (or frames) of one person (PAPER.md, "Fine-tuning").

ê_NEW = mean of E over the T frames; G' starts from G with psi' = P·ê_NEW as a trainable tensor (P
unused from then on); D' starts from D with w' = w_0 + ê_NEW. G' (and D', where the config's
losses use it) train on the T frames with the config's losses: the paper's L_CNT + L_ADV; the
committed model's pixel, SSIM, face, identity and eyes-and-mouth terms, no D. A warp-guided G'
trains on pairs (another frame warped onto each frame; one photo: the photo under random
similarities warped back). The result is a "personalised" checkpoint: G' with psi' baked in, for
one avatar.

examples:
  talkinghead finetune --checkpoint models/talkinghead-small.pt --avatar mona \\
      --images photos/mona1.jpg photos/mona2.jpg --out runs/mona.pt
  talkinghead finetune --checkpoint models/talkinghead-small.pt --avatar w009 \\
      --video ../shared/data/faces/dreamtalk_mead_w009.mp4 --frames 8 --out runs/w009.pt
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from facekit.arguments import whole_number
from facekit.crop import crop_face
from facekit.detect import LandmarkDetector, largest_face, make_detector
from facekit.ids import validate_avatar_id, validate_stored_id
from facekit.rasterize import draw_batch
from facekit.warp import warp_image, warp_nearest
from training import checkpoint
from training.config import ExperimentConfig
from training.data import flip_points
from training.generator import Generator
from training.runtime import Diverged, check_finite, from_uint8, pick_device, setup_logging, to_uint8
from training.steps import Batch, Trainer

log = logging.getLogger("talkinghead.finetune")
MAX_SHOTS = 32  # T: the photos or frames one fine-tuning takes (the service's default max_images)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="meta-learned checkpoint")
    parser.add_argument(
        "--avatar",
        required=True,
        help="avatar id: 1-63 of a-z, 0-9, '_', '-', starting with a letter or digit",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", type=Path, help="T photos of the person (T = 1..32)")
    src.add_argument("--video", type=Path, help="a video of the person; --frames of it are used")
    parser.add_argument(
        "--frames",
        type=whole_number(1),
        default=8,
        help=f"T frames taken evenly from --video (default 8, at most {MAX_SHOTS})",
    )
    parser.add_argument(
        "--steps", type=whole_number(1), help="fine-tuning steps (default: the config's finetune.steps)"
    )
    parser.add_argument("--detector", default="dlib", help="landmark detector: dlib | face-alignment")
    parser.add_argument("--out", required=True, type=Path, help="personalised checkpoint to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one, else cpu), cpu, cuda")


def prepare_images(
    images: list[np.ndarray], names: list[str], detector: LandmarkDetector, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Detect, crop around the face and resize: -> frames uint8 (T, S, S, 3), points (T, 68, 2)."""
    frames, points = [], []
    for image, name in zip(images, names, strict=False):
        face = largest_face(detector, image, name)
        face_crop, face_points, _ = crop_face(image, face.points, size)
        frames.append(face_crop)
        points.append(face_points)
    return np.stack(frames), np.stack(points).astype(np.float32)


def personalise(
    meta: dict[str, Any],
    frames: np.ndarray,
    points: np.ndarray,
    *,
    avatar: str,
    steps: int | None = None,
    device: torch.device | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    snapshots: Collection[int] = (),
) -> dict[str, Any]:
    """Fine-tune on T frames uint8 (T, S, S, 3) with landmarks (T, 68, 2) -> personalised checkpoint.

    `snapshots`: steps (below `steps`) at which G' and psi' are also kept, under "snapshots"
    {step: {"generator", "adain", "seconds"}}: what fine-tuning for that many steps makes (the same
    seeds, the same batches), for one run to show what more steps buy."""
    validate_stored_id(avatar)
    device = device or torch.device("cpu")
    cfg = checkpoint.config_of(meta)
    s = cfg.model.image_size
    if frames.ndim != 4 or frames.shape[1:] != (s, s, 3) or len(frames) != len(points):
        raise ValueError(
            f"expected frames (T, {s}, {s}, 3) and matching points, got {frames.shape}, {points.shape}"
        )
    steps = cfg.finetune.steps if steps is None else steps
    torch.manual_seed(cfg.finetune.seed)
    pool = training_views(frames, points, cfg, device)
    trainer, e_new = personal_trainer(meta, cfg, pool, len(frames), device)
    assert trainer.adain is not None
    started = time.monotonic()
    kept: dict[int, dict[str, Any]] = {}

    def keep(step: int) -> None:
        if step in snapshots and step < steps:
            assert trainer.adain is not None
            kept[step] = {
                "generator": {k: v.detach().cpu().clone() for k, v in trainer.generator.state_dict().items()},
                "adain": trainer.adain.detach().cpu().clone(),
                "seconds": time.monotonic() - started,
            }

    history = finetune_loop(trainer, pool, cfg, steps, on_step, after_step=keep if snapshots else None)
    extra = {"snapshots": kept} if snapshots else {}
    return {
        "kind": "personalised",
        "avatar": avatar,
        "config": cfg.to_dict(),
        "step": steps,
        "base_step": meta.get("step"),
        "base_model_id": checkpoint.fingerprint(meta),
        "perceptual": trainer.content.sources,
        "generator": trainer.generator.state_dict(),
        "adain": trainer.adain.detach().cpu(),  # psi' (1, D)
        "embedding": e_new.cpu(),
        # the avatar's references: what a warp-guided G' warps (export and serving keep them)
        "references": {"frames": np.ascontiguousarray(frames), "points": np.asarray(points, np.float32)},
        "metrics": {"history": history, "frames": len(frames), "seconds": time.monotonic() - started},
        **extra,
    }


def training_views(
    frames: np.ndarray, points: np.ndarray, cfg: ExperimentConfig, device: torch.device
) -> Batch:
    """The T frames as one batch (images, landmark images, points), followed by their mirror
    images (landmarks redrawn from mirrored points) when finetune.augment_flip is on. For a
    warp-guided G each view also gets the nearest *other* frame warped onto it. A single frame
    has no other: its own warp onto itself is the frame, so the pair teaches G' nothing; it is
    kept, and `finetune.one_shot_sources` more pairs join it, the same target with the frame under
    a random similarity warped back onto it (`one_shot_pairs`). Several frames keep their real
    pairs first, then `finetune.synthetic_sources` such pairs of each view follow (frame 0's, then
    frame 1's, ...), their similarities `finetune.synthetic_spread` times as large: on real pairs
    alone G' learns the references' own expressions."""
    s = cfg.model.image_size
    views = [(frames, points)]
    if cfg.finetune.augment_flip:
        views.append((np.ascontiguousarray(frames[:, :, ::-1]), flip_points(points, s)))
    warped = None
    if cfg.model.warp_guided:
        rng = np.random.default_rng(cfg.finetune.seed)
        if len(frames) == 1 and cfg.finetune.one_shot_sources > 0:
            pairs = [one_shot_pairs(f[0], p[0], cfg, rng) for f, p in views]
            views = [
                (np.repeat(f, len(w), 0), np.repeat(p, len(w), 0))
                for (f, p), w in zip(views, pairs, strict=True)
            ]
            warped = pairs
        else:
            warped = [_warped_from_others(f, p) for f, p in views]
            n = cfg.finetune.synthetic_sources if len(frames) > 1 else 0
            spread = cfg.finetune.synthetic_spread
            if n > 0:
                synthetic = [
                    np.concatenate(
                        [one_shot_pairs(fi, pi, cfg, rng, n, spread)[1:] for fi, pi in zip(f, p, strict=True)]
                    )
                    for f, p in views
                ]
                views += [(np.repeat(f, n, 0), np.repeat(p, n, 0)) for f, p in views]
                warped += synthetic
    frames, points = np.concatenate([f for f, _ in views]), np.concatenate([p for _, p in views])
    return Batch(
        target_image=from_uint8(frames).to(device),  # (V, 3, S, S)
        target_landmarks=from_uint8(draw_batch(points, s, cfg.model.draw_style)).to(device),
        target_points=torch.from_numpy(np.ascontiguousarray(points, np.float32)).to(device),  # (V, 68, 2)
        target_warped=from_uint8(np.concatenate(warped)).to(device) if warped else None,
    )


def one_shot_pairs(
    frame: np.ndarray,
    points: np.ndarray,
    cfg: ExperimentConfig,
    rng: np.random.Generator,
    sources: int | None = None,
    spread: float = 1.0,
) -> np.ndarray:
    """The warps G' learns to correct when the person is one photo (S, S, 3) with landmarks (68, 2):
    the photo onto itself (the photo), then `sources` (default `finetune.one_shot_sources`) times
    the photo under a random similarity about its landmarks' centre (scale, rotation, shift, their
    spread `spread` times the config's; border replicated), warped piecewise-affinely from its
    moved landmarks back onto the photo's -> uint8 (1 + n, S, S, 3).
    Like a real pair of frames the warp is off where a 68-point warp is off (outline, hair,
    background held by the border anchors, resampling), and the target stays the real photo (a
    mirror image would be another face: no face is symmetric)."""
    ft, s = cfg.finetune, frame.shape[0]
    pts = np.asarray(points, np.float64)
    centre = pts.mean(axis=0)
    out = [np.ascontiguousarray(frame)]
    for _ in range(ft.one_shot_sources if sources is None else sources):
        log_scale, degrees, shift = (
            np.clip(rng.normal(0, sd * spread, size), -2 * sd * spread, 2 * sd * spread)
            for sd, size in (
                (ft.one_shot_log_scale, None),
                (ft.one_shot_degrees, None),
                (ft.one_shot_shift * s, 2),
            )
        )
        angle = np.radians(degrees)
        a = np.exp(log_scale) * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        m = np.hstack([a, (centre + shift - a @ centre)[:, None]])  # (2, 3): p -> a p + b
        moved = cv2.warpAffine(
            np.ascontiguousarray(frame), m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        out.append(warp_image(moved, pts @ a.T + m[:, 2], pts))
    return np.stack(out)


def personal_trainer(
    meta: dict[str, Any], cfg: ExperimentConfig, pool: Batch, shots: int, device: torch.device
) -> tuple[Trainer, torch.Tensor]:
    """G' and D' of PAPER.md's fine-tuning, initialised from the T (unmirrored) frames' ê_NEW."""
    emb, gen, disc = checkpoint.build_networks(meta)
    if emb is None or disc is None:
        raise ValueError("fine-tuning needs a meta checkpoint with the embedder and discriminator")
    emb, gen, disc = emb.to(device), copy.deepcopy(gen).to(device), copy.deepcopy(disc).to(device)
    with torch.no_grad():
        e_new = emb(pool.target_image[:shots], pool.target_landmarks[:shots]).mean(dim=0, keepdim=True)
        psi = gen.project(e_new)  # (1, D)
    disc.personalise(e_new)
    trainer = Trainer(cfg=cfg, embedder=None, generator=gen, discriminator=disc, adain=psi).to(device)
    trainer.train()
    return trainer, e_new


def finetune_loop(
    trainer: Trainer,
    pool: Batch,
    cfg: ExperimentConfig,
    steps: int,
    on_step: Callable[[int, dict[str, float]], None] | None,
    *,
    after_step: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """`steps` updates on random batches of the pool; the logged losses. `after_step(step)` is
    called after each update."""
    views = len(pool.target_image)
    bs = min(cfg.finetune.batch_size, views)
    rng = torch.Generator().manual_seed(cfg.finetune.seed)
    history: list[dict[str, float]] = []
    assert pool.target_points is not None
    for step in range(1, steps + 1):
        idx = torch.randperm(views, generator=rng)[:bs]
        batch = Batch(
            target_image=pool.target_image[idx],
            target_landmarks=pool.target_landmarks[idx],
            target_points=pool.target_points[idx],
            target_warped=pool.target_warped[idx] if pool.target_warped is not None else None,
        )
        losses, _ = trainer.step(batch)
        check_finite(step, losses)  # (a NaN model is no avatar: nothing is written or published)
        if after_step is not None:
            after_step(step)
        if step % cfg.finetune.log_every == 0 or step == steps:
            history.append({"step": step, **losses})
            if on_step:
                on_step(step, losses)
    return history


def generate(ckpt: dict[str, Any], points: np.ndarray, *, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The personalised G' of `ckpt` for crop-space landmarks (N, 68, 2)
    -> (landmark images, generated frames), both uint8 (N, S, S, 3)."""
    _, gen, _ = checkpoint.build_networks(ckpt, with_discriminator=False)
    refs = ckpt.get("references", {})
    return render(
        gen, ckpt["adain"], points, refs=refs.get("frames"), ref_points=refs.get("points"), batch=batch
    )


@torch.no_grad()
def render(
    gen: Generator,
    psi: torch.Tensor,
    points: np.ndarray,
    *,
    refs: np.ndarray | None = None,
    ref_points: np.ndarray | None = None,
    batch: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """G with AdaIN parameters psi (1, D) for landmarks (N, 68, 2) -> (landmark images, frames),
    uint8 (N, S, S, 3) each. A warp-guided G needs the avatar's reference frames and landmarks."""
    cfg = gen.cfg
    if cfg.warp_guided and (refs is None or ref_points is None):
        raise ValueError("a warp-guided generator needs the avatar's reference frames and landmarks")
    drawn = draw_batch(points, cfg.image_size, cfg.draw_style)
    frames = []
    for i in range(0, len(drawn), batch):
        y = from_uint8(drawn[i : i + batch])
        warped = None
        if refs is not None and ref_points is not None and cfg.warp_guided:
            warped = from_uint8(warp_nearest(refs, ref_points, points[i : i + batch]))
        frames.append(to_uint8(gen(y, psi.expand(len(y), -1), warped)))
    return drawn, np.concatenate(frames)


def run(args: argparse.Namespace) -> int:
    setup_logging()
    try:  # a bad id or a photo without a face: one line, not a traceback
        validate_avatar_id(args.avatar)
        check_out(args.out, args.overwrite)  # (before minutes of fine-tuning, not after)
        device = pick_device(args.device)
        meta = checkpoint.load_meta(args.checkpoint, "fine-tuning")
        cfg: ExperimentConfig = checkpoint.config_of(meta)
        detector = make_detector(args.detector)
        images, names = load_inputs(args)
        frames, points = prepare_images(images, names, detector, cfg.model.image_size)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"talkinghead finetune: {error}") from None
    log.info(
        "fine-tuning %s on %d frames for %s steps",
        args.avatar,
        len(frames),
        cfg.finetune.steps if args.steps is None else args.steps,
    )
    try:
        result = personalise(
            meta,
            frames,
            points,
            avatar=args.avatar,
            steps=args.steps,
            device=device,
            on_step=lambda step, losses: log.info(
                "step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in losses.items())
            ),
        )
    except Diverged as error:
        raise SystemExit(f"talkinghead finetune: {error}; nothing written") from None
    checkpoint.save(args.out, result)
    log.info("wrote %s (%.0f s)", args.out, result["metrics"]["seconds"])
    return 0


def check_out(out: Path, overwrite: bool) -> None:
    """ValueError when --out cannot take the checkpoint: a directory, or a file already there without
    --overwrite (a directory failed after the whole fine-tune, leaving its .tmp; a file was replaced)."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: name the checkpoint file to write")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists: give --overwrite to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"--out {out}: {out.parent} is a file, not a directory")


def load_inputs(args: argparse.Namespace) -> tuple[list[np.ndarray], list[str]]:
    """The photos (EXIF orientation applied) or the video's frames, ValueError for one unreadable."""
    from facekit.video import read_image, read_video

    if args.images:
        if not 1 <= len(args.images) <= MAX_SHOTS:
            raise ValueError(f"--images: give 1 to {MAX_SHOTS} images, got {len(args.images)}")
        return [read_image(p) for p in args.images], [str(p) for p in args.images]

    if args.frames > MAX_SHOTS:
        raise ValueError(f"--frames: at most {MAX_SHOTS}, got {args.frames}")
    frames, _ = read_video(args.video)
    idx = np.linspace(0, len(frames) - 1, args.frames).round().astype(int)
    return [frames[i] for i in idx], [f"{args.video} frame {i}" for i in idx]


def _warped_from_others(frames: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Frame i's nearest other frame warped onto frame i's landmarks, for every i."""
    out = []
    for i in range(len(frames)):
        others = [j for j in range(len(frames)) if j != i] or [i]
        out.append(warp_nearest(frames[others], points[others], points[i : i + 1])[0])
    return np.stack(out)
