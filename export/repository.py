"""Stage 3: ONNX files -> a Triton model repository, one description rendered per platform profile.

    write_model(Path("model_repository"), Path("build/onnx/generator.onnx"), profile="python")
    # model_repository/generator/config.pbtxt,
    # model_repository/generator/1/{model.onnx,model.py,talkinghead_cpus.py}

Profiles (the same tensors, batching and parameters; only the platform part differs):
  onnxruntime  platform onnxruntime_onnx, `1/model.onnx` (CPU, or GPU with --device gpu)
  tensorrt     platform tensorrt_plan, `1/model.onnx` kept beside the config for
               `python -m export.to_tensorrt`, which builds `1/model.plan` on the serving GPU
  python       backend python, `1/model.py` running `1/model.onnx` with onnxruntime: the
               Triton build bundled with nvidia-pytriton has only the python backend; beside it
               `1/talkinghead_cpus.py` (facekit/cpus.py, which model.py sizes its threads by:
               it runs in Triton's Python, without facekit)

Adding a model never edits a live version: it writes `<name>/<n+1>/` beside the old one in a
staging folder and renames it into place, so Triton in explicit model-control mode can load the
new version without a restart. Writes and removals stay inside the repository: it may be a
volume of its own (a rename across filesystems fails) under a read-only root. Torch-free: the
service image's tools and the Triton image use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from facekit import contract, cpus
from facekit.engines import AUTO_LANES

log = logging.getLogger("talkinghead.export")

PROFILES = ("onnxruntime", "tensorrt", "python")
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")
CPUS_FILE = "talkinghead_cpus.py"  # (export/triton_python_model.py CPUS_FILE)
CPUS_MODULE = Path(cpus.__file__)
KEEP_VERSIONS = 2  # versions kept per model: the new one and the one Triton may still be serving
STAGING, REMOVED = ".staging-", ".removed-"  # hidden folders of a write and a removal in flight
STALE_S = 600  # a removal's folder older than this was left by a killed process
_ONNX_TO_TRITON: dict[int, str] = {
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
}
# a model's folder: no path tricks (no "/", no leading "."), and the "." of a tenant's stored avatar
# id (generator_acme.mona: it was refused, so no avatar of a tenant but the default could be
# personalised or withdrawn)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")


@dataclass(frozen=True, kw_only=True)
class Tensor:
    name: str
    dtype: str  # Triton TYPE_*
    dims: tuple[int, ...]  # without the batch axis


@dataclass(frozen=True, kw_only=True)
class Batching:
    """Triton dynamic batching. Measured on 2 CPU cores (README, export report): the generator's
    cost per frame is flat from batch 1 to 16 on CPU, so CPU profiles neither wait for a batch
    nor merge queued requests (preferred batch 1: a request waiting for an instance runs alone
    when one frees); GPU profiles wait up to 1 ms for fuller batches."""

    preferred: tuple[int, ...]
    max_queue_delay_us: int


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything config.pbtxt says about one model, read from its ONNX file."""

    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    parameters: dict[str, str] = field(default_factory=dict)
    max_batch_size: int = 16
    batching: Batching | None = None
    warmup: tuple[int, ...] = ()  # batch sizes Triton runs once, on zeros, before the model is ready
    instances: int = 1  # of the model on Triton (instance_group count)

    @property
    def kind(self) -> str:
        return self.parameters.get(contract.Meta.KIND, "")


def _tensors(values: list[onnx.ValueInfoProto]) -> tuple[Tensor, ...]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = tuple(d.dim_value for d in t.shape.dim[1:])
        if any(d <= 0 for d in dims):
            raise ValueError(f"{v.name}: only the batch axis may be dynamic, got {list(t.shape.dim)}")
        out.append(Tensor(name=v.name, dtype=_ONNX_TO_TRITON[t.elem_type], dims=dims))
    return tuple(out)


def spec_of(onnx_path: Path, *, name: str | None = None, profile: str = "python") -> ModelSpec:
    """Describe an exported model; batching policy by kind (the embedder runs once per avatar)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    params = {p.key: p.value for p in model.metadata_props if p.key.startswith(contract.Meta.PREFIX)}
    kind = params.get(contract.Meta.KIND, "")
    name = name or contract.model_name(params)
    if not name or not _NAME.match(name):
        raise ValueError(f"{onnx_path}: cannot name the model (kind {kind!r}); pass a valid name")
    gpu = profile == "tensorrt"
    if kind == contract.KIND_EMBEDDER:  # K photos of one avatar in one call, no queueing
        max_batch, batching = 32, None
        warmup: tuple[int, ...] = (1,)
    else:
        max_batch = 16
        gpu_batching = Batching(preferred=(4, 8, 16), max_queue_delay_us=1000)
        # CPU: merged, two one-frame calls queued for an instance run as one of two frames, twice
        # as long, and the service (which sends a call per instance and one more, queued here)
        # sees both calls take that long: under 16 live + 1 offline streams through Triton, 9 %
        # of executions were merged, calls took 36 ms on average for 30 ms of an instance's
        # time, and the capacity admission holds fell from 65 to 53 frames/s (one live stream
        # admitted where two fit). One request per execution: 34 ms, 58 frames/s (BENCHMARKS.md).
        cpu_batching = Batching(preferred=(1,), max_queue_delay_us=0)
        batching = gpu_batching if gpu else cpu_batching
        warmup = tuple(sorted({1, *batching.preferred}))
    if name != kind:  # a personalised generator: see _warmup_block
        warmup = ()
    # Generators on the python profile (CPU): instances of one share of the cores each, the
    # embedded engines' lanes (facekit/engines.py), and the service keeps a call in flight per
    # instance (TritonBackend.lanes). On 2 cores, against one instance splitting every operator
    # over both: 44-47 against 38.7 frames/s, and a fine-tuning job beside a live stream 20-21
    # against 6 steps in 15 s, for a lone call of 43 against 26 ms (README, BENCHMARKS.md).
    instances = AUTO_LANES if profile == "python" and kind != contract.KIND_EMBEDDER else 1
    return ModelSpec(
        name=name,
        inputs=_tensors(list(model.graph.input)),
        outputs=_tensors(list(model.graph.output)),
        parameters=params,
        max_batch_size=max_batch,
        batching=batching,
        warmup=warmup,
        instances=instances,
    )


def _tensor_block(kind: str, tensors: tuple[Tensor, ...]) -> list[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(tensors):
        dims = ", ".join(map(str, t.dims))
        sep = "," if i < len(tensors) - 1 else ""
        lines.append(f'  {{ name: "{t.name}" data_type: {t.dtype} dims: [ {dims} ] }}{sep}')
    return [*lines, "]"]


def _warmup_block(spec: ModelSpec) -> list[str]:
    """model_warmup: Triton runs each batch size once on zeros before it reports the model ready,
    so the first real request (after a start, a reload, a personalised generator's load) does not
    pay for the engine's first-call set-up. Measured with the python profile on 2 CPU cores: the
    generator's first call 55-63 ms against 25-29 warm without it, 32-41 ms with it.
    The shared models only: a warm-up counts as a call in Triton's statistics (last_inference),
    and personalised generators are unloaded by when they were last called
    (contract.idle_personalised), so a warmed one just loaded would count as in use and hold its
    memory past the limit."""
    if not spec.warmup:
        return []
    lines = ["model_warmup ["]
    for i, batch in enumerate(spec.warmup):
        lines += ["  {", f'    name: "zeros, batch {batch}"', f"    batch_size: {batch}"]
        for t in spec.inputs:
            dims = ", ".join(map(str, t.dims))
            value = f"data_type: {t.dtype} dims: [ {dims} ] zero_data: true"
            lines.append(f'    inputs {{ key: "{t.name}" value: {{ {value} }} }}')
        lines.append("  }," if i < len(spec.warmup) - 1 else "  }")
    return [*lines, "]"]


def config_text(spec: ModelSpec, profile: str, *, device: str = "cpu") -> str:
    """config.pbtxt for one profile: minimal (no name: Triton takes the directory's)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    platform = {
        "onnxruntime": 'platform: "onnxruntime_onnx"',
        "tensorrt": 'platform: "tensorrt_plan"',
        "python": 'backend: "python"',
    }[profile]
    kind = "KIND_GPU" if profile == "tensorrt" or device == "gpu" else "KIND_CPU"
    lines = [
        f"# Generated by `talkinghead export` ({profile} profile); edits are overwritten.",
        platform,
        f"max_batch_size: {spec.max_batch_size}",
        *_tensor_block("input", spec.inputs),
        *_tensor_block("output", spec.outputs),
        f"instance_group [ {{ count: {spec.instances} kind: {kind} }} ]",
    ]
    if spec.batching is not None:
        preferred = ", ".join(map(str, spec.batching.preferred))
        lines.append("dynamic_batching {")
        if preferred:
            lines.append(f"  preferred_batch_size: [ {preferred} ]")
        lines.append(f"  max_queue_delay_microseconds: {spec.batching.max_queue_delay_us}")
        # live frames' calls before offline ones queued with them (contract.TRITON_PRIORITY_*)
        lines += [
            f"  priority_levels: {contract.TRITON_PRIORITY_OFFLINE}",
            f"  default_priority_level: {contract.TRITON_PRIORITY_OFFLINE}",
            "}",
        ]
    lines += _warmup_block(spec)
    for key, value in sorted(spec.parameters.items()):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{escaped}" }} }}')
    return "\n".join(lines) + "\n"


# Beside the shared generator's model.onnx: a personalised generator of the same base model, its
# psi made up. No Triton or service reads it; a worker's first job writes its avatar's generator
# from this graph instead of tracing one (export/to_onnx.py Templates, worker/models.py).
TEMPLATE_FILE = "personalised-template.onnx"
SEED_TRIES = 8  # published generators personalised_like reads (most are of the served base model)


def python_files() -> dict[str, Path]:
    """The python profile's files in every version folder: name -> this release's source. The
    helper before the runner that loads it: write_config refreshes them in this order, so a model
    loaded between the two writes finds its helper."""
    return {CPUS_FILE: CPUS_MODULE, "model.py": PYTHON_MODEL}


def versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


# Triton reads the repository as another user than the one writing it (the chart: the worker is
# 10001, Triton 1000), so what is written is readable by all, not tempfile's private 0700 / 0600.
DIR_MODE, FILE_MODE = 0o755, 0o644


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_model(
    repository: Path,
    onnx_path: Path,
    *,
    profile: str = "python",
    device: str = "cpu",
    name: str | None = None,
) -> Path:
    """Add `onnx_path` to the repository as `<name>/<latest+1>/` (a live repository: Triton can
    load it while the old version serves); returns the version directory written. Where it fails
    (a full disk) the repository is left as it was."""
    spec = spec_of(onnx_path, name=name, profile=profile)
    model_dir = repository / spec.name
    existing = versions(model_dir)
    version = existing[-1] + 1 if existing else 1
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    # Staged inside the model's own folder: on the repository's filesystem (a volume of its own
    # in Kubernetes, under a read-only root), and not a version (not a number). One writer per
    # model at a time (one job per avatar): a staging folder found here was left by a killed one.
    for left in model_dir.glob(f"{STAGING}*"):
        shutil.rmtree(left, ignore_errors=True)
    target = model_dir / str(version)
    try:
        staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=STAGING))
        staging.chmod(DIR_MODE)
        try:
            shutil.copyfile(onnx_path, staging / "model.onnx")
            if profile == "python":
                for name, source in python_files().items():
                    shutil.copyfile(source, staging / name)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _write_atomic(model_dir / "config.pbtxt", config_text(spec, profile, device=device))
    except BaseException:  # a full disk, say: leave the repository as it was
        shutil.rmtree(model_dir if created else target, ignore_errors=True)
        raise
    for old in versions(model_dir)[:-KEEP_VERSIONS]:
        shutil.rmtree(model_dir / str(old))
    return target


def write_config(repository: Path, onnx_path: Path, *, profile: str = "python", device: str = "cpu") -> Path:
    """Rewrite the config of a model whose latest version already holds `onnx_path`'s bytes, and
    with the python profile its runner (`model.py`) and the runner's CPU helper where this
    release's differ: a runner fix reaches a repository whose weights did not change (Triton runs
    it from the model's next load). Returns that version directory."""
    spec = spec_of(onnx_path, profile=profile)
    model_dir = repository / spec.name
    _write_atomic(model_dir / "config.pbtxt", config_text(spec, profile, device=device))
    latest = model_dir / str(versions(model_dir)[-1])
    with contextlib.suppress(PermissionError):  # (an older release's 0700; another's folder)
        latest.chmod(DIR_MODE)
    if profile == "python":
        _refresh_python_files(latest, _python_texts())
    return latest


def _python_texts() -> dict[str, str]:
    return {name: source.read_text() for name, source in python_files().items()}


def _refresh_python_files(version_dir: Path, texts: dict[str, str]) -> bool:
    """Write `texts` (this release's runner and helper, _python_texts) into `version_dir` where
    they differ, in python_files' order; whether any did."""
    changed = False
    for name, current in texts.items():
        target = version_dir / name
        if not target.is_file() or target.read_text() != current:
            _write_atomic(target, current)
            changed = True
    return changed


def refresh_runners(repository: Path) -> list[Path]:
    """This release's runner (`model.py`) and its CPU helper in the latest version of every model
    the python profile serves (those with a `model.py`), personalised generators included, which
    write_config reaches only when their avatar is personalised again: a runner fix reaches every
    avatar from its generator's next load. The version folders rewritten; one this process may not
    write is left as it is."""
    refreshed: list[Path] = []
    texts = _python_texts()
    for model_dir in sorted(repository.iterdir()) if repository.is_dir() else []:
        found = [] if model_dir.name.startswith(".") else versions(model_dir)
        latest = model_dir / str(found[-1]) if found else None
        if latest is None or not (latest / "model.py").is_file():
            continue
        with contextlib.suppress(OSError):
            if _refresh_python_files(latest, texts):
                refreshed.append(latest)
    return refreshed


def remove_model(repository: Path, name: str) -> bool:
    """Delete `<repository>/<name>/`; False if it was not there. Unload it from Triton first."""
    hidden = hide_model(repository, name)
    if hidden is None:
        return False
    shutil.rmtree(hidden)
    return True


def hide_model(repository: Path, name: str) -> Path | None:
    """Take `<repository>/<name>/` out of the repository in one rename, into a hidden folder the
    caller deletes (or the next removal sweeps): no Triton can load it from then on, while one that
    has it loaded still runs it until unloaded. None if it was not there."""
    if not _NAME.match(name):
        raise ValueError(f"invalid model name {name!r}")
    model_dir = repository / name
    if not model_dir.is_dir():
        return None
    # one rename, within the repository's filesystem: readers never see a half-deleted model (a
    # hidden folder is no model to `models`); one a killed removal left goes now (not one another
    # worker's removal holds: those last milliseconds)
    for left in repository.glob(f"{REMOVED}*"):
        with contextlib.suppress(OSError):  # gone meanwhile: another removal ended
            if time.time() - left.stat().st_mtime > STALE_S:
                shutil.rmtree(left, ignore_errors=True)
    trash = Path(tempfile.mkdtemp(dir=repository, prefix=REMOVED))
    os.replace(model_dir, trash / name)
    return trash


def remove_version(version_dir: Path) -> None:
    """Delete one version of a model (`<repository>/<name>/<version>/`) in one rename: the one
    before it is the latest again. Unload it from Triton first, or load the model again after."""
    if not version_dir.name.isdigit():
        raise ValueError(f"{version_dir} is not a model version")
    trash = Path(tempfile.mkdtemp(dir=version_dir.parent, prefix=STAGING))  # swept by the next write
    os.replace(version_dir, trash / version_dir.name)
    shutil.rmtree(trash)


def models(repository: Path) -> list[str]:
    """Names of the models in a repository (directories holding a config.pbtxt)."""
    if not repository.is_dir():
        return []
    return sorted(
        p.name for p in repository.iterdir() if not p.name.startswith(".") and (p / "config.pbtxt").is_file()
    )


def personalised_like(repository: Path, name: str, model_id: str, *, tries: int = SEED_TRIES) -> Path | None:
    """A generator in `repository` personalised from base model `model_id`: a graph the export of
    `name` (generator_<avatar>) can be written from instead of traced (export/to_onnx.py
    Templates; its check against PyTorch has the last word). That avatar's own published one
    first, then other avatars' (at most `tries` files read), then TEMPLATE_FILE beside the shared
    generator."""
    names = sorted(
        (n for n in models(repository) if n.startswith(contract.PERSONALISED_PREFIX)),
        key=lambda n: n != name,
    )
    paths = [contract.latest_version(repository / n) for n in names[:tries]]
    paths.append(contract.latest_version(repository / contract.GENERATOR, TEMPLATE_FILE))
    for path in paths:
        if path is None:
            continue
        try:
            meta = spec_of(path).parameters
        except Exception as error:  # a half-written or foreign file: not a template
            log.warning("cannot read %s: %s", path, error)
            continue
        if (
            meta.get(contract.Meta.KIND) == contract.KIND_PERSONALISED
            and meta.get(contract.Meta.MODEL_ID) == model_id
        ):
            return path
    return None
