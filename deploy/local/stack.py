"""The whole stack on one machine: Redis, Triton, the service on the triton backend, the
personalisation worker, Prometheus.

    python deploy/local/stack.py up      # `make up`: start what is not running, wait until ready
    python deploy/local/stack.py status  # `make stack-status`
    python deploy/local/stack.py down    # `make down`: stop everything, keep the logs

Everything listens on 127.0.0.1. Each process runs in its own process group (so stopping it
reaches Triton's python-backend stubs too); its pid is written to <state>/<name>.pid and its
output to <state>/logs/<name>.log (appended, one header line per start). `up` is idempotent: a
component whose pid file names a live process of the right kind is left alone. `down` sends
SIGTERM to each group, SIGKILL after a grace period, checks that the groups are gone and the
ports free, and removes the pid files.

Run it with the project's virtual environment (.venv/bin/python): the service's readiness is
checked with grpc.health.v1 (grpcio-health-checking). `down` and `status` need only the stdlib;
without the venv `status` cannot ask the service and the worker whether they are ready, and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import string
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: the `deploy` package lives at the root

from deploy.local import tritonserver  # noqa: E402  (stdlib only, like this file)
from deploy.local.tritonserver import http_ok, terminate  # noqa: E402
from facekit.keyfile import read_or_make  # noqa: E402  (stdlib only)
from facekit.procstat import alive, cmdline  # noqa: E402  (stdlib only)

COMPONENTS = ("redis", "triton", "service", "worker", "prometheus")  # start order; stopped in reverse
MARKERS = {
    "redis": "redis-server",
    "triton": "tritonserver",
    "service": "talkinghead.cli",
    "worker": "talkinghead.cli",
    "prometheus": "prometheus",
}
STOP_GRACE_S = {"redis": 10.0, "triton": 15.0, "service": 20.0, "worker": 20.0, "prometheus": 10.0}
WORKER_NAME = "stack-worker"
WATERMARK_KEY_ENV = "TALKINGHEAD_WATERMARK_KEY"  # facekit.watermark.KEY_ENV (not imported: numpy, OpenCV)
PROMETHEUS_CANDIDATES = ("/usr/bin/prometheus", "/usr/local/bin/prometheus")


class StackError(RuntimeError):
    """Something the user has to act on; the message says what."""


@dataclass(frozen=True, kw_only=True)
class Ports:
    triton_http: int = 8000
    triton_grpc: int = 8001
    triton_metrics: int = 8002
    grpc: int = 50051
    metrics: int = 8080
    worker_metrics: int = 8081
    prometheus: int = 9090
    redis: int = 6379

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis}/0"

    def of(self, name: str) -> dict[str, int]:
        """The ports one component listens on, by role."""
        if name == "redis":
            return {"redis": self.redis}
        if name == "worker":
            return {"metrics": self.worker_metrics}
        if name == "triton":
            return {"http": self.triton_http, "grpc": self.triton_grpc, "metrics": self.triton_metrics}
        if name == "service":
            return {"grpc": self.grpc, "metrics": self.metrics}
        return {"http": self.prometheus}


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where a stack keeps its state."""

    state: Path

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    def pid_file(self, name: str) -> Path:
        return self.state / f"{name}.pid"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    @property
    def ports_file(self) -> Path:
        return self.state / "ports.json"

    @property
    def watermark_key(self) -> Path:
        return self.state / "watermark.key"

    @property
    def service_key_from(self) -> Path:
        """Where the running service's watermark key came from, written when `up` starts it."""
        return self.state / "service-key-from"

    @property
    def prometheus_config(self) -> Path:
        return self.state / "prometheus.yml"

    @property
    def prometheus_rules(self) -> Path:
        return self.state / "alerts.yml"

    @property
    def prometheus_data(self) -> Path:
        return self.state / "prometheus-data"

    @property
    def triton_state(self) -> Path:
        return self.state / "triton"


# -- processes -------------------------------------------------------------------------------------


def read_pid(layout: Layout, name: str) -> int | None:
    """The pid in <name>.pid when that process is alive and is the right program, else None."""
    path = layout.pid_file(name)
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if alive(pid) and MARKERS[name] in cmdline(pid):
        return pid
    return None


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join("    " + line for line in text)


def launch(layout: Layout, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    layout.logs.mkdir(parents=True, exist_ok=True)
    log = layout.log(name)
    with log.open("ab") as out:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"==== {stamp} stack.py starts {name}: {' '.join(cmd)}\n".encode())
        out.flush()
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,  # its own process group: `down` reaches every child
        )
    layout.pid_file(name).write_text(f"{process.pid}\n")
    return process


def wait_until(
    name: str, process: subprocess.Popen[bytes] | None, pid: int, check: Callable[[], bool], timeout: float
) -> None:
    """Poll `check` until it holds; fail early when the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (process.poll() is not None) if process is not None else not alive(pid):
            code = f" with code {process.returncode}" if process is not None else ""
            raise StackError(f"{name} exited{code} before it was ready")
        if check():
            return
        time.sleep(0.25)
    raise StackError(f"{name} was not ready within {timeout:.0f} s")


# -- readiness -------------------------------------------------------------------------------------


def service_serving(port: int) -> bool:
    """grpc.health.v1 Check of the whole server == SERVING (the backend follows Triton)."""
    try:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError:  # `status` without the venv (it says so)
        return False

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def redis_ping(port: int) -> bool:
    """Redis answers PING with +PONG (stdlib: a RESP inline command)."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    return False


def worker_listening(url: str, since: float = 0.0) -> bool:
    """The worker announces itself in Redis (jobs.keys.worker: the time it last asked for a job)
    each time it asks for a job; with `since`, an announcement from then on (a worker killed a
    moment ago leaves its key for up to 15 s, and a new one was called ready on it)."""
    with contextlib.suppress(Exception):  # no redis-py (`status` without the venv): not ready
        from jobs import keys
        from jobs.redis_queue import connect

        client = connect(url)
        try:
            stamp = client.get(keys.worker(WORKER_NAME))
            return stamp is not None and float(stamp) >= since
        finally:
            client.close()
    return False


STARTED: dict[str, float] = {}  # component -> when this `up` launched it (time.time())


def checks(ports: Ports) -> dict[str, Callable[[], bool]]:
    return {
        "redis": lambda: redis_ping(ports.redis),
        "worker": lambda: worker_listening(ports.redis_url, since=STARTED.get("worker", 0.0)),
        "triton": lambda: http_ok(f"http://127.0.0.1:{ports.triton_http}/v2/health/ready"),
        "service": lambda: service_serving(ports.grpc),
        "prometheus": lambda: http_ok(f"http://127.0.0.1:{ports.prometheus}/-/ready"),
    }


# -- commands of the five components ---------------------------------------------------------------


def find_prometheus(explicit: str | None) -> str:
    for candidate in (explicit, os.environ.get("PROMETHEUS"), shutil.which("prometheus")):
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            return shutil.which(candidate) or candidate
    for candidate in PROMETHEUS_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    raise StackError(
        "no prometheus binary: `make up` installs Debian's package "
        "(apt-get install prometheus); or pass --prometheus /path/to/prometheus"
    )


def render_prometheus_config(layout: Layout, ports: Ports, scrape_interval: str) -> Path:
    """<state>/prometheus.yml, and beside it the alerting rules it loads (<state>/alerts.yml),
    rendered from the chart's source of them (deploy/local/alerts.py)."""
    from deploy.local import alerts  # (PyYAML: `up` runs with the venv; `down`/`status` need not)

    budget = os.environ.get("TALKINGHEAD_LATENCY_BUDGET_MS")  # the service's, as it reads it
    layout.state.mkdir(parents=True, exist_ok=True)
    alerts.rules_file(layout.prometheus_rules, latency_budget_ms=int(budget) if budget else None)
    template = string.Template((HERE / "prometheus.yml.in").read_text())
    text = template.substitute(
        scrape_interval=scrape_interval,
        service_metrics_port=ports.metrics,
        worker_metrics_port=ports.worker_metrics,
        triton_metrics_port=ports.triton_metrics,
        prometheus_port=ports.prometheus,
        rules_file=layout.prometheus_rules.resolve(),
    )
    layout.prometheus_config.write_text(text)
    return layout.prometheus_config


def triton_command(
    args: argparse.Namespace, layout: Layout, ports: Ports
) -> tuple[list[str], dict[str, str]]:
    repository = args.repository.resolve()
    if not (repository / "generator" / "config.pbtxt").is_file():
        raise StackError(f"no model repository in {repository}: run `make model-repository`")
    try:
        tritonserver.server_root(args.triton_venv)
    except FileNotFoundError as error:
        raise StackError(str(error)) from error
    models = sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))
    tritonserver.sweep_shm()  # what a Triton killed before its cleanup left
    cmd = tritonserver.command(
        repository,
        args.triton_venv,
        layout.triton_state,
        tritonserver.Ports(http=ports.triton_http, grpc=ports.triton_grpc, metrics=ports.triton_metrics),
        explicit=True,
        load=models,
    )
    # Triton's latency metrics are counters (sum of microseconds); summaries add p50/p90/p95/p99
    # of each model's request, queue and compute times (nv_inference_request_summary_us, ...).
    cmd.append("--metrics-config=summary_latencies=true")
    return cmd, tritonserver.environment(args.triton_venv)


def watermark_key(layout: Layout) -> tuple[str, str]:
    """The key the stack's service marks every frame with, and where it came from:
    $TALKINGHEAD_WATERMARK_KEY, else the stack's own, a random one made once in <state>/watermark.key
    (mode 0600, kept by `down`: videos of earlier runs still verify). Before, the stack ran without
    one and sent unmarked frames."""
    if key := os.environ.get(WATERMARK_KEY_ENV, ""):
        return key, f"${WATERMARK_KEY_ENV}"
    try:
        key = read_or_make(layout.watermark_key)
    except ValueError as error:
        raise StackError(f"the watermark key: {error}") from None
    return key, str(layout.watermark_key)


def service_command(args: argparse.Namespace, ports: Ports, key: str) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    env.update(
        {
            WATERMARK_KEY_ENV: key,
            "PYTHONUNBUFFERED": "1",
            "TALKINGHEAD_HOST": "127.0.0.1",
            "TALKINGHEAD_GRPC_PORT": str(ports.grpc),
            "TALKINGHEAD_METRICS_PORT": str(ports.metrics),
            "TALKINGHEAD_BACKEND": "triton",
            "TALKINGHEAD_TRITON_URL": f"127.0.0.1:{ports.triton_grpc}",
            "TALKINGHEAD_MODEL_REPOSITORY": str(args.repository.resolve()),
            "TALKINGHEAD_REDIS_URL": ports.redis_url,  # avatars and jobs in Redis
            "TALKINGHEAD_WORKER": "external",  # the stack's own worker process
        }
    )
    for key in ("TALKINGHEAD_TLS_CERT", "TALKINGHEAD_TLS_KEY"):  # the local stack speaks plaintext
        env.pop(key, None)
    return [args.python, "-m", "talkinghead.cli", "serve"], env


def redis_command(layout: Layout, ports: Ports) -> tuple[list[str], dict[str, str]]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).is_file():
        raise StackError(
            "no redis-server binary: `make up` installs Debian's package (apt-get install redis-server)"
        )
    data = layout.state / "redis"
    data.mkdir(parents=True, exist_ok=True)
    cmd = [binary, "--bind", "127.0.0.1", "--port", str(ports.redis), "--dir", str(data.resolve())]
    return [*cmd, "--appendonly", "yes", "--save", ""], dict(os.environ)


def worker_command(args: argparse.Namespace, ports: Ports) -> tuple[list[str], dict[str, str]]:
    cmd = [
        args.python,
        "-m",
        "talkinghead.cli",
        "worker",
        "--redis-url",
        ports.redis_url,
        "--name",
        WORKER_NAME,
    ]
    cmd += ["--repository", str(args.repository.resolve()), "--checkpoint", str(args.checkpoint.resolve())]
    cmd += ["--triton-url", f"127.0.0.1:{ports.triton_grpc}", "--metrics-port", str(ports.worker_metrics)]
    # On the machine Triton runs on, fine-tuning takes only the CPU streams leave, as the embedded
    # worker does (service/local_worker.py). Started in a session of its own (`launch`), the worker
    # lowers that session's autogroup too (facekit/scheduling.py): a policy alone ranks threads
    # only within a group. One live stream at 25 fps beside a job, 15 s, 2 cores: before, p50 / p99
    # 108-119 / 175 ms and 23-195 of 375 frames dropped; now 56-57 / 73-74 ms, none dropped, the
    # job 20-21 steps.
    cmd += ["--cpu-scheduling", "idle", "--threads", "1"]
    return cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}


def prometheus_command(
    args: argparse.Namespace, layout: Layout, ports: Ports
) -> tuple[list[str], dict[str, str]]:
    binary = find_prometheus(args.prometheus)
    config = render_prometheus_config(layout, ports, args.scrape_interval)
    layout.prometheus_data.mkdir(parents=True, exist_ok=True)
    cmd = [
        binary,
        f"--config.file={config.resolve()}",
        f"--storage.tsdb.path={layout.prometheus_data.resolve()}",
        "--storage.tsdb.retention.time=7d",
        f"--web.listen-address=127.0.0.1:{ports.prometheus}",
        "--log.level=info",
    ]
    return cmd, dict(os.environ)


# -- up / down / status ----------------------------------------------------------------------------


def ports_from(args: argparse.Namespace) -> Ports:
    return Ports(
        triton_http=args.triton_http_port,
        triton_grpc=args.triton_grpc_port,
        triton_metrics=args.triton_metrics_port,
        grpc=args.grpc_port,
        metrics=args.metrics_port,
        worker_metrics=args.worker_metrics_port,
        prometheus=args.prometheus_port,
        redis=args.redis_port,
    )


def recorded_ports(layout: Layout) -> Ports | None:
    with contextlib.suppress(OSError, ValueError, TypeError):
        return Ports(**json.loads(layout.ports_file.read_text()))
    return None


def check_ports(layout: Layout, ports: Ports, running: dict[str, int | None]) -> None:
    """Refuse to start when this stack runs on other ports, or another program holds one of ours."""
    previous = recorded_ports(layout)
    if any(running.values()) and previous is not None and previous != ports:
        names = ", ".join(name for name, pid in running.items() if pid)
        raise StackError(
            f"{names} already running in {layout.state} with other ports ({asdict(previous)}); "
            "run `make down` first to change ports"
        )
    # Ports of components that are not ours must be free before anything starts.
    busy = [
        f"{name} {role} port {port}"
        for name in COMPONENTS
        if not running[name]
        for role, port in ports.of(name).items()
        if listening(port)
    ]
    if busy:
        raise StackError(
            "in use by another program: "
            + ", ".join(busy)
            + " (a `make triton` server? stop it with `make triton-stop`; a Prometheus started by "
            "Debian's unit? `systemctl stop prometheus`), or choose other ports, e.g. "
            "`make up STACK_TRITON_HTTP_PORT=18000 ...` (deploy/local/README.md)"
        )


def start_component(
    layout: Layout,
    name: str,
    pid: int | None,
    build: Callable[[], tuple[list[str], dict[str, str]]],
    ready: Callable[[], bool],
    timeout: float,
    started: list[tuple[str, int]],
) -> None:
    """Start `name` unless `pid` says it runs (recording it in `started`), then wait until `ready`."""
    process = None
    if pid is not None:
        print(f"{name}: already running (pid {pid})", flush=True)
    else:
        layout.pid_file(name).unlink(missing_ok=True)  # stale
        cmd, env = build()
        STARTED[name] = time.time()
        process = launch(layout, name, cmd, env)
        pid = process.pid
        started.append((name, pid))
        print(f"{name}: started (pid {pid}), waiting until ready ...", flush=True)
    t0 = time.monotonic()
    try:
        wait_until(name, process, pid, ready, timeout)
    except StackError as error:
        raise StackError(f"{error}; last lines of {layout.log(name)}:\n{tail(layout.log(name))}") from None
    if process is not None:
        print(f"{name}: ready after {time.monotonic() - t0:.1f} s", flush=True)


def stop_started(layout: Layout, started: list[tuple[str, int]]) -> None:
    """Undo a failed `up`: stop what it started, newest first."""
    for name, pid in reversed(started):
        terminate(pid, STOP_GRACE_S[name])
        layout.pid_file(name).unlink(missing_ok=True)
    if not any(read_pid(layout, name) for name in COMPONENTS):
        layout.ports_file.unlink(missing_ok=True)


def up(args: argparse.Namespace) -> int:
    layout = Layout(state=args.state)
    ports = ports_from(args)
    layout.state.mkdir(parents=True, exist_ok=True)
    running = {name: read_pid(layout, name) for name in COMPONENTS}
    check_ports(layout, ports, running)
    layout.ports_file.write_text(json.dumps(asdict(ports)) + "\n")
    ready = checks(ports)
    key, key_from = watermark_key(layout)
    builders: dict[str, Callable[[], tuple[list[str], dict[str, str]]]] = {
        "redis": lambda: redis_command(layout, ports),
        "triton": lambda: triton_command(args, layout, ports),
        "service": lambda: service_command(args, ports, key),
        "worker": lambda: worker_command(args, ports),
        "prometheus": lambda: prometheus_command(args, layout, ports),
    }
    started: list[tuple[str, int]] = []
    try:
        for name in COMPONENTS:
            start_component(layout, name, running[name], builders[name], ready[name], args.timeout, started)
    except BaseException as error:
        stop_started(layout, started)
        if isinstance(error, StackError):
            what = ", ".join(name for name, _ in started) or "nothing"
            raise StackError(f"{error}\n(stopped what this run started: {what})") from None
        raise
    key_from = service_key_from(layout, started=running["service"] is None, key_from=key_from)
    print(summary(layout, ports, args, key_from))
    return 0


def service_key_from(layout: Layout, *, started: bool, key_from: str) -> str:
    """Where the running service's key came from: this run's, recorded, when this run started it;
    else what its own start recorded. A second `up` with another $TALKINGHEAD_WATERMARK_KEY said
    that key marked the frames, while the running service marked with the one it started with."""
    if started:
        layout.service_key_from.write_text(key_from + "\n")
        return key_from
    try:
        recorded = layout.service_key_from.read_text().strip()
    except OSError:
        recorded = "unknown (the service was started before this record was kept)"
    if recorded != key_from:
        print(
            f"watermark: the running service marks with its key from {recorded}, not {key_from}: "
            "a key applies to a service this command starts (`make down` first)",
            flush=True,
        )
    return recorded


def summary(layout: Layout, ports: Ports, args: argparse.Namespace, key_from: str) -> str:
    logs = layout.logs
    server = f"127.0.0.1:{ports.grpc}"
    env = "" if ports.grpc == 50051 else f"TALKINGHEAD_SERVER={server} "
    prom = f"http://127.0.0.1:{ports.prometheus}"
    # Debian's Prometheus 2.42 has the classic UI only: /alerts answers 404 there
    alerts = f"{prom}/alerts" if tritonserver.http_ok(f"{prom}/alerts") else f"{prom}/classic/alerts"
    mine = key_from == str(layout.watermark_key)
    export = (
        f'  export {WATERMARK_KEY_ENV}="$(cat {layout.watermark_key})"   # animate checks the mark\n'
        if mine
        else ""
    )
    return f"""
talkinghead stack is up (state {layout.state}):
  redis       {ports.redis_url}  (avatars, the personalisation queue; data {layout.state / "redis"})
  service     gRPC {server}  (backend triton)  metrics http://127.0.0.1:{ports.metrics}/metrics
  worker      {WORKER_NAME}: fine-tunes from {args.checkpoint}, writes {args.repository}, loads into Triton  \
metrics http://127.0.0.1:{ports.worker_metrics}/metrics
  triton      gRPC 127.0.0.1:{ports.triton_grpc}  HTTP http://127.0.0.1:{ports.triton_http}  \
metrics http://127.0.0.1:{ports.triton_metrics}/metrics
  prometheus  {prom}  (config {layout.prometheus_config}, data {layout.prometheus_data})
  alerts      {alerts}  (rules {layout.prometheus_rules}: the chart's, deploy/README.md "Alerts")
  watermark   every frame marked, key {key_from}
logs:   {logs}/<component>.log   (tail -f {logs}/*.log)
stream:
{export}  {env}.venv/bin/talkinghead avatar create astronaut facekit/assets/demo_portrait.png \
--subject "Eileen Collins" --basis public-domain --source "NASA photograph" --collected-by me
  {env}.venv/bin/talkinghead avatar personalise astronaut --preset fast --wait
  {env}.venv/bin/talkinghead animate --avatar astronaut --driver facekit/assets/demo_driver.npz \
--out out/stack.mp4 --overwrite
latency (p95 of each stage over the last minute):
  curl -s {prom}/api/v1/query --data-urlencode \
'query=histogram_quantile(0.95, sum by (stage, le) (rate(talkinghead_stage_seconds_bucket[1m])))'
  more queries in deploy/local/README.md; graphs at {prom}/graph
stop:   make down   (logs are kept)"""


def down(args: argparse.Namespace) -> int:
    layout = Layout(state=args.state)
    ports = recorded_ports(layout)
    problems = []
    for name in reversed(COMPONENTS):
        path = layout.pid_file(name)
        if not path.exists():
            continue
        pid = read_pid(layout, name)
        if pid is None:
            print(f"{name}: not running (stale pid file removed)")
        elif terminate(pid, STOP_GRACE_S[name]):
            print(f"{name}: stopped (pid {pid})")
        else:
            problems.append(f"{name}: process group {pid} survived SIGKILL")
        path.unlink(missing_ok=True)
    tritonserver.sweep_shm()  # what a Triton killed before its cleanup left (a crash, a SIGKILL)
    if ports is not None:
        deadline = time.monotonic() + 5.0
        while True:
            busy = [
                f"{name} {role} {port}"
                for name in COMPONENTS
                for role, port in ports.of(name).items()
                if listening(port)
            ]
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if busy:
            problems.append("ports still in use (by a program this stack did not start?): " + ", ".join(busy))
        layout.ports_file.unlink(missing_ok=True)
    if problems:
        raise StackError("; ".join(problems))
    print(f"talkinghead stack: nothing running; logs kept in {layout.logs}")
    return 0


def status(args: argparse.Namespace) -> int:
    layout = Layout(state=args.state)
    ports = recorded_ports(layout) or ports_from(args)
    ready = checks(ports)
    ok = True
    for name in COMPONENTS:
        pid = read_pid(layout, name)
        where = ", ".join(f"{role} {port}" for role, port in ports.of(name).items())
        if pid is None:
            state, ok = "not running", False
        elif ready[name]():
            state = f"ready (pid {pid})"
        elif name in ("service", "worker") and not _venv_modules():
            state = f"running, readiness unknown (pid {pid})"
        else:
            state, ok = f"running, NOT ready (pid {pid})", False
        print(f"{name:<11} {state:<36} {where}   log {layout.log(name)}")
    if not _venv_modules():
        print("(without the project's venv, `make venv`, the service and the worker cannot be asked)")
    return 0 if ok else 1


def _venv_modules() -> bool:
    """grpcio-health-checking and redis-py: what asking the service and the worker needs."""
    try:
        import grpc_health  # noqa: F401
        import redis  # noqa: F401
    except ImportError:
        return False
    return True


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python deploy/local/stack.py",
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--state", type=Path, default=Path("var/stack"), help="pid files, logs, data")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--triton-venv", type=Path, default=Path(".venv-triton"))
    p.add_argument("--python", default=sys.executable, help="interpreter of the service (.venv)")
    p.add_argument("--prometheus", help="prometheus binary (default: $PROMETHEUS, then PATH)")
    p.add_argument(
        "--checkpoint", type=Path, default=Path("models/talkinghead-small.pt"), help="worker's model"
    )
    p.add_argument("--scrape-interval", default="1s", help="Prometheus scrape interval")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds each component gets to be ready")
    defaults = Ports()
    for field, default in asdict(defaults).items():
        flag = "--" + field.replace("_", "-") + "-port"
        p.add_argument(flag, dest=f"{field}_port", type=int, default=default, help=f"default {default}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    action = {"up": up, "down": down, "status": status}[args.action]
    try:
        return action(args)
    except StackError as error:
        print(f"stack {args.action}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
