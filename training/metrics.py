"""Validation metrics of self-reenactment, for the model card (torch-free: numpy, scikit-image, dlib).

Self-reenactment: a held-out frame's own landmarks drive the generator, so each generated frame has a
real frame of the same person in the same pose to compare with. Inputs everywhere are uint8 RGB
frames of shape (N, S, S, 3), generated and real, and the driving landmarks (N, 68, 2) in the same
pixel space (x, y), iBUG 300-W order.

- `face_detection_rate`: does a face detector still see a face in the generated frames?
- `landmark_error`: do the generated faces follow the driving pose (NME, normalised by the outer-eye-
  corner distance of the driving landmarks)?
- `ssim`, `psnr`: pixel fidelity to the real frame.
- `identity_similarity` (CSIM): cosine similarity of dlib face-recognition embeddings, generated vs real.

dlib's HOG detector misses faces smaller than about 80 px, so the detector-based metrics upscale
frames smaller than `upscale_to` (default 256) with bicubic interpolation before detecting, and map
the points back to the frames' own pixel space.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from skimage.metrics import structural_similarity

if TYPE_CHECKING:
    from facekit.detect import LandmarkDetector

# Outer eye corners in the iBUG 300-W layout: the normaliser of the landmark error ("inter-ocular").
OUTER_EYE_CORNERS = (36, 45)
NUM_POINTS = 68
_RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
_SHAPE_MODEL = "shape_predictor_68_face_landmarks.dat"
# PSNR of a frame pair is capped here: a bit-exact frame (MSE 0) would be infinite, and a mean that
# skips non-finite values (the evaluation's) would drop the perfect frame instead of counting it.
# 100 dB is beyond any real error at the sizes scored: one grey level off in one pixel of a
# 128 px frame is 95 dB (101 dB at 256 px, where it is capped too).
PSNR_CAP_DB = 100.0


# ----------------------------------------------------------------------------------------- inputs


def _check_frames(frames: np.ndarray, name: str = "frames") -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim == 3 and arr.shape[-1] == 3:  # a single frame
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{name}: expected uint8 RGB frames (N, H, W, 3), got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8, got {arr.dtype}")
    return arr


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _check_frames(a, "a"), _check_frames(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"frame batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if len(a) == 0:
        raise ValueError("no frames given")
    return a, b


def _check_points(points: np.ndarray, n: int) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape != (n, NUM_POINTS, 2):
        raise ValueError(f"driving_points: expected shape ({n}, {NUM_POINTS}, 2), got {tuple(pts.shape)}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("driving_points contain NaN or infinite values")
    return pts


def _upscaled(frame: np.ndarray, upscale_to: int) -> tuple[np.ndarray, float]:
    """Return `frame` bicubically enlarged so its longer side is `upscale_to` (if smaller), and the factor."""
    longest = max(frame.shape[:2])
    if upscale_to <= 0 or longest >= upscale_to:
        return np.ascontiguousarray(frame), 1.0
    factor = upscale_to / longest
    h, w = frame.shape[:2]
    size = (round(w * factor), round(h * factor))
    return cv2.resize(frame, size, interpolation=cv2.INTER_CUBIC), factor


def _detect_points(
    frames: np.ndarray, detector: LandmarkDetector, upscale_to: int
) -> list[np.ndarray | None]:
    """Landmarks (68, 2) of the largest face in each frame, in the frame's pixel space; None where missed."""
    from facekit.detect import NoFaceError

    found: list[np.ndarray | None] = []
    for frame in frames:
        image, factor = _upscaled(frame, upscale_to)
        try:
            faces = detector.detect(image)
        except NoFaceError:
            faces = []
        found.append(np.asarray(faces[0].points, np.float64) / factor if faces else None)
    return found


# --------------------------------------------------------------------------------------- metrics


def face_detection_rate(frames: np.ndarray, detector: LandmarkDetector, *, upscale_to: int = 256) -> float:
    """Share of `frames` (0..1) in which `detector` finds at least one face.

    Frames whose longer side is below `upscale_to` are first enlarged to it with cv2.INTER_CUBIC, as
    dlib's HOG detector misses faces under about 80 px; pass upscale_to=0 to detect at native size.
    """
    arr = _check_frames(frames)
    if len(arr) == 0:
        raise ValueError("no frames given")
    found = _detect_points(arr, detector, upscale_to)
    return sum(p is not None for p in found) / len(found)


def _nme(found: list[np.ndarray | None], driving: np.ndarray) -> tuple[float, np.ndarray]:
    i, j = OUTER_EYE_CORNERS
    iod = np.linalg.norm(driving[:, i] - driving[:, j], axis=-1)
    if np.any(iod <= 1e-6):
        bad = np.flatnonzero(iod <= 1e-6).tolist()
        raise ValueError(f"driving landmarks have zero inter-ocular distance in frames {bad}")
    per_frame = np.full(len(found), np.nan)
    for k, points in enumerate(found):
        if points is not None:
            per_frame[k] = np.linalg.norm(points - driving[k], axis=-1).mean() / iod[k]
    hits = per_frame[np.isfinite(per_frame)]
    return (float(hits.mean()) if hits.size else math.nan), per_frame


def landmark_error(
    frames: np.ndarray, driving_points: np.ndarray, detector: LandmarkDetector, *, upscale_to: int = 256
) -> tuple[float, np.ndarray]:
    """Normalised mean landmark error (NME) of the generated `frames` against the driving landmarks.

    For each frame: landmarks are detected on the generated frame (largest face; frames smaller than
    `upscale_to` are enlarged with cv2.INTER_CUBIC for detection and the points mapped back), and the
    error is the mean Euclidean point-to-point distance to `driving_points` divided by the inter-ocular
    distance of the driving landmarks, measured between the OUTER eye corners (points 36 and 45).

    Returns (mean over frames with a detected face, per-frame errors (N,) with NaN where no face was
    found). The mean is NaN when no frame has a face; misses are reported by `face_detection_rate`.
    """
    arr = _check_frames(frames)
    driving = _check_points(driving_points, len(arr))
    return _nme(_detect_points(arr, detector, upscale_to), driving)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over frames (skimage, 7x7 window, channels averaged, data_range=255); 1 = identical."""
    a, b = _check_pair(a, b)
    scores = [structural_similarity(x, y, channel_axis=-1, data_range=255) for x, y in zip(a, b, strict=True)]
    return float(np.mean(scores))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of the per-frame PSNR in dB (peak 255), each capped at PSNR_CAP_DB (an
    identical frame pair scores the cap, finite, so it counts in every mean)."""
    a, b = _check_pair(a, b)
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = np.mean(diff * diff, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        per_frame = np.minimum(10.0 * np.log10(255.0**2 / mse), PSNR_CAP_DB)
    return float(np.mean(per_frame))


# ------------------------------------------------------------------------------- identity (CSIM)


@functools.lru_cache(maxsize=1)
def _face_models() -> tuple[Any, Any, Any]:
    """dlib's HOG face detector, 68-point shape predictor and ResNet face-recognition model (loaded once)."""
    import dlib

    from facekit.detect import face_recognition_models_dir

    models = face_recognition_models_dir()
    for name in (_SHAPE_MODEL, _RECOGNITION_MODEL):
        if not (models / name).is_file():
            raise FileNotFoundError(f"dlib model {name} not found in {models}")
    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(str(models / _SHAPE_MODEL)),
        dlib.face_recognition_model_v1(str(models / _RECOGNITION_MODEL)),
    )


def face_embedding(frame: np.ndarray, *, upscale_to: int = 256) -> np.ndarray | None:
    """dlib's 128-d face-recognition embedding of the largest face in one RGB uint8 frame, or None.

    The face is found with dlib's HOG detector (on the frame enlarged to `upscale_to` with
    cv2.INTER_CUBIC if smaller; retried with one pyramid up-sampling if missed), its 68 points from
    dlib's shape predictor align the 150x150 face chip the recognition network expects.
    """
    arr = _check_frames(frame)
    if len(arr) != 1:
        raise ValueError(f"face_embedding takes one frame, got {len(arr)}")
    face_detector, shape_predictor, recognizer = _face_models()
    image, _ = _upscaled(arr[0], upscale_to)
    rects = face_detector(image, 0)
    if len(rects) == 0:
        rects = face_detector(image, 1)
    if len(rects) == 0:
        return None
    rect = max(rects, key=lambda r: r.width() * r.height())
    shape = shape_predictor(image, rect)
    return np.asarray(recognizer.compute_face_descriptor(image, shape), np.float64)


def identity_similarity(a: np.ndarray, b: np.ndarray, *, upscale_to: int = 256) -> float:
    """CSIM: cosine similarity of dlib face-recognition embeddings of each frame in `a` and its pair in `b`.

    Averaged over the frame pairs in which a face is found in both frames; NaN if there are none.
    On real 256 px frames: about 0.95-0.99 for two frames of the same person, 0.75-0.88 for different
    people (dlib's embeddings are not unit length, norm about 1.45, so its "same person" threshold,
    Euclidean distance 0.6, corresponds to a cosine of about 0.91). See `face_embedding` for detection
    and alignment.
    """
    a, b = _check_pair(a, b)
    scores = []
    for x, y in zip(a, b, strict=True):
        ex = face_embedding(x, upscale_to=upscale_to)
        if ex is None:
            continue
        ey = face_embedding(y, upscale_to=upscale_to)
        if ey is None:
            continue
        scores.append(float(ex @ ey / (np.linalg.norm(ex) * np.linalg.norm(ey))))
    return float(np.mean(scores)) if scores else math.nan


# ---------------------------------------------------------------------------------------- report


@dataclass
class ReenactmentReport:
    """Self-reenactment metrics of one validation set; NaN where a metric had nothing to measure."""

    frames: int  # number of frame triples (generated, real, driving landmarks) evaluated
    face_detection_rate: float  # share of generated frames with a detected face, 0..1
    landmark_nme: float  # mean NME vs driving landmarks (outer-eye-corner normalised), over detected frames
    ssim: float  # mean SSIM generated vs real
    psnr: float  # mean PSNR in dB generated vs real (each frame capped at PSNR_CAP_DB)
    csim: float  # mean cosine similarity of dlib face embeddings generated vs real

    def as_dict(self) -> dict[str, float | int]:
        """Plain Python numbers keyed by field name (NaN/inf kept as floats)."""
        return dataclasses.asdict(self)


def evaluate_reenactment(
    generated: np.ndarray,
    real: np.ndarray,
    driving_points: np.ndarray,
    detector: LandmarkDetector,
    *,
    upscale_to: int = 256,
) -> ReenactmentReport:
    """All metrics of self-reenactment; landmarks are detected once on the generated frames."""
    generated, real = _check_pair(generated, real)
    driving = _check_points(driving_points, len(generated))
    found = _detect_points(generated, detector, upscale_to)
    nme, _ = _nme(found, driving)
    return ReenactmentReport(
        frames=len(generated),
        face_detection_rate=sum(p is not None for p in found) / len(found),
        landmark_nme=nme,
        ssim=ssim(generated, real),
        psnr=psnr(generated, real),
        csim=identity_similarity(generated, real, upscale_to=upscale_to),
    )
