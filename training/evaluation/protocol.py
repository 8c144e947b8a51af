"""The evaluation protocol: which frames are references, which drive, and how stills are driven.

Self-reenactment of people never trained on (the config's `meta.validation_videos`): for a clip of
one person, the reference set is T frames spread over its first `reference_seconds` (T = 1 and 8),
and the driving frames are every `drive_every`-th frame after that window. Every method gets the
same references and the driving frames' landmarks, and is scored against the real driving frames,
on the same crops (the preprocessed clips at the model's image size).

One-shot stills (photos and paintings) are driven by another person's clip (`still_driver`)
through relative motion: the driver's motion, re-enacted by the still's own face shape
(facekit.motion.transfer_motion).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from facekit.crop import crop_face
from facekit.detect import LandmarkDetector, largest_face
from facekit.motion import transfer_motion
from training.config import EvalConfig
from training.data import load_frames
from training.evaluation.readings import mouth_opening


@dataclass(frozen=True)
class EvalClip:
    """One evaluation person's clip as preprocessed: frames (N, S, S, 3), points (N, 68, 2)."""

    clip_id: str
    frames: np.ndarray
    points: np.ndarray
    times: np.ndarray  # (N,) seconds from the clip's start

    @classmethod
    def load(cls, folder: Path) -> EvalClip:
        frames, points = load_frames(folder)
        meta = json.loads((folder / "meta.json").read_text())
        times = np.asarray(meta["frame_indices"], np.float64) / float(meta["fps"])
        return cls(meta["clip_id"], np.asarray(frames), points, times)

    def references(self, shots: int, protocol: EvalConfig) -> np.ndarray:
        """Indices of T reference frames spread evenly over the first `reference_seconds`."""
        window = np.flatnonzero(self.times < protocol.reference_seconds)
        if len(window) < shots:
            raise ValueError(
                f"{self.clip_id}: {len(window)} frames in the first {protocol.reference_seconds} s, "
                f"fewer than T = {shots}"
            )
        return window[np.linspace(0, len(window) - 1, shots).round().astype(int)]

    def driving(self, protocol: EvalConfig, limit: int = 0) -> np.ndarray:
        """Indices of the driving frames: every drive_every-th after the reference window
        (`limit` > 0 keeps that many, spread evenly)."""
        after = np.flatnonzero(self.times >= protocol.reference_seconds)[:: protocol.drive_every]
        if len(after) == 0:
            raise ValueError(f"{self.clip_id}: no frames after {protocol.reference_seconds} s to drive with")
        if 0 < limit < len(after):
            after = after[np.linspace(0, len(after) - 1, limit).round().astype(int)]
        return after


@dataclass(frozen=True)
class Still:
    """A one-shot still (photo or painting) cropped as the models see it."""

    name: str
    frame: np.ndarray  # (S, S, 3) uint8
    points: np.ndarray  # (68, 2)


def find_stills(faces: Path, patterns: tuple[str, ...] | list[str]) -> list[Path]:
    return sorted({p for pattern in patterns for p in faces.glob(pattern) if p.is_file()})


def load_still(path: Path, detector: LandmarkDetector, size: int) -> Still:
    image = np.asarray(Image.open(path).convert("RGB"))
    face = largest_face(detector, image, str(path))
    frame, points, _ = crop_face(image, face.points, size)
    return Still(path.stem, frame, points.astype(np.float32))


def still_driving(driver: EvalClip, still: Still, protocol: EvalConfig) -> tuple[np.ndarray, np.ndarray]:
    """(driver frame indices, the still's driving points (N, 68, 2)): the driver's motion performed
    by the still's face. Motion is measured from the driver's most closed-mouth frame, taken as
    the expression of the still (a closed mouth): measured from an open one, every later closed
    mouth would press the still's lips through each other."""
    picks = np.arange(0, len(driver.points), protocol.still_every)[: protocol.still_frames]
    neutral = int(np.argmin(mouth_opening(driver.points[picks])))
    return picks, transfer_motion(driver.points[picks], still.points, neutral_index=neutral)
