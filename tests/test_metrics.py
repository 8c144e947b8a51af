"""Self-reenactment metrics (training/metrics.py) behave as a model-card reader would expect.

Real faces: scikit-image's astronaut photo (public domain, bundled with scikit-image) and a few frames
of clips in ../shared/data/faces (tests marked `data`, skipped when that folder is absent).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.data import astronaut

from training.metrics import (
    OUTER_EYE_CORNERS,
    PSNR_CAP_DB,
    ReenactmentReport,
    evaluate_reenactment,
    face_detection_rate,
    identity_similarity,
    landmark_error,
    psnr,
    ssim,
)

FACES = Path(__file__).resolve().parents[2] / "shared/data/faces"
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason=f"test face clips not found at {FACES}")


def read_frames(path: Path, indices: list[int]) -> np.ndarray:
    """RGB uint8 frames at `indices` (ascending) of a video, decoded with PyAV or else OpenCV."""
    wanted, out = set(indices), []
    try:
        import av
    except ImportError:
        cap = cv2.VideoCapture(str(path))
        try:
            for i in range(max(indices) + 1):
                ok, frame = cap.read()
                if not ok:
                    break
                if i in wanted:
                    out.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        finally:
            cap.release()
    else:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    out.append(frame.to_ndarray(format="rgb24"))
                if i >= max(indices):
                    break
    assert len(out) == len(indices), f"could not read frames {indices} of {path}"
    return np.stack(out)


def astronaut_face(size: int = 256) -> np.ndarray:
    """A face-centred square crop of the astronaut photo (face about 0.45 of the side), (1, S, S, 3)."""
    crop = astronaut()[30:222, 126:318]  # dlib's face box there is x 179..266, y 83..170
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)[None]


def noisy(frames: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, frames.shape)
    return np.clip(frames + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def detector():
    from facekit.detect import make_detector

    return make_detector("dlib")


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    if not FACES.is_dir():
        pytest.skip(f"test face clips not found at {FACES}")
    return {
        "dpe_s": read_frames(FACES / "dpe_s.mp4", [0, 100]),  # man, two frames 4 s apart
        "w009": read_frames(FACES / "dreamtalk_mead_w009.mp4", [0]),  # woman
    }


@pytest.fixture(scope="module")
def real_faces(clips: dict[str, np.ndarray]) -> np.ndarray:
    """Three 256 px real faces: the astronaut, one man, one woman."""
    return np.concatenate([astronaut_face(), clips["dpe_s"][:1], clips["w009"]])


@pytest.fixture(scope="module")
def real_points(real_faces: np.ndarray, detector) -> np.ndarray:
    points = []
    for frame in real_faces:
        faces = detector.detect(frame)
        assert faces, "the detector must find the real test faces"
        points.append(faces[0].points)
    return np.stack(points).astype(np.float64)


# ------------------------------------------------------------------------------------- SSIM, PSNR


def test_ssim_is_one_for_identical_frames_and_drops_with_noise() -> None:
    frames = np.concatenate([astronaut_face(64), astronaut_face(64)[:, ::-1]])
    assert ssim(frames, frames) == pytest.approx(1.0)
    light, heavy = ssim(frames, noisy(frames, 8)), ssim(frames, noisy(frames, 32))
    assert 1.0 > light > heavy > 0.0


def test_psnr_is_capped_for_identical_frames_and_drops_with_noise() -> None:
    frames = astronaut_face(64)
    assert psnr(frames, frames) == PSNR_CAP_DB  # finite: a perfect frame counts in a mean
    light, heavy = psnr(frames, noisy(frames, 4)), psnr(frames, noisy(frames, 32))
    assert light > heavy
    assert 34 < light < 40  # sigma 4 on 0..255: 20 log10(255 / 4) = 36 dB before clipping
    assert 15 < heavy < 22


def test_pixel_metrics_reject_mismatched_batches() -> None:
    with pytest.raises(ValueError, match="shape"):
        ssim(astronaut_face(64), astronaut_face(32))
    with pytest.raises(ValueError, match="uint8"):
        psnr(astronaut_face(64).astype(np.float32), astronaut_face(64).astype(np.float32))


# ---------------------------------------------------------------------- detection and landmark NME


def test_astronaut_is_detected_and_a_blank_frame_is_a_miss(detector) -> None:
    face = astronaut_face()
    assert face_detection_rate(face, detector) == 1.0
    blank = np.zeros_like(face)
    assert face_detection_rate(np.concatenate([face, blank]), detector) == 0.5


@pytest.mark.data
def test_real_faces_are_all_detected_even_when_small(real_faces: np.ndarray, detector) -> None:
    assert face_detection_rate(real_faces, detector) == 1.0
    small = np.stack([cv2.resize(f, (96, 96), interpolation=cv2.INTER_AREA) for f in real_faces])
    assert face_detection_rate(small, detector) == 1.0  # upscaled to 256 before detection


@pytest.mark.data
def test_landmark_error_is_small_for_matching_pose_and_large_for_shifted(
    real_faces: np.ndarray, real_points: np.ndarray, detector
) -> None:
    # "Generated" frames at 128 px against driving landmarks found at 256 px: also checks the
    # upscale-detect-map-back path keeps points in the frames' own pixel space.
    small = np.stack([cv2.resize(f, (128, 128), interpolation=cv2.INTER_AREA) for f in real_faces])
    driving = real_points / 2
    mean, per_frame = landmark_error(small, driving, detector)
    assert per_frame.shape == (3,)
    assert mean < 0.05
    assert np.all(per_frame < 0.05)

    i, j = OUTER_EYE_CORNERS
    iod = np.linalg.norm(driving[:, i] - driving[:, j], axis=-1)
    shifted = driving + (0.2 * iod)[:, None, None] * np.array([0.6, 0.8])  # 20% of IOD, diagonal
    mean_shifted, _ = landmark_error(small, shifted, detector)
    assert 0.15 < mean_shifted < 0.25


@pytest.mark.data
def test_landmark_error_is_nan_for_a_frame_without_face(
    real_faces: np.ndarray, real_points: np.ndarray, detector
) -> None:
    frames = np.concatenate([real_faces[:1], np.zeros_like(real_faces[:1])])
    points = np.concatenate([real_points[:1], real_points[:1]])
    mean, per_frame = landmark_error(frames, points, detector)
    assert per_frame[0] < 0.05 and math.isnan(per_frame[1])
    assert mean == pytest.approx(per_frame[0])
    with pytest.raises(ValueError, match="driving_points"):
        landmark_error(frames, real_points[:1], detector)


# ------------------------------------------------------------------------------------------- CSIM


def test_identity_similarity_of_a_face_with_itself_is_one() -> None:
    face = astronaut_face()
    assert identity_similarity(face, face) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(identity_similarity(np.zeros_like(face), face))  # no face: nothing to compare


@pytest.mark.data
def test_identity_similarity_separates_people(clips: dict[str, np.ndarray]) -> None:
    man_a, man_b = clips["dpe_s"][:1], clips["dpe_s"][1:]
    woman = clips["w009"]
    same = identity_similarity(man_a, man_b)  # same man, 4 s later
    different = identity_similarity(man_a, woman)
    assert same > 0.93
    assert different < 0.88
    assert same - different > 0.1
    assert identity_similarity(astronaut_face(), woman) < 0.92  # two women, still distinct


# ------------------------------------------------------------------------------------------ report


@pytest.mark.data
def test_evaluate_reenactment_of_real_frames_is_perfect(
    real_faces: np.ndarray, real_points: np.ndarray, detector
) -> None:
    report = evaluate_reenactment(real_faces, real_faces, real_points, detector)
    assert isinstance(report, ReenactmentReport)
    assert report.frames == 3
    assert report.face_detection_rate == 1.0
    assert report.landmark_nme < 0.01  # same frames, same detector
    assert report.ssim == pytest.approx(1.0)
    assert report.psnr == PSNR_CAP_DB
    assert report.csim == pytest.approx(1.0, abs=1e-6)
    assert set(report.as_dict()) == {"frames", "face_detection_rate", "landmark_nme", "ssim", "psnr", "csim"}
