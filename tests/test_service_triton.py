"""The service on the Triton backend (tritonclient.grpc.aio) against a real Triton server.

The test starts the Triton bundled with nvidia-pytriton (export/tritonserver.py) on free ports
with a private copy of the model repository; TALKINGHEAD_TEST_TRITON_URL points it at a running
server instead. Skips, saying why, only where the bundled server is not installed.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from client.library import landmark_requests
from deploy.local import tritonserver
from facekit.sequence import LandmarkSequence
from service.store import LocalAvatarStore
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, Direct, ServerThread, test_settings

pytestmark = pytest.mark.triton
VENV = Path(__file__).resolve().parent.parent / ".venv-triton"


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


@pytest.fixture(scope="module")
def triton(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | Triton]:
    if os.environ.get("TALKINGHEAD_TEST_TRITON_URL"):
        yield os.environ["TALKINGHEAD_TEST_TRITON_URL"]
        return
    try:
        tritonserver.server_root(VENV)
    except FileNotFoundError as err:
        pytest.skip(f"bundled Triton server unavailable: {err}")
    work = tmp_path_factory.mktemp("triton-backend")
    repo = work / "repo"
    for name in ("embedder", "generator"):
        shutil.copytree(model_repository / name, repo / name)
    server = Triton(repository=repo, state=work / "state")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def url_of(triton: str | Triton) -> str:
    return triton if isinstance(triton, str) else triton.url


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
        stored = LocalAvatarStore(root=tmp_path / "store").get("tri")
        assert stored is not None
        expected = direct.generate(seq.rescaled(running.app.backend.info.image_size).points, stored)
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
