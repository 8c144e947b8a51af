"""Avatar ids: they become Triton model names (`generator_<id>`) and file names, so only a safe
alphabet is accepted and path tricks never reach the file system."""

from __future__ import annotations

import re

_AVATAR_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # fullmatch: "$" would let "mona\n" through
MAX_ECHO = 80  # characters of a rejected id shown back


def validate_avatar_id(avatar_id: str) -> str:
    """Return the id unchanged, or raise ValueError saying what is allowed."""
    if not isinstance(avatar_id, str) or not _AVATAR_ID.fullmatch(avatar_id):
        text = avatar_id if isinstance(avatar_id, str) else repr(avatar_id)
        shown = repr(text[:MAX_ECHO]) + ("..." if len(text) > MAX_ECHO else "")
        raise ValueError(
            f"invalid avatar id {shown}: use 1-63 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return avatar_id
