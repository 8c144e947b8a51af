"""Finding the mark: whiten, search crop scale and offset for the sync carrier, read the payload.

For each hypothesis "the image shows an n/G-wide window of the marked frame" (n = G down to
(1 - MAX_CROP) G) the image's luma is resized to n x n cells, whitened, and cross-correlated with
the sync carrier at every offset that keeps the window inside the frame (one FFT per n). The
detection statistic is the correlation divided by the standard deviation of the whole correlation
surface: ~N(0, 1) at each hypothesis of an unmarked image, so the maximum over the ~2,500
hypotheses is compared with thresholds set from the measured false-positive distribution. At the
best hypothesis the window is correlated with the 92 payload carriers (soft bits) and decoded; the
mark is present when the score reaches THRESHOLD, or the lower THRESHOLD_WITH_PAYLOAD together with
a payload whose CRC matches (a payload that decodes is evidence a random window rarely gives).

Whitening (what makes a weak mark visible against a face): phase-only correlation (the spectrum
divided by its own smoothed magnitude: the image's 1/f colour removed) and then division by the
local energy of the result (edges and hair, where the image drowns the mark, count less). On
128 px face crops it raises the mark's correlation ~1.6x over a band-pass filter alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from facekit.watermark.carriers import GRID

MAX_CROP = 0.15  # searched: windows down to 85% of the marked frame's side, anywhere in it
# The mark is present when the score reaches THRESHOLD, or THRESHOLD_WITH_PAYLOAD and the decoded
# payload's CRC-8 matches (which a random decoding does 1 time in 256). Both set from the measured
# scores of unmarked frames (docs/watermark.json).
THRESHOLD = 6.0
THRESHOLD_WITH_PAYLOAD = 4.5
HYPOTHESES = 2500  # effective number of independent hypotheses: false-alarm estimate = HYPOTHESES x Q(z)
CRC_PASS = 1.0 / 256  # probability that a random decoding passes the CRC
EARLY_EXIT = 10.0  # an uncropped hypothesis scoring this ends the search
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True, kw_only=True)
class Hypothesis:
    score: float  # correlation / surface std at the best offset
    size: int  # n: the window's side on the grid
    offset: tuple[int, int]  # (dy, dx) of the window on the grid
    window: np.ndarray = field(repr=False)  # (n, n) whitened luma
    spread: float  # the correlation surface's std (the unit of soft bits)


def luma(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> float32 (H, W) luma (BT.601, as JPEG and H.264 compute it)."""
    return image.astype(np.float32) @ LUMA


def whiten(y: np.ndarray, grid: int = GRID) -> np.ndarray:
    """(n, n) luma, n <= grid -> (grid, grid) float32: the window zero-padded, its spectrum made
    phase-only, then its local energy normalised; zero outside the window."""
    n = y.shape[0]
    padded = np.zeros((grid, grid), np.float32)
    padded[:n, :n] = y - y.mean()
    spectrum = np.asarray(cv2.dft(padded, flags=cv2.DFT_COMPLEX_OUTPUT))  # (grid, grid, 2)
    magnitude = cv2.GaussianBlur(cv2.magnitude(spectrum[..., 0], spectrum[..., 1]), (0, 0), 1.5)
    spectrum = spectrum / (magnitude + 1e-3)[..., None]
    flat = np.asarray(cv2.idft(spectrum, flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE))
    flat[n:], flat[:, n:] = 0.0, 0.0
    energy = cv2.GaussianBlur(flat * flat, (0, 0), 1.5)
    return flat / np.sqrt(energy + 1e-3 * float(energy[:n, :n].mean()) + 1e-12)


def sizes(grid: int = GRID, max_crop: float = MAX_CROP) -> list[int]:
    return list(range(grid, math.ceil((1.0 - max_crop) * grid) - 1, -1))


def _resize(y: np.ndarray, n: int) -> np.ndarray:
    shrink = y.shape[0] > n and y.shape[1] > n
    return cv2.resize(y, (n, n), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def spectrum(carrier: np.ndarray) -> np.ndarray:
    """A carrier's packed DFT (cv2's CCS layout), as `scan` wants the sync carrier's."""
    return np.asarray(cv2.dft(carrier.astype(np.float32)))


def _hypothesis(y: np.ndarray, n: int, sync_spectrum: np.ndarray) -> Hypothesis:
    """The best offset for window size n."""
    grid = sync_spectrum.shape[0]
    padded = whiten(_resize(y, n), grid)  # (grid, grid), the window top-left
    # corr[dy, dx] = sum over the window of window(y, x) * sync(y + dy, x + dx)
    product = cv2.mulSpectrums(sync_spectrum, cv2.dft(padded), 0, conjB=True)
    corr = cv2.idft(product, flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE)
    spread = float(corr.std()) + 1e-12
    valid = corr[: grid - n + 1, : grid - n + 1]
    dy, dx = np.unravel_index(int(np.argmax(valid)), valid.shape)
    return Hypothesis(
        score=float(valid[dy, dx]) / spread,
        size=n,
        offset=(int(dy), int(dx)),
        window=padded[:n, :n],
        spread=spread,
    )


def scan(y: np.ndarray, sync_spectrum: np.ndarray, *, early_exit: float | None) -> Hypothesis:
    """The best (size, offset) hypothesis for luma `y`; sync_spectrum = `spectrum(sync carrier)`.

    Coarse to fine: every other size first (a size one step off still correlates well), then the
    two neighbours of the best; an uncropped hypothesis scoring `early_exit` ends the search."""
    candidates = sizes(sync_spectrum.shape[0])
    best = _hypothesis(y, candidates[0], sync_spectrum)
    if early_exit is not None and best.score >= early_exit:
        return best
    for n in candidates[2::2]:
        found = _hypothesis(y, n, sync_spectrum)
        best = found if found.score > best.score else best
    for n in (best.size - 1, best.size + 1):
        if n in candidates:
            found = _hypothesis(y, n, sync_spectrum)
            best = found if found.score > best.score else best
    return best


def soft_bits(hypothesis: Hypothesis, payload_carriers: np.ndarray) -> np.ndarray:
    """(92,) correlations of the window with the payload carriers, in units of the surface std.

    payload_carriers: (92, G * G) float32, the carriers 1..92 flattened (contiguous).
    """
    n, (dy, dx) = hypothesis.size, hypothesis.offset
    grid = math.isqrt(payload_carriers.shape[1])
    placed = np.zeros((grid, grid), np.float32)
    placed[dy : dy + n, dx : dx + n] = hypothesis.window
    return (payload_carriers @ placed.ravel()) / hypothesis.spread


def decide(score: float, payload_ok: bool) -> bool:
    """Whether the mark is present, given the best score and whether the payload decoded."""
    return score >= THRESHOLD or (payload_ok and score >= THRESHOLD_WITH_PAYLOAD)


def false_alarm(score: float, payload_ok: bool = False) -> float:
    """Estimated probability that an unmarked image scores at least `score` (and, with payload_ok,
    that its decoding also passes the CRC)."""
    tail = HYPOTHESES * 0.5 * math.erfc(score / math.sqrt(2.0))
    return min(1.0, tail * (CRC_PASS if payload_ok else 1.0))
