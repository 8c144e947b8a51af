"""Landmarks from the wire, for avatar photos and animation streams alike: 136 floats -> (68, 2)
points, and the frame size they are measured in; both checked, errors (INVALID_ARGUMENT) say what."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from facekit.layout import NUM_POINTS
from service.errors import invalid

MAX_FRAME_SIDE = 16384


def parse_points(xy: Sequence[float], *, what: str) -> np.ndarray:
    """136 wire floats -> (68, 2) float32, or ServiceError(INVALID_ARGUMENT) saying what is wrong."""
    if len(xy) != 2 * NUM_POINTS:
        raise invalid(
            f"{what}: expected {2 * NUM_POINTS} values ({NUM_POINTS} points as x, y), got {len(xy)}"
            + (f" ({len(xy) // 2} points)" if len(xy) % 2 == 0 else "")
        )
    points = np.asarray(xy, np.float32).reshape(NUM_POINTS, 2)
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        raise invalid(f"{what}: point {int(np.flatnonzero(bad)[0])} is NaN or infinite")
    if np.abs(points).max() > 8 * MAX_FRAME_SIDE:
        raise invalid(f"{what}: coordinates beyond ±{8 * MAX_FRAME_SIDE} pixels")
    return points


def check_frame_size(width: int, height: int, *, what: str) -> tuple[int, int]:
    if not (1 <= width <= MAX_FRAME_SIDE and 1 <= height <= MAX_FRAME_SIDE):
        raise invalid(f"{what}: frame size must be 1-{MAX_FRAME_SIDE} pixels a side, got {width}x{height}")
    return width, height
