"""`Watermarker`: one key's mark, added to frames (`mark`) and found in images (`detect`).

    wm = Watermarker(key=os.environ["TALKINGHEAD_WATERMARK_KEY"])   # ~0.5 s once: the key's carriers
    payload = payload_for("tenant-a", "mona")                        # 32 bits, once per stream
    marked = wm.mark(frame, payload)                                 # per frame: ~0.35 ms at 256 px
    found = wm.detect(marked)           # Detection(present=True, payload=payload, score=..., ...)
    video = wm.detect_frames(frames)    # share of frames marked, payload over all of them

`mark` is thread-safe and keeps the last patterns it made (per payload and frame size, within
`cache_bytes`), so a stream pays for its pattern once.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from facekit.watermark import detect as search
from facekit.watermark.carriers import carriers_for, fingerprint, key_bytes
from facekit.watermark.code import check_payload, decode
from facekit.watermark.embed import DEFAULT_STRENGTH, add_mark, check_frame, frame_pattern, grid_pattern


@dataclass(frozen=True, kw_only=True)
class Detection:
    """What `Watermarker.detect` found in one image."""

    present: bool  # score >= THRESHOLD, or >= THRESHOLD_WITH_PAYLOAD with a payload whose CRC matches
    score: float  # detection statistic (~N(0, 1) per hypothesis on unmarked images)
    confidence: float  # 1 - estimated probability that an unmarked image looks this marked
    payload: int | None  # the decoded 32-bit payload when its CRC matches (None otherwise)
    window: tuple[float, float, float]  # (x, y, side) of the image in the marked frame, fractions
    soft_bits: np.ndarray = field(repr=False)  # (92,) for combining several frames


@dataclass(frozen=True, kw_only=True)
class VideoDetection:
    """`Watermarker.detect_frames`: per-frame detections summarised."""

    frames: int
    marked: int  # frames where the mark is present
    payload: int | None  # decoded from the marked frames' soft bits together (None: none / CRC fails)
    payload_frames: int  # marked frames whose own payload equals `payload`
    mean_score: float

    @property
    def share(self) -> float:
        return self.marked / self.frames if self.frames else 0.0


class Watermarker:
    def __init__(self, *, key: str | bytes, strength: float = DEFAULT_STRENGTH, cache_bytes: int = 64 << 20):
        self._key = key_bytes(key)
        self.fingerprint = fingerprint(self._key)  # loggable id of the key
        if not np.isfinite(strength) or strength <= 0:
            raise ValueError(f"strength must be > 0, got {strength}")
        self.strength = float(strength)
        self.carriers = carriers_for(self._key)  # (93, G, G)
        self._sync_spectrum = search.spectrum(self.carriers[0])
        self._payload_carriers = np.ascontiguousarray(self.carriers[1:].reshape(len(self.carriers) - 1, -1))
        self._cache: collections.OrderedDict[tuple[int, int, int], np.ndarray] = collections.OrderedDict()
        self._cache_bytes, self._cached_bytes = int(cache_bytes), 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Watermarker(key=<{self.fingerprint}>, strength={self.strength})"

    def pattern(self, payload: int, size: tuple[int, int]) -> np.ndarray:
        """(H, W) float32 pattern of `payload` for a (width, height) frame, RMS 1 (cached)."""
        entry = (check_payload(payload), int(size[0]), int(size[1]))
        with self._lock:
            if entry in self._cache:
                self._cache.move_to_end(entry)
                return self._cache[entry]
        made = frame_pattern(grid_pattern(self.carriers, entry[0]), size)
        made.flags.writeable = False
        with self._lock:
            self._cache[entry] = made
            self._cached_bytes += made.nbytes
            while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return made

    def mark(self, frame: np.ndarray, payload: int) -> np.ndarray:
        """A new uint8 RGB frame: `frame` (H, W, 3) with the mark of `payload` added."""
        frame = check_frame(frame)
        return add_mark(
            frame, self.pattern(payload, (frame.shape[1], frame.shape[0])), strength=self.strength
        )

    def mark_box(self, frame: np.ndarray, payload: int, box: tuple[int, int, int]) -> np.ndarray:
        """A new uint8 RGB frame: `frame` with the mark of `payload` over the square `box` = (x0, y0,
        side) in its pixels, as `mark` puts it on a side x side frame (its own grid stretched over
        the box); the part of the box inside `frame` is marked, nothing else changes. Paste-back
        marks the face crop's box in the portrait so: the face cut out of the frame carries a mark
        the whole frame's (~3 x larger there) cannot give it."""
        frame = check_frame(frame)
        x0, y0, side = (int(v) for v in box)
        height, width = frame.shape[:2]
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, width), min(y0 + side, height)
        out = frame.copy()
        if min(sx1 - sx0, sy1 - sy0) < 16:  # (too little of the box in the frame to carry a mark)
            return out
        pattern = self.pattern(payload, (side, side))[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
        out[sy0:sy1, sx0:sx1] = add_mark(out[sy0:sy1, sx0:sx1], pattern, strength=self.strength)
        return out

    def detect(self, image: np.ndarray) -> Detection:
        """Look for this key's mark in a uint8 RGB image (any size, possibly scaled or cropped)."""
        image = check_frame(image, what="image")
        best = search.scan(search.luma(image), self._sync_spectrum, early_exit=search.EARLY_EXIT)
        soft = search.soft_bits(best, self._payload_carriers)
        payload = decode(soft)
        present = search.decide(best.score, payload is not None)
        grid = self.carriers.shape[1]
        dy, dx = best.offset
        return Detection(
            present=present,
            score=best.score,
            confidence=1.0 - search.false_alarm(best.score, payload is not None),
            payload=payload if present else None,
            window=(dx / grid, dy / grid, best.size / grid),
            soft_bits=soft,
        )

    def detect_frames(self, frames: Iterable[np.ndarray]) -> VideoDetection:
        """Detect in every frame (see `combine`)."""
        return self.combine([self.detect(frame) for frame in frames])

    @staticmethod
    def combine(found: Sequence[Detection]) -> VideoDetection:
        """Several frames' detections: the payload decoded from all marked frames' soft bits summed."""
        marked = [d for d in found if d.present]
        payload = decode(np.sum([d.soft_bits for d in marked], axis=0)) if marked else None
        return VideoDetection(
            frames=len(found),
            marked=len(marked),
            payload=payload,
            payload_frames=sum(1 for d in marked if payload is not None and d.payload == payload),
            mean_score=float(np.mean([d.score for d in found])) if found else 0.0,
        )
