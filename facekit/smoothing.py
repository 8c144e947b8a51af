"""Landmark smoothing against driver jitter: a One-Euro filter (Casiez, Roussel and Vogel, CHI 2012).

Landmark detectors jitter by a pixel or two from frame to frame even on a still head; a generator
driven by them makes the whole face shimmer. The One-Euro filter is a low-pass filter whose cutoff
rises with speed: slow motion (jitter, a still head) is smoothed hard, fast motion (speech, a turn)
passes with little lag. Per coordinate, with dt the time since the last frame:

    dx  = (x - x_prev) / dt, smoothed with a fixed cutoff d_cutoff
    fc  = min_cutoff + beta |dx_smoothed|
    x'  = x_prev' + alpha(fc, dt) (x - x_prev'),  alpha = 1 / (1 + 1 / (2 pi fc dt))

Coordinates are filtered in face units (divided by the first frame's outer-eye-corner distance), so
the same parameters suit any face size. Streaming: one `OneEuro` per stream, `filter` per frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from facekit.layout import NUM_POINTS

_OUTER_EYES = (36, 45)


@dataclass(frozen=True)
class OneEuroParams:
    min_cutoff: float = 1.0  # Hz: cutoff on a still face; lower = smoother, more lag when moving
    beta: float = 0.5  # cutoff increase per face-unit/s of speed; higher = less lag in fast motion
    d_cutoff: float = 1.0  # Hz: cutoff of the speed estimate

    def __post_init__(self) -> None:
        if not (self.min_cutoff > 0 and self.d_cutoff > 0 and self.beta >= 0):
            raise ValueError(f"One-Euro needs min_cutoff > 0, d_cutoff > 0, beta >= 0; got {self}")


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    return 1.0 / (1.0 + 1.0 / (2 * math.pi * np.asarray(cutoff) * dt))


class OneEuro:
    """One stream's filter state: feed (68, 2) landmarks and their time in seconds, in order."""

    def __init__(self, params: OneEuroParams = OneEuroParams()) -> None:
        self.params = params
        self._scale: float | None = None
        self._x: np.ndarray | None = None  # last output, face units (68, 2)
        self._dx = np.zeros((NUM_POINTS, 2))
        self._t: float | None = None

    def filter(self, points: np.ndarray, t: float) -> np.ndarray:
        """The smoothed landmarks (68, 2) float32 of frame time `t` (seconds, increasing)."""
        pts = np.asarray(points, np.float64)
        if pts.shape != (NUM_POINTS, 2) or not np.isfinite(pts).all():
            raise ValueError(f"expected finite landmarks ({NUM_POINTS}, 2), got shape {pts.shape}")
        if self._scale is None:
            i, j = _OUTER_EYES
            self._scale = max(float(np.linalg.norm(pts[i] - pts[j])), 1e-6)
        x = pts / self._scale
        if self._x is None or self._t is None or t <= self._t:  # first frame, or time did not advance
            self._x, self._t = x, t
            return pts.astype(np.float32)
        dt = t - self._t
        p = self.params
        dx = (x - self._x) / dt
        self._dx = self._dx + _alpha(p.d_cutoff, dt) * (dx - self._dx)
        cutoff = p.min_cutoff + p.beta * np.abs(self._dx)
        self._x = self._x + _alpha(cutoff, dt) * (x - self._x)
        self._t = t
        return (self._x * self._scale).astype(np.float32)


def smooth_sequence(points: np.ndarray, fps: float, params: OneEuroParams = OneEuroParams()) -> np.ndarray:
    """Filter a whole sequence (N, 68, 2) sampled at `fps` -> (N, 68, 2) float32."""
    f = OneEuro(params)
    return np.stack([f.filter(p, i / fps) for i, p in enumerate(np.asarray(points))])


def jitter(points: np.ndarray, subset: np.ndarray | None = None) -> float:
    """Mean frame-to-frame landmark motion (N, 68, 2) in face units (outer-eye-corner distances),
    over `subset` of the points (all by default): on a still head this is the jitter a viewer sees.
    facekit.motion.STABLE_POINTS leaves out what speech moves (lips, jaw, brows)."""
    pts = np.asarray(points, np.float64)
    i, j = _OUTER_EYES
    scale = np.linalg.norm(pts[:, i] - pts[:, j], axis=-1).mean()
    moved = np.diff(pts if subset is None else pts[:, subset], axis=0)
    return float(np.linalg.norm(moved, axis=-1).mean() / scale)
