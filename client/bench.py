"""Benchmark: the raw generator by batch size, then the real service with 1, 4, 16 and 64 live streams.

1. raw: the served generator (model_repository/generator) run in this process on the engine the
   service's in-process backend picks (facekit/engines.py; the service's code path minus gRPC,
   queues and encoding), batch 1, 2, 4, 8, 16: latency, frames per second, GFLOP/s and the share
   of the CPU's fp32 peak; then the same table for every engine this machine has.
2. closed loop: one stream, next frame sent when the previous reply arrives: the latency the
   service adds to a lone call over raw batch-1 inference.
3. live: `talkinghead serve` in a subprocess; N = 1, 4, 16, 64 streams each sending landmarks at 25 fps
   (DROP_OLDEST, the live policy) for --seconds: achieved fps, end-to-end latency percentiles
   (send -> reply, client clock), drops, mean batch size, and the server's per-stage times. The
   service's fps is compared with the raw generator's fps at the same (mean) batch size, timed
   in a window before the row and one after it (the mean of the two: the host drifts). One
   offline (BLOCK) stream (--offline-streams) sends alongside, keeping 64 frames in flight
   (--offline-window): what admission leaves to offline work; live + offline fps is compared with
   the raw generator's. The server marks every frame, as in production.

4. serving ceiling: the same server with an instant generator (its input is its face) and
   4 offline streams: the frames/s the service's own work allows and the CPU it spends per frame
   (server, its event loop, this client), hence the most of raw the service can deliver here.
   With --triton-venv (`make bench` passes .venv-triton) the same again through the triton
   backend and a real Triton serving the instant repository: the service's CPU per frame when
   inference runs elsewhere, as in production, and Triton's own.

   Then (with --triton-venv) the model itself through that path: Triton serving the model
   repository (python profile, the engine its runner picks) and the service on the triton
   backend: raw Triton calls at batch 1, the server's capacity and the live rows of section 3
   against raw Triton windows.

5. beside a personalisation: one live stream through a server with its embedded worker (the
   single-machine set-up `talkinghead serve` runs by default), --seconds alone, then --seconds
   while the worker fine-tunes the avatar (--personalisation-steps; 0 skips it): the stream's
   latency and drops, and the fine-tuning steps the job made meanwhile.

6. with --baseline REPOSITORY: the model against a previous one, in alternating rounds, raw and
   through the service (one stream, closed loop): per-frame latency and the ratio.

examples:
  talkinghead bench                                  # -> out/bench.json (there already: add --overwrite)
  talkinghead bench --baseline out/baseline_repository --streams 1   # paired against the previous model
  talkinghead bench --seconds 20 --streams 1 4 16 --out out/bench.json
  talkinghead bench --device cuda                    # PyTorch on the GPU -> out/bench-cuda.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from api.talkinghead.v1 import animation_pb2 as pb
from api.talkinghead.v1 import animation_pb2_grpc, avatar_pb2
from client import cpuclock
from client.library import Client, consent_record, demo_portrait_consent, to_landmarks
from client.outputs import PendingFile
from facekit import contract, cpus, engines, procstat
from facekit.contract import ModelInfo
from facekit.cpus import usable_cpus
from facekit.rasterize import draw_batch
from facekit.sequence import LandmarkSequence

ASSETS = Path(__file__).resolve().parents[1] / "facekit/assets"
STAGES = ("rasterize", "queue", "inference", "encode", "total")
AVATAR = "bench"
OFFLINE_WINDOW = 64  # frames an offline (BLOCK) bench stream keeps in flight: a renderer pipelines deeply


def _at_least(low: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` no smaller than `low` (a clear error, not a crash or a
    division by zero mid-run)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not value >= low:  # (NaN fails too)
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
        return value

    return parse


def _above_zero(text: str) -> float:
    value = _at_least(0.0, float)(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return float(value)


def _triton_venv(text: str) -> Path:
    """An argparse type: a venv with the bundled Triton in it (a missing one cost a traceback after
    every other figure had been timed)."""
    from deploy.local import tritonserver

    try:
        tritonserver.server_root(Path(text))
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(
            f"no bundled Triton in {text} (make triton-venv makes .venv-triton)"
        ) from None
    return Path(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-repository", type=Path, default=Path("model_repository"), help="default %(default)s"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/bench.json"), help="JSON figures (default %(default)s)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out (with --device: its -<device>.json) when it exists",
    )
    parser.add_argument(
        "--batches",
        type=_at_least(1),
        nargs="+",
        default=[1, 2, 4, 8, 16],
        help="raw batch sizes (default 1 2 4 8 16)",
    )
    parser.add_argument(
        "--streams",
        type=_at_least(1),
        nargs="+",
        default=[1, 4, 16, 64],
        help="live streams offered (default 1 4 16 64)",
    )
    parser.add_argument("--fps", type=_above_zero, default=25.0, help="frames per second each stream sends")
    parser.add_argument("--seconds", type=_above_zero, default=10.0, help="duration of each live run")
    parser.add_argument(
        "--offline-streams",
        type=_at_least(0),
        default=1,
        help="BLOCK streams sending alongside each live run, using the capacity live streams leave",
    )
    parser.add_argument(
        "--offline-window",
        type=_at_least(1),
        default=OFFLINE_WINDOW,
        help="frames each offline stream keeps in flight (its throughput is at most window / latency)",
    )
    parser.add_argument("--raw-seconds", type=_above_zero, default=3.0, help="time per raw batch size")
    parser.add_argument(
        "--lanes",
        type=_at_least(0),
        default=0,
        help="generator calls side by side, raw and in the server (default 0: the service's auto)",
    )
    parser.add_argument(
        "--closed-loop-frames",
        type=_at_least(1),
        default=60,
        help="frames of the lock-step stream (default 60)",
    )
    parser.add_argument(
        "--personalisation-steps",
        type=_at_least(0),
        default=100,
        help="the job a live stream runs beside in section 5 (0: skip it)",
    )
    parser.add_argument(
        "--triton-venv",
        type=_triton_venv,
        metavar="VENV",
        help="also measure the serving ceiling through the triton backend and the Triton bundled in "
        "this venv (make triton-venv: .venv-triton)",
    )
    parser.add_argument(
        "--portrait", type=Path, default=ASSETS / "demo_portrait.png", help="the avatar's photo"
    )
    parser.add_argument(
        "--driver", type=Path, default=ASSETS / "demo_driver.npz", help="the streams' landmarks"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="REPOSITORY",
        help="also measure this (previous) model repository, interleaved with --model-repository: "
        "raw batch-1 latency and the closed-loop per-frame latency through the service",
    )
    parser.add_argument(
        "--rounds", type=_at_least(1), default=2, help="A/B rounds of the --baseline comparison"
    )
    parser.add_argument(
        "--engine",
        default="auto",
        choices=("auto", *engines.ENGINES),
        help="the generator's engine: raw, served rows, paired run (default auto, as the service picks)",
    )
    parser.add_argument(
        "--baseline-engine",
        default=engines.ONNXRUNTIME,
        choices=("auto", *engines.ENGINES),
        help="the baseline's engine in the paired run (default onnxruntime: the service before engines)",
    )
    group = parser.add_argument_group("PyTorch generator on a device instead (export/speed.py)")
    group.add_argument("--device", choices=("cuda", "cpu"), help="time the PyTorch generator on this device")
    group.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("models/talkinghead-small.pt"),
        help="the shipped model (default %(default)s)",
    )
    group.add_argument("--configs", nargs="+", default=["paper"], help="configs timed with random weights")
    group.add_argument(
        "--precisions",
        nargs="+",
        choices=("bf16", "fp16", "fp32"),
        help="default bf16 fp16 (cuda), fp32 (cpu)",
    )
    group.add_argument(
        "--device-batches", type=_at_least(1), nargs="+", help="default 1 2 4 ... 256 (cuda), 1 2 4 (cpu)"
    )
    group.add_argument("--iters", type=_at_least(1), default=20, help="timed calls per batch size")
    group.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the generator (compiled anew for each batch size)",
    )
    group.add_argument(
        "--peak-tflops", type=_above_zero, help="the device's peak (default: known GPUs' dense bf16)"
    )


def portrait_consent(portrait: Path) -> avatar_pb2.ConsentRecord:
    """The bench's avatar: the demo asset's record, or one naming the operator's --portrait file."""
    if portrait.resolve() == (ASSETS / "demo_portrait.png").resolve():
        return demo_portrait_consent()
    return consent_record(
        subject=f"benchmark photo {portrait.name}",
        basis="licensed",
        source=f"supplied to `talkinghead bench --portrait` by the operator: {portrait}",
        collected_by="talkinghead bench",
    )


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    p = np.percentile(np.asarray(values) * 1e3, [50, 95, 99])
    return {"p50": round(float(p[0]), 2), "p95": round(float(p[1]), 2), "p99": round(float(p[2]), 2)}


# -- 1. the raw generator -----------------------------------------------------------------------
class RawGenerator:
    """The repository's latest generator on the engine the service's in-process backend would run
    it on (facekit/engines.py; `auto`: the fastest allowed, timed the same way), or on `engine`.
    Calls run in a worker thread."""

    def __init__(self, *, repository: Path, engine: str = "auto", threads: int = 0, lanes: int = 0) -> None:
        path = contract.latest_version(repository / contract.GENERATOR)
        if path is None:
            raise SystemExit(f"no models in {repository}: run `make model-repository`")
        self.repository, self.path = repository, path
        self.threads = threads or usable_cores()  # as the service: the CPUs this process may use
        self.lanes = engines.resolve_lanes(self.threads, lanes)  # 0: as the service's auto
        chosen = engines.pick(path, engine, threads=self.threads, lanes=self.lanes)
        self.engine, self.info, self.timings = chosen.engine, chosen.info, chosen.timings
        self.opened = chosen.opened  # every engine the choice opened (this one among them)
        self.choice = chosen.describe()
        self.metadata = self.engine.metadata
        self.elapsed = 0.0  # of the last `saturate`
        self.cpu_seconds = 0.0  # this process's CPU during the last `saturate` (the engine's, mostly)

    def on(self, name: str) -> RawGenerator:
        """The same generator on engine `name`: the one the choice opened and warmed where it
        did (compiling an OpenVINO model again takes seconds), else opened now."""
        engine = self.opened.get(name)
        if engine is None:
            return RawGenerator(
                repository=self.repository, engine=name, threads=self.threads, lanes=self.lanes
            )
        other = copy.copy(self)
        other.engine, other.metadata, other.timings = engine, engine.metadata, []
        other.choice = "opened for the choice"
        return other

    def inputs(self, driver: LandmarkSequence, batch: int) -> dict[str, np.ndarray]:
        """The generator's feeds for `batch` drawn driver frames (B, S, S, 3) uint8, zero AdaIN
        parameters (B, D) and, for a warp-guided model, the drawings again as its warped input.
        The cost does not depend on the values because every engine flushes denormal floats
        (facekit/engines.py DENORMALS): before it did, these feeds made none and a real portrait's
        many, so raw ran up to 3x faster than the service could on real faces."""
        info = self.info
        drawn = draw_batch(driver.rescaled(info.image_size).points[:batch], info.image_size, info.draw_style)
        images = np.ascontiguousarray(np.resize(drawn, (batch, *drawn.shape[1:])))
        feeds = {
            contract.LANDMARK_IMAGE: images,
            contract.ADAIN: np.zeros((batch, info.adain_size), np.float32),
        }
        if info.warp_guided:
            feeds[contract.WARPED] = images.copy()
        return feeds

    async def generate(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        (image,) = await asyncio.to_thread(self.engine.run, feeds, [contract.IMAGE])
        return image

    async def saturate(self, feeds: dict[str, np.ndarray], seconds: float, min_calls: int = 3) -> list[float]:
        """Calls back to back for `seconds` (at least `min_calls` from each caller), as many in
        flight as the service's batcher keeps (engines.in_flight: one per lane and two waiting):
        the engine's throughput as the server gets it. Each call's seconds, queueing included."""
        times: list[float] = []
        started, cpu = time.perf_counter(), time.process_time()

        async def lane() -> None:
            calls = 0
            while time.perf_counter() - started < seconds or calls < min_calls:
                t0 = time.perf_counter()
                await self.generate(feeds)
                times.append(time.perf_counter() - t0)
                calls += 1

        await asyncio.gather(*(lane() for _ in range(engines.in_flight(self.lanes))))
        self.elapsed = time.perf_counter() - started
        self.cpu_seconds = time.process_time() - cpu
        return times


async def raw_generator(
    raw: RawGenerator, driver: LandmarkSequence, batches: list[int], seconds: float
) -> list[dict]:
    rows: list[dict[str, Any]] = []
    for batch in batches:
        feeds = raw.inputs(driver, batch)
        await raw.saturate(feeds, 0.0, 1)  # warm-up
        times = await raw.saturate(feeds, seconds)
        row: dict[str, Any] = {
            "batch": batch,
            "lanes": raw.lanes,
            "in_flight": engines.in_flight(raw.lanes),
            "runs": len(times),
            "latency_ms": percentiles(times),  # of one call among in_flight, its wait for a lane included
            "fps": round(batch * len(times) / raw.elapsed, 2),
        }
        rows.append(row)
        print(f"raw batch {batch:>2}: {row['latency_ms']['p50']:8.1f} ms p50, {row['fps']:6.1f} fps")
    return rows


async def engine_table(
    args: argparse.Namespace, driver: LandmarkSequence, chosen: RawGenerator, peak: dict[str, Any]
) -> dict[str, Any]:
    """Every engine this machine runs, at every batch size: frames/s and the share of the CPU's
    peak for the engine's arithmetic (fp32, or bf16 on AMX); `allowed` says whether the service
    may pick it (lossy ones need a passed verdict)."""
    allowed = engines.candidates(chosen.path, chosen.info.model_id)
    gflops = _gflops(chosen.metadata)
    table: dict[str, Any] = {}
    for name in engines.available():
        raw = chosen.on(name)
        reused = raw.engine is chosen.opened.get(name)
        print(f"engine {name}{' (as opened and timed for the choice)' if reused else ''}:")
        rows = await raw_generator(raw, driver, args.batches, args.raw_seconds)
        table[name] = {
            "allowed": name in allowed,
            "opened_for_the_choice": reused,
            "gflops_per_frame": gflops,
            "rows": with_peak_share(rows, chosen.metadata, peak, name),
        }
    return table


def _gflops(metadata: dict[str, str]) -> float | None:
    value = metadata.get(contract.Meta.GFLOPS)
    return float(value) if value else None


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity and its cgroup's CPU quota (facekit/cpus.py)."""
    return usable_cpus()


def cpu_peak(cpuinfo: str | None = None) -> dict[str, Any]:
    """This machine's SIMD peaks: cores x clock x FLOPs per cycle. The clock is measured under
    load on every core (client/cpuclock.py; `cpuinfo_ghz`, the nominal one a VM reports, beside
    it). fp32: two FMA units, 64 FLOPs per cycle with AVX-512 (32 on AMD Zen 4, whose AVX-512 runs
    on 256-bit units), 32 with AVX2+FMA, else 8. bf16, the peak a bf16 engine's share is taken of
    (`with_peak_share`): with AMX its tile unit's 1024 FLOPs per cycle per core (512
    multiply-adds; Intel's figure for Sapphire Rapids), ~16x the fp32 one; with AVX-512 BF16 only,
    twice the fp32 one (a dot product of bf16 pairs per fp32 lane)."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    text = cpuinfo
    flags = set(re.findall(r"^flags\s*:\s*(.*)$", text, re.M)[0].split()) if "flags" in text else set()
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)]
    family = re.search(r"^cpu family\s*:\s*(\d+)", text, re.M)
    zen4 = "AuthenticAMD" in text and family is not None and int(family.group(1)) == ZEN4_FAMILY
    per_cycle = (32 if zen4 else 64) if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    cores = usable_cores()
    nominal = round(max(mhz) / 1e3, 3) if mhz else None
    measured = cpuclock.measured_ghz(cores)
    ghz = measured or nominal
    amx = "amx_bf16" in flags
    bf16_per_cycle = AMX_BF16_FLOPS_PER_CYCLE if amx else 2 * per_cycle if "avx512_bf16" in flags else None
    return {
        "cores": cores,
        "ghz": ghz,
        "ghz_measured": measured is not None,
        "cpuinfo_ghz": nominal,
        "fp32_flops_per_cycle": per_cycle,
        "fp32_gflops": round(cores * ghz * per_cycle, 1) if ghz else None,
        "amx": amx,
        "bf16": "AMX" if amx else "AVX-512 BF16" if bf16_per_cycle else None,
        "bf16_gflops": round(cores * ghz * bf16_per_cycle, 1) if ghz and bf16_per_cycle else None,
    }


def peak_summary(peak: dict[str, Any]) -> str:
    """'CPU: 2 cores at 3.67 GHz (measured under load; /proc/cpuinfo says 2.60): fp32 peak ...'."""
    if not peak["ghz"]:
        return "CPU: clock unknown, no peak"
    clock = "measured under load" if peak["ghz_measured"] else "/proc/cpuinfo's, not measured"
    if peak["ghz_measured"] and peak["cpuinfo_ghz"]:
        clock += f"; /proc/cpuinfo says {peak['cpuinfo_ghz']:.2f}"
    bf16 = f", bf16 ({peak['bf16']}) {peak['bf16_gflops']:.0f}" if peak["bf16_gflops"] else ""
    return (
        f"CPU: {peak['cores']} cores at {peak['ghz']:.2f} GHz ({clock}): peak fp32 "
        f"{peak['fp32_gflops']:.0f} GFLOP/s{bf16}"
    )


ZEN4_FAMILY = 25  # AMD family 19h: Zen 3 (no AVX-512) and Zen 4 (AVX-512 on 256-bit units)
AMX_BF16_FLOPS_PER_CYCLE = 1024


def with_peak_share(
    rows: list[dict], metadata: dict[str, str], peak: dict[str, Any], engine: str
) -> list[dict]:
    """Each row's GFLOP/s and its share of the peak of the engine's arithmetic (`peak_share`, of
    `peak`): bf16 (AMX, or AVX-512 BF16) for openvino-bf16 where the CPU has it, fp32 otherwise.
    `fp32_peak_share` stays for comparison with earlier reports; for a bf16 engine it may exceed 1
    (before, the only share reported: 1.30 at 111 frames/s, a share of a peak the engine does not
    compute at)."""
    gflops = _gflops(metadata)
    bf16 = engine == engines.OPENVINO_BF16 and peak.get("bf16_gflops")
    for row in rows:
        if gflops and peak.get("fp32_gflops"):
            row["gflops_per_s"] = round(row["fps"] * gflops, 1)
            row["fp32_peak_share"] = round(row["fps"] * gflops / peak["fp32_gflops"], 3)
            row["peak"] = f"bf16 ({peak['bf16']})" if bf16 else "fp32"
            row["peak_share"] = round(row["fps"] * gflops / peak["bf16_gflops" if bf16 else "fp32_gflops"], 3)
    return rows


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


async def raw_window(raw: RawGenerator, driver: LandmarkSequence, batch: int, seconds: float) -> float:
    """Raw fps at `batch`, every lane busy, over `seconds` (beside a live run: the same machine load)."""
    feeds = raw.inputs(driver, batch)
    times = await raw.saturate(feeds, seconds)
    return batch * len(times) / raw.elapsed


class RawTriton(RawGenerator):
    """The repository's generator as Triton serves it: the raw calls of the triton backend (gRPC,
    batch of `inputs`, one call per instance in flight and two waiting, as RawGenerator keeps its
    lanes busy), timed from here. `cpu_seconds` of the last `saturate` is Triton's (its process
    group: the server and its python-backend stubs), not this process's."""

    def __init__(self, *, repository: Path, url: str, pgid: int) -> None:  # (not RawGenerator's)
        path = contract.latest_version(repository / contract.GENERATOR)
        if path is None:
            raise SystemExit(f"no models in {repository}: run `make model-repository`")
        self.repository, self.path, self.url, self.pgid = repository, path, url, pgid
        self.info = ModelInfo.from_metadata(
            ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map, where=str(path)
        )
        self.lanes = 1  # connect() reads Triton's config
        self.elapsed = self.cpu_seconds = 0.0
        self._client: Any = None

    async def connect(self) -> None:
        """The client (made in the running loop, which it is bound to) and the generator's
        instances from the config Triton completed and runs, as the service's backend reads them."""
        import tritonclient.grpc.aio as triton

        self._client = triton.InferenceServerClient(self.url)
        answer = await self._client.get_model_config(contract.GENERATOR, as_json=True)
        self.lanes, _ = contract.instances(answer["config"])

    async def generate(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        import tritonclient.grpc.aio as triton

        if self._client is None:  # lanes would be a guess: saturate keeps them busy before a call
            raise RuntimeError("RawTriton.connect() first")
        inputs = []
        for name, value in feeds.items():
            inputs.append(
                triton.InferInput(name, list(value.shape), "UINT8" if value.dtype == np.uint8 else "FP32")
            )
            inputs[-1].set_data_from_numpy(value)
        result = await self._client.infer(contract.GENERATOR, inputs)
        return np.asarray(result.as_numpy(contract.IMAGE))

    async def saturate(self, feeds: dict[str, np.ndarray], seconds: float, min_calls: int = 3) -> list[float]:
        before = procstat.group_cpu_seconds(self.pgid) or 0.0
        times = await super().saturate(feeds, seconds, min_calls)
        self.cpu_seconds = (procstat.group_cpu_seconds(self.pgid) or 0.0) - before
        return times

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


# -- the server -------------------------------------------------------------------------------
def start_server(
    repository: Path,
    store: Path,
    max_batch: int,
    *,
    engine: str = "auto",
    lanes: int = 0,
    triton_url: str | None = None,
    jobs: Path | None = None,
) -> tuple[subprocess.Popen[str], str, str]:
    """`talkinghead serve` on free ports: in-process inference, or with `triton_url` the triton
    backend at that address; with `jobs` its embedded personalisation worker on that job
    directory, else none. The process, its gRPC address and its /metrics URL."""
    backend = {"TALKINGHEAD_BACKEND": "triton", "TALKINGHEAD_TRITON_URL": triton_url} if triton_url else {}
    env = dict(
        os.environ,
        TALKINGHEAD_MODEL_REPOSITORY=str(repository),
        TALKINGHEAD_AVATAR_STORE=str(store),
        TALKINGHEAD_GRPC_PORT="0",
        TALKINGHEAD_METRICS_PORT="0",
        TALKINGHEAD_MAX_BATCH=str(max_batch),
        TALKINGHEAD_ENGINE=engine,
        TALKINGHEAD_ENGINE_LANES=str(lanes),
        TALKINGHEAD_MAX_STREAMS="64",
        # no personalisation worker competing for the cores, unless that is what is measured
        TALKINGHEAD_WORKER="embedded" if jobs else "external",
        # (its job directory and audit log in `store`, as the chart has them: the defaults were
        # var/jobs and var/audit.jsonl under the bench's working directory)
        TALKINGHEAD_JOBS=str(jobs or store / ".jobs"),
        TALKINGHEAD_AUDIT_LOG=str(store / "audit.jsonl"),
        # every frame marked, as in production (a key of the caller's, else one for this run)
        TALKINGHEAD_WATERMARK_KEY=os.environ.get("TALKINGHEAD_WATERMARK_KEY") or secrets.token_hex(16),
        **backend,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "talkinghead.cli", "serve"], env=env, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    address = metrics = ""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        found = re.search(r"serving gRPC on (\S+):(\d+).*metrics on http://\S+:(\d+)/metrics", line)
        if found:
            address = f"127.0.0.1:{found.group(2)}"
            metrics = f"http://127.0.0.1:{found.group(3)}/metrics"
        if "is ready" in line and address:
            return process, address, metrics
    process.kill()
    raise SystemExit("the server did not start")


@dataclass(frozen=True)
class BenchServer:
    process: subprocess.Popen[str]
    stub: animation_pb2_grpc.AnimationServiceStub
    metrics_url: str
    address: str
    capacity_fps: float  # measured by the server at start (its admission's), before the bench ran anything

    def cpu_seconds(self) -> dict[str, float]:
        """The server's talkinghead_cpu_seconds_total by threads (service, engine); {} off Linux."""
        return cpu_by_threads(metrics_page(self.metrics_url))

    def capacity_now(self) -> float:
        """The live capacity the server's admission holds now (its talkinghead_capacity_fps)."""
        return capacity_of(metrics_page(self.metrics_url))


def metrics_page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def capacity_of(metrics_text: str) -> float:
    """talkinghead_capacity_fps from a /metrics page (0 before the server's first calibration)."""
    found = re.search(r"^talkinghead_capacity_fps (\S+)$", metrics_text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def cpu_by_threads(metrics_text: str) -> dict[str, float]:
    """talkinghead_cpu_seconds_total by its `threads` label, from a /metrics page."""
    pattern = r'^talkinghead_cpu_seconds_total\{threads="(\w+)"\} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, metrics_text, re.MULTILINE)}


async def calibrated(metrics_url: str, timeout: float = 60.0) -> float:
    """Wait for the server's first measured capacity (App._calibrate publishes it once its timed
    calls are done): the bench's own calls and windows must not run beside those, or both are
    wrong (with --closed-loop-frames 8 the first row's raw window ran beside it: 51 fps against 70
    after the row, and 1 live stream admitted of 16 where 2 fit). The bench's avatar is made after
    it too: made beside it, the capacity read 48-53 fps against 71-72. Returns it; 0 when none came
    within `timeout` (the server logs why)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        capacity = capacity_of(metrics_page(metrics_url))
        if capacity > 0:
            return capacity
        await asyncio.sleep(0.1)
    print(f"the server published no capacity within {timeout:g} s: measuring anyway")
    return 0.0


@contextlib.asynccontextmanager
async def bench_server(
    args: argparse.Namespace,
    repository: Path,
    max_batch: int,
    *,
    engine: str = "auto",
    triton_url: str | None = None,
    jobs: Path | None = None,
) -> AsyncIterator[BenchServer]:
    """`talkinghead serve` on `repository` with the bench's avatar made (start_server)."""
    with tempfile.TemporaryDirectory(prefix="bench-avatars-") as store:
        process, address, metrics = start_server(
            repository,
            Path(store),
            max_batch,
            engine=engine,
            lanes=args.lanes,
            triton_url=triton_url,
            jobs=jobs,
        )
        try:
            capacity = await calibrated(metrics)
            with Client(target=address) as client:
                client.create_avatar(
                    AVATAR, [args.portrait], consent=portrait_consent(args.portrait), replace=True
                )
            async with grpc.aio.insecure_channel(address) as channel:
                stub = animation_pb2_grpc.AnimationServiceStub(channel)
                yield BenchServer(process, stub, metrics, address, capacity)
        finally:
            process.terminate()
            process.wait(30)


# -- 2./3. streams ----------------------------------------------------------------------------
@dataclass(kw_only=True)
class StreamLog:
    """What one stream sent and got back."""

    sent: dict[int, float] = field(default_factory=dict)  # sequence -> perf_counter when sent
    latencies: list[float] = field(default_factory=list)  # send -> reply, seconds
    raw_times: list[float] = field(default_factory=list)  # the paired raw calls (closed loop)
    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})  # ms
    batches: list[int] = field(default_factory=list)
    dropped: int = 0
    received_at: list[float] = field(default_factory=list)  # perf_counter of each reply

    def record(self, frame: pb.AnimatedFrame) -> None:
        now = time.perf_counter()
        self.received_at.append(now)
        self.latencies.append(now - self.sent[frame.sequence])
        self.dropped += frame.dropped_before
        self.batches.append(frame.batch_size)
        t = frame.timings
        for name, us in zip(
            STAGES, (t.rasterize_us, t.queue_us, t.inference_us, t.encode_us, t.total_us), strict=True
        ):
            self.stages[name].append(us / 1e3)

    def result(self, elapsed: float) -> dict[str, Any]:
        return {
            "received": len(self.latencies),
            "sent": len(self.sent),
            "dropped": self.dropped,
            "latencies": self.latencies,
            "received_at": self.received_at,
            "raw_times": self.raw_times,
            "batches": self.batches,
            "stages": self.stages,
            "elapsed": elapsed,
        }


async def paced(fps: float, seconds: float) -> AsyncIterator[int]:
    """Frame indices at `fps` for `seconds` (a live sender)."""
    t0 = time.perf_counter()
    index = 0
    while index / fps < seconds:
        await asyncio.sleep(max(0.0, t0 + index / fps - time.perf_counter()))
        yield index
        index += 1


async def lockstep(
    frames: int, reply: asyncio.Event, log: StreamLog, between: Callable[[], Awaitable[Any]] | None
) -> AsyncIterator[int]:
    """Frame indices, each once the previous reply is in; `between` runs (timed) before each."""
    for index in range(frames):
        if index:
            await reply.wait()
            reply.clear()
        if between is not None:
            t_raw = time.perf_counter()
            await between()
            log.raw_times.append(time.perf_counter() - t_raw)
        yield index


async def windowed(seconds: float, window: int, log: StreamLog, reply: asyncio.Event) -> AsyncIterator[int]:
    """Frame indices for `seconds`, at most `window` awaiting their replies (an offline sender
    that keeps the server busy: BLOCK streams drop nothing, so in flight = sent - received)."""
    t0 = time.perf_counter()
    index = 0
    while time.perf_counter() - t0 < seconds:
        while index - len(log.latencies) >= window:
            await reply.wait()
            reply.clear()
        yield index
        index += 1


async def run_stream(
    stub: animation_pb2_grpc.AnimationServiceStub,
    avatar: str,
    points: np.ndarray,
    size: tuple[int, int],
    *,
    fps: float = 0.0,
    seconds: float = 0.0,
    closed_loop_frames: int = 0,
    between: Callable[[], Awaitable[Any]] | None = None,
    offline_window: int = 0,
) -> dict[str, Any]:
    """One stream: paced at `fps` for `seconds` (live), closed loop for `closed_loop_frames`
    (next frame when the previous reply is in; `between` runs before each, timed: a paired raw
    call), or offline (BLOCK) for `seconds` with `offline_window` frames in flight."""
    log = StreamLog()
    reply = asyncio.Event()
    ticks: AsyncIterator[int]
    if offline_window:
        ticks = windowed(seconds, offline_window, log, reply)
        config = pb.StreamConfig(avatar_id=avatar, overflow=pb.OVERFLOW_POLICY_BLOCK)
    else:
        ticks = (
            lockstep(closed_loop_frames, reply, log, between) if closed_loop_frames else paced(fps, seconds)
        )
        config = pb.StreamConfig(avatar_id=avatar, overflow=pb.OVERFLOW_POLICY_DROP_OLDEST, expected_fps=fps)
    messages = [to_landmarks(p) for p in points]

    call = stub.Animate()
    started = time.perf_counter()

    async def send() -> None:
        async for index in ticks:
            log.sent[index] = time.perf_counter()
            frame = pb.LandmarkFrame(
                sequence=index,
                landmarks=messages[index % len(messages)],
                frame_width=size[0],
                frame_height=size[1],
            )
            await call.write(pb.AnimateRequest(landmarks=frame))
        await call.done_writing()

    sender: asyncio.Task[None] | None = None
    try:
        await call.write(pb.AnimateRequest(config=config))
        async for response in call:
            if response.HasField("started"):  # admitted: frames go only now, so a refusal stays clean
                sender = asyncio.create_task(send())
            elif response.HasField("frame"):
                log.record(response.frame)
                reply.set()
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or log.latencies:
            raise
        return {**log.result(time.perf_counter() - started), "refused": True}  # admission control
    finally:
        if sender is not None and not sender.done():
            sender.cancel()
    return log.result(time.perf_counter() - started)


def offline_streams(
    stub: animation_pb2_grpc.AnimationServiceStub,
    driver: LandmarkSequence,
    count: int,
    seconds: float,
    window: int,
) -> list[Awaitable[dict[str, Any]]]:
    """`count` offline (BLOCK) streams of the driver, each from another frame, `window` in flight."""
    return [
        run_stream(
            stub,
            AVATAR,
            np.roll(driver.points, 3 * i, axis=0),
            driver.frame_size,
            seconds=seconds,
            offline_window=window,
        )
        for i in range(count)
    ]


def merge(offered: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [r for r in offered if not r.get("refused")] or offered[:1]
    received = sum(r["received"] for r in runs)
    batches = [x for r in runs for x in r["batches"]]
    stage_ms = {s: float(np.mean([x for r in runs for x in r["stages"][s]] or [0])) for s in STAGES}
    mean_batch = float(np.mean(batches)) if batches else 0.0
    achieved = received / max(r["elapsed"] for r in runs)
    # Raw fps at the service's own batch sizes, in the same minutes: mean batch / mean generator call.
    in_situ = mean_batch / (stage_ms["inference"] / 1e3) if stage_ms["inference"] else float("nan")
    return {
        "admitted": len(offered) - sum(1 for r in offered if r.get("refused")),
        "refused": sum(1 for r in offered if r.get("refused")),
        "sent": sum(r["sent"] for r in runs),
        "received": received,
        "dropped": sum(r["dropped"] for r in runs),
        "achieved_fps": round(achieved, 2),
        "latency_ms": percentiles([x for r in runs for x in r["latencies"]]),
        "mean_batch": round(mean_batch, 2),
        "server_stage_ms_mean": {k: round(v, 2) for k, v in stage_ms.items()},
        "generator_fps_at_these_batches": round(in_situ, 2),
        "generator_utilisation": round(achieved / in_situ, 3) if in_situ == in_situ else None,
    }


async def closed_loop(
    stub: animation_pb2_grpc.AnimationServiceStub, driver: LandmarkSequence, raw: RawGenerator, frames: int
) -> dict[str, Any]:
    """One stream in lock step, each frame paired with a raw batch-1 call: the latency the service adds."""
    feeds = raw.inputs(driver, 1)
    closed = await run_stream(
        stub,
        AVATAR,
        driver.points,
        driver.frame_size,
        closed_loop_frames=frames,
        between=lambda: raw.generate(feeds),
    )
    one = merge([closed])
    raw1 = percentiles(closed["raw_times"])
    one["raw_batch1_latency_ms_paired"] = raw1
    one["added_latency_ms_p50"] = round(one["latency_ms"]["p50"] - raw1["p50"], 2)
    one["added_latency_ms_server_side_mean"] = round(
        one["server_stage_ms_mean"]["total"] - one["server_stage_ms_mean"]["inference"], 2
    )
    print(
        f"closed loop, 1 stream: {one['latency_ms']['p50']:.1f} ms p50 vs raw batch 1 "
        f"{raw1['p50']:.1f} ms (paired): added {one['added_latency_ms_p50']:.1f} ms "
        f"(server-side, excluding inference: {one['added_latency_ms_server_side_mean']:.2f} ms)"
    )
    return one


async def live(
    server: BenchServer,
    driver: LandmarkSequence,
    raw: RawGenerator,
    args: argparse.Namespace,
    streams: int,
    expect_batch: int = 1,
    remote_pgid: int | None = None,
) -> dict[str, Any]:
    """`streams` live streams at once (and --offline-streams BLOCK streams using what the live
    ones leave), bracketed by the raw generator: a window before the row (at `expect_batch`, the
    previous row's batch) and one after it at the live streams' mean batch size. The row is compared
    with the mean of the windows at its batch: on a shared host the raw rate drifts by 20 % within
    minutes, and one window after the row made the ratio as noisy as the drift.

    Where the machine went (`cpu`): the server's CPU split into the service's own work and the
    engine's (service/metrics.py ThreadCpu), the bench client's, against the
    raw windows' CPU per frame: the service and the client take `share_left` of the cores from the
    generator, and the generator may need more CPU per frame beside them than alone.

    Throughput and CPU are counted over the window in which every stream sends (--seconds from
    the row's start): the frames received in it. With `remote_pgid` (a Triton's process group)
    the engine's CPU is that group's, and the whole server process's is the service's. Each
    stream's own rate counts its drain after
    the window too (an offline stream's 64 frames in flight, served with the live streams gone),
    so their sum overstated the row (`total_fps_own_windows`, what `total_fps` was before the
    twelfth session)."""
    stub = server.stub
    before = await raw_window(raw, driver, expect_batch, args.raw_seconds)
    raw_cpu = [raw.cpu_seconds / (before * raw.elapsed)]

    def cpu_now() -> dict[str, float]:
        cpu = server.cpu_seconds()
        if remote_pgid is None or not cpu:
            return cpu
        # inference in Triton: the server's own threads are all the service's
        return {"service": sum(cpu.values()), "engine": procstat.group_cpu_seconds(remote_pgid) or 0.0}

    server_cpu, client_cpu, started = cpu_now(), time.process_time(), time.perf_counter()
    window_end = started + args.seconds

    async def at_window_end() -> tuple[dict[str, float], float]:
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        return await asyncio.to_thread(cpu_now), time.process_time()

    clocks = asyncio.create_task(at_window_end())
    runs = await asyncio.gather(
        *(
            run_stream(
                stub,
                AVATAR,
                np.roll(driver.points, 7 * i, axis=0),
                driver.frame_size,
                fps=args.fps,
                seconds=args.seconds,
            )
            for i in range(streams)
        ),
        *offline_streams(stub, driver, args.offline_streams, args.seconds, args.offline_window),
    )
    server_end, client_end = await clocks
    client_cpu = client_end - client_cpu
    server_cpu = {k: v - server_cpu.get(k, 0.0) for k, v in server_end.items()}
    in_window = sum(started <= t <= window_end for r in runs for t in r["received_at"])
    live_runs, offline_runs = runs[:streams], runs[streams:]
    row: dict[str, Any] = {"streams": streams, "fps_per_stream": args.fps}
    row.update(merge(live_runs))
    # what admission holds once the row's calls taught the cost model: below streams x fps / 0.9,
    # the next row admits fewer live streams than it did
    row["capacity_fps_after"] = round(await asyncio.to_thread(server.capacity_now), 2)
    nearest = min(args.batches, key=lambda b: abs(b - row["mean_batch"]))
    after = await raw_window(raw, driver, nearest, args.raw_seconds)
    raw_cpu.append(raw.cpu_seconds / (after * raw.elapsed))
    windows = [after, before] if expect_batch == nearest else [after]
    raw_fps = float(np.mean(windows))
    row["raw_fps_before"] = {"batch": expect_batch, "fps": round(before, 2)}
    row["raw_fps_after"] = {"batch": nearest, "fps": round(after, 2)}
    row["raw_fps_reference"] = {"batch": nearest, "fps": round(raw_fps, 2), "windows": len(windows)}
    row["ratio_to_raw"] = round(row["achieved_fps"] / raw_fps, 3)
    row["ratio_to_raw_after"] = round(row["achieved_fps"] / after, 3)  # (the reference before 2026-12)
    total = row["achieved_fps"]
    if offline_runs:
        offline = merge(offline_runs)
        row["offline"] = {k: offline[k] for k in ("received", "achieved_fps", "latency_ms", "mean_batch")}
        row["offline"]["streams"] = len(offline_runs)
        row["total_fps_own_windows"] = round(total + offline["achieved_fps"], 2)
        total = in_window / args.seconds
        row["total_fps"] = round(total, 2)
        row["total_ratio_to_raw"] = round(total / raw_fps, 3)
        row["total_ratio_to_raw_after"] = round(total / after, 3)
    row["cpu"] = row_cpu(server_cpu, client_cpu, args.seconds, in_window, raw_cpu[-len(windows) :])
    print(
        f"{streams:>2} stream(s) x {args.fps:g} fps offered, {row['admitted']} admitted: "
        f"{row['achieved_fps']:6.1f} fps, "
        f"mean batch {row['mean_batch']:.1f}, generator busy "
        f"{row['generator_utilisation']:.0%}, raw batch {nearest} before/after: "
        f"{before:.1f}/{after:.1f} fps (ratio {row['ratio_to_raw']:.2f}); "
        f"latency p50/p95/p99 {row['latency_ms']['p50']:.0f}/{row['latency_ms']['p95']:.0f}/"
        f"{row['latency_ms']['p99']:.0f} ms; {row['dropped']} dropped; capacity after "
        f"{row['capacity_fps_after']:.1f} fps"
        + (
            f"; + {len(offline_runs)} offline: {row['offline']['achieved_fps']:.1f} fps, total "
            f"{total:.1f} fps (ratio {row['total_ratio_to_raw']:.2f})"
            if offline_runs
            else ""
        )
        + cpu_summary(row["cpu"])
    )
    return row


def cpu_summary(cpu: dict[str, float]) -> str:
    if not cpu:
        return ""
    return (
        f"; CPU: service {cpu['service_cores']:.2f} cores, client {cpu['client_cores']:.2f}, engine "
        f"{cpu['engine_cores']:.2f} ({cpu['engine_ms_per_frame']:.1f} ms per frame, raw "
        f"{cpu['raw_ms_per_frame']:.1f}); share left {cpu['share_left']:.2f}"
    )


def row_cpu(
    server: dict[str, float], client: float, elapsed: float, frames: int, raw_per_frame: list[float]
) -> dict[str, float]:
    """A row's CPU: the server's by threads (service/metrics.py ThreadCpu), the client's, in cores
    and per frame served; `share_left` = the cores' share neither took. Empty off Linux."""
    if not frames or "service" not in server or "engine" not in server:
        return {}
    cores = usable_cores()
    return {
        "service_cores": round(server["service"] / elapsed, 3),
        "engine_cores": round(server["engine"] / elapsed, 3),
        "client_cores": round(client / elapsed, 3),
        "service_ms_per_frame": round(1e3 * server["service"] / frames, 2),
        "engine_ms_per_frame": round(1e3 * server["engine"] / frames, 2),
        "raw_ms_per_frame": round(1e3 * float(np.mean(raw_per_frame)), 2),
        "share_left": round(1 - (server["service"] + client) / (cores * elapsed), 3),
    }


async def service_runs(
    args: argparse.Namespace, driver: LandmarkSequence, raw: RawGenerator
) -> dict[str, Any]:
    # The server runs the engine the raw figures were measured on: with "auto" it would time the
    # candidates again (seconds) and, between near-equal engines, could pick another.
    engine = raw.engine.name
    async with bench_server(args, args.model_repository, max(args.batches), engine=engine) as server:
        print(f"the server's live capacity, measured at its start: {server.capacity_fps:.1f} fps")
        one = await closed_loop(server.stub, driver, raw, args.closed_loop_frames)
        rows: list[dict[str, Any]] = []
        for streams in args.streams:
            expect = rows[-1]["raw_fps_after"]["batch"] if rows else min(args.batches)
            rows.append(await live(server, driver, raw, args, streams, expect))
    return {"capacity_fps_at_start": server.capacity_fps, "closed_loop_single_stream": one, "live": rows}


# -- 4. the serving ceiling ------------------------------------------------------------------
CEILING_STREAMS = 4  # BLOCK streams, OFFLINE_WINDOW frames in flight each: enough to keep the server busy


def instant_repository(source: Path, into: Path) -> Path:
    """A copy of the model repository whose generator returns its warped input (or, for a model
    without one, the landmark drawing) as the face: the same inputs, outputs and metadata (the
    service treats it as the model), no arithmetic. What the service can serve when the generator
    costs nothing, as on a GPU that outpaces the CPU."""
    import onnx
    from onnx import helper

    shutil.copytree(source, into, ignore=shutil.ignore_patterns("__pycache__"))
    path = contract.latest_version(into / contract.GENERATOR)
    if path is None:
        raise SystemExit(f"no models in {source}: run `make model-repository`")
    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    face = contract.WARPED if contract.WARPED in inputs else contract.LANDMARK_IMAGE
    graph = helper.make_graph(
        [helper.make_node("Identity", [face], [contract.IMAGE])],
        "instant_generator",
        list(model.graph.input),
        [o for o in model.graph.output if o.name == contract.IMAGE],
    )
    instant = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    for prop in model.metadata_props:
        instant.metadata_props.add(key=prop.key, value=prop.value)
    for stale in path.parent.glob(path.name + "*"):  # external weights, if any
        stale.unlink()
    onnx.save(instant, str(path))
    # On Triton, one instance taking batches, as a GPU serves, not the CPU profile's instances of
    # one frame a call (export/repository.py): the ceiling is the service's work per frame.
    config = into / contract.GENERATOR / "config.pbtxt"
    if config.exists():
        config.write_text(
            re.sub(r"instance_group \[ \{ count: \d+", "instance_group [ { count: 1", config.read_text())
        )
    return into


@contextlib.contextmanager
def triton_server(repository: Path, venv: Path, state: Path) -> Iterator[Any]:
    """The Triton bundled in `venv` (deploy/local/tritonserver.py) serving `repository` on free
    ports, until the block ends."""
    from deploy.local import tritonserver

    server = tritonserver.start(repository, venv=venv, state=state, ports=tritonserver.Ports.free())
    try:
        server.wait_ready(180.0)
        yield server
    finally:
        server.stop()


async def serving_ceiling(
    args: argparse.Namespace, driver: LandmarkSequence, raw_fps: float, *, triton_venv: Path | None = None
) -> dict[str, Any]:
    """The real server (same settings, watermark on) with an instant generator (instant_repository)
    under CEILING_STREAMS offline streams: the frames/s its own work allows, and the CPU each frame
    costs it. With raw_fps on `cores` cores, a frame costs the generator cores / raw_fps core-seconds,
    so serving s more caps served / raw at 1 / (1 + s raw_fps / cores), however the work is
    scheduled (an upper bound: sharing cores also slows the generator).

    With `triton_venv`, the same through the triton backend and that venv's bundled Triton serving
    the instant repository: the service's CPU per frame when inference is elsewhere, as in
    production (drawing pipelined on render threads, gRPC to Triton), and Triton's own (its python
    backend: the CPU build here, not what a GPU deployment runs)."""
    cores = usable_cores()
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-instant-")))
        repository = instant_repository(args.model_repository, scratch / "repository")
        triton = (
            stack.enter_context(triton_server(repository, triton_venv, scratch / "triton"))
            if triton_venv is not None
            else None
        )
        url = triton.grpc_url if triton is not None else None
        async with bench_server(args, repository, max(args.batches), triton_url=url) as server:
            process = server.process
            streams = offline_streams(server.stub, driver, CEILING_STREAMS, args.seconds, OFFLINE_WINDOW)

            def clocks() -> tuple[float | None, ...]:
                remote = procstat.group_cpu_seconds(triton.process.pid) if triton is not None else None
                return (
                    procstat.cpu_seconds(process.pid),
                    procstat.cpu_seconds(process.pid, process.pid),
                    time.process_time(),
                    remote,
                )

            before = clocks()
            runs = await asyncio.gather(*streams)
            after = clocks()
    served = merge(runs)
    frames = served["received"]

    def per_frame(index: int) -> float | None:
        start, end = before[index], after[index]
        return None if start is None or end is None or not frames else round(1e3 * (end - start) / frames, 3)

    server_ms, loop_ms, client_ms, triton_ms = per_frame(0), per_frame(1), per_frame(2), per_frame(3)

    def bound(ms: float | None) -> float | None:
        return None if ms is None else round(1 / (1 + ms / 1e3 * raw_fps / cores), 3)

    row: dict[str, Any] = {
        "backend": "triton" if triton_venv is not None else "embedded",
        "streams": CEILING_STREAMS,
        "window": OFFLINE_WINDOW,
        "frames": frames,
        "fps": served["achieved_fps"],
        "mean_batch": served["mean_batch"],
        "latency_ms": served["latency_ms"],
        "server_cpu_ms_per_frame": server_ms,
        "event_loop_cpu_ms_per_frame": loop_ms,
        "client_cpu_ms_per_frame": client_ms,
        "cores": cores,
    }
    if triton_venv is not None:
        row["triton_cpu_ms_per_frame"] = triton_ms
        print(
            f"serving ceiling on Triton (instant generator, {CEILING_STREAMS} offline streams): "
            f"{row['fps']:.0f} fps, mean batch {row['mean_batch']:.1f}; server CPU {server_ms} ms per "
            f"frame (event loop {loop_ms}), Triton {triton_ms}, bench client {client_ms}"
        )
        return row
    row["raw_fps"] = round(raw_fps, 2)
    row["max_ratio_to_raw"] = bound(server_ms)
    row["max_ratio_to_raw_with_this_client"] = bound(
        None if server_ms is None or client_ms is None else server_ms + client_ms
    )
    print(
        f"serving ceiling (instant generator, {CEILING_STREAMS} offline streams): {row['fps']:.0f} fps; "
        f"server CPU {server_ms} ms per frame (event loop {loop_ms}), bench client {client_ms}: beside "
        f"raw {raw_fps:.1f} fps on {cores} cores, served / raw <= {row['max_ratio_to_raw']} "
        f"({row['max_ratio_to_raw_with_this_client']} with this client on the same cores)"
    )
    return row


async def through_triton(args: argparse.Namespace, driver: LandmarkSequence, venv: Path) -> dict[str, Any]:
    """The model itself through the production path: `venv`'s bundled Triton serving the model
    repository (python profile: its generators in instances, each on the engine the runner picks,
    export/triton_python_model.py) and the service on the triton backend. Raw Triton calls at
    batch 1 (RawTriton: one per instance in flight, two waiting), then the live rows of section 3
    against raw Triton windows: what a deployment on these cores serves, and how close to its
    Triton's raw rate."""
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-triton-")))
        triton = stack.enter_context(triton_server(args.model_repository, venv, scratch / "triton"))
        found = re.search(r"generator_0_0: (\S+) on (\d+) thread", triton.log.read_text())
        engine, threads = (found.group(1), int(found.group(2))) if found else ("unknown", 0)
        raw = RawTriton(repository=args.model_repository, url=triton.grpc_url, pgid=triton.process.pid)
        try:
            await raw.connect()
            print(f"through Triton: {engine} in {raw.lanes} instance(s) of {threads} thread(s)")
            (raw_row,) = await raw_generator(raw, driver, [1], args.raw_seconds)
            raw_row["triton_cpu_ms_per_frame"] = round(1e3 * raw.cpu_seconds / raw_row["runs"], 2)
            rows: list[dict[str, Any]] = []
            async with bench_server(
                args, args.model_repository, max(args.batches), triton_url=triton.grpc_url
            ) as server:
                capacity = server.capacity_fps
                print(f"the server's live capacity through Triton, measured at its start: {capacity:.1f} fps")
                for streams in args.streams:
                    rows.append(await live(server, driver, raw, args, streams, 1, triton.process.pid))
        finally:
            await raw.close()
    return {
        "engine": engine,
        "instances": raw.lanes,
        "threads_per_instance": threads,
        "raw": raw_row,
        "capacity_fps_at_start": capacity,
        "live": rows,
    }


# -- 5. beside a personalisation -------------------------------------------------------------
def _live_summary(run: dict[str, Any]) -> dict[str, Any]:
    merged = merge([run])
    return {k: merged[k] for k in ("sent", "received", "dropped", "achieved_fps", "latency_ms")}


async def beside_personalisation(
    args: argparse.Namespace, driver: LandmarkSequence, engine: str
) -> dict[str, Any]:
    """One live stream at --fps, --seconds alone and then --seconds while the embedded worker
    fine-tunes the stream's avatar (the window opens once the job is fine-tuning). The job is
    cancelled after the window; it works in a copy of the model repository."""
    with tempfile.TemporaryDirectory(prefix="bench-personalise-") as tmp:
        work = Path(tmp)
        repository = work / "repository"
        shutil.copytree(args.model_repository, repository, ignore=shutil.ignore_patterns("__pycache__"))
        async with bench_server(
            args, repository, max(args.batches), engine=engine, jobs=work / "jobs"
        ) as server:

            async def stream() -> dict[str, Any]:
                points, size = driver.points, driver.frame_size
                return await run_stream(server.stub, AVATAR, points, size, fps=args.fps, seconds=args.seconds)

            alone = await stream()
            with Client(target=server.address) as client:
                try:
                    operation = client.personalise(AVATAR, steps=args.personalisation_steps)
                except grpc.RpcError as error:  # a repository of another model than the worker's
                    return {"error": f"not run: {error.details()}"}
                deadline = time.monotonic() + 300
                while (current := client.get_operation(operation.name)).metadata.step < 1:
                    if current.done or time.monotonic() > deadline:
                        return {"error": f"the job did not start fine-tuning: {current.error.message}"}
                    await asyncio.sleep(0.1)
                first = current.metadata.step
                beside = await stream()
                last = client.get_operation(operation.name)
                client.cancel_operation(operation.name)
    row = {
        "seconds": args.seconds,
        "alone": _live_summary(alone),
        "beside_job": _live_summary(beside),
        "job_steps": args.personalisation_steps,
        "job_step_at_window_start": first,
        "job_steps_in_window": last.metadata.step - first,
        "job_done_in_window": last.done,
    }
    print(
        "1 live stream beside a personalisation: "
        + "; ".join(
            f"{name} p50/p99 {r['latency_ms']['p50']:.0f}/{r['latency_ms']['p99']:.0f} ms, "
            f"{r['dropped']} dropped"
            for name, r in (("alone", row["alone"]), ("beside the job", row["beside_job"]))
        )
        + f"; the job made {row['job_steps_in_window']} steps in the {args.seconds:g} s"
    )
    return row


async def paired(args: argparse.Namespace, driver: LandmarkSequence) -> dict[str, Any]:
    """The model against --baseline in alternating rounds (A B A B ...), so that a change in the
    machine's load hits both alike: medians of raw batch-1 latency and of the closed-loop
    single-stream latency through a real server (rasterize, warp, queue, inference, encode)."""
    repos = {"model": args.model_repository, "baseline": args.baseline}
    engines_of = {"model": args.engine, "baseline": args.baseline_engine}
    figures: dict[str, dict[str, list[float]]] = {k: {"raw_ms": [], "service_ms": []} for k in repos}
    for _ in range(args.rounds):
        for name, repository in repos.items():
            raw = RawGenerator(repository=repository, engine=engines_of[name], lanes=args.lanes)
            row = (await raw_generator(raw, driver, [1], args.raw_seconds))[0]
            figures[name]["raw_ms"].append(row["latency_ms"]["p50"])
            async with bench_server(args, repository, 1, engine=engines_of[name]) as server:
                one = await closed_loop(server.stub, driver, raw, args.closed_loop_frames)
            figures[name]["service_ms"].append(one["latency_ms"]["p50"])
    out: dict[str, Any] = {
        name: {k: round(float(np.median(v)), 2) for k, v in f.items()} for name, f in figures.items()
    }
    out["ratio_raw"] = round(out["model"]["raw_ms"] / out["baseline"]["raw_ms"], 3)
    out["ratio_service"] = round(out["model"]["service_ms"] / out["baseline"]["service_ms"], 3)
    out["rounds"] = args.rounds
    print(
        f"paired: per frame through the service {out['model']['service_ms']:.1f} ms vs baseline "
        f"{out['baseline']['service_ms']:.1f} ms (x{out['ratio_service']:.2f}); raw batch 1 "
        f"{out['model']['raw_ms']:.1f} vs {out['baseline']['raw_ms']:.1f} ms (x{out['ratio_raw']:.2f})"
    )
    return out


def run(args: argparse.Namespace) -> int:
    """An --out that is there is refused (exit 2) unless --overwrite, before anything is timed."""
    target = args.out.with_name(args.out.stem + f"-{args.device}.json") if args.device else args.out
    try:
        out = PendingFile(target, flag="--out", overwrite=args.overwrite)
    except ValueError as error:
        print(f"talkinghead bench: {error}", file=sys.stderr)
        return 2
    with out:
        if args.device:  # PyTorch (export/speed.py): imported only here, the client stays torch-free
            from export import speed

            out.discard()  # (checked only: speed writes its file as it goes, each figure kept)
            return speed.run(args)
        try:
            out.write_bytes((json.dumps(_measure(args), indent=2) + "\n").encode())
        except ValueError as error:  # one that appeared meanwhile (without --overwrite)
            print(f"talkinghead bench: {error}", file=sys.stderr)
            return 1
    print(f"wrote {args.out}")
    return 0


def measured_generator(args: argparse.Namespace) -> RawGenerator:
    """The generator the raw rows time and the served rows' server runs: on --engine (auto: as the
    service picks). --engine named only the paired run's engine: a bench for ONNX Runtime's rows
    measured OpenVINO's."""
    return RawGenerator(repository=args.model_repository, engine=args.engine, lanes=args.lanes)


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    driver = LandmarkSequence.load(args.driver)
    load_before = os.getloadavg()
    peak = cpu_peak()
    print(peak_summary(peak))
    raw = measured_generator(args)
    print(f"generator engine: {raw.engine.name} in {raw.lanes} lane(s) ({raw.choice})")
    raw_rows = with_peak_share(
        asyncio.run(raw_generator(raw, driver, args.batches, args.raw_seconds)),
        raw.metadata,
        peak,
        raw.engine.name,
    )
    if "peak_share" in raw_rows[0]:
        first = raw_rows[0]
        print(
            f"raw batch {first['batch']}: {first['gflops_per_s']:.0f} GFLOP/s, "
            f"{first['peak_share']:.2f} of the {first['peak']} peak"
        )
    per_engine = asyncio.run(engine_table(args, driver, raw, peak))
    service = asyncio.run(service_runs(args, driver, raw))
    raw_fps = next((r["fps"] for r in raw_rows if r["batch"] == 1), raw_rows[0]["fps"])
    ceiling = asyncio.run(serving_ceiling(args, driver, raw_fps))
    on_triton = (
        asyncio.run(serving_ceiling(args, driver, raw_fps, triton_venv=args.triton_venv))
        if args.triton_venv is not None
        else None
    )
    production = (
        asyncio.run(through_triton(args, driver, args.triton_venv)) if args.triton_venv is not None else None
    )
    personalisation = (
        asyncio.run(beside_personalisation(args, driver, raw.engine.name))
        if args.personalisation_steps
        else None
    )
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "usable_cpus": usable_cores(),
            "cpu": cpus.model_name(),
            "platform": platform.platform(),
            "onnxruntime": ort.__version__,
            "openvino": _version("openvino"),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "model": {k.removeprefix(contract.Meta.PREFIX): v for k, v in raw.metadata.items()},
        "model_path": str(raw.path),
        "cpu_peak": peak,
        "engine": raw.engine.name,
        "lanes": raw.lanes,
        "engine_choice_ms_per_frame": {t.engine: t.ms_per_frame for t in raw.timings},
        "raw_backend": raw_rows,
        "engines": per_engine,
        **service,
        "serving_ceiling": ceiling,
        **({"serving_ceiling_triton": on_triton} if on_triton is not None else {}),
        **({"through_triton": production} if production is not None else {}),
        **({"beside_personalisation": personalisation} if personalisation is not None else {}),
    }
    if args.baseline is not None:
        report["paired_with_baseline"] = {"baseline": str(args.baseline), **asyncio.run(paired(args, driver))}
    return report
