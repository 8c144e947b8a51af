"""Meta-learn the embedder E, generator G and projection discriminator D over many people's videos.

Each step samples videos, K reference frames (averaged by E into ê) and one target frame per video,
generates the target from its landmark image with AdaIN parameters P·ê, and updates E and G once and
D `d_steps_per_g` times (PAPER.md, "Meta-learning episode"). Checkpoints carry their config and
resume exactly: the networks, the optimisers, torch's and numpy's random states, and the
episodes, which are a function of (seed, step, slot) (`StepSampler`): a run resumed at step n
ends where an uninterrupted one does (to the bit in one thread, tests/test_training.py; with
several, within the threaded kernels' rounding, which Adam's first steps magnify to ~5e-5).
TensorBoard scalars and sample grids go to <run>/tb, every logged loss also to
<run>/metrics.jsonl.

examples:
  talkinghead preprocess ../shared/data/faces data/preprocessed-128 --config small
  talkinghead train --config small --run runs/small            # resumes runs/small/last.pt if there
  talkinghead train --config paper --run runs/paper --dry-run  # build everything, print the plan
  torchrun --nproc-per-node 8 -m talkinghead.cli -- train --config paper --run runs/paper   # multi-GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from facekit.arguments import whole_number
from training import checkpoint
from training.config import ExperimentConfig, load_config
from training.data import EpisodeDataset, StepSampler, list_clips, load_frames
from training.evaluation.spread import embedding_spread
from training.runtime import (
    Diverged,
    broadcast_parameters,
    check_finite,
    image_grid,
    init_distributed,
    pick_device,
    setup_logging,
)
from training.steps import Batch, Trainer

log = logging.getLogger("talkinghead.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="small", help="built-in config name or YAML path (default small)")
    parser.add_argument("--run", required=True, type=Path, help="run directory (checkpoints, logs)")
    parser.add_argument("--data", help="preprocessed data folder (default: the config's meta.data)")
    parser.add_argument(
        "--steps", type=whole_number(1), help="total steps (default: the config's meta.steps)"
    )
    parser.add_argument(
        "--max-minutes", type=float, default=0, help="stop (with a checkpoint) after this long"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. meta.k_shot=4 loss.pixel_weight=0",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        help="a new run starts from this checkpoint's weights where names and shapes match "
        "(a warp-guided G from a trained paper G: see warm_start); ignored when the run resumes",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--threads", type=whole_number(0), default=0, help="CPU threads (0 = torch's default)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="build data and networks, print the plan, exit"
    )


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    try:
        cfg = load_config(args.config)
    except (FileNotFoundError, ValueError) as error:  # no such config, or YAML that is not one
        raise SystemExit(f"talkinghead train: --config: {error}") from None
    for setting in args.set:
        if "=" not in setting:
            raise SystemExit(
                f"talkinghead train: --set {setting}: expected key=value (e.g. loss.ssim_weight=8)"
            )
    overrides: dict[str, Any] = {k: _setting(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.data:
        overrides["meta.data"] = args.data
    if args.steps is not None:
        overrides["meta.steps"] = args.steps
    try:
        return cfg.replace(**overrides) if overrides else cfg
    except (KeyError, ValueError, TypeError) as error:  # a misspelt key, a value of the wrong kind
        raise SystemExit(f"talkinghead train: --set: {error.args[0] if error.args else error}") from None


def _setting(text: str) -> Any:
    """A --set value as YAML reads it, except that numbers YAML 1.1 leaves as text (1e-4, 1.0e8)
    are numbers: a learning rate of '1e-4' reached Adam as a string (a TypeError traceback)."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


def make_dataset(cfg: ExperimentConfig, seed: int) -> EpisodeDataset:
    return EpisodeDataset(
        root=cfg.meta.data,
        k_shot=cfg.meta.k_shot,
        image_size=cfg.model.image_size,
        draw_style=cfg.model.draw_style,
        include=None,
        exclude=list(cfg.meta.validation_videos),
        flip=cfg.meta.augment_flip,
        warp=cfg.model.warp_guided,
        seed=seed,
    )


def to_batch(item: dict[str, torch.Tensor], device: torch.device) -> Batch:
    return Batch(
        target_image=item["target_image"],
        target_landmarks=item["target_landmarks"],
        target_points=item["target_points"],
        target_warped=item.get("target_warped"),
        video=item["video"],
        ref_images=item["ref_images"],
        ref_landmarks=item["ref_landmarks"],
    ).to(device)


def run(args: argparse.Namespace) -> int:
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = resolve_config(args)
    if args.run.exists() and not args.run.is_dir():  # (found after the data and networks were built)
        raise SystemExit(f"talkinghead train: --run {args.run}: a file, not a run directory")
    try:
        device = pick_device(args.device)
        # (a personalised generator given was copied where it fitted, without a word)
        warm = checkpoint.load_meta(args.init_from, "--init-from") if args.init_from is not None else None
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"talkinghead train: {error}") from None
    rank, world = init_distributed(device)
    torch.manual_seed(cfg.meta.seed)
    try:
        data = make_dataset(cfg, seed=cfg.meta.seed + rank)
    except (ValueError, FileNotFoundError) as err:  # (exclude: the config's evaluation people)
        raise SystemExit(f"talkinghead train: no training episodes: {err}") from None
    trainer = Trainer.for_meta_learning(cfg, data.num_videos).to(device)
    emb, gen, disc = trainer.embedder, trainer.generator, trainer.discriminator
    assert emb is not None
    broadcast_parameters(trainer.parameters())
    log.info(
        "config %s: %d training videos (%s kept out), device %s x%d, perceptual %s",
        cfg.name,
        data.num_videos,
        list(cfg.meta.validation_videos),
        device,
        world,
        trainer.content.sources,
    )
    for name, net in (("E", emb), ("G (with P)", gen), ("D (V, w0, b, W)", disc)):
        log.info("%s: %.2fM parameters", name, sum(p.numel() for p in net.parameters()) / 1e6)
    if args.dry_run:
        log.info(
            "dry run: %d steps of %d episodes (K=%d) would run into %s",
            cfg.meta.steps,
            cfg.meta.batch_size * world,
            cfg.meta.k_shot,
            args.run,
        )
        return 0
    run_dir: Path = args.run
    try:
        step = resume(trainer, run_dir / "last.pt", data.video_ids, cfg)
        if step == 0 and warm is not None:
            warm_start(trainer, warm, data.video_ids)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"talkinghead train: {error}") from None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    try:
        stopped = loop(trainer, cfg, data, run_dir, step, rank, world, device, args.max_minutes)
    except Diverged as error:
        log.error(
            "%s; %s is left as it was (lower the learning rates, or resume from previous.pt, "
            "the checkpoint kept every %d steps)",
            error,
            run_dir / "last.pt",
            4 * cfg.meta.checkpoint_every,
        )
        return 1
    return 128 + stopped if stopped else 0  # (stopped by a signal: checkpointed, not done)


def resume(trainer: Trainer, path: Path, video_ids: list[str], cfg: ExperimentConfig) -> int:
    if not path.is_file():
        return 0
    ckpt = checkpoint.load(path)
    if ckpt.get("video_ids") != video_ids:
        raise SystemExit(f"{path} was trained on other videos; use a new --run directory")
    made = checkpoint.config_of(ckpt)  # (fields added since default as they load)
    if made.model != cfg.model:  # (it was a 25-line size mismatch)
        raise SystemExit(
            f"{path} is a run of config {made.name!r}, with another model than {cfg.name!r}: resume it "
            "with its own config, or start a new --run directory (--init-from copies what fits)"
        )
    assert trainer.embedder is not None
    trainer.embedder.load_state_dict(ckpt["embedder"])
    trainer.generator.load_state_dict(ckpt["generator"])
    trainer.discriminator.load_state_dict(ckpt["discriminator"])
    trainer.opt_g.load_state_dict(ckpt["optimizers"]["g"])
    trainer.opt_d.load_state_dict(ckpt["optimizers"]["d"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "numpy" in ckpt["rng"]:
        np.random.set_state(ckpt["rng"]["numpy"])
    log.info("resumed %s at step %d", path, ckpt["step"])
    return int(ckpt["step"])


def warm_start(trainer: Trainer, ckpt: dict[str, Any], video_ids: list[str]) -> dict[str, list[str]]:
    """Copy a checkpoint's weights into a new run's networks: every tensor whose name and shape
    match; a tensor that only grew along its input channels (a warp-guided G's first convolution
    takes the landmark image and the warped reference, the paper's G the landmark image alone) gets
    the old weights in its leading channels and zeros in the new ones, so the network starts by
    computing what the old one did and learns what to make of its new inputs. The rest keeps its
    initialisation (the warp-guided head). D's per-video W is copied only when the videos are the
    same. Returns what was done."""
    assert trainer.embedder is not None
    done: dict[str, list[str]] = {"copied": [], "grown": [], "kept": []}
    nets = (
        ("embedder", trainer.embedder),
        ("generator", trainer.generator),
        ("discriminator", trainer.discriminator),
    )
    for part, net in nets:
        source = ckpt.get(part, {})
        state = net.state_dict()
        for name, tensor in state.items():
            old = source.get(name)
            label = f"{part}.{name}"
            if part == "discriminator" and name == "W" and ckpt.get("video_ids") != video_ids:
                old = None
            if old is not None and old.shape == tensor.shape:
                tensor.copy_(old)
                done["copied"].append(label)
            elif old is not None and _grew_inputs(name, old, tensor):
                if tensor.dim() >= 2:  # weights: the new input channels start at zero
                    tensor.zero_()
                    tensor[:, : old.shape[1]].copy_(old)
                else:
                    if name.endswith("_v"):  # spectral norm's right singular vector of [W 0] is [v 0]
                        tensor.zero_()
                    tensor[: old.shape[0]].copy_(old)  # an input norm's new channels keep their init
                done["grown"].append(label)
            else:
                done["kept"].append(label)
        net.load_state_dict(state)
    log.info(
        "warm start: %d tensors copied, %d grown (%s), %d initialised (%s)",
        len(done["copied"]),
        len(done["grown"]),
        ", ".join(done["grown"]),
        len(done["kept"]),
        ", ".join(done["kept"]),
    )
    return done


def _grew_inputs(name: str, old: torch.Tensor, new: torch.Tensor) -> bool:
    """`new` is `old` with more input channels (axis 1 of a weight, axis 0 of a norm's vector)."""
    if name.startswith("out_conv.") or old.dim() != new.dim():
        return False  # another head
    axis = 1 if new.dim() >= 2 else 0
    same = all(a == b for i, (a, b) in enumerate(zip(old.shape, new.shape, strict=True)) if i != axis)
    return same and old.shape[axis] < new.shape[axis]


class Progress:
    """What the loop reports besides stepping: running means, logs, samples, spread, checkpoints."""

    def __init__(
        self, *, trainer: Trainer, cfg: ExperimentConfig, data: EpisodeDataset, run_dir: Path
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.trainer, self.cfg, self.data, self.run_dir = trainer, cfg, data, run_dir
        self.writer = SummaryWriter(str(run_dir / "tb"))
        self.sums: dict[str, float] = {}
        self.last_log = time.monotonic()
        self.held_out = held_out_clips(cfg)

    def after_step(
        self, step: int, losses: dict[str, float], batch: Batch, fake: torch.Tensor, last: bool
    ) -> None:
        meta = self.cfg.meta
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if step % meta.log_every == 0:
            now = time.monotonic()
            means = {k: v / meta.log_every for k, v in self.sums.items()}
            means["sec_per_step"] = (now - self.last_log) / meta.log_every
            if meta.spread_every and step % meta.spread_every == 0 and len(self.held_out) > 1:
                assert self.trainer.embedder is not None
                means.update(embedding_spread(self.trainer.embedder, self.held_out, meta.k_shot))
            self.last_log, self.sums = time.monotonic(), {}
            log_scalars(self.writer, self.run_dir, step, means)
        if step % meta.sample_every == 0:
            save_samples(self.writer, self.run_dir, step, batch, fake)
        if step % meta.checkpoint_every == 0 or last:
            save_checkpoint(self.trainer, self.cfg, self.data, self.run_dir / "last.pt", step)
            # (a run that ended said nothing of where its model went)
            done = step >= meta.steps
            ending = " (done)" if done else " (stopped: resume with the same command)" if last else ""
            log.info("step %d: checkpoint %s%s", step, self.run_dir / "last.pt", ending)


def held_out_clips(cfg: ExperimentConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """(frames, points) of the validation videos present in the data folder: the spread's people."""
    clips = list_clips(cfg.meta.data, include=list(cfg.meta.validation_videos))
    usable = [c for c in clips if c.frames >= 2 * cfg.meta.k_shot]
    if len(usable) < 2:
        log.warning("fewer than 2 validation videos in %s: the embedder spread is not logged", cfg.meta.data)
    return [load_frames(c.folder) for c in usable]


def loop(
    trainer: Trainer,
    cfg: ExperimentConfig,
    data: EpisodeDataset,
    run_dir: Path,
    step: int,
    rank: int,
    world: int,
    device: torch.device,
    max_minutes: float,
) -> int:
    """Train to meta.steps, or until --max-minutes or a signal (SIGTERM, SIGINT): the checkpoint
    written, the signal's number returned (0 otherwise). Diverged at a loss that is not finite,
    nothing written since the last checkpoint."""
    meta = cfg.meta
    # Episodes are a function of (seed, step, slot), and the loader's own seed of the config's seed
    # (not drawn from torch's state): a resumed run trains on what an uninterrupted one would have.
    sampler = StepSampler(data.num_videos, meta.batch_size, meta.seed, step, rank, world)
    loader = DataLoader(
        data,
        batch_size=meta.batch_size,
        sampler=sampler,
        num_workers=meta.num_workers,
        drop_last=True,
        persistent_workers=meta.num_workers > 0,
        generator=torch.Generator().manual_seed(meta.seed),
    )
    progress = Progress(trainer=trainer, cfg=cfg, data=data, run_dir=run_dir) if rank == 0 else None
    started = time.monotonic()
    stop_requested: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):  # finish the step, checkpoint, exit
        signal.signal(sig, lambda signum, frame: stop_requested.append(signum))
    trainer.train()
    if step >= meta.steps:
        log.info("%s is at step %d of %d already: nothing to train", run_dir / "last.pt", step, meta.steps)
        return 0
    for item in loader:  # (StepSampler has no end: the last step returns)
        batch = to_batch(item, device)
        losses, fake = trainer.step(batch)
        step += 1
        check_finite(step, losses, device)  # (before it is logged or saved: last.pt stays a model)
        out_of_time = bool(stop_requested) or (
            max_minutes > 0 and time.monotonic() - started > max_minutes * 60
        )
        last = step >= meta.steps or out_of_time
        if progress is not None:
            progress.after_step(step, losses, batch, fake, last)
        if last:
            if out_of_time:
                why = "signal" if stop_requested else "--max-minutes"
                log.info("stopping at step %d of %d (%s)", step, meta.steps, why)
            return stop_requested[0] if stop_requested and step < meta.steps else 0
    return 0


def log_scalars(writer: Any, run_dir: Path, step: int, means: dict[str, float]) -> None:
    for k, v in means.items():
        writer.add_scalar(f"loss/{k}" if not k.startswith("sec") else k, v, step)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **{k: round(v, 5) for k, v in means.items()}}) + "\n")
    log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in means.items()))


def save_samples(writer: Any, run_dir: Path, step: int, batch: Batch, fake: torch.Tensor) -> None:
    assert batch.ref_images is not None
    first = batch.target_warped if batch.target_warped is not None else batch.ref_images[:, 0]
    grid = image_grid([first, batch.target_landmarks, fake, batch.target_image])
    writer.add_image("samples/ref_landmarks_generated_real", grid, step, dataformats="HWC")
    from PIL import Image

    (run_dir / "samples").mkdir(exist_ok=True)
    Image.fromarray(grid).save(run_dir / "samples" / f"{step:07d}.png")


def save_checkpoint(
    trainer: Trainer, cfg: ExperimentConfig, data: EpisodeDataset, path: Path, step: int
) -> None:
    assert trainer.embedder is not None
    checkpoint.save(
        path,
        {
            "kind": "meta",
            "config": cfg.to_dict(),
            "step": step,
            "video_ids": data.video_ids,
            "perceptual": trainer.content.sources,
            "embedder": trainer.embedder.state_dict(),
            "generator": trainer.generator.state_dict(),
            "discriminator": trainer.discriminator.state_dict(),
            "optimizers": {"g": trainer.opt_g.state_dict(), "d": trainer.opt_d.state_dict()},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
            "metrics": {"last": _last_metrics(path.parent)},
        },
    )
    if step % (cfg.meta.checkpoint_every * 4) == 0:  # an older fallback in case training diverges
        shutil.copyfile(path, path.with_name("previous.pt"))


def _last_metrics(run_dir: Path) -> dict[str, float]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return {}
    lines = f.read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}
