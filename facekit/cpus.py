"""The CPUs this process may really use: its affinity and its cgroup's CPU quota, not the node's cores.

os.cpu_count() is the machine's (a Kubernetes node's) core count. A pod with `limits.cpu: 2` on a
64-core node still sees 64 there, and sizing the inference threads by it ran 64 ONNX Runtime threads
in a quota of 2 CPUs: the kernel throttles the whole cgroup for the rest of every 100 ms period once
the quota is spent, and a frame's latency budget goes with it. `usable_cpus` is the least of

  - the CPU affinity (os.sched_getaffinity: `taskset`, a cpuset, Kubernetes' static CPU manager),
  - the cgroup v2 quota: cpu.max "<quota> <period>" of the process's cgroup and of every cgroup
    above it (a limit may sit on a parent), rounded up (1.5 CPUs -> 2 threads),
  - the cgroup v1 quota: cpu.cfs_quota_us / cpu.cfs_period_us in the same places (-1: none),

and at least 1. `root` and `proc_cgroup` are parameters so that a test can hand it a fake tree.
Torch-free and stdlib-only: the serving side and the bench size their threads here, and so does
Triton's python-profile runner (export/triton_python_model.py), which runs in Triton's Python
without this package: export/repository.py copies this file beside each version's model.py as
`talkinghead_cpus.py`. So it imports nothing but the standard library, not even facekit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class Cpus:
    """What bounds this process's CPUs: its affinity, its cgroup quota in CPUs (None: no quota)."""

    affinity: int
    quota: float | None
    where: str = ""  # the file the quota was read from

    @property
    def usable(self) -> int:
        cpus = self.affinity if self.quota is None else min(self.affinity, math.ceil(self.quota))
        return max(1, cpus)

    @property
    def bound(self) -> str:
        """What `usable` came from: "cgroup quota" where it is below the affinity, else "affinity"."""
        return "affinity" if self.quota is None or math.ceil(self.quota) >= self.affinity else "cgroup quota"

    def describe(self) -> str:
        quota = (
            "no cgroup CPU quota"
            if self.quota is None
            else f"cgroup quota {self.quota:g} CPUs ({self.where})"
        )
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


def cpus(root: Path | None = None, proc_cgroup: Path | None = None) -> Cpus:
    try:
        quota = cgroup_quota(root, proc_cgroup)
    except (OSError, ValueError):  # an unreadable or malformed file: no quota known
        quota = None
    return Cpus(
        affinity=affinity(), quota=None if quota is None else quota[0], where=quota[1] if quota else ""
    )


def usable_cpus(root: Path | None = None, proc_cgroup: Path | None = None) -> int:
    """min(CPU affinity, ceil(cgroup CPU quota)), at least 1: how many threads can run at once
    without the kernel throttling them."""
    return cpus(root, proc_cgroup).usable
