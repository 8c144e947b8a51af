"""What happens to a frame after the service: the edits the watermark must survive (tests, bench).

    jpeg(frame, 75); half(frame); crop(frame, 0.1, at=(0.5, 0.5)); h264(frames)

`h264` is what `talkinghead animate` does to the service's frames: optionally JPEG (the wire's
default encoding, quality 90), then facekit.video.VideoWriter (libx264, CRF 18, yuv420p), read back.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from facekit.video import VideoWriter, read_video

Attack = Callable[[np.ndarray], np.ndarray]


def jpeg(frame: np.ndarray, quality: int = 75) -> np.ndarray:
    """Encode as JPEG (OpenCV's libjpeg, 4:2:0) and decode."""
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise ValueError("JPEG encoding failed")
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if decoded is None:
        raise ValueError("JPEG decoding failed")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def scale(frame: np.ndarray, factor: float) -> np.ndarray:
    """Resize by `factor` (area interpolation when shrinking, bilinear when enlarging)."""
    height, width = frame.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)


def half(frame: np.ndarray) -> np.ndarray:
    return scale(frame, 0.5)


def crop(frame: np.ndarray, fraction: float = 0.1, *, at: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """Cut `fraction` of the width and of the height away; `at` = (x, y) in [0, 1] places the window
    (0: flush left/top, 0.5: centred, 1: flush right/bottom)."""
    height, width = frame.shape[:2]
    keep_h, keep_w = round(height * (1 - fraction)), round(width * (1 - fraction))
    y0, x0 = round((height - keep_h) * at[1]), round((width - keep_w) * at[0])
    return frame[y0 : y0 + keep_h, x0 : x0 + keep_w]


def h264(frames: Sequence[np.ndarray], *, fps: float = 25.0, jpeg_quality: int | None = None) -> np.ndarray:
    """Frames (same even size) through VideoWriter (after JPEG at `jpeg_quality` if given), decoded."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.mp4"
        height, width = frames[0].shape[:2]
        with VideoWriter(path, fps=fps, size=(width, height)) as writer:
            for frame in frames:
                writer.write(frame if jpeg_quality is None else jpeg(frame, jpeg_quality))
        decoded, _ = read_video(path)
    return decoded


# single-frame attacks by name; h264 works on sequences (see bench)
FRAME_ATTACKS: dict[str, Attack] = {
    "none": lambda frame: frame,
    "jpeg75": jpeg,
    "half": half,
    "crop10_centre": crop,
    "crop10_corner": lambda frame: crop(frame, at=(0.0, 1.0)),
    "half+jpeg75": lambda frame: jpeg(half(frame)),
}
