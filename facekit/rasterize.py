"""The landmark rasterizer: 68 points -> the coloured line drawing G and E take as input.

Training and serving both call `draw_landmarks`; a golden-image test pins its output, so any
change here is a model-breaking change (retrain or keep the old drawing behind a config value).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from facekit.layout import GROUPS, NUM_POINTS

_SHIFT = 4  # sub-pixel precision bits for cv2 drawing (coordinates scaled by 2**_SHIFT)


@dataclass(frozen=True)
class DrawStyle:
    """How lines are drawn; carried in every checkpoint's config."""

    line_width: int = 2  # pixels at the drawn size, >= 1
    antialias: bool = True


def validate_points(points: np.ndarray) -> np.ndarray:
    """Return `points` as float32 (68, 2), or raise ValueError saying what is wrong."""
    pts = np.asarray(points)
    if pts.shape != (NUM_POINTS, 2):
        raise ValueError(f"expected landmarks of shape ({NUM_POINTS}, 2), got {tuple(pts.shape)}")
    if not np.issubdtype(pts.dtype, np.number):
        raise ValueError(f"landmarks must be numeric, got dtype {pts.dtype}")
    pts = pts.astype(np.float32)
    if not np.all(np.isfinite(pts)):
        raise ValueError("landmarks contain NaN or infinite values")
    return pts


def draw_landmarks(points: np.ndarray, size: int, style: DrawStyle = DrawStyle()) -> np.ndarray:
    """Draw 68 landmarks (pixel coordinates in a `size` x `size` frame) -> uint8 (size, size, 3) RGB."""
    if style.line_width < 1:
        raise ValueError(f"line_width must be >= 1, got {style.line_width}")
    pts = validate_points(points)
    canvas = np.zeros((size, size, 3), np.uint8)
    # Far-off points would overflow int32 and cv2's fixed-point arithmetic: clipped before the
    # cast, their lines keep their direction.
    scaled = np.round(pts * (1 << _SHIFT)).clip(-8 * size << _SHIFT, 9 * size << _SHIFT)
    fixed = scaled.astype(np.int32)
    line_type = cv2.LINE_AA if style.antialias else cv2.LINE_8
    for group in GROUPS:
        poly = fixed[group.start : group.stop].reshape(-1, 1, 2)
        cv2.polylines(canvas, [poly], group.closed, group.color, style.line_width, line_type, _SHIFT)
    return canvas


def draw_batch(points: np.ndarray, size: int, style: DrawStyle = DrawStyle()) -> np.ndarray:
    """(B, 68, 2) -> uint8 (B, size, size, 3)."""
    return np.stack([draw_landmarks(p, size, style) for p in points])
