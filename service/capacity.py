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
from dataclasses import dataclass

from service.errors import ServiceError, exhausted, invalid

# Of the latency budget one batch may cost: a live frame waits for the batch in flight and then
# rides in its own, and both together must fit the batcher's LATE_SHARE (0.6) of it. At 0.4 a
# 1-stream live run beside a deep offline stream lost 48 of 250 frames (p99 155 ms); at 0.25, 0.
BATCH_SHARE = 0.25
HEADROOM = 0.9  # of the capacity admission hands out
DEFAULT_FPS = 25.0
MAX_FPS = 120.0
_DECAY = 0.97  # per observed batch: ~30 batches of memory


@dataclass
class CostModel:
    """Seconds per generator call as a function of the batch size."""

    fixed: float = 0.0
    per_frame: float = 0.05
    # weighted sums for least squares: n, sum b, sum b^2, sum t, sum b t
    _sums: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)
    observations: int = 0

    def observe(self, batch: int, seconds: float) -> None:
        n, sb, sbb, st, sbt = (x * _DECAY for x in self._sums)
        b = float(batch)
        self._sums = (n + 1, sb + b, sbb + b * b, st + seconds, sbt + b * seconds)
        self.observations += 1
        n, sb, sbb, st, sbt = self._sums
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
        return self.fixed + self.per_frame * batch

    def max_batch(self, seconds: float, ceiling: int) -> int:
        """The largest batch (1..ceiling) whose call takes at most `seconds`."""
        fits = int((seconds - self.fixed) / self.per_frame) if self.per_frame > 0 else ceiling
        return max(1, min(ceiling, fits))

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
        raise invalid(f"expected_fps must be 1-{MAX_FPS:.0f} (or 0 for {DEFAULT_FPS:.0f}), got {value}")
    return value
