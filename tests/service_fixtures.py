"""Fixtures for the service tests: a real model repository, real servers on 127.0.0.1, avatars.

Import from a test module: `from tests.service_fixtures import *  # noqa: F403` (pytest collects
fixtures from the module's namespace). Servers run in a thread with their own asyncio loop, so
tests talk to them with the blocking client exactly as a user's process would, over loopback.

The model repository: $TALKINGHEAD_TEST_MODEL_REPOSITORY, else model_repository/ (built with
`make model-repository` when missing; the tests skip with the reason if that fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from dataclasses import replace as replace_record
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from client.library import Client, demo_portrait_consent
from facekit import contract
from facekit.ids import DEFAULT_TENANT
from facekit.rasterize import draw_batch
from facekit.sequence import LandmarkSequence
from facekit.warp import warp_nearest
from facekit.watermark import payload_for
from service.server import Server
from service.settings import Settings
from service.store import AvatarRecord, LocalAvatarStore

REPO = Path(__file__).resolve().parents[1]
# The Triton venv the Triton tests start Triton from: the checkout's, or in a git worktree
# without one, $TALKINGHEAD_TEST_TRITON_VENV.
TRITON_VENV = REPO / ".venv-triton"
if not TRITON_VENV.exists() and os.environ.get("TALKINGHEAD_TEST_TRITON_VENV"):
    TRITON_VENV = Path(os.environ["TALKINGHEAD_TEST_TRITON_VENV"])
PORTRAIT = REPO / "facekit/assets/demo_portrait.png"
CONSENT = demo_portrait_consent()  # the portrait is a public-domain NASA photograph
DRIVER = REPO / "facekit/assets/demo_driver.npz"
BUILD_TIMEOUT_S = 900
# How long a test waits on a personalisation worker's step or start-up: it runs at SCHED_IDLE, on
# what the other test workers leave (seconds where they idle, minutes where they are busy).
WORKER_TIMEOUT_S = 420


def _has_models(repository: Path) -> bool:
    return all(any((repository / m).glob("*/model.onnx")) for m in ("embedder", "generator"))


@pytest.fixture(scope="session")
def model_repository() -> Path:
    """A model repository with embedder + generator (built by `make model-repository` if absent)."""
    override = os.environ.get("TALKINGHEAD_TEST_MODEL_REPOSITORY")
    repository = Path(override) if override else REPO / "model_repository"
    if not _has_models(repository) and not override:
        try:
            subprocess.run(
                ["make", "model-repository"],
                cwd=REPO,
                check=True,
                timeout=BUILD_TIMEOUT_S,
                capture_output=True,
                text=True,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, FileNotFoundError) as error:
            output = getattr(error, "stderr", "") or ""
            pytest.fail(f"no model repository and `make model-repository` failed: {error} {output[-500:]}")
    if not _has_models(repository):
        pytest.fail(f"no embedder/generator ONNX files in {repository}")
    return repository


class ServerThread:
    """A real service (`service.server.Server`) on 127.0.0.1, free ports, in a background loop."""

    def __init__(self, *, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-server")
        self.thread.start()
        self.server = Server(settings=settings)
        self.call(self.server.start())

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def app(self) -> Any:
        return self.server.app

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.call(self.app.backend.wait_ready(timeout), timeout + 5), "backend did not become ready"

    def ring_read(self, timeout: float = 10.0) -> None:
        """Wait until the server has read its key ring as the file is now (loaded it, or found it
        broken and kept the last good one). It rereads the ring every service.auth.REFRESH_S (1 s):
        a test that changed the ring waits this long instead of sleeping 2.5 s."""
        auth = self.app.auth
        now = auth.store.version()
        deadline = time.monotonic() + timeout
        while now not in (auth._version, auth._broken):
            assert time.monotonic() < deadline, f"the server did not reread its key ring within {timeout:g} s"
            time.sleep(0.02)

    def client(self) -> Client:
        return Client(target=self.address, timeout=120.0)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def metric(self, line_prefix: str, default: float | None = None) -> float:
        """Value of the first /metrics sample line starting with `line_prefix` (name{labels});
        `default` when there is none (a labelled series appears with its first sample), else KeyError."""
        for line in self.metrics().splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.rsplit(" ", 1)[1])
        if default is not None:
            return default
        raise KeyError(line_prefix)

    def metric_total(self, name: str) -> float:
        """The sum of every series of metric `name` (each label value); KeyError when it has none."""
        return metric_sum(self.metrics(), name)

    def stop(self, grace: float = 1.0) -> None:
        try:
            self.call(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def metric_sum(text: str, name: str) -> float:
    """The sum of every series of metric `name` on a /metrics page; KeyError when it has none."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
    ]
    if not values:
        raise KeyError(name)
    return sum(values)


def test_settings(repository: Path, store: Path, **overrides: Any) -> Settings:
    """Free ports, private avatars and jobs; no worker unless a test asks (worker="embedded").
    The generator runs on ONNX Runtime, the engine of `Direct`, so frames compare exactly (and no
    server spends its start timing engines); tests/test_engines.py covers the others."""
    base = Settings(
        engine="onnxruntime",
        grpc_port=0,
        metrics_port=0,
        model_repository=repository,
        avatar_store=store,
        audit_log=store.parent / f"{store.name}-audit.jsonl",
        jobs=store.parent / f"{store.name}-jobs",
        watermark_key_file=store.parent / f"{store.name}-watermark.key",
        worker="external",
    )
    return replace(base, **overrides)


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture(scope="session")
def server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """One shared server for the tests that do not need their own settings."""
    store = tmp_path_factory.mktemp("avatars")
    # batching=always: the tests on it check frames of several streams and avatars in one batch,
    # which the calibration may find not worth making on this machine's engine (batching=auto).
    # backend_timeout 30 s: a batch is capped at what is expected to cost 20 % of it (service/
    # batcher.py TIMEOUT_SHARE), which at the default 5 s was 10 frames on a loaded 2-core CI
    # machine: batches of several streams' frames stay possible there.
    settings = test_settings(
        model_repository, store, max_image_bytes=2 * 1024 * 1024, batching="always", backend_timeout=30.0
    )
    running = ServerThread(settings=settings)
    running.wait_ready()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server: ServerThread) -> Iterator[Client]:
    with server.client() as c:
        yield c


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def second_face() -> bytes:
    """Another input face: the portrait mirrored and colour-shifted (a different embedding/psi)."""
    rgb = np.asarray(Image.open(PORTRAIT).convert("RGB"))[:, ::-1]
    shifted = np.clip(rgb.astype(np.int16) * np.array([0.8, 1.0, 1.25]), 0, 255).astype(np.uint8)
    return png_bytes(shifted)


@pytest.fixture(scope="session")
def avatar(client: Client) -> str:
    client.create_avatar("astro", [PORTRAIT], display_name="Astronaut", replace=True, consent=CONSENT)
    return "astro"


@pytest.fixture(scope="session")
def other_avatar(server: ServerThread, client: Client, avatar: str) -> str:
    """A second, clearly different avatar, written straight into the server's avatar store: psi +
    N(0, 0.2) of the first and its reference crops colour-shifted (a warp-guided G takes who the
    person is mostly from them), reaching the server the way a stored avatar does after a restart:
    read from the store on first use. Frames of the two differ by > 10 grey levels.
    """
    store = LocalAvatarStore(root=server.settings.avatar_store)
    base = store.get(avatar)
    assert base is not None
    noise = np.random.default_rng(0).normal(0.0, 0.2, base.adain.shape).astype(np.float32)
    crops = np.clip(base.crops * np.array([0.8, 1.0, 1.25]), 0, 255).astype(np.uint8)
    other = replace_record(base, avatar_id="astro-alt", adain=base.adain + noise, crops=crops)
    store.put(other, replace=True)
    return "astro-alt"


@pytest.fixture(scope="session")
def driver() -> LandmarkSequence:
    return LandmarkSequence.load(DRIVER)


class Direct:
    """A served ONNX generator called directly with ONNX Runtime: the reference for the service."""

    def __init__(self, *, repository: Path, model: str = contract.GENERATOR) -> None:
        path = contract.latest_version(repository / model)
        assert path is not None, f"no {model} in {repository}"
        self.session = ort.InferenceSession(str(path))
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.info = contract.ModelInfo.from_metadata(meta, where=str(path))
        self.inputs = {i.name for i in self.session.get_inputs()}

    def generate(
        self, points: np.ndarray, record: AvatarRecord, adain: np.ndarray | None = None
    ) -> np.ndarray:
        """Avatar `record`'s frames for crop points (N, 68, 2), fed as the service feeds them: the
        landmarks drawn in the model's style, psi (the record's, or `adain` (D,)) unless the model
        has it baked in, and for a warp-guided G the record's nearest reference warped onto them."""
        feeds = {contract.LANDMARK_IMAGE: draw_batch(points, self.info.image_size, self.info.draw_style)}
        if contract.ADAIN in self.inputs:
            psi = record.adain if adain is None else adain
            feeds[contract.ADAIN] = np.repeat(psi[None], len(points), axis=0)
        if contract.WARPED in self.inputs:
            feeds[contract.WARPED] = warp_nearest(record.crops, record.crop_points, points)
        return self.session.run([contract.IMAGE], feeds)[0]


def as_served(app: Any, avatar_id: str, frames: np.ndarray) -> np.ndarray:
    """`frames` (N, H, W, 3) of the default tenant's avatar marked as `app` marks what it sends
    (App._marker): the reference a served frame is compared with, pixel for pixel."""
    payload = payload_for(DEFAULT_TENANT, avatar_id)
    return np.stack([app.watermarker.mark(frame, payload) for frame in frames])


@pytest.fixture(scope="session")
def direct(model_repository: Path) -> Direct:
    return Direct(repository=model_repository)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real filesystem of `size` (mount's size=, e.g. "1m") mounted at `path` (created) for the
    block, so a test meets a full disk or a folder on a volume of its own; skips, saying why,
    where it cannot mount one."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, check=False)


def fill(path: Path) -> Path:
    """Write `path` until its filesystem is full (ENOSPC); returns it (unlink it to make room)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as full:
            while os.write(fd, bytes(1 << 16)):
                pass
        assert full.value.errno == errno.ENOSPC, full.value
    finally:
        os.close(fd)
    return path


def copy_base_models(source: Path, target: Path) -> Path:
    """A private repository holding the base embedder and generator (for tests that add models)."""
    for name in ("embedder", "generator"):
        shutil.copytree(source / name, target / name)
    return target


@pytest.fixture(scope="session")
def personalised_repository(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """A repository with the base models plus `generator_astro-fine`, fine-tuned (2 steps) and exported
    by the project's own commands. Fails, saying why, when fine-tuning or export does."""
    work = tmp_path_factory.mktemp("personalised")
    repository = copy_base_models(model_repository, work / "repo")
    avatar_id = "astro-fine"
    checkpoint = work / f"{avatar_id}.pt"
    steps = [
        [
            "finetune",
            "--checkpoint",
            str(REPO / "models/talkinghead-small.pt"),
            "--avatar",
            avatar_id,
            "--images",
            str(PORTRAIT),
            "--out",
            str(checkpoint),
            "--steps",
            "2",
        ],
        # (parity is tests/test_export.py's; here the served frames are compared with the file's)
        ["export", "--checkpoint", str(checkpoint), "--repository", str(repository), "--no-check"],
    ]
    from talkinghead.cli import main  # in this process: no second interpreter importing torch

    for argv in steps:
        try:
            code = main(argv)
        except (Exception, SystemExit) as error:  # argparse exits
            code, why = 1, f"{type(error).__name__}: {error}"
        else:
            why = f"exit status {code}"
        if code != 0:
            pytest.fail(f"cannot make a personalised generator (`talkinghead {argv[0]}` failed): {why}")
    exported = sorted((repository / f"generator_{avatar_id}").glob("*/model.onnx"))
    if not exported:
        pytest.fail(f"`talkinghead export` wrote no generator_{avatar_id} into {repository}")
    base_id = onnx_metadata(sorted((repository / "generator").glob("*/model.onnx"))[-1])[
        "talkinghead.model_id"
    ]
    own_id = onnx_metadata(exported[-1]).get("talkinghead.model_id")
    if own_id != base_id:  # the service rightly refuses such a model; the export must be fixed
        pytest.fail(
            f"the exported personalised generator carries talkinghead.model_id {own_id}, not its base "
            f"model's {base_id} (the contract): the fine-tuned checkpoint lacks `base_model_id`"
        )
    return repository, avatar_id


def onnx_metadata(path: Path) -> dict[str, str]:
    return dict(ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map)


def thread_policies(pid: int) -> set[int]:
    """The Linux scheduling policies of a process's threads (os.SCHED_*)."""
    found = set()
    for tid in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            found.add(os.sched_getscheduler(int(tid.name)))
    return found


def worker_context(queue: Any, repository: Path, **overrides: Any) -> Any:
    """A worker's jobs_run.Context over `queue` (local or Redis), to run one job in the test's own
    process: no Triton, base model "m1", an empty meta checkpoint (a job that reaches
    fine-tuning fails), no avatar store unless given (`avatars=`)."""
    import torch

    from worker.jobs_run import Context

    base = Context(
        queue=queue,
        meta={},
        model_id="m1",
        repository=repository,
        profile="python",
        tritons=[],
        heartbeat_s=0.3,
        device=torch.device("cpu"),
    )
    return replace(base, **overrides)


def fake_generator(
    repository: Path,
    avatar_id: str,
    version: int,
    created: float | None,
    store: str | None = None,
    job: str | None = None,
) -> Path:
    """generator_<avatar>/<version>/model.onnx: a one-node ONNX file stamped, as a personalised
    generator is, for the avatar record made at `created` (None: no stamp, one made by hand) in
    the avatar store `store` (jobs.avatars store_id; None: none named), by the personalisation
    job `job` (None: none named)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    meta = {contract.Meta.AVATAR: avatar_id}
    if created is not None:
        meta[contract.Meta.AVATAR_CREATED] = contract.avatar_stamp(created)
    if store is not None:
        meta[contract.Meta.AVATAR_STORE] = store
    if job is not None:
        meta[contract.Meta.JOB] = job
    onnx.helper.set_model_props(model, meta)
    folder = repository / contract.personalised_name(avatar_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text("")
    # Whole or not there, as export publishes a version (staged, then renamed): a worker listing
    # the folder meanwhile saw the version without its file - unstamped, so a REMOVE job's to take.
    staging = folder / f".staging-{version}"
    staging.mkdir()
    onnx.save(model, str(staging / contract.MODEL_FILE))
    staging.rename(folder / str(version))
    return folder


def stored_record(store: Any, avatar_id: str, created: float) -> AvatarRecord:
    """A small avatar record made at `created`, written into `store` (replacing one of the id)."""
    rng = np.random.default_rng(len(avatar_id))
    record = AvatarRecord(
        avatar_id=avatar_id,
        adain=rng.normal(size=16).astype(np.float32),
        embedding=rng.normal(size=8).astype(np.float32),
        points=rng.uniform(0, 128, (68, 2)).astype(np.float32),
        model_id="m1",
        image_size=128,
        create_time=created,
        portrait_box=(1.0, 2.0, 3),
        consent={"record_id": f"cr-{avatar_id}"},
    )
    assert store.put(record, replace=True)
    return record
