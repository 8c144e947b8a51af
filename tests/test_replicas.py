"""Several machines' worth of the service on loopback: redis-server, two service replicas (each on
its own Triton), two Triton servers sharing one model repository, and a worker; then kill -9.

An avatar created on replica 1 animates on replica 2; a personalisation whose worker is killed
mid-job is taken over by the next worker and finishes; both Tritons serve the result and both
replicas use it for new streams; a replica killed mid-create leaves the avatar whole or absent;
deleting the avatar unloads and removes its generator everywhere. Marker slow (minutes):
`make test-replicas`. Skips, saying why, only where redis-server or the bundled Triton cannot run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from api.talkinghead.v1 import personalisation_pb2 as ops
from client.library import Client, landmark_requests
from deploy.local import tritonserver
from facekit.sequence import LandmarkSequence
from jobs import keys
from jobs.redis_queue import connect
from tests.redis_fixtures import *  # noqa: F403
from tests.redis_fixtures import RedisServer, free_port
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, REPO, copy_base_models
from tests.test_service_triton import VENV, Triton

pytestmark = [pytest.mark.slow, pytest.mark.triton]
STEPS = 8
FIELDS = {
    b"meta",
    b"adain",
    b"embedding",
    b"points",
    b"crops",
    b"crop_points",
    b"preview_png",
    b"portrait_jpeg",
}


def spawn(argv: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "talkinghead.cli", *argv],
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


class Replica:
    def __init__(self, *, redis_url: str, triton_url: str, repo: Path, log: Path) -> None:
        self.port = free_port()
        self.process = spawn(
            ["serve"],
            log,
            TALKINGHEAD_GRPC_PORT=str(self.port),
            TALKINGHEAD_METRICS_PORT="0",
            TALKINGHEAD_BACKEND="triton",
            TALKINGHEAD_TRITON_URL=triton_url,
            TALKINGHEAD_MODEL_REPOSITORY=str(repo),
            TALKINGHEAD_REDIS_URL=redis_url,
            TALKINGHEAD_WORKER="external",
        )
        self.client = Client(target=f"127.0.0.1:{self.port}", timeout=120)
        self.client.wait_ready(120)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.client.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[dict[str, object]]:
    try:
        tritonserver.server_root(VENV)
    except FileNotFoundError as err:
        pytest.skip(f"bundled Triton server unavailable: {err}")
    work = tmp_path_factory.mktemp("replicas")
    redis = RedisServer(workdir=work / "redis")
    repo = copy_base_models(model_repository, work / "repo")  # shared by both Tritons, as on a RWX claim
    tritons = [Triton(repository=repo, state=work / f"triton{i}") for i in (1, 2)]
    started: list[object] = []
    try:
        for triton in tritons:
            triton.start()
            started.append(triton)
        replicas = [
            Replica(redis_url=redis.url, triton_url=t.url, repo=repo, log=work / f"replica{i}.log")
            for i, t in enumerate(tritons, 1)
        ]
        started += replicas
        yield {"redis": redis, "repo": repo, "tritons": tritons, "replicas": replicas, "work": work}
    finally:
        for thing in reversed(started):
            if isinstance(thing, Replica) and thing.process.poll() is None:
                thing.process.terminate()
                thing.process.wait(30)
            elif isinstance(thing, Triton):
                thing.stop()
        redis.stop()


def worker(cluster: dict[str, object], name: str) -> subprocess.Popen[bytes]:
    tritons: list[Triton] = cluster["tritons"]  # type: ignore[assignment]
    argv = ["worker", "--redis-url", cluster["redis"].url, "--repository", str(cluster["repo"])]  # type: ignore[attr-defined]
    argv += ["--name", name, "--claim-timeout", "4", *(a for t in tritons for a in ("--triton-url", t.url))]
    return spawn(argv, cluster["work"] / f"{name}.log")  # type: ignore[operator]


def model_ready(triton: Triton, name: str) -> bool:
    import tritonclient.grpc as grpcclient

    return bool(grpcclient.InferenceServerClient(triton.url).is_model_ready(name))


def test_avatars_and_personalisation_survive_kills(
    cluster: dict[str, object], driver: LandmarkSequence
) -> None:
    one, two = cluster["replicas"]  # type: ignore[misc]
    tritons: list[Triton] = cluster["tritons"]  # type: ignore[assignment]
    seq = LandmarkSequence(driver.points[:3], driver.frame_size, driver.fps)
    one.client.create_avatar("alice", [PORTRAIT], consent=CONSENT)
    assert len(list(two.client.animate("alice", landmark_requests(seq)))) == 3, "made on 1, animated on 2"
    assert not two.client.last_started.personalised

    first = worker(cluster, "w1")
    second = None
    try:
        operation = one.client.personalise("alice", steps=STEPS)
        for progress in two.client.watch_operation(operation.name):  # followed on the other replica
            if progress.metadata.step >= 2:
                break
        first.send_signal(signal.SIGKILL)  # mid fine-tuning
        first.wait()
        killed_at = progress.metadata.step
        second = worker(cluster, "w2")
        done = two.client.wait_operation(operation.name, timeout=900)
        finished = time.monotonic()
        assert done.metadata.state == ops.OPERATION_STATE_SUCCEEDED, done.error
        assert done.metadata.attempt == 2 and done.metadata.worker == "w2", done.metadata
        assert killed_at < STEPS
        for replica in (one, two):
            frames = replica.client.animate("alice", landmark_requests(seq))
            next(frames)
            if replica is one:
                assert time.monotonic() - finished < 2.0, "first personalised frame within 2 s"
            list(frames)
            assert replica.client.last_started.personalised
        assert all(model_ready(t, "generator_alice") for t in tritons), "both Tritons serve it"
        queue = connect(cluster["redis"].url)  # type: ignore[attr-defined]
        assert queue.xpending(keys.JOB_STREAM, keys.WORKERS_GROUP)["pending"] == 0, "no job left behind"

        two.client.delete_avatar("alice")
        deadline = time.monotonic() + 60
        while (cluster["repo"] / "generator_alice").exists() or any(  # type: ignore[operator]
            model_ready(t, "generator_alice") for t in tritons
        ):
            assert time.monotonic() < deadline, "the deleted avatar's generator is still served"
            time.sleep(0.5)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(30)


@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_a_replica_killed_mid_create_leaves_no_half_avatar(cluster: dict[str, object], delay: float) -> None:
    tritons: list[Triton] = cluster["tritons"]  # type: ignore[assignment]
    victim = Replica(
        redis_url=cluster["redis"].url,  # type: ignore[attr-defined]
        triton_url=tritons[0].url,
        repo=cluster["repo"],  # type: ignore[arg-type]
        log=cluster["work"] / "victim.log",  # type: ignore[operator]
    )
    avatar_id = f"bob-{int(delay * 1000)}"
    outcome: list[object] = []
    creating = threading.Thread(
        target=lambda: outcome.append(
            _try(lambda: victim.client.create_avatar(avatar_id, [PORTRAIT] * 8, consent=CONSENT))
        )
    )
    creating.start()
    time.sleep(delay)
    victim.kill()
    creating.join(30)
    raw = connect(cluster["redis"].url).hgetall(keys.avatar(avatar_id))  # type: ignore[attr-defined]
    assert set(raw) in (set(), FIELDS), f"a half-written avatar: {sorted(raw)}"
    one = cluster["replicas"][0]  # type: ignore[index]
    if raw:
        assert one.client.get_avatar(avatar_id).image_count == 8
    else:
        with pytest.raises(grpc.RpcError) as gone:
            one.client.get_avatar(avatar_id)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert avatar_id not in {a.avatar_id for a in one.client.list_avatars()}


def _try(call: object) -> object:
    try:
        return call()  # type: ignore[operator]
    except grpc.RpcError as error:
        return error
