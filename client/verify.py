"""Checking a file: is the invisible watermark in it (payload, confidence), and what its C2PA
manifest says. The library behind `talkinghead verify`.

    from client.verify import verify_file
    report = verify_file(Path("out/mona.mp4"), key=os.environ["TALKINGHEAD_WATERMARK_KEY"])
    report.present, report.payload, report.share, report.credentials

Images (PNG, JPEG, WebP) are one frame; a video is checked frame by frame (at most `max_frames`,
spread evenly over it): the share of frames that carry the mark, and the payload decoded from all
of them together (each marked frame's soft bits summed), which survives frames too damaged to be
read alone. A video counts as marked when at least half of the checked frames are, or, in part
(`partial`: generated frames spliced into real footage, or a mark damaged in most frames), when at
least two frames each read the same payload on their own. Without a key only the content
credentials are read. A file is an image or a video by its content: a video named .png, or with no
suffix, is read as a video when it does not decode as an image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from client.credentials import CannotCarry, ManifestReport, read_credentials
from facekit.video import is_video, iter_video, read_image
from facekit.watermark import Watermarker
from facekit.watermark.detect import false_alarm

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_MARKED_SHARE = 0.5  # a video is marked when at least this share of its checked frames is
# ... or, in part, when at least this many frames each read the same payload alone (each such frame's
# false-alarm odds are <= 3.3e-5, and two must agree on 32 bits)
PARTIAL_PAYLOAD_FRAMES = 2
DEFAULT_MAX_FRAMES = 100


@dataclass(frozen=True, kw_only=True)
class WatermarkReport:
    frames: int  # frames checked (1 for an image)
    marked: int  # of them, frames where the mark is present
    present: bool  # image: marked; video: marked share >= VIDEO_MARKED_SHARE, or `partial`
    payload: int | None  # image: its payload; video: decoded from all marked frames (None: unread)
    payload_frames: int  # frames whose own payload equals `payload`
    score: float  # image: its score; video: the median over frames
    # when present: 1 - the estimated false-alarm probability of that verdict (image: its score;
    # video: the median score, or for a partial one, conservatively, that any checked frame reads
    # the payload as well as the second best one did); 0.0 when absent
    confidence: float
    partial: bool = False  # video: present in fewer than half the checked frames (a splice)

    @property
    def share(self) -> float:
        return self.marked / self.frames if self.frames else 0.0


@dataclass(frozen=True, kw_only=True)
class FileReport:
    path: str
    kind: str  # "image" or "video" (by the name's suffix), else "other"
    watermark: WatermarkReport | None  # None: no key given
    credentials: ManifestReport | None  # None: no C2PA manifest
    credentials_error: str | None = None  # the manifest could not be read
    watermark_error: str | None = None  # the pixels could not be read (damaged, truncated): not checked
    credentials_note: str | None = None  # why there are none where the reason is known

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.watermark is not None:
            out["watermark"]["share"] = round(self.watermark.share, 4)
            payload = self.watermark.payload
            out["watermark"]["payload"] = None if payload is None else f"{payload:08x}"
        if self.credentials is not None:
            out["credentials"]["trained_algorithmic_media"] = self.credentials.trained_algorithmic_media
        return out


def _frame_count(path: Path) -> int:
    """Frames in the first video stream as the container states them (0 when it does not)."""
    try:
        with av.open(str(path)) as container:
            return int(container.streams.video[0].frames) if container.streams.video else 0
    except (av.FFmpegError, IndexError):
        return 0


def check_video(
    path: Path, watermarker: Watermarker, *, max_frames: int = DEFAULT_MAX_FRAMES
) -> WatermarkReport:
    """The mark over at most `max_frames` frames of a video, spread evenly (ValueError if unreadable)."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    every = max(1, math.ceil(_frame_count(path) / max_frames))
    found = [watermarker.detect(frame) for frame in iter_video(path, every=every, max_frames=max_frames)]
    if not found:
        raise ValueError(f"{path}: the video has no frames")
    summary = watermarker.combine(found)
    score = float(np.median([d.score for d in found]))
    whole = summary.share >= VIDEO_MARKED_SHARE
    partial = not whole and summary.payload_frames >= PARTIAL_PAYLOAD_FRAMES
    if whole:
        confidence = 1.0 - false_alarm(score, summary.payload is not None)
    elif partial:
        reading = sorted((d.score for d in found if d.payload == summary.payload), reverse=True)
        confidence = 1.0 - min(1.0, len(found) * false_alarm(reading[PARTIAL_PAYLOAD_FRAMES - 1], True))
    else:
        confidence = 0.0
    return WatermarkReport(
        frames=summary.frames,
        marked=summary.marked,
        present=whole or partial,
        payload=summary.payload,
        payload_frames=summary.payload_frames,
        score=round(score, 2),
        confidence=round(confidence, 6),
        partial=partial,
    )


def check_image(path: Path, watermarker: Watermarker) -> WatermarkReport:
    found = watermarker.detect(read_image(path))
    return WatermarkReport(
        frames=1,
        marked=int(found.present),
        present=found.present,
        payload=found.payload,
        payload_frames=int(found.payload is not None),
        score=round(found.score, 2),
        confidence=round(found.confidence, 6) if found.present else 0.0,
    )


def verify_file(
    path: Path,
    *,
    key: str | None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    trust_anchors: bytes | None = None,
    watermarker: Watermarker | None = None,
) -> FileReport:
    """Watermark (when a key or watermarker is given) and content credentials of one file.

    Missing files and directories raise FileNotFoundError / IsADirectoryError naming the file; one
    whose pixels cannot be decoded is reported with `watermark_error` when it has content
    credentials (a truncated or tampered file: its manifest says so), else raises ValueError."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if watermarker is None and key is not None:
        watermarker = Watermarker(key=key)
    video = is_video(path)
    mark, undecodable = None, None
    if watermarker is not None:
        try:
            mark = (
                check_video(path, watermarker, max_frames=max_frames)
                if video
                else check_image(path, watermarker)
            )
        except ValueError as failure:
            undecodable = failure
        if undecodable is not None and not video and _is_a_video(path):  # (named as it is not)
            video, undecodable = True, None
            try:
                mark = check_video(path, watermarker, max_frames=max_frames)
            except ValueError as failure:
                undecodable = failure
    kind = "video" if video else "image" if path.suffix.lower() in IMAGE_SUFFIXES else "other"
    note = None
    try:
        credentials, error = read_credentials(path, trust_anchors=trust_anchors), None
    except CannotCarry as failure:  # a picture or video in such a format: none, and that is all
        credentials, error = None, str(failure) if kind == "other" else None
        note = None if error else "this format cannot carry them"
    except ValueError as failure:
        credentials, error = None, str(failure)
    except ImportError:  # the service image (its requirements leave the client's C2PA out), an old venv
        credentials, error = None, "c2pa-python is not installed here: pip install c2pa-python"
    if undecodable is not None and credentials is None:
        raise undecodable
    return FileReport(
        path=str(path),
        kind=kind,
        watermark=mark,
        credentials=credentials,
        credentials_error=error,
        watermark_error=None if undecodable is None else str(undecodable),
        credentials_note=note,
    )


def _is_a_video(path: Path) -> bool:
    """Whether FFmpeg finds a video stream with at least one frame in the file."""
    try:
        return _frame_count(path) > 0 or next(iter_video(path, every=1, max_frames=1), None) is not None
    except (ValueError, av.FFmpegError):
        return False
