"""Keyed carriers: the secret key -> orthonormal pseudo-random patterns in a mid-frequency band.

The mark lives on a canonical G x G grid (GRID = 128) that is stretched over the whole frame, so
its frequencies are fixed relative to the frame: a frame scaled by 1/2 carries the same pattern,
and a crop shows a (scaled, shifted) window of it. Each carrier is white Gaussian noise drawn from
a generator seeded by HMAC-SHA256(key, purpose), band-passed to BAND cycles per frame side (radial
frequency 12-36: periods of 3.6-11 grid cells, 3.6-11 pixels at 128 px), then all carriers
(carrier 0 = the sync pattern, 1..92 = the coded payload bits) are orthonormalised in order (Gram-Schmidt),
and scaled to a per-cell RMS of 1. Without the key they are indistinguishable from noise.

Deriving a key's carriers costs ~50 ms; `carriers_for` caches the last few keys.
"""

from __future__ import annotations

import functools
import hashlib
import hmac

import numpy as np

from facekit.watermark.code import CODED_BITS

GRID = 128  # G: cells per frame side of the canonical pattern
BAND = (12.0, 36.0)  # radial frequency band, cycles per frame side
SCHEME = "talkinghead-watermark-v1"  # changes whenever the carriers would change


def key_bytes(key: str | bytes) -> bytes:
    """The secret as bytes; an empty key is refused."""
    data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if not data:
        raise ValueError("the watermark key is empty")
    return data


def _seed(key: bytes, purpose: str) -> np.random.Generator:
    digest = hmac.new(key, f"{SCHEME}/{purpose}".encode(), hashlib.sha256).digest()
    return np.random.default_rng(np.frombuffer(digest, np.uint64))


def band_mask(grid: int = GRID, band: tuple[float, float] = BAND) -> np.ndarray:
    """(grid, grid) bool: the FFT bins whose radial frequency lies in the band."""
    f = np.fft.fftfreq(grid) * grid
    radius = np.hypot(f[:, None], f[None, :])
    return (radius >= band[0]) & (radius <= band[1])


def make_carriers(key: str | bytes, *, count: int = CODED_BITS + 1, grid: int = GRID) -> np.ndarray:
    """(count, grid, grid) float32 carriers of `key`: orthogonal, per-cell RMS 1, zero mean."""
    rng = _seed(key_bytes(key), f"carriers/{grid}/{count}")
    noise = rng.standard_normal((count, grid, grid))
    mask = band_mask(grid)[:, : grid // 2 + 1]
    banded = np.fft.irfft2(np.fft.rfft2(noise) * mask, s=(grid, grid)).reshape(count, -1)  # (count, G*G)
    # Gram-Schmidt in order, via Cholesky of the Gram matrix (10x faster here than a QR)
    lower = np.linalg.cholesky(banded @ banded.T)
    orthonormal = np.linalg.solve(lower, banded)  # (count, G*G), rows orthonormal
    return (orthonormal.reshape(count, grid, grid) * grid).astype(np.float32)


@functools.lru_cache(maxsize=8)
def carriers_for(key: bytes) -> np.ndarray:
    """`make_carriers` of a key, cached (read-only array)."""
    carriers = make_carriers(key)
    carriers.flags.writeable = False
    return carriers


def fingerprint(key: str | bytes) -> str:
    """A short public id of a key (8 hex digits) for logs and reports; reveals nothing usable."""
    return hmac.new(key_bytes(key), f"{SCHEME}/fingerprint".encode(), hashlib.sha256).hexdigest()[:8]
