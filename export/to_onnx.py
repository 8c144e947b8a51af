"""Stage 1: checkpoint -> single-file ONNX models, with graph hygiene and a parity check.

    paths = export_checkpoint(checkpoint.load("models/talkinghead-small.pt"), Path("build/onnx"))
    # {'embedder': build/onnx/embedder.onnx, 'generator': build/onnx/generator.onnx}

A meta checkpoint gives `embedder` and `generator`; a personalised one gives `generator_<avatar>`.
Names, tensors and the `talkinghead.*` metadata (kind, image size, AdaIN size, drawing style, crop
scale, model id) are the contract in facekit/contract.py, which the service reads them by.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.wrappers import (
    EmbedderIO,
    GeneratorIO,
    PersonalGeneratorIO,
    WarpGeneratorIO,
    WarpPersonalGeneratorIO,
)
from facekit import contract
from facekit.crop import CROP_SCALE
from training import checkpoint
from training.config import ExperimentConfig
from training.generator import Generator

log = logging.getLogger("talkinghead.export")

OPSET = 20
MAX_EXPORT_BATCH = 64  # upper bound the exporter checks the dynamic batch axis against
PRODUCER = "talkinghead-export"


def metadata(ckpt: dict[str, Any], kind: str, *, adain_size: int) -> dict[str, str]:
    """The contract's `talkinghead.*` metadata of a model of `kind` made from `ckpt`."""
    cfg: ExperimentConfig = checkpoint.config_of(ckpt)
    info = contract.ModelInfo(
        image_size=cfg.model.image_size,
        adain_size=adain_size,
        embedding_size=cfg.model.embedding_dim,
        draw_style=cfg.model.draw_style,
        crop_scale=CROP_SCALE,
        model_id=checkpoint.fingerprint(ckpt),
        warp_guided=cfg.model.warp_guided,
    )
    avatar = str(ckpt["avatar"]) if kind == contract.KIND_PERSONALISED else None
    meta = info.metadata(kind=kind, step=int(ckpt.get("step", 0)), avatar=avatar)
    if avatar is not None and ckpt.get("consent_record"):
        meta[contract.Meta.CONSENT_RECORD] = str(ckpt["consent_record"])
    return meta


@dataclass(frozen=True, kw_only=True)
class Graph:
    """What to export: a wrapper module, example inputs (named as the contract's inputs, in its
    order) and the contract's output names."""

    name: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    metadata: dict[str, str]


def graphs(ckpt: dict[str, Any]) -> list[Graph]:
    """The models a checkpoint exports to: embedder + generator (meta) or generator_<avatar>."""
    emb, gen, _ = checkpoint.build_networks(ckpt, with_discriminator=False)
    s, d = gen.cfg.image_size, gen.adain_size
    image = torch.zeros(2, s, s, 3, dtype=torch.uint8)  # (B, S, S, 3)
    examples = {  # distinct tensors per input: the exporter merges aliased inputs
        contract.IMAGE: image,
        contract.LANDMARK_IMAGE: image.clone(),
        contract.ADAIN: torch.zeros(2, d),  # (B, D)
        contract.WARPED: image.clone(),
    }
    warp = gen.cfg.warp_guided

    gflops = gflops_per_frame(gen)

    def graph(kind: str, module: torch.nn.Module) -> Graph:
        meta = metadata(ckpt, kind, adain_size=d)
        if kind != contract.KIND_EMBEDDER:
            meta[contract.Meta.GFLOPS] = f"{gflops:.3f}"
        signature = contract.signature(kind, warp_guided=warp)
        inputs = {name: examples[name] for name in signature.input_names}
        return Graph(
            name=contract.model_name(meta),
            module=module,
            inputs=inputs,
            outputs=signature.output_names,
            metadata=meta,
        )

    if ckpt.get("kind") == contract.KIND_PERSONALISED:
        personal = WarpPersonalGeneratorIO if warp else PersonalGeneratorIO
        return [graph(contract.KIND_PERSONALISED, personal(generator=gen, adain=ckpt["adain"]))]
    if emb is None:
        raise ValueError("a meta checkpoint must hold the embedder")
    shared = WarpGeneratorIO if warp else GeneratorIO
    return [
        graph(contract.KIND_EMBEDDER, EmbedderIO(embedder=emb, generator=gen)),
        graph(contract.KIND_GENERATOR, shared(generator=gen)),
    ]


def gflops_per_frame(gen: Generator) -> float:
    """GFLOPs (2 x multiply-adds) of one generator frame, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    s, d = gen.cfg.image_size, gen.adain_size
    image = torch.zeros(1, 3, s, s)
    warped = image.clone() if gen.cfg.warp_guided else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        gen(image, torch.zeros(1, d), warped)
    return float(counter.get_total_flops()) / 1e9


def export_graph(graph: Graph, path: Path) -> Path:
    """Export one graph to a single self-contained ONNX file with a dynamic batch axis."""
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph.module.eval()
    with torch.no_grad():
        torch.onnx.export(
            graph.module,
            tuple(graph.inputs.values()),
            str(path),
            input_names=list(graph.inputs),
            output_names=graph.outputs,
            dynamic_shapes={name: {0: batch} for name in graph.inputs},
            opset_version=OPSET,
            external_data=False,
            dynamo=True,
            optimize=True,  # constant folding and dead-code removal (onnxscript optimizer)
            verbose=False,
        )
    model = onnx.load(str(path))
    simplified = simplify(model)
    stamp(simplified, graph.metadata)
    onnx.checker.check_model(simplified, full_check=True)
    onnx.save(simplified, str(path))
    return path


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim pass (shape-op folding, identity elimination); kept only if it validates."""
    try:
        import onnxslim

        slim = onnxslim.slim(model)
    except Exception as err:
        log.warning("onnxslim skipped: %s", err)
        return model
    log.info("onnxslim: %d -> %d nodes", len(model.graph.node), len(slim.graph.node))
    return slim


def stamp(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Write metadata and fix the fields that would otherwise vary between runs."""
    del model.metadata_props[:]
    for key, value in sorted(meta.items()):
        model.metadata_props.add(key=key, value=value)
    model.producer_name = PRODUCER
    model.producer_version = "1"
    model.doc_string = ""
    model.graph.doc_string = ""


def export_checkpoint(ckpt: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Export every graph of `ckpt` into `out_dir/<name>.onnx`."""
    paths = {}
    for graph in graphs(ckpt):
        started = time.monotonic()
        paths[graph.name] = export_graph(graph, out_dir / f"{graph.name}.onnx")
        log.info("exported %s in %.1f s", paths[graph.name], time.monotonic() - started)
    return paths


def session(path: Path, *, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True, kw_only=True)
class Parity:
    """Largest and mean absolute difference ONNX Runtime vs PyTorch, per output."""

    model: str
    output: str
    max_abs: float
    mean_abs: float
    unit: str  # "uint8 levels" for images, "float" for embeddings and psi


@torch.no_grad()
def parity(graph: Graph, path: Path, inputs: dict[str, np.ndarray]) -> list[Parity]:
    """Run the same inputs through the PyTorch wrapper and the ONNX file; compare every output."""
    expected = graph.module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in inputs.values()))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = session(path).run(graph.outputs, inputs)
    result = []
    for name, want, have in zip(graph.outputs, expected, got, strict=True):
        diff = np.abs(want.numpy().astype(np.float64) - have.astype(np.float64))
        unit = "uint8 levels" if have.dtype == np.uint8 else "float"
        result.append(
            Parity(
                model=graph.name,
                output=name,
                max_abs=float(diff.max()),
                mean_abs=float(diff.mean()),
                unit=unit,
            )
        )
    return result


def latency_ms(
    path: Path, batch: int, *, repeats: int = 10, budget_s: float = 2.0, threads: int = 0
) -> float:
    """Median ONNX Runtime CPU latency of one call at `batch`, in milliseconds: `repeats` calls, or
    as many as fit in `budget_s` (at least 3), so a slow model on a slow machine costs the export
    seconds, not tens of them. It is the export report's sanity figure; `make bench` measures speed."""
    sess = session(path, threads=threads)
    feeds = {}
    for spec in sess.get_inputs():
        shape = [batch, *spec.shape[1:]]
        if spec.type == "tensor(uint8)":
            feeds[spec.name] = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        else:
            feeds[spec.name] = np.zeros(shape, np.float32)
    sess.run(None, feeds)  # warm-up: allocations and kernel selection
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
        started = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def describe(path: Path) -> dict[str, Any]:
    """Size, opset and tensor signature of an ONNX file, for the export report."""
    model = onnx.load(str(path), load_external_data=False)
    sig = lambda values: {  # noqa: E731
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values
    }
    return {
        "bytes": path.stat().st_size,
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "nodes": len(model.graph.node),
        "inputs": sig(model.graph.input),
        "outputs": sig(model.graph.output),
        "metadata": {p.key: p.value for p in model.metadata_props},
    }
