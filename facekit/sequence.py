"""Landmark-sequence files: the 68-point streams that drive an avatar, on disk and in memory.

File format (`.npz`, a NumPy zip archive, readable with `numpy.load`):

    points      float32 (N, 68, 2)  pixel (x, y) of the 68 iBUG 300-W landmarks in each of N frames,
                                    x to the right, y down, (0, 0) the top-left corner of the frame
    frame_size  int32 (2,)          [width, height] of the frame the points are measured in
    fps         float32 ()          frames per second of the sequence, > 0

N >= 1 and every coordinate is finite; points may lie outside the frame (a face leaving the
picture). A plain `.npy` file holding only the (N, 68, 2) array is also accepted; it carries no
frame size, so the caller must pass `frame_size` (and may pass `fps`, default 25) to `load`.

    seq = LandmarkSequence.load("driver.npz")
    seq.rescaled(256).points  # (N, 68, 2) in a 256 x 256 frame, as the generator draws them
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facekit.layout import NUM_POINTS

DEFAULT_FPS = 25.0  # assumed for `.npy` files when the caller gives no fps
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamp: same sequence -> same file bytes


def _check(points: np.ndarray, frame_size: tuple[int, ...], fps: float, *, where: str) -> None:
    """Raise ValueError, prefixed with `where` (a file name or the class), if the fields are invalid."""
    if points.ndim != 3 or points.shape[1:] != (NUM_POINTS, 2):
        raise ValueError(f"{where}: points must have shape (N, {NUM_POINTS}, 2), got {points.shape}")
    if len(points) == 0:
        raise ValueError(f"{where}: the sequence is empty (0 frames)")
    bad = ~np.isfinite(points).all(axis=(1, 2))
    if bad.any():
        frames = np.flatnonzero(bad)
        raise ValueError(
            f"{where}: points contain NaN or infinite values in {len(frames)} frame(s), "
            f"first at frame {frames[0]}"
        )
    if len(frame_size) != 2 or min(frame_size) <= 0:
        raise ValueError(f"{where}: frame_size must be [width, height] > 0, got {list(frame_size)}")
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"{where}: fps must be a finite number > 0, got {fps}")


def letterbox(points: np.ndarray, frame_size: tuple[int, int], size: int) -> np.ndarray:
    """Points (..., 2) of a (width, height) frame -> the same in a `size` x `size` frame, float32:
    uniform scale size / max(w, h), the shorter side centred (as if the frame were letterboxed)."""
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    w, h = frame_size
    scale = size / max(w, h)
    offset = np.array([(size - w * scale) / 2, (size - h * scale) / 2], np.float32)
    return (np.asarray(points, np.float32) * np.float32(scale) + offset).astype(np.float32)


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make `==` ambiguous
class LandmarkSequence:
    """N frames of 68 landmarks in a `frame_size` = (width, height) pixel frame, at `fps`."""

    points: np.ndarray  # (N, 68, 2) float32
    frame_size: tuple[int, int]  # (width, height)
    fps: float

    def __post_init__(self) -> None:
        points = np.asarray(self.points)
        if not np.issubdtype(points.dtype, np.number):
            raise ValueError(f"LandmarkSequence: points must be numeric, got dtype {points.dtype}")
        points = np.array(points, dtype=np.float32)  # own copy, made read-only below
        points.flags.writeable = False
        size = tuple(int(v) for v in np.asarray(self.frame_size).reshape(-1))
        fps = float(self.fps)
        _check(points, size, fps, where="LandmarkSequence")
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "frame_size", size)
        object.__setattr__(self, "fps", fps)

    def __len__(self) -> int:
        return len(self.points)

    @property
    def duration(self) -> float:
        """Seconds covered by the sequence (N / fps)."""
        return len(self) / self.fps

    def rescaled(self, size: int) -> LandmarkSequence:
        """The same motion in a `size` x `size` frame: uniform scale size / max(w, h), centred.

        The whole [0, w] x [0, h] frame fits inside the square with its aspect kept; the shorter
        side is centred, as if the frame were letterboxed.
        """
        return LandmarkSequence(letterbox(self.points, self.frame_size, size), (size, size), self.fps)

    def save(self, path: str | Path) -> None:
        """Write the `.npz` file described in the module docstring (byte-identical for equal data)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"{path}: landmark sequences are saved as .npz, got suffix {path.suffix!r}")
        arrays = {
            "points": np.ascontiguousarray(self.points, np.float32),
            "frame_size": np.asarray(self.frame_size, np.int32),
            "fps": np.asarray(self.fps, np.float32),
        }
        # Written member by member (not np.savez) so that no wall-clock timestamp enters the file.
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, array in arrays.items():
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, array, allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, buffer.getvalue())

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        frame_size: tuple[int, int] | None = None,
        fps: float | None = None,
    ) -> LandmarkSequence:
        """Read a `.npz` sequence, or a `.npy` (N, 68, 2) array given its `frame_size` (and `fps`).

        For `.npz` files `frame_size` and `fps`, when given, must agree with the file's. Raises
        FileNotFoundError for a missing file, IsADirectoryError for a directory and ValueError
        naming the file for anything invalid.
        """
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a directory, not a landmark file")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such landmark file")
        suffix = path.suffix.lower()  # DRIVER.NPZ as driver.npz
        if suffix == ".npy":
            if frame_size is None:
                raise ValueError(f"{path}: a .npy file holds no frame size; pass frame_size=(width, height)")
            points = _read(path, "npy")
            if not isinstance(points, np.ndarray):
                raise ValueError(f"{path}: expected one (N, {NUM_POINTS}, 2) array, found an archive")
            size, rate = tuple(int(v) for v in frame_size), DEFAULT_FPS if fps is None else float(fps)
        elif suffix == ".npz":
            points, size, rate = _read_npz(path)
            if frame_size is not None and tuple(frame_size) != size:
                raise ValueError(f"{path}: file's frame_size {list(size)} != requested {list(frame_size)}")
            if fps is not None and not np.isclose(fps, rate):
                raise ValueError(f"{path}: file's fps {rate} != requested {fps}")
        else:
            raise ValueError(f"{path}: unknown landmark file type {path.suffix!r} (expected .npz or .npy)")
        if not np.issubdtype(points.dtype, np.number):
            raise ValueError(f"{path}: points must be numeric, got dtype {points.dtype}")
        points = points.astype(np.float32)
        _check(points, size, rate, where=str(path))
        return cls(points, (size[0], size[1]), rate)


def _read(path: Path, kind: str) -> Any:
    """np.load without pickles: an ndarray for .npy, an NpzFile for .npz."""
    # np.load takes whatever is neither a zip archive nor an array file for a pickle, and refuses
    # it as one: a text file would be reported as "pickled (object) data".
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(np.lib.format.MAGIC_PREFIX))
    except OSError as error:
        raise ValueError(f"{path}: not a readable .{kind} file ({error.strerror or error})") from error
    if kind == "npz" and not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a NumPy .npz archive")
    if kind == "npy" and magic != np.lib.format.MAGIC_PREFIX:
        raise ValueError(f"{path}: not a NumPy .npy file")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable .{kind} file ({error})") from error


def _read_npz(path: Path) -> tuple[np.ndarray, tuple[int, ...], float]:
    archive = _read(path, "npz")
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a .npz archive")
    with archive:
        missing = [key for key in ("points", "frame_size", "fps") if key not in archive.files]
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing}; the file holds {archive.files}")
        try:
            points = archive["points"]
            size_array = archive["frame_size"]
            fps_array = archive["fps"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path}: cannot read an array ({error})") from error
    if size_array.shape != (2,) or not np.issubdtype(size_array.dtype, np.integer):
        raise ValueError(f"{path}: frame_size must be 2 integers [width, height], got {size_array!r}")
    if fps_array.size != 1 or not np.issubdtype(fps_array.dtype, np.number):
        raise ValueError(f"{path}: fps must be one number, got {fps_array!r}")
    return points, tuple(int(v) for v in size_array), float(fps_array.reshape(()))
