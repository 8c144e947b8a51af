"""The backend interface: what the service needs from a model server, whichever runs the ONNX files.

Tensors follow DESIGN.md's contract (a batch axis first, uint8 images NHWC):
  embedder:            image, landmark_image (B, S, S, 3) uint8 -> embedding (B, 512), adain (B, D) f32
  generator:           landmark_image (B, S, S, 3) uint8, adain (B, D) f32 -> image (B, S, S, 3) uint8
  generator_<avatar>:  landmark_image (B, S, S, 3) uint8 -> image (B, S, S, 3) uint8 (psi baked in)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from facekit.crop import CROP_SCALE
from facekit.rasterize import DrawStyle

EMBEDDER, GENERATOR, PERSONALISED_PREFIX = "embedder", "generator", "generator_"
META = "talkinghead."  # prefix of the metadata keys in ONNX metadata_props and config.pbtxt parameters


class BackendUnavailable(RuntimeError):
    """The model server cannot run a model now (down, not ready, not loaded); the call may be retried."""


@dataclass(frozen=True)
class ModelInfo:
    """What the service must know about the served model; read from the models' metadata."""

    image_size: int  # S: side of every image tensor, pixels
    adain_size: int  # D: AdaIN parameters per avatar
    embedding_size: int  # 512
    draw_style: DrawStyle  # how landmark images are drawn (the training rasterizer's settings)
    crop_scale: float  # face crop side / landmark extent, as in training (facekit.crop.crop_box)
    model_id: str  # fingerprint of the base model's weights

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], *, where: str) -> ModelInfo:
        """Parse the `talkinghead.*` string values of a model (ONNX metadata or config parameters)."""
        try:
            style = json.loads(meta[META + "draw_style"])
            return cls(
                image_size=int(meta[META + "image_size"]),
                adain_size=int(meta[META + "adain_size"]),
                embedding_size=int(meta.get(META + "embedding_size", "512")),
                draw_style=DrawStyle(line_width=int(style["line_width"]), antialias=bool(style["antialias"])),
                crop_scale=float(meta.get(META + "crop_scale", CROP_SCALE)),
                model_id=str(meta[META + "model_id"]),
            )
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"{where}: missing or malformed talkinghead.* metadata ({error!r})") from error


def check_images(images: np.ndarray, size: int, *, name: str) -> None:
    """Assert the (B, S, S, 3) uint8 contract at the backend boundary."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"{name}: expected uint8 (B, {size}, {size}, 3), got {images.dtype} {images.shape}")


class ReadyGate:
    """Readiness shared by the backends: set once the models answer, cleared when they are lost."""

    _ready: asyncio.Event

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def is_ready(self) -> bool:
        return self._ready.is_set()


class Backend(Protocol):
    """A model server. Every method may raise BackendUnavailable; the service maps it to UNAVAILABLE."""

    name: str

    async def start(self) -> None:
        """Begin connecting / loading; returns without waiting for the models."""

    async def close(self) -> None: ...

    async def wait_ready(self, timeout: float) -> bool:
        """True once the embedder and generator can run (within `timeout` seconds)."""
        ...

    def is_ready(self) -> bool: ...

    @property
    def info(self) -> ModelInfo:
        """The served model's description; BackendUnavailable before the models are loaded."""
        ...

    async def embed(self, images: np.ndarray, landmark_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(K, S, S, 3) uint8 twice -> embedding (K, 512), adain (K, D) float32."""
        ...

    async def generate(self, landmark_images: np.ndarray, adain: np.ndarray) -> np.ndarray:
        """Shared generator: (B, S, S, 3) uint8, (B, D) float32 -> (B, S, S, 3) uint8."""
        ...

    async def has_personalised(self, avatar_id: str) -> bool:
        """Whether `generator_<avatar_id>` exists (and was made from the served base model)."""
        ...

    async def generate_personalised(self, avatar_id: str, landmark_images: np.ndarray) -> np.ndarray:
        """`generator_<avatar_id>`: (B, S, S, 3) uint8 -> (B, S, S, 3) uint8."""
        ...
