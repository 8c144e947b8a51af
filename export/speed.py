"""The generator's speed in PyTorch on a GPU (or the CPU): `talkinghead bench --device cuda`.

For each model (the `paper` configuration at 256 px with random weights - speed does not depend on
their values - and the shipped checkpoint) and each precision (bf16 and fp16 on CUDA, fp32 on the
CPU): frames per second at batch 1 to 256, latency at batch 1, GFLOPs per frame (counted by
torch.utils.flop_counter on one forward) and the share of the device's peak that makes. On CUDA the
generator runs channels-last, spectral norm baked into plain weights, optionally through
torch.compile (--compile), each batch size replayed from a captured CUDA graph (no launch
overhead). Without a CUDA device `--device cuda` says so and exits 0.

Peak figures are the vendors' dense (no sparsity) tensor-core numbers; name another with
--peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from export.wrappers import bake
from training import checkpoint
from training.config import ModelConfig, load_config
from training.generator import Generator

# Dense bf16/fp16 tensor-core TFLOP/s by device name fragment (first match wins).
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("T4", 65.0),
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _peak(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((peak for fragment, peak in PEAK_TFLOPS if fragment in name), None)


def gflops_per_frame(gen: Generator, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> float:
    y, psi, warped = _inputs(gen, cfg, 1, device, dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        gen(y, psi, warped) if warped is not None else gen(y, psi)
    return float(counter.get_total_flops()) / 1e9


def _inputs(
    gen: Generator, cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    s = cfg.image_size
    memory = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    y = torch.rand(batch, 3, s, s, device=device, dtype=dtype).mul(2).sub(1).to(memory_format=memory)
    psi = torch.randn(batch, gen.adain_size, device=device, dtype=dtype)
    warped = torch.rand_like(y) if cfg.warp_guided else None
    return y, psi, warped


def _timer(device: torch.device) -> Callable[[], float]:
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def _runner(
    gen: Generator, cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype
) -> Callable[[], Any]:
    """One call of the generator at `batch`; on CUDA a replay of a captured graph."""
    y, psi, warped = _inputs(gen, cfg, batch, device, dtype)

    def call() -> torch.Tensor:
        return gen(y, psi, warped) if warped is not None else gen(y, psi)

    if device.type != "cuda":
        return call
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up (cuDNN autotuning) outside the graph
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def time_model(
    name: str,
    gen: Generator,
    cfg: ModelConfig,
    *,
    device: torch.device,
    precision: str,
    batches: list[int],
    iters: int,
    compile_model: bool,
    peak_tflops: float | None,
) -> dict[str, Any]:
    dtype = DTYPES[precision]
    gen = bake(gen).to(device=device, dtype=dtype)  # type: ignore[assignment]
    if device.type == "cuda":
        gen = gen.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    gflops = gflops_per_frame(gen, cfg, device, dtype)
    if compile_model:
        gen = torch.compile(gen)  # type: ignore[assignment]
    now = _timer(device)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for batch in batches:
            try:
                run = _runner(gen, cfg, batch, device, dtype)
                run()
                t0 = now()
                for _ in range(iters):
                    run()
                seconds = (now() - t0) / iters
            except torch.OutOfMemoryError:
                rows.append({"batch": batch, "error": "out of memory"})
                torch.cuda.empty_cache()
                break
            fps = batch / seconds
            row: dict[str, Any] = {
                "batch": batch,
                "ms_per_call": round(seconds * 1e3, 3),
                "frames_per_s": round(fps, 1),
            }
            if peak_tflops:
                row["peak_share"] = round(fps * gflops / (peak_tflops * 1e3), 4)
            rows.append(row)
            print(f"  {name} {precision} batch {batch:>3}: {seconds * 1e3:8.2f} ms  {fps:9.1f} frames/s")
    return {
        "model": name,
        "image_size": cfg.image_size,
        "precision": precision,
        "gflops_per_frame": round(gflops, 2),
        "latency_batch1_ms": rows[0].get("ms_per_call") if rows else None,
        "best_frames_per_s": max((r.get("frames_per_s", 0.0) for r in rows), default=0.0),
        "rows": rows,
    }


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "talkinghead bench --device cuda: no CUDA device here "
            "(torch.cuda.is_available() is False); nothing measured"
        )
        return 0
    device = torch.device(args.device)
    precisions = args.precisions or (["bf16", "fp16"] if device.type == "cuda" else ["fp32"])
    batches = args.device_batches or ([2**i for i in range(9)] if device.type == "cuda" else [1, 2, 4])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = _peak(name, args.peak_tflops) if device.type == "cuda" else args.peak_tflops
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    models: list[tuple[str, Generator, ModelConfig]] = []
    for config in args.configs:
        cfg = load_config(config).model
        models.append((f"{config} (random weights)", Generator(cfg=cfg), cfg))
    if args.checkpoint and args.checkpoint.is_file():
        ckpt = checkpoint.load(args.checkpoint)
        _, gen, _ = checkpoint.build_networks(ckpt, with_discriminator=False)
        models.append((f"{args.checkpoint.name}", gen, checkpoint.config_of(ckpt).model))
    results = [
        time_model(
            label,
            gen,
            cfg,
            device=device,
            precision=precision,
            batches=batches,
            iters=args.iters,
            compile_model=args.compile,
            peak_tflops=peak,
        )
        for label, gen, cfg in models
        for precision in precisions
    ]
    report = {
        "device": name,
        "peak_tflops": peak,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d"),
        "compiled": args.compile,
        "cuda_graphs": device.type == "cuda",
        "results": results,
    }
    out = args.out.with_name(args.out.stem + f"-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
