"""Is the embedder alive? The spread of ê between people against its spread within one person.

For each evaluation clip, ê is computed twice from two disjoint sets of K frames (one from each
half of the clip). `within` is the mean distance between a person's two ê; `between` the mean
distance between different people's ê (first sets). A working embedder has between/within well
above 1; a collapsed one has both near 0 (or a ratio near 1: noise). `e_between_rel` is the
between-people distance in units of |ê|: near 0 means every person gets nearly the same ê.
Training logs these next to the losses so that a collapse shows on the first day.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from facekit.rasterize import draw_batch
from training.embedder import Embedder
from training.runtime import from_uint8


def reference_sets(num_frames: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint sets of k frame indices, spread over each half of a clip."""
    half = num_frames // 2
    if half < k:
        raise ValueError(f"a clip of {num_frames} frames has no two disjoint sets of {k}")
    first = np.linspace(0, half - 1, k).round().astype(int)
    return first, half + np.linspace(0, num_frames - half - 1, k).round().astype(int)


@torch.no_grad()
def embedding_spread(
    embedder: Embedder, clips: list[tuple[np.ndarray, np.ndarray]], k: int
) -> dict[str, float]:
    """clips: (frames (N, S, S, 3) uint8, points (N, 68, 2)) per person -> spread figures."""
    cfg = embedder.cfg
    was_training = embedder.training
    embedder.eval()
    pairs = []
    device = next(embedder.parameters()).device
    for frames, points in clips:
        e = []
        for idx in reference_sets(len(frames), k):
            x = from_uint8(np.asarray(frames[idx])).to(device)
            y = from_uint8(draw_batch(points[idx], cfg.image_size, cfg.draw_style)).to(device)
            e.append(embedder(x, y).mean(0))
        pairs.append(torch.stack(e))  # (2, 512)
    embedder.train(was_training)
    stacked = torch.stack(pairs)  # (P, 2, 512)
    within = float((stacked[:, 0] - stacked[:, 1]).norm(dim=-1).mean())
    between = (
        float(
            np.mean(
                [
                    (stacked[a, 0] - stacked[b, 0]).norm().item()
                    for a, b in itertools.combinations(range(len(pairs)), 2)
                ]
            )
        )
        if len(pairs) > 1
        else float("nan")
    )
    dead = float((stacked.abs().amax(dim=(0, 1)) == 0).float().mean())
    norm = float(stacked.norm(dim=-1).mean())
    return {
        "e_between": between,
        "e_between_rel": between / norm if norm > 0 else float("nan"),  # people apart, in units of |ê|
        "e_within": within,
        "e_ratio": between / within if within > 0 else float("nan"),
        "e_norm": norm,
        "e_dead_units": dead,
    }
