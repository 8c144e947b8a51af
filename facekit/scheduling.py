"""A process's claim on the CPU: the Linux scheduling policy of all its threads.

The server runs its threads under SCHED_BATCH (service/serve_command.py says why); the embedded
personalisation worker, a PyTorch training process on the same cores, under SCHED_IDLE (worker/
command.py). Threads started later inherit the policy of the thread that starts them, so setting
it once at start covers a library's pools created afterwards. Lowering a thread's claim needs no
privilege; where it is refused (a seccomp profile) or not Linux, callers get None and log it.

A policy ranks threads only inside their scheduling group. With autogroup (Linux's default on
desktops and on these VMs, /proc/sys/kernel/sched_autogroup_enabled) every session is a group of
its own, and the groups share the CPU equally whatever their threads' policies: a worker started
in a session of its own (the local stack starts each process so) at SCHED_IDLE still took half the
cores from Triton's instances (two generator calls in flight 44 -> 28-31 calls/s beside a
SCHED_IDLE busy loop in another session). `lower_session` lowers the session's group as well,
when the process leads its session (the group is its own, not the parent's that started it).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

POLICIES = ("normal", "batch", "idle")
AUTOGROUP = Path("/proc/self/autogroup")
IDLE_GROUP_NICE = 19  # a group has no idle policy: the lowest weight it can have (15 against 1024)


def _numbers() -> dict[str, int]:
    return {"normal": os.SCHED_OTHER, "batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE}


def policy_number(policy: str) -> int:
    if policy not in POLICIES:
        raise ValueError(f"CPU scheduling policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return _numbers()[policy]


def policy_name(number: int) -> str:
    """The name of a policy number (os.SCHED_*); "normal" for any other (a real-time one)."""
    return next((name for name, n in _numbers().items() if n == number), "normal")


def set_process_policy(policy: str, nice: int = 0, *, skip: Collection[int] = ()) -> int | None:
    """Every thread of this process but those in `skip` (native thread ids) under `policy` at
    `nice` (Linux keeps both per thread; a thread started later inherits its starter's); how many
    threads, or None where refused."""
    target = policy_number(policy)
    try:
        tasks = [int(tid) for tid in os.listdir("/proc/self/task") if int(tid) not in skip]
        for tid in tasks:
            try:
                os.sched_setscheduler(tid, target, os.sched_param(0))
                if nice:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
            except ProcessLookupError:  # the thread ended meanwhile
                continue
    except (OSError, AttributeError):  # AttributeError: not Linux
        return None
    return len(tasks)


def lower_session(policy: str, nice: int = 0) -> int | None:
    """Where this process leads its own session under autogroup, that group's nice value to match
    a lowered claim (idle: IDLE_GROUP_NICE; otherwise `nice`); the nice value set, or None where
    nothing was lowered (a claim not lowered, not a session leader - the group is the parent's,
    and lowering it would lower the parent - or no autogroup here)."""
    group_nice = IDLE_GROUP_NICE if policy_number(policy) == os.SCHED_IDLE else nice
    if group_nice <= 0 or os.getsid(0) != os.getpid() or not AUTOGROUP.exists():
        return None
    try:
        AUTOGROUP.write_text(str(group_nice))
    except OSError:
        return None
    return group_nice
