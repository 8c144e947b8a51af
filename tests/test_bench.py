"""`talkinghead bench` end to end in miniature: it picks the engine the service would, times every
engine this machine has, reports GFLOPs and the share of the CPU's peak, drives a real server, and
the same server with a generator that costs nothing (the serving ceiling)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from client import bench, cpuclock
from client.bench import instant_repository
from facekit import contract, engines
from facekit.sequence import LandmarkSequence
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import TRITON_VENV

REPO = Path(__file__).resolve().parents[1]


def test_bench_reports_engines_and_peak_share(model_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--model-repository", str(model_repository), "--out", str(out)]
    argv += ["--batches", "1", "2", "--streams", "1", "--seconds", "2", "--raw-seconds", "0.3"]
    argv += ["--closed-loop-frames", "5"]
    # (a child process: run in this one, the bench's gRPC channels made a later fork segfault;
    # run from elsewhere, to see that it writes nothing where it runs: it made var/jobs there)
    work = tmp_path / "cwd"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "talkinghead.cli", *argv],
        cwd=work,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "TALKINGHEAD_WORKER_CHECKPOINT": str(REPO / "models" / "talkinghead-small.pt"),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(work.iterdir()) == [], list(work.rglob("*"))
    report = json.loads(out.read_text())
    assert report["engine"] in engines.ENGINES
    assert "generator engine:" in done.stdout
    assert set(report["engines"]) == set(engines.available())
    # the table times the engines the choice opened and warmed, not new copies compiled again
    timed = set(report["engine_choice_ms_per_frame"]) or {report["engine"]}
    assert {name for name, e in report["engines"].items() if e["opened_for_the_choice"]} == timed
    gflops = float(report["model"]["gflops_per_frame"])
    assert 1.0 < gflops < 10.0  # the shipped generator: 3.85
    for name, entry in report["engines"].items():
        assert entry["allowed"] == (
            name in engines.candidates(Path(report["model_path"]), report["model"]["model_id"])
        )
        for row in entry["rows"]:
            assert row["fps"] > 0
            assert row["gflops_per_s"] == round(row["fps"] * gflops, 1)
            # a share of the peak of the arithmetic it does (bf16 on AMX: 1.30 of the fp32 one),
            # at the clock the cores run at (a VM's cpuinfo clock let openvino fp32 reach 1.00)
            in_bf16 = name == engines.OPENVINO_BF16 and report["cpu_peak"]["bf16"]
            assert row["peak"] == (f"bf16 ({report['cpu_peak']['bf16']})" if in_bf16 else "fp32")
            assert 0 < row["peak_share"] <= 1, (name, row)
            assert row["fp32_peak_share"] > 0
    peak = report["cpu_peak"]
    assert peak["fp32_gflops"] > 0 and peak["ghz_measured"]
    assert peak["bf16_gflops"] > peak["fp32_gflops"] if peak["bf16"] else peak["bf16_gflops"] is None
    assert f"CPU: {peak['cores']} cores at {peak['ghz']:.2f} GHz (measured under load" in done.stdout
    # the server had measured its capacity before the bench's first call (not beside it)
    assert report["capacity_fps_at_start"] > 0
    assert "the server's live capacity, measured at its start" in done.stdout
    (live,) = report["live"]
    assert live["admitted"] == 1 and live["achieved_fps"] > 0
    # what admission holds after the row (the server's gauge, moved by the row's calls)
    assert live["capacity_fps_after"] > 0
    assert f"capacity after {live['capacity_fps_after']:.1f} fps" in done.stdout
    # the row's raw reference brackets it: a window before and one after, at the row's batch
    reference = live["raw_fps_reference"]
    assert live["raw_fps_before"]["batch"] == reference["batch"] == live["raw_fps_after"]["batch"] == 1
    assert reference["windows"] == 2
    mean = (live["raw_fps_before"]["fps"] + live["raw_fps_after"]["fps"]) / 2
    assert abs(reference["fps"] - mean) <= 0.01
    assert abs(live["ratio_to_raw"] - live["achieved_fps"] / reference["fps"]) <= 0.002
    # live + offline is counted over the 2 s every stream sends in, not over each stream's own
    # run (an offline stream drains its frames in flight after the live ones are gone)
    in_window = live["total_fps"] * 2
    assert 0 < in_window <= live["received"] + live["offline"]["received"]
    assert abs(in_window - round(in_window)) < 0.02  # frames counted, not a sum of two rates
    assert abs(live["total_ratio_to_raw"] - live["total_fps"] / reference["fps"]) <= 0.002
    # where the cores went in the row: the engine's threads did the most, the service's own
    # work took some, and what it and the client took leaves the generator the rest
    cpu = live["cpu"]
    assert 0 < cpu["service_cores"] < cpu["engine_cores"]
    assert cpu["client_cores"] > 0 and cpu["engine_ms_per_frame"] > 0 and cpu["raw_ms_per_frame"] > 0
    taken = (cpu["service_cores"] + cpu["client_cores"]) / report["cpu_peak"]["cores"]
    assert abs(cpu["share_left"] - (1 - taken)) <= 0.01
    # the serving ceiling: the same server with a generator that costs nothing serves far faster
    # than the real generator can run, and says what its own work costs per frame
    ceiling = report["serving_ceiling"]
    raw_batch1 = next(r["fps"] for r in report["raw_backend"] if r["batch"] == 1)
    assert ceiling["frames"] > 0 and ceiling["fps"] > 2 * raw_batch1
    assert 0 < ceiling["event_loop_cpu_ms_per_frame"] <= ceiling["server_cpu_ms_per_frame"]
    assert ceiling["raw_fps"] == raw_batch1
    assert 0 < ceiling["max_ratio_to_raw_with_this_client"] <= ceiling["max_ratio_to_raw"] < 1
    assert "serving ceiling (instant generator" in done.stdout
    # one live stream alone, then beside the embedded worker fine-tuning its avatar (a job of
    # 100 steps: still running when the 2 s window closes)
    beside = report["beside_personalisation"]
    assert beside["alone"]["received"] > 0 and beside["beside_job"]["received"] > 0
    assert beside["job_steps"] == 100 and not beside["job_done_in_window"]
    # the window opened once the job was fine-tuning (step 1 or later), and counts its steps in
    # the window only (none may be made in 2 s on a loaded machine: the worker runs at idle priority)
    start = beside["job_step_at_window_start"]
    assert 1 <= start <= beside["job_steps"]
    assert 0 <= beside["job_steps_in_window"] <= beside["job_steps"] - start
    assert f"the job made {beside['job_steps_in_window']} steps in the 2 s" in done.stdout
    assert "1 live stream beside a personalisation" in done.stdout


ZEN4 = (
    "vendor_id\t: AuthenticAMD\n"
    "cpu family\t: 25\n"
    "model\t\t: 17\n"
    "cpu MHz\t\t: 2596.140\n"
    "flags\t\t: fpu avx2 fma avx512f avx512_bf16\n"
)
SAPPHIRE = (
    "vendor_id\t: GenuineIntel\n"
    "cpu family\t: 6\n"
    "model\t\t: 143\n"
    "cpu MHz\t\t: 2000.000\n"
    "flags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n"
)
ZEN3 = (
    "vendor_id\t: AuthenticAMD\n"
    "cpu family\t: 25\n"
    "model\t\t: 1\n"
    "cpu MHz\t\t: 2450.000\n"
    "flags\t\t: fpu avx2 fma\n"
)


@pytest.mark.parametrize(
    ("cpuinfo", "per_cycle", "bf16", "bf16_per_cycle"),
    [(ZEN4, 32, "AVX-512 BF16", 64), (SAPPHIRE, 64, "AMX", 1024), (ZEN3, 32, None, None)],
)
def test_the_cpu_peak_follows_the_cores_units_and_their_measured_clock(
    cpuinfo: str, per_cycle: int, bf16: str | None, bf16_per_cycle: int | None
) -> None:
    """Zen 4 runs AVX-512 on 256-bit units (half an Intel core's FLOPs per cycle) and bf16 as
    pairs per fp32 lane (twice its fp32); AMX is a tile unit. The clock is the one measured on this
    machine's cores, not cpuinfo's nominal one."""
    peak = bench.cpu_peak(cpuinfo)
    assert peak["fp32_flops_per_cycle"] == per_cycle and peak["bf16"] == bf16
    assert peak["ghz_measured"] and peak["ghz"] != peak["cpuinfo_ghz"]
    assert peak["fp32_gflops"] == round(peak["cores"] * peak["ghz"] * per_cycle, 1)
    if bf16_per_cycle is None:
        assert peak["bf16_gflops"] is None
    else:
        assert peak["bf16_gflops"] == round(peak["cores"] * peak["ghz"] * bf16_per_cycle, 1)


def test_the_measured_clock_is_a_clock() -> None:
    """The dependent chain is not folded or vectorised by the compiler (folded, it read 29 GHz),
    and a core shared with another process still reads its own clock: CPU time, not wall time."""
    alone = cpuclock.measured_ghz(1)
    assert alone is not None and 0.8 < alone < 6.5, alone
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        crowded = cpuclock.measured_ghz(bench.usable_cores())
    finally:
        busy.kill()
        busy.wait()
    assert crowded is not None and crowded > 0.8 * alone, (crowded, alone)


def triton_venv() -> Path:
    """.venv-triton with its bundled Triton, or the test skips saying why."""
    from deploy.local import tritonserver

    venv = TRITON_VENV
    try:
        tritonserver.server_root(venv)
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    return venv


def bench_args(model_repository: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(["--model-repository", str(model_repository), "--streams", "1", *argv])


def test_the_engine_asked_for_is_the_one_the_bench_times_and_serves(model_repository: Path) -> None:
    """--engine onnxruntime named only the paired run's engine: the raw rows and the served ones
    (whose server runs the raw rows' engine) were OpenVINO's where auto picks it."""
    assert bench.measured_generator(bench_args(model_repository, "--engine", "onnxruntime")).engine.name == (
        engines.ONNXRUNTIME
    )
    others = [name for name in engines.available() if name != engines.ONNXRUNTIME]
    if others:
        chosen = bench.measured_generator(bench_args(model_repository, "--engine", others[0]))
        assert chosen.engine.name == others[0]


@pytest.mark.triton
def test_the_serving_ceiling_through_a_real_triton(model_repository: Path) -> None:
    """The ceiling through the triton backend and the bundled Triton serving the instant
    repository: frames flow, batched across the streams, and Triton's CPU is counted apart from
    the server's (a bound against the in-process generator means nothing there)."""
    venv = triton_venv()
    args = bench_args(model_repository, "--seconds", "1", "--batches", "1", "4")
    driver = LandmarkSequence.load(args.driver)
    row = asyncio.run(bench.serving_ceiling(args, driver, 50.0, triton_venv=venv))
    assert row["backend"] == "triton" and row["frames"] > 0 and row["fps"] > 0
    assert row["mean_batch"] > 1  # four streams' frames share Triton calls
    assert row["server_cpu_ms_per_frame"] > 0 and row["triton_cpu_ms_per_frame"] > 0
    assert "max_ratio_to_raw" not in row


@pytest.mark.triton
def test_the_model_through_a_real_triton(model_repository: Path) -> None:
    """The production path with the model itself: the bundled Triton serving the repository (its
    runner's engine, logged) and the service on the triton backend: raw Triton calls with Triton's
    CPU counted (not this process's), the server's capacity, and a live row against raw Triton."""
    venv = triton_venv()
    args = bench_args(model_repository, "--seconds", "1", "--raw-seconds", "0.5", "--batches", "1", "2")
    driver = LandmarkSequence.load(args.driver)
    report = asyncio.run(bench.through_triton(args, driver, venv))
    assert report["engine"] in engines.ENGINES and report["threads_per_instance"] >= 1
    assert report["instances"] == engines.AUTO_LANES  # the python profile's generator
    raw = report["raw"]
    assert raw["fps"] > 0 and raw["in_flight"] == engines.in_flight(engines.AUTO_LANES)
    # a frame's engine work is Triton's (its stubs'), tens of ms a frame on these cores
    assert raw["triton_cpu_ms_per_frame"] > 5
    assert report["capacity_fps_at_start"] > 0
    (row,) = report["live"]
    assert row["admitted"] == 1 and row["achieved_fps"] > 0 and row["dropped"] >= 0
    assert row["total_ratio_to_raw"] > 0 and row["raw_fps_reference"]["fps"] > 0
    # the row's engine CPU is Triton's, the whole server process's is the service's
    assert row["cpu"]["engine_ms_per_frame"] > 5 and row["cpu"]["raw_ms_per_frame"] > 5
    assert 0 < row["cpu"]["service_cores"] < row["cpu"]["engine_cores"]


def test_instant_generator_passes_its_warped_input_through(model_repository: Path, tmp_path: Path) -> None:
    copy = instant_repository(model_repository, tmp_path / "repository")
    path = contract.latest_version(copy / contract.GENERATOR)
    original = contract.latest_version(model_repository / contract.GENERATOR)
    assert path is not None and original is not None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map == (
        ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
        .get_modelmeta()
        .custom_metadata_map
    )
    rng = np.random.default_rng(0)
    feeds = {
        i.name: rng.integers(0, 256, (2, *i.shape[1:]), np.uint8)
        for i in session.get_inputs()
        if "int" in i.type
    }
    feeds.update(
        {i.name: np.zeros((2, *i.shape[1:]), np.float32) for i in session.get_inputs() if "float" in i.type}
    )
    (image,) = session.run([contract.IMAGE], feeds)
    assert np.array_equal(image, feeds[contract.WARPED])
    assert path.stat().st_size < 10_000  # no weights: nothing to compute


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--closed-loop-frames", "0"], "--closed-loop-frames: must be at least 1, got 0"),
        (["--fps", "0"], "--fps: must be above 0, got 0"),
        (["--seconds", "nan"], "--seconds: must be at least 0, got nan"),
        (["--streams", "4", "-1"], "--streams: must be at least 1, got -1"),
        (["--offline-window", "0"], "--offline-window: must be at least 1, got 0"),
        (["--rounds", "two"], "--rounds: expected an integer, got 'two'"),
        (
            ["--triton-venv", "/nonexistent"],
            "--triton-venv: no bundled Triton in /nonexistent (make triton-venv",
        ),
    ],
)
def test_bench_refuses_figures_it_cannot_run_with_and_says_which(
    flags: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    """`talkinghead bench --closed-loop-frames 0` ran every raw window first and then died of a
    division by zero in the closed loop (a --triton-venv without Triton, of a traceback at the
    Triton rows); a bad figure is now refused before anything runs."""
    parser = argparse.ArgumentParser(prog="talkinghead bench")
    bench.add_arguments(parser)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(flags)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
