"""Landmark-sequence files: round trip, .npy input, and errors that name the file and the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from facekit.sequence import LandmarkSequence


def _points(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 200, (n, 68, 2)).astype(np.float32)


def test_npz_round_trip_is_exact_and_byte_stable(tmp_path: Path) -> None:
    seq = LandmarkSequence(_points(), (320, 240), 29.97)
    seq.save(tmp_path / "a.npz")
    seq.save(tmp_path / "b.npz")
    back = LandmarkSequence.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(back.points, seq.points)
    assert back.frame_size == (320, 240)
    assert back.fps == pytest.approx(29.97, rel=1e-6)
    assert len(back) == 5
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz") as raw:  # the documented format, readable without facekit
        assert raw["points"].dtype == np.float32 and raw["points"].shape == (5, 68, 2)
        assert raw["frame_size"].dtype == np.int32 and list(raw["frame_size"]) == [320, 240]
        assert raw["fps"].dtype == np.float32


def test_npy_needs_frame_size(tmp_path: Path) -> None:
    path = tmp_path / "raw.npy"
    np.save(path, _points(3))
    with pytest.raises(ValueError, match=r"raw\.npy.*frame_size"):
        LandmarkSequence.load(path)
    seq = LandmarkSequence.load(path, frame_size=(640, 480), fps=30)
    assert (len(seq), seq.frame_size, seq.fps) == (3, (640, 480), 30.0)


def _write(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"points": np.zeros((4, 67, 2)), "frame_size": [256, 256], "fps": 25.0}, r"shape \(N, 68, 2\)"),
        ({"points": np.zeros((0, 68, 2)), "frame_size": [256, 256], "fps": 25.0}, "empty"),
        ({"points": np.full((2, 68, 2), np.nan), "frame_size": [256, 256], "fps": 25.0}, "NaN"),
        ({"points": np.zeros((2, 68, 2)), "frame_size": [256, 256], "fps": 0.0}, "fps"),
        ({"points": np.zeros((2, 68, 2)), "frame_size": [0, 256], "fps": 25.0}, "frame_size"),
        ({"points": np.zeros((2, 68, 2)), "fps": 25.0}, r"missing.*frame_size"),
    ],
)
def test_bad_npz_names_file_and_problem(tmp_path: Path, arrays: dict, problem: str) -> None:
    path = _write(tmp_path / "bad.npz", **{k: np.asarray(v) for k, v in arrays.items()})
    with pytest.raises(ValueError, match=rf"bad\.npz.*{problem}"):
        LandmarkSequence.load(path)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip file")
    with pytest.raises(ValueError, match=r"junk\.npz: not a NumPy \.npz archive$"):
        LandmarkSequence.load(junk)
    text = tmp_path / "text.npy"
    text.write_text("1 2 3\n")
    with pytest.raises(ValueError, match=r"text\.npy: not a NumPy \.npy file$"):
        LandmarkSequence.load(text, frame_size=(256, 256))
    cut = tmp_path / "cut.npz"
    LandmarkSequence(_points(), (256, 256), 25).save(cut)
    cut.write_bytes(cut.read_bytes()[:-40])  # its directory at the end cut off
    with pytest.raises(ValueError, match=r"cut\.npz: not a NumPy \.npz archive$"):
        LandmarkSequence.load(cut)
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(IsADirectoryError, match=r"folder\.npz: is a directory"):
        LandmarkSequence.load(tmp_path / "folder.npz")
    with pytest.raises(ValueError, match=r"\.csv"):
        (tmp_path / "x.csv").write_text("1,2")
        LandmarkSequence.load(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        LandmarkSequence.load(tmp_path / "nope.npz")


def test_rescaled_letterboxes_into_square() -> None:
    corners = np.zeros((1, 68, 2), np.float32)
    corners[0, 1] = (640, 480)
    corners[0, 2] = (320, 240)
    out = LandmarkSequence(corners, (640, 480), 25).rescaled(256)
    assert out.frame_size == (256, 256) and out.fps == 25
    np.testing.assert_allclose(out.points[0, :3], [[0, 32], [256, 224], [128, 128]], atol=1e-4)


def test_constructor_validates_and_freezes() -> None:
    with pytest.raises(ValueError, match="fps"):
        LandmarkSequence(_points(), (256, 256), -1)
    seq = LandmarkSequence(_points().astype(np.float64), (256, 256), 25)
    assert seq.points.dtype == np.float32
    with pytest.raises(ValueError, match="read-only"):
        seq.points[0, 0, 0] = 1


def test_the_suffix_is_read_in_any_case(tmp_path: Path) -> None:
    """DRIVER.NPZ was "unknown landmark file type '.NPZ'" (a camera's or Windows' upper case)."""
    seq = LandmarkSequence(np.zeros((2, 68, 2), np.float32), (64, 48), 25.0)
    seq.save(tmp_path / "d.npz")
    (tmp_path / "d.npz").rename(tmp_path / "DRIVER.NPZ")
    assert LandmarkSequence.load(tmp_path / "DRIVER.NPZ").frame_size == (64, 48)
    np.save(tmp_path / "d.npy", np.zeros((2, 68, 2), np.float32))
    (tmp_path / "d.npy").rename(tmp_path / "D.Npy")
    assert len(LandmarkSequence.load(tmp_path / "D.Npy", frame_size=(64, 48))) == 2
