"""The CPU's clock while every core works, measured, for the bench's share of the machine's peak.

A VM's /proc/cpuinfo gives the host's nominal clock ("cpu MHz" 2596 on an AMD EPYC whose cores
ran at 3.66 GHz), and cpufreq is absent, so a peak taken from it can be exceeded (openvino fp32
at 1.00 of it there). `measured_ghz` times a chain of dependent 64-bit multiplies and xors on
every core at once: each step waits for the previous (x86 `imul` 3 cycles + `xor` 1, on every
Intel core since Nehalem and every AMD Zen), so steps per CPU second x 4 is the clock, boost
included (CPU seconds of the thread, not wall time: another process sharing a core lowers how
often the chain runs, not how fast). The slowest core's figure is kept.
"""

from __future__ import annotations

import platform
import time
from concurrent.futures import ThreadPoolExecutor

CYCLES_PER_STEP = 4  # imul (3) + xor (1), each depending on the one before
STEPS = 50_000_000  # ~55 ms at 3.6 GHz


def _chain() -> object:
    import numba

    @numba.njit(nogil=True, cache=False)
    def chain(steps: int, x: int) -> int:
        for i in range(steps):
            x = (x * x) ^ i  # neither foldable nor vectorisable: one dependent step at a time
        return x

    return chain


def measured_ghz(cores: int, rounds: int = 3) -> float | None:
    """GHz of the slowest of `cores` threads running the chain together (the fastest of `rounds`
    rounds); None off x86-64 or without numba."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        chain = _chain()
        chain(10, 3)  # type: ignore[operator]  # compiled here, not timed
    except Exception:
        return None

    def timed(_: int) -> float:  # the thread's CPU time: a neighbour taking turns on the core does not count
        started = time.thread_time()
        chain(STEPS, 3)  # type: ignore[operator]
        return time.thread_time() - started

    best = 0.0
    with ThreadPoolExecutor(max_workers=cores) as pool:
        for _ in range(rounds):
            slowest = max(pool.map(timed, range(cores)))
            best = max(best, STEPS * CYCLES_PER_STEP / slowest / 1e9)
    return round(best, 3)
