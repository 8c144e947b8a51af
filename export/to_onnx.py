"""Stage 1: checkpoint -> single-file ONNX models, with graph hygiene and a parity check.

    paths = export_checkpoint(checkpoint.load("models/talkinghead-small.pt"), Path("build/onnx"))
    # {'embedder': build/onnx/embedder.onnx, 'generator': build/onnx/generator.onnx}

A meta checkpoint gives `embedder` and `generator`; a personalised one gives `generator_<avatar>`.
Names, tensors and the `talkinghead.*` metadata (kind, image size, AdaIN size, drawing style, crop
scale, model id) are the contract in facekit/contract.py, which the service reads them by.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export import repository
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
TEMPLATE_AVATAR = "template"  # the made-up avatar of template_graph


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
    if avatar is not None and ckpt.get("avatar_created"):
        meta[contract.Meta.AVATAR_CREATED] = contract.avatar_stamp(float(ckpt["avatar_created"]))
    if avatar is not None and ckpt.get("avatar_store"):
        meta[contract.Meta.AVATAR_STORE] = str(ckpt["avatar_store"])
    if avatar is not None and ckpt.get("job"):
        meta[contract.Meta.JOB] = str(ckpt["job"])
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


def template_graph(ckpt: dict[str, Any]) -> Graph:
    """A personalised generator of a meta checkpoint: its G's weights and a made-up psi (seeded
    noise: no two values alike, since the exporter merges equal-valued constants and a graph with
    merged weights cannot take another's). Its export is the graph a worker's first job writes its
    avatar's generator from (Templates) instead of tracing its own."""
    if ckpt.get("kind") == contract.KIND_PERSONALISED:
        raise ValueError("a template is made from a meta checkpoint")
    _, gen, _ = checkpoint.build_networks(ckpt, with_discriminator=False)
    psi = 0.1 * torch.randn(1, gen.adain_size, generator=torch.Generator().manual_seed(0))
    personal = {
        "kind": contract.KIND_PERSONALISED,
        "avatar": TEMPLATE_AVATAR,
        "config": ckpt["config"],
        "step": int(ckpt.get("step", 0)),
        "base_model_id": checkpoint.fingerprint(ckpt),
        "generator": ckpt["generator"],
        "adain": psi,
    }
    (graph,) = graphs(personal)
    return graph


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


def export_graph(graph: Graph, path: Path, *, templates: Templates | None = None) -> Path:
    """Export one graph to a single self-contained ONNX file with a dynamic batch axis.

    A graph of the same structure as one this process exported before (another avatar's
    generator of the same base model, the same checkpoint again) is written from that export
    with this graph's weights put in: a fraction of a second instead of the exporter's 10-20 s,
    the same bytes a full export writes. Where that cannot be done, or its output does not match
    PyTorch's, the graph is exported in full. `templates`: where graphs are kept (default this
    process's `TEMPLATES`)."""
    kept = TEMPLATES if templates is None else templates
    started = time.monotonic()
    if kept.write(graph, path):
        log.info(
            "exported %s from an earlier export's graph in %.1f s", graph.name, time.monotonic() - started
        )
        return path
    _export_in_full(graph, path)
    kept.keep(graph, path)
    return path


def _export_in_full(graph: Graph, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph.module.eval()
    with torch.no_grad(), _exporter_notices_quiet():
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


@contextlib.contextmanager
def _exporter_notices_quiet() -> Iterator[None]:
    """The exporter's notices that say nothing about our graphs, off (each named, so any other
    warning still shows): torchvision's ops skipped (we use none), a deprecation inside torch's
    own pytree code, and that the inputs' shared `batch` axis is named once (it is meant to be
    shared: every input has the one batch dimension)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"# The axis name: batch will not be used", UserWarning)
            warnings.filterwarnings(
                "ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning
            )
            yield
    finally:
        registration.setLevel(level)


class Templates:
    """Exported graphs kept by structure, to write graphs of the same structure without tracing.

    The exporter's graph names every weight by its state-dict key, and every other constant it
    keeps (shapes, axes, ones and zeros of the norms) does not depend on the weights, so a graph
    whose module has the same classes, hyperparameters, weight shapes and inputs exports to the
    same graph with other weights. Its weights are put in by name (each initializer keeps its
    dims and type; a size or type that differs ends it), and the result is run against PyTorch
    on random inputs before it is written: a Python-level difference the structure key cannot
    see (a forward that branches on a plain attribute) fails that check and the graph is
    exported in full. So does a kept graph whose optimiser merged weights of equal value into one
    initializer (a freshly initialised model's ones and zeros: measured on random `smoke` models,
    14-28 levels off); the full export then replaces it. Trained weights have no such ties: written
    from a kept graph, the committed model's personalised generator and `smoke` generators with
    perturbed weights came out byte for byte as their full exports. The last `size` graphs are
    kept (a worker fine-tunes one base model; an export of a meta checkpoint makes three, its
    personalised template included)."""

    IMAGE_LEVELS = 2.0  # largest difference from PyTorch, uint8 outputs (a full export: <= 1)
    FLOAT_ABS = 1e-3  # float outputs (a full export: ~1e-6)

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._kept: dict[str, bytes] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(graph: Graph) -> str:
        digest = hashlib.sha256(repr(graph.module).encode())
        for name, tensor in [*graph.module.state_dict().items(), *graph.inputs.items()]:
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(repr(graph.outputs).encode())
        return digest.hexdigest()

    def has(self, graph: Graph) -> bool:
        with self._lock:
            return self.key(graph) in self._kept

    def keep(self, graph: Graph, path: Path) -> None:
        """Keep the ONNX file at `path` for graphs of `graph`'s structure: its own export, or a file
        believed to be of that structure (checked when used, by `write`)."""
        with self._lock:
            key = self.key(graph)
            self._kept.pop(key, None)
            self._kept[key] = path.read_bytes()
            while len(self._kept) > self.size:
                del self._kept[next(iter(self._kept))]

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()

    def write(self, graph: Graph, path: Path) -> bool:
        """Write `graph` to `path` from a kept graph of its structure; False where none fits."""
        with self._lock:
            template = self._kept.get(self.key(graph))
        if template is None:
            return False
        try:
            return self._write(graph, template, path)
        except Exception as error:  # whatever went wrong, the full export is the answer
            log.warning("%s from the kept graph failed (%s); exporting in full", graph.name, error)
            path.unlink(missing_ok=True)
            return False

    def _write(self, graph: Graph, template: bytes, path: Path) -> bool:
        model = onnx.load_from_string(template)
        state = {name: tensor.detach().cpu().numpy() for name, tensor in graph.module.state_dict().items()}
        for initializer in model.graph.initializer:
            weights = state.get(initializer.name)
            if weights is None:
                continue
            dims = tuple(initializer.dims)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type)
            if weights.size != int(np.prod(dims)) or weights.dtype != dtype:
                log.info(
                    "%s: %s does not fit the kept graph; exporting in full", graph.name, initializer.name
                )
                return False
            initializer.CopyFrom(
                onnx.numpy_helper.from_array(np.ascontiguousarray(weights).reshape(dims), initializer.name)
            )
        stamp(model, graph.metadata)
        onnx.checker.check_model(model, full_check=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
        rng = np.random.default_rng(0)
        feeds = {
            name: rng.integers(0, 256, tuple(example.shape), dtype=np.uint8)
            if example.dtype == torch.uint8
            else (0.1 * rng.standard_normal(tuple(example.shape))).astype(np.float32)
            for name, example in graph.inputs.items()
        }
        for figure in parity(graph, path, feeds):
            limit = self.IMAGE_LEVELS if figure.unit == "uint8 levels" else self.FLOAT_ABS
            if not figure.max_abs <= limit:  # NaN fails too
                log.warning(
                    "%s from the kept graph differs from PyTorch by %.3g on %s; exporting in full",
                    graph.name,
                    figure.max_abs,
                    figure.output,
                )
                path.unlink()
                return False
        return True


TEMPLATES = Templates()


def start_from(graph: Graph, repo: Path) -> Path | None:
    """Unless this process keeps a graph of `graph`'s structure already, keep the one `repo` holds
    (repository.personalised_like): a first export in a process is written, not traced. The file
    kept, or None."""
    if TEMPLATES.has(graph) or graph.metadata.get(contract.Meta.KIND) != contract.KIND_PERSONALISED:
        return None
    found = repository.personalised_like(repo, graph.name, graph.metadata[contract.Meta.MODEL_ID])
    if found is not None:
        TEMPLATES.keep(graph, found)
    return found


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
