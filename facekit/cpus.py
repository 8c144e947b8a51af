"""The CPUs this process may really use: its affinity and its cgroup's CPU quota, not the node's cores.

os.cpu_count() is the machine's (a Kubernetes node's) core count. A pod with `limits.cpu: 2` on a
64-core node still sees 64 there, and sizing the inference threads by it ran 64 ONNX Runtime threads
in a quota of 2 CPUs: the kernel throttles the whole cgroup for the rest of every 100 ms period once
the quota is spent, and a frame's latency budget goes with it. `usable_cpus` is the least of

  - the CPU affinity (os.sched_getaffinity: `taskset`, a cpuset, Kubernetes' static CPU manager),
  - the cgroup v2 quota: cpu.max "<quota> <period>" of the process's cgroup and of every cgroup
    above it (a limit may sit on a parent), rounded up (1.5 CPUs -> 2 threads),
  - the cgroup v1 quota: cpu.cfs_quota_us / cpu.cfs_period_us in the same places (-1: none),
  - where there is no quota, the pod's CPU request: $TALKINGHEAD_CPU_REQUEST_MILLICORES, which
    the Helm chart sets from the container's `requests.cpu` (downward API, divisor 1m), rounded
    up. The chart sets no CPU limit by default, so without it a pod requesting 2 CPUs on a 64-core
    node ran 64 threads in the share the scheduler reserved for 2. A limit, where there is one,
    decides instead: the operator let the pod burst up to it. Unset, empty or 0 (what the
    downward API reports for a container without a request): no bound; anything but a whole
    number of millicores is ignored with a warning, and describe() says so,

and at least 1. `root`, `proc_cgroup` and `environ` are parameters so that a test can hand it a
fake tree and environment.
Torch-free and stdlib-only: the serving side and the bench size their threads here, and so does
Triton's python-profile runner (export/triton_python_model.py), which runs in Triton's Python
without this package: export/repository.py copies this file beside each version's model.py as
`talkinghead_cpus.py`. So it imports nothing but the standard library, not even facekit.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
REQUEST_ENV = "TALKINGHEAD_CPU_REQUEST_MILLICORES"  # (deploy/helm/talkinghead: requests.cpu, divisor 1m)

log = logging.getLogger("talkinghead.cpus")
_WARNED: set[str] = set()


@dataclass(frozen=True)
class Cpus:
    """What bounds this process's CPUs: its affinity, its cgroup quota in CPUs (None: no quota),
    the pod's CPU request in CPUs (None: none given), which counts only where there is no quota."""

    affinity: int
    quota: float | None
    where: str = ""  # the file the quota was read from
    request: float | None = None
    ignored: str = ""  # a request variable that was not a whole number of millicores, as found

    @property
    def _cap(self) -> float | None:
        return self.quota if self.quota is not None else self.request

    @property
    def usable(self) -> int:
        cap = self._cap
        return max(1, self.affinity if cap is None else min(self.affinity, math.ceil(cap)))

    @property
    def bound(self) -> str:
        """What `usable` came from: "cgroup quota" (or, without one, "CPU request") where it is
        below the affinity, else "affinity"."""
        cap = self._cap
        if cap is None or math.ceil(cap) >= self.affinity:
            return "affinity"
        return "cgroup quota" if self.quota is not None else "CPU request"

    def describe(self) -> str:
        quota = (
            "no cgroup CPU quota"
            if self.quota is None
            else f"cgroup quota {self.quota:g} CPUs ({self.where})"
        )
        if self.request is not None:
            quota += f", CPU request {self.request:g} CPUs ({REQUEST_ENV})"
        if self.ignored:
            quota += f", {REQUEST_ENV}={self.ignored!r} ignored (not a whole number of millicores)"
        return (
            f"{self.usable} usable CPUs, bounded by the {self.bound} (affinity {self.affinity}, {quota}; "
            f"os.cpu_count {os.cpu_count()})"
        )


def affinity() -> int:
    """CPUs in this process's affinity mask (os.cpu_count() where the OS has none)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """controller ("" for the v2 unified hierarchy) -> this process's cgroup path, from /proc/self/cgroup."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return {}
    paths: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            paths[controller] = parts[2]
    return paths


def _upwards(mount: Path, path: str) -> list[Path]:
    """The cgroup directories from `path` under `mount` up to `mount` itself. Inside a container
    without a cgroup namespace /proc/self/cgroup names the host's path, which does not exist under
    the container's mount: then only the mount (the container's own cgroup) is there."""
    found = []
    here = mount / path.strip("/") if path.strip("/") else mount
    while True:
        if here.is_dir():
            found.append(here)
        if here == mount or mount not in here.parents:
            break
        here = here.parent
    if mount not in found and mount.is_dir():
        found.append(mount)
    return found


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_quota(root: Path | None = None, proc_cgroup: Path | None = None) -> tuple[float, str] | None:
    """The tightest CPU quota over this process's cgroups, in CPUs, and the file it came from;
    None where there is none (or no cgroup filesystem). Defaults: CGROUP_ROOT, PROC_CGROUP."""
    root = CGROUP_ROOT if root is None else root
    paths = _cgroup_paths(PROC_CGROUP if proc_cgroup is None else proc_cgroup)
    quotas: list[tuple[float, str]] = []
    if (root / "cgroup.controllers").exists():  # v2, mounted at the root
        for directory in _upwards(root, paths.get("", "/")):
            text = _read(directory / "cpu.max")
            if text is None:
                continue
            quota, _, period = text.partition(" ")
            if quota != "max" and period:
                quotas.append((int(quota) / int(period), str(directory / "cpu.max")))
    else:  # v1: the cpu controller's own mount (cpu, or cpu,cpuacct with a link named cpu)
        for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            mount = root / name
            if not mount.is_dir():
                continue
            for directory in _upwards(mount, paths.get("cpu", "/")):
                quota_text = _read(directory / "cpu.cfs_quota_us")
                period_text = _read(directory / "cpu.cfs_period_us")
                if quota_text is None or period_text is None or int(quota_text) <= 0:
                    continue
                quotas.append((int(quota_text) / int(period_text), str(directory / "cpu.cfs_quota_us")))
            break
    return min(quotas) if quotas else None


def cpu_request(environ: Mapping[str, str] | None = None) -> tuple[float | None, str]:
    """The pod's CPU request in CPUs from $TALKINGHEAD_CPU_REQUEST_MILLICORES (None: unset, empty
    or 0), and the value where it was not a whole number of millicores (then None, and a warning)."""
    text = (os.environ if environ is None else environ).get(REQUEST_ENV, "").strip()
    if not text:
        return None, ""
    if not (text.isascii() and text.isdigit()):  # "1.5", "2000m", "-1": not the downward API's
        if text not in _WARNED:  # once a process: several parts of one process size threads here
            _WARNED.add(text)
            log.warning("%s=%r ignored: not a whole number of millicores", REQUEST_ENV, text)
        return None, text
    millicores = int(text)
    return (millicores / 1000 if millicores > 0 else None), ""


def cpus(
    root: Path | None = None, proc_cgroup: Path | None = None, environ: Mapping[str, str] | None = None
) -> Cpus:
    try:
        quota = cgroup_quota(root, proc_cgroup)
    except (OSError, ValueError):  # an unreadable or malformed file: no quota known
        quota = None
    request, ignored = cpu_request(environ)
    return Cpus(
        affinity=affinity(),
        quota=None if quota is None else quota[0],
        where=quota[1] if quota else "",
        request=request,
        ignored=ignored,
    )


def usable_cpus(
    root: Path | None = None, proc_cgroup: Path | None = None, environ: Mapping[str, str] | None = None
) -> int:
    """min(CPU affinity, ceil(cgroup CPU quota, or without one the pod's CPU request)), at least 1:
    how many threads can run at once without the kernel throttling them or exceeding the pod's
    share of a busy node."""
    return cpus(root, proc_cgroup, environ).usable


def model_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model as /proc/cpuinfo names it ("Intel(R) Xeon(R) Processor"), for a report's
    machine; "" where there is none (platform.processor() is "" on Linux)."""
    text = _read(cpuinfo) or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return ""
