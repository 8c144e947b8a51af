"""Landmarks from the wire, for avatar photos and animation streams alike: 136 floats -> (68, 2)
points, and the frame size they are measured in; both checked, errors (INVALID_ARGUMENT) say what.

Points describe a face in a picture: they must lie in that picture or near it (`FRAME_MARGIN` of
its width and height beyond each edge: a face cut off by the edge), so that work derived from them
- a crop around the face, the drawing - is bounded by the picture's size, not by the numbers sent."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from facekit.layout import NUM_POINTS
from service.errors import invalid

MAX_FRAME_SIDE = 16384
FRAME_MARGIN = 0.5  # points may lie up to this fraction of the frame's width (height) outside it


def parse_points(xy: Sequence[float], *, what: str, frame: tuple[int, int] | None = None) -> np.ndarray:
    """136 wire floats -> (68, 2) float32, or ServiceError(INVALID_ARGUMENT) saying what is wrong.
    With `frame` (width, height), the points must lie within it and its margin (`in_frame`)."""
    if len(xy) != 2 * NUM_POINTS:
        raise invalid(
            f"{what}: expected {2 * NUM_POINTS} values ({NUM_POINTS} points as x, y), got {len(xy)}"
            + (f" ({len(xy) // 2} points)" if len(xy) % 2 == 0 else "")
        )
    points = np.asarray(xy, np.float32).reshape(NUM_POINTS, 2)
    low, high = _accepted(frame)
    if ((points >= low) & (points <= high)).all():  # every frame of a stream: one pass (NaN fails it)
        return points
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        raise invalid(f"{what}: point {int(np.flatnonzero(bad)[0])} is NaN or infinite")
    if np.abs(points).max() > 8 * MAX_FRAME_SIDE:
        raise invalid(f"{what}: coordinates beyond ±{8 * MAX_FRAME_SIDE} pixels")
    return points if frame is None else in_frame(points, frame, what=what)


@functools.lru_cache(maxsize=256)
def _accepted(frame: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest (x, y) parse_points accepts: what its checks below let through (the
    frame's range lies within ±8 MAX_FRAME_SIDE for every frame check_frame_size allows)."""
    low, high = (
        (-np.full(2, 8.0 * MAX_FRAME_SIDE), np.full(2, 8.0 * MAX_FRAME_SIDE))
        if frame is None
        else frame_range(frame)
    )
    low.flags.writeable = high.flags.writeable = False  # shared by every call for this frame size
    return low, high


def frame_range(frame: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest (x, y) a point of a (width, height) frame may have."""
    size = np.asarray(frame, np.float64)
    return -FRAME_MARGIN * size, (1 + FRAME_MARGIN) * size


def in_frame(points: np.ndarray, frame: tuple[int, int], *, what: str) -> np.ndarray:
    """`points` (68, 2), or INVALID_ARGUMENT saying the allowed range when one lies beyond it."""
    low, high = frame_range(frame)
    outside = ((points < low) | (points > high)).any(axis=1)
    if outside.any():
        index = int(np.flatnonzero(outside)[0])
        x, y = (float(v) for v in points[index])
        raise invalid(
            f"{what}: point {index} at ({x:g}, {y:g}) lies outside the allowed range x {low[0]:g} to "
            f"{high[0]:g}, y {low[1]:g} to {high[1]:g} (the {frame[0]}x{frame[1]} frame and "
            f"{FRAME_MARGIN:g} of its width and height beyond each edge)"
        )
    return points


def check_frame_size(width: int, height: int, *, what: str) -> tuple[int, int]:
    if not (1 <= width <= MAX_FRAME_SIDE and 1 <= height <= MAX_FRAME_SIDE):
        raise invalid(f"{what}: frame size must be 1-{MAX_FRAME_SIDE} pixels a side, got {width}x{height}")
    return width, height
