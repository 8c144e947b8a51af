"""Refuse an install that cannot fit, before it starts: `need_disk.py GIB PATH WHAT [HINT]`.

pip that runs out of disk stops minutes in with "[Errno 28] No space left on device" and leaves a
venv that has some of its packages and not others. The Makefile runs this before it makes a venv:
exit 1 with what is needed, what is free and HINT (default: free space or move the checkout) when
the filesystem that will hold PATH (its nearest existing folder) has less than GIB GiB free, else
exit 0 silently. `make test` checks its temporary folder the same way. Standard library only: it
runs before any venv exists."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists (the venv is not made yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print("usage: need_disk.py GIB PATH WHAT [HINT]", file=sys.stderr)
        return 2
    try:
        need = float(argv[0])
    except ValueError:
        need = float("nan")
    if not need >= 0:  # (NaN too)
        print(f"need_disk.py: GIB must be a number of GiB, 0 or more, got {argv[0]!r}", file=sys.stderr)
        return 2
    where, what = existing(Path(argv[1])), argv[2]
    hint = argv[3] if len(argv) == 4 else "free some space (or move the checkout)"
    free = shutil.disk_usage(where).free / 2**30
    if free >= need:
        return 0
    print(
        f"{what} needs about {need:g} GiB of free disk, and {where} has {free:.1f} GiB free: "
        f"{hint} and run make again",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
