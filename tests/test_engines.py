"""The CPU engines (facekit/engines.py): each runs the committed generator to the same frames as ONNX
Runtime, a deadline stops a run in flight, only a passed verdict lets a lossy engine serve, and the
service's in-process backend serves on the engine it chose."""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from facekit import contract, engines
from facekit.warp import warp_nearest
from service.backends.onnxruntime import OnnxRuntimeBackend
from service.settings import Settings
from tests.service_fixtures import *  # noqa: F403
from training.evaluation.command import judge_engines
from training.evaluation.report import Scores, pooled

REPO = Path(__file__).resolve().parents[1]
needs_openvino = pytest.mark.skipif(
    engines.OPENVINO not in engines.available(), reason="openvino is not installed"
)
needs_bf16 = pytest.mark.skipif(
    engines.OPENVINO_BF16 not in engines.available(), reason="this CPU has no native bf16"
)


def _generator(repository: Path) -> Path:
    path = contract.latest_version(repository / contract.GENERATOR)
    assert path is not None
    return path


def _feeds(path: Path, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Real landmark drawings of the demo driver and a psi of plausible scale."""
    from facekit.rasterize import draw_batch
    from facekit.sequence import LandmarkSequence

    meta = engines.open_engine(path, engines.ONNXRUNTIME, threads=1).metadata
    info = contract.ModelInfo.from_metadata(meta, where=str(path))
    driver = LandmarkSequence.load(REPO / "facekit/assets/demo_driver.npz").rescaled(info.image_size)
    drawn = draw_batch(driver.points[seed : seed + batch], info.image_size, info.draw_style)
    rng = np.random.default_rng(seed)
    feeds = {
        contract.LANDMARK_IMAGE: drawn,
        contract.ADAIN: (0.3 * rng.standard_normal((batch, info.adain_size))).astype(np.float32),
    }
    if info.warp_guided:  # the demo portrait's face, warped onto the driver's landmarks
        reference, points = _portrait_crop(info.image_size)
        driving = driver.points[seed : seed + batch]
        feeds[contract.WARPED] = warp_nearest(reference[None], points[None], driving)
    return feeds


@functools.cache
def _portrait_crop(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The demo portrait's face crop (S, S, 3) uint8 and its landmarks (68, 2), as an avatar keeps them."""
    from PIL import Image

    from facekit.detect import make_detector
    from training.finetune import prepare_images

    portrait = np.asarray(Image.open(REPO / "facekit/assets/demo_portrait.png").convert("RGB"))
    frames, points = prepare_images([portrait], ["demo_portrait.png"], make_detector("dlib"), size)
    return frames[0], points[0]


@needs_openvino
def test_openvino_fp32_makes_the_frames_onnxruntime_makes(model_repository: Path) -> None:
    path = _generator(model_repository)
    reference = engines.open_engine(path, engines.ONNXRUNTIME, threads=2)
    ov = engines.open_engine(path, engines.OPENVINO, threads=2)
    assert ov.metadata == reference.metadata  # the contract's metadata reads the same
    for batch in (1, 3):
        feeds = _feeds(path, batch, seed=batch)
        (want,) = reference.run(feeds, [contract.IMAGE])
        (got,) = ov.run(feeds, [contract.IMAGE])
        assert got.shape == want.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.01, (diff.max(), diff.mean())
    # inputs are copied into the request's own buffers: a wrong dtype is refused, not cast
    wrong = {**feeds, contract.ADAIN: feeds[contract.ADAIN].astype(np.float64)}
    with pytest.raises(ValueError, match="input 'adain': expected float32"):
        ov.run(wrong, [contract.IMAGE])


@needs_bf16
def test_openvino_bf16_stays_close_to_fp32(model_repository: Path) -> None:
    path = _generator(model_repository)
    feeds = _feeds(path, 4)
    (want,) = engines.open_engine(path, engines.ONNXRUNTIME, threads=2).run(feeds, [contract.IMAGE])
    (got,) = engines.open_engine(path, engines.OPENVINO_BF16, threads=2).run(feeds, [contract.IMAGE])
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.mean() < 2.0 and diff.max() < 40, (diff.mean(), diff.max())
    assert diff.max() > 0  # it does compute in bf16: the numbers change (that is why it is gated)


@pytest.mark.parametrize("name", engines.available())
def test_an_engine_in_two_lanes_runs_calls_side_by_side_to_the_same_frames(
    model_repository: Path, name: str
) -> None:
    """Two lanes: each call on one of the two threads (OpenVINO: two streams; ONNX Runtime: one
    intra-op thread per run), concurrent calls - two more than the lanes, as the batcher keeps
    them, so two wait for a lane - each getting their own frames, the same as one at a time; a
    lane never with less than one thread."""
    path = _generator(model_repository)
    two = engines.open_engine(path, name, threads=2, lanes=2)
    assert two.lanes == 2
    assert engines.open_engine(path, name, threads=1, lanes=2).lanes == 1
    if isinstance(two, engines.OpenVinoEngine):
        compiled = two._compiled[(1,)]
        assert int(compiled.get_property("NUM_STREAMS")) == 2
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 2
    else:
        assert two.session.get_session_options().intra_op_num_threads == 1
    feeds = [_feeds(path, batch, seed=seed) for batch, seed in ((1, 0), (2, 5), (3, 9))]
    alone = [two.run(f, [contract.IMAGE])[0] for f in feeds]
    with ThreadPoolExecutor(engines.in_flight(two.lanes)) as pool:
        together = list(pool.map(lambda f: two.run(f, [contract.IMAGE])[0], feeds * 4))
    for i, got in enumerate(together):
        np.testing.assert_array_equal(got, alone[i % len(feeds)])
    if name in engines.EXACT:  # and in fp32, what one lane of two threads makes, to rounding
        one = engines.open_engine(path, name, threads=2)
        for f, got in zip(feeds, alone, strict=True):
            diff = np.abs(got.astype(int) - one.run(f, [contract.IMAGE])[0].astype(int))
            assert diff.max() <= 2 and diff.mean() < 0.01, (diff.max(), diff.mean())


@pytest.mark.parametrize("name", engines.available())
def test_every_engine_flushes_denormal_floats_to_zero(tmp_path: Path, name: str) -> None:
    """Denormal floats (below ~1.2e-38) take the CPU's slow path: on real faces (a portrait's psi)
    the shipped generator made enough of them to run ONNX Runtime at 20 frames/s against 62 on
    zeros, OpenVINO at 57 against 64, bf16 at 123 against 133. Every engine computes with them
    flushed to zero (the frames are bit-identical: facekit/engines.py DENORMALS). A product of two normal
    floats that is denormal comes out 0, not 1e-40."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"])],
        "denormal",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("scale", TensorProto.FLOAT, [1], [1e-30])],
    )
    path = tmp_path / "denormal.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    engine = engines.open_engine(path, name, threads=2, lanes=2)
    x = np.array([[1e-10, 2e-10, 1.0, -1e-10]], np.float32)
    (y,) = engine.run({"x": x}, ["y"])
    _assert_flushed(y)

    # On a thread that keeps denormals (a service's pool thread made before the engine was
    # opened): ONNX Runtime flushed only in the thread that opened the session, and a lane runs
    # on its caller's thread (a real portrait's frames took 115 ms there against 43).
    def on_a_plain_thread() -> tuple[bool | None, np.ndarray]:
        could = engines.flush_denormals(False)
        return could, engine.run({"x": x}, ["y"])[0]

    with ThreadPoolExecutor(1) as pool:
        could, y = pool.submit(on_a_plain_thread).result()
    if could is None:
        pytest.skip("this platform's denormal flags cannot be set from Python")
    _assert_flushed(y)


def _assert_flushed(y: np.ndarray) -> None:
    """1e-10 x 1e-30 came out 0, 1 x 1e-30 stayed. Compared as bits: a thread that treats denormals
    as zero (this one, after opening engines) also reads a denormal as 0 in a float comparison."""
    bits = y.view(np.uint32)[0]
    assert bits[2] == np.float32(1e-30).view(np.uint32), "normal products are kept"
    assert np.all(bits[[0, 1, 3]] & 0x7FFFFFFF == 0), [hex(b) for b in bits]


@pytest.mark.parametrize("name", engines.available())
def test_a_cancelled_run_stops_before_it_would_finish(model_repository: Path, name: str) -> None:
    path = _generator(model_repository)
    engine = engines.open_engine(path, name, threads=1)
    feeds = _feeds(path, 8)
    engine.run(feeds, [contract.IMAGE])  # compiled and warm
    started = time.monotonic()
    engine.run(feeds, [contract.IMAGE])
    full = time.monotonic() - started
    cancel = engines.Cancel()
    threading.Timer(full / 10, cancel.cancel).start()
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017  # each engine raises its own error type
        engine.run(feeds, [contract.IMAGE], cancel)
    assert time.monotonic() - started < full * 0.7
    (image,) = engine.run(feeds, [contract.IMAGE])  # the engine still works afterwards
    assert image.shape[0] == 8


# Run in a process of its own: before the fix, the signals killed it with SIGSEGV.
_OPEN_CLOSE_THEN_SIGNAL = """
import gc, signal, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from facekit import engines

path = sys.argv[1]
caught = []
signal.signal(signal.SIGUSR1, lambda *_: caught.append(1))  # (Python runs it on the main thread)

def open_two_close_oldest_first():
    first = engines.open_engine(path, engines.OPENVINO, threads=1)
    second = engines.open_engine(path, engines.OPENVINO, threads=1)
    del first
    gc.collect()
    del second
    gc.collect()
    return threading.get_ident()

open_two_close_oldest_first()  # on the main thread (as `talkinghead evaluate` opens engines)
with ThreadPoolExecutor(1, thread_name_prefix="pool") as pool:  # on a pool thread (the service)
    worker = pool.submit(open_two_close_oldest_first).result()
    pool.submit(time.sleep, 0.5)
    signal.pthread_kill(worker, signal.SIGUSR1)  # caught on the pool thread's signal stack
    time.sleep(0.2)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)  # and on the main one's
    time.sleep(0.2)
print("caught", len(caught))
"""


@needs_openvino
def test_signals_reach_their_handlers_after_openvino_engines_close_in_any_order(
    model_repository: Path,
) -> None:
    """OpenVINO's CPU plugin swaps the alternate signal stack of the thread that loads it and puts
    the old one back when its Core goes: with a Core per engine, two engines closed oldest first
    on one thread left that thread a stack already unmapped, and the next signal a Python handler
    caught there (SIGTERM, SIGCHLD) killed the process - a service evicting personalised
    generators, or the test suite itself. Engines share one Core now: the handlers run."""
    done = subprocess.run(
        [sys.executable, "-c", _OPEN_CLOSE_THEN_SIGNAL, str(_generator(model_repository))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.split("\n")[-2] == "caught 2"


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_runs_waiting_for_a_lane_go_live_first_then_in_arrival_order() -> None:
    """engines.Turns: past its limit, runs wait; as runs leave, the waiting live ones are admitted
    first, then the offline ones in the order they came, each started by the thread that left
    (the lane is given work before the admitted run's own thread wakes)."""
    turns = engines.Turns(1)
    started: list[tuple[str, str]] = []
    holder = turns.turn(engines.OFFLINE)
    turns.enter(holder)  # the one lane is busy
    waiting = []
    with ThreadPoolExecutor(3) as pool:
        for n, (name, priority) in enumerate(
            [("offline-1", engines.OFFLINE), ("offline-2", engines.OFFLINE), ("live", engines.LIVE)]
        ):

            def start(name: str = name) -> None:
                started.append((name, threading.current_thread().name))

            turn = turns.turn(priority, start)
            waiting.append(pool.submit(turns.enter, turn))
            _wait_until(lambda n=n: turns.waiting() == n + 1)  # (in line before the next comes)
        assert started == []
        for _ in range(3):
            turns.leave()
        for future in waiting:
            future.result(timeout=10)
    me = threading.current_thread().name
    assert started == [("live", me), ("offline-1", me), ("offline-2", me)]
    for _ in range(3):
        turns.leave()
    again = turns.turn(engines.OFFLINE)
    turns.enter(again)  # every place given back: admitted at once
    assert again.admitted and turns.waiting() == 0


def test_an_offline_run_that_waited_starve_s_goes_before_live_ones() -> None:
    """Live runs that keep every lane busy do not hold an offline run back for ever: once it has
    waited starve_s it is admitted next, before live runs that came after it (without that an
    offline call waited until the backend's 5 s deadline failed its stream); one that has not
    waited so long still goes after them."""
    turns = engines.Turns(1, starve_s=0.3)
    started: list[str] = []
    turns.enter(turns.turn(engines.LIVE))  # the one lane is busy
    with ThreadPoolExecutor(3) as pool:
        waiting = []
        for n, (name, priority) in enumerate(
            [("offline", engines.OFFLINE), ("live-1", engines.LIVE), ("live-2", engines.LIVE)]
        ):
            turn = turns.turn(priority, lambda name=name: started.append(name))
            waiting.append(pool.submit(turns.enter, turn))
            _wait_until(lambda n=n: turns.waiting() == n + 1)
        turns.leave()  # at once: a live run first
        _wait_until(lambda: started == ["live-1"])
        time.sleep(0.35)
        turns.leave()  # the offline run has waited starve_s: it goes before live-2
        _wait_until(lambda: len(started) == 2)
        turns.leave()
        for future in waiting:
            future.result(timeout=10)
    assert started == ["live-1", "offline", "live-2"]


def test_a_run_withdrawn_from_the_line_never_starts_and_keeps_no_place() -> None:
    turns = engines.Turns(1)
    turns.enter(turns.turn())
    ran: list[str] = []
    gone = turns.turn(engines.LIVE, lambda: ran.append("gone"))
    after = turns.turn(engines.OFFLINE, lambda: ran.append("after"))
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(turns.enter, gone)
        _wait_until(lambda: turns.waiting() == 1)
        second = pool.submit(turns.enter, after)
        _wait_until(lambda: turns.waiting() == 2)
        assert turns.withdraw(gone)
        with pytest.raises(RuntimeError, match="cancelled"):
            first.result(timeout=10)
        turns.leave()
        second.result(timeout=10)
    assert ran == ["after"] and not turns.withdraw(after)  # (admitted: too late to withdraw)
    turns.leave()
    # a run whose start fails raises that error and gives its place back
    failing = turns.turn(engines.OFFLINE, lambda: 1 / 0)  # type: ignore[func-returns-value]
    with pytest.raises(ZeroDivisionError):
        turns.enter(failing)
    turns.enter(turns.turn())  # (admitted at once: the place was given back)


@pytest.mark.parametrize("name", engines.available())
def test_a_run_cancelled_while_waiting_for_a_lane_ends_at_once_and_the_engine_goes_on(
    model_repository: Path, name: str
) -> None:
    """The backend's deadline (or an abandoned call) reaches a run still waiting its turn: it
    ends now, not after the runs ahead of it, and the engine serves the next ones."""
    path = _generator(model_repository)
    engine = engines.open_engine(path, name, threads=1)
    feeds = _feeds(path, 1)
    engine.run(feeds, [contract.IMAGE])  # compiled and warm
    turns = engine._turns  # type: ignore[attr-defined]
    for _ in range(turns.limit):  # every lane (and OpenVINO's queued place) taken, for as long as needed
        turns.enter(turns.turn())
    cancel = engines.Cancel()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(engine.run, feeds, [contract.IMAGE], cancel, engines.LIVE)
        _wait_until(lambda: turns.waiting() == 1)
        cancel.cancel()
        with pytest.raises(RuntimeError, match="the run was cancelled"):
            waiting.result(timeout=10)
    assert turns.waiting() == 0
    for _ in range(turns.limit):
        turns.leave()
    (image,) = engine.run(feeds, [contract.IMAGE])
    assert image.shape[0] == 1 and turns.waiting() == 0


@pytest.mark.parametrize("name", engines.available())
def test_a_deadline_that_fires_after_its_run_leaves_the_next_run_alone(
    model_repository: Path, name: str
) -> None:
    """The service's deadline timers can fire after their batch finished; the engine has by then
    handed the same infer request to the next batch, which must not be the one cancelled."""
    path = _generator(model_repository)
    engine = engines.open_engine(path, name, threads=1)
    feeds = _feeds(path, 8)
    late = engines.Cancel()
    engine.run(feeds, [contract.IMAGE], late)  # finishes; `late` fires only afterwards
    started = time.monotonic()
    engine.run(feeds, [contract.IMAGE])
    full = time.monotonic() - started
    threading.Timer(full / 10, late.cancel).start()
    (image,) = engine.run(feeds, [contract.IMAGE])
    assert image.shape[0] == 8 and late.cancelled


def test_bf16_is_native_only_with_the_cpu_flags_for_it(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n\nprocessor\t: 1\n")
    assert not engines.bf16_native(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_tile amx_bf16\n")
    assert engines.bf16_native(cpuinfo)
    assert not engines.bf16_native(tmp_path / "missing")


def _verdict(path: Path, rows: dict[str, dict]) -> None:
    path.write_text(json.dumps({"engines": rows}))


# What a full run measured (training.evaluation.command.protocol_coverage): the only kind acted on.
FULL = {
    "clips": ["a", "b"],
    "shots": [1, 8],
    "max_drive": 0,
    "stills": 17,
    "full_protocol": True,
    "reduced": [],
}


def test_only_a_passed_verdict_for_this_model_admits_a_lossy_engine(tmp_path: Path) -> None:
    model = tmp_path / "1" / "model.onnx"
    model.parent.mkdir()
    verdict = model.parent / engines.VERDICT_FILE
    assert engines.passed_engines(verdict, "abc") == []  # no file
    assert set(engines.candidates(model, "abc")) <= set(engines.EXACT)
    passed = engines.Verdict(
        engines.OPENVINO_BF16, "abc", ssim_drop=0.002, identity_rise=0.01, face_found_drop=0.0, coverage=FULL
    )
    engines.write_verdicts(verdict, [passed])
    assert engines.passed_engines(verdict, "abc") == [engines.OPENVINO_BF16]
    assert engines.passed_engines(verdict, "another-model") == []  # measured on other weights
    failed = engines.Verdict(
        engines.OPENVINO_BF16, "abc", ssim_drop=0.011, identity_rise=0.0, face_found_drop=0.0, coverage=FULL
    )
    assert not failed.passed
    engines.write_verdicts(verdict, [failed])
    assert engines.passed_engines(verdict, "abc") == []
    for broken in ("{", "[]", '{"engines": {"openvino-bf16": "yes"}}', '{"engines": 3}'):
        verdict.write_text(broken)
        assert engines.passed_engines(verdict, "abc") == []
    _verdict(verdict, {"cuda": {"model_id": "abc", "passed": True}})
    assert engines.passed_engines(verdict, "abc") == []  # not an engine this project knows


def test_only_a_verdict_of_the_full_protocol_admits_a_lossy_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A verdict from a tiny run (one clip, T = 1, 2 driving frames, no stills) passed like a full
    one; now it is written, marked, and ignored with a log line saying why. So is a verdict that
    does not say what it measured (written before verdicts did: the committed one, until it is
    regenerated), and then the service keeps to the exact fp32 engines."""
    model = tmp_path / "1" / "model.onnx"
    model.parent.mkdir()
    verdict = model.parent / engines.VERDICT_FILE
    tiny = {"clips": ["dpe_s"], "shots": [1], "max_drive": 2, "stills": 0, "full_protocol": False}
    tiny["reduced"] = [
        "clips left out: a, b",
        "T left out: 8",
        "at most 2 driving frames per clip (--max-drive)",
    ]
    figures = {"ssim_drop": 0.0, "identity_rise": 0.0, "face_found_drop": 0.0}
    reduced = engines.Verdict(engines.OPENVINO_BF16, "abc", **figures, coverage=tiny)
    assert reduced.passed and not reduced.full_protocol
    engines.write_verdicts(verdict, [reduced])
    written = json.loads(verdict.read_text())["engines"][engines.OPENVINO_BF16]
    assert (
        written["passed"] is True
        and written["full_protocol"] is False
        and written["coverage"]["max_drive"] == 2
    )
    with caplog.at_level("WARNING", logger="talkinghead.engines"):
        assert engines.passed_engines(verdict, "abc") == []
    assert "not measured on the full evaluation protocol (clips left out: a, b; T left out: 8;" in caplog.text
    assert set(engines.candidates(model, "abc")) <= set(engines.EXACT)
    engines.write_verdicts(verdict, [engines.Verdict(engines.OPENVINO_BF16, "abc", **figures)])  # no coverage
    assert engines.passed_engines(verdict, "abc") == []
    # a verdict written before verdicts recorded their coverage (the committed one until 2026-12-05)
    committed = REPO / "models/talkinghead-small.engines.json"
    data = json.loads(committed.read_text())
    model_id = data["engines"][engines.OPENVINO_BF16]["model_id"]
    assert data["engines"][engines.OPENVINO_BF16]["coverage"]["full_protocol"] is True
    assert engines.OPENVINO_BF16 in engines.passed_engines(committed, model_id)  # measured on it all
    for row in data["engines"].values():
        row.pop("coverage"), row.pop("full_protocol", None)
    verdict.write_text(json.dumps(data))
    caplog.clear()
    with caplog.at_level("WARNING", logger="talkinghead.engines"):
        assert engines.passed_engines(verdict, model_id) == []
        assert set(engines.candidates(model, model_id)) == set(engines.EXACT) & set(engines.available())
    assert "it does not record what it was measured on" in caplog.text
    for exact in engines.EXACT:  # the fp32 engines need no verdict: no line about theirs
        assert f"ignoring the {exact} verdict" not in caplog.text
    engines.write_verdicts(verdict, [engines.Verdict(engines.OPENVINO_BF16, "abc", **figures, coverage=FULL)])
    assert engines.passed_engines(verdict, "abc") == [engines.OPENVINO_BF16]


def test_the_gate_judges_each_engine_by_its_worst_figure() -> None:
    def rows(ssim: float, identity: float | None) -> dict:
        return {"pooled": {"ssim": ssim, "identity_distance": identity, "face_found": 1.0}}

    report = {
        "reenactment": {
            "T=1": {"feed-forward": rows(0.50, 0.70), "feed-forward@a": rows(0.495, 0.71)},
            "T=8": {"feed-forward": rows(0.52, 0.66), "feed-forward@a": rows(0.505, 0.665)},
        },
        "stills": {"rows": {"feed-forward": rows(0, 0.60), "feed-forward@a": rows(0, 0.61)}},
    }
    (verdict,) = judge_engines(report, ["a"], "m")
    assert verdict.ssim_drop == pytest.approx(0.015) and not verdict.passed  # T=8 dropped too far
    report["reenactment"]["T=8"]["feed-forward@a"] = rows(0.515, 0.665)
    (verdict,) = judge_engines(report, ["a"], "m")
    assert verdict.passed and verdict.identity_rise == pytest.approx(0.01)
    report["stills"]["rows"]["feed-forward@a"] = rows(0, None)  # no face found on its stills
    (verdict,) = judge_engines(report, ["a"], "m")
    assert not verdict.passed


def _scores(ssim: list[float], identity: list[float], found: list[float]) -> Scores:
    values = {"ssim": ssim, "identity_distance": identity, "face_found": found, "nme": [0.02] * len(ssim)}
    return Scores({k: np.asarray(v, float) for k, v in values.items()})


def _engine_report(pytorch: dict[str, Scores], engine: dict[str, Scores]) -> dict:
    """A report's T = 8 rows as the evaluation makes them: pooled and per-clip means."""

    def row(per_clip: dict[str, Scores]) -> dict:
        return {"pooled": pooled(per_clip), "clips": {c: s.means() for c, s in per_clip.items()}}

    return {"reenactment": {"T=8": {"feed-forward": row(pytorch), "feed-forward@a": row(engine)}}}


def test_an_engine_that_loses_the_face_fails_the_gate() -> None:
    """The engine loses the face in the 6 hardest frames of one person of 7: their identity
    distances (0.45) drop out of its identity mean, which improves, and SSIM moves by 0.0011 pooled
    (0.008 for that person); the share of frames with a face drops by 0.029 pooled and fails it."""
    n, people = 30, "abcdefg"
    pytorch = {p: _scores([0.75] * n, [0.27] * (n - 6) + [0.45] * 6, [1] * n) for p in people}
    engine = dict(pytorch)
    engine["a"] = _scores(
        [0.75] * (n - 6) + [0.71] * 6, [0.27] * (n - 6) + [np.nan] * 6, [1] * (n - 6) + [0] * 6
    )
    (verdict,) = judge_engines(_engine_report(pytorch, engine), ["a"], "m")
    assert verdict.ssim_drop < engines.MAX_SSIM_DROP and verdict.identity_rise <= 0  # both pass
    assert verdict.face_found_drop == pytest.approx(6 / (7 * n))  # pooled (that person's: 0.2)
    assert verdict.face_found_drop > engines.MAX_FACE_FOUND_DROP
    assert not verdict.passed
    assert verdict.as_dict()["face_found_drop"] == pytest.approx(6 / (7 * n), abs=1e-5)
    assert verdict.nme_rise == 0.0 and "nme_rise" in verdict.as_dict()  # recorded, not gated
    (same,) = judge_engines(_engine_report(pytorch, pytorch), ["a"], "m")
    assert same.passed and same.face_found_drop == 0.0


def test_the_gate_judges_every_person_not_only_the_pool() -> None:
    """One person of seven ruined by the engine passed on the pooled figures (SSIM: a 0.06 drop
    for one person is 0.0086 pooled); each person's own figures are judged with the same limits,
    and the verdict names the worst."""
    n, people = 30, "abcdefg"
    pytorch = {p: _scores([0.75] * n, [0.27] * n, [1] * n) for p in people}
    cases = {
        "ssim_drop": _scores([0.69] * n, [0.27] * n, [1] * n),  # SSIM -0.06
        "identity_rise": _scores([0.75] * n, [0.37] * n, [1] * n),  # identity +0.1 (pooled +0.014)
    }
    for figure, ruined in cases.items():
        report = _engine_report(pytorch, {**pytorch, "c": ruined})
        pooled_figures = report["reenactment"]["T=8"]
        ours, theirs = pooled_figures["feed-forward"]["pooled"], pooled_figures["feed-forward@a"]["pooled"]
        limits = {"ssim_drop": engines.MAX_SSIM_DROP, "identity_rise": engines.MAX_IDENTITY_RISE}
        key, sign = {"ssim_drop": ("ssim", -1), "identity_rise": ("identity_distance", 1)}[figure]
        assert 0 < sign * (theirs[key] - ours[key]) <= limits[figure]  # the pool alone passes
        (verdict,) = judge_engines(report, ["a"], "m")
        assert getattr(verdict, figure) > limits[figure] and not verdict.passed, figure
        assert verdict.worst[figure] == "T=8 clip c"
        assert verdict.as_dict()["worst"][figure] == "T=8 clip c"
    # face found over the pool only: a person's one or two borderline frames lost pass, three fail
    for lost, passed in ((2, True), (3, False)):
        faceless = _scores([0.75] * n, [0.27] * (n - lost) + [np.nan] * lost, [1] * (n - lost) + [0] * lost)
        (verdict,) = judge_engines(_engine_report(pytorch, {**pytorch, "c": faceless}), ["a"], "m")
        assert verdict.passed is passed and verdict.worst["face_found_drop"] == "T=8 pooled", lost
    (same,) = judge_engines(_engine_report(pytorch, pytorch), ["a"], "m")
    assert same.passed and same.worst["ssim_drop"] == "T=8 pooled"  # ties: the first place
    assert str(same.as_dict()["face_found_drop"]) == "0.0"  # not -0.0


def test_settings_refuse_an_unknown_engine() -> None:
    with pytest.raises(ValueError, match="engine must be auto or one of"):
        Settings(engine="cuda")


def _backend_frames(
    repository: Path, engine: str, caplog: pytest.LogCaptureFixture
) -> tuple[str, np.ndarray]:
    async def main() -> tuple[str, np.ndarray]:
        backend = OnnxRuntimeBackend(repository=repository, engine=engine, threads=2)
        await backend.start()
        try:
            await asyncio.wait_for(backend._ready.wait(), 120)
            feeds = _feeds(_generator(repository), 2)
            image = await backend.generate(
                feeds[contract.LANDMARK_IMAGE], feeds[contract.ADAIN], feeds.get(contract.WARPED)
            )
            assert backend.engine is not None
            return backend.engine, image
        finally:
            await backend.close()

    with caplog.at_level("INFO", logger="talkinghead.service.onnxruntime"):
        return asyncio.run(main())


@pytest.mark.parametrize("verdict_file", ["none", "without coverage"])
def test_the_backend_serves_on_the_fastest_allowed_engine_and_says_which(
    model_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, verdict_file: str
) -> None:
    """No verdict, or one that does not record what it was measured on (written before verdicts
    did: not acted on): only the exact engines compete, and the service starts."""
    repository = copy_base_models(model_repository, tmp_path / "repo")  # noqa: F405
    verdict = _generator(repository).parent / engines.VERDICT_FILE
    verdict.unlink(missing_ok=True)
    if verdict_file == "without coverage":
        data = json.loads((REPO / "models/talkinghead-small.engines.json").read_text())
        for row in data["engines"].values():
            row.pop("coverage"), row.pop("full_protocol", None)
        verdict.write_text(json.dumps(data))
    chosen, frames = _backend_frames(repository, "auto", caplog)
    assert chosen in engines.EXACT
    line = next(r.getMessage() for r in caplog.records if "generator engine:" in r.getMessage())
    assert line.startswith(f"generator engine: {chosen}")
    for name in engines.available():
        if name in engines.EXACT:
            assert f"{name} " in line  # every exact engine was timed and is named with its figures
    assert engines.OPENVINO_BF16 not in line
    _, reference = _backend_frames(repository, engines.ONNXRUNTIME, caplog)
    assert np.abs(frames.astype(int) - reference.astype(int)).max() <= 2


def test_idle_personalised_generators_are_unloaded_beyond_the_limit(
    model_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each loaded personalised generator holds its engine's memory (~100 MiB on OpenVINO): beyond
    the limit the least recently used of the idle ones is unloaded when another loads; recently
    used ones stay (the limit is exceeded, with a warning); an unloaded one loads again on its
    next call and makes the same frames."""
    repository = copy_base_models(model_repository, tmp_path / "repo")  # noqa: F405
    template = _generator(repository).parent / "personalised-template.onnx"
    if not template.is_file():
        pytest.fail(f"{template} is missing: `make model-repository` writes it")
    for avatar in "abc":  # three avatars' generators (the same weights: what is loaded is counted)
        (repository / f"generator_{avatar}" / "1").mkdir(parents=True)
        shutil.copy(template, repository / f"generator_{avatar}" / "1" / contract.MODEL_FILE)
    idle_s = 2.0

    async def main() -> None:
        backend = OnnxRuntimeBackend(
            repository=repository,
            engine=engines.ONNXRUNTIME,
            threads=2,
            max_personalised=2,
            personalised_idle_s=idle_s,
        )
        await backend.start()
        try:
            await asyncio.wait_for(backend._ready.wait(), 120)
            feeds = _feeds(_generator(repository), 2)

            async def frames(avatar: str) -> np.ndarray:
                return await backend.generate_personalised(
                    avatar, feeds[contract.LANDMARK_IMAGE], feeds.get(contract.WARPED)
                )

            first = await frames("a")
            await frames("b")
            assert backend.loaded_personalised() == 2
            await asyncio.sleep(idle_s + 0.2)  # both idle now
            await frames("b")  # b used again: a is the least recently used
            await frames("c")  # a third one loads: a goes, b stays
            assert backend.loaded_personalised() == 2
            assert set(backend._last_used) == {"generator_b", "generator_c"}
            assert "unloaded personalised generator generator_a" in caplog.text
            again = await frames("a")  # loads again; b and c were used just now: none unloaded
            assert backend.loaded_personalised() == 3
            assert "above the limit of 2" in caplog.text
            np.testing.assert_array_equal(again, first)
            backend.forget_personalised("a")  # deleted or republished: no longer counted
            assert backend.loaded_personalised() == 2
        finally:
            await backend.close()

    with caplog.at_level("INFO", logger="talkinghead.service.onnxruntime"):
        asyncio.run(main())


def test_settings_bound_the_loaded_personalised_generators() -> None:
    with pytest.raises(ValueError, match="max_personalised_loaded must be >= 1"):
        Settings(max_personalised_loaded=0)


@needs_bf16
def test_a_passed_verdict_lets_bf16_compete(
    model_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = copy_base_models(model_repository, tmp_path / "repo")  # noqa: F405
    path = _generator(repository)
    model_id = engines.open_engine(path, engines.ONNXRUNTIME, threads=1).metadata[contract.Meta.MODEL_ID]
    engines.write_verdicts(
        path.parent / engines.VERDICT_FILE,
        [
            engines.Verdict(
                engines.OPENVINO_BF16,
                model_id,
                ssim_drop=0.0,
                identity_rise=0.0,
                face_found_drop=0.0,
                coverage=FULL,
            )
        ],
    )
    _backend_frames(repository, "auto", caplog)
    line = next(r.getMessage() for r in caplog.records if "generator engine:" in r.getMessage())
    assert engines.OPENVINO_BF16 in line
