"""Run the Triton server bundled in the nvidia-pytriton wheel on 127.0.0.1, for tests and `make triton`.

    python -m deploy.local.tritonserver start --repository model_repository   # returns once ready
    python -m deploy.local.tritonserver stop                                  # nothing left running

The wheel's tritonserver 2.51 has only the python backend, so the repository must be exported
with the `python` profile. Two pitfalls the launcher handles (../shared/DESIGN.md): the backend files are
copied into a backend directory of our own, and the python stub must find *this* interpreter's
libpython and the wheel's bundled libraries (PATH and LD_LIBRARY_PATH below). Stdlib only (the
local stack's `down` runs without the project's venv), besides facekit.procstat (stdlib only too);
`start` reads the default model names from facekit.contract.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from facekit.procstat import cmdline, stat_fields  # stdlib only, as this file

DEFAULT_VENV = Path(".venv-triton")
DEFAULT_STATE = Path("var/triton")


def _pid_namespace() -> int:
    with contextlib.suppress(OSError):
        return os.stat("/proc/self/ns/pid").st_ino
    return 0


# The python backend passes tensors through one /dev/shm region per model instance, named this
# prefix plus a uuid. A SIGKILLed Triton leaves its regions behind (1 MB or more each): see sweep_shm.
# The prefix names this PID namespace: a container sharing /dev/shm cannot see our processes, so
# its sweep must not take our regions for orphans (nor ours its).
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = f"talkinghead-local-{_pid_namespace()}-"
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True, kw_only=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> Ports:
        """Three ports free on 127.0.0.1 now (a server started on them at once gets them)."""
        with contextlib.ExitStack() as held:  # all bound at once: three different ports
            sockets = [held.enter_context(socket.socket()) for _ in range(3)]
            for s in sockets:
                s.bind(("127.0.0.1", 0))
            http, grpc, metrics = (int(s.getsockname()[1]) for s in sockets)
        return cls(http=http, grpc=grpc, metrics=metrics)


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{PY}" / "site-packages"


def server_root(venv: Path) -> Path:
    root = site_packages(venv) / "pytriton" / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise FileNotFoundError(f"no tritonserver in {root}: run `make triton-venv` (nvidia-pytriton wheel)")
    return root


def backend_dir(venv: Path, state: Path) -> Path:
    """A backend directory holding the python backend and the stub for this Python version."""
    root = server_root(venv)
    dest = state / "backends" / "python"
    dest.mkdir(parents=True, exist_ok=True)
    for src in (
        root / "backends" / "python" / "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py",
        root / "python_backend_stubs" / PY / "triton_python_backend_stub",
    ):
        # Copy then rename: a stub a killed Triton left running still executes the old file, and
        # writing over a running executable fails (ETXTBSY); replacing its directory entry does not.
        partial = dest / f".{src.name}.partial"
        shutil.copy2(src, partial)
        os.replace(partial, dest / src.name)
    return dest.parent


def environment(venv: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{(venv / 'bin').resolve()}{os.pathsep}{env.get('PATH', '')}"
    libs = [sysconfig.get_config_var("LIBDIR"), str((site_packages(venv) / "nvidia_pytriton.libs").resolve())]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    env.setdefault("TALKINGHEAD_ORT_THREADS", "0")
    return env


def command(
    repository: Path,
    venv: Path,
    state: Path,
    ports: Ports,
    *,
    explicit: bool,
    load: list[str],
    strict_readiness: bool = False,
) -> list[str]:
    cmd = [
        str(server_root(venv) / "bin" / "tritonserver"),
        f"--model-repository={repository.resolve()}",
        f"--backend-directory={backend_dir(venv, state).resolve()}",
        "--http-address=127.0.0.1",
        f"--http-port={ports.http}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={ports.grpc}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={ports.metrics}",
        "--allow-metrics=true",
        # As in the chart: with strict readiness, Triton is not ready for good once any model
        # failed to load (a personalised generator refused), even after it is unloaded.
        f"--strict-readiness={str(strict_readiness).lower()}",
        "--log-verbose=0",
        "--exit-timeout-secs=10",
        f"--backend-config=python,shm-region-prefix-name={SHM_PREFIX}",
    ]
    if explicit:
        cmd.append("--model-control-mode=explicit")
        cmd += [f"--load-model={name}" for name in load]
    return cmd


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether GET `url` answers 200 (readiness endpoints of Triton, Prometheus, ...)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def ready(ports: Ports) -> bool:
    return http_ok(f"http://127.0.0.1:{ports.http}/v2/health/ready")


@dataclass(kw_only=True)
class Server:
    """A started server: its process, ports and log file."""

    process: subprocess.Popen[bytes]
    ports: Ports
    log: Path

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{tail(self.log)}")
            if ready(self.ports):
                return
            time.sleep(0.1)
        stacks = self.dump_stacks()
        raise TimeoutError(
            f"tritonserver not ready after {timeout:.0f} s"
            f"{f' (its threads: {stacks})' if stacks else ''}:\n{tail(self.log)}"
        )

    def dump_stacks(self) -> Path | None:
        """Every thread's stack of the server and its python stubs, through gdb where there is one,
        into a file beside the log (a start that hangs: rare, and gone once the process is)."""
        gdb = shutil.which("gdb")
        if gdb is None:
            return None
        out = self.log.with_name("tritonserver-stacks.txt")
        deadline = time.monotonic() + 90.0  # for all of them: the wait has failed already
        with out.open("w") as f:
            for pid in group_members(self.process.pid):
                f.write(f"==== pid {pid}: {cmdline(pid)[:200] or '?'}\n")
                f.flush()
                left = deadline - time.monotonic()
                if left < 1.0:
                    f.write("(not read: out of time)\n")
                    continue
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(
                        [gdb, "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        timeout=min(30.0, left),
                    )
        return out

    def stop(self, timeout: float = 15.0) -> None:
        terminate(self.process.pid, timeout)
        self.process.wait()
        sweep_shm()


def mapped_shm(shm_dir: Path, pids: Iterable[int] | None = None) -> set[str]:
    """Names of the files in `shm_dir` that processes `pids` (default: every one this user may
    inspect) have mapped; those unlinked since ("(deleted)") are not there any more."""
    names: set[str] = set()
    procs = (Path(f"/proc/{pid}") for pid in pids) if pids is not None else Path("/proc").iterdir()
    for proc in procs:
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                for line in (proc / "maps").read_text(errors="replace").splitlines():
                    path = line.split(maxsplit=5)[5:]
                    if path and path[0].startswith(f"{shm_dir}/") and not path[0].endswith(" (deleted)"):
                        names.add(path[0][len(str(shm_dir)) + 1 :])
    return names


def tritons_running(proc: Path = Path("/proc")) -> bool:
    """Whether a tritonserver process (of any stack or test) is alive in this PID namespace."""
    for entry in proc.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "tritonserver":
                    return True
    return False


def sweep_shm(
    shm_dir: Path = SHM_DIR,
    prefix: str = SHM_PREFIX,
    min_age: float = 5.0,
    *,
    tritons: bool | None = None,
) -> list[str]:
    """Remove the shared-memory regions that local Tritons killed before their cleanup left: those
    named with our prefix, owned by this user, mapped by no process and, while some Triton is
    running (`tritons`; None: look), older than `min_age` seconds: a starting Triton's new region
    may not be mapped yet. With no Triton running every unmapped one is left over (`make down`
    right after a SIGKILL: those regions were written a moment ago). Returns the names removed."""
    if not shm_dir.is_dir():
        return []
    candidates = []
    for path in shm_dir.glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            info = path.stat()
            if info.st_uid == os.getuid():
                candidates.append((path, time.time() - info.st_mtime))
    # listed first, then looked: a region listed while no Triton is alive after was made by a dead one
    if candidates and (tritons_running() if tritons is None else tritons):
        candidates = [(path, age) for path, age in candidates if age >= min_age]
    if not candidates:
        return []
    in_use = mapped_shm(shm_dir)
    removed = []
    for path, _ in candidates:
        if path.name not in in_use:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path.name)
    return removed


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def start(
    repository: Path,
    *,
    venv: Path = DEFAULT_VENV,
    state: Path = DEFAULT_STATE,
    ports: Ports = Ports(),
    explicit: bool = True,
    load: list[str] | None = None,
    strict_readiness: bool = False,
) -> Server:
    """Start tritonserver in its own process group; call `wait_ready` before use."""
    if load is None:
        from facekit.contract import EMBEDDER, GENERATOR  # here, not at the top: stdlib-only module

        load = [EMBEDDER, GENERATOR]
    state.mkdir(parents=True, exist_ok=True)
    sweep_shm()
    log = state / "tritonserver.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command(
                repository,
                venv,
                state,
                ports,
                explicit=explicit,
                load=load,
                strict_readiness=strict_readiness,
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment(venv),
            start_new_session=True,  # its own group: stop() reaches the python stubs too
        )
    return Server(process=process, ports=ports, log=log)


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A group of zombies only (e.g. children of a test process that has not reaped them yet).
    return bool(group_members(pgid))


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`, its leader included."""
    members = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            fields = stat_fields(proc / "stat")
            if fields is not None and fields[2] == str(pgid) and fields[0] != "Z":
                members.append(int(proc.name))
    return sorted(members)


def _wait_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(0.1)
    return False


def terminate(pgid: int, grace: float) -> bool:
    """SIGTERM the process group, SIGKILL it after `grace` seconds; True when it is gone."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    if _wait_gone(pgid, grace):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    return _wait_gone(pgid, 5.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.tritonserver",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="pid file and log folder")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--load", nargs="*", help="models loaded at start (default: every model)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    args = parser.parse_args(argv)
    pid_file = args.state / "tritonserver.json"
    if args.action == "stop":
        if not pid_file.exists():
            print("tritonserver: not running")
            return 0
        terminate(json.loads(pid_file.read_text())["pid"], 15.0)
        pid_file.unlink()
        sweep_shm()
        print("tritonserver: stopped")
        return 0
    ports = Ports(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port)
    if args.action == "status":
        print(f"tritonserver: {'ready' if ready(ports) else 'not ready'} on 127.0.0.1:{ports.http}")
        return 0 if ready(ports) else 1
    if pid_file.exists():
        terminate(json.loads(pid_file.read_text())["pid"], 15.0)
    load = (
        args.load
        if args.load is not None
        else [p.parent.name for p in args.repository.glob("*/config.pbtxt")]
    )
    server = start(args.repository, venv=args.venv, state=args.state, ports=ports, load=sorted(load))
    pid_file.write_text(json.dumps({"pid": server.process.pid, **vars(ports)}))
    try:
        server.wait_ready(args.timeout)
    except (RuntimeError, TimeoutError) as err:
        terminate(server.process.pid, 5.0)
        pid_file.unlink(missing_ok=True)
        print(err, file=sys.stderr)
        return 1
    print(
        f"tritonserver ready: grpc 127.0.0.1:{ports.grpc}, http 127.0.0.1:{ports.http}, "
        f"metrics http://127.0.0.1:{ports.metrics}/metrics; models {', '.join(sorted(load))}; "
        f"log {server.log}; stop with `make triton-stop`"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
