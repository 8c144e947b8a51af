"""The CPUs the in-process backend sizes its threads by: the process's affinity and its cgroup's CPU
quota (a pod's limits.cpu), never the node's core count (facekit/cpus.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from facekit import cpus
from service import settings as settings_module

ROOT = Path(__file__).resolve().parent.parent


def v2_tree(tmp_path: Path, limits: dict[str, str], own: str = "/kubepods/pod1/ctr") -> tuple[Path, Path]:
    """A fake cgroup v2 mount with cpu.max files at `limits`' paths and a /proc/self/cgroup naming `own`."""
    root = tmp_path / "cgroup"
    (root / own.strip("/")).mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for path, value in limits.items():
        (root / path.strip("/")).mkdir(parents=True, exist_ok=True)
        (root / path.strip("/") / "cpu.max").write_text(value + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def v1_tree(tmp_path: Path, quota: int, period: int = 100000, own: str = "/") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    mount = root / "cpu,cpuacct"
    mount.mkdir(parents=True)
    (mount / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (mount / "cpu.cfs_period_us").write_text(f"{period}\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"4:memory:/x\n3:cpu,cpuacct:{own}\n0::/\n")
    return root, proc


def test_a_v2_quota_rounds_up_and_the_tightest_cgroup_on_the_way_up_wins(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, {"/": "max 100000", "/kubepods/pod1/ctr": "150000 100000"})
    assert cpus.cgroup_quota(root, proc) == (1.5, str(root / "kubepods/pod1/ctr/cpu.max"))
    assert cpus.usable_cpus(root, proc) == min(2, cpus.affinity())  # 1.5 CPUs: 2 threads
    if cpus.affinity() > 2:
        assert "bounded by the cgroup quota" in cpus.cpus(root, proc).describe()
    root, proc = v2_tree(
        tmp_path / "b", {"/kubepods/pod1": "100000 100000", "/kubepods/pod1/ctr": "max 100000"}
    )
    assert cpus.usable_cpus(root, proc) == 1, "a limit on a parent cgroup binds too"
    if cpus.affinity() > 1:
        assert cpus.cpus(root, proc).bound == "cgroup quota"


def test_a_container_with_its_own_cgroup_namespace_reads_the_mounts_root(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, {"/": "100000 100000"}, own="/")
    assert cpus.usable_cpus(root, proc) == 1
    # without a cgroup namespace /proc/self/cgroup names the host's path, absent here: the mount's own
    root, proc = v2_tree(tmp_path / "b", {"/": "100000 100000"}, own="/")
    proc.write_text("0::/kubepods/burstable/podX/abc\n")
    assert cpus.usable_cpus(root, proc) == 1


def test_no_quota_leaves_the_affinity(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, {"/": "max 100000"})
    assert cpus.cgroup_quota(root, proc) is None
    assert cpus.usable_cpus(root, proc) == cpus.affinity() == len(os.sched_getaffinity(0))
    assert "bounded by the affinity" in cpus.cpus(root, proc).describe()
    assert cpus.usable_cpus(tmp_path / "no-cgroupfs", tmp_path / "none") == cpus.affinity()
    root, proc = v2_tree(tmp_path / "bad", {"/": "garbage 1"})
    assert cpus.usable_cpus(root, proc) == cpus.affinity(), "an unreadable quota counts as none"


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    root, proc = v1_tree(tmp_path, 100000)
    assert cpus.usable_cpus(root, proc) == 1
    root, proc = v1_tree(tmp_path / "b", 50000, own="/kubepods/pod/ctr")  # host path, not in the mount
    assert cpus.cgroup_quota(root, proc) == (0.5, str(root / "cpu,cpuacct/cpu.cfs_quota_us"))
    assert cpus.usable_cpus(root, proc) == 1, "at least one"
    root, proc = v1_tree(tmp_path / "c", -1)
    assert cpus.cgroup_quota(root, proc) is None


def test_the_in_process_backend_and_the_lanes_follow_the_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod limited to 1 CPU on a bigger node: one ONNX Runtime thread and one lane, not one per
    node core (before: os.cpu_count(), the node's)."""
    from service.backends.onnxruntime import OnnxRuntimeBackend

    root, proc = v2_tree(tmp_path, {"/kubepods/pod1/ctr": "100000 100000"})
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "PROC_CGROUP", proc)
    assert settings_module.Settings().lanes == 1
    backend = OnnxRuntimeBackend(repository=tmp_path, lanes=settings_module.Settings().lanes)
    try:
        assert (backend.threads, backend.lanes()) == (1, 1)
    finally:
        backend._pool.shutdown()
    explicit = OnnxRuntimeBackend(repository=tmp_path, threads=3, lanes=2)
    try:
        assert (explicit.threads, explicit.lanes()) == (3, 2), "the flag still decides"
    finally:
        explicit._pool.shutdown()


def test_inference_threads_has_an_environment_variable() -> None:
    assert settings_module.from_env({"TALKINGHEAD_INFERENCE_THREADS": "3"}).inference_threads == 3
    assert (
        settings_module.from_env(
            {"TALKINGHEAD_INFERENCE_THREADS": "3"}, inference_threads=1
        ).inference_threads
        == 1
    )
    with pytest.raises(ValueError, match="inference_threads"):
        settings_module.Settings(inference_threads=-1)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to pin a process to fewer")
def test_a_process_pinned_to_one_cpu_sizes_by_its_affinity() -> None:
    """A real affinity (taskset, as a cpuset or Kubernetes' static CPU manager pins a pod)."""
    cpu = min(os.sched_getaffinity(0))
    code = (
        "from facekit.cpus import usable_cpus; from service.settings import Settings; "
        "print(usable_cpus(), Settings().lanes)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        ["taskset", "-c", str(cpu), sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.split() == ["1", "1"], out.stderr
    code = f"import os; os.sched_setaffinity(0, {{{cpu}}}); {code}"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.split() == ["1", "1"], out.stderr


REQUEST = "TALKINGHEAD_CPU_REQUEST_MILLICORES"


def test_without_a_cpu_limit_the_pods_cpu_request_bounds_the_threads(tmp_path: Path) -> None:
    """The chart sets requests.cpu but no limits.cpu: no cgroup quota, so on a 64-core node the
    server, Triton's runner and the worker sized their threads by the node's 64 cores while the
    scheduler reserved 1-2 CPUs. The chart passes the request (downward API, millicores); it bounds
    the threads where there is no quota, rounded up, at least 1."""
    root, proc = v2_tree(tmp_path, {"/": "max 100000"})
    found = cpus.cpus(root, proc, environ={REQUEST: "1500"})
    assert found.request == 1.5
    assert found.usable == min(2, cpus.affinity())
    if cpus.affinity() > 2:
        assert found.bound == "CPU request"
        assert "2 usable CPUs, bounded by the CPU request" in found.describe()
        assert f"CPU request 1.5 CPUs ({REQUEST})" in found.describe()
    assert cpus.cpus(root, proc, environ={REQUEST: "100"}).usable == 1, "at least one"
    many = cpus.cpus(root, proc, environ={REQUEST: str(1000 * (cpus.affinity() + 8))})
    assert (many.usable, many.bound) == (cpus.affinity(), "affinity"), "never above the affinity"


def test_the_process_environment_carries_the_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, proc = v2_tree(tmp_path, {"/": "max 100000"})
    monkeypatch.setenv(REQUEST, "1000")
    assert cpus.usable_cpus(root, proc) == 1
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "PROC_CGROUP", proc)
    assert settings_module.Settings().lanes == 1, "the in-process backend sizes by it too"


def test_a_cpu_limit_decides_over_the_request(tmp_path: Path) -> None:
    """With limits.cpu the operator let the pod burst up to it: the quota bounds, not the request."""
    root, proc = v2_tree(tmp_path, {"/kubepods/pod1/ctr": "300000 100000"})
    found = cpus.cpus(root, proc, environ={REQUEST: "1000"})
    assert found.usable == min(3, cpus.affinity())
    if cpus.affinity() > 3:
        assert found.bound == "cgroup quota"


@pytest.mark.parametrize("value", ["", "0", "   "])
def test_no_request_leaves_the_affinity(tmp_path: Path, value: str) -> None:
    """Unset, empty, or 0: what the downward API reports for a container without requests.cpu."""
    root, proc = v2_tree(tmp_path, {"/": "max 100000"})
    found = cpus.cpus(root, proc, environ={REQUEST: value})
    assert (found.usable, found.request, found.bound) == (cpus.affinity(), None, "affinity")
    assert "CPU request" not in found.describe() and "ignored" not in found.describe()
    assert cpus.cpus(root, proc, environ={}).usable == cpus.affinity()


@pytest.mark.parametrize("value", ["2 cores", "1.5", "-500", "2000m", "nan", "\u00b2"])
def test_a_garbled_request_is_ignored_and_said(
    tmp_path: Path, value: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a whole number of millicores (a hand-set variable, say): no crash and no bound, but a
    warning and a note in describe(), which the runner and the server log, rather than silence."""
    root, proc = v2_tree(tmp_path, {"/": "max 100000"})
    cpus._WARNED.discard(value)
    with caplog.at_level("WARNING", logger="talkinghead.cpus"):
        found = cpus.cpus(root, proc, environ={REQUEST: value})
    assert (found.usable, found.request, found.bound) == (cpus.affinity(), None, "affinity")
    assert f"{REQUEST}={value!r} ignored" in found.describe()
    assert f"{REQUEST}={value!r} ignored" in caplog.text


def test_the_workers_torch_threads_follow_the_pods_cpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker left PyTorch at its default, one thread per core of the node: in a pod requesting
    1 CPU on a big node, fine-tuning (and the CPU work around a GPU one) ran that many threads."""
    import torch

    from worker import command

    root, proc = v2_tree(tmp_path, {"/": "max 100000"})
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "PROC_CGROUP", proc)
    monkeypatch.setenv(REQUEST, "1000")
    assert command.cpu_threads(None) == 1
    assert command.cpu_threads(3) == 3, "--threads still decides"
    monkeypatch.delenv(REQUEST)
    assert command.cpu_threads(None) == min(torch.get_num_threads(), cpus.affinity()), (
        "never more than PyTorch's"
    )


def test_the_cpu_model_is_named_from_cpuinfo_where_platform_gives_nothing(tmp_path: Path) -> None:
    """Reports named no CPU (evaluation.json's machine.cpu was "": platform.processor() is empty
    on Linux)."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n")
    assert cpus.model_name(info) == "Intel(R) Xeon(R) Processor"
    assert cpus.model_name(tmp_path / "missing") == ""
