"""Avatar ids and tenant names: they become Triton model names (`generator_<id>`), Redis keys and
file names, so only a safe alphabet is accepted and path tricks never reach the file system.

A client names an avatar with a *public* id (`validate_avatar_id`). The service keeps it under a
*stored* id scoped by its tenant (`scoped_id`): the public id itself for the implicit tenant
`default` (so stores written before tenants existed keep working), `<tenant>.<id>` for any other.
The dot is outside the public alphabet, so no tenant's id can collide with another's.
"""

from __future__ import annotations

import re

_NAME = r"[a-z0-9][a-z0-9_-]{0,62}"
_AVATAR_ID = re.compile(_NAME)  # fullmatch: "$" would let "mona\n" through
_STORED_ID = re.compile(rf"(?:{_NAME}\.)?{_NAME}")
MAX_ECHO = 80  # characters of a rejected id shown back
DEFAULT_TENANT = "default"


def shown(value: object) -> str:
    """A client's value for an error message: repr of at most MAX_ECHO characters."""
    text = value if isinstance(value, str) else repr(value)
    return repr(text[:MAX_ECHO]) + ("..." if len(text) > MAX_ECHO else "")


def _check(value: str, pattern: re.Pattern[str], what: str, rule: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"invalid {what} {shown(value)}: {rule}")
    return value


_RULE = "use 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"


def validate_avatar_id(avatar_id: str) -> str:
    """Return the public id unchanged, or raise ValueError saying what is allowed."""
    return _check(avatar_id, _AVATAR_ID, "avatar id", _RULE)


def validate_tenant(tenant: str) -> str:
    """Return the tenant name unchanged, or raise ValueError (the public id alphabet)."""
    return _check(tenant, _AVATAR_ID, "tenant", _RULE)


def validate_stored_id(stored_id: str) -> str:
    """Return a stored (tenant-scoped) id unchanged, or raise ValueError."""
    return _check(
        stored_id,
        _STORED_ID,
        "avatar id",
        "a stored id is [<tenant>.]<id>, each 1-63 characters of a-z, 0-9, '_' and '-', "
        "starting with a letter or digit",
    )


def scoped_id(tenant: str, avatar_id: str) -> str:
    """The stored id of the tenant's avatar `avatar_id` (both already validated)."""
    return avatar_id if tenant == DEFAULT_TENANT else f"{tenant}.{avatar_id}"


def split_id(stored_id: str) -> tuple[str, str]:
    """(tenant, public id) of a stored id."""
    tenant, dot, avatar_id = stored_id.rpartition(".")
    return (tenant, avatar_id) if dot else (DEFAULT_TENANT, stored_id)
