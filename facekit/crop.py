"""Face-centred square crops and the matching landmark transform.

Coordinates: a landmark (x, y) is in pixel-centre convention (pixel column i covers [i - 0.5, i + 0.5]).
A crop box (cx, cy, side) is snapped to whole pixels: it covers columns x0 .. x0 + side - 1 with
x0 = cx - side / 2 an integer (rows likewise), so cropping is slicing + one cv2.resize, and
`transform_points` follows cv2.resize's own pixel mapping exactly:

    u = (x - x0 + 0.5) * size / side - 0.5

One box per clip (the median over its frames) keeps crops temporally stable.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from facekit.layout import NUM_POINTS

CROP_SCALE = 1.8  # crop side / landmark extent: training, preprocessing, export and serving agree


class CropBox(NamedTuple):
    cx: float  # box centre, pixels; cx - side / 2 is a whole number
    cy: float
    side: int  # square side, pixels


def crop_box(points: np.ndarray, scale: float = CROP_SCALE, *, shift_y: float = 0.0) -> CropBox:
    """A square box around the landmarks of one frame (68, 2) or of a clip (N, 68, 2).

    side = scale x max(width, height) of the landmarks' bounding box; for a clip the centre and
    the extent are medians over frames. `shift_y` moves the centre down by that fraction of the
    side (negative: up, to show more forehead).
    """
    pts = np.asarray(points, np.float64)
    if pts.ndim == 2:
        pts = pts[None]
    if pts.ndim != 3 or pts.shape[1:] != (NUM_POINTS, 2) or len(pts) == 0:
        raise ValueError(f"expected landmarks (68, 2) or (N, 68, 2), got {tuple(np.shape(points))}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    lo, hi = pts.min(axis=1), pts.max(axis=1)  # (N, 2) each
    centre = np.median((lo + hi) / 2, axis=0)  # (2,)
    extent = float(np.median((hi - lo).max(axis=1)))
    side = max(1, round(scale * extent))
    x0 = round(centre[0] - side / 2)
    y0 = round(centre[1] + shift_y * side - side / 2)
    return CropBox(cx=x0 + side / 2, cy=y0 + side / 2, side=side)


def _origin(box: CropBox | tuple[float, float, float]) -> tuple[int, int, int]:
    """(x0, y0, side) of `box` in whole pixels."""
    cx, cy, side = box
    s = round(side)
    if s < 1:
        raise ValueError(f"crop side must be >= 1, got {side}")
    return round(cx - s / 2), round(cy - s / 2), s


def crop(image: np.ndarray, box: CropBox | tuple[float, float, float], size: int) -> np.ndarray:
    """Cut `box` out of `image` (H, W, C) and resize to (size, size, C); zeros outside the image."""
    img = np.asarray(image)
    if img.ndim != 3:
        raise ValueError(f"expected an image (H, W, C), got shape {tuple(img.shape)}")
    x0, y0, side = _origin(box)
    h, w = img.shape[:2]
    patch = np.zeros((side, side, img.shape[2]), img.dtype)  # (side, side, C)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    if sx0 < sx1 and sy0 < sy1:
        patch[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[sy0:sy1, sx0:sx1]
    if side == size:
        return patch
    interp = cv2.INTER_AREA if size < side else cv2.INTER_LINEAR
    out = cv2.resize(patch, (size, size), interpolation=interp)
    return out.reshape(size, size, img.shape[2])  # cv2 drops a single channel axis


def transform_points(points: np.ndarray, box: CropBox | tuple[float, float, float], size: int) -> np.ndarray:
    """Image pixel coordinates (..., 2) -> coordinates in `crop(image, box, size)`, float32."""
    x0, y0, side = _origin(box)
    pts = np.asarray(points, np.float64)
    return ((pts - (x0, y0) + 0.5) * (size / side) - 0.5).astype(np.float32)


def untransform_points(
    points: np.ndarray, box: CropBox | tuple[float, float, float], size: int
) -> np.ndarray:
    """Inverse of `transform_points`: crop coordinates (..., 2) -> image pixel coordinates, float32."""
    x0, y0, side = _origin(box)
    pts = np.asarray(points, np.float64)
    return ((pts + 0.5) * (side / size) - 0.5 + (x0, y0)).astype(np.float32)


def crop_face(
    image: np.ndarray, points: np.ndarray, size: int, *, scale: float = CROP_SCALE
) -> tuple[np.ndarray, np.ndarray, CropBox]:
    """The face of one photo as the models see it: (crop uint8 (size, size, C), its landmarks
    (68, 2) float32 in the crop, the box), the box from `crop_box(points, scale)`."""
    box = crop_box(points, scale)
    return crop(image, box, size), transform_points(points, box, size), box


def resize_points(points: np.ndarray, old_size: int, new_size: int) -> np.ndarray:
    """Landmarks of a square old_size image -> the same image cv2.resize'd to new_size, float32."""
    return transform_points(points, CropBox(old_size / 2, old_size / 2, old_size), new_size)
