"""A secret kept in a file: read it, or make a random one there once (mode 0600).

    key = read_or_make(Path("var/watermark.key"))   # the same key on every start after the first

The service's watermark key when no $TALKINGHEAD_WATERMARK_KEY is set (service/server.py) and the
local stack's (deploy/local/stack.py) come from here, so a video made yesterday still verifies
with the key the file keeps. Standard library only: the stack imports it without numpy or OpenCV.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def read_or_make(path: Path) -> str:
    """The secret in `path`, made there first (random, mode 0600) when there is no such file.
    Two processes making it at once both get the first one's: the new file is hard-linked into
    place, which fails on a name that exists. ValueError says which file and what is wrong."""
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            made = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(32) + "\n")
                with contextlib.suppress(FileExistsError):
                    os.link(made, path)
            finally:
                made.unlink(missing_ok=True)
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ValueError(f"cannot read or make {path}: {reason}") from None
    if not secret:
        raise ValueError(f"{path} is empty: write the key into it, or remove it and a new one is made")
    return secret
