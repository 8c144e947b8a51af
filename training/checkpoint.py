"""Self-describing checkpoints: weights + config + step + metrics, so export needs only the file.

Two kinds:
- "meta": a meta-learned model (E, G with P, D). `release()` drops the optimisers and D's per-video
  matrix W (training-only, one column per training video; never used at inference or fine-tuning).
- "personalised": one person's fine-tuned G' with psi' (`adain`) baked in, plus their embedding.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from training.config import ExperimentConfig
from training.discriminator import Discriminator
from training.embedder import Embedder
from training.generator import Generator

FORMAT = "talkinghead-checkpoint"
VERSION = 1


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
        os.replace(tmp, path)
    except BaseException:  # (a disk full, a directory at `path`): no .tmp left behind either
        tmp.unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except OSError:  # (unreadable: permissions, an I/O error) the caller's to say
        raise
    except Exception as error:
        # Cut short, another kind of file, a pickle of classes this code does not have: whatever
        # the unpickler meets in such bytes (of 3,000 files of 256 random bytes, 5 % raised
        # UnicodeDecodeError, ValueError, MemoryError or OverflowError, whose own messages quoted
        # the bytes), the caller gets one message.
        raise ValueError(
            f"{path} is not a readable talkinghead checkpoint ({type(error).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a talkinghead checkpoint")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')}, this code reads {VERSION}")
    return ckpt


def load_meta(path: str | Path, needs: str) -> dict[str, Any]:
    """`load`, and ValueError unless it is a meta-learned checkpoint (`needs` says what for): given a
    personalised one, fine-tuning and the evaluation failed in a traceback."""
    ckpt = load(path)
    if ckpt.get("kind") == "personalised":
        what = f"the personalised generator of avatar {ckpt.get('avatar')!r}"
    elif "embedder" not in ckpt:
        what = "without an embedder"
    else:
        return ckpt
    raise ValueError(f"{path} is {what}: {needs} needs a meta-learned checkpoint (train's)")


def config_of(ckpt: dict[str, Any]) -> ExperimentConfig:
    return ExperimentConfig.from_dict(ckpt["config"])


def fingerprint(ckpt: dict[str, Any]) -> str:
    """16 hex digits identifying the E and G weights of a checkpoint (the exported `model_id`).

    psi made by one model's embedder means nothing to another model's generator, so avatars and
    exported models carry it; a personalised checkpoint carries its meta model's as base_model_id.
    """
    if ckpt.get("kind") == "personalised":
        if not ckpt.get("base_model_id"):
            raise ValueError("personalised checkpoint without base_model_id: re-run finetune")
        return str(ckpt["base_model_id"])
    digest = hashlib.sha256()
    for part in ("embedder", "generator"):
        for name, tensor in sorted(ckpt.get(part, {}).items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def build_networks(
    ckpt: dict[str, Any], *, with_discriminator: bool = True
) -> tuple[Embedder | None, Generator, Discriminator | None]:
    """Rebuild the networks stored in a checkpoint, weights loaded, in eval mode."""
    cfg = config_of(ckpt).model
    gen = Generator(cfg=cfg)
    gen.load_state_dict(ckpt["generator"])
    emb = None
    if "embedder" in ckpt:
        emb = Embedder(cfg=cfg)
        emb.load_state_dict(ckpt["embedder"])
    disc = None
    if with_discriminator and "discriminator" in ckpt:
        state = ckpt["discriminator"]
        disc = Discriminator(cfg=cfg, num_videos=state["W"].shape[0] if "W" in state else 0)
        disc.load_state_dict(state, strict="W" in state)
    for net in (emb, gen, disc):
        if net is not None:
            net.eval()
    return emb, gen, disc


def release(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The committed form of a meta checkpoint: no optimisers, no W."""
    out = {k: v for k, v in ckpt.items() if k not in ("optimizers", "format", "version")}
    out["discriminator"] = {k: v for k, v in ckpt["discriminator"].items() if k != "W"}
    out["video_ids"] = []
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m training.checkpoint release IN OUT`: write the committed form of a meta checkpoint."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.checkpoint", description=main.__doc__)
    parser.add_argument("action", choices=["release"])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args(argv)
    save(args.dst, release(load(args.src)))
    print(f"wrote {args.dst} ({args.dst.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
