"""What the backend can deliver, measured, and which live streams that admits.

`CostModel` fits the cost of one generator call as `fixed + per_frame * batch` seconds
(exponentially weighted least squares over the batches the batcher runs, seeded by a calibration
call at start). From it:

- the largest batch whose call fits the latency budget: a live frame can wait for the batch in
  flight and then ride in its own, so a batch may cost at most BATCH_SHARE of the budget;
- capacity: frames per second at that batch size, on the backend's whole time, times its lanes
  (calls it runs side by side: each observed call took one lane).

`Admission` reserves each live (DROP_OLDEST) stream's frames per second (StreamConfig.expected_fps,
default 25) against HEADROOM x capacity; a stream that does not fit gets RESOURCE_EXHAUSTED with a
retry hint, instead of every admitted stream degrading. Offline (BLOCK) streams reserve nothing and
use what the live streams leave: the batcher serves live frames first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from service.errors import ServiceError, exhausted, invalid

# Of the latency budget one batch may cost: a live frame waits for the batch in flight and then
# rides in its own, and both together must fit the batcher's LATE_SHARE (0.6) of it. At 0.4 a
# 1-stream live run beside a deep offline stream lost 48 of 250 frames (p99 155 ms); at 0.25, 0.
BATCH_SHARE = 0.25
HEADROOM = 0.9  # of the capacity admission hands out
DEFAULT_FPS = 25.0
MAX_FPS = 120.0
SIZE_WEIGHT = 0.1  # of each call in its batch size's running mean (~10 calls of memory)
OUTLIER = 3.0  # a call over this many times its size's mean counts as this many times it
IDLE_S = 10.0  # a batch size not called this long drifts back to its calibration ...
HALF_LIFE_S = 10.0  # ... half the way every this many seconds
FORGET_S = 60.0  # a size calibration did not measure, not called this long, is forgotten


@dataclass(frozen=True)
class _Size:
    """What calls of one batch size cost: a running mean, the calibration's figure, the last call."""

    seconds: float
    calibrated: float | None
    seen: float  # time.monotonic() of the last observation (or of the calibration)


@dataclass
class CostModel:
    """Seconds per generator call as a function of the batch size.

    Each batch size has its own running mean (SIZE_WEIGHT of each call; a call over OUTLIER x the
    mean counts as OUTLIER x it), and `cost(b)` is that size's mean where calls of it were seen,
    else the line `fixed + per_frame * b` fitted through the sizes' means (one point each). Before,
    one line was fitted to every call: after an offline run of batches of 16 on busy cores the line
    put a one-frame call at ~4x what it cost, live capacity fell from 18 to 4 frames/s on an idle
    server, and, with no more calls to teach it, stayed there (a 5 frames/s live stream refused).
    Now big batches teach the cost of big batches, and a size not called for IDLE_S drifts back to
    its calibration (half the way every HALF_LIFE_S; a size calibration did not measure is
    forgotten after FORGET_S)."""

    fixed: float = 0.0
    per_frame: float = 0.05
    observations: int = 0
    _sizes: dict[int, _Size] = field(default_factory=dict)  # replaced, never changed in place
    _fits: dict[tuple[float, int], int] = field(default_factory=dict)  # max_batch's answers
    _settled: float = 0.0  # when settle last ran

    def observe(self, batch: int, seconds: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        old = self._sizes.get(batch)
        if old is None:
            size = _Size(seconds=seconds, calibrated=None, seen=now)
        else:
            seconds = min(seconds, OUTLIER * old.seconds)
            size = _Size(old.seconds + SIZE_WEIGHT * (seconds - old.seconds), old.calibrated, now)
        self._sizes = {**self._sizes, batch: size}
        self.observations += 1
        self._fit()

    def calibrate(self, batch: int, seconds: float, now: float | None = None) -> None:
        """The calibration's figure for `batch` (App._calibrate): the size's mean, and what it
        drifts back to when idle."""
        now = time.monotonic() if now is None else now
        self._sizes = {**self._sizes, batch: _Size(seconds=seconds, calibrated=seconds, seen=now)}
        self.observations += 1
        self._fit()

    def settle(self, now: float | None = None) -> None:
        """Sizes not called for IDLE_S move toward their calibration (forgotten after FORGET_S
        when calibration did not measure them): what busy cores taught them is not kept forever."""
        now = time.monotonic() if now is None else now
        sizes = dict(self._sizes)
        for batch, size in self._sizes.items():
            idle = now - size.seen
            if idle < IDLE_S:
                continue
            if size.calibrated is None:
                if idle >= FORGET_S and len(sizes) > 1:
                    del sizes[batch]
                continue
            if size.seconds != size.calibrated:
                since = max(self._settled, size.seen + IDLE_S)  # (drifted up to then already)
                keep = 0.5 ** (max(0.0, now - since) / HALF_LIFE_S)
                moved = size.calibrated + keep * (size.seconds - size.calibrated)
                if abs(moved - size.calibrated) < 1e-3 * size.calibrated:
                    moved = size.calibrated
                # (seen unchanged: the drift goes on from where the size was last called)
                sizes[batch] = _Size(moved, size.calibrated, size.seen)
        self._settled = now
        if sizes != self._sizes:
            self._sizes = sizes
            self._fit()

    def _fit(self) -> None:
        """The line through the sizes' means (least squares, one point per size)."""
        self._fits = {}
        points = [(float(b), size.seconds) for b, size in self._sizes.items()]
        n = float(len(points))
        if not points:
            return
        sb = sum(b for b, _ in points)
        sbb = sum(b * b for b, _ in points)
        st = sum(t for _, t in points)
        sbt = sum(b * t for b, t in points)
        spread = n * sbb - sb * sb
        if spread > 1e-6 * n * n:  # at least two batch sizes seen: fit both terms
            per_frame = (n * sbt - sb * st) / spread
            fixed = (st - per_frame * sb) / n
            if per_frame > 0:
                self.per_frame, self.fixed = per_frame, max(0.0, fixed)
                return
        self.per_frame, self.fixed = max(1e-5, st / max(sb, 1e-9)), 0.0  # one size: all per frame

    def reset(self) -> None:
        """Forget what was observed (another backend: App recalibrates)."""
        vars(self).update(vars(CostModel()))

    def cost(self, batch: int) -> float:
        size = self._sizes.get(batch)
        return size.seconds if size is not None else self.fixed + self.per_frame * batch

    def max_batch(self, seconds: float, ceiling: int) -> int:
        """The largest batch (1..ceiling) whose call, and every smaller one's, takes at most `seconds`."""
        key = (seconds, ceiling)
        fits = self._fits.get(key)
        if fits is None:
            fits = 1
            while fits < ceiling and self.cost(fits + 1) <= seconds:
                fits += 1
            self._fits[key] = fits
        return fits

    def capacity(self, budget: float, ceiling: int, lanes: int = 1) -> float:
        """Frames per second at the budget's batch size, every lane of the backend busy all the time."""
        batch = self.max_batch(budget * BATCH_SHARE, ceiling)
        return lanes * batch / self.cost(batch)


class Admission:
    """Live streams' reserved frames per second against the measured capacity."""

    def __init__(self, *, cost: CostModel, budget: float, max_batch: int, enabled: bool = True) -> None:
        self.cost = cost
        self.budget = budget
        self.max_batch = max_batch
        self.enabled = enabled
        self.committed = 0.0
        self.lanes = 1  # the shared generator's (Backend.lanes), set by each calibration (App)

    @property
    def capacity(self) -> float:
        return self.cost.capacity(self.budget, self.max_batch, self.lanes)

    def batch_limit(self) -> int:
        return self.cost.max_batch(self.budget * BATCH_SHARE, self.max_batch)

    def admit(self, fps: float) -> float:
        """Reserve `fps` for a live stream (ServiceError RESOURCE_EXHAUSTED when it does not fit);
        returns what was reserved, to give back with `release`."""
        if not self.enabled:
            return 0.0
        available = HEADROOM * self.capacity - self.committed
        if fps > available and self.committed > 0:
            error: ServiceError = exhausted(
                f"the server is at its live capacity: {self.committed:.0f} of {HEADROOM * self.capacity:.0f} "
                f"frames/s reserved, this stream asks {fps:.0f}; retry later, ask fewer frames per "
                "second, or use the BLOCK overflow policy (offline rendering)"
            )
            error.retry_after = 5.0
            raise error
        # A lone stream is admitted even beyond the capacity: it gets what the backend delivers.
        self.committed += fps
        return fps

    def release(self, reserved: float) -> None:
        self.committed = max(0.0, self.committed - reserved)


def expected_fps(value: float) -> float:
    """StreamConfig.expected_fps: 0 = DEFAULT_FPS; otherwise 1..MAX_FPS."""
    if value == 0:
        return DEFAULT_FPS
    if not math.isfinite(value) or not 1.0 <= value <= MAX_FPS:
        got = np.float32(value)  # as sent (a float field): 0.99, not 0.9900000095367432
        raise invalid(f"config.expected_fps must be 1-{MAX_FPS:.0f} (or 0 for {DEFAULT_FPS:.0f}), got {got}")
    return value
