"""Motion transfer keeps the avatar's face; the synthetic driver talks, blinks and is reproducible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import facekit
from facekit.motion import fit_similarity, synthetic_talking, transfer_motion
from facekit.sequence import LandmarkSequence

DEMO_DRIVER = Path(facekit.__file__).parent / "assets" / "demo_driver.npz"


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """A real neutral face shape: the demo driver's first frame (the astronaut's dlib landmarks)."""
    return LandmarkSequence.load(DEMO_DRIVER).points[0]


def _iod(p: np.ndarray) -> np.ndarray:
    return np.linalg.norm(p[..., 42:48, :].mean(-2) - p[..., 36:42, :].mean(-2), axis=-1)


def _mouth(p: np.ndarray) -> np.ndarray:
    """Inner-lip gap in inter-ocular distances."""
    return np.linalg.norm(p[..., 66, :] - p[..., 62, :], axis=-1) / _iod(p)


def _eyes(p: np.ndarray) -> np.ndarray:
    """Eyelid gap (both eyes, both lid pairs) in inter-ocular distances."""
    pairs = [(37, 41), (38, 40), (43, 47), (44, 46)]
    return sum(np.linalg.norm(p[..., a, :] - p[..., b, :], axis=-1) for a, b in pairs) / _iod(p)


def _eyes_per_jaw(p: np.ndarray) -> np.ndarray:
    """Inter-ocular distance / jaw width: a face-shape ratio that head motion barely changes."""
    return _iod(p) / np.linalg.norm(p[..., 16, :] - p[..., 0, :], axis=-1)


def _peaks(signal: np.ndarray, *, prominence: float) -> int:
    """Local maxima rising at least `prominence` above the lowest point since the previous peak."""
    count, low, high, rising = 0, signal[0], signal[0], True
    for value in signal[1:]:
        if rising:
            high = max(high, value)
            if high - value >= prominence and high - low >= prominence:
                count, rising, low = count + 1, False, value
        else:
            low = min(low, value)
            if value - low >= prominence:
                rising, high = True, value
    return count


def _similarity(
    points: np.ndarray, *, degrees: float, scale: float, shift: tuple[float, float]
) -> np.ndarray:
    theta = np.deg2rad(degrees)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre = points.mean(0)
    return ((points - centre) @ rotation.T * scale + centre + shift).astype(np.float32)


def _other_person(face: np.ndarray) -> np.ndarray:
    """A differently shaped face elsewhere in the frame: wider jaw, eyes farther apart, tilted, larger."""
    other = face.astype(np.float64).copy()
    centre = other.mean(0)
    other = (other - centre) * [1.3, 1.0] + centre
    other[36:42, 0] -= 6
    other[42:48, 0] += 6
    return _similarity(other, degrees=12, scale=1.7, shift=(40, -20))


def test_driver_driving_itself_is_unchanged(face: np.ndarray) -> None:
    driver = synthetic_talking(face, frames=60, fps=25, seed=1)
    np.testing.assert_allclose(transfer_motion(driver, driver[0]), driver, atol=1e-3)


def test_transfer_keeps_source_face_and_follows_mouth(face: np.ndarray) -> None:
    driver = synthetic_talking(_other_person(face), frames=100, fps=25, seed=3)
    out = transfer_motion(driver, face)
    np.testing.assert_allclose(out[0], face, atol=1e-3)  # neutral frame = the source itself
    source_ratio, driver_ratio = _eyes_per_jaw(face), np.median(_eyes_per_jaw(driver))
    assert abs(driver_ratio / source_ratio - 1) > 0.1  # the two faces really differ
    np.testing.assert_allclose(_eyes_per_jaw(out), source_ratio, rtol=0.03)
    # Same size and place as the source, though the driver is 1.7x larger and shifted.
    assert np.median(_iod(out)) == pytest.approx(_iod(face), rel=0.05)
    assert np.linalg.norm(np.median(out.mean(1), 0) - face.mean(0)) < 0.2 * _iod(face)
    # The mouth opens and closes with the driver's, by a similar amount relative to face size.
    assert np.corrcoef(_mouth(out), _mouth(driver))[0, 1] > 0.95
    assert _mouth(out).max() - _mouth(face) > 0.15


def test_transfer_carries_head_rotation(face: np.ndarray) -> None:
    other = _other_person(face)
    driver = np.stack([other, _similarity(other, degrees=10, scale=1.0, shift=(5, 0))])
    out = transfer_motion(driver, face)
    a, _ = fit_similarity(out[0], out[1])
    assert np.degrees(np.arctan2(a[1, 0], a[0, 0])) == pytest.approx(10, abs=0.1)


def test_synthetic_talking_opens_mouth_and_blinks(face: np.ndarray) -> None:
    frames = synthetic_talking(face, frames=200, fps=25, seed=0)  # 8 s
    assert frames.shape == (200, 68, 2) and frames.dtype == np.float32
    np.testing.assert_allclose(frames[0], face, atol=1e-4)
    mouth = _mouth(frames)
    assert mouth.max() - mouth.min() > 0.15
    assert _peaks(mouth, prominence=0.05) >= 10  # syllables, not one slow opening
    eyes = _eyes(frames) / _eyes(face)
    assert 2 <= _peaks(-eyes, prominence=0.7) <= 4  # a blink every 2.5-4.5 s
    assert eyes.min() < 0.1 and np.mean(eyes > 0.9) > 0.8  # closes fully, open most of the time


def test_synthetic_talking_is_seeded_and_follows_face_size(face: np.ndarray) -> None:
    first = synthetic_talking(face, frames=50, fps=25, seed=7)
    np.testing.assert_array_equal(first, synthetic_talking(face, frames=50, fps=25, seed=7))
    assert np.abs(first - synthetic_talking(face, frames=50, fps=25, seed=8)).max() > 1
    bigger = synthetic_talking(face * 2 + 50, frames=50, fps=25, seed=7)
    np.testing.assert_allclose(bigger, first * 2 + 50, atol=1e-3)


def test_bad_inputs_are_rejected(face: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"driver must have shape"):
        transfer_motion(face, face)
    with pytest.raises(ValueError, match="neutral_index"):
        transfer_motion(face[None], face, neutral_index=3)
    with pytest.raises(ValueError, match="frames"):
        synthetic_talking(face, frames=0, fps=25)
    assert synthetic_talking(face, frames=3, fps=25).shape == (3, 68, 2)  # shorter than any smoothing


def test_demo_driver_asset_is_a_talking_sequence() -> None:
    seq = LandmarkSequence.load(DEMO_DRIVER)
    assert (len(seq), seq.frame_size, seq.fps) == (200, (256, 256), 25.0)
    assert _peaks(_mouth(seq.points), prominence=0.05) >= 10
    assert (seq.points > 0).all() and (seq.points < 256).all()  # the face stays in the frame
