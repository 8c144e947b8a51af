"""Piecewise-affine face warp: a reference image moved onto driving landmarks, and its dense field.

Two users:

- The evaluation suite's "classical warp" baseline row: for each driving frame, the reference
  frame whose landmarks are nearest in pose and expression (`nearest_reference`) is warped
  piecewise-affinely onto the driving landmarks (`warp_image`). A learned generator has to beat
  this to be worth its cost.
- A warp-guided generator: `dense_map` is the backward field it samples the reference with
  (divide by the size and map to [-1, 1] for a neural network's grid sampling; see below).

Control points (`control_points`), the same scheme for source and target:

- the 68 iBUG landmarks (facekit.layout);
- 7 forehead points, so that the forehead and hair follow the head: on an arc above the eye line,
  spanning the jaw's top ends (points 0 and 16), at `FOREHEAD_HEIGHTS` times the eye-line-to-
  nose-base distance (point 33), perpendicular to the eye line. Only points that expression
  barely moves (eyes, jaw tops, nose base) place them: a raised brow or an open mouth does not
  drag the hair along, while roll, scale, yaw (jaw tops) and pitch (the nose distance
  foreshortens) do move them;
- 16 border anchors, the corners and quarter points of the image's outer edge, identical in
  source and target, so the background stays put.

One triangulation, Delaunay of the source's control points (cached, so a fixed reference is
triangulated once), shared by the target. Being Delaunay of all points, a few triangles with a
border anchor reach a little inside the face's outline (at the temples, about 1% of it on face
crops); everywhere else the face follows its own points only. Target triangles fold over or
collapse when the driving pose differs: they are painted first (folded, then collapsed, then
proper ones from the most squeezed), so each pixel takes a properly oriented triangle wherever
one covers it (one always does while the source points lie inside the image); a collapsed
triangle samples with a pure translation; pixels no triangle covers (source points outside the
image can leave some) sample themselves. The field is clipped to [-size, 2 size - 1]: no input
that passes validation gives NaN or a wild value.

Conventions: points are pixel (x, y), y down, pixel-centre convention as in facekit.crop (pixel
column i covers [i - 0.5, i + 0.5]), so the image's outer edge is at -0.5 and size - 0.5. A map
holds, for each output pixel (row y, column x), the source position (x, y) to sample:
out[y, x] = image(map[y, x]), which is what `cv2.remap(image, map, None, ...)` does. For torch's
`grid_sample(..., align_corners=False)` use grid = (map + 0.5) * 2 / size - 1.

Cost (`python -m facekit.warp` prints the medians): one Delaunay per new source (0.3-0.7 ms,
then cached with everything else that depends on the source alone); per frame one compiled call
(facekit/warp_jit.py) takes the target's control points, each triangle's affine, the paint
order, ~170 triangles painted into a uint8 label image exactly as `cv2.fillConvexPoly` paints
them, and each pixel's affine at the pixel. Done with OpenCV and numpy it was ~170 OpenCV calls
(0.85-3 us of binding overhead each) and a few dozen numpy passes. Medians of 200 runs with a
cached source on a 2-vCPU Xeon shared with other jobs: 128 px 0.11-0.19 ms against 0.51-1.0 ms
before (same runs, alternating), 0.27 ms with the cv2.remap. The maps are those of the numpy and
OpenCV code (124 cases: 122 the same bit for bit, 2 within 1e-13 px). The first call in a
process compiles the loop (6-12 s cold, ~0.3 s from numba's on-disk cache): `warm_up` does that
before a server takes frames. `nearest_reference` is one batched similarity fit.
"""

from __future__ import annotations

import functools
import time

import cv2
import numpy as np
from scipy.spatial import Delaunay

from facekit import warp_jit
from facekit.layout import LEFT_EYE, NUM_POINTS, RIGHT_EYE
from facekit.motion import STABLE_POINTS, fit_similarity

NUM_FOREHEAD = 7
# Forehead arc: height above the eye line, in eye-line-to-nose-base distances, at fractions
# 0, 1/6, .., 1 of the way from jaw point 0 to jaw point 16 (an ellipse: temples low, centre high).
# On face crops (CROP_SCALE 1.8) the centre lands in the upper forehead, below the hairline.
# Without these points, 18 real frame pairs 1 s apart warp to a mean SSIM of 0.876, with 0.884.
_SIDE_HEIGHT, _CENTRE_HEIGHT = 1.0, 1.4
_SPAN = np.linspace(0.0, 1.0, NUM_FOREHEAD)
FOREHEAD_HEIGHTS = _SIDE_HEIGHT + (_CENTRE_HEIGHT - _SIDE_HEIGHT) * np.sqrt(1 - (2 * _SPAN - 1) ** 2)
# Border anchors as fractions of the outer edge: corners and quarter points, clockwise from the
# top-left. Quarter points, not just midpoints, stop the face's motion from spreading far into the
# background (18 real frame pairs 1 s apart: mean SSIM to the real frame 0.878 -> 0.884).
_STEPS = (0.0, 0.25, 0.5, 0.75)
_ANCHORS = np.array(
    [(q, 0.0) for q in _STEPS]
    + [(1.0, q) for q in _STEPS]
    + [(1 - q, 1.0) for q in _STEPS]
    + [(0.0, 1 - q) for q in _STEPS]
)
NUM_ANCHORS = len(_ANCHORS)  # 16
NUM_CONTROL = NUM_POINTS + NUM_FOREHEAD + NUM_ANCHORS  # 91
_SHIFT = 4  # fraction bits of the painted corners (cv2.fillConvexPoly's `shift`)
_MIN_DET = 1e-3  # |2 x target triangle area| in px^2 below which a triangle counts as collapsed


def _check_points(points: np.ndarray, name: str, *, batched: bool = False) -> np.ndarray:
    pts = np.asarray(points, np.float64)
    if pts.shape[-2:] != (NUM_POINTS, 2) or (not batched and pts.ndim != 2):
        shape = f"(..., {NUM_POINTS}, 2)" if batched else f"({NUM_POINTS}, 2)"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(pts.shape)}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return pts


def _check_size(size: int) -> int:
    if int(size) != size or size < 2:
        raise ValueError(f"size must be an integer >= 2, got {size}")
    return int(size)


def forehead_points(points: np.ndarray) -> np.ndarray:
    """Forehead control points of faces (..., 68, 2) -> (..., NUM_FOREHEAD, 2) float64, from above
    jaw point 0 to above jaw point 16."""
    return _forehead(_check_points(points, "points", batched=True))


def _forehead(pts: np.ndarray) -> np.ndarray:
    # Points as complex numbers x + iy: multiplying by a unit e rotates by e's angle, so
    # (z - c) * conj(e) is z in the face's frame (real: along the eye line, imag: towards the chin).
    z = np.ascontiguousarray(pts).view(np.complex128)[..., 0]  # (..., 68)
    right, left = z[..., RIGHT_EYE].mean(-1), z[..., LEFT_EYE].mean(-1)  # (...,) eye centres
    centre, axis = (right + left) / 2, left - right
    length = np.abs(axis)
    e = np.where(length > 1e-6, axis / np.maximum(length, 1e-6), 1.0)[..., None]  # (..., 1) +x of the face
    frame = (z[..., [0, 16, 33]] - centre[..., None]) * e.conj()  # (..., 3) jaw tops, nose base
    across = frame[..., :1].real + (frame[..., 1:2].real - frame[..., :1].real) * _SPAN  # (..., 7)
    up = FOREHEAD_HEIGHTS * frame[..., 2:].imag  # (..., 7) heights above the eye line
    forehead = centre[..., None] + e * (across - 1j * up)  # (..., 7) complex
    return forehead[..., None].view(np.float64)


def border_anchors(size: int) -> np.ndarray:
    """The fixed anchors on the outer edge of a size x size image -> (NUM_ANCHORS, 2) float64."""
    return _ANCHORS * _check_size(size) - 0.5


def control_points(points: np.ndarray, size: int) -> np.ndarray:
    """Landmarks (..., 68, 2) in a size x size image -> (..., NUM_CONTROL, 2) float64: landmarks,
    forehead, border anchors; clipped to [-8 size, 9 size] to keep cv2's fixed point in range."""
    return _control(_check_points(points, "points", batched=True), _check_size(size))


def _control(pts: np.ndarray, size: int) -> np.ndarray:
    pts = np.clip(pts, -8 * size, 9 * size)  # first, so that the forehead's sums cannot overflow
    anchors = np.broadcast_to(_ANCHORS * size - 0.5, (*pts.shape[:-2], NUM_ANCHORS, 2))
    ctrl = np.concatenate([pts, _forehead(pts), anchors], -2)
    return np.clip(ctrl, -8 * size, 9 * size)


@functools.lru_cache(maxsize=64)
def _delaunay(key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Delaunay triangles (T, 3) of the float64 points in `key`, each ordered to a signed area >= 0,
    and those areas x 2 (T,); qhull leaves duplicate points out. Both read-only."""
    pts = np.frombuffer(key, np.float64).reshape(-1, 2)
    triangles = Delaunay(pts).simplices.astype(np.intp)  # (T, 3)
    edges = pts[triangles[:, 1:]] - pts[triangles[:, :1]]  # (T, 2, 2) as rows
    area = edges[:, 0, 0] * edges[:, 1, 1] - edges[:, 0, 1] * edges[:, 1, 0]  # (T,) signed, x 2
    triangles[area < 0] = triangles[area < 0][:, [0, 2, 1]]
    area = np.abs(area)
    for array in (triangles, area):
        array.setflags(write=False)
    return triangles, area


def triangulate(src_control: np.ndarray) -> np.ndarray:
    """Delaunay triangles (T, 3) of source control points (NUM_CONTROL, 2), each with a
    non-negative signed area in the source; cached per source (a fixed reference costs one)."""
    return _delaunay(np.ascontiguousarray(src_control, np.float64).tobytes())[0]


@functools.lru_cache(maxsize=64)
def _source(key: bytes, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a warp needs of its source landmarks (float64 bytes of (68, 2), checked) alone: the
    Delaunay triangles (T, 3) of their control points, the source triangles' corners as columns
    (T, 2, 3) and their areas x 2 (T,). Cached: a fixed reference costs one, not one a frame."""
    control = np.empty((NUM_CONTROL, 2))  # as the target's are made: the same code, the same bits
    warp_jit.control(
        np.frombuffer(key, np.float64).reshape(NUM_POINTS, 2),
        size,
        _SPAN,
        FOREHEAD_HEIGHTS,
        _ANCHORS,
        control,
    )
    triangles, area = _delaunay(control.tobytes())
    corners = np.swapaxes(control[triangles], 1, 2).copy()
    corners.setflags(write=False)
    return triangles, corners, area


def dense_map(src_points: np.ndarray, dst_points: np.ndarray, size: int) -> np.ndarray:
    """Backward map of the warp taking `src_points` onto `dst_points` (both (68, 2), pixels of a
    size x size image) -> (size, size, 2) float32: map[y, x] = source (x, y) to sample."""
    size = _check_size(size)
    src = np.ascontiguousarray(_check_points(src_points, "src_points"))
    triangles, src_corners, src_area = _source(src.tobytes(), size)  # (T, 3), (T, 2, 3), (T,)
    dst = np.ascontiguousarray(_check_points(dst_points, "dst_points"))
    out = np.empty((size, size, 2), np.float32)
    warp_jit.dense_map(
        dst, size, triangles, src_corners, src_area, _SPAN, FOREHEAD_HEIGHTS, _ANCHORS, _MIN_DET, _SHIFT, out
    )
    return out


def warm_up() -> None:
    """Compile dense_map's loop (or load it from numba's cache) now, not on the first frame."""
    angle = np.linspace(0.0, 2 * np.pi, NUM_POINTS, endpoint=False)
    points = np.stack([4 + 3 * np.cos(angle), 4 + 3 * np.sin(angle)], -1)  # distinct, in 8 px
    dense_map(points, points[::-1].copy(), 8)


def warp_image(image: np.ndarray, src_points: np.ndarray, dst_points: np.ndarray) -> np.ndarray:
    """Warp a uint8 (S, S, 3) image whose face has landmarks `src_points` onto `dst_points`
    (both (68, 2), pixels) -> uint8 (S, S, 3); bilinear, border pixels replicated outwards."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.shape[0] != img.shape[1]:
        raise ValueError(f"expected a square uint8 image (S, S, 3), got {img.dtype} {tuple(img.shape)}")
    field = dense_map(src_points, dst_points, img.shape[0])
    return _remap(img, field)


def _remap(image: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Bilinear cv2.remap with replicated border; `field` (H, W, 2) float32 is its only map.

    A 3-channel image is remapped as RGBA and converted back: OpenCV 5's bilinear remap computes
    each channel alike, so the bytes are the same, and its 4-channel loop is faster (128 px: 64 us
    against 88 with both conversions; 256 px: 205 against 344)."""
    four = image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 64
    source = cv2.cvtColor(image, cv2.COLOR_RGB2RGBA) if four else image
    # cv2's stubs insist on a second map; OpenCV documents None for a single (x, y) map.
    out = cv2.remap(source, field, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)  # type: ignore[call-overload]
    return np.asarray(cv2.cvtColor(out, cv2.COLOR_RGBA2RGB) if four else out)


def nearest_reference(ref_points: np.ndarray, driving: np.ndarray) -> int:
    """Index of the reference (T, 68, 2) nearest to `driving` (68, 2) in pose and expression.

    Each reference is brought onto the driving frame by the least-squares similarity of their
    `STABLE_POINTS` (facekit.motion); the distance is then the mean squared distance over all 68
    points, in driving pixels. Ties go to the lowest index. A reference whose stable points all
    coincide has no similarity and is a ValueError.
    """
    refs = np.asarray(ref_points, np.float64)
    if refs.ndim != 3 or refs.shape[1:] != (NUM_POINTS, 2) or len(refs) == 0:
        raise ValueError(f"ref_points must have shape (T, {NUM_POINTS}, 2) with T >= 1, got {refs.shape}")
    if not np.isfinite(refs).all():
        raise ValueError("ref_points contains NaN or infinite values")
    drv = _check_points(driving, "driving")
    a, t = fit_similarity(refs[:, STABLE_POINTS], drv[STABLE_POINTS])  # (T, 2, 2), (T, 2)
    aligned = refs @ np.swapaxes(a, 1, 2) + t[:, None]  # (T, 68, 2)
    distance = ((aligned - drv) ** 2).sum(-1).mean(-1)  # (T,)
    return int(np.argmin(distance))


def warp_nearest(refs: np.ndarray, ref_points: np.ndarray, driving: np.ndarray) -> np.ndarray:
    """For each driving frame's landmarks (N, 68, 2): the nearest reference of `refs` (T, S, S, 3)
    uint8 with landmarks `ref_points` (T, 68, 2), warped onto them -> uint8 (N, S, S, 3)."""
    refs = np.asarray(refs)
    drv = np.asarray(driving, np.float64)
    if drv.ndim != 3 or drv.shape[1:] != (NUM_POINTS, 2):
        raise ValueError(f"driving must have shape (N, {NUM_POINTS}, 2), got {drv.shape}")
    if refs.ndim != 4 or len(refs) != len(ref_points):
        raise ValueError(f"refs must be (T, S, S, 3) with one landmark set each, got {refs.shape}")
    picks = [0] * len(drv) if len(refs) == 1 else [nearest_reference(ref_points, p) for p in drv]
    out = np.empty((len(drv), *refs.shape[1:]), np.uint8)
    for i, (k, p) in enumerate(zip(picks, drv, strict=True)):
        out[i] = warp_image(np.ascontiguousarray(refs[k]), ref_points[k], p)
    return out


def _benchmark(runs: int = 200) -> None:
    """Median time of dense_map, and of dense_map + cv2.remap, at 128 and 256 px: the demo driver's
    frame 0 (facekit/assets/demo_driver.npz, a face crop) warped onto its frames 1, 2, ..."""
    from pathlib import Path

    from facekit.crop import resize_points

    driver = np.load(Path(__file__).parent / "assets" / "demo_driver.npz")["points"]  # (N, 68, 2), 256 px
    for size in (128, 256):
        points = resize_points(driver, 256, size)
        image = np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)
        times: dict[str, list[float]] = {"dense_map": [], "dense_map + remap": []}
        for i in range(runs):
            start = time.perf_counter()
            field = dense_map(points[0], points[1 + i % (len(points) - 1)], size)
            mid = time.perf_counter()
            _remap(image, field)
            end = time.perf_counter()
            times["dense_map"].append(mid - start)
            times["dense_map + remap"].append(end - start)
        report = ", ".join(f"{k} {1e3 * float(np.median(v)):.3f} ms" for k, v in times.items())
        print(f"{size} px, median of {runs} (source triangulated once, then cached): {report}")


if __name__ == "__main__":
    _benchmark()
