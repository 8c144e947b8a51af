"""The backend interface: what the service needs from a model server, whichever runs the ONNX files.

The models' names, tensors and metadata are the export/serving contract (facekit/contract.py):
  embedder:            image, landmark_image (B, S, S, 3) uint8 -> embedding (B, 512), adain (B, D) f32
  generator:           landmark_image (B, S, S, 3) uint8, adain (B, D) f32 -> image (B, S, S, 3) uint8
  generator_<avatar>:  landmark_image (B, S, S, 3) uint8 -> image (B, S, S, 3) uint8 (psi baked in)
A warp-guided model's generators also take `warped` (B, S, S, 3) uint8 (`generator_feeds`).

Every model call runs under a deadline (`CallGate.call`, Settings.backend_timeout): a call that
does not answer in time is cut and raises BackendUnavailable (the stream gets UNAVAILABLE, not a
hang). A call in flight longer than `stall_s` (Settings.backend_stall), or than STALL_FACTOR x the
seconds its caller expected it to take (EXPECTED_S) where that is longer, makes `is_ready()` false,
so health says NOT_SERVING while the backend is stalled; a backend that finds its server gone
fails the calls in flight at once (`abandon_calls`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from facekit.contract import ADAIN, LANDMARK_IMAGE, WARPED, ModelInfo
from facekit.engines import OFFLINE

T = TypeVar("T")
# The seconds the caller expects its next model call to take (the batcher sets it from its cost
# model before a generator call; 0: no expectation). A call is stalled only past
# max(stall_s, STALL_FACTOR x that): a batch of 48 offline frames "in flight for 1.7 s" on a busy
# machine turned health NOT_SERVING under ordinary load, as if the backend had hung.
EXPECTED_S: contextvars.ContextVar[float] = contextvars.ContextVar("expected_call_s", default=0.0)
STALL_FACTOR = 3.0


class BackendUnavailable(RuntimeError):
    """The model server cannot run a model now (down, not ready, not loaded); the call may be retried.

    str(error) is the operator's detail (logged: addresses, paths, the model server's own words);
    `reason` is what a client is told: a short phrase with none of those."""

    def __init__(self, detail: str, *, reason: str = "it is not ready") -> None:
        super().__init__(detail)
        self.reason = reason


class Withdrawn(BackendUnavailable):
    """`withdrawn`: the stream's avatar changed under it; not a fault of the backend (not counted in
    talkinghead_backend_errors_total)."""


def withdrawn(name: str) -> BackendUnavailable:
    """A personalised stream's generator is no longer the one it opened on: removed, or now one
    fine-tuned on another record of the avatar id (it was replaced)."""
    return Withdrawn(
        f"{name} is not the generator the stream opened on (withdrawn, or made for another record)",
        reason="the avatar's personalised generator was withdrawn",
    )


def check_images(images: np.ndarray, size: int, *, name: str) -> None:
    """Assert the (B, S, S, 3) uint8 contract at the backend boundary."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"{name}: expected uint8 (B, {size}, {size}, 3), got {images.dtype} {images.shape}")


def generator_feeds(
    info: ModelInfo, landmark_images: np.ndarray, adain: np.ndarray | None, warped: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Checked inputs of the shared generator (`adain` given) or a personalised one (None)."""
    check_images(landmark_images, info.image_size, name=LANDMARK_IMAGE)
    feeds = {LANDMARK_IMAGE: landmark_images}
    if adain is not None:
        feeds[ADAIN] = np.ascontiguousarray(adain, np.float32)
    if info.warp_guided:
        if warped is None:
            raise ValueError("the warp-guided generator needs the warped reference of every frame")
        check_images(warped, info.image_size, name=WARPED)
        feeds[WARPED] = warped
    return feeds


@dataclass(eq=False)
class _Call:
    what: str
    started: float  # time.monotonic()
    task: asyncio.Future[Any]
    failure: BackendUnavailable | None = None  # why the gate ended the call (its task cancelled)
    expected: float = 0.0  # seconds the caller expected it to take (EXPECTED_S)

    def fail(self, failure: BackendUnavailable) -> None:
        if self.failure is None and not self.task.done():
            self.failure = failure
            self.task.cancel()


class ReadyGate:
    """Readiness and model calls, shared by the backends: ready once the models answer, not ready
    when they are lost or a call is stalled. Subclasses call `init_gate` in their __init__."""

    _ready: asyncio.Event
    timeout_s: float  # deadline of one model call
    stall_s: float  # a call in flight this long: not ready
    _calls: set[_Call]

    def init_gate(self, *, timeout_s: float, stall_s: float) -> None:
        self._ready = asyncio.Event()
        self.timeout_s, self.stall_s = timeout_s, stall_s
        self._calls = set()

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def loaded(self) -> bool:
        """The models are loaded and the server answers (calls may be made)."""
        return self._ready.is_set()

    def is_ready(self) -> bool:
        """Loaded and no call stalled: what health reports (never blocks)."""
        return self._ready.is_set() and self.stalled() is None

    def stalled(self) -> str | None:
        """The oldest call in flight for longer than stall_s, or STALL_FACTOR x the time its caller
        expected it to take where that is longer, described; None when there is none."""
        now = time.monotonic()
        old = [
            call
            for call in self._calls
            if now - call.started > max(self.stall_s, STALL_FACTOR * call.expected)
        ]
        if not old:
            return None
        oldest = min(old, key=lambda call: call.started)
        expected = f", expected {oldest.expected:.1f} s" if oldest.expected else ""
        return f"{oldest.what} in flight for {now - oldest.started:.1f} s{expected}"

    async def call(self, what: str, work: Awaitable[T], *, give_up: Callable[[], None] | None = None) -> T:
        """Await one model call under the deadline. BackendUnavailable when it does not answer
        within timeout_s or the backend abandons it; `give_up` then stops work that cancelling
        the awaitable cannot stop (a run in a thread).

        The call's own task is awaited, and a timer or abandon_calls cancels it: no timed wait and
        its futures for every frame's call."""
        task = asyncio.ensure_future(work)
        call = _Call(what=what, started=time.monotonic(), task=task, expected=EXPECTED_S.get())
        self._calls.add(call)
        deadline = asyncio.get_running_loop().call_later(self.timeout_s, self._expire, call)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if call.failure is None or (current is not None and current.cancelling()):
                raise  # the caller was cancelled, or the work cancelled itself
            if give_up is not None:
                give_up()
            raise call.failure from None
        finally:
            deadline.cancel()
            self._calls.discard(call)
            if not task.done():
                task.cancel()

    def _expire(self, call: _Call) -> None:
        call.fail(
            BackendUnavailable(
                f"{call.what} did not answer within {self.timeout_s:g} s (backend timeout)",
                reason=f"it did not answer within {self.timeout_s:g} s",
            )
        )

    def abandon_calls(self, why: str) -> None:
        """Fail every call in flight now with BackendUnavailable(why): the server is gone."""
        for call in list(self._calls):
            call.fail(BackendUnavailable(f"{call.what}: {why}", reason="it went away"))


class InFlight:
    """Calls in flight by model name: a personalised generator with one is never unloaded."""

    def __init__(self) -> None:
        self._counts: collections.Counter[str] = collections.Counter()

    def __contains__(self, name: object) -> bool:
        return self._counts[name] > 0  # type: ignore[index]

    @contextlib.contextmanager
    def call(self, name: str) -> Iterator[None]:
        self._counts[name] += 1
        try:
            yield
        finally:
            self._counts[name] -= 1
            if not self._counts[name]:
                del self._counts[name]


class Backend(Protocol):
    """A model server. Every method may raise BackendUnavailable; the service maps it to UNAVAILABLE."""

    name: str
    # Whether inference runs off this process's CPUs (a Triton server, a GPU): then the batcher draws
    # a model's next batch while the previous one is in the generator. In-process on the CPU the two
    # share the cores, and overlapping them made live frames slower, not throughput higher.
    remote_inference: bool
    # Whether a batch of frames costs less per frame than the frames one call each (a GPU). Where
    # it does not (CPU engines, Triton's CPU instances) and calls run side by side in lanes,
    # TALKINGHEAD_BATCHING=auto makes every call one frame (App._calibrate).
    batches_cheaper: bool
    # Times the models have been loaded: a Triton that restarts loads them anew, perhaps with another
    # instance count or on other hardware, and the service measures its cost again (App).
    loads: int

    async def start(self) -> None:
        """Begin connecting / loading; returns without waiting for the models."""

    async def close(self) -> None: ...

    async def wait_ready(self, timeout: float) -> bool:
        """True once the embedder and generator can run (within `timeout` seconds)."""
        ...

    def is_ready(self) -> bool:
        """Whether the backend serves now: loaded and no call stalled (health follows it; never blocks)."""
        ...

    @property
    def info(self) -> ModelInfo:
        """The served model's description; BackendUnavailable before the models are loaded."""
        ...

    async def embed(self, images: np.ndarray, landmark_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(K, S, S, 3) uint8 twice -> embedding (K, 512), adain (K, D) float32."""
        ...

    async def generate(
        self,
        landmark_images: np.ndarray,
        adain: np.ndarray,
        warped: np.ndarray | None = None,
        *,
        priority: int = OFFLINE,
    ) -> np.ndarray:
        """Shared generator: (B, S, S, 3) uint8, (B, D) float32 [, warped (B, S, S, 3) uint8 for a
        warp-guided model] -> (B, S, S, 3) uint8. `priority` (facekit.engines: LIVE 0, OFFLINE 1):
        a call waiting for a lane goes before waiting calls of a higher number (in-process engines;
        Triton's queue ignores it)."""
        ...

    async def has_personalised(self, avatar_id: str, made_for: str = "") -> bool:
        """Whether `generator_<avatar_id>` exists, was made from the served base model and (with
        `made_for`, an avatar record's contract.avatar_stamp) fine-tuned on that record."""
        ...

    async def generate_personalised(
        self,
        avatar_id: str,
        landmark_images: np.ndarray,
        warped: np.ndarray | None = None,
        *,
        priority: int = OFFLINE,
        made_for: str = "",
    ) -> np.ndarray:
        """`generator_<avatar_id>`: (B, S, S, 3) uint8 [, warped] -> (B, S, S, 3) uint8. With
        `made_for` (the stream's record's contract.avatar_stamp) BackendUnavailable (`withdrawn`)
        unless the generator was fine-tuned on that record: never another record's generator."""
        ...

    def lanes(self, avatar_id: str = "") -> int:
        """How many calls of the shared generator ("") or `generator_<avatar_id>` run side by side
        at full speed; the batcher keeps that many of its batches in flight."""
        ...

    def loaded_personalised(self) -> int:
        """Personalised generators this process has loaded (or, on Triton, had loaded) now."""
        ...

    def forget_personalised(self, avatar_id: str) -> None:
        """Drop what is known about `generator_<avatar_id>` (loaded, or absent): it was published,
        replaced or removed; the next has_personalised looks again."""
        ...

    def forget_all_personalised(self) -> None:
        """forget_personalised of every avatar (avatar events may have been missed)."""
        ...
