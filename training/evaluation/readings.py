"""What dlib sees in a frame: its 68 landmarks and its 128-d face descriptor, read once per frame.

Every figure of the evaluation suite that needs a face network comes from one `read_faces` pass
(torch-free: dlib's HOG detector, 68-point shape predictor and ResNet face-recognition model from
`face-recognition-models`, see training.metrics). Frames smaller than `upscale_to` are enlarged
bicubically first (HOG misses faces under ~80 px); points are mapped back to the frame's pixels.

- identity distance: Euclidean distance between a frame's descriptor and a reference descriptor
  (the mean over the reference frames). dlib's own threshold for "same person" is 0.6; frames of
  one person score ~0.2-0.35, different people ~0.7-0.9.
- NME: mean point distance between the landmarks read on a generated frame and those read on the
  real frame, over the real frame's outer-eye-corner distance (points 36 and 45).
- mouth opening: mean gap of the three inner-lip point pairs over the outer-eye-corner distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.metrics import OUTER_EYE_CORNERS, _check_frames, _face_models, _upscaled

_INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))  # upper / lower inner-lip points


@dataclass(frozen=True)
class FaceReading:
    """dlib's view of one frame; both None when no face was found."""

    points: np.ndarray | None  # (68, 2) float64, frame pixels
    descriptor: np.ndarray | None  # (128,) float64

    @property
    def found(self) -> bool:
        return self.points is not None


def read_faces(frames: np.ndarray, *, upscale_to: int = 256) -> list[FaceReading]:
    """Landmarks and descriptor of the largest face in each uint8 RGB frame (N, H, W, 3)."""
    arr = _check_frames(frames)
    detector, predictor, recognizer = _face_models()
    out = []
    for frame in arr:
        image, factor = _upscaled(frame, upscale_to)
        rects = detector(image, 0)
        if len(rects) == 0:
            rects = detector(image, 1)
        if len(rects) == 0:
            out.append(FaceReading(None, None))
            continue
        rect = max(rects, key=lambda r: r.width() * r.height())
        shape = predictor(image, rect)
        points = np.array([(p.x, p.y) for p in shape.parts()], np.float64) / factor
        descriptor = np.asarray(recognizer.compute_face_descriptor(image, shape), np.float64)
        out.append(FaceReading(points, descriptor))
    return out


def detection_rate(readings: list[FaceReading]) -> float:
    return sum(r.found for r in readings) / len(readings) if readings else float("nan")


def mean_descriptor(readings: list[FaceReading]) -> np.ndarray | None:
    """Mean descriptor of the frames with a face (the reference of identity figures), or None."""
    found = [r.descriptor for r in readings if r.descriptor is not None]
    return np.mean(found, axis=0) if found else None


def identity(readings: list[FaceReading], reference: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (distance, cosine) of each descriptor to `reference`; NaN where no face."""
    dist = np.full(len(readings), np.nan)
    cos = np.full(len(readings), np.nan)
    if reference is None:
        return dist, cos
    for i, r in enumerate(readings):
        if r.descriptor is not None:
            dist[i] = np.linalg.norm(r.descriptor - reference)
            cos[i] = r.descriptor @ reference / (np.linalg.norm(r.descriptor) * np.linalg.norm(reference))
    return dist, cos


def eye_distance(points: np.ndarray) -> np.ndarray:
    """Outer-eye-corner distance of (..., 68, 2) landmarks."""
    i, j = OUTER_EYE_CORNERS
    return np.linalg.norm(points[..., i, :] - points[..., j, :], axis=-1)


def paired_nme(generated: list[FaceReading], real: list[FaceReading]) -> np.ndarray:
    """Per-frame NME of generated vs real landmarks (both read by dlib); NaN where either is missing."""
    out = np.full(len(generated), np.nan)
    for i, (g, r) in enumerate(zip(generated, real, strict=True)):
        if g.points is not None and r.points is not None:
            out[i] = np.linalg.norm(g.points - r.points, axis=-1).mean() / max(eye_distance(r.points), 1e-6)
    return out


def mouth_opening(points: np.ndarray) -> np.ndarray:
    """(..., 68, 2) -> (...,) inner-lip gap over the outer-eye-corner distance."""
    pts = np.asarray(points, np.float64)
    gaps = [np.linalg.norm(pts[..., a, :] - pts[..., b, :], axis=-1) for a, b in _INNER_LIP_PAIRS]
    return np.mean(gaps, axis=0) / np.maximum(eye_distance(pts), 1e-6)


def reading_mouth(readings: list[FaceReading]) -> np.ndarray:
    """Mouth opening per frame from dlib's landmarks; NaN where no face."""
    return np.array([mouth_opening(r.points) if r.points is not None else np.nan for r in readings])


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over the frames where both are finite; NaN if either is constant there."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) < 1e-9 or np.std(b[ok]) < 1e-9:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])
