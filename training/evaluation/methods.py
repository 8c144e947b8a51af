"""The rows of the evaluation table: ways to make a person's driving frames from their references.

Each method `fit`s an avatar on the reference frames (T, S, S, 3) and their landmarks (T, 68, 2)
and returns a renderer: driving landmarks (N, 68, 2) -> frames (N, S, S, 3) uint8, plus the time
fitting took (fine-tuning's wall time; ~0 for the others).

- `warp`: the classical baseline. The reference frame nearest in pose and expression, warped
  piecewise-affinely onto the driving landmarks (facekit.warp). No learning at all.
- `feed-forward`: the meta-learned model as the paper's few-shot mode, psi = P·mean(E(refs)).
- `fine-tuned`: the model personalised on the references (training.finetune, config defaults).
- `feed-forward@<engine>`: the feed-forward row with the exported generator (the model
  repository's) run on a CPU engine of facekit/engines.py: the gate a lossy engine must pass
  before the service may use it (`talkinghead evaluate --engines ... --verdict`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facekit import contract, engines
from facekit.rasterize import draw_batch
from facekit.warp import nearest_reference, warp_image, warp_nearest
from training import checkpoint
from training.finetune import personalise, render
from training.generator import Generator
from training.runtime import from_uint8

Renderer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Fitted:
    render: Renderer
    seconds: float  # wall time of fitting the avatar (fine-tuning)
    # more rows from the same fit: row name -> its own Fitted (fine-tuning snapshots)
    snapshots: dict[str, Fitted] = field(default_factory=dict)


class WarpBaseline:
    name = "warp"

    def fit(self, refs: np.ndarray, ref_points: np.ndarray) -> Fitted:
        def warp(points: np.ndarray) -> np.ndarray:
            picks = [nearest_reference(ref_points, p) for p in points]
            return np.stack(
                [warp_image(refs[k], ref_points[k], p) for k, p in zip(picks, points, strict=True)]
            )

        return Fitted(warp, 0.0)


class FeedForward:
    """psi = P·ê with ê the mean embedding of the references: no fine-tuning."""

    name = "feed-forward"

    def __init__(self, meta: dict[str, Any]) -> None:
        emb, gen, _ = checkpoint.build_networks(meta, with_discriminator=False)
        if emb is None:
            raise ValueError("the feed-forward row needs a meta checkpoint with the embedder")
        self.embedder, self.generator = emb, gen

    @torch.no_grad()
    def psi(self, refs: np.ndarray, ref_points: np.ndarray) -> torch.Tensor:
        """(1, D) AdaIN parameters of the avatar made of these references."""
        cfg = self.generator.cfg
        landmarks = from_uint8(draw_batch(ref_points, cfg.image_size, cfg.draw_style))
        e_hat = self.embedder(from_uint8(refs), landmarks).mean(0, keepdim=True)  # (1, 512)
        return self.generator.project(e_hat)

    def fit(self, refs: np.ndarray, ref_points: np.ndarray) -> Fitted:
        started = time.monotonic()
        psi = self.psi(refs, ref_points)
        seconds = time.monotonic() - started
        return Fitted(
            lambda points: render(self.generator, psi, points, refs=refs, ref_points=ref_points)[1], seconds
        )


class FeedForwardOn(FeedForward):
    """FeedForward with the exported generator on a CPU engine instead of PyTorch's G."""

    BATCH = 16

    def __init__(self, meta: dict[str, Any], engine: str, repository: Path, *, threads: int = 0) -> None:
        super().__init__(meta)
        path = contract.latest_version(repository / contract.GENERATOR)
        if path is None:
            raise ValueError(f"no generator in {repository}: run `make model-repository` first")
        self.engine = engines.open_engine(path, engine, threads=threads or torch.get_num_threads())
        exported = self.engine.metadata.get(contract.Meta.MODEL_ID)
        if exported != checkpoint.fingerprint(meta):
            raise ValueError(f"{path} is model {exported}, not this checkpoint's: export it first")
        self.name = f"feed-forward@{engine}"

    def fit(self, refs: np.ndarray, ref_points: np.ndarray) -> Fitted:
        started = time.monotonic()
        psi = self.psi(refs, ref_points).numpy()  # (1, D)
        seconds = time.monotonic() - started
        cfg = self.generator.cfg

        def render_on_engine(points: np.ndarray) -> np.ndarray:
            drawn = draw_batch(points, cfg.image_size, cfg.draw_style)
            frames = []
            for i in range(0, len(drawn), self.BATCH):
                chunk = drawn[i : i + self.BATCH]
                feeds = {contract.LANDMARK_IMAGE: chunk, contract.ADAIN: np.repeat(psi, len(chunk), 0)}
                if cfg.warp_guided:
                    feeds[contract.WARPED] = warp_nearest(refs, ref_points, points[i : i + self.BATCH])
                frames.append(self.engine.run(feeds, [contract.IMAGE])[0])
            return np.concatenate(frames)

        return Fitted(render_on_engine, seconds)


class FineTuned:
    """The model personalised on the references for `steps` (None: the config's finetune.steps).
    Each of `snapshots` (fewer steps) is a further row, `fine-tuned@<steps>`, taken from the same
    fine-tuning as it went by."""

    name = "fine-tuned"

    def __init__(
        self, meta: dict[str, Any], steps: int | None = None, snapshots: Collection[int] = ()
    ) -> None:
        self.meta, self.steps, self.snapshots = meta, steps, sorted(set(snapshots))

    def fit(self, refs: np.ndarray, ref_points: np.ndarray) -> Fitted:
        personal = personalise(
            self.meta, refs, ref_points, avatar="evaluation", steps=self.steps, snapshots=self.snapshots
        )
        _, gen, _ = checkpoint.build_networks(personal, with_discriminator=False)

        def fitted(generator: Generator, psi: torch.Tensor, seconds: float) -> Fitted:
            return Fitted(
                lambda points: render(generator, psi, points, refs=refs, ref_points=ref_points)[1], seconds
            )

        earlier: dict[str, Fitted] = {}
        for step, kept in sorted(personal.get("snapshots", {}).items()):
            snapshot = copy.deepcopy(gen)
            snapshot.load_state_dict(kept["generator"])
            earlier[f"{self.name}@{step}"] = fitted(snapshot, kept["adain"], kept["seconds"])
        final = fitted(gen, personal["adain"], personal["metrics"]["seconds"])
        return Fitted(final.render, final.seconds, earlier)
