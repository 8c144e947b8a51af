"""Hidden partial files beside an output, and the sweep of those a killed process left.

    partial = partial_path(Path("out/mona.mp4"))  # out/.mona.mp4.partial-<host>-<pid>.mp4
    remove_abandoned(Path("out/mona.mp4"))         # those of this host whose process is gone

A command writes its output to `partial_path(out)` and renames it onto `out` once whole, so that
nothing shorter ever stands at `out`. Only SIGKILL (or a crash, or a power cut) leaves the partial
file behind; the next command writing the same path removes those of this host whose process is
gone. One whose process still runs (a second command writing the same path), or from another host
(a shared folder), stays. Used by the client's outputs (client/outputs.py) and `talkinghead
audit --out` (service/audit_command.py).

    remove_stale(folder, ".tmp-*", 3600)  # temporary files a killed writer left, an hour old

The stores' temporary files (the avatar store's, the local job queue's, the audit log's intents)
are swept by age instead: several processes write them, and a write takes milliseconds.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

from facekit.procstat import alive


def _host() -> str:
    """This host's name as it goes in a partial file's name: letters, digits and dots only."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def partial_path(path: Path) -> Path:
    """Where this process writes `path` before the rename: hidden, beside it, same extension."""
    return path.with_name(f".{path.name}.partial-{_host()}-{os.getpid()}{path.suffix}")


def remove_abandoned(path: Path) -> list[Path]:
    """Remove the partial files for `path` that a process of this host, now gone, left (killed
    before it could clean up); those removed. One that cannot be removed is left."""
    prefix, suffix = f".{path.name}.partial-{_host()}-", path.suffix
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.name.endswith(suffix):
            continue
        pid = entry.name[len(prefix) : len(entry.name) - len(suffix)]
        if not pid.isdigit() or int(pid) <= 0 or int(pid) == os.getpid() or alive(int(pid)):
            continue
        try:
            os.unlink(entry.path)
        except OSError:  # another command removed it first, or it is not ours to remove
            continue
        removed.append(Path(entry.path))
    return removed


def remove_stale(folder: Path, pattern: str, older_than_s: float) -> int:
    """Remove the files in `folder` matching `pattern` last written over `older_than_s` ago; how
    many (one another sweep or its writer took meanwhile is not counted)."""
    removed, now = 0, time.time()
    for path in Path(folder).glob(pattern):
        try:
            if now - path.stat().st_mtime > older_than_s:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed
