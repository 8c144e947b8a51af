"""Export: the ONNX contract, parity with PyTorch, the repository layout and its profiles."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export import repository, to_onnx, to_tensorrt
from facekit import contract, cpus, engines
from tests.conftest import quick_latency

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "models" / "talkinghead-small.pt"
CPUS_SOURCE = (ROOT / "facekit" / "cpus.py").read_text()  # the runner's CPU helper, one source


def signature(path: Path) -> dict[str, tuple[str, list[Any]]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {v.name: (v.type, v.shape) for v in [*sess.get_inputs(), *sess.get_outputs()]}


def generator_info(repo: Path) -> contract.ModelInfo:
    path = repo / "generator/1/model.onnx"
    meta = dict(ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map)
    return contract.ModelInfo.from_metadata(meta, where=str(path))


def test_contract_names_types_and_dynamic_batch(exported: tuple[Path, dict]) -> None:
    repo, _ = exported
    emb = signature(repo / "embedder/1/model.onnx")
    gen = signature(repo / "generator/1/model.onnx")
    warp_guided = generator_info(repo).warp_guided  # the shipped G takes the warped reference
    assert emb == {
        "image": ("tensor(uint8)", ["batch", 128, 128, 3]),
        "landmark_image": ("tensor(uint8)", ["batch", 128, 128, 3]),
        "embedding": ("tensor(float)", ["batch", 512]),
        "adain": ("tensor(float)", ["batch", 2240]),
    }
    frame = ("tensor(uint8)", ["batch", 128, 128, 3])
    assert gen == {
        "landmark_image": frame,
        "adain": ("tensor(float)", ["batch", 2240]),
        **({"warped": frame} if warp_guided else {}),
        "image": frame,
    }
    sess = ort.InferenceSession(str(repo / "generator/1/model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        feeds = {
            "landmark_image": np.zeros((batch, 128, 128, 3), np.uint8),
            "adain": np.zeros((batch, 2240), np.float32),
        }
        if warp_guided:
            feeds["warped"] = np.zeros((batch, 128, 128, 3), np.uint8)
        out = sess.run(None, feeds)[0]
        assert out.shape == (batch, 128, 128, 3) and out.dtype == np.uint8


def test_exported_files_keep_the_contract(exported: tuple[Path, dict]) -> None:
    """Names, dtypes and shapes of every exported model are facekit.contract's; its metadata parses."""
    repo, _ = exported
    dtypes = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}
    for name in (contract.EMBEDDER, contract.GENERATOR):
        path = repo / name / "1/model.onnx"
        meta = dict(ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map)
        info = contract.ModelInfo.from_metadata(meta, where=str(path))
        assert contract.model_name(meta) == name
        sig = info.signature(meta[contract.Meta.KIND])
        sizes = {"image_size": info.image_size, "adain_size": info.adain_size}
        want = {t.name: (dtypes[t.dtype], ["batch", *t.dims(**sizes)]) for t in (*sig.inputs, *sig.outputs)}
        assert signature(path) == want
        assert set(meta) <= set(contract.Meta.KEYS)


def test_single_file_with_metadata(exported: tuple[Path, dict]) -> None:
    repo, report = exported
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()) == [
        "embedder/1/model.onnx",
        "embedder/1/model.py",
        "embedder/1/talkinghead_cpus.py",  # facekit/cpus.py, which model.py sizes its threads by
        "embedder/config.pbtxt",
        "generator/1/engines.json",  # the checkpoint's engine verdict, beside the generator
        "generator/1/model.onnx",
        "generator/1/model.py",
        "generator/1/talkinghead_cpus.py",
        "generator/config.pbtxt",
    ], "no external data files next to the models"
    meta = report["models"]["generator"]["metadata"]
    assert 3.0 < float(meta["talkinghead.gflops_per_frame"]) < 5.0  # the shipped generator: 3.85
    assert meta["talkinghead.kind"] == "generator"
    assert meta["talkinghead.image_size"] == "128" and meta["talkinghead.adain_size"] == "2240"
    assert json.loads(meta["talkinghead.draw_style"]) == {"antialias": True, "line_width": 1}
    assert report["models"]["embedder"]["metadata"]["talkinghead.model_id"] == meta["talkinghead.model_id"]
    assert report["models"]["generator"]["opset"] == to_onnx.OPSET


def test_parity_with_pytorch_on_real_frames(
    exported: tuple[Path, dict], capsys: pytest.CaptureFixture
) -> None:
    _, report = exported
    figures = {f"{p['model']}.{p['output']}": p for m in report["models"].values() for p in m["parity"]}
    with capsys.disabled():
        print()
        for name, p in figures.items():
            print(f"  parity {name}: max {p['max_abs']:.3g}, mean {p['mean_abs']:.3g} {p['unit']}")
        for name, m in report["models"].items():
            print(f"  {name}: {m['bytes'] / 1e6:.1f} MB, opset {m['opset']}, ORT CPU {m['latency_ms']} ms")
    assert figures["embedder.embedding"]["max_abs"] < 1e-3
    assert figures["embedder.adain"]["max_abs"] < 1e-3
    # uint8 frames: rounding may flip a level where PyTorch and ORT differ in the last float bit
    assert figures["generator.image"]["max_abs"] <= 2
    assert figures["generator.image"]["mean_abs"] < 0.01


def personalised_inputs(ckpt: dict) -> list[str]:
    from training import checkpoint

    warp_guided = checkpoint.config_of(ckpt).model.warp_guided
    return [contract.LANDMARK_IMAGE, *([contract.WARPED] if warp_guided else [])]


@pytest.mark.parametrize("profile", repository.PROFILES)
def test_configs_parse_as_triton_model_configs(exported: tuple[Path, dict], profile: str) -> None:
    repo, _ = exported
    for name in ("embedder", "generator"):
        spec = repository.spec_of(repo / name / "1/model.onnx", profile=profile)
        cfg = text_format.Parse(repository.config_text(spec, profile), model_config_pb2.ModelConfig())
        assert cfg.name == ""  # Triton takes the directory name
        assert [i.name for i in cfg.input] == [t.name for t in spec.inputs]
        assert cfg.parameters["talkinghead.kind"].string_value == name
        expected = {
            "onnxruntime": ("onnxruntime_onnx", ""),
            "tensorrt": ("tensorrt_plan", ""),
            "python": ("", "python"),
        }[profile]
        assert (cfg.platform, cfg.backend) == expected
        if name == "embedder":
            assert cfg.max_batch_size == 32 and not cfg.HasField("dynamic_batching")
        else:
            assert cfg.max_batch_size == 16 and cfg.HasField("dynamic_batching")
            # a live frame's call before offline ones queued with it (TritonBackend's priority)
            queue = cfg.dynamic_batching
            assert queue.priority_levels == contract.TRITON_PRIORITY_OFFLINE
            assert queue.default_priority_level == contract.TRITON_PRIORITY_OFFLINE
            assert 1 <= contract.TRITON_PRIORITY_LIVE < contract.TRITON_PRIORITY_OFFLINE
            # on CPU a queued request runs alone (two merged one-frame calls both take two
            # frames' time); a GPU waits for fuller batches, cheaper per frame there
            preferred = list(queue.preferred_batch_size)
            assert preferred == ([4, 8, 16] if profile == "tensorrt" else [1])
            assert queue.max_queue_delay_microseconds == (1000 if profile == "tensorrt" else 0)
        if profile == "tensorrt":
            assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        # the CPU profile's generator in instances of a share of the cores each, the embedder
        # (once per avatar, all the cores for its one call) and the other profiles' in one
        cpu_lanes = profile == "python" and name == "generator"
        assert [g.count for g in cfg.instance_group] == [engines.AUTO_LANES if cpu_lanes else 1]
        # warmed up before Triton calls it ready: every input, zeros, at batch 1 and the sizes
        # the dynamic batcher prefers
        want = sorted({1, *cfg.dynamic_batching.preferred_batch_size})
        assert [w.batch_size for w in cfg.model_warmup] == want
        for sample in cfg.model_warmup:
            assert sorted(sample.inputs) == sorted(t.name for t in spec.inputs)
            for t in spec.inputs:
                assert list(sample.inputs[t.name].dims) == list(t.dims)
                assert sample.inputs[t.name].zero_data
    # a personalised generator is not: the warm-up would count as a call, and those are unloaded
    # by when they were last called
    spec = repository.spec_of(repo / "generator/1/model.onnx", name="generator_alice", profile=profile)
    cfg = text_format.Parse(repository.config_text(spec, profile), model_config_pb2.ModelConfig())
    assert not cfg.model_warmup
    assert [g.count for g in cfg.instance_group] == [engines.AUTO_LANES if profile == "python" else 1]


def python_runner(monkeypatch: pytest.MonkeyPatch) -> Any:
    """export/triton_python_model.py loaded as Triton's stub loads it, its utils module stubbed
    (a Logger that keeps what it is told)."""
    import importlib.util
    import sys
    import types

    utils = types.ModuleType("triton_python_backend_utils")
    utils.logged = []  # type: ignore[attr-defined]
    utils.Logger = types.SimpleNamespace(log_info=utils.logged.append)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    spec = importlib.util.spec_from_file_location("triton_model", repository.PYTHON_MODEL)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.parametrize(
    ("instances", "env", "threads", "engine"),
    [
        (2, "", None, "onnxruntime"),
        (1, "", None, "onnxruntime"),
        (2, "3", 3, "onnxruntime"),
        (2, "", None, "openvino"),
    ],
)
def test_the_python_model_runs_each_instance_on_its_share_of_the_cores(
    exported: tuple[Path, dict],
    monkeypatch: pytest.MonkeyPatch,
    instances: int,
    env: str,
    threads: int | None,
    engine: str,
) -> None:
    """Triton's python runner (export/triton_python_model.py) sizes its engine's threads from
    the instance count in the config Triton hands it: two instances on 2 cores, a thread each (one
    on all the cores split every operator, and any neighbour stalled the split); one, all the
    cores; TALKINGHEAD_ORT_THREADS overrides. It says which engine on how many threads."""
    repo, _ = exported
    runner = python_runner(monkeypatch)
    monkeypatch.setenv("TALKINGHEAD_ORT_THREADS", env)
    monkeypatch.setenv("TALKINGHEAD_ENGINE", engine)
    cores = cpus.usable_cpus()
    config = {
        "input": [{"name": "landmark_image"}],
        "output": [{"name": "image"}],
        "instance_group": [{"name": "generator_0", "count": instances, "kind": "KIND_CPU"}],
    }
    model = runner.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(repo / "generator"),
            "model_version": "1",
            "model_instance_name": "generator_0_0",
        }
    )
    expected = threads or max(1, cores // instances)
    if engine == "onnxruntime":
        assert model.runner.session.get_session_options().intra_op_num_threads == expected
    else:
        compiled = model.runner.requests[1].get_compiled_model()
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == expected
    assert runner.pb_utils.logged[0].startswith(f"generator_0_0: {engine} on {expected} thread(s)")


def initialize_generator(runner: Any, version: Path, instances: int) -> Any:
    """The runner's model for the generator in `version`, initialised as Triton does (CPU instances)."""
    config = {
        "input": [{"name": "landmark_image"}],
        "output": [{"name": "image"}],
        "instance_group": [{"name": "generator_0", "count": instances, "kind": "KIND_CPU"}],
    }
    model = runner.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(version.parent),
            "model_version": version.name,
            "model_instance_name": "generator_0_0",
        }
    )
    return model


@pytest.mark.parametrize(
    ("instances", "limits", "node_cpus", "env", "threads", "bound"),
    [
        # limits.cpu 2 on a 64-core node: 32 threads an instance before, throttled in a quota of 2
        (2, {"/kubepods/pod1/ctr": "200000 100000"}, 64, "", 1, "bounded by the cgroup quota"),
        (1, {"/kubepods/pod1/ctr": "150000 100000"}, 64, "", 2, "bounded by the cgroup quota"),
        (2, {"/kubepods/pod1": "400000 100000", "/kubepods/pod1/ctr": "max 100000"}, 64, "", 2, "quota"),
        (2, {"/kubepods/pod1/ctr": "max 100000"}, 4, "", 2, "bounded by the affinity"),
        (2, {"/kubepods/pod1/ctr": "200000 100000"}, 64, "3", 3, "TALKINGHEAD_ORT_THREADS=3"),
    ],
)
def test_the_python_model_sizes_its_threads_by_the_pods_cpu_quota_not_the_nodes_cores(
    exported: tuple[Path, dict],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    instances: int,
    limits: dict[str, str],
    node_cpus: int,
    env: str,
    threads: int,
    bound: str,
) -> None:
    """In a pod with limits.cpu 2 on a 64-core node the runner's affinity is 64 CPUs: each
    instance's share is of the cgroup's CPU quota (facekit/cpus.py, copied beside model.py), not
    of the affinity, and the log says what bounded it."""
    from tests.test_cpus import v2_tree

    version = repository.write_model(tmp_path / "repo", exported[0] / "generator/1/model.onnx")
    runner = python_runner(monkeypatch)
    root, proc = v2_tree(tmp_path, limits)
    monkeypatch.setattr(runner, "CGROUP_ROOT", root)
    monkeypatch.setattr(runner, "PROC_CGROUP", proc)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(node_cpus)))
    monkeypatch.setenv("TALKINGHEAD_ORT_THREADS", env)
    monkeypatch.setenv("TALKINGHEAD_ENGINE", "onnxruntime")
    model = initialize_generator(runner, version, instances)
    assert model.runner.session.get_session_options().intra_op_num_threads == threads
    (line,) = runner.pb_utils.logged
    assert line.startswith(f"generator_0_0: onnxruntime on {threads} thread(s), ready in "), line
    assert bound in line, line


def test_the_python_model_reads_a_cgroup_v1_quota_and_refuses_to_guess_without_its_helper(
    exported: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """cgroup v1 (cpu.cfs_quota_us) bounds it too. A version folder without the CPU helper (a
    model.py copied by hand) fails to load saying what is missing, rather than running as many
    threads as the node has cores."""
    from tests.test_cpus import v1_tree

    version = repository.write_model(tmp_path / "repo", exported[0] / "generator/1/model.onnx")
    runner = python_runner(monkeypatch)
    root, proc = v1_tree(tmp_path, 100000)
    monkeypatch.setattr(runner, "CGROUP_ROOT", root)
    monkeypatch.setattr(runner, "PROC_CGROUP", proc)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("TALKINGHEAD_ORT_THREADS", "")
    monkeypatch.setenv("TALKINGHEAD_ENGINE", "onnxruntime")
    model = initialize_generator(runner, version, 1)
    assert model.runner.session.get_session_options().intra_op_num_threads == 1
    (version / "talkinghead_cpus.py").unlink()
    with pytest.raises(FileNotFoundError, match=r"talkinghead_cpus\.py is missing"):
        initialize_generator(runner, version, 1)


def write_verdict(version: Path, model_id: str, passed: bool, full_protocol: bool | None = True) -> None:
    verdict = {"model_id": model_id, "passed": passed, "ssim_drop": 0.0, "identity_rise": 0.0}
    if full_protocol is not None:  # None: a verdict written before verdicts recorded their coverage
        verdict["full_protocol"] = full_protocol
    (version / "engines.json").write_text(json.dumps({"engines": {"openvino-bf16": verdict}}))


def test_the_python_model_runs_generators_on_the_fastest_engine_it_may_use(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """auto: openvino-bf16 only where the CPU has native bf16 and the verdict beside the model
    passed it for this model id on the full evaluation protocol (a personalised generator has
    none: exact); openvino (fp32) where it is installed; onnxruntime otherwise, and always for the
    embedder. TALKINGHEAD_ENGINE names one; an unknown name is an error that says which names
    there are."""
    runner = python_runner(monkeypatch)
    generator = {"parameters": {"talkinghead.kind": {"string_value": "generator"},
                                "talkinghead.model_id": {"string_value": "abc"}}}  # fmt: skip
    embedder = {"parameters": {"talkinghead.kind": {"string_value": "embedder"}}}
    choose, native = runner.choose_engine, runner.bf16_native
    monkeypatch.setattr(runner, "bf16_native", lambda: True)
    monkeypatch.setattr(runner, "openvino_installed", lambda: True)
    assert choose(generator, str(tmp_path), "auto") == "openvino"  # no verdict
    write_verdict(tmp_path, "abc", passed=False)
    assert choose(generator, str(tmp_path), "auto") == "openvino"
    write_verdict(tmp_path, "another model", passed=True)
    assert choose(generator, str(tmp_path), "auto") == "openvino"
    write_verdict(tmp_path, "abc", passed=True, full_protocol=False)  # a reduced run's
    assert choose(generator, str(tmp_path), "auto") == "openvino"
    write_verdict(tmp_path, "abc", passed=True, full_protocol=None)  # says not what it measured
    assert choose(generator, str(tmp_path), "auto") == "openvino"
    write_verdict(tmp_path, "abc", passed=True)
    assert choose(generator, str(tmp_path), "auto") == "openvino-bf16"
    assert choose(generator, str(tmp_path), "") == "openvino-bf16"
    assert choose(embedder, str(tmp_path), "auto") == "onnxruntime"
    assert choose(embedder, str(tmp_path), "openvino-bf16") == "onnxruntime"
    assert choose(generator, str(tmp_path), "onnxruntime") == "onnxruntime"
    (tmp_path / "engines.json").write_text("{not json")
    assert choose(generator, str(tmp_path), "auto") == "openvino"
    monkeypatch.setattr(runner, "bf16_native", lambda: False)
    write_verdict(tmp_path, "abc", passed=True)
    assert choose(generator, str(tmp_path), "auto") == "openvino"
    monkeypatch.setattr(runner, "openvino_installed", lambda: False)
    assert choose(generator, str(tmp_path), "auto") == "onnxruntime"
    with pytest.raises(ValueError, match="TALKINGHEAD_ENGINE='tensorrt': one of auto, onnxruntime"):
        choose(generator, str(tmp_path), "tensorrt")
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert native(str(flags))
    flags.write_text("flags\t\t: fpu avx2 fma\n")
    assert not native(str(flags)) and not native(str(tmp_path / "missing"))


def test_new_versions_keep_the_live_one_and_removal_is_whole(
    exported: tuple[Path, dict], tmp_path: Path
) -> None:
    repo, _ = exported
    live = tmp_path / "repo"
    onnx_path = repo / "generator/1/model.onnx"
    for expected in (1, 2, 3):
        assert repository.write_model(live, onnx_path).name == str(expected)
    assert repository.versions(live / "generator") == [2, 3]  # KEEP_VERSIONS
    for version in (2, 3):  # the runner and the CPU helper it loads, in every version
        assert (live / f"generator/{version}/model.py").read_text() == repository.PYTHON_MODEL.read_text()
        assert (live / f"generator/{version}/talkinghead_cpus.py").read_text() == CPUS_SOURCE
    other = repository.write_model(tmp_path / "ort", onnx_path, profile="onnxruntime")
    assert sorted(p.name for p in other.iterdir()) == ["model.onnx"], "no runner, no helper"
    assert repository.models(live) == ["generator"]
    assert not list(tmp_path.glob(".repo-staging-*")), "staging folders are cleaned up"
    assert not list((live / "generator").glob(".*")), "staging folders are cleaned up"
    with pytest.raises(ValueError, match="invalid model name"):
        repository.remove_model(live, "../etc")
    stale, recent = live / f"{repository.REMOVED}killed", live / f"{repository.REMOVED}in-flight"
    for left in (stale, recent):
        (left / "generator_x").mkdir(parents=True)  # with a config: hidden, so no model
        (left / "generator_x" / "config.pbtxt").write_text("")
    old = time.time() - repository.STALE_S - 1
    os.utime(stale, (old, old))
    assert repository.remove_model(live, "generator") and repository.models(live) == []
    assert sorted(p.name for p in live.iterdir()) == [recent.name], "a killed removal's folder goes"
    assert not repository.remove_model(live, "generator")


def test_what_the_repository_writer_writes_another_user_can_read(
    exported: tuple[Path, dict], tmp_path: Path
) -> None:
    """Triton runs as another user than the writer (the chart: Triton 1000, the worker publishing
    personalised generators 10001; an operator's repository copied onto a volume keeps its modes).
    Version folders came out 0700 and config.pbtxt 0600 (tempfile's private modes): Triton could
    read neither. Folders are 0755 and files 0644 now, refreshed ones too."""
    repo, _ = exported
    live = tmp_path / "repo"
    onnx_path = repo / "generator/1/model.onnx"
    version = repository.write_model(live, onnx_path)
    repository.write_model(live, onnx_path, name="generator_alice")
    (version / "model.py").write_text("# an older release's runner\n")
    version.chmod(0o700)  # as an older release wrote it
    repository.write_config(live, onnx_path)
    written = [p for p in live.rglob("*")]
    assert len(written) >= 10
    for path in written:
        mode = path.stat().st_mode & 0o777
        wanted = 0o755 if path.is_dir() else 0o644
        assert mode & wanted == wanted, f"{path.relative_to(live)} is {mode:o}, not readable by Triton's user"


def test_the_same_weights_exported_again_get_this_releases_runner(
    exported: tuple[Path, dict], tmp_path: Path
) -> None:
    """A repository whose weights did not change keeps its version (Triton keeps it loaded), but
    its python-profile runner and the CPU helper it loads are this release's: a fix to either
    (denormals flushed, 3x on real faces; threads by the pod's CPU quota) reaches a repository
    exported by an older release."""
    repo, _ = exported
    live = tmp_path / "repo"
    onnx_path = repo / "generator/1/model.onnx"
    version = repository.write_model(live, onnx_path)
    (version / "model.py").write_text("# an older release's runner\n")
    (version / "talkinghead_cpus.py").unlink(missing_ok=True)  # written before the runner needed it
    assert repository.write_config(live, onnx_path) == version
    assert (version / "model.py").read_text() == repository.PYTHON_MODEL.read_text()
    assert (version / "talkinghead_cpus.py").read_text() == CPUS_SOURCE
    (version / "talkinghead_cpus.py").write_text("# an older release's helper\n")
    repository.write_config(live, onnx_path)
    assert (version / "talkinghead_cpus.py").read_text() == CPUS_SOURCE
    assert repository.versions(live / "generator") == [1]


def test_a_worker_starting_brings_this_releases_runner_to_every_avatars_generator(
    exported: tuple[Path, dict], tmp_path: Path
) -> None:
    """write_config refreshes a model's runner only when its weights are written again, so an
    avatar not personalised since an upgrade kept the older release's runner and helper. The
    worker, at start, refreshes the latest version of every python-profile model
    (refresh_runners): not older versions, not an onnxruntime-profile model (no runner), not a
    folder being staged or hidden."""
    repo, _ = exported
    live = tmp_path / "repo"
    onnx_path = repo / "generator/1/model.onnx"
    repository.write_model(live, onnx_path)
    first = repository.write_model(live, onnx_path, name="generator_alice")
    latest = repository.write_model(live, onnx_path, name="generator_alice")
    plain = repository.write_model(live, onnx_path, name="generator_bob", profile="onnxruntime")
    hidden = live / ".removed-generator_carl" / "1"
    hidden.mkdir(parents=True)
    for folder in (first, latest, hidden):
        (folder / "model.py").write_text("# an older release's runner\n")
        (folder / "talkinghead_cpus.py").write_text("# an older release's helper\n")
    assert repository.refresh_runners(live) == [latest]
    assert (latest / "model.py").read_text() == repository.PYTHON_MODEL.read_text()
    assert (latest / "talkinghead_cpus.py").read_text() == CPUS_SOURCE
    for folder in (first, hidden):
        assert (folder / "model.py").read_text() == "# an older release's runner\n"
    assert not (plain / "model.py").exists()
    assert repository.refresh_runners(live) == []  # nothing left to write


def test_export_into_an_existing_repository_brings_the_cpu_helper_to_its_versions(
    exported: tuple[Path, dict], tmp_path: Path
) -> None:
    """`make model-repository` (`talkinghead export`) over a repository an older release wrote,
    the weights unchanged: the versions stay, and each gets this release's runner and its helper
    (before: a new model.py beside no helper would not load)."""
    from export import command

    live = tmp_path / "repo"
    shutil.copytree(exported[0], live)
    for name in ("embedder", "generator"):
        (live / name / "1" / "model.py").write_text("# an older release's runner\n")
        (live / name / "1" / "talkinghead_cpus.py").unlink(missing_ok=True)
    args = argparse.Namespace(
        checkpoint=CHECKPOINT,
        repository=live,
        profile="python",
        device="cpu",
        no_check=True,
        triton_url=None,
        template=False,
    )
    command.export(args)
    for name in ("embedder", "generator"):
        assert repository.versions(live / name) == [1]
        assert (live / name / "1" / "model.py").read_text() == repository.PYTHON_MODEL.read_text()
        assert (live / name / "1" / "talkinghead_cpus.py").read_text() == CPUS_SOURCE


def test_cli_adds_an_avatar_generator_with_psi_baked_in_and_removes_it(
    personal_ckpt: dict,
    meta_ckpt: dict,
    exported: tuple[Path, dict],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`talkinghead export` of a personalised checkpoint: one more model, psi baked in (checked
    against PyTorch), the base model's id; the same checkpoint again, written from the graph the
    first export traced, is that export byte for byte: no new version; removal."""
    from talkinghead.cli import run_module
    from training import checkpoint

    repo = tmp_path / "repo"
    shutil.copytree(exported[0], repo)
    checkpoint.save(tmp_path / "alice.pt", personal_ckpt)
    report = tmp_path / "report.json"
    to_onnx.TEMPLATES.clear()  # traced here, whatever an earlier test exported
    quick_latency(monkeypatch)
    argv = ["--checkpoint", str(tmp_path / "alice.pt"), "--repository", str(repo), "--report", str(report)]
    assert run_module("export.command", argv, prog="talkinghead export") == 0
    assert repository.models(repo) == ["embedder", "generator", "generator_alice"]
    entry = json.loads(report.read_text())["models"]["generator_alice"]
    inputs = personalised_inputs(personal_ckpt)
    assert entry["inputs"] == {name: ["batch", 128, 128, 3] for name in inputs}
    (parity,) = entry["parity"]  # the baked psi gives PyTorch's frames
    assert parity["max_abs"] <= 2 and parity["mean_abs"] < 0.01
    path = repo / "generator_alice/1/model.onnx"
    # psi is baked in: no `adain` input, only the landmarks (and the warped reference, warp-guided G)
    assert [i.name for i in onnx.load(str(path)).graph.input] == inputs
    params = repository.spec_of(path).parameters
    assert params["talkinghead.avatar"] == "alice"
    # the avatar's psi came from the meta model's embedder: the ids must match for the service
    base = to_onnx.metadata(meta_ckpt, "generator", adain_size=1)["talkinghead.model_id"]
    assert params["talkinghead.model_id"] == base
    # the same checkpoint again: written from the graph the first export traced (what a worker
    # does from its second job on, and for a job re-run after a worker died): the same bytes
    # (and its default report is the avatar's: the base models' report beside it stays)
    base_report = tmp_path / "repo.export.json"
    base_report.write_text('{"models": {"embedder": {}, "generator": {}}}\n')
    with caplog.at_level(logging.INFO, logger=to_onnx.log.name):
        assert run_module("export.command", [*argv[:-2], "--no-check"], prog="talkinghead export") == 0
    assert "exported generator_alice from an earlier export's graph" in caplog.text, caplog.text[-2000:]
    assert base_report.read_text() == '{"models": {"embedder": {}, "generator": {}}}\n'
    assert list(json.loads((tmp_path / "repo.generator_alice.export.json").read_text())["models"]) == [
        "generator_alice"
    ]
    assert repository.versions(repo / "generator_alice") == [1]
    argv = ["--remove-avatar", "alice", "--repository", str(repo)]
    assert run_module("export.command", argv, prog="talkinghead export") == 0
    assert repository.models(repo) == ["embedder", "generator"]
    assert run_module("export.command", argv, prog="talkinghead export") == 1


def test_a_load_triton_refuses_ends_in_one_line_with_the_export_and_its_report_kept(
    personal_ckpt: dict, exported: tuple[Path, dict], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`export --triton-url` with no Triton there (or one serving another repository): before, a
    traceback, and the report of what was exported was never written."""
    import socket

    from talkinghead.cli import run_module
    from training import checkpoint

    repo = tmp_path / "repo"
    shutil.copytree(exported[0], repo)
    checkpoint.save(tmp_path / "alice.pt", personal_ckpt)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["--checkpoint", str(tmp_path / "alice.pt"), "--repository", str(repo), "--no-check"]
    with caplog.at_level(logging.INFO):
        assert run_module("export.command", [*argv, "--triton-url", f"127.0.0.1:{port}"], prog="x") == 1
    (refused,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert refused.getMessage().startswith(f"Triton at 127.0.0.1:{port} did not load generator_alice: ")
    assert f"The repository {repo} holds it" in refused.getMessage() and refused.exc_info is None
    report = json.loads((tmp_path / "repo.generator_alice.export.json").read_text())
    assert report["written"] == ["generator_alice"] and repository.models(repo)[-1] == "generator_alice"


def test_a_meta_models_template_is_structured_as_its_avatars_generators(
    meta_ckpt: dict, personal_ckpt: dict
) -> None:
    """The personalised generator `talkinghead export` writes beside the shared one (what a
    worker's first job starts from) has the structure of every avatar's generator of that model,
    its base model id, and a psi with no two values alike (the exporter would merge them)."""
    template = to_onnx.template_graph(meta_ckpt)
    (avatar,) = to_onnx.graphs(personal_ckpt)
    assert to_onnx.Templates.key(template) == to_onnx.Templates.key(avatar)
    assert template.metadata[contract.Meta.KIND] == contract.KIND_PERSONALISED
    assert template.metadata[contract.Meta.MODEL_ID] == avatar.metadata[contract.Meta.MODEL_ID]
    psi = template.module.state_dict()["adain"]
    assert psi.unique().numel() == psi.numel()
    with pytest.raises(ValueError, match="meta checkpoint"):
        to_onnx.template_graph(personal_ckpt)


class Tiny(torch.nn.Module):
    """A stand-in generator small enough to export in a second: a convolution, a norm and a
    scalar gain (kept as a 0-d initializer by the exporter); `scale` is a plain attribute its
    forward reads, which no structure key sees."""

    def __init__(self, seed: int, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.InstanceNorm2d(4, affine=True)
        self.gain = torch.nn.Parameter(torch.randn(1))
        torch.nn.init.normal_(self.norm.weight)
        self.scale = scale

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float() / 255.0
        return self.norm(self.conv(x)) * self.gain * self.scale


def tiny_graph(seed: int, scale: float = 1.0) -> to_onnx.Graph:
    return to_onnx.Graph(
        name="tiny",
        module=Tiny(seed, scale),
        inputs={"image": torch.zeros(2, 8, 8, 3, dtype=torch.uint8)},
        outputs=["out"],
        metadata={"talkinghead.seed": str(seed)},
    )


def test_a_graph_like_one_exported_before_is_written_from_it_byte_for_byte(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another avatar's generator of the same base model is not traced again: its weights go into
    the graph exported before, and the file is the one a full export writes."""
    kept = to_onnx.Templates()
    to_onnx.export_graph(tiny_graph(0), tmp_path / "a.onnx", templates=kept)
    with caplog.at_level("INFO", logger="talkinghead.export"):
        to_onnx.export_graph(tiny_graph(1), tmp_path / "b.onnx", templates=kept)
    assert "from an earlier export's graph" in caplog.text
    to_onnx.export_graph(tiny_graph(1), tmp_path / "b_traced.onnx", templates=to_onnx.Templates())
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "b_traced.onnx").read_bytes()
    assert (tmp_path / "a.onnx").read_bytes() != (tmp_path / "b.onnx").read_bytes()
    assert onnx.load(str(tmp_path / "b.onnx")).metadata_props[-1].value == "1"  # its own metadata


def test_a_kept_graph_that_computes_something_else_is_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Same classes and weights, a forward that differs in a plain attribute: the kept graph fails
    the check against PyTorch and the graph is exported in full, computing what PyTorch does."""
    kept = to_onnx.Templates()
    to_onnx.export_graph(tiny_graph(0), tmp_path / "a.onnx", templates=kept)
    graph = tiny_graph(0, scale=3.0)
    with caplog.at_level("INFO", logger="talkinghead.export"):
        to_onnx.export_graph(graph, tmp_path / "b.onnx", templates=kept)
    assert "differs from PyTorch" in caplog.text
    image = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    (parity,) = to_onnx.parity(graph, tmp_path / "b.onnx", {"image": image})
    assert parity.max_abs < 1e-4


def test_tensorrt_shapes_come_from_the_config(exported: tuple[Path, dict]) -> None:
    repo, _ = exported
    gen = repository.spec_of(repo / "generator/1/model.onnx", profile="tensorrt")
    shapes = to_tensorrt.shapes_from_config(repository.config_text(gen, "tensorrt"))
    assert shapes.inputs["landmark_image"] == ((1, 128, 128, 3), (16, 128, 128, 3), (16, 128, 128, 3))
    assert shapes.inputs["adain"] == ((1, 2240), (16, 2240), (16, 2240))
    emb = repository.spec_of(repo / "embedder/1/model.onnx", profile="tensorrt")
    shapes = to_tensorrt.shapes_from_config(repository.config_text(emb, "tensorrt"))
    assert shapes.inputs["image"][1] == (8, 128, 128, 3) and shapes.inputs["image"][2][0] == 32
    cmd = to_tensorrt.trtexec_command("trtexec", Path("m.onnx"), Path("m.plan"), shapes, fp16=True)
    assert "--fp16" in cmd and "--minShapes=image:1x128x128x3,landmark_image:1x128x128x3" in cmd


def test_tensorrt_repository_without_tensorrt_says_so(exported: tuple[Path, dict], tmp_path: Path) -> None:
    repo, _ = exported
    trt = tmp_path / "trt"
    repository.write_model(trt, repo / "generator/1/model.onnx", profile="tensorrt")
    assert to_tensorrt.tensorrt_models(trt) == [trt / "generator"]
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        if to_tensorrt.trtexec() is None:
            with pytest.raises(to_tensorrt.TensorRTUnavailable, match="Build engines on the serving GPU"):
                to_tensorrt.build_repository(trt)
            assert to_tensorrt.main(["--repository", str(trt)]) == 3
            pytest.skip(
                "TensorRT is not installed here (no `import tensorrt`, no trtexec): engines not built"
            )
    assert to_tensorrt.build_repository(trt) == [trt / "generator/1/model.plan"]
    assert (trt / "generator/1/model.plan").stat().st_size > 0


def test_a_module_baked_twice_gives_its_own_frames_both_times() -> None:
    """bake removes spectral norm from a copy; the copy once shared its class with the source, so
    the first bake broke the source and a second (bf16 then fp16 in `bench --device`) raised."""
    from export.wrappers import bake
    from training.config import load_config
    from training.generator import Generator

    torch.manual_seed(0)
    cfg = load_config("smoke").model
    gen = Generator(cfg=cfg).eval()
    y, psi = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1, torch.randn(2, gen.adain_size)
    with torch.no_grad():
        ref = gen(y, psi)
        first, second = bake(gen), bake(gen)
        for baked in (first, second, bake(first)):
            assert not any(hasattr(m, "parametrizations") for m in baked.modules())
            assert torch.allclose(baked(y, psi), ref, atol=1e-6)
        assert torch.equal(gen(y, psi), ref)  # the source still has its spectral norm and frames


def test_a_full_export_prints_no_warnings(meta_ckpt: dict[str, Any], tmp_path: Path, capfd: Any) -> None:
    """What `make model-repository` shows a user: torch's exporter printed a dozen warnings per
    graph, one of them ours (every AdaIN's psi slice left on the module after the pass, "tensor
    attributes assigned during export"); any new one should be looked at, not scrolled past."""
    generator = to_onnx.graphs(meta_ckpt)[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        to_onnx._export_in_full(generator, tmp_path / "model.onnx")
    printed = capfd.readouterr()
    assert [str(w.message)[:200] for w in caught] == []
    assert "warn" not in (printed.out + printed.err).lower(), printed.err[-2000:]
    assert "torchvision" not in printed.err


def test_a_model_that_does_not_compute_what_pytorch_does_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The parity check logged its figures and wrote every model whatever they said: a generator
    with one weight scaled after tracing (39 levels off) and an embedder off by 0.38 exported with
    exit 0 (helper-75). Now such an export writes nothing, the embedder it was checked with
    included (the models are written together, after every check), and exits 1 saying which."""
    from talkinghead.cli import run_module

    real = to_onnx.export_graph

    def broken(graph: to_onnx.Graph, path: Path) -> Path:
        written = real(graph, path)
        if graph.name == contract.GENERATOR:
            model = onnx.load(str(written))
            weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
            values = onnx.numpy_helper.to_array(weight) * 1.5
            weight.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), weight.name))
            onnx.save(model, str(written))
        return written

    monkeypatch.setattr(to_onnx, "export_graph", broken)
    quick_latency(monkeypatch)
    repo = tmp_path / "repo"
    argv = ["--checkpoint", str(CHECKPOINT), "--repository", str(repo), "--no-template"]
    assert run_module("export.command", argv, prog="talkinghead export") == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("talkinghead export: generator.image differs from PyTorch by "), line
    assert line.endswith("uint8 levels (at most 2): nothing written")
    assert sorted(p.name for p in repo.iterdir()) == [], "nothing written, the embedder neither"
    assert not (tmp_path / "repo.export.json").exists()


def test_what_export_cannot_read_or_write_is_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each of these was a traceback with exit 1, some after every model was written (a report
    folder that is not there); a misspelt --remove-avatar too, and --checkpoint with it was
    silently ignored (helper-75)."""
    from talkinghead.cli import run_module

    (tmp_path / "cut.pt").write_bytes(CHECKPOINT.read_bytes()[:4096])
    (tmp_path / "random.pt").write_bytes(os.urandom(256))
    # bytes whose unpickling fails outside pickle's own errors (random ones do 5 % of the time):
    # a string that is not UTF-8, a length past what can be allocated
    (tmp_path / "text.pt").write_bytes(b"X\x02\x00\x00\x00\xff\xfe.")
    (tmp_path / "huge.pt").write_bytes(b"\x80\x04\x8e" + b"\xff" * 7 + b"\x7f")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"a": 1}, tmp_path / "other.pt")
    (tmp_path / "file").write_text("x")
    repo = str(tmp_path / "repo")
    cases = [
        (["--repository", repo], "--checkpoint is required (or --remove-avatar ID)"),
        (["--checkpoint", str(tmp_path / "nope.pt"), "--repository", repo], "nope.pt: no such file"),
        (["--checkpoint", str(tmp_path), "--repository", repo], f"{tmp_path}: is a directory"),
        (
            ["--checkpoint", str(tmp_path / "cut.pt"), "--repository", repo],
            "not a readable talkinghead checkpoint",
        ),
        (["--checkpoint", str(tmp_path / "random.pt"), "--repository", repo], "not a readable talkinghead"),
        (["--checkpoint", str(tmp_path / "empty.pt"), "--repository", repo], "not a readable talkinghead"),
        (["--checkpoint", str(tmp_path / "text.pt"), "--repository", repo], "(UnicodeDecodeError)"),
        (["--checkpoint", str(tmp_path / "huge.pt"), "--repository", repo], "(OverflowError)"),
        (
            ["--checkpoint", str(tmp_path / "other.pt"), "--repository", repo],
            "is not a talkinghead checkpoint",
        ),
        (
            ["--checkpoint", str(CHECKPOINT), "--repository", str(tmp_path / "file")],
            "exists and is not a directory",
        ),
        (
            [
                "--checkpoint",
                str(CHECKPOINT),
                "--repository",
                repo,
                "--report",
                str(tmp_path / "no" / "r.json"),
            ],
            "no folder",
        ),
        (
            ["--checkpoint", str(CHECKPOINT), "--repository", repo, "--device", "gpu"],
            "--device gpu is for --profile onnxruntime",
        ),
        (
            ["--remove-avatar", "Mona", "--repository", repo],
            "--remove-avatar 'Mona': invalid avatar id 'Mona'",
        ),
        (
            ["--remove-avatar", "mona", "--checkpoint", str(CHECKPOINT)],
            "--remove-avatar takes no --checkpoint",
        ),
    ]
    for argv, says in cases:
        assert run_module("export.command", argv, prog="talkinghead export") == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("talkinghead export: ") and says in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "repo").exists(), "nothing made"


def test_a_removal_triton_could_not_unload_says_so_and_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With Triton unreachable it logged a warning, deleted the generator and exited 0, while that
    Triton may still serve it (helper-75): the folder still goes (nothing can load it again), and
    the exit is 1, naming what is left to do."""
    from talkinghead.cli import run_module
    from tests.service_fixtures import fake_generator

    repo = tmp_path / "repo"
    fake_generator(repo, "gone", 1, created=None)
    argv = ["--remove-avatar", "gone", "--repository", str(repo), "--triton-url", "127.0.0.1:1"]
    with caplog.at_level(logging.INFO, logger="talkinghead"):
        assert run_module("export.command", argv, prog="talkinghead export") == 1
    assert not (repo / "generator_gone").exists()
    assert "generator_gone may still be loaded in Triton at 127.0.0.1:1" in caplog.text


def test_the_report_of_a_repository_named_dot_or_dot_dot_lies_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--repository .` had no name to extend ("'.' has an empty name", after every model was
    written); `..` as absolute() kept it (a report named '..export.json' inside the repository)."""
    from export.command import report_path

    inner = tmp_path / "outer" / "inner"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    assert report_path(Path("."), ["generator"]) == tmp_path / "outer" / "inner.export.json"
    assert report_path(Path(".."), ["generator"]) == tmp_path / "outer.export.json"
