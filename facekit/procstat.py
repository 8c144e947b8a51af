"""CPU seconds of processes and threads from Linux's /proc: the server's split of its own CPU
(service/metrics.py) and the bench's accounting of the server, its client and Triton
(client/bench.py). Every reader returns None where /proc cannot be read (off Linux, a thread or
process that has ended). And whether a process is alive (`alive`: the local stack's pid files,
the partial files of killed commands) and its command line (`cmdline`)."""

from __future__ import annotations

import os
from pathlib import Path


def stat_fields(path: Path) -> list[str] | None:
    """The fields of a /proc stat file after the command name; None when it cannot be read."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether process `pid` runs: it exists (another user's included) and is not a zombie (one
    that has exited and whose parent has not waited for it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = stat_fields(Path(f"/proc/{pid}/stat"))
    return fields is None or fields[0] != "Z"


def cmdline(pid: int) -> str:
    """Process `pid`'s command line, its arguments joined by spaces; "" when it cannot be read."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def fields_cpu(fields: list[str]) -> float:
    """User + system CPU seconds from a stat file's fields (utime and stime)."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str = "self", thread: int | None = None) -> float | None:
    """User + system CPU seconds of a process (all its threads, ended ones included) or of one of
    its threads so far."""
    fields = stat_fields(Path(f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat"))
    return None if fields is None else fields_cpu(fields)


def group_cpu_seconds(pgid: int) -> float | None:
    """User + system CPU seconds of the live processes of a process group."""
    found = [fields for path in Path("/proc").glob("[0-9]*/stat") if (fields := stat_fields(path))]
    mine = [fields_cpu(fields) for fields in found if int(fields[2]) == pgid]  # field 2: the group
    return sum(mine) if mine else None
