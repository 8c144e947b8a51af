"""Stopping `talkinghead serve` with SIGTERM, as Kubernetes does: during the drain its health says
NOT_SERVING while new connections and calls are still answered (the pod's endpoints catch up in
that time), a running stream goes on, and the process then ends on its own. And what the chart's
liveness probe sees of a server that stopped answering. Real processes."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

from client.library import Client, landmark_requests
from facekit.sequence import LandmarkSequence
from tests.healthcheck import healthcheck
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT
from tests.service_process import ServerProcess

DRAIN_S = 3.0
# Long enough for the rest of the running stream on a loaded 2-core runner. Its 100 frames take
# ~10 s on a quiet one (one inference thread, ~68 ms a frame, blocking overflow), ending ~6 s into
# a 10 s grace; CI, with a test beside it on the cores, once got 77 of them when that grace ran
# out. The process ends as soon as the stream does: a longer grace costs nothing when it is quick.
GRACE_S = 40.0


def test_sigterm_drains_then_lets_running_streams_finish(
    model_repository: Path, tmp_path: Path, driver: LandmarkSequence
) -> None:
    server = ServerProcess(
        repository=model_repository,
        root=tmp_path,
        env={"TALKINGHEAD_SHUTDOWN_DRAIN": str(DRAIN_S), "TALKINGHEAD_SHUTDOWN_GRACE": str(GRACE_S)},
    )
    try:
        server.client.create_avatar("mona", [PORTRAIT], consent=CONSENT)
        slow = LandmarkSequence(driver.points[:100], driver.frame_size, 25.0)  # 4 s at 25 fps
        received: list[int] = []

        def stream() -> None:
            with Client(target=server.address, timeout=60) as streaming:
                requests = landmark_requests(slow, pace=True)
                received.extend(
                    1 for _ in streaming.animate("mona", requests, motion="relative", overflow="block")
                )

        running = threading.Thread(target=stream)
        running.start()
        time.sleep(1.0)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        with Client(target=server.address, timeout=10) as late:  # a new connection, in the drain
            while late.health() != "NOT_SERVING":
                assert time.monotonic() - signalled < DRAIN_S / 2, "still SERVING after SIGTERM"
                time.sleep(0.05)
            assert [a.avatar_id for a in late.list_avatars()] == ["mona"]
            assert late.health("liveness") == "SERVING"  # draining is not a reason to restart it
        running.join(DRAIN_S + GRACE_S + 5)
        assert len(received) == 100, "the running stream was cut"
        assert server.process.wait(30) == 0
        log = server.log.read_text()
        assert "still taking calls for 3.0 s" in log and f"shutting down (grace {GRACE_S} s)" in log
    finally:
        if server.alive:
            server.stop()


def test_liveness_fails_for_a_server_that_stopped_answering_though_it_still_accepts_connections(
    model_repository: Path, tmp_path: Path
) -> None:
    """The chart's startup and liveness probes ask health "liveness" (with TLS by the image's
    healthcheck, as here; without, Kubernetes' own gRPC probe). A stopped server (SIGSTOP: as a wedged
    event loop, nothing answered) still gets its TCP connections accepted by the kernel, so the
    TCP probe the chart used before passed and the pod was never restarted; the health check
    fails, and passes again once the process runs."""
    server = ServerProcess(repository=model_repository, root=tmp_path)

    def probe() -> int:
        return healthcheck(f"--address={server.address}", "--service=liveness", "--timeout=2").returncode

    try:
        assert probe() == 0
        server.process.send_signal(signal.SIGSTOP)
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()  # what TCP saw
            assert probe() == 1
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert probe() == 0
    finally:
        server.stop()
