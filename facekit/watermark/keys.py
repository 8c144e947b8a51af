"""Where the watermark key and payload come from: the environment, and a tenant + avatar hash.

    key = require_key(production=settings.production)   # service start: None only outside production

The key is a deployment secret (the Helm chart's Secret -> TALKINGHEAD_WATERMARK_KEY); it never
appears in code or logs (`Watermarker.fingerprint` is the loggable id). The payload names what made
a frame: the first 32 bits of SHA-256("talkinghead-payload-v1" NUL tenant NUL avatar), so a
verifier holding the key can check a frame against a list of tenants and avatars.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping

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
    """Production mode without a watermark key: the service must not start."""


def require_key(environ: Mapping[str, str] | None = None, *, production: bool) -> str | None:
    """The key for a service: in production mode a missing key is a MissingKeyError (refuse to
    start); otherwise (the embedded default) a warning is logged and frames go out unmarked."""
    key = key_from_env(environ)
    if key is None and production:
        raise MissingKeyError(f"production mode needs a watermark key: set {KEY_ENV} (the chart's Secret)")
    if key is None:
        logging.getLogger("talkinghead.watermark").warning(
            "%s is not set: generated frames are NOT watermarked (set it in any deployment)", KEY_ENV
        )
    return key
