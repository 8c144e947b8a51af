"""`jit`: numba.njit for the per-frame loops facekit compiles (facekit.warp_jit, the watermark's
facekit.watermark.embed_jit), cached on disk where a cache can be written: beside the module or
under $NUMBA_CACHE_DIR (the service image sets it to /tmp/numba: its root filesystem is
read-only). Where neither is writable, each process compiles its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba


def jit(function: Callable[..., Any]) -> Any:
    """numba.njit(nogil=True), cached on disk where a cache can be written."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # "no locator available": a read-only install and no writable home
        return numba.njit(nogil=True)(function)
