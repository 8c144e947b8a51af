"""Driving landmarks -> the landmarks the avatar is drawn with, in the model's S x S crop.

Every frame is first brought into the model's square frame with facekit.sequence.letterbox (the
maths of LandmarkSequence.rescaled: uniform scale, letterboxed). Then, per stream:

- ABSOLUTE: used as they are; with crop_to_face, a face crop (facekit.crop.crop_box with the model's
  crop scale, from the first frame, fixed for the stream as preprocessing fixes one box per clip)
  is cut around them instead, in the frame's own pixel space.
- RELATIVE: facekit.motion.transfer_motion(neutral + frame, avatar's landmarks): the driver's
  motion relative to its neutral frame performed by the avatar's own face shape (the same maths as
  training/demo.py).
"""

from __future__ import annotations

import numpy as np

from facekit.crop import CropBox, crop_box, transform_points
from facekit.motion import transfer_motion
from facekit.sequence import letterbox
from service.errors import invalid

REACH = 8  # crop points are clipped to [-REACH S, (REACH + 1) S]


class DrivingMapper:
    """Maps one stream's driving landmarks into the model's crop; holds the stream's reference state."""

    def __init__(
        self,
        *,
        size: int,
        relative: bool,
        crop_to_face: bool,
        crop_scale: float,
        avatar_points: np.ndarray,
        neutral: tuple[np.ndarray, tuple[int, int]] | None = None,
    ) -> None:
        self.size = size
        self.relative = relative
        self.crop_to_face = crop_to_face
        self.crop_scale = crop_scale
        self.avatar_points = np.asarray(avatar_points, np.float32)  # (68, 2) in the crop
        self._neutral = None if neutral is None else letterbox(neutral[0], neutral[1], size)  # (68, 2)
        self._box: CropBox | None = None

    def __call__(self, points: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
        """(68, 2) driving points in a (width, height) frame -> (68, 2) float32 crop points, within
        `REACH` crops of the crop (as far as the drawing goes: facekit.rasterize clips there too)."""
        mapped = self._map(points, frame_size)
        if not np.isfinite(mapped).all():  # a near-degenerate neutral face scales motion beyond float32
            raise invalid("cannot transfer the motion of these landmarks: the result is not finite")
        # (np.minimum/np.maximum: np.clip's Python-level checks cost more than the clip)
        return np.minimum(np.maximum(mapped, -REACH * self.size), (REACH + 1) * self.size).astype(np.float32)

    def _map(self, points: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
        if not self.relative:
            if not self.crop_to_face:
                return letterbox(points, frame_size, self.size)
            if self._box is None:
                self._box = crop_box(points, scale=self.crop_scale)
            return transform_points(points, self._box, self.size)
        square = letterbox(points, frame_size, self.size)
        if self._neutral is None:
            self._neutral = square
        try:
            return transfer_motion(np.stack([self._neutral, square]), self.avatar_points)[1]
        except ValueError as error:  # degenerate (coincident) points cannot be fitted
            raise invalid(f"cannot transfer the motion of these landmarks: {error}") from error
