"""The generator's speed in PyTorch on a GPU (or the CPU): `talkinghead bench --device cuda`.

For each model (the `paper` configuration at 256 px with random weights - speed does not depend on
their values - and the shipped checkpoint) and each precision (bf16 and fp16 on CUDA, fp32 on the
CPU): frames per second at batch 1 to 256, latency at batch 1, GFLOPs per frame (counted by
torch.utils.flop_counter on one forward) and the share of the device's peak that makes. On CUDA the
generator runs channels-last, spectral norm baked into plain weights, self-attention fused
(training/blocks.py), optionally through torch.compile (--compile: specialised per batch size), each
batch size replayed from a captured CUDA graph (no launch overhead). Each precision's output is
compared with fp32 on the same device (TF32 off) as ||out - ref|| / ||ref||. Without a CUDA device
`--device cuda` says so and exits 0. export/device_run.py is the script a lent GPU runs.

Peak figures are the vendors' dense (no sparsity) tensor-core numbers; name another with
--peak-tflops.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch._inductor.config
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from export.wrappers import bake
from training import checkpoint
from training.blocks import AdaIN, SelfAttention
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


def datasheet_peak(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((peak for fragment, peak in PEAK_TFLOPS if fragment in name), None)


def gflops_per_frame(gen: Generator, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> float:
    y, psi, warped = random_inputs(gen, cfg, 1, device, dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        gen(y, psi, warped) if warped is not None else gen(y, psi)
    return float(counter.get_total_flops()) / 1e9


def random_inputs(
    gen: Generator, cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    s = cfg.image_size
    memory = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    y = torch.rand(batch, 3, s, s, device=device, dtype=dtype).mul(2).sub(1).to(memory_format=memory)
    psi = torch.randn(batch, gen.adain_size, device=device, dtype=dtype)
    warped = torch.rand_like(y) if cfg.warp_guided else None
    return y, psi, warped


@dataclasses.dataclass(frozen=True)
class Variant:
    """How the generator runs. The defaults are the shipped code; the rest are candidates a GPU
    session times against it (export/device_run.py), each labelled in the report."""

    compile: str | None = None  # a torch.compile mode ("default", "max-autotune-no-cudagraphs"); None: eager
    freezing: bool = False  # compiled only: inductor folds the weights in as constants
    fused_attention: bool | None = None  # None: training/blocks.py's choice for the device
    norm: str = "instance_norm"  # or "var_mean": statistics over H, W in the tensor's own dtype
    # compiled only: more torch._inductor.config settings, as (name, value) pairs
    inductor: tuple[tuple[str, Any], ...] = ()

    def inductor_config(self) -> dict[str, Any]:
        """What inductor reads as it compiles (at each batch size's first call)."""
        return {"freezing": self.freezing, **dict(self.inductor)}


def _var_mean_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    return (x - mean) * torch.rsqrt(var + eps)


def _adain_var_mean(self: AdaIN, x: torch.Tensor) -> torch.Tensor:
    assert self.params is not None
    scale, bias = self.params.unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
    return _var_mean_norm(x) * (1.0 + scale) + bias


def _instance_norm_var_mean(self: nn.InstanceNorm2d, x: torch.Tensor) -> torch.Tensor:
    return _var_mean_norm(x, self.eps) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def prepare(
    gen: Generator, device: torch.device, dtype: torch.dtype, variant: Variant = Variant()
) -> Generator:
    """A baked copy of `gen` on `device` in `dtype` (channels-last on CUDA), attention and
    normalisation as `variant` asks (compiling is time_model's)."""
    out: Generator = bake(gen).to(device=device, dtype=dtype)  # type: ignore[assignment]
    if device.type == "cuda":
        out = out.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if variant.norm not in ("instance_norm", "var_mean"):
        raise ValueError(f"norm must be instance_norm or var_mean, got {variant.norm!r}")
    for m in out.modules():
        if isinstance(m, SelfAttention):
            m.fused = variant.fused_attention
        if variant.norm == "var_mean" and isinstance(m, AdaIN):
            m.forward = types.MethodType(_adain_var_mean, m)  # type: ignore[method-assign]
        if variant.norm == "var_mean" and isinstance(m, nn.InstanceNorm2d):
            m.forward = types.MethodType(_instance_norm_var_mean, m)  # type: ignore[method-assign]
    return out


def relative_error(
    gen: Generator,
    cfg: ModelConfig,
    device: torch.device,
    precision: str,
    variant: Variant = Variant(),
    *,
    batch: int = 4,
    compiled: bool = False,
) -> float:
    """||out - ref|| / ||ref|| of `precision` as `variant` asks against the shipped code in fp32
    (TF32 off), on fresh random inputs; eager unless `compiled` (another compile, ~20 s on a GPU)."""
    ref_gen = prepare(gen, device, torch.float32)
    fast_gen = prepare(gen, device, DTYPES[precision], variant)
    if compiled:
        fast_gen = compile_as(fast_gen, variant)
    y, psi, warped = random_inputs(ref_gen, cfg, batch, device, torch.float32)
    allow_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            args = (y, psi) if warped is None else (y, psi, warped)
            ref = ref_gen(*args).double()
            with torch._inductor.config.patch(variant.inductor_config()):
                out = fast_gen(*(a.to(DTYPES[precision]) for a in args)).double()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm())


def compile_as(gen: Generator, variant: Variant) -> Generator:
    """`gen` torch.compile'd as `variant` asks, specialised per batch size (unchanged when eager).
    Dynamo is reset first: its recompile limit counts compiles of Generator.forward by every
    instance, and past it a "compiled" model silently runs eagerly."""
    if not variant.compile:
        return gen
    _allow_recompiles()
    torch._dynamo.reset()
    return torch.compile(gen, dynamic=False, mode=variant.compile)  # type: ignore[return-value]


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
    y, psi, warped = random_inputs(gen, cfg, batch, device, dtype)

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
    peak_tflops: float | None,
    variant: Variant = Variant(),
    deadline: float | None = None,
) -> dict[str, Any]:
    """Frames/s of `gen` at each batch size; batches not started by `deadline` (time.monotonic)
    are left out and say so."""
    dtype = DTYPES[precision]
    gen = prepare(gen, device, dtype, variant)
    gflops = gflops_per_frame(gen, cfg, device, dtype)
    gen = compile_as(gen, variant)
    now = _timer(device)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode(), torch._inductor.config.patch(variant.inductor_config()):
        for batch in batches:
            if deadline is not None and time.monotonic() > deadline:
                rows.append({"batch": batch, "error": "not run: out of time"})
                continue
            try:
                started = time.monotonic()
                run = _runner(gen, cfg, batch, device, dtype)
                run()
                warm_s = time.monotonic() - started
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
                "warm_up_s": round(warm_s, 1),  # autotuning, compiling and capture
            }
            if peak_tflops:
                row["peak_share"] = round(fps * gflops / (peak_tflops * 1e3), 4)
            rows.append(row)
            print(f"  {name} {precision} batch {batch:>3}: {seconds * 1e3:8.2f} ms  {fps:9.1f} frames/s")
    timed = [r for r in rows if "frames_per_s" in r]
    return {
        "model": name,
        "image_size": cfg.image_size,
        "precision": precision,
        "gflops_per_frame": round(gflops, 2),
        "compiled": variant.compile is not None,
        "variant": dataclasses.asdict(variant),
        "fused_attention": (
            variant.fused_attention if variant.fused_attention is not None else device.type == "cuda"
        ),
        "latency_batch1_ms": next((r["ms_per_call"] for r in timed if r["batch"] == 1), None),
        "best_frames_per_s": max((r["frames_per_s"] for r in timed), default=0.0),
        "rows": rows,
    }


def _allow_recompiles(n: int = 64) -> None:
    """torch.compile(dynamic=False) compiles once per batch size; let it keep them all (past the
    limit it would silently run eagerly)."""
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), n))


def models(configs: list[str], checkpoint_path: Path | None) -> list[tuple[str, Generator, ModelConfig]]:
    """Each config with random weights (speed does not depend on their values), then the checkpoint."""
    out: list[tuple[str, Generator, ModelConfig]] = []
    for config in configs:
        torch.manual_seed(0)
        cfg = load_config(config).model
        out.append((f"{config} (random weights)", Generator(cfg=cfg), cfg))
    if checkpoint_path and checkpoint_path.is_file():
        ckpt = checkpoint.load(checkpoint_path)
        _, gen, _ = checkpoint.build_networks(ckpt, with_discriminator=False)
        out.append((f"{checkpoint_path.name}", gen, checkpoint.config_of(ckpt).model))
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"device": platform.processor() or "cpu", "torch": torch.__version__}
    props = torch.cuda.get_device_properties(device)
    return {
        "device": torch.cuda.get_device_name(device),
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
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
    info = device_info(device)
    peak = datasheet_peak(info["device"], args.peak_tflops) if device.type == "cuda" else args.peak_tflops
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = args.out.with_name(args.out.stem + f"-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        **info,
        "peak_tflops": peak,
        "date": time.strftime("%Y-%m-%d"),
        "compiled": args.compile,
        "cuda_graphs": device.type == "cuda",
        "results": [],
    }
    for label, gen, cfg in models(args.configs, args.checkpoint):
        for precision in precisions:
            result = time_model(
                label,
                gen,
                cfg,
                device=device,
                precision=precision,
                batches=batches,
                iters=args.iters,
                peak_tflops=peak,
                variant=Variant(compile="default" if args.compile else None),
            )
            if precision != "fp32":
                result["relative_error_vs_fp32"] = round(relative_error(gen, cfg, device, precision), 5)
            report["results"].append(result)
            out.write_text(json.dumps(report, indent=2) + "\n")  # what is measured survives a crash
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
