"""Process-level plumbing for training entry points: device choice, torchrun/DDP, logging, images."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def pick_device(name: str) -> torch.device:
    """--device as a torch.device: auto (the local rank's GPU when there is one, else the CPU), cpu,
    cuda or cuda:N. ValueError, saying what this machine has, for a device it lacks or a name that is
    none of these (torch said so only when the first tensor moved, in a traceback)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            built = "" if torch.version.cuda else " (this PyTorch is built without CUDA)"
            raise ValueError(f"--device {name}: this machine has no CUDA GPU{built}; use cpu or auto")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    return device


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1) join the process group; returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def broadcast_parameters(params: Iterable[torch.Tensor]) -> None:
    if dist.is_initialized():
        for p in params:
            dist.broadcast(p.data, src=0)


class Diverged(ValueError):
    """A loss became NaN or infinite: the weights stepped with it are no model to keep."""


def check_finite(step: int, losses: dict[str, float], device: torch.device | None = None) -> None:
    """Diverged, naming the step and the losses, unless every loss is finite on every rank (one
    rank's NaN reaches the others' weights through the averaged gradients)."""
    bad = sorted(k for k, v in losses.items() if not math.isfinite(v))
    flag = torch.tensor([float(bool(bad))], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        what = ", ".join(f"{k}={losses[k]}" for k in bad) or "on another rank"
        raise Diverged(f"training diverged at step {step}: a loss is not finite ({what})")


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Data parallelism: every rank steps with the mean gradient (what DDP does, for a step that
    calls D several times per update, which DDP's forward hooks do not allow)."""
    if not dist.is_initialized():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def image_grid(columns: list[torch.Tensor]) -> np.ndarray:
    """Columns of (B, 3, H, W) tensors in [-1, 1] -> one uint8 (B*H, len*W, 3) grid, a row per sample."""
    rows = [
        np.concatenate(list(cells), axis=1) for cells in zip(*(to_uint8(c) for c in columns), strict=False)
    ]
    return np.concatenate(rows, axis=0)
