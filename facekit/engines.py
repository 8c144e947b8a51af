"""CPU inference engines for the exported ONNX models, behind one small interface.

    engine = open_engine(path, "openvino", threads=2)
    image, = engine.run({"landmark_image": drawn, "adain": psi}, ["image"])

Engines (`ENGINES`):
- `onnxruntime`: ONNX Runtime's CPU execution provider, fp32 (the reference; always there).
- `openvino`: OpenVINO's CPU plugin, fp32. The same numbers as onnxruntime to float rounding;
  compiled for static batches of 1, 2 and 4 (larger batches run as a sequence of those).
- `openvino-bf16`: OpenVINO computing in bfloat16 where the CPU does so natively (AMX or AVX-512
  BF16); ~2x `openvino`. It changes the numbers, so it is a candidate only where the model's
  engine verdict (`engines.json` beside the model file, written by `talkinghead evaluate
  --engines ... --verdict`) says it held quality on the evaluation people, measured on the full
  evaluation protocol (`passed_engines`).

Lanes: an engine opened with `lanes=L` (and `threads=N`) runs up to L calls side by side, each on
N / L threads of its own (OpenVINO: L streams; ONNX Runtime: runs of N / L intra-op threads);
more calls wait for a free lane (`Turns`: live calls before offline ones, each in arrival order). On
this 2-core VM, openvino-bf16 as 2 lanes of one thread gave 100 frames/s at batch 1 against 82
as one lane of two (96 against 91 at batch 2), and kept 93 against 70 beside a process taking 15 %
of one core: lanes share no barrier, so a thread the OS lends to someone else stalls only its own
call. A call on one lane takes longer (batch 1: ~20 ms against ~12): callers that want the
throughput keep `lanes` calls in flight (the service's batcher does).

DENORMALS: every engine computes with denormal floats (below ~1.2e-38) flushed to zero (OpenVINO's
CPU_DENORMALS_OPTIMIZATION, ONNX Runtime's session.set_denormal_as_zero). The shipped generator
makes enough of them on a real portrait's psi to take the CPU's slow path: on this VM, 2 lanes,
onnxruntime ran 20 frames/s on real faces against 62 on zeros, openvino 57 against 64,
openvino-bf16 123 against 133 (1 lane: 15 / 50 / 100 against 44 / 57 / 105); flushed, each runs
as fast on real faces as on zeros, and the frames are bit-identical (64 driven frames of the demo
portrait, every engine). Timings on zeros or on random inputs of small scale do not show it.
ONNX Runtime sets the flags only in the thread that opens a session (and its own pool threads),
and a lane runs on its caller's thread: a service's pool thread other than the opener ran a real
portrait's frame in 115 ms against 43 (2 lanes; 63 against 27 in one), so `OnnxRuntimeEngine.run`
sets them in its thread first (`flush_denormals`). Side effect: the flush-to-zero /
denormals-are-zero flags stay set in the threads that open or run an engine, so later float
work there (numpy, torch) flushes denormals too - harmless to images and landmarks. Restoring the
caller's flags around each call was tried once and the test suite's process died later
(SIGSEGV); that was probably OpenVINO's signal stack (`openvino_core`), but it was not retried.

`choose` times the candidates on the model itself, `lanes` calls at a time, and returns the
fastest: the service's embedded backend and `talkinghead bench` both pick with it, so they run what
they measured. Torch-free: the service and the evaluation (training side) share this module.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import heapq
import itertools
import json
import logging
import platform
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from facekit.contract import ADAIN, IMAGE, LANDMARK_IMAGE, WARPED, ModelInfo

log = logging.getLogger("talkinghead.engines")

ONNXRUNTIME, OPENVINO, OPENVINO_BF16 = "onnxruntime", "openvino", "openvino-bf16"
ENGINES = (ONNXRUNTIME, OPENVINO, OPENVINO_BF16)
EXACT = (ONNXRUNTIME, OPENVINO)  # fp32: candidates without a verdict
VERDICT_FILE = "engines.json"
# The evaluation gate (issue 15): a lossy engine passes when, on the evaluation people, SSIM drops
# by at most this much, the identity distance rises by at most this much and the share of frames
# in which dlib finds a face drops by at most this much against fp32 (PyTorch's feed-forward row).
MAX_SSIM_DROP = 0.01
MAX_IDENTITY_RISE = 0.02
# Identity is averaged only over frames with a face, so an engine that loses the face in the hard
# frames drops them from its identity figure and can even improve it: face found is gated too.
# The shipped bf16 engine's largest drop: 0.00235, on the stills (models/talkinghead-small.engines.json).
MAX_FACE_FOUND_DROP = 0.01
AUTO_LANES = 2  # lanes where 0 (auto) is asked for and there are the threads for them
LIVE, OFFLINE = 0, 1  # run priorities: a live call waiting for a lane goes before offline ones
STARVE_S = 1.0  # ... unless an offline one has waited this long (Turns): slower, never stopped


class _Mxcsr:
    """The SSE control register of the calling thread (x86-64 Linux, through glibc's fenv_t), for
    `flush_denormals`: FTZ (bit 15) and DAZ (bit 6) make the CPU treat denormal floats as zero."""

    DENORMALS_ARE_ZERO = 1 << 15 | 1 << 6
    ENV_SIZE, OFFSET = 32, 28  # glibc's x86-64 fenv_t: the x87 environment, then the MXCSR

    def __init__(self) -> None:
        self.libm: Any = None
        if sys.platform == "linux" and platform.machine() == "x86_64":
            try:
                self.libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
                self.libm.fegetenv, self.libm.fesetenv  # noqa: B018  (both must be there)
            except (OSError, AttributeError):
                self.libm = None

    def get(self) -> tuple[Any, int] | None:
        if self.libm is None:
            return None
        env = ctypes.create_string_buffer(self.ENV_SIZE)
        if self.libm.fegetenv(env) != 0:
            return None
        return env, int.from_bytes(env.raw[self.OFFSET : self.OFFSET + 4], "little")

    def set(self, env: Any, mxcsr: int) -> None:
        env[self.OFFSET : self.OFFSET + 4] = mxcsr.to_bytes(4, "little")
        self.libm.fesetenv(env)


_MXCSR = _Mxcsr()


def flush_denormals(flush: bool = True) -> bool | None:
    """Make the calling thread treat denormal floats as zero (`flush=False`: as the IEEE default);
    whether it did before, None where that cannot be read (not x86-64 Linux). ONNX Runtime does
    this only in the thread that opens a session and in its own pool threads, but a lane runs on
    its caller's thread: `OnnxRuntimeEngine.run` calls this first (see DENORMALS)."""
    state = _MXCSR.get()
    if state is None:
        return None
    env, mxcsr = state
    was = mxcsr & _Mxcsr.DENORMALS_ARE_ZERO == _Mxcsr.DENORMALS_ARE_ZERO
    if was != flush:
        _MXCSR.set(env, mxcsr | _Mxcsr.DENORMALS_ARE_ZERO if flush else mxcsr & ~_Mxcsr.DENORMALS_ARE_ZERO)
    return was


class Turn:
    """One run's place in `Turns`: made before it waits, so that a `Cancel` can withdraw it."""

    __slots__ = ("admitted", "error", "priority", "ready", "since", "start", "withdrawn")

    def __init__(self, priority: int, start: Callable[[], None] | None) -> None:
        self.priority, self.start = priority, start
        self.since = 0.0  # when it began to wait (time.monotonic)
        self.ready = threading.Event()
        self.admitted = self.withdrawn = False
        self.error: BaseException | None = None

    def begin(self) -> None:
        if self.start is not None:
            try:
                self.start()
            except BaseException as error:  # raised in the run's own thread (`Turns.enter`)
                self.error = error


class Turns:
    """Admits up to `limit` runs of an engine at once; the others wait, lower `priority` first
    (LIVE before OFFLINE), each priority in arrival order. An engine's own queue is first come,
    first served, so without this a live frame waited behind every offline call handed over
    before it; with it the service can keep more offline calls waiting (no lane idles while its
    event loop collects the next) and a live call still passes them. A run that has waited
    `starve_s` goes next whatever its priority (the oldest such first): where live calls alone
    keep every lane busy (a machine slower than when its capacity was measured), an offline call
    waited until the backend's deadline failed its stream.

    A run admitted when another `leave`s is started (`start`: OpenVINO's start_async) by the
    leaving thread, before the admitted run's own thread even wakes: a lane that frees is given
    work in microseconds, not a thread wake-up and a GIL later."""

    def __init__(self, limit: int, *, starve_s: float = STARVE_S) -> None:
        self.limit, self.starve_s = limit, starve_s
        self._lock = threading.Lock()
        self._inside = 0
        self._waiting: list[tuple[int, int, Turn]] = []  # a heap: (priority, arrival, turn)
        self._arrival = itertools.count()

    def turn(self, priority: int = OFFLINE, start: Callable[[], None] | None = None) -> Turn:
        return Turn(priority, start)

    def enter(self, turn: Turn) -> None:
        """Wait until `turn` is admitted (and started); then `leave` when the run is over.
        RuntimeError when it was withdrawn first; its `start`'s error when that failed (its place
        given up already)."""
        with self._lock:
            if turn.withdrawn:
                raise RuntimeError("the run was cancelled")
            if self._inside < self.limit:  # (then nobody waits: `leave` admits the next at once)
                self._inside += 1
                turn.admitted = True
            else:
                turn.since = time.monotonic()
                heapq.heappush(self._waiting, (turn.priority, next(self._arrival), turn))
        if turn.admitted:
            turn.begin()
        else:
            turn.ready.wait()
            if not turn.admitted:
                raise RuntimeError("the run was cancelled")
        if turn.error is not None:
            self.leave()
            raise turn.error

    def leave(self) -> None:
        """An admitted run is over (its lane is free): admit the first waiting run and start it."""
        with self._lock:
            if self._waiting:
                turn = self._next()
                turn.admitted = True
            else:
                self._inside -= 1
                return
        turn.begin()
        turn.ready.set()

    def _next(self) -> Turn:
        """Out of the heap: the oldest run that has waited starve_s, else the first by priority."""
        # (a few runs wait at most: lanes + queued calls, so the scan costs nothing)
        oldest = min(range(len(self._waiting)), key=lambda i: self._waiting[i][1])
        if oldest and time.monotonic() - self._waiting[oldest][2].since >= self.starve_s:
            turn = self._waiting[oldest][2]
            self._waiting[oldest] = self._waiting[-1]
            self._waiting.pop()
            heapq.heapify(self._waiting)
            return turn
        return heapq.heappop(self._waiting)[2]

    def withdraw(self, turn: Turn) -> bool:
        """Take a waiting (or not yet entered) run out of line; False when it was admitted."""
        with self._lock:
            if turn.admitted:
                return False
            turn.withdrawn = True
            for i, (_, _, waiting) in enumerate(self._waiting):
                if waiting is turn:
                    self._waiting[i] = self._waiting[-1]
                    self._waiting.pop()
                    heapq.heapify(self._waiting)
                    break
        turn.ready.set()
        return True

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)


class Cancel:
    """Stops a run in flight from another thread (the backend's deadline): `cancel()` calls the
    hook the engine bound for the run, or the next one bound."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hook: Callable[[], None] | None = None
        self.cancelled = False

    def bind(self, hook: Callable[[], None]) -> None:
        with self._lock:
            self._hook = hook
            cancelled = self.cancelled
        if cancelled:
            hook()

    def unbind(self) -> None:
        """The run ended: a later `cancel()` must not reach its request, which another run may be
        using by then."""
        with self._lock:
            self._hook = None

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            hook = self._hook
        if hook is not None:
            hook()


class Engine(Protocol):
    name: str
    path: Path
    lanes: int  # calls it runs side by side at full speed (each on threads / lanes threads)

    @property
    def metadata(self) -> dict[str, str]: ...

    @property
    def input_names(self) -> list[str]: ...

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        cancel: Cancel | None = None,
        priority: int = OFFLINE,
    ) -> list[np.ndarray]: ...


class OnnxRuntimeEngine:
    name = ONNXRUNTIME

    def __init__(self, path: Path, *, threads: int, lanes: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.lanes = resolve_lanes(threads, lanes)
        self._turns = Turns(self.lanes)  # more callers wait for a free lane, live ones first
        self._ort = ort
        options = ort.SessionOptions()
        # Concurrent runs of one session each use this many threads (with 1, the caller's own).
        options.intra_op_num_threads = max(1, threads // self.lanes)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads spinning would steal the cores the asyncio loop needs between runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.set_denormal_as_zero", "1")  # see DENORMALS
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        cancel: Cancel | None = None,
        priority: int = OFFLINE,
    ) -> list[np.ndarray]:
        options = self._ort.RunOptions()
        turn = self._turns.turn(priority)

        def stop() -> None:  # out of line, or terminated mid-run
            if not self._turns.withdraw(turn):
                options.terminate = True

        if cancel is not None:
            cancel.bind(stop)
        flush_denormals()  # (in this thread: the run computes here)
        try:
            self._turns.enter(turn)
            try:
                return [np.asarray(x) for x in self.session.run(list(outputs), dict(feeds), options)]
            finally:
                self._turns.leave()
        finally:
            if cancel is not None:
                cancel.unbind()


_core_lock = threading.Lock()
_core: Any = None


def openvino_core() -> Any:
    """The process's one `openvino.Core`, made on first use and never destroyed.

    OpenVINO's CPU plugin, loaded by a Core, gives the thread that loads it an alternate signal
    stack of its own, and when that Core is destroyed unmaps it and puts back the stack it found -
    a stack already unmapped when Cores made on one thread are not destroyed in the reverse
    order (a Core per engine: two personalised generators opened on one pool thread and evicted
    oldest first). The next signal a Python handler catches on that thread (SIGTERM, SIGCHLD)
    finds no stack to run on and the process dies with SIGSEGV, no traceback. One Core that lives
    as long as the process: one plugin, one stack, always mapped; compiled models take their
    settings from `compile_model`, so nothing is shared but the plugin."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino as ov

            _core = ov.Core()
        return _core


class OpenVinoEngine:
    """Static shapes: OpenVINO's CPU plugin runs this generator 1.3-1.5x faster with a fixed batch
    size than with a dynamic batch axis, and as fast per frame at batch 4 as at 16. So the model
    is compiled for CHUNKS (1, 2 and 4 frames, ~0.4 s each, at open) and a batch of any size runs
    as a sequence of those (7 = 4 + 2 + 1): no compilation while serving, no padded frames, and
    memory for three shapes, not one per batch size. Each compiled shape has a pool of infer
    requests for concurrent callers."""

    CHUNKS = (4, 2, 1)
    QUEUED = 1  # requests started beyond one per lane: they wait inside OpenVINO, in order

    def __init__(self, path: Path, *, threads: int, precision: str, lanes: int = 1) -> None:
        self.path = Path(path)
        self.name = OPENVINO_BF16 if precision == "bf16" else OPENVINO
        self.lanes = resolve_lanes(threads, lanes)
        # A call per lane and one more are started (`QUEUED`): that one waits inside OpenVINO and a
        # stream that frees takes it at once, without Python or the GIL (three calls on 2 lanes:
        # 104 frames/s against 98 when the third waited in Python). Calls beyond those wait their
        # turn here, live ones first (`Turns`): OpenVINO's own queue is first come, first served.
        self._turns = Turns(self.lanes + self.QUEUED)
        self._core = openvino_core()
        self._model = self._core.read_model(str(path))
        self._config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": max(threads, self.lanes),
            "NUM_STREAMS": self.lanes,  # each stream runs one call on threads / lanes threads
            "PERFORMANCE_HINT": "LATENCY" if self.lanes == 1 else "THROUGHPUT",
            # Pinned threads would fight the service's other threads for the same cores.
            "ENABLE_CPU_PINNING": False,
            "CPU_DENORMALS_OPTIMIZATION": True,  # see DENORMALS
        }
        self._lock = threading.Lock()
        self._compiled: dict[tuple[int, ...], Any] = {}
        self._idle: dict[tuple[int, ...], list[Any]] = {}
        self._inputs = [p.get_any_name() for p in self._model.inputs]
        for size in self.CHUNKS:  # fails here, not on the first frame, when it cannot compile
            self.compile(size)
        # OpenVINO's numpy bridge (pybind11's numpy API, set up on first use) is first used here,
        # on one thread: two lanes' first calls setting it up at once hung a bench process for
        # good (both threads in its call_once, waiting for the GIL; seen once in ~20 starts).
        request = self._request((self.CHUNKS[-1],))
        request.get_input_tensor(0).data  # noqa: B018  (the access is the point)
        self._release((self.CHUNKS[-1],), request)

    @property
    def metadata(self) -> dict[str, str]:
        framework = self._model.get_rt_info(["framework"]).value
        return {str(k): str(v) for k, v in dict(framework).items()}

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    def compile(self, batch: int) -> None:
        """Compile the model for this batch size now (else on first use)."""
        key = (batch,)
        self._release(key, self._request(key))

    def _request(self, key: tuple[int, ...]) -> Any:
        """An idle infer request for inputs of this shape, compiling the model for it if needed."""
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if idle:
                return idle.pop()
            compiled = self._compiled.get(key)
        if compiled is None:
            model = self._model.clone()
            model.reshape(
                {p.get_any_name(): [key[0], *list(p.get_partial_shape())[1:]] for p in model.inputs}
            )
            started = time.monotonic()
            compiled = self._core.compile_model(model, "CPU", self._config)
            log.debug(
                "%s: %s compiled for batch %d in %.2f s",
                self.name,
                self.path,
                key[0],
                time.monotonic() - started,
            )
            with self._lock:
                compiled = self._compiled.setdefault(key, compiled)
        return compiled.create_infer_request()

    def _release(self, key: tuple[int, ...], request: Any) -> None:
        with self._lock:
            self._idle[key].append(request)

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        cancel: Cancel | None = None,
        priority: int = OFFLINE,
    ) -> list[np.ndarray]:
        sizes = {len(v) for v in feeds.values()}
        if len(sizes) != 1:
            raise ValueError("every input must have the same batch size")
        batch, start, parts = sizes.pop(), 0, []
        while start < batch:
            size = next(c for c in self.CHUNKS if c <= batch - start)
            chunk = {name: value[start : start + size] for name, value in feeds.items()}
            parts.append(self._run_static(chunk, outputs, cancel, priority))
            start += size
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([part[i] for part in parts]) for i in range(len(outputs))]

    def _run_static(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str], cancel: Cancel | None, priority: int
    ) -> list[np.ndarray]:
        key = (len(next(iter(feeds.values()))),)
        request = self._request(key)
        # Asynchronous start + wait: only a request started so can be cancelled mid-run.
        turn = self._turns.turn(priority, request.start_async)
        started = finished = inside = False

        def stop() -> None:  # out of line, or cancelled mid-run
            if not self._turns.withdraw(turn):
                request.cancel()

        try:
            if cancel is not None:
                cancel.bind(stop)
                if cancel.cancelled:
                    raise RuntimeError("the run was cancelled")
            # Copied into the request's own input buffers: start_async(feeds) spent ~0.6 ms of
            # Python (OpenVINO's data dispatcher) per call against ~0.01 ms for the copies.
            for name, value in feeds.items():
                buffer = request.get_tensor(name).data
                if buffer.shape != value.shape or buffer.dtype != value.dtype:
                    expected, got = f"{buffer.dtype} {buffer.shape}", f"{value.dtype} {value.shape}"
                    raise ValueError(f"input {name!r}: expected {expected}, got {got}")
                buffer[...] = value
            self._turns.enter(turn)  # (started, here or by the run that left its place to it)
            started = inside = True
            request.wait()
            inside = False
            self._turns.leave()  # the next waiting run starts now, before this one's copies
            # Copies: the request's buffers are reused by its next run.
            out = [np.array(request.get_tensor(name).data) for name in outputs]
            finished = True
            return out
        finally:
            if inside:
                self._turns.leave()
            if cancel is not None:
                cancel.unbind()
            if finished or not started:
                self._release(key, request)
            # else the request is dropped, not pooled: a cancelled run returns from wait() while
            # the node it was in may still be running on OpenVINO's threads, with its buffers;
            # the request's destructor waits for that, and the next run gets a fresh request.


# CPU flags with which OpenVINO's CPU plugin computes bf16 natively (AMX or AVX-512 BF16); without
# them its bf16 is emulated and slower than fp32.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def bf16_native(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True where this CPU computes bf16 natively. Read from the CPU's flags, not from an OpenVINO
    Core: asking OpenVINO loads its plugin and starts its thread pool in whichever process asks
    (a test collector, a CLI's argument parser) just to answer a yes/no question."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    lines = (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
    flags = next(lines, [])
    return any(flag in flags for flag in BF16_FLAGS)


def available() -> list[str]:
    """The engines this machine can run at all (a verdict decides about the lossy ones)."""
    import importlib.util

    names = [ONNXRUNTIME]
    if importlib.util.find_spec("openvino") is None:
        return names
    names.append(OPENVINO)
    if bf16_native():
        names.append(OPENVINO_BF16)
    return names


def resolve_lanes(threads: int, lanes: int = 0) -> int:
    """Lanes for `threads` threads: `lanes`, or with 0 (auto) AUTO_LANES; never more lanes than
    threads (a lane has at least one). The service's setting and the bench both resolve here."""
    if lanes < 0 or threads < 1:
        raise ValueError(f"threads must be >= 1 and lanes >= 0 (0 = auto), got {threads} and {lanes}")
    return min(lanes or AUTO_LANES, threads)


def in_flight(lanes: int) -> int:
    """Calls to keep in flight so that `lanes` lanes never wait between calls: one per lane and,
    with lanes, two more: one waiting inside the engine, which starts the moment a lane frees,
    and one waiting its turn (`Turns`), started by the run that ends, so the engine's queue is
    refilled before the caller even hears of it (the service's batcher hands over that many;
    `talkinghead bench` measures raw frames/s so)."""
    return lanes + 2 if lanes > 1 else 1


def open_engine(path: Path, name: str, *, threads: int, lanes: int = 1) -> Engine:
    """`name` on `path` with `threads` threads in all, split over `lanes` concurrent calls."""
    if name == ONNXRUNTIME:
        return OnnxRuntimeEngine(path, threads=threads, lanes=lanes)
    if name in (OPENVINO, OPENVINO_BF16):
        precision = "bf16" if name == OPENVINO_BF16 else "f32"
        return OpenVinoEngine(path, threads=threads, precision=precision, lanes=lanes)
    raise ValueError(f"unknown engine {name!r}; one of {', '.join(ENGINES)}")


# -- verdicts ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """An engine measured against fp32 on the evaluation people (training/evaluation): the drop in
    SSIM, the rise in identity distance and the drop in the share of frames with a face (gated),
    and the rise in landmark NME (recorded, not gated); each the worst over every T's pooled and
    per-person figures, and `worst` says where each was ("T=1 clip dpe_s"). `coverage` is what the
    run measured (training.evaluation.command.protocol_coverage): only a verdict of the full
    protocol is acted on (`passed_engines`)."""

    engine: str
    model_id: str
    ssim_drop: float
    identity_rise: float
    face_found_drop: float
    nme_rise: float | None = None
    worst: Mapping[str, str] = field(default_factory=dict)
    coverage: Mapping[str, Any] | None = None

    @property
    def full_protocol(self) -> bool:
        return self.coverage is not None and self.coverage.get("full_protocol") is True

    @property
    def passed(self) -> bool:
        return (
            self.ssim_drop <= MAX_SSIM_DROP
            and self.identity_rise <= MAX_IDENTITY_RISE
            and self.face_found_drop <= MAX_FACE_FOUND_DROP
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "ssim_drop": round(self.ssim_drop, 5),
            "identity_rise": round(self.identity_rise, 5),
            "face_found_drop": round(self.face_found_drop, 5),
            "nme_rise": None if self.nme_rise is None else round(self.nme_rise, 5),
            "worst": dict(self.worst),
            "passed": self.passed,
            "full_protocol": self.full_protocol,
            "coverage": None if self.coverage is None else dict(self.coverage),
            "max_ssim_drop": MAX_SSIM_DROP,
            "max_identity_rise": MAX_IDENTITY_RISE,
            "max_face_found_drop": MAX_FACE_FOUND_DROP,
        }


def write_verdicts(path: Path, verdicts: Sequence[Verdict]) -> None:
    data = {"engines": {v.engine: v.as_dict() for v in verdicts}}
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def passed_engines(path: Path, model_id: str) -> list[str]:
    """Lossy engines a verdict file passed for this model on the full evaluation protocol (none
    when it is missing, unreadable or for another model: a verdict holds for the weights it was
    measured on). A passed verdict of a reduced run (fewer people, T or frames, no stills), or one
    that does not say what it was measured on (written before verdicts recorded it), is ignored,
    and the log says why."""
    try:
        data = json.loads(Path(path).read_text())
        accepted = []
        for name, row in data["engines"].items():
            if name not in ENGINES or row.get("model_id") != model_id or row.get("passed") is not True:
                continue
            if row.get("full_protocol") is True:
                accepted.append(name)
            elif name in EXACT:
                continue  # the fp32 engines need no verdict: nothing to say
            elif "full_protocol" not in row:
                log.warning(
                    "ignoring the %s verdict in %s: it does not record what it was measured on (written "
                    "before verdicts did); regenerate it with talkinghead evaluate --engines ... --verdict",
                    name,
                    path,
                )
            else:
                reduced = "; ".join((row.get("coverage") or {}).get("reduced") or ["a reduced run"])
                log.warning(
                    "ignoring the %s verdict in %s: not measured on the full evaluation protocol (%s)",
                    name,
                    path,
                    reduced,
                )
        return sorted(accepted)
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning("ignoring the engine verdict %s: %s", path, error)
        return []


def candidates(model_path: Path, model_id: str) -> list[str]:
    """Engines that may run this model here: the exact ones, and the lossy ones its verdict passed."""
    allowed = set(EXACT) | set(passed_engines(Path(model_path).parent / VERDICT_FILE, model_id))
    return [name for name in available() if name in allowed]


# -- choosing -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    engine: str
    ms_per_frame: dict[int, float]  # batch size -> median ms per frame

    @property
    def score(self) -> float:
        """Mean ms per frame over the batch sizes timed (lower is faster)."""
        return float(np.mean(list(self.ms_per_frame.values())))


def time_engine(
    engine: Engine,
    feeds: Callable[[int], dict[str, np.ndarray]],
    outputs: Sequence[str],
    *,
    batches: Sequence[int] = (1, 4),
    repeats: int = 3,
) -> Timing:
    """Median wall time per frame of `repeats` rounds (after one warm-up) at each batch size; a
    round is `engine.lanes` runs at once, so an engine is timed as its callers use it."""
    lanes = getattr(engine, "lanes", 1)
    result = {}
    with ThreadPoolExecutor(lanes) as pool:
        for batch in batches:
            f = feeds(batch)

            def round_of_runs(f: dict[str, np.ndarray] = f) -> float:
                started = time.perf_counter()
                for future in [pool.submit(engine.run, f, outputs) for _ in range(lanes)]:
                    future.result()
                return time.perf_counter() - started

            round_of_runs()
            times = [round_of_runs() for _ in range(repeats)]
            result[batch] = float(np.median(times)) * 1e3 / (batch * lanes)
    return Timing(engine.name, result)


def choose(
    path: Path,
    names: Sequence[str],
    feeds: Callable[[int], dict[str, np.ndarray]],
    outputs: Sequence[str],
    *,
    threads: int,
    lanes: int = 1,
    batches: Sequence[int] = (1, 4),
    repeats: int = 3,
    opened: Sequence[Engine] = (),
) -> tuple[Engine, list[Timing], dict[str, Engine]]:
    """Open each named engine on `path` (or take it from `opened`), time it, and return the
    fastest, every timing and every engine that ran (by name). An engine that fails to open or
    run is logged and skipped; onnxruntime is the last resort."""
    ready = {engine.name: engine for engine in opened}
    ran: dict[str, Engine] = {}
    best: tuple[float, Engine] | None = None
    timings = []
    for name in names:
        try:
            engine = ready.get(name) or open_engine(path, name, threads=threads, lanes=lanes)
            timing = time_engine(engine, feeds, outputs, batches=batches, repeats=repeats)
        except Exception as error:
            log.warning("engine %s cannot run %s: %s", name, path, error)
            continue
        timings.append(timing)
        ran[name] = engine
        if best is None or timing.score < best[0]:
            best = (timing.score, engine)
    if best is None:
        fallback = ready.get(ONNXRUNTIME) or open_engine(path, ONNXRUNTIME, threads=threads, lanes=lanes)
        return fallback, timings, {ONNXRUNTIME: fallback}
    return best[1], timings, ran


def timing_feeds(info: ModelInfo) -> Callable[[int], dict[str, np.ndarray]]:
    """Inputs of `batch` frames for timing a generator of `info` (its cost does not depend on the
    pixels): random landmark images (and warped references), AdaIN parameters of plausible scale."""

    def feeds(batch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        size = (batch, info.image_size, info.image_size, 3)
        f: dict[str, np.ndarray] = {
            LANDMARK_IMAGE: rng.integers(0, 256, size, dtype=np.uint8),
            ADAIN: (0.1 * rng.standard_normal((batch, info.adain_size))).astype(np.float32),
        }
        if info.warp_guided:
            f[WARPED] = rng.integers(0, 256, size, dtype=np.uint8)
        return f

    return feeds


@dataclass(frozen=True)
class Pick:
    engine: Engine  # the shared generator's engine
    info: ModelInfo
    timings: list[Timing]  # empty when nothing was timed (one candidate, or configured)
    exact: str  # the fastest exact engine: personalised generators' engine
    configured: bool = False  # asked for by name, not chosen
    # Every engine opened for the choice, by name (the chosen one among them): the bench times them
    # all without compiling each again. The service keeps only `engine`.
    opened: dict[str, Engine] = field(default_factory=dict)

    def describe(self) -> str:
        return "configured" if self.configured else describe(self.timings) or "the only one allowed here"


def pick(path: Path, requested: str, *, threads: int, lanes: int = 1) -> Pick:
    """The generator at `path` on the `requested` engine, or with "auto" on the fastest of those
    `candidates` allows (timed on `timing_feeds`, `lanes` runs at once): what the service serves
    on and the bench times."""
    reference = open_engine(path, ONNXRUNTIME, threads=threads, lanes=lanes)
    info = ModelInfo.from_metadata(reference.metadata, where=str(path))
    if requested != "auto":
        engine = (
            reference
            if requested == ONNXRUNTIME
            else open_engine(path, requested, threads=threads, lanes=lanes)
        )
        if engine.name not in EXACT and engine.name not in passed_engines(
            Path(path).parent / VERDICT_FILE, info.model_id
        ):
            log.warning("engine %s was asked for, but no verdict passed it for %s", engine.name, path)
        exact = engine.name if engine.name in EXACT else OPENVINO
        return Pick(
            engine, info, [], exact, configured=True, opened={ONNXRUNTIME: reference, engine.name: engine}
        )
    names = candidates(path, info.model_id)
    if len(names) < 2:
        return Pick(reference, info, [], ONNXRUNTIME, opened={ONNXRUNTIME: reference})
    engine, timings, opened = choose(
        path, names, timing_feeds(info), [IMAGE], threads=threads, lanes=lanes, opened=[reference]
    )
    exact_timings = [t for t in timings if t.engine in EXACT]
    fastest_exact = min(exact_timings, key=lambda t: t.score).engine if exact_timings else ONNXRUNTIME
    return Pick(engine, info, timings, fastest_exact, opened={ONNXRUNTIME: reference, **opened})


def describe(timings: Sequence[Timing]) -> str:
    """'openvino-bf16 21.0/17.9 ms per frame at batch 1/4; onnxruntime ...' for the start-up log."""
    parts = []
    for t in sorted(timings, key=lambda t: t.score):
        sizes = "/".join(str(b) for b in t.ms_per_frame)
        ms = "/".join(f"{v:.1f}" for v in t.ms_per_frame.values())
        parts.append(f"{t.engine} {ms} ms per frame at batch {sizes}")
    return "; ".join(parts)
