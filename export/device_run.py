"""The one script a lent GPU runs: `python3 -m export.device_run --out DIR --budget SECONDS`.

A lent GPU comes for minutes at a time with only its own image's Python (PyTorch, no project
venv: no PyAV or gRPC tools, so not `talkinghead bench`), so this measures, in order of value,
whatever fits the budget, and rewrites DIR/report.json after every stage:

1. the machine: GPU, driver, clocks, and its two ceilings measured (a bf16 8192^3 matrix product on
   random data, a 2 GiB device-to-device copy);
2. the headline (export/speed.py, CUDA graphs, channels-last): the `paper` generator (256 px,
   random weights) torch.compile'd in fp16 at the smallest and largest batch. Each batch size
   compiles anew (~20 s on an H200 machine's 16 cores);
3. candidates (speed.Variant) against it at the largest batch, where 5,000 frames/s is aimed:
   instance norm as var_mean in the tensor's own dtype, inductor's weight freezing, coordinate
   descent tuning, 1x1 convolutions as matrix products with aggressive fusion;
4. a kernel profile of the compiled headline at the largest batch (DIR/profile-compiled.txt);
5. max-autotune at the largest batch; the compiled headline at every batch size, then in bf16;
   the shipped checkpoint compiled;
6. `talkinghead bench --device cuda`'s eager tables, fp16 and bf16, for `paper` and the shipped
   checkpoint at three batch sizes; `paper` with self-attention blocked as on the CPU (what
   fusing it buys), with var_mean norm; a kernel profile of eager `paper` bf16 (DIR/profile.txt).
The eager tables and the first headline table are in docs/gpu (2026-12-04): later sessions run
what is not known yet first.

Every table carries its error against the shipped code in fp32 (speed.relative_error): of the
compiled model for the headline, of the eager one as the variant asks elsewhere.
Stages that would start after the budget are recorded as not run, but a stage started inside it
runs to its end: give the call a timeout well past the budget (400 s budget, 600 s timeout). Tee
the output to keep a log.
`--device cpu --config smoke --batches 1 2` runs every stage on the CPU in seconds (the test suite
does, so the script is known to work before a GPU session spends minutes on it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from export import speed

CHECKPOINT = Path("models/talkinghead-small.pt")


def machine(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return speed.device_info(device)
    query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
    try:
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        smi = f"nvidia-smi failed: {exc}"
    return {"nvidia_smi": {"query": query, "answer": smi}, **speed.device_info(device)}


def _median_ms(fn: Any, device: torch.device, *, warm: int = 3, reps: int = 10) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def ceilings(device: torch.device) -> dict[str, float]:
    """Measured bf16 matrix rate (random data, never zeros) and copy bandwidth (read + written)."""
    n, words = (8192, 2**29) if device.type == "cuda" else (512, 2**22)  # 2 GiB copied on a GPU
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matmul_ms = _median_ms(lambda: a @ b, device)
    src = torch.randn(words, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device)
    return {
        "bf16_matmul_tflops": round(2 * n**3 / (matmul_ms * 1e-3) / 1e12, 1),
        "copy_tb_per_s": round(2 * src.numel() * 4 / (copy_ms * 1e-3) / 1e12, 2),
    }


def profile(
    gen: Any,
    cfg: Any,
    batch: int,
    path: Path,
    device: torch.device,
    *,
    precision: str = "bf16",
    variant: speed.Variant | None = None,
) -> str:
    """The kernels of five forwards at `batch`, most time first; compiled as `variant` asks (then
    without CUDA graphs: the profiler sees a graph's replay as one launch)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    variant = variant or speed.Variant()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    dtype = speed.DTYPES[precision]
    g = speed.compile_as(speed.prepare(gen, device, dtype, variant), variant)
    y, psi, warped = speed.random_inputs(g, cfg, batch, device, dtype)
    args = (y, psi) if warped is None else (y, psi, warped)
    with torch.inference_mode(), torch._inductor.config.patch(variant.inductor_config()):
        for _ in range(3):
            g(*args)
        if cuda:
            torch.cuda.synchronize()
        with profiler(activities=activities) as prof:
            for _ in range(5):
                g(*args)
            if cuda:
                torch.cuda.synchronize()
    table = prof.key_averages().table(
        sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=50, max_name_column_width=100
    )
    how = f"torch.compile {variant.compile}" if variant.compile else "eager"
    path.write_text(
        f"{cfg.image_size} px generator, {precision}, {how}, batch {batch}, 5 forwards\n{table}\n"
    )
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later stages are skipped")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--config", default="paper", help="the configuration timed with random weights")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--batches", type=int, nargs="+", default=[2**i for i in range(9)])
    parser.add_argument("--only", nargs="+", help="run only the stages whose names hold one of these")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("export.device_run: no CUDA device here; nothing measured")
        return 0
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "stages": {}}

    def save() -> None:
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    def stage(name: str, fn: Any, *, needs: float = 0.0) -> None:
        if args.only and name not in ("machine", "ceilings") and not any(o in name for o in args.only):
            return
        left = deadline - time.monotonic()
        if left < needs:
            report["stages"][name] = {"error": f"not run: {left:.0f} s of the budget left"}
            print(f"[{name}] skipped ({left:.0f} s left)", flush=True)
            save()
            return
        t0 = time.monotonic()
        print(f"[{name}] at {t0 - started:.0f} s", flush=True)
        try:
            result = fn()
        except Exception as exc:  # one stage failing must not cost the others' figures
            result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(f"[{name}] failed: {result['error']}", flush=True)
        report["stages"][name] = {"seconds": round(time.monotonic() - t0, 1), "result": result}
        save()

    stage("machine", lambda: machine(device))
    print(json.dumps(report["stages"]["machine"]), flush=True)
    stage("ceilings", lambda: ceilings(device))
    print(json.dumps(report["stages"]["ceilings"]), flush=True)
    peak = speed.datasheet_peak(torch.cuda.get_device_name(), None) if device.type == "cuda" else None
    models = speed.models([args.config], args.checkpoint)
    paper = models[0]
    few = sorted({args.batches[0], args.batches[len(args.batches) // 2], args.batches[-1]})

    def table(
        model: tuple[str, Any, Any],
        precision: str,
        batches: list[int] | None = None,
        compiled_error: bool = False,
        **knobs: Any,
    ) -> dict[str, Any]:
        variant = speed.Variant(**knobs)
        if variant.compile and not args.compile:
            return {"error": "not run: --no-compile"}
        label, gen, cfg = model
        result = speed.time_model(
            label,
            gen,
            cfg,
            device=device,
            precision=precision,
            batches=batches or args.batches,
            iters=args.iters,
            peak_tflops=peak,
            variant=variant,
            deadline=deadline,
        )
        result["relative_error_vs_fp32"] = speed.relative_error(
            gen, cfg, device, precision, variant, compiled=compiled_error
        )
        result["relative_error_of"] = "compiled" if compiled_error and variant.compile else "eager"
        return result

    shipped = models[1:]
    compiled = "default"
    top = few[-1:]  # 5,000 frames/s is the aim: candidates are timed where throughput peaks
    # The headline at both ends first; then what might close the gap to 5,000 frames/s and where
    # the compiled model's time goes; then the full table and the eager ones (measured before:
    # docs/gpu), as the budget allows.
    stage(
        f"{args.config} fp16, torch.compile",
        lambda: table(paper, "fp16", sorted({few[0], few[-1]}), compile=compiled, compiled_error=True),
        needs=60,
    )
    candidates: dict[str, dict[str, Any]] = {
        "var_mean norm": {"norm": "var_mean"},
        "freezing": {"freezing": True},
        "coordinate descent": {"inductor": (("coordinate_descent_tuning", True),)},
        "1x1 conv as mm, aggressive fusion": {
            "inductor": (("conv_1x1_as_mm", True), ("aggressive_fusion", True))
        },
    }
    for label, knobs in candidates.items():
        stage(
            f"{args.config} fp16, torch.compile, {label}",
            lambda k=knobs: table(paper, "fp16", top, compile=compiled, **k),
            needs=40,
        )
    stage(
        "profile, compiled",
        lambda: (
            profile(
                paper[1],
                paper[2],
                few[-1],
                args.out / "profile-compiled.txt",
                device,
                precision="fp16",
                variant=speed.Variant(compile=compiled),
            )
            if args.compile
            else {"error": "not run: --no-compile"}
        ),
        needs=40,
    )
    stage(
        f"{args.config} fp16, torch.compile max-autotune",
        lambda: table(paper, "fp16", top, compile="max-autotune-no-cudagraphs"),
        needs=150,
    )
    stage(
        f"{args.config} fp16, torch.compile, every batch",
        lambda: table(paper, "fp16", compile=compiled),
        needs=120,
    )
    stage(
        f"{args.config} bf16, torch.compile",
        lambda: table(paper, "bf16", few[::2], compile=compiled),
        needs=60,
    )
    for model in shipped:
        stage(
            f"{model[0]} fp16, torch.compile",
            lambda m=model: table(m, "fp16", few[::2], compile=compiled),
            needs=60,
        )
    for precision in ("fp16", "bf16"):
        for model in models:
            stage(f"{model[0]} {precision}", lambda m=model, p=precision: table(m, p, few), needs=30)
    stage(
        f"{args.config} fp16, attention blocked",
        lambda: table(paper, "fp16", few, fused_attention=False),
        needs=20,
    )
    stage(f"{args.config} fp16, var_mean norm", lambda: table(paper, "fp16", few, norm="var_mean"), needs=20)
    stage(
        "profile",
        lambda: profile(paper[1], paper[2], few[1], args.out / "profile.txt", device),
        needs=15,
    )
    report["seconds"] = round(time.monotonic() - started, 1)
    save()
    print(f"\n{'stage':<44} {'batch':>5} {'ms/call':>9} {'frames/s':>10} {'peak':>6}")
    for name, entry in report["stages"].items():
        result = entry.get("result")
        if not isinstance(result, dict) or "rows" not in result:
            continue
        for row in result["rows"]:
            print(
                f"{name:<44} {row['batch']:>5} {row.get('ms_per_call', '-'):>9} "
                f"{row.get('frames_per_s', row.get('error', '-')):>10} {row.get('peak_share', '-'):>6}"
            )
        print(f"{'':<44} error vs fp32 {result.get('relative_error_vs_fp32')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
