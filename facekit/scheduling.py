"""A process's claim on the CPU: the Linux scheduling policy of all its threads.

The server runs its threads under SCHED_BATCH (service/serve_command.py says why); the embedded
personalisation worker, a PyTorch training process on the same cores, under SCHED_IDLE (worker/
command.py). Threads started later inherit the policy of the thread that starts them, so setting
it once at start covers a library's pools created afterwards. Lowering a thread's claim needs no
privilege; where it is refused (a seccomp profile) or not Linux, callers get None and log it.
"""

from __future__ import annotations

import os

POLICIES = ("normal", "batch", "idle")


def _numbers() -> dict[str, int]:
    return {"normal": os.SCHED_OTHER, "batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE}


def policy_number(policy: str) -> int:
    if policy not in POLICIES:
        raise ValueError(f"CPU scheduling policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return _numbers()[policy]


def policy_name(number: int) -> str:
    """The name of a policy number (os.SCHED_*); "normal" for any other (a real-time one)."""
    return next((name for name, n in _numbers().items() if n == number), "normal")


def set_process_policy(policy: str, nice: int = 0) -> int | None:
    """Every thread of this process under `policy` at `nice` (Linux keeps both per thread); how
    many threads, or None where refused."""
    target = policy_number(policy)
    try:
        tasks = [int(tid) for tid in os.listdir("/proc/self/task")]
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
