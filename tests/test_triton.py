"""The exported repository in a real Triton server (the one bundled with nvidia-pytriton).

Runs in the default suite: `make test` builds .venv-triton first. Skips, saying why, only where
the bundled server cannot run (no .venv-triton, or a platform the wheel does not support).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from deploy.local import tritonserver
from export import repository
from facekit import cpus, engines
from facekit.contract import Meta
from service.backends.triton import merges_queued_calls
from tests.service_fixtures import TRITON_VENV

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parent.parent
VENV = TRITON_VENV
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def live_repo(exported: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("triton") / "model_repository"
    shutil.copytree(exported[0], repo)
    return repo


STATS_AT_READY: dict[str, dict] = {}  # each base model's inference statistics before any request


@pytest.fixture(scope="module")
def triton(live_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tritonserver.Server]:
    try:
        tritonserver.server_root(VENV)
    except FileNotFoundError as err:
        pytest.skip(f"bundled Triton server unavailable: {err}")
    ports = tritonserver.Ports.free()
    server = tritonserver.start(live_repo, venv=VENV, state=tmp_path_factory.mktemp("state"), ports=ports)
    try:
        server.wait_ready(120)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for model in ("embedder", "generator"):
            STATS_AT_READY[model] = client.get_inference_statistics(model, as_json=True)
        yield server
    finally:
        server.stop()
    assert server.process.returncode is not None


def infer(
    client: grpcclient.InferenceServerClient, model: str, **inputs: np.ndarray
) -> dict[str, np.ndarray]:
    tensors = []
    for name, value in inputs.items():
        t = grpcclient.InferInput(name, list(value.shape), "UINT8" if value.dtype == np.uint8 else "FP32")
        t.set_data_from_numpy(value)
        tensors.append(t)
    result = client.infer(model, tensors)
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def ort_run(path: Path, **inputs: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)


@pytest.fixture(scope="module")
def faces(meta_ckpt: dict) -> dict[str, np.ndarray]:
    from export.command import real_inputs

    inputs = real_inputs(meta_ckpt)
    # "drawn": the driving landmarks; "warped": the portrait warped onto them (warp-guided G only)
    generator = inputs["generator"]
    return {**inputs["embedder"], "drawn": generator["landmark_image"], **warped_of(generator)}


def warped_of(inputs: dict[str, np.ndarray], frames: slice = slice(None)) -> dict[str, np.ndarray]:
    """The `warped` input of a warp-guided generator for `frames`; nothing for the paper's G."""
    return {"warped": inputs["warped"][frames]} if "warped" in inputs else {}


def runner_module() -> Any:
    """export/triton_python_model.py loaded here, as Triton's stub loads it (its utils module stubbed)."""
    import importlib.util
    import sys
    import types

    if "triton_python_backend_utils" not in sys.modules:
        sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
    spec = importlib.util.spec_from_file_location("triton_runner", repository.PYTHON_MODEL)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@functools.cache
def served_by(path: Path) -> tuple[str, Any]:
    """The engine Triton's python runner chooses for the generator at `path` on this machine
    (auto), and that engine opened here as the runner opens it (a thread per instance)."""
    runner = runner_module()
    meta = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
    config = {"parameters": {key: {"string_value": value} for key, value in meta.items()}}
    engine = runner.choose_engine(config, str(path.parent), "auto")
    threads = max(1, cpus.usable_cpus() // engines.AUTO_LANES)
    if engine == engines.ONNXRUNTIME:
        return engine, runner.OnnxRuntimeRunner(str(path), threads)
    return engine, runner.OpenVinoRunner(
        str(path), threads, "bf16" if engine == engines.OPENVINO_BF16 else "f32"
    )


def triton_frames(path: Path, **feeds: np.ndarray) -> np.ndarray:
    """The frames Triton's generator at `path` answers `feeds` with (its engine, run here; OpenVINO
    gives a frame the same bits at every batch size)."""
    return np.asarray(served_by(path)[1].run(["image"], feeds)[0])


def test_embedder_equals_onnxruntime_and_generator_its_chosen_engine(
    triton: tritonserver.Server, live_repo: Path, faces: dict[str, np.ndarray]
) -> None:
    """The embedder runs on ONNX Runtime; the generator on the fastest engine the runner may use
    here (export/triton_python_model.py): OpenVINO (installed in .venv-triton) in bf16 where this
    CPU computes bf16 natively and the exported verdict passed it, else in fp32, one thread per
    instance on 2 cores. Its frames are that engine's to the bit, and ONNX Runtime's to float
    rounding (fp32) or to bf16's precision."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    got = infer(client, "embedder", image=faces["image"], landmark_image=faces["landmark_image"])
    want = ort_run(
        live_repo / "embedder/1/model.onnx", image=faces["image"], landmark_image=faces["landmark_image"]
    )
    np.testing.assert_allclose(got["embedding"], want[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["adain"], want[1], rtol=0, atol=1e-6)
    adain = np.repeat(got["adain"][:1], len(faces["drawn"]), axis=0)
    feeds = {"landmark_image": faces["drawn"], "adain": adain, **warped_of(faces)}
    frames = infer(client, "generator", **feeds)["image"]
    assert frames.shape == (len(faces["drawn"]), 128, 128, 3) and frames.dtype == np.uint8

    path = live_repo / "generator/1/model.onnx"
    engine, _ = served_by(path)
    meta = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
    verdict = runner_module().verdict_passed(str(path.parent), meta[Meta.MODEL_ID], engines.OPENVINO_BF16)
    assert engine == (engines.OPENVINO_BF16 if engines.bf16_native() and verdict else engines.OPENVINO)
    threads = max(1, cpus.usable_cpus() // engines.AUTO_LANES)
    log = triton.log.read_text()
    assert f"generator_0_0: {engine} on {threads} thread(s)" in log, runner_lines(log)
    bound = f"threads: {engines.AUTO_LANES} instance(s) sharing {cpus.usable_cpus()} usable CPUs, bounded by"
    assert bound in log, runner_lines(log)
    assert "embedder_0_0: onnxruntime on" in log, runner_lines(log)
    assert np.array_equal(frames, triton_frames(path, **feeds))
    difference = np.abs(frames.astype(np.int16) - ort_run(path, **feeds)[0])
    if engine == engines.OPENVINO_BF16:
        assert difference.mean() < 2.0, difference.mean()
    else:
        assert difference.max() <= 2 and (difference > 0).mean() < 0.01, (
            difference.max(),
            (difference > 0).mean(),
        )


def runner_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "model.py" in line]


def test_base_models_are_warm_before_triton_calls_them_ready(triton: tritonserver.Server) -> None:
    """config.pbtxt's model_warmup: Triton ran each base model once on zeros before it reported
    it ready, so the first client request does not pay the engine's first-call set-up: once in
    each of its instances (the generator runs in AUTO_LANES on the CPU profile)."""
    for model, instances in (("embedder", 1), ("generator", engines.AUTO_LANES)):
        (stats,) = STATS_AT_READY[model]["model_stats"]
        assert int(stats["execution_count"]) == instances, f"{model}: {stats}"
        assert [b["batch_size"] for b in stats["batch_stats"]] == ["1"]
        assert stats["inference_stats"]["success"]["count"] == str(instances), "the warm-up failed"


def metric(server: tritonserver.Server, name: str, model: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.search(rf'^{name}{{model="{model}",version="\d+"}} (\S+)$', text, re.M)
    assert found, f"{name} for {model} not in Triton's metrics"
    return float(found.group(1))


def burst(url: str, model: str, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Every request of `feeds` sent to `model` at once; their frames, in order."""
    import tritonclient.grpc.aio as aioclient

    async def run() -> list[np.ndarray]:
        aio = aioclient.InferenceServerClient(url)

        async def one(request: dict[str, np.ndarray]) -> np.ndarray:
            inputs = []
            for name, value in request.items():
                inputs.append(
                    aioclient.InferInput(name, list(value.shape), "UINT8" if name != "adain" else "FP32")
                )
                inputs[-1].set_data_from_numpy(value)
            return (await aio.infer(model, inputs)).as_numpy("image")

        try:
            return await asyncio.gather(*(one(request) for request in feeds))
        finally:
            await aio.close()

    return asyncio.run(run())


def executions(server: tritonserver.Server, model: str, send: Callable[[], object], requests: int) -> float:
    """How many executions Triton ran `model` in while `send()` made `requests` one-frame requests."""
    runs_before = metric(server, "nv_inference_exec_count", model)
    frames_before = metric(server, "nv_inference_count", model)
    send()
    # Triton counts a request after its response is sent: the last ones may land a moment later.
    deadline = time.monotonic() + 10
    while (
        metric(server, "nv_inference_count", model) - frames_before < requests and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert metric(server, "nv_inference_count", model) - frames_before == requests
    return metric(server, "nv_inference_exec_count", model) - runs_before


def test_concurrent_requests_of_several_avatars_return_each_avatars_frame(
    triton: tritonserver.Server, live_repo: Path, faces: dict[str, np.ndarray]
) -> None:
    """Two avatars in 16 concurrent one-frame requests, and in one request of both: every frame is
    its own avatar's. The shipped CPU config runs each queued request alone (merged, two one-frame
    calls both took two frames' time); a copy of the generator whose config lets Triton's dynamic
    batcher merge them (as an operator may set it) still answers each request with its own frame.
    Avatar 0 is the portrait's psi; avatar 1 a psi moved away from it (the committed small model's
    embedder maps most faces to nearly the same psi, see models/MODEL_CARD.md)."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    psi = infer(client, "embedder", image=faces["image"], landmark_image=faces["landmark_image"])["adain"][:1]
    psi = np.concatenate([psi, psi + np.random.default_rng(0).normal(0, 0.5, psi.shape).astype(np.float32)])
    gen = live_repo / "generator/1/model.onnx"
    drawn, warped = faces["drawn"][:1], warped_of(faces, slice(0, 1))
    expected = [triton_frames(gen, landmark_image=drawn, adain=psi[i : i + 1], **warped) for i in range(2)]
    assert not np.array_equal(expected[0], expected[1])
    feeds = [{"landmark_image": drawn, "adain": psi[i % 2 : i % 2 + 1], **warped} for i in range(16)]

    def check(model: str) -> float:
        results: list[np.ndarray] = []
        runs = executions(triton, model, lambda: results.extend(burst(triton.grpc_url, model, feeds)), 16)
        for i, frame in enumerate(results):
            assert np.array_equal(frame, expected[i % 2]), f"{model}: request {i} got another avatar's frame"
        return runs

    assert check("generator") == 16, "the CPU profile merged queued one-frame requests"
    assert not merges_queued_calls(client.get_model_config("generator", as_json=True)["config"])
    both = {"landmark_image": np.concatenate([drawn, drawn]), "adain": psi}
    both.update({k: np.concatenate([v, v]) for k, v in warped.items()})
    frames = infer(client, "generator", **both)["image"]
    assert np.array_equal(frames[0], expected[0][0]) and np.array_equal(frames[1], expected[1][0])

    merging = live_repo / "generator_merging"
    shutil.copytree(live_repo / "generator", merging)
    config = merging / "config.pbtxt"
    text = re.sub(r"\s*preferred_batch_size: \[[^\]]*\]", "", config.read_text())
    config.write_text(text.replace("max_queue_delay_microseconds: 0", "max_queue_delay_microseconds: 20000"))
    try:
        client.load_model("generator_merging")
        assert check("generator_merging") < 16, "the dynamic batcher merged none of the 16 requests"
        # what the service warns of when a repository was exported with such a config
        assert merges_queued_calls(client.get_model_config("generator_merging", as_json=True)["config"])
    finally:
        client.unload_model("generator_merging")
        shutil.rmtree(merging)


def test_personalised_generator_loads_serves_and_unloads(
    triton: tritonserver.Server,
    live_repo: Path,
    personal_ckpt: dict,
    faces: dict[str, np.ndarray],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from talkinghead.cli import run_module
    from training import checkpoint

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    checkpoint.save(tmp_path / "alice.pt", personal_ckpt)
    argv = [
        "--checkpoint",
        str(tmp_path / "alice.pt"),
        "--repository",
        str(live_repo),
        "--no-check",
        "--report",
        str(tmp_path / "r.json"),
        "--triton-url",
        triton.grpc_url,
    ]
    assert run_module("export.command", argv, prog="talkinghead export") == 0
    assert client.is_model_ready("generator_alice"), "loaded without restarting the server"
    feeds = {"landmark_image": faces["drawn"], **warped_of(faces)}
    frames = infer(client, "generator_alice", **feeds)["image"]
    expected = triton_frames(live_repo / "generator_alice/1/model.onnx", **feeds)
    assert np.array_equal(frames, expected)
    argv = ["--remove-avatar", "alice", "--repository", str(live_repo), "--triton-url", triton.grpc_url]
    with caplog.at_level(logging.INFO, logger="talkinghead"):
        assert run_module("export.command", argv, prog="talkinghead export") == 0
        assert f"unloaded generator_alice from Triton at {triton.grpc_url}" in caplog.text
        caplog.clear()
        assert run_module("export.command", argv, prog="talkinghead export") == 1  # gone already
        assert "unloaded" not in caplog.text and "generator_alice was not loaded in Triton" in caplog.text
    assert not (live_repo / "generator_alice").exists()
    assert not client.is_model_ready("generator_alice")
    with pytest.raises(InferenceServerException, match="generator_alice"):
        infer(client, "generator_alice", **feeds)
    assert client.is_model_ready("generator"), "the shared generator keeps serving"


REFUSED = """class TritonPythonModel:
    def initialize(self, args):
        raise MemoryError("no memory left for this model")
"""


def test_a_version_triton_refuses_is_taken_back(
    triton: tritonserver.Server,
    live_repo: Path,
    faces: dict[str, np.ndarray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A personalisation whose new version Triton cannot load (here its model fails to initialise,
    as out of memory would) takes it back: the version before is the latest again and Triton
    serves it, and a model's first version refused leaves no model behind - not a published
    version every new stream of the avatar would ask Triton to load, and fail. Triton stays ready
    (the chart's --strict-readiness=false, as the local server's)."""
    from export import repository
    from facekit import contract
    from worker import models

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    source = contract.latest_version(live_repo / "generator")
    assert source is not None
    tritons = [triton.grpc_url]
    first = repository.write_model(live_repo, source, name="generator_bob")
    models.load_everywhere(live_repo, "generator_bob", tritons=tritons, written=first)
    psi = infer(client, "embedder", image=faces["image"], landmark_image=faces["landmark_image"])["adain"][:1]
    feeds = {"landmark_image": faces["drawn"][:1], "adain": psi, **warped_of(faces, slice(0, 1))}
    before = infer(client, "generator_bob", **feeds)["image"]
    refused = tmp_path / "model.py"
    refused.write_text(REFUSED)
    monkeypatch.setattr(repository, "PYTHON_MODEL", refused)
    try:
        second = repository.write_model(live_repo, source, name="generator_bob")
        assert second.name == "2"
        with pytest.raises(InferenceServerException, match="no memory left"):
            models.load_everywhere(live_repo, "generator_bob", tritons=tritons, written=second)
        assert repository.versions(live_repo / "generator_bob") == [1]
        assert client.is_model_ready("generator_bob", "1")
        assert np.array_equal(infer(client, "generator_bob", **feeds)["image"], before)

        new = repository.write_model(live_repo, source, name="generator_carol")
        with pytest.raises(InferenceServerException, match="no memory left"):
            models.load_everywhere(live_repo, "generator_carol", tritons=tritons, written=new)
        assert not (live_repo / "generator_carol").exists()
        assert not client.is_model_ready("generator_carol")
        assert "generator_carol" not in {m.name for m in client.get_model_repository_index().models}
        assert client.is_server_ready(), "--strict-readiness=false: the refusals leave it ready"
    finally:
        assert models.withdraw("bob", live_repo, tritons=tritons)
    assert client.is_model_ready("generator"), "the shared generator kept serving"


def test_a_tenants_generator_loads_serves_and_is_withdrawn_in_triton(
    triton: tritonserver.Server, live_repo: Path, faces: dict[str, np.ndarray]
) -> None:
    """A tenant's avatar `acme.bob` has the generator generator_acme.bob: a name with a dot, which
    the repository refused (helper-75) and which Triton loads, serves and unloads like any."""
    from export import repository
    from facekit import contract
    from worker import models

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    source = contract.latest_version(live_repo / "generator")
    assert source is not None
    name = contract.personalised_name("acme.bob")
    written = repository.write_model(live_repo, source, name=name)
    models.load_everywhere(live_repo, name, tritons=[triton.grpc_url], written=written)
    assert client.is_model_ready(name)
    psi = infer(client, "embedder", image=faces["image"], landmark_image=faces["landmark_image"])["adain"][:1]
    feeds = {"landmark_image": faces["drawn"][:1], "adain": psi, **warped_of(faces, slice(0, 1))}
    served, shared = infer(client, name, **feeds)["image"], infer(client, "generator", **feeds)["image"]
    assert np.abs(served.astype(int) - shared).mean() < 2, "its copy of the shared generator draws as it"
    assert models.withdraw("acme.bob", live_repo, tritons=[triton.grpc_url])
    assert not (live_repo / name).exists() and not client.is_model_ready(name)


def test_a_withdrawn_generator_cannot_be_loaded_again_by_a_replica_using_it(
    triton: tritonserver.Server, live_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica whose stream runs on generator_<id> loads it again when a call finds it unloaded
    (another replica may have made room). The withdrawal of a deleted avatar unloaded it while its
    folder was still in the repository: the replica's next call loaded it again, and it stayed in
    Triton, serving the deleted avatar's stream, for good. Here that reload comes between the
    withdrawal's unload and what follows it."""
    from export import repository
    from facekit import contract
    from worker import models

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    source = contract.latest_version(live_repo / "generator")
    assert source is not None
    tritons = [triton.grpc_url]
    written = repository.write_model(live_repo, source, name="generator_wanda")
    models.load_everywhere(live_repo, "generator_wanda", tritons=tritons, written=written)
    assert client.is_model_ready("generator_wanda")
    real_unload, reloads = models._unload, []

    def unload_then_a_replica_reloads(name: str, urls: list[str]) -> None:
        real_unload(name, urls)
        try:
            client.load_model(name)
            reloads.append("loaded")
        except InferenceServerException:
            reloads.append("refused")

    monkeypatch.setattr(models, "_unload", unload_then_a_replica_reloads)
    assert models.withdraw("wanda", live_repo, tritons=tritons)
    assert reloads == ["refused"]
    assert not client.is_model_ready("generator_wanda")
    assert not (live_repo / "generator_wanda").exists()
    assert not [p for p in live_repo.iterdir() if "wanda" in p.name or p.name.startswith(".")], "no leftovers"
    assert client.is_model_ready("generator"), "the shared generator kept serving"


def test_a_personalisation_cancelled_as_it_loads_takes_only_its_own_version_back(
    triton: tritonserver.Server, live_repo: Path
) -> None:
    """A job cancelled (or taken over) after its publish: the version it wrote goes and Triton
    serves the one before; the avatar keeps its earlier personalisation (before, the whole model
    was withdrawn). Nothing it did not write is touched; a first version goes with its model."""
    from export import repository
    from facekit import contract
    from worker import models

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    source = contract.latest_version(live_repo / "generator")
    assert source is not None
    tritons = [triton.grpc_url]
    try:
        for _ in range(2):  # an earlier personalisation, then this job's
            written = repository.write_model(live_repo, source, name="generator_dora")
            models.load_everywhere(live_repo, "generator_dora", tritons=tritons, written=written)
        assert client.is_model_ready("generator_dora", "2")
        models.take_back(models.Published("generator_dora", 2, None), live_repo, tritons=tritons)
        assert repository.versions(live_repo / "generator_dora") == [1, 2], "not this job's to take"
        models.take_back(models.Published("generator_dora", 2, written), live_repo, tritons=tritons)
        assert repository.versions(live_repo / "generator_dora") == [1]
        assert client.is_model_ready("generator_dora", "1")
        assert not client.is_model_ready("generator_dora", "2")
        first = repository.write_model(live_repo, source, name="generator_emil")
        models.load_everywhere(live_repo, "generator_emil", tritons=tritons, written=first)
        models.take_back(models.Published("generator_emil", 1, first), live_repo, tritons=tritons)
        assert not (live_repo / "generator_emil").exists()
        assert not client.is_model_ready("generator_emil")
    finally:
        models.withdraw("dora", live_repo, tritons=tritons)
        models.withdraw("emil", live_repo, tritons=tritons)


def test_a_taken_over_personalisation_takes_back_what_a_lost_attempt_published(
    triton: tritonserver.Server, live_repo: Path
) -> None:
    """A worker killed after writing its generator, before the job said so: the next attempt
    (or a cancel of it) left that version published, the avatar personalised by an operation
    that ended CANCELLED or FAILED. The job keeps the latest version when it first began; a
    later attempt takes back whatever is above it, and Triton serves the version before again."""
    from export import repository
    from facekit import contract
    from worker import models

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    source = contract.latest_version(live_repo / "generator")
    assert source is not None
    tritons = [triton.grpc_url]
    try:
        for _ in range(2):  # an earlier personalisation (1), then a lost attempt's version
            written = repository.write_model(live_repo, source, name="generator_fay")
            models.load_everywhere(live_repo, "generator_fay", tritons=tritons, written=written)
        assert client.is_model_ready("generator_fay", "2")
        models.take_back_since("generator_fay", 1, live_repo, tritons=tritons)
        assert repository.versions(live_repo / "generator_fay") == [1]
        assert client.is_model_ready("generator_fay", "1")
        assert not client.is_model_ready("generator_fay", "2")
        models.take_back_since("generator_fay", 1, live_repo, tritons=tritons)  # nothing above: no-op
        assert client.is_model_ready("generator_fay", "1")
        first = repository.write_model(live_repo, source, name="generator_gil")
        models.load_everywhere(live_repo, "generator_gil", tritons=tritons, written=first)
        models.take_back_since("generator_gil", 0, live_repo, tritons=tritons)  # it had none before
        assert not (live_repo / "generator_gil").exists()
        assert not client.is_model_ready("generator_gil")
    finally:
        models.withdraw("fay", live_repo, tritons=tritons)
        models.withdraw("gil", live_repo, tritons=tritons)


def test_personalising_past_the_limit_unloads_the_least_recently_called_idle_generator(
    triton: tritonserver.Server, live_repo: Path, faces: dict[str, np.ndarray]
) -> None:
    """Each personalisation loads its generator on Triton; past the limit the worker unloads the
    idle ones, least recently called first, as a replica's load does (before: every
    personalisation's generator stayed loaded on every Triton until a stream's load trimmed them -
    GPU memory growing with each job). One called recently stays; the files stay (a stream loads
    it again); the shared generator is not counted."""
    from export import repository
    from facekit import contract
    from worker import models

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    source = contract.latest_version(live_repo / "generator")
    assert source is not None
    tritons, names = (
        [triton.grpc_url],
        ["generator_pia", "generator_quinn", "generator_ruth", "generator_sam"],
    )

    def personalise(name: str) -> None:
        written = repository.write_model(live_repo, source, name=name)
        models.load_everywhere(live_repo, name, tritons=tritons, written=written, max_loaded=2)

    def ready() -> set[str]:
        return {n for n in names if client.is_model_ready(n)}

    try:
        personalise("generator_pia")
        personalise("generator_quinn")
        assert ready() == {"generator_pia", "generator_quinn"}
        feeds = {"landmark_image": faces["drawn"][:1], **warped_of(faces, slice(0, 1))}
        feeds["adain"] = infer(
            client, "embedder", image=faces["image"], landmark_image=faces["landmark_image"]
        )["adain"][:1]
        infer(client, "generator_quinn", **feeds)  # called just now: not idle
        personalise("generator_ruth")
        assert ready() == {"generator_quinn", "generator_ruth"}, "pia, never called, went"
        personalise("generator_sam")
        assert ready() == {"generator_quinn", "generator_sam"}, "ruth went; quinn was called"
        assert (live_repo / "generator_pia" / "1" / contract.MODEL_FILE).is_file()
        assert client.is_model_ready("generator")
        client.load_model("generator_pia")  # as a stream of pia would
        assert client.is_model_ready("generator_pia")
    finally:
        for name in names:
            models.withdraw(name.removeprefix(contract.PERSONALISED_PREFIX), live_repo, tritons=tritons)


def test_metrics_endpoint_counts_inferences(
    triton: tritonserver.Server, faces: dict[str, np.ndarray]
) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    before = metric(triton, "nv_inference_request_success", "embedder")
    infer(client, "embedder", image=faces["image"], landmark_image=faces["landmark_image"])
    # Triton counts a request after it has sent the reply: the scrape may come first.
    deadline = time.monotonic() + 5
    while (
        metric(triton, "nv_inference_request_success", "embedder") < before + 1
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert metric(triton, "nv_inference_request_success", "embedder") == before + 1
    assert metric(triton, "nv_inference_compute_infer_duration_us", "embedder") > 0


def test_bad_request_is_refused_and_server_stays_up(
    triton: tritonserver.Server, faces: dict[str, np.ndarray]
) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    with pytest.raises(InferenceServerException, match="adain"):  # psi missing
        infer(client, "generator", landmark_image=faces["drawn"][:1], **warped_of(faces, slice(0, 1)))
    assert client.is_server_ready()


def test_the_readme_snippet_runs_as_a_new_user_pastes_it(triton: tritonserver.Server) -> None:
    """README's "A real Triton server here" snippet, run as written (its address made this
    server's): it sent two inputs to a generator that had needed a third (`warped`) for months."""
    text = (ROOT / "README.md").read_text()
    block = text.split("Then, as a new user would:", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert '"127.0.0.1:8001"' in block, block
    scope: dict[str, Any] = {}
    exec(block.replace('"127.0.0.1:8001"', repr(triton.grpc_url)), scope)
    frame = scope["frame"]
    assert frame.shape == (1, 128, 128, 3) and frame.dtype == np.uint8
