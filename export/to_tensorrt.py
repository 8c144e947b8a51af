"""Stage 2: ONNX -> TensorRT FP16 engines, on the GPU that will serve them (engines are GPU-specific).

    python -m export.to_tensorrt --repository /models-src --out /models --fp16

For every model whose config.pbtxt says `platform: "tensorrt_plan"` (the `tensorrt` profile of
`talkinghead export`), builds `<version>/model.plan` from the `<version>/model.onnx` beside it.
Optimisation-profile batch shapes come from the config: min 1, opt = the largest preferred
dynamic-batch size (8 for models without dynamic batching), max = max_batch_size. Uses the
TensorRT Python API when `import tensorrt` works, else `trtexec` (PATH or /usr/src/tensorrt/bin,
as in NVIDIA's Triton and TensorRT images). Torch-free and stdlib-only, so the Triton image's init
container runs it with nothing installed.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("talkinghead.tensorrt")
TRTEXEC_PATHS = ("trtexec", "/usr/src/tensorrt/bin/trtexec")
DEFAULT_OPT_BATCH = 8
WORKSPACE_MB = 4096


class TensorRTUnavailable(RuntimeError):
    """Neither the TensorRT Python API nor trtexec is on this machine."""


@dataclass(frozen=True, kw_only=True)
class Shapes:
    """Per-input (min, opt, max) shapes of the optimisation profile, batch axis first."""

    inputs: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def trtexec_args(self) -> list[str]:
        def fmt(which: int) -> str:
            return ",".join(f"{n}:{'x'.join(map(str, s[which]))}" for n, s in self.inputs.items())

        return [f"--minShapes={fmt(0)}", f"--optShapes={fmt(1)}", f"--maxShapes={fmt(2)}"]


def shapes_from_config(text: str) -> Shapes:
    """Read max_batch_size, preferred batch sizes and the inputs' dims from config.pbtxt text."""
    found = re.search(r"^max_batch_size:\s*(\d+)", text, re.M)
    if not found or int(found.group(1)) < 1:
        raise ValueError("config.pbtxt has no max_batch_size >= 1: the engine needs a batch axis")
    largest = int(found.group(1))
    preferred = re.search(r"preferred_batch_size:\s*\[([^\]]*)\]", text)
    sizes = [int(v) for v in preferred.group(1).split(",") if v.strip()] if preferred else []
    opt = min(max(sizes) if sizes else DEFAULT_OPT_BATCH, largest)
    block = re.search(r"^input\s*\[(.*?)^\]", text, re.M | re.S)
    if not block:
        raise ValueError("config.pbtxt has no input block")
    inputs = {}
    for name, dims in re.findall(r'name:\s*"([^"]+)"[^}]*?dims:\s*\[([^\]]*)\]', block.group(1)):
        d = tuple(int(v) for v in dims.split(","))
        inputs[name] = ((1, *d), (opt, *d), (largest, *d))
    return Shapes(inputs=inputs)


def trtexec() -> str | None:
    for candidate in TRTEXEC_PATHS:
        path = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if path:
            return path
    return None


def build_with_api(onnx_path: Path, plan_path: Path, shapes: Shapes, *, fp16: bool) -> None:
    import tensorrt as trt  # type: ignore[import-not-found]

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_MB << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.inputs.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.write_bytes(bytes(engine))


def trtexec_command(tool: str, onnx_path: Path, plan_path: Path, shapes: Shapes, *, fp16: bool) -> list[str]:
    cmd = [tool, f"--onnx={onnx_path}", f"--saveEngine={plan_path}", *shapes.trtexec_args()]
    cmd.append(f"--memPoolSize=workspace:{WORKSPACE_MB}")
    return [*cmd, "--fp16"] if fp16 else cmd


def build_engine(onnx_path: Path, plan_path: Path, shapes: Shapes, *, fp16: bool = True) -> str:
    """Build one engine; returns which tool built it. Raises TensorRTUnavailable without TensorRT."""
    try:
        import tensorrt  # type: ignore[import-not-found]  # noqa: F401

        build_with_api(onnx_path, plan_path, shapes, fp16=fp16)
        return "tensorrt-python"
    except ImportError:
        pass
    tool = trtexec()
    if tool is None:
        raise TensorRTUnavailable(
            "TensorRT is not installed: neither `import tensorrt` nor trtexec works here. Build engines "
            "on the serving GPU (NVIDIA's Triton or TensorRT image, see the README)"
        )
    subprocess.run(trtexec_command(tool, onnx_path, plan_path, shapes, fp16=fp16), check=True)
    return "trtexec"


def tensorrt_models(repository: Path) -> list[Path]:
    """Model directories whose config.pbtxt asks for the tensorrt_plan platform."""
    return sorted(
        cfg.parent
        for cfg in repository.glob("*/config.pbtxt")
        if re.search(r'^platform:\s*"tensorrt_plan"', cfg.read_text(), re.M)
    )


def build_repository(repository: Path, *, fp16: bool = True, force: bool = False) -> list[Path]:
    """Build `model.plan` for the latest version of every tensorrt_plan model; returns the plans."""
    built = []
    for model_dir in tensorrt_models(repository):
        shapes = shapes_from_config((model_dir / "config.pbtxt").read_text())
        versions = sorted((p for p in model_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        if not versions or not (versions[-1] / "model.onnx").is_file():
            raise FileNotFoundError(f"{model_dir}: no <version>/model.onnx to build an engine from")
        onnx_path, plan = versions[-1] / "model.onnx", versions[-1] / "model.plan"
        if plan.exists() and not force:
            log.info("%s exists, kept (--force rebuilds)", plan)
            continue
        tool = build_engine(onnx_path, plan, shapes, fp16=fp16)
        log.info("built %s with %s (%s)", plan, tool, shapes.trtexec_args())
        built.append(plan)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.to_tensorrt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repository", type=Path, required=True, help="repository (tensorrt profile)")
    parser.add_argument("--out", type=Path, help="copy the repository here first, build in the copy")
    parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--force", action="store_true", help="rebuild engines that exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    target = args.repository
    if args.out:
        shutil.copytree(args.repository, args.out, dirs_exist_ok=True)
        target = args.out
    try:
        build_repository(target, fp16=args.fp16, force=args.force)
    except TensorRTUnavailable as err:
        print(f"to_tensorrt: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
