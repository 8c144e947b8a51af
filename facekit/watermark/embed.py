"""Adding the mark: payload -> pattern on the canonical grid -> stretched over the frame -> masked
by the frame's own texture -> added to R, G and B alike.

    pattern = frame_pattern(grid_pattern(carriers, payload), (width, height))  # once per stream
    marked = add_mark(frame, pattern, strength=3.5)                            # per frame

The grid pattern is sqrt(SYNC_SHARE) x sync + sqrt((1 - SYNC_SHARE) / 92) x the coded bits'
carriers, each signed +-1: per-cell RMS 1. Per frame it is multiplied by `strength` and by a
texture mask (`texture_mask`: the frame's local high-frequency energy relative to its mean,
clipped to [MASK_FLOOR, MASK_CAP], normalised to RMS 1), so the mark hides in hair, skin texture
and edges and stays faint on flat skin and backgrounds while its total energy (RMS `strength`
grey levels, PSNR ~37.5 dB against the unmarked frame) stays the same. It is added to luma only
(equal parts of R, G, B; chroma untouched, so 4:2:0 subsampling loses nothing), saturating at 0
and 255. The mask is computed at <= 64 px whatever the frame size, and its arithmetic and the sum
are compiled loops (facekit.watermark.embed_jit; `warm_up` compiles them): a frame costs 0.14 ms
at 128 px, 0.31-0.37 ms at 256 px and 1.4-1.6 ms at 512 px of one core (OpenCV calls before:
0.22 / 0.44-0.66 / 2.4-2.6 ms, the same frames, alternating). A frame 2 or 4 times the mask's side
(128 and 256 px) is marked in one compiled pass (`mark_scaled`: shrink, grey, mask, upscale, add):
in the server, between other work, 0.10 ms of CPU at 128 px against 0.15 for the separate calls
(in a loop on one frame, where caches stay warm, 51 against 57 us).
"""

from __future__ import annotations

import cv2
import numpy as np

from facekit.watermark import embed_jit
from facekit.watermark.code import CODED_BITS, encode

SYNC_SHARE = 0.3  # of the mark's energy on the sync carrier; the rest carries the payload
DEFAULT_STRENGTH = 3.5  # RMS of the mark in grey levels: PSNR ~37.5 dB against the unmarked frame
MASK_FLOOR, MASK_CAP = 0.8, 1.5  # the texture mask's range, relative to the frame's mean texture
MASK_SIDE = 64  # the mask is computed at most this large (its detail scale ~ the mark band)


def check_frame(frame: np.ndarray, *, what: str = "frame") -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"{what} must be uint8 RGB (H, W, 3), got {frame.dtype} {frame.shape}")
    if min(frame.shape[:2]) < 16:
        raise ValueError(f"{what} is too small to carry the mark: {frame.shape[1]}x{frame.shape[0]}")
    return frame


def grid_pattern(carriers: np.ndarray, payload: int) -> np.ndarray:
    """(G, G) float32 mark of `payload` on the canonical grid, RMS 1."""
    assert carriers.shape[0] == CODED_BITS + 1, carriers.shape  # (1 + 92, G, G)
    signs = 2.0 * encode(payload).astype(np.float32) - 1.0  # (92,)
    weights = np.concatenate([[np.sqrt(SYNC_SHARE)], np.sqrt((1.0 - SYNC_SHARE) / CODED_BITS) * signs])
    return np.tensordot(weights.astype(np.float32), carriers, axes=1)  # (G, G)


def frame_pattern(pattern: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The grid pattern stretched over a (width, height) frame: (H, W) float32, with the grid
    pattern's RMS. Stretched bicubically: bilinear stretching lost 13 % of the mark's RMS in every
    frame above 128 px (0.86-0.87 x at 256-1024 px) and ~1 point of detection score (demo portrait
    at 512 px: 8.44 -> 9.49 lossless, 8.21 -> 9.21 after JPEG 50; Fourier interpolation scored
    below both, the detector shrinking with a box filter)."""
    width, height = size
    grid = pattern.shape[0]
    if width < grid and height < grid:
        return np.asarray(cv2.resize(pattern, (width, height), interpolation=cv2.INTER_AREA))
    if (width, height) == pattern.shape[::-1]:
        return np.asarray(pattern, np.float32)
    stretched = cv2.resize(pattern, (width, height), interpolation=cv2.INTER_CUBIC)
    gain = np.sqrt(float(np.mean(np.square(pattern))) / max(float(np.mean(np.square(stretched))), 1e-12))
    return np.asarray(stretched * np.float32(gain), np.float32)


def _kernel(sigma: float) -> np.ndarray:
    """cv2.GaussianBlur's kernel for a float32 image and this sigma (its size: 8 sigma + 1, odd)."""
    return np.ascontiguousarray(cv2.getGaussianKernel(round(sigma * 8 + 1) | 1, sigma, cv2.CV_32F).ravel())


_FINE, _COARSE = _kernel(1.0), _kernel(1.5)  # detail = grey - fine blur; energy = coarse blur of detail^2


def texture_mask(frame: np.ndarray) -> np.ndarray:
    """(H, W) float32 >= 0, RMS 1: where the frame has texture to hide the mark in."""
    height, width = frame.shape[:2]
    factor = min(1.0, MASK_SIDE / max(height, width))
    if factor < 1.0:  # shrink first: the grey conversion then costs nothing
        small = (max(8, round(width * factor)), max(8, round(height * factor)))
        frame = cv2.resize(frame, small, interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    mask = embed_jit.texture_mask(grey, _FINE, _COARSE, MASK_FLOOR, MASK_CAP)
    if factor < 1.0:
        return np.asarray(cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR))
    return np.asarray(mask)


def _mask_step(height: int, width: int) -> int:
    """The integer factor (2 or 4) by which the mask is smaller than the frame on both sides, else
    0: such frames (128 and 256 px squares among them) are marked in one compiled pass."""
    factor = min(1.0, MASK_SIDE / max(height, width))
    if factor >= 1.0:
        return 0
    small = (max(8, round(width * factor)), max(8, round(height * factor)))
    step = width // small[0]
    whole = step * small[0] == width and step * small[1] == height
    return step if whole and step in (2, 4) else 0


def add_mark(frame: np.ndarray, pattern: np.ndarray, *, strength: float) -> np.ndarray:
    """uint8 RGB frame + strength x pattern (H, W) x texture mask, saturated -> a new uint8 frame."""
    if pattern.shape != frame.shape[:2]:
        raise ValueError(f"pattern {pattern.shape} does not fit frame {frame.shape}")
    frame, pattern = np.ascontiguousarray(frame), np.ascontiguousarray(pattern, np.float32)
    step = _mask_step(*frame.shape[:2])
    if step:  # one pass, no intermediate frames: a served frame is marked with cold caches
        return np.asarray(
            embed_jit.mark_scaled(frame, pattern, step, _FINE, _COARSE, MASK_FLOOR, MASK_CAP, float(strength))
        )
    return np.asarray(embed_jit.add_mark(frame, pattern, texture_mask(frame), float(strength)))


def warm_up() -> None:
    """Compile the mark's loops (or load them from numba's cache) now, not on the first frame:
    for writeable and read-only frames and patterns (numba compiles each kind apart; the
    Watermarker's cached patterns are read-only)."""
    for frozen in range(4):
        for side in (16, 128):  # the separate loops, and the one-pass mark (mark_scaled)
            frame, pattern = np.zeros((side, side, 3), np.uint8), np.zeros((side, side), np.float32)
            frame.flags.writeable, pattern.flags.writeable = not frozen & 1, not frozen & 2
            add_mark(frame, pattern, strength=1.0)
