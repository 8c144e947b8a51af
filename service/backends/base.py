"""The backend interface: what the service needs from a model server, whichever runs the ONNX files.

The models' names, tensors and metadata are the export/serving contract (facekit/contract.py):
  embedder:            image, landmark_image (B, S, S, 3) uint8 -> embedding (B, 512), adain (B, D) f32
  generator:           landmark_image (B, S, S, 3) uint8, adain (B, D) f32 -> image (B, S, S, 3) uint8
  generator_<avatar>:  landmark_image (B, S, S, 3) uint8 -> image (B, S, S, 3) uint8 (psi baked in)
A warp-guided model's generators also take `warped` (B, S, S, 3) uint8 (`generator_feeds`).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import numpy as np

from facekit.contract import ADAIN, LANDMARK_IMAGE, WARPED, ModelInfo


class BackendUnavailable(RuntimeError):
    """The model server cannot run a model now (down, not ready, not loaded); the call may be retried."""


def check_images(images: np.ndarray, size: int, *, name: str) -> None:
    """Assert the (B, S, S, 3) uint8 contract at the backend boundary."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"{name}: expected uint8 (B, {size}, {size}, 3), got {images.dtype} {images.shape}")


def generator_feeds(
    info: ModelInfo, landmark_images: np.ndarray, adain: np.ndarray | None, warped: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Checked inputs of the shared generator (`adain` given) or a personalised one (None)."""
    check_images(landmark_images, info.image_size, name=LANDMARK_IMAGE)
    feeds = {LANDMARK_IMAGE: landmark_images}
    if adain is not None:
        feeds[ADAIN] = np.ascontiguousarray(adain, np.float32)
    if info.warp_guided:
        if warped is None:
            raise ValueError("the warp-guided generator needs the warped reference of every frame")
        check_images(warped, info.image_size, name=WARPED)
        feeds[WARPED] = warped
    return feeds


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

    async def generate(
        self, landmark_images: np.ndarray, adain: np.ndarray, warped: np.ndarray | None = None
    ) -> np.ndarray:
        """Shared generator: (B, S, S, 3) uint8, (B, D) float32 [, warped (B, S, S, 3) uint8 for a
        warp-guided model] -> (B, S, S, 3) uint8."""
        ...

    async def has_personalised(self, avatar_id: str) -> bool:
        """Whether `generator_<avatar_id>` exists (and was made from the served base model)."""
        ...

    async def generate_personalised(
        self, avatar_id: str, landmark_images: np.ndarray, warped: np.ndarray | None = None
    ) -> np.ndarray:
        """`generator_<avatar_id>`: (B, S, S, 3) uint8 [, warped] -> (B, S, S, 3) uint8."""
        ...

    def forget_personalised(self, avatar_id: str) -> None:
        """Drop what is known about `generator_<avatar_id>` (loaded, or absent): it was published,
        replaced or removed; the next has_personalised looks again."""
        ...
