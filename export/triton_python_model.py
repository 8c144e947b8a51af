"""Triton python-backend model: runs the `model.onnx` beside it on the fastest CPU engine allowed.

Copied as `<model>/<version>/model.py` by the `python` profile of `talkinghead export`. It stands
in for the onnxruntime_onnx / tensorrt_plan platforms where Triton has only the python backend
(the server bundled with nvidia-pytriton). Requests that Triton's dynamic batcher hands over
together run as one call, concatenated along the batch axis and split afterwards.

Engines: the embedded backend's (facekit/engines.py, which this file cannot import: it is copied
alone), chosen once per instance and logged. The embedder runs on ONNX Runtime (once per avatar).
A generator runs on TALKINGHEAD_ENGINE where Triton's environment sets it (`onnxruntime`,
`openvino` or `openvino-bf16`), else (`auto`) on the first of these this instance may use:
- `openvino-bf16` where the CPU computes bf16 natively (AMX or AVX-512 BF16) and the verdict beside
  the model (`engines.json`, written by `talkinghead evaluate --verdict`) passed it for this model
  id on the full evaluation protocol: a personalised generator has none, so it runs exact;
- `openvino` (fp32) where OpenVINO is installed;
- `onnxruntime`.
That is the order in which the embedded backend's timing ranked them on every CPU measured (no-AMX
Intel, AMX Intel, AMD Zen 4; BENCHMARKS.md); an instance does not time them itself, as its
neighbour instances load (and time) at the same moment on the same cores.

Each instance (a stub process of its own) runs on its share of the CPUs this process may use:
the usable CPUs over the config's instance count (the generator runs in two on the CPU profile,
a thread each on 2 cores), or TALKINGHEAD_ORT_THREADS (either engine). The usable CPUs are the
least of the affinity and the cgroup's CPU quota (a pod's limits.cpu): a Triton pod with
`limits.cpu: 2` on a 64-core node has an affinity of 64, and sized by it each instance ran 32
threads in a quota of 2, throttled for the rest of every 100 ms period. They come from
facekit/cpus.py, which export/repository.py copies beside this file as `talkinghead_cpus.py`
(this file cannot import facekit), loaded by its path at model load; the count and what bounded
it are logged. OpenVINO runs static shapes, compiled for batches of 4, 2 and 1 at load (a dynamic
batch axis ran 1.3-1.5x slower; a batch of 7 runs as 4 + 2 + 1), as the embedded backend does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

ENGINE_ENV, THREADS_ENV = "TALKINGHEAD_ENGINE", "TALKINGHEAD_ORT_THREADS"
ONNXRUNTIME, OPENVINO, OPENVINO_BF16 = "onnxruntime", "openvino", "openvino-bf16"
ENGINES = (ONNXRUNTIME, OPENVINO, OPENVINO_BF16)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # (facekit/engines.py BF16_FLAGS)
VERDICT_FILE = "engines.json"
CHUNKS = (4, 2, 1)  # OpenVINO's static batch sizes (facekit/engines.py OpenVinoEngine.CHUNKS)
CPUS_FILE = "talkinghead_cpus.py"  # facekit/cpus.py beside this file (export/repository.py CPUS_FILE)
# The cgroup tree the helper reads; None: its own defaults (/sys/fs/cgroup, /proc/self/cgroup).
CGROUP_ROOT: Path | None = None
PROC_CGROUP: Path | None = None


def bf16_native(cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo) as text:
            flags = next((line.split(":", 1)[1].split() for line in text if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in BF16_FLAGS)


def verdict_passed(version_dir: str, model_id: str, engine: str) -> bool:
    """Whether `engines.json` in `version_dir` passed `engine` for `model_id` on the full evaluation
    protocol (False without one, and for a reduced run's or one that does not say: as
    facekit/engines.py passed_engines)."""
    try:
        with open(os.path.join(version_dir, VERDICT_FILE)) as file:
            verdict = json.load(file)["engines"][engine]
        return (
            verdict.get("passed") is True
            and verdict.get("full_protocol") is True
            and verdict.get("model_id") == model_id
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def choose_engine(config: Mapping, version_dir: str, requested: str) -> str:
    """The engine this instance runs (see the module's docstring): ValueError for an unknown one."""
    parameters = config.get("parameters") or {}
    kind = (parameters.get("talkinghead.kind") or {}).get("string_value", "")
    if kind == "embedder":
        return ONNXRUNTIME
    if requested not in ("", "auto", *ENGINES):
        raise ValueError(f"{ENGINE_ENV}={requested!r}: one of auto, {', '.join(ENGINES)}")
    if requested not in ("", "auto"):
        return requested
    if not openvino_installed():
        return ONNXRUNTIME
    model_id = (parameters.get("talkinghead.model_id") or {}).get("string_value", "")
    if bf16_native() and verdict_passed(version_dir, model_id, OPENVINO_BF16):
        return OPENVINO_BF16
    return OPENVINO


def load_cpus(version_dir: str) -> ModuleType:
    """facekit/cpus.py as export/repository.py copied it into `version_dir`, loaded by its path:
    the stub put that folder on sys.path after site-packages and the working directory in the
    Triton measured, where a module of the same name would shadow it, and that is the stub's to
    change. A folder without it (a model.py copied by hand) fails to load, saying so, rather than
    running as many threads as the node has cores."""
    path = os.path.join(version_dir, CPUS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: model.py sizes its threads by it; write the repository with "
            "`talkinghead export` (export/repository.py copies it beside model.py)"
        )
    spec = importlib.util.spec_from_file_location("talkinghead_cpus", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def instance_threads(config: Mapping, version_dir: str, requested: str) -> tuple[int, str]:
    """This instance's engine threads (see the module's docstring), and what decided them."""
    instances = max(1, sum(int(group.get("count", 1)) for group in config.get("instance_group", [])))
    found: Any = load_cpus(version_dir).cpus(CGROUP_ROOT, PROC_CGROUP)
    if int(requested or 0) > 0:
        return int(requested), f"{THREADS_ENV}={requested} ({found.describe()})"
    return max(1, found.usable // instances), f"{instances} instance(s) sharing {found.describe()}"


class OnnxRuntimeRunner:
    def __init__(self, path: str, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Denormal floats flushed to zero: the generator on real faces ran 3x slower without
        # (facekit/engines.py DENORMALS).
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(outputs, feeds))


class OpenVinoRunner:
    """One infer request per static batch size: a python-backend instance runs one call at a time."""

    def __init__(self, path: str, threads: int, precision: str) -> None:
        import openvino

        core = openvino.Core()
        model = core.read_model(path)
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,  # the instances and Triton's own threads share the cores
            "CPU_DENORMALS_OPTIMIZATION": True,  # (facekit/engines.py DENORMALS)
        }
        self.requests = {}
        for size in CHUNKS:
            shaped = model.clone()
            shaped.reshape(
                {p.get_any_name(): [size, *list(p.get_partial_shape())[1:]] for p in shaped.inputs}
            )
            self.requests[size] = core.compile_model(shaped, "CPU", config).create_infer_request()

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch, start, parts = len(next(iter(feeds.values()))), 0, []
        while start < batch:
            size = next(c for c in CHUNKS if c <= batch - start)
            request = self.requests[size]
            for name, value in feeds.items():
                request.get_tensor(name).data[...] = value[start : start + size]
            request.infer()
            # copies: the request's buffers are overwritten by its next call
            parts.append([np.array(request.get_tensor(name).data) for name in outputs])
            start += size
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([part[i] for part in parts]) for i in range(len(outputs))]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        path = os.path.join(version_dir, "model.onnx")
        threads, why = instance_threads(config, version_dir, os.environ.get(THREADS_ENV, "").strip())
        self.engine = choose_engine(config, version_dir, os.environ.get(ENGINE_ENV, "auto").strip())
        started = time.monotonic()
        if self.engine == ONNXRUNTIME:
            self.runner: OnnxRuntimeRunner | OpenVinoRunner = OnnxRuntimeRunner(path, threads)
        else:
            self.runner = OpenVinoRunner(path, threads, "bf16" if self.engine == OPENVINO_BF16 else "f32")
        pb_utils.Logger.log_info(
            f"{args.get('model_instance_name', args.get('model_name', 'model'))}: {self.engine} on "
            f"{threads} thread(s), ready in {time.monotonic() - started:.1f} s; threads: {why}"
        )
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests: list) -> list:
        feeds: dict[str, list[np.ndarray]] = {name: [] for name in self.inputs}
        sizes = []
        for request in requests:
            for name in self.inputs:
                feeds[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(len(feeds[self.inputs[0]][-1]))
        try:
            merged = {name: np.concatenate(parts) for name, parts in feeds.items()}
            results = self.runner.run(self.outputs, merged)
        except Exception as err:
            error = pb_utils.TritonError(f"{self.engine}: {err}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[start : start + size]))
                for name, out in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self) -> None:
        self.runner = None  # type: ignore[assignment]
