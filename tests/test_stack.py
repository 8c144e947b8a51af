"""The whole local stack (`make up` / `make down`): Redis, Triton, the service on the triton backend,
the personalisation worker, Prometheus.

Brings the stack up on free ports through deploy/local/stack.py (the launcher `make up` runs),
creates an avatar and streams landmark frames through the service with the client library,
personalises the avatar (2 steps) through the worker and streams its own generator, waits
until Prometheus has scraped the service's and Triton's latency metrics, then tears the stack down
and checks that none of its processes is left and its ports are free. Skips, saying why, only where
no prometheus or redis-server binary can be found or installed, or where the bundled Triton server
cannot run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from deploy.local import stack
from export.repository import TEMPLATE_FILE
from tests.redis_fixtures import redis_binary

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "deploy" / "local" / "stack.py"
TRITON_VENV = ROOT / ".venv-triton"
PORTRAIT = ROOT / "facekit" / "assets" / "demo_portrait.png"
DRIVER = ROOT / "facekit" / "assets" / "demo_driver.npz"
FRAMES = 20


def free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def prometheus_binary() -> str:
    """A prometheus binary; installs Debian's package through `make prometheus` when there is none."""
    with contextlib.suppress(Exception):
        return str(stack.find_prometheus(None))
    if shutil.which("make"):
        subprocess.run(
            ["make", "-s", "prometheus"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=600,
            check=False,
        )
    try:
        return str(stack.find_prometheus(None))
    except stack.StackError as error:
        pytest.skip(f"prometheus cannot be found or installed here: {error}")


def launcher(action: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LAUNCHER), action, *args],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "TALKINGHEAD_WATERMARK_KEY"},  # the stack's own
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def query(prometheus_port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def scalar(prometheus_port: int, promql: str) -> float:
    """The single value of a query (NaN when it has no result yet)."""
    result = query(prometheus_port, promql)
    return float(result[0]["value"][1]) if result else math.nan


def wait_for(prometheus_port: int, checks: dict[str, float], timeout: float = 45.0) -> dict[str, float]:
    """Poll until every query's value reaches its minimum; fail listing the ones that did not."""
    deadline = time.monotonic() + timeout
    while True:
        values = {promql: scalar(prometheus_port, promql) for promql in checks}
        missing = {q: v for q, v in values.items() if not v >= checks[q]}  # NaN fails too
        if not missing:
            return values
        if time.monotonic() > deadline:
            pytest.fail(
                f"Prometheus did not scrape the expected values within {timeout:.0f} s: "
                + "; ".join(f"{q} = {v} (want >= {checks[q]})" for q, v in missing.items())
            )
        time.sleep(0.2)  # (Prometheus scrapes every 1 s)


def repository(request: pytest.FixtureRequest) -> Path:
    """model_repository/ when `make model-repository` built it, else a fresh export."""
    built = ROOT / "model_repository"
    if (built / "generator" / "config.pbtxt").is_file() and (built / "embedder" / "config.pbtxt").is_file():
        return built
    return Path(request.getfixturevalue("exported")[0])


def private_copy(source: Path, target: Path) -> Path:
    for name in ("embedder", "generator"):
        shutil.copytree(source / name, target / name)
    return target


def test_stack_up_stream_scrape_down(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from client.library import Client, demo_portrait_consent, describe_error, landmark_requests
    from facekit.ids import DEFAULT_TENANT
    from facekit.sequence import LandmarkSequence
    from facekit.watermark import Watermarker, payload_for

    try:
        from deploy.local import tritonserver

        tritonserver.server_root(TRITON_VENV)
    except FileNotFoundError as error:
        pytest.skip(f"bundled Triton server unavailable: {error}")
    prometheus = prometheus_binary()
    redis_binary()  # installs Debian's package or skips

    names = [
        "triton_http",
        "triton_grpc",
        "triton_metrics",
        "grpc",
        "metrics",
        "worker_metrics",
        "prometheus",
        "redis",
    ]
    ports = stack.Ports(**dict(zip(names, free_ports(len(names)), strict=True)))
    state = tmp_path / "stack"
    repo = private_copy(repository(request), tmp_path / "repo")  # the worker writes into it
    template = any((repo / "generator").glob(f"*/{TEMPLATE_FILE}"))  # `make model-repository` wrote one
    args = [
        "--state",
        str(state),
        "--repository",
        str(repo),
        "--triton-venv",
        str(TRITON_VENV),
        "--prometheus",
        prometheus,
        "--timeout",
        "90",
        *(arg for name in names for arg in (f"--{name.replace('_', '-')}-port", str(getattr(ports, name)))),
    ]
    layout = stack.Layout(state=state)

    def logs() -> str:
        return "\n".join(f"--- {name}.log:\n{stack.tail(layout.log(name), 40)}" for name in stack.COMPONENTS)

    pids: dict[str, int] = {}
    try:
        started = launcher("up", *args)
        assert started.returncode == 0, f"stack up failed:\n{started.stdout}\n{started.stderr}\n{logs()}"
        assert "talkinghead stack is up" in started.stdout
        # a key of its own, made once, readable by this user only: every frame it serves is marked
        assert layout.watermark_key.stat().st_mode & 0o777 == 0o600
        key = layout.watermark_key.read_text().strip()
        assert len(key) >= 32 and f"key {layout.watermark_key}" in started.stdout, started.stdout
        for name in stack.COMPONENTS:
            assert layout.pid_file(name).is_file(), f"no pid file for {name}"
            pids[name] = int(layout.pid_file(name).read_text())
        assert all(layout.log(name).is_file() for name in stack.COMPONENTS)

        again = launcher("up", *args, timeout=60)  # idempotent: nothing new starts
        assert again.returncode == 0, again.stderr
        assert again.stdout.count("already running") == len(stack.COMPONENTS), again.stdout
        assert {name: int(layout.pid_file(name).read_text()) for name in stack.COMPONENTS} == pids
        assert layout.watermark_key.read_text().strip() == key, "the key changed under a running stack"

        seq = LandmarkSequence.load(DRIVER)
        seq = LandmarkSequence(seq.points[:FRAMES], seq.frame_size, seq.fps)
        try:
            with Client(target=f"127.0.0.1:{ports.grpc}", timeout=60) as client:
                assert client.health() == "SERVING"
                client.create_avatar("stacktest", [PORTRAIT], consent=demo_portrait_consent())
                frames = list(client.animate("stacktest", landmark_requests(seq)))
                tuned = client.personalise("stacktest", steps=2, wait=True, timeout=300)
                assert tuned.response.model_name == "generator_stacktest", tuned
                list(client.animate("stacktest", landmark_requests(seq)))
                assert client.last_started is not None and client.last_started.personalised
        except Exception as error:  # grpc.RpcError and decoding problems: say where it broke
            detail = describe_error(error) if hasattr(error, "code") else repr(error)
            pytest.fail(f"the service on the triton backend failed: {detail}\n{logs()}")
        if template:  # the worker's first job wrote the avatar's generator from it: nothing traced
            worker = layout.log("worker").read_text()
            assert f"starts from the graph of {repo}/generator/" in worker, worker[-3000:]
            assert f"/{TEMPLATE_FILE}" in worker and "exporting in full" not in worker, worker[-3000:]
        # the worker fine-tunes on the CPU the streams leave (deploy/local/stack.py)
        assert "CPU scheduling: idle, nice 0" in layout.log("worker").read_text()
        assert [f.sequence for f in frames] == list(range(FRAMES))
        wm = Watermarker(key=key)
        assert client.last_started.watermark_key_id == wm.fingerprint
        for frame in (frames[0], frames[-1]):
            found = wm.detect(frame.image)
            assert found.present and found.payload == payload_for(DEFAULT_TENANT, "stacktest"), found
        assert all(f.image.shape == frames[0].image.shape and f.image.std() > 0 for f in frames)

        values = wait_for(
            ports.prometheus,
            {
                'min(up{job=~"talkinghead|triton"})': 1,
                # the service's latency histograms: every frame of both streams observed end to end
                'sum(talkinghead_stage_seconds_bucket{stage="end_to_end",le="+Inf"})': 2 * FRAMES,
                'sum(talkinghead_stage_seconds_count{stage="inference"})': 1,
                # Triton's latency counters and summaries of the generator
                'sum(nv_inference_request_duration_us{model="generator"})': 1,
                'sum(nv_inference_compute_infer_duration_us{model="generator"})': 1,
                'sum(nv_inference_request_summary_us_count{model="generator"})': 1,
                # the worker's: the personalisation it ran, and its queue answering
                'sum(talkinghead_worker_jobs_total{kind="personalise",outcome="succeeded"})': 1,
                'min(talkinghead_worker_queue_up{component="worker"})': 1,
            },
        )
        p95 = scalar(
            ports.prometheus,
            'histogram_quantile(0.95, sum by (le) (talkinghead_stage_seconds_bucket{stage="end_to_end"}))',
        )
        assert 0 < p95 < math.inf, (p95, values)
        # what deploy/local/README.md tells an operator to ask, as pasted from its table
        table = (ROOT / "deploy" / "local" / "README.md").read_text().split("| question | query |", 1)[1]
        asked = re.findall(r"^\| (.+?) \| `(.+?)`", table.split("\n\n", 1)[0], re.M)
        assert len(asked) >= 10, table[:500]
        for question, promql in asked:
            assert query(ports.prometheus, promql.replace("\\|", "|")) is not None, question
        # Over 10 minutes: the last frames may be more than a minute old on a busy machine. NaN (0/0)
        # until Prometheus has seen the count rise between two scrapes: the first stream can end
        # before Prometheus (started last) first scrapes the service, so wait for the second one's
        # frames (above) and poll (CI failed twice reading it at once, nothing risen yet).
        mean_query = dict(asked)["frames per generator call (mean)"].replace("[1m]", "[10m]")
        mean = wait_for(ports.prometheus, {mean_query: 1})[mean_query]
        assert mean <= 16, f"frames per generator call: {mean}"  # (a median of batch 1 read 0.5)
        page = re.search(r"^  alerts +(\S+)", started.stdout, re.M)
        assert page is not None and tritonserver.http_ok(page[1]), started.stdout
    finally:
        stopped = launcher("down", "--state", str(state), timeout=120)
    assert stopped.returncode == 0, f"stack down failed:\n{stopped.stdout}\n{stopped.stderr}"
    assert "nothing running" in stopped.stdout
    for name, pid in pids.items():
        assert not tritonserver.group_alive(pid), f"{name} (process group {pid}) still running after down"
        assert not layout.pid_file(name).exists(), f"{name}.pid left behind"
    busy = [port for port in (getattr(ports, name) for name in names) if stack.listening(port)]
    assert not busy, f"ports still in use after down: {busy}"
    assert all(layout.log(name).stat().st_size > 0 for name in stack.COMPONENTS), "logs are kept"


def test_down_without_a_stack_is_a_no_op(tmp_path: Path) -> None:
    result = launcher("down", "--state", str(tmp_path / "none"), timeout=30)
    assert result.returncode == 0, result.stderr
    assert "nothing running" in result.stdout


def test_down_removes_the_shared_memory_a_killed_triton_left(tmp_path: Path) -> None:
    """A stack whose Triton was SIGKILLed (an OOM kill): its pid file is stale, and its python
    backend's /dev/shm regions stayed, for good before. `down` removes those no process maps."""
    from deploy.local import tritonserver

    if not tritonserver.SHM_DIR.is_dir():
        pytest.skip("no /dev/shm here")
    state = tmp_path / "stack"
    state.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (state / "triton.pid").write_text(str(gone.pid))
    left = tritonserver.SHM_DIR / f"{tritonserver.SHM_PREFIX}{uuid.uuid4()}"
    left.write_bytes(b"\0" * 4096)
    old = time.time() - 60
    os.utime(left, (old, old))
    try:
        result = launcher("down", "--state", str(state), timeout=30)
        assert result.returncode == 0, result.stderr
        assert "triton: not running (stale pid file removed)" in result.stdout
        assert not left.exists(), "the killed Triton's region is still there"
    finally:
        left.unlink(missing_ok=True)


def test_up_refuses_a_port_in_use(tmp_path: Path) -> None:
    """A port held by another program (a `make triton` server, say) stops `up` before it starts anything."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        others = free_ports(5)
        result = launcher(
            "up",
            "--state",
            str(tmp_path / "stack"),
            "--triton-http-port",
            str(port),
            *(
                arg
                for flag, p in zip(
                    ("triton-grpc", "triton-metrics", "grpc", "metrics", "prometheus"), others, strict=True
                )
                for arg in (f"--{flag}-port", str(p))
            ),
            timeout=60,
        )
    assert result.returncode == 1
    assert f"triton http port {port}" in result.stderr and "in use" in result.stderr
    assert not list((tmp_path / "stack").glob("*.pid"))


def test_a_worker_is_ready_on_its_own_announcement_not_a_killed_ones(tmp_path: Path) -> None:
    """A worker killed a moment ago leaves its Redis key for up to 15 s: `make up` called the new
    worker ready on it ("ready after 0.4 s") 50 s before that worker first asked for a job."""
    from jobs import keys
    from jobs.redis_queue import connect
    from tests.redis_fixtures import RedisServer

    redis = RedisServer(workdir=tmp_path / "redis")
    try:
        client = connect(redis.url)
        launched = time.time()
        client.set(keys.worker(stack.WORKER_NAME), str(launched - 5), ex=15)  # the killed worker's
        assert stack.worker_listening(redis.url)  # any announcement (`status`)
        assert not stack.worker_listening(redis.url, since=launched)
        client.set(keys.worker(stack.WORKER_NAME), str(time.time()), ex=15)  # the new worker's first
        assert stack.worker_listening(redis.url, since=launched)
        client.close()
    finally:
        redis.stop()


def test_a_second_up_names_the_key_the_running_service_marks_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`TALKINGHEAD_WATERMARK_KEY=other make up` on a running stack said "key
    $TALKINGHEAD_WATERMARK_KEY" and dropped the export line, while the service it left running
    kept marking with var/stack/watermark.key."""
    layout = stack.Layout(state=tmp_path)
    own = str(layout.watermark_key)
    assert stack.service_key_from(layout, started=True, key_from=own) == own  # the first up starts it
    assert capsys.readouterr().out == ""
    assert stack.service_key_from(layout, started=False, key_from="$TALKINGHEAD_WATERMARK_KEY") == own
    said = capsys.readouterr().out
    assert f"the running service marks with its key from {own}, not $TALKINGHEAD_WATERMARK_KEY" in said
    assert stack.service_key_from(layout, started=False, key_from=own) == own  # the same: nothing said
    assert capsys.readouterr().out == ""
