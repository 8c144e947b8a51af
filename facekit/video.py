"""Video and image I/O for tools, demos and evaluation: probe, decode, encode H.264, tile, save PNG.

All frames are uint8 RGB (H, W, 3) numpy arrays. Decoding and encoding go through PyAV (FFmpeg);
nothing here is on the model's path, so it may change without touching checkpoints.

    frames, fps = read_video("talk.mp4", max_frames=100)
    with VideoWriter("out.mp4", fps=fps, size=(256, 256)) as writer:
        for frame in frames:
            writer.write(frame)
    save_png("sheet.png", contact_sheet([list(frames[:8])], labels=["input"]))
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import cv2
import numpy as np
from PIL import Image

DEFAULT_FPS = 25.0  # reported when a container states no frame rate
H264_CRF = 18  # libx264 constant rate factor: visually lossless for landmark drawings and faces
MPEG4_BIT_RATE = 8_000_000  # fallback encoder's bit rate when PyAV's FFmpeg lacks libx264
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})
WRITABLE_SUFFIXES = VIDEO_SUFFIXES - {".webm"}  # containers VideoWriter's H.264 / MPEG-4 go into
# containers that keep each frame's time; into the others (AVI, MPEG program streams: a frame a
# slot) a gap is filled with the frame before it, repeated
TIMED_SUFFIXES = frozenset({".mp4", ".mov", ".m4v", ".mkv"})


@dataclass(frozen=True, kw_only=True)
class VideoInfo:
    fps: float  # frames per second of the source (0 when unknown)
    width: int
    height: int


def is_video(path: Path) -> bool:
    """Whether the file name says video (by suffix, VIDEO_SUFFIXES)."""
    return path.suffix.lower() in VIDEO_SUFFIXES


def check_writable(path: str | Path) -> None:
    """ValueError naming the file unless VideoWriter can write a video there (by its extension)."""
    suffix = Path(path).suffix.lower()
    if suffix not in WRITABLE_SUFFIXES:
        what = f"a {suffix!r} file" if suffix else "a file without an extension"
        choices = ", ".join(sorted(WRITABLE_SUFFIXES))
        raise ValueError(f"{path}: cannot write a video to {what} (use {choices})")


def video_info(path: Path) -> VideoInfo:
    """Frame rate and size of a video's first video stream (av.FFmpegError if unreadable)."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(fps=float(rate or 0.0), width=stream.width, height=stream.height)


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file (EXIF orientation applied), or ValueError."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(
            f"{path}: no such image file" if not Path(path).is_file() else f"cannot read image {path}"
        )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _check_rgb(image: np.ndarray, *, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} must be uint8 RGB (H, W, 3), got {image.dtype} {image.shape}")
    return image


def _frames(path: str | Path, *, every: int, max_frames: int) -> Iterator[tuple[np.ndarray, float]]:
    """Yield (frame, fps of the yielded frames), translating FFmpeg errors into ValueError."""
    if every < 1 or max_frames < 0:
        raise ValueError(f"need every >= 1 and max_frames >= 0, got every={every}, max_frames={max_frames}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a video file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = (float(rate) if rate else DEFAULT_FPS) / every
            kept = 0
            for index, frame in enumerate(container.decode(stream)):
                if index % every:
                    continue
                yield frame.to_ndarray(format="rgb24"), fps
                kept += 1
                if kept == max_frames:
                    return
    except av.FFmpegError as error:
        raise ValueError(f"{path}: cannot open or decode the video ({error})") from error


def iter_video(path: str | Path, *, every: int = 1, max_frames: int = 0) -> Iterator[np.ndarray]:
    """Decode frames one at a time: uint8 RGB (H, W, 3), every `every`-th, at most `max_frames` (0 = all)."""
    for frame, _ in _frames(path, every=every, max_frames=max_frames):
        yield frame


def read_video(path: str | Path, *, max_frames: int = 0, every: int = 1) -> tuple[np.ndarray, float]:
    """Decode a video -> (uint8 (N, H, W, 3) RGB frames, fps of the returned frames).

    Keeps every `every`-th frame (the fps returned is the file's divided by `every`) and stops
    after `max_frames` kept frames (0 = all). A file without frames is a ValueError, as is one
    FFmpeg cannot open or decode; the message names the file.
    """
    decoded = list(_frames(path, every=every, max_frames=max_frames))
    if not decoded:
        raise ValueError(f"{path}: the video has no frames")
    return np.stack([frame for frame, _ in decoded]), decoded[0][1]


class VideoWriter:
    """Write uint8 RGB frames of `size` = (width, height) to an H.264 file (MPEG-4 part 2 if absent).

    Use as a context manager; the file is complete once the block exits. Width and height must
    be even (yuv420p chroma subsampling); the container is the extension's (WRITABLE_SUFFIXES).
    """

    def __init__(self, path: str | Path, *, fps: float, size: tuple[int, int]) -> None:
        check_writable(path)
        width, height = size
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"{path}: frame size must be even and > 0 for yuv420p, got {size}")
        if not np.isfinite(fps) or fps <= 0:
            raise ValueError(f"{path}: fps must be > 0, got {fps}")
        self.path, self.size, self.fps = Path(path), (int(width), int(height)), float(fps)
        self.frames_written = 0
        self.next_pts = 0  # the earliest time slot (in frames of 1/fps) the next frame may take
        self._timed = self.path.suffix.lower() in TIMED_SUFFIXES
        self._shown: np.ndarray | None = None  # the last frame written (a gap repeats it, untimed)
        self.codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        try:
            container = av.open(str(self.path), mode="w")
        except av.FFmpegError as error:
            raise ValueError(f"{self.path}: cannot create the video ({error})") from error
        try:
            stream = container.add_stream(self.codec, rate=Fraction(fps).limit_denominator(1001))
            if not isinstance(stream, av.video.stream.VideoStream):
                raise TypeError(f"{self.codec} gave a {type(stream).__name__}, not a video stream")
            stream.width, stream.height = self.size
            stream.pix_fmt = "yuv420p"
            if self.codec == "libx264":
                # no B-frames: with them, frames written after a gap (a live stream's drops) left
                # the .mp4's stated length short of its last frame (0.16 s for slots 0-2 and 24)
                stream.options = {"crf": str(H264_CRF), "bf": "0"}
            else:
                stream.bit_rate = MPEG4_BIT_RATE
        except BaseException:
            container.close()
            raise
        self._container: av.container.OutputContainer | None = container
        self._stream = stream

    def write(self, frame: np.ndarray, *, pts: int | None = None) -> None:
        """Append one uint8 RGB (height, width, 3) frame: in the next time slot, or at `pts`
        (in frames of 1/fps from the start; increasing), the previous frame showing until then
        (a live stream that dropped frames keeps its timing; in a container that does not keep
        frame times, TIMED_SUFFIXES aside, the previous frame is written again for each slot)."""
        if self._container is None:
            raise ValueError(f"{self.path}: the writer is closed")
        if pts is None:
            pts = self.next_pts
        elif pts < self.next_pts:
            raise ValueError(f"{self.path}: frame time {pts} is before the next free slot {self.next_pts}")
        frame = _check_rgb(frame, what="frame")
        if frame.shape[:2] != (self.size[1], self.size[0]):
            raise ValueError(
                f"{self.path}: frame is {frame.shape[1]}x{frame.shape[0]}, writer is {self.size}"
            )
        frame = np.ascontiguousarray(frame)
        if not self._timed:  # a frame a slot: the gap shows the frame before (the first, before it)
            shown = frame if self._shown is None else self._shown
            for slot in range(self.next_pts, pts):
                self._encode(shown, slot)
            self._shown = frame.copy()  # (the caller may reuse its buffer)
        self._encode(frame, pts)
        self.frames_written += 1
        self.next_pts = pts + 1

    def _encode(self, frame: np.ndarray, pts: int) -> None:
        assert self._container is not None
        video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        video_frame.pts = pts
        self._container.mux(self._stream.encode(video_frame))

    def close(self) -> None:
        """Flush the encoder and finish the file; idempotent."""
        if self._container is None:
            return
        container, self._container = self._container, None
        try:
            container.mux(self._stream.encode(None))
        finally:
            container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _fit(image: np.ndarray, cell: int) -> np.ndarray:
    """Resize into a `cell` x `cell` black square, aspect kept, centred."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(
            f"contact_sheet cells must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}"
        )
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    h, w = image.shape[:2]
    scale = cell / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interp)
    out = np.zeros((cell, cell, 3), np.uint8)
    top, left = (cell - new_h) // 2, (cell - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def _label_cell(text: str, cell: int) -> np.ndarray:
    """A `cell` x `cell` dark-grey tile with `text` in white, one line per "\n", centred, shrunk
    so that its widest line fits."""
    tile = np.full((cell, cell, 3), 32, np.uint8)
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, 1
    lines = text.split("\n")
    scale = cell / 160
    widest = max(cv2.getTextSize(line, font, scale, thickness)[0][0] for line in lines)
    if widest > cell - 8:
        scale *= (cell - 8) / widest
    sizes = [cv2.getTextSize(line, font, scale, thickness)[0] for line in lines]
    step = max(h for _, h in sizes) * 8 // 5  # line height: the tallest glyphs and a gap
    top = (cell - step * (len(lines) - 1)) // 2
    for i, (line, (width, height)) in enumerate(zip(lines, sizes, strict=True)):
        origin = ((cell - width) // 2, top + i * step + height // 2)
        cv2.putText(tile, line, origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return tile


def contact_sheet(
    rows: list[list[np.ndarray]], *, labels: list[str] | None = None, cell: int = 128
) -> np.ndarray:
    """Tile images in a grid of `cell` x `cell` squares -> uint8 RGB image.

    Output: (len(rows) * cell, (max row length + 1 if labels else 0) * cell, 3). Each image is
    fitted into its square with its aspect kept; short rows are padded with black; with `labels`
    (one per row) each row starts with a square holding its label.
    """
    if not rows or cell < 8:
        raise ValueError(f"need at least one row and cell >= 8, got {len(rows)} rows, cell={cell}")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"got {len(labels)} labels for {len(rows)} rows")
    columns = max(len(row) for row in rows)
    if columns == 0:
        raise ValueError("all rows are empty")
    blank = np.zeros((cell, cell, 3), np.uint8)
    lines = []
    for index, row in enumerate(rows):
        tiles = [_fit(np.asarray(image), cell) for image in row] + [blank] * (columns - len(row))
        if labels is not None:
            tiles.insert(0, _label_cell(labels[index], cell))
        lines.append(np.concatenate(tiles, axis=1))
    return np.concatenate(lines, axis=0)


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 RGB (H, W, 3) or grey (H, W) image as PNG (same pixels -> same bytes)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"{path}: expected uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    Image.fromarray(image).save(Path(path), format="PNG")
