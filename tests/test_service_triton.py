"""The service on the Triton backend (tritonclient.grpc.aio) against a real Triton server.

The test starts the Triton bundled with nvidia-pytriton (export/tritonserver.py) on free ports
with a private copy of the model repository; TALKINGHEAD_TEST_TRITON_URL points it at a running
server instead. Skips, saying why, only where the bundled server is not installed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc.aio as tritonclient
from tritonclient.utils import InferenceServerException

from client.library import landmark_requests
from deploy.local import tritonserver
from export import repository as repository_files
from facekit import contract, engines
from facekit.sequence import LandmarkSequence
from service.backends import triton as triton_backend
from service.backends.base import BackendUnavailable
from service.backends.triton import TritonBackend, merges_queued_calls
from service.store import LocalAvatarStore
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import (
    CONSENT,
    PORTRAIT,
    TRITON_VENV,
    Direct,
    ServerThread,
    as_served,
    test_settings,
)

pytestmark = pytest.mark.triton
VENV = TRITON_VENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Triton:
    """The bundled Triton on fixed free ports, restartable (to take the backend away and back)."""

    def __init__(self, *, repository: Path, state: Path) -> None:
        self.repository, self.state = repository, state
        self.ports = tritonserver.Ports.free()
        self.server: tritonserver.Server | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def start(self) -> None:
        self.server = tritonserver.start(self.repository, venv=VENV, state=self.state, ports=self.ports)
        self.server.wait_ready(120)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def base_repository(model_repository: Path, into: Path) -> Path:
    """A private copy of the embedder and generator for a bundled Triton (skips where there is none)."""
    try:
        tritonserver.server_root(VENV)
    except FileNotFoundError as err:
        pytest.skip(f"bundled Triton server unavailable: {err}")
    for name in (contract.EMBEDDER, contract.GENERATOR):
        shutil.copytree(model_repository / name, into / name)
    return into


@pytest.fixture(scope="module")
def triton(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | Triton]:
    if os.environ.get("TALKINGHEAD_TEST_TRITON_URL"):
        yield os.environ["TALKINGHEAD_TEST_TRITON_URL"]
        return
    work = tmp_path_factory.mktemp("triton-backend")
    repo = base_repository(model_repository, work / "repo")
    server = Triton(repository=repo, state=work / "state")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def url_of(triton: str | Triton) -> str:
    return triton if isinstance(triton, str) else triton.url


@pytest.mark.parametrize(
    ("groups", "lanes", "gpu"),
    [
        ([{"count": 2, "kind": "KIND_CPU"}], 2, False),
        ([{"count": 1, "kind": "KIND_GPU", "gpus": [0]}], 1, True),
        ([{"count": 2, "kind": "KIND_GPU", "gpus": [0, 1]}], 4, True),
        ([{"count": 1, "kind": "KIND_CPU"}, {"count": 1, "kind": "KIND_GPU", "gpus": [0]}], 2, True),
        ([], 1, False),
    ],
)
def test_the_generators_instances_on_triton_are_its_lanes(groups: list[dict], lanes: int, gpu: bool) -> None:
    """From Triton's completed config: calls the batcher keeps in flight, and whether batches are
    cheaper per frame (any instance on a GPU) or every call should be one frame (all on CPU)."""
    assert contract.instances({"instance_group": groups}) == (lanes, gpu)


@pytest.mark.parametrize(
    ("config", "merges"),
    [
        ({"instance_group": [{"count": 2, "kind": "KIND_CPU"}], "dynamic_batching": {}}, True),
        (
            {
                "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
                "dynamic_batching": {"preferred_batch_size": [4, 8]},
            },
            True,
        ),
        (
            {
                "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
                "dynamic_batching": {"preferred_batch_size": [1]},
            },
            False,
        ),
        ({"instance_group": [{"count": 2, "kind": "KIND_CPU"}]}, False),  # no dynamic batching
        ({"instance_group": [{"count": 1, "kind": "KIND_CPU"}], "dynamic_batching": {}}, False),
        ({"instance_group": [{"count": 2, "kind": "KIND_GPU", "gpus": [0]}], "dynamic_batching": {}}, False),
    ],
)
def test_a_cpu_generator_whose_queued_calls_triton_may_merge_is_recognised(
    config: dict, merges: bool
) -> None:
    """Merged one-frame calls on CPU instances read as a slower generator (BENCHMARKS.md): the
    service warns when Triton's config allows it; a GPU's batches are meant to merge."""
    assert merges_queued_calls(config) is merges


def test_triton_backend_serves_streams(
    model_repository: Path, tmp_path: Path, driver: LandmarkSequence, direct: Direct, triton: str | Triton
) -> None:
    running = ServerThread(
        settings=test_settings(
            model_repository, tmp_path / "store", backend="triton", triton_url=url_of(triton)
        )
    )
    try:
        running.wait_ready(timeout=60)
        with running.client() as c:
            c.wait_ready(timeout=10)  # health follows the backend (polled)
            c.create_avatar("tri", [PORTRAIT], consent=CONSENT)
            seq = LandmarkSequence(driver.points[:4], driver.frame_size, driver.fps)
            frames = list(c.animate("tri", landmark_requests(seq), encoding="raw"))
        assert [f.sequence for f in frames] == [0, 1, 2, 3]
        if isinstance(triton, Triton):  # the CPU profile's generator instances, a call in flight each
            assert running.app.backend.lanes() == engines.AUTO_LANES
            assert running.app.batcher.batch_cap == 1  # and one frame a call: batches cost the same per frame
        stored = LocalAvatarStore(root=tmp_path / "store").get("tri")
        assert stored is not None
        expected = direct.generate(seq.rescaled(running.app.backend.info.image_size).points, stored)
        expected = as_served(running.app, "tri", expected)
        assert np.abs(np.stack([f.image for f in frames]).astype(int) - expected).mean() < 0.6
    finally:
        running.stop()


def test_triton_down_gives_unavailable_and_the_service_recovers(
    model_repository: Path, tmp_path: Path, driver: LandmarkSequence, triton: str | Triton
) -> None:
    if isinstance(triton, str):
        pytest.skip("needs the test's own Triton (TALKINGHEAD_TEST_TRITON_URL is set)")
    running = ServerThread(
        settings=test_settings(model_repository, tmp_path / "store", backend="triton", triton_url=triton.url)
    )
    seq = LandmarkSequence(driver.points[:3], driver.frame_size, driver.fps)
    try:
        running.wait_ready(timeout=60)
        with running.client() as c:
            c.wait_ready(timeout=10)
            c.create_avatar("tri", [PORTRAIT], consent=CONSENT)
            triton.stop()
            with pytest.raises(grpc.RpcError) as error:
                list(c.animate("tri", landmark_requests(seq), encoding="raw"))
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value.details()
            triton.start()
            c.wait_ready(timeout=30)
            frames = list(c.animate("tri", landmark_requests(seq), encoding="raw"))
            assert [f.sequence for f in frames] == [0, 1, 2]
            assert c.get_avatar("tri").avatar_id == "tri", "the avatar survived the outage"
    finally:
        running.stop()
        if triton.server is None:
            triton.start()


def test_a_triton_restarted_with_another_instance_count_is_measured_again(
    model_repository: Path, tmp_path: Path, driver: LandmarkSequence
) -> None:
    """An operator restarts Triton with the generator in one instance instead of two: the service,
    still running, reads the new lanes, measures the generator again and batches again (one frame
    a call only suits calls side by side), instead of admitting live streams by the capacity of the
    server it had before."""
    repo = base_repository(model_repository, tmp_path / "repo")
    config = repo / contract.GENERATOR / "config.pbtxt"
    assert "instance_group [ { count: 2 kind: KIND_CPU } ]" in config.read_text()
    server = Triton(repository=repo, state=tmp_path / "state")
    server.start()
    running = ServerThread(
        settings=test_settings(model_repository, tmp_path / "store", backend="triton", triton_url=server.url)
    )
    app = running.app
    try:
        running.wait_ready(timeout=60)
        _until(lambda: app.admission.lanes == 2 and app.cost.observations > 0, "the first calibration")
        assert app.batcher.batch_cap == 1
        before = app.admission.capacity
        server.stop()
        config.write_text(config.read_text().replace("count: 2 kind", "count: 1 kind"))
        server.start()

        def published() -> float:
            lines = [
                line
                for line in running.metrics().splitlines()
                if line.startswith("talkinghead_capacity_fps ")
            ]
            return float(lines[0].split()[1])

        _until(
            lambda: app.admission.lanes == 1 and published() == pytest.approx(app.admission.capacity),
            "calibration after the restart",
        )
        assert published() != pytest.approx(before)
        assert app.batcher.batch_cap == app.admission.max_batch == app.settings.max_batch > 1
        assert app.batcher.lanes("") == 1
        with running.client() as c:
            c.wait_ready(timeout=30)
            c.create_avatar("tri", [PORTRAIT], consent=CONSENT)
            seq = LandmarkSequence(driver.points[:3], driver.frame_size, driver.fps)
            frames = list(c.animate("tri", landmark_requests(seq), encoding="raw"))
        assert [f.sequence for f in frames] == [0, 1, 2]
    finally:
        running.stop()
        server.stop()


def _until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(0.1)


async def _remove_personalised(
    client: tritonclient.InferenceServerClient, triton: Triton, avatars: Iterable[str]
) -> None:
    """Unload and delete the personalised generators a test added to its Triton's repository."""
    for avatar in avatars:
        await client.unload_model(f"generator_{avatar}")
        shutil.rmtree(triton.repository / f"generator_{avatar}")


class _WallClockAhead:
    """The backend's `time` module with its wall clock `ahead` seconds on: what it compares
    Triton's last-inference stamps (wall clock) with, so an idle time passes without waiting it
    out; monotonic and the rest unchanged."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def time(self) -> float:
        return time.time() + self.ahead

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def test_idle_personalised_generators_are_unloaded_on_triton_beyond_the_limit(
    model_repository: Path,
    triton: str | Triton,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each personalised generator loaded on Triton holds its memory there: beyond the limit, one
    loading unloads the generators no replica called for the idle time, least recently called
    first (Triton's statistics); a call whose generator another replica unloaded loads it again
    and gets the same frames."""
    if isinstance(triton, str):
        pytest.skip("needs the test's own Triton (the test adds models to its repository)")
    template = _template(model_repository)
    for avatar in "abc":
        repository_files.write_model(triton.repository, template, name=f"generator_{avatar}")
    # A load takes Triton ~1 s here, over 3 s beside other work on these 2 cores: b's and c's last
    # calls must stay within idle_s while a loads after them (at 5 s, a CI run beside three busy
    # servers found b idle 6 s, and unloaded it).
    idle_s = 12.0
    rng = np.random.default_rng(0)
    drawn, warped = (rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8) for _ in range(2))
    clock = _WallClockAhead()
    monkeypatch.setattr(triton_backend, "time", clock)

    async def main() -> None:
        backend = TritonBackend(url=triton.url, max_personalised=2, personalised_idle_s=idle_s)
        other = tritonclient.InferenceServerClient(triton.url)  # another replica's view
        await backend.start()
        try:
            assert await backend.wait_ready(60)

            async def frames(avatar: str) -> np.ndarray:
                assert await backend.has_personalised(avatar)
                return await backend.generate_personalised(avatar, drawn, warped)

            first = {avatar: await frames(avatar) for avatar in "ab"}
            # neither called since: idle_s + 0.5 s on the clock the backend reads (not waited out,
            # 12.5 s of the suite). b's call below is then as old as that to it too, so both are
            # idle when c loads: only one goes, the one called longest ago.
            clock.ahead = idle_s + 0.5
            await frames("b")
            await frames("c")  # a third loads: a, called longest ago, is unloaded
            clock.ahead = 0.0  # (b and c called just now from here on)
            assert [await other.is_model_ready(f"generator_{x}") for x in "abc"] == [False, True, True]
            assert "unloaded personalised generator generator_a on Triton" in caplog.text
            assert "above the limit of 2" not in caplog.text
            await frames("b"), await frames("c")
            np.testing.assert_array_equal(await frames("a"), first["a"])  # loads again
            assert "above the limit of 2" in caplog.text  # b and c were called just now
            await other.unload_model("generator_b")  # another replica made room
            np.testing.assert_array_equal(await frames("b"), first["b"])  # NOT_FOUND: loaded again
            assert await other.is_model_ready("generator_b")
        finally:
            await _remove_personalised(other, triton, "abc")
            await other.close()
            await backend.close()

    with caplog.at_level("INFO", logger="talkinghead.service.triton"):
        asyncio.run(main())


def test_a_personalised_call_never_runs_a_generator_made_for_another_record(
    model_repository: Path, triton: str | Triton, tmp_path: Path
) -> None:
    """A stream's calls of generator_<id> name the avatar record it opened on (made_for). Once an
    avatar event dropped what the backend knew (a new version published), a generator fine-tuned
    on the record that replaced it under the same id is refused - BackendUnavailable, so the
    stream ends UNAVAILABLE as for a withdrawn generator - while the new record's streams get it.
    Before, the call ran whatever Triton held: another record's face. Its calls name the version
    they were checked against, so that holds before the event comes too."""
    if isinstance(triton, str):
        pytest.skip("needs the test's own Triton (the test adds models to its repository)")

    def stamped(stamp: str) -> Path:
        model = onnx.load(str(_template(model_repository)))
        meta = {p.key: p for p in model.metadata_props}
        meta[contract.Meta.AVATAR].value = "twin"
        if contract.Meta.AVATAR_CREATED in meta:
            meta[contract.Meta.AVATAR_CREATED].value = stamp
        else:
            model.metadata_props.add(key=contract.Meta.AVATAR_CREATED, value=stamp)
        path = tmp_path / f"{stamp}.onnx"
        onnx.save(model, str(path))
        return path

    old, new = "100.000000", "200.000000"
    repository_files.write_model(triton.repository, stamped(old), name="generator_twin")
    rng = np.random.default_rng(0)
    drawn, warped = (rng.integers(0, 256, (1, 128, 128, 3), dtype=np.uint8) for _ in range(2))

    async def main() -> None:
        backend = TritonBackend(url=triton.url)
        other = tritonclient.InferenceServerClient(triton.url)  # the worker's view
        await backend.start()
        try:
            assert await backend.wait_ready(60)
            assert await backend.has_personalised("twin", old)
            await backend.generate_personalised("twin", drawn, warped, made_for=old)
            # replaced and personalised again: the worker loads version 2 and tells the replicas
            repository_files.write_model(triton.repository, stamped(new), name="generator_twin")
            await other.load_model("generator_twin")
            # before the event reaches this replica: its calls name version 1, which Triton let go
            # of when it loaded version 2 (before, they named none and ran version 2: the other
            # record's face until the event came)
            with pytest.raises(BackendUnavailable) as refused:
                await backend.generate_personalised("twin", drawn, warped, made_for=old)
            assert refused.value.reason == "the avatar's personalised generator was withdrawn"
            assert backend.loaded(), "a version Triton let go of is not Triton gone"
            backend.forget_personalised("twin")  # the event
            with pytest.raises(BackendUnavailable) as refused:
                await backend.generate_personalised("twin", drawn, warped, made_for=old)
            assert refused.value.reason == "the avatar's personalised generator was withdrawn"
            assert not await backend.has_personalised("twin", old)
            assert await backend.has_personalised("twin", new)
            await backend.generate_personalised("twin", drawn, warped, made_for=new)
        finally:
            await _remove_personalised(other, triton, ["twin"])
            await other.close()
            await backend.close()

    asyncio.run(main())


def test_a_generator_looked_up_on_a_triton_that_freezes_gives_up_when_triton_is_lost(
    model_repository: Path, triton: str | Triton
) -> None:
    """Opening a stream asks Triton for the avatar's personalised generator (index, load,
    config); a Triton that froze meanwhile held that for load_timeout_s (60 s), with health
    already NOT_SERVING. The look-up is abandoned with the model calls when Triton is lost."""
    if isinstance(triton, str):
        pytest.skip("needs the test's own Triton (the test freezes it)")
    assert triton.server is not None
    repository_files.write_model(triton.repository, _template(model_repository), name="generator_ice")

    async def main() -> None:
        backend = TritonBackend(url=triton.url)
        await backend.start()
        try:
            assert await backend.wait_ready(60)
            os.kill(triton.server.process.pid, signal.SIGSTOP)  # type: ignore[union-attr]
            try:
                started = time.monotonic()
                assert not await backend.has_personalised("ice")
                waited = time.monotonic() - started
            finally:
                os.kill(triton.server.process.pid, signal.SIGCONT)  # type: ignore[union-attr]
            assert waited < 15, f"held {waited:.1f} s (load_timeout_s {backend.load_timeout_s:g} s)"
            assert await backend.wait_ready(60)
            assert await backend.has_personalised("ice"), "found once Triton answers again"
        finally:
            other = tritonclient.InferenceServerClient(triton.url)
            await _remove_personalised(other, triton, ["ice"])
            await other.close()
            await backend.close()

    asyncio.run(main())


async def found(backend: TritonBackend, avatar_id: str, tries: int = 3) -> bool:
    """has_personalised, asked again after Triton was lost and is back: a loaded 2-core machine
    (CI beside other work) held Triton's readiness answer past the backend's 1 s, the backend
    called it gone, and the lookup in flight was abandoned (None), which is no answer about the
    model (a missing one stays missing: it is remembered for NEGATIVE_CACHE_S)."""
    for _ in range(tries):
        if await backend.has_personalised(avatar_id):
            return True
        assert await backend.wait_ready(60)
    return False


def test_a_personalised_generator_whose_queued_calls_triton_may_merge_is_warned_of(
    model_repository: Path, triton: str | Triton, caplog: pytest.LogCaptureFixture
) -> None:
    """A personalised generator exported before its CPU config held a preferred batch of 1 merges
    queued calls as the old shared one did: the service names it when it loads it (and still serves
    it); one exported now passes without a word."""
    if isinstance(triton, str):
        pytest.skip("needs the test's own Triton (the test adds models to its repository)")
    template = _template(model_repository)
    for avatar in ("new", "old"):
        repository_files.write_model(triton.repository, template, name=f"generator_{avatar}")
    config = triton.repository / "generator_old" / "config.pbtxt"
    lines = config.read_text().splitlines()
    config.write_text("\n".join(line for line in lines if "preferred_batch_size" not in line) + "\n")

    async def main() -> None:
        backend = TritonBackend(url=triton.url)
        other = tritonclient.InferenceServerClient(triton.url)
        await backend.start()
        try:
            assert await backend.wait_ready(60)
            assert await found(backend, "new")
            assert "merge" not in caplog.text
            assert await found(backend, "old")
            assert "Triton's generator_old config lets its dynamic batcher merge" in caplog.text
        finally:
            await _remove_personalised(other, triton, ("new", "old"))
            await other.close()
            await backend.close()

    with caplog.at_level("WARNING", logger="talkinghead.service.triton"):
        asyncio.run(main())


def test_the_service_gets_ready_beside_a_triton_that_refused_a_model(
    model_repository: Path, tmp_path: Path
) -> None:
    """Triton with strict readiness (its default: an operator's own server) reports itself not
    ready for good once any model failed to load, even after that model is unloaded. A replica
    starting then (scaled out, restarted) asked exactly that before loading anything and never
    became ready; it asks whether Triton answers, then the base models."""
    repo = base_repository(model_repository, tmp_path / "repo")
    refused = tmp_path / "model.py"
    refused.write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise MemoryError\n"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(repository_files, "PYTHON_MODEL", refused)
        repository_files.write_model(repo, _template(model_repository), name="generator_refused")
    server = tritonserver.start(
        repo, venv=VENV, state=tmp_path / "state", ports=tritonserver.Ports.free(), strict_readiness=True
    )
    rng = np.random.default_rng(0)
    drawn, warped = (rng.integers(0, 256, (1, 128, 128, 3), dtype=np.uint8) for _ in range(2))

    async def main() -> None:
        client = tritonclient.InferenceServerClient(server.grpc_url)
        backend = TritonBackend(url=server.grpc_url)
        try:
            with pytest.raises(InferenceServerException):
                await client.load_model("generator_refused")
            await client.unload_model("generator_refused")
            assert not await client.is_server_ready()  # Triton's own word, after the unload too
            await backend.start()
            assert await backend.wait_ready(60)
            psi = np.zeros((1, backend.info.adain_size), np.float32)
            assert (await backend.generate(drawn, psi, warped)).shape == (1, 128, 128, 3)
        finally:
            await client.close()
            await backend.close()

    try:
        server.wait_ready(120)
        asyncio.run(main())
    finally:
        server.stop()


def _template(model_repository: Path) -> Path:
    generator = contract.latest_version(model_repository / contract.GENERATOR)
    assert generator is not None
    template = generator.parent / "personalised-template.onnx"
    if not template.is_file():
        pytest.fail(f"{template} is missing: `make model-repository` writes it")
    return template
