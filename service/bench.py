"""Benchmark: the raw backend by batch size, then the real service with 1, 4 and 16 live streams.

1. raw: the generator through the in-process ONNX Runtime backend (the service's own code path
   minus gRPC), batch 1, 2, 4, 8, 16: latency and frames per second.
2. closed loop: one stream, next frame sent when the previous reply arrives: the latency the
   service adds to a lone call over raw batch-1 inference.
3. live: `talkinghead serve` in a subprocess; N = 1, 4, 16 streams each sending landmarks at 25 fps
   (DROP_OLDEST, the live policy) for --seconds: achieved fps, end-to-end latency percentiles
   (send -> reply, client clock), drops, mean batch size, and the server's per-stage times. The
   service's fps is compared with the raw backend's fps at the same (mean) batch size.

example:
  talkinghead bench                                  # -> out/bench.json
  talkinghead bench --seconds 20 --streams 1 4 16 --out out/bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from api.talkinghead.v1 import animation_pb2 as pb
from api.talkinghead.v1 import animation_pb2_grpc
from facekit.rasterize import draw_batch
from facekit.sequence import LandmarkSequence
from service.backends.onnxruntime import OnnxRuntimeBackend
from service.client import Client, to_landmarks

ASSETS = Path(__file__).resolve().parents[1] / "facekit/assets"
STAGES = ("rasterize", "queue", "inference", "encode", "total")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--out", type=Path, default=Path("out/bench.json"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--fps", type=float, default=25.0, help="frames per second each stream sends")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each live run")
    parser.add_argument("--raw-seconds", type=float, default=3.0, help="time per raw batch size")
    parser.add_argument("--closed-loop-frames", type=int, default=60)
    parser.add_argument("--portrait", type=Path, default=ASSETS / "demo_portrait.png")
    parser.add_argument("--driver", type=Path, default=ASSETS / "demo_driver.npz")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    p = np.percentile(np.asarray(values) * 1e3, [50, 95, 99])
    return {"p50": round(float(p[0]), 2), "p95": round(float(p[1]), 2), "p99": round(float(p[2]), 2)}


# -- 1. raw backend -----------------------------------------------------------------------------
async def raw_backend(
    repository: Path, driver: LandmarkSequence, batches: list[int], seconds: float
) -> list[dict]:
    backend = OnnxRuntimeBackend(repository=repository)
    await backend.start()
    if not await backend.wait_ready(120):
        raise SystemExit(f"no models in {repository}: run `make model-repository`")
    info = backend.info
    drawn = draw_batch(
        driver.rescaled(info.image_size).points[: max(batches)], info.image_size, info.draw_style
    )
    adain = np.zeros((max(batches), info.adain_size), np.float32)
    rows: list[dict[str, Any]] = []
    for batch in batches:
        images = np.ascontiguousarray(np.resize(drawn, (batch, *drawn.shape[1:])))
        await backend.generate(images, adain[:batch])  # warm-up
        times: list[float] = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds or len(times) < 3:
            t0 = time.perf_counter()
            await backend.generate(images, adain[:batch])
            times.append(time.perf_counter() - t0)
        mean = float(np.mean(times))
        row: dict[str, Any] = {
            "batch": batch,
            "runs": len(times),
            "latency_ms": percentiles(times),
            "fps": round(batch / mean, 2),
        }
        rows.append(row)
        print(f"raw batch {batch:>2}: {row['latency_ms']['p50']:8.1f} ms p50, {row['fps']:6.1f} fps")
    await backend.close()
    return rows


# -- the server -------------------------------------------------------------------------------
def start_server(repository: Path, store: Path, max_batch: int) -> tuple[subprocess.Popen[str], str]:
    env = dict(
        os.environ,
        TALKINGHEAD_MODEL_REPOSITORY=str(repository),
        TALKINGHEAD_AVATAR_STORE=str(store),
        TALKINGHEAD_GRPC_PORT="0",
        TALKINGHEAD_METRICS_PORT="0",
        TALKINGHEAD_MAX_BATCH=str(max_batch),
        TALKINGHEAD_MAX_STREAMS="64",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "talkinghead.cli", "serve"], env=env, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    address = ""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        found = re.search(r"serving gRPC on (\S+):(\d+)", line)
        if found:
            address = f"127.0.0.1:{found.group(2)}"
        if "is ready" in line and address:
            return process, address
    process.kill()
    raise SystemExit("the server did not start")


# -- 2./3. streams ----------------------------------------------------------------------------
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
) -> dict[str, Any]:
    """One stream: paced at `fps` for `seconds` (live), or closed loop for `closed_loop_frames`
    (next frame when the previous reply is in; `between` runs before each, timed: a paired raw call)."""
    sent: dict[int, float] = {}
    latencies: list[float] = []
    raw_times: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    batches: list[int] = []
    dropped = 0
    reply = asyncio.Event()
    config = pb.StreamConfig(avatar_id=avatar, overflow=pb.OVERFLOW_POLICY_DROP_OLDEST)
    messages = [to_landmarks(p) for p in points]

    async def requests() -> AsyncIterator[pb.AnimateRequest]:
        yield pb.AnimateRequest(config=config)
        t0 = time.perf_counter()
        index = 0
        while True:
            if closed_loop_frames:
                if index >= closed_loop_frames:
                    return
                if index:
                    await reply.wait()
                    reply.clear()
                if between is not None:
                    t_raw = time.perf_counter()
                    await between()
                    raw_times.append(time.perf_counter() - t_raw)
            else:
                if index / fps >= seconds:
                    return
                await asyncio.sleep(max(0.0, t0 + index / fps - time.perf_counter()))
            sent[index] = time.perf_counter()
            frame = pb.LandmarkFrame(
                sequence=index,
                landmarks=messages[index % len(messages)],
                frame_width=size[0],
                frame_height=size[1],
            )
            yield pb.AnimateRequest(landmarks=frame)
            index += 1

    started = time.perf_counter()
    async for response in stub.Animate(requests()):
        if not response.HasField("frame"):
            continue
        f = response.frame
        latencies.append(time.perf_counter() - sent[f.sequence])
        dropped += f.dropped_before
        batches.append(f.batch_size)
        t = f.timings
        for name, us in zip(
            STAGES, (t.rasterize_us, t.queue_us, t.inference_us, t.encode_us, t.total_us), strict=True
        ):
            stages[name].append(us / 1e3)
        reply.set()
    return {
        "received": len(latencies),
        "sent": len(sent),
        "dropped": dropped,
        "latencies": latencies,
        "raw_times": raw_times,
        "batches": batches,
        "stages": stages,
        "elapsed": time.perf_counter() - started,
    }


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    received = sum(r["received"] for r in runs)
    batches = [x for r in runs for x in r["batches"]]
    stage_ms = {s: float(np.mean([x for r in runs for x in r["stages"][s]] or [0])) for s in STAGES}
    mean_batch = float(np.mean(batches)) if batches else 0.0
    achieved = received / max(r["elapsed"] for r in runs)
    # Raw fps at the service's own batch sizes, in the same minutes: mean batch / mean generator call.
    in_situ = mean_batch / (stage_ms["inference"] / 1e3) if stage_ms["inference"] else float("nan")
    return {
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


async def raw_window(
    backend: OnnxRuntimeBackend, driver: LandmarkSequence, batch: int, seconds: float
) -> float:
    """Raw fps at `batch` over `seconds` (right after a live run: the same machine load)."""
    info = backend.info
    drawn = draw_batch(driver.rescaled(info.image_size).points[:batch], info.image_size, info.draw_style)
    images = np.ascontiguousarray(np.resize(drawn, (batch, *drawn.shape[1:])))
    adain = np.zeros((batch, info.adain_size), np.float32)
    frames, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or frames < 3 * batch:
        await backend.generate(images, adain)
        frames += batch
    return frames / (time.perf_counter() - started)


async def service_runs(args: argparse.Namespace, driver: LandmarkSequence) -> dict[str, Any]:
    backend = OnnxRuntimeBackend(repository=args.model_repository)
    await backend.start()
    await backend.wait_ready(120)
    info = backend.info
    drawn1 = draw_batch(driver.rescaled(info.image_size).points[:1], info.image_size, info.draw_style)
    adain1 = np.zeros((1, info.adain_size), np.float32)
    with tempfile.TemporaryDirectory(prefix="bench-avatars-") as store:
        process, address = start_server(args.model_repository, Path(store), max(args.batches))
        try:
            with Client(address) as client:
                client.create_avatar("bench", [args.portrait], replace=True)
            async with grpc.aio.insecure_channel(address) as channel:
                stub = animation_pb2_grpc.AnimationServiceStub(channel)
                closed = await run_stream(
                    stub,
                    "bench",
                    driver.points,
                    driver.frame_size,
                    closed_loop_frames=args.closed_loop_frames,
                    between=lambda: backend.generate(drawn1, adain1),
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
                rows = []
                for streams in args.streams:
                    runs = await asyncio.gather(
                        *(
                            run_stream(
                                stub,
                                "bench",
                                np.roll(driver.points, 7 * i, axis=0),
                                driver.frame_size,
                                fps=args.fps,
                                seconds=args.seconds,
                            )
                            for i in range(streams)
                        )
                    )
                    row: dict[str, Any] = {"streams": streams, "fps_per_stream": args.fps}
                    row.update(merge(runs))
                    nearest = min(args.batches, key=lambda b: abs(b - row["mean_batch"]))
                    raw_fps = await raw_window(backend, driver, nearest, args.raw_seconds)
                    row["raw_fps_after"] = {"batch": nearest, "fps": round(raw_fps, 2)}
                    row["ratio_to_raw_after"] = round(row["achieved_fps"] / raw_fps, 3)
                    rows.append(row)
                    print(
                        f"{streams:>2} stream(s) x {args.fps:g} fps: {row['achieved_fps']:6.1f} fps, "
                        f"mean batch {row['mean_batch']:.1f}, generator busy "
                        f"{row['generator_utilisation']:.0%}, raw batch {nearest} right after: "
                        f"{raw_fps:.1f} fps (ratio {row['ratio_to_raw_after']:.2f}); "
                        f"latency p50/p95/p99 {row['latency_ms']['p50']:.0f}/{row['latency_ms']['p95']:.0f}/"
                        f"{row['latency_ms']['p99']:.0f} ms; {row['dropped']} dropped"
                    )
        finally:
            process.terminate()
            process.wait(30)
            await backend.close()
    return {"closed_loop_single_stream": one, "live": rows}


def run(args: argparse.Namespace) -> int:
    driver = LandmarkSequence.load(args.driver)
    load_before = os.getloadavg()
    raw = asyncio.run(raw_backend(args.model_repository, driver, args.batches, args.raw_seconds))
    service = asyncio.run(service_runs(args, driver))
    model = sorted((args.model_repository / "generator").glob("*/model.onnx"))[-1]
    meta = dict(ort.InferenceSession(str(model)).get_modelmeta().custom_metadata_map)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "model": {k.removeprefix("talkinghead."): v for k, v in meta.items()},
        "raw_backend": raw,
        **service,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
