"""Where the watermark key and payload come from: the environment or a key file, and a tenant +
avatar hash.

    key, origin = require_key(production=settings.production, key_file=settings.watermark_key_file)

The key is a deployment secret (the Helm chart's Secret -> TALKINGHEAD_WATERMARK_KEY); it never
appears in code or logs (`Watermarker.fingerprint` is the loggable id). Outside production a
service without it marks with a key of its own, kept in a file (var/watermark.key), so every frame
it sends is marked whatever it was started with. The payload names what made
a frame: the first 32 bits of SHA-256("talkinghead-payload-v1" NUL tenant NUL avatar), so a
verifier holding the key can check a frame against a list of tenants and avatars.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from facekit.keyfile import read_or_make

KEY_ENV = "TALKINGHEAD_WATERMARK_KEY"


def key_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The key from $TALKINGHEAD_WATERMARK_KEY, or None when unset or empty."""
    value = (os.environ if environ is None else environ).get(KEY_ENV, "")
    return value or None


def payload_for(tenant: str, avatar: str) -> int:
    """The 32-bit payload naming (tenant, avatar)."""
    for name, value in (("tenant", tenant), ("avatar", avatar)):
        if not isinstance(value, str) or "\0" in value:
            raise ValueError(f"{name} must be a string without NUL characters, got {value!r}")
    digest = hashlib.sha256(f"talkinghead-payload-v1\0{tenant}\0{avatar}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class MissingKeyError(RuntimeError):
    """No key the service may mark with (production mode without one, or an unusable key file):
    the service must not start."""


def require_key(
    environ: Mapping[str, str] | None = None, *, production: bool, key_file: Path
) -> tuple[str, str]:
    """The key a service marks every frame with, and where it came from: $TALKINGHEAD_WATERMARK_KEY,
    else (outside production) the one in `key_file`, made there once. Production mode without the
    variable is a MissingKeyError: a deployment's key is its secret, not one a pod made itself."""
    key = key_from_env(environ)
    if key is not None:
        return key, f"${KEY_ENV}"
    if production:
        raise MissingKeyError(f"production mode needs a watermark key: set {KEY_ENV} (the chart's Secret)")
    try:
        return read_or_make(key_file), str(key_file)
    except ValueError as error:
        raise MissingKeyError(f"the watermark key: {error} (or set {KEY_ENV})") from None
