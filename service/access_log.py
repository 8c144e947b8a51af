"""The access log: one line per call as it ends, logger `talkinghead.access` (never per frame).

service/rpc_metrics.py's interceptor, the outermost, times every call and, when it ends, hands its
method, the status code the client got and what the handlers noted about it to `AccessLog.end`:

    method      `<service>/<method>` (`other` for a name the server does not serve), as
                talkinghead_rpcs_total's label
    code        the gRPC status name the client got (OK, NOT_FOUND, CANCELLED...)
    duration_ms from the call reaching the interceptor to its end
    peer        the client's address as gRPC gives it (ipv4:10.1.2.3:40312)
    tenant      the tenant the call acted for, once its credentials were checked (`default` without
                authentication); absent for a call refused before (UNAUTHENTICATED)
    avatar      the avatar the request names: Animate's config, a unary request's avatar_id field
    frames      Animate: frames sent to the client
    request_id  the client's `x-request-id` metadata: up to 128 printable ASCII characters (another
                value is left out)
    details     for a code other than OK, the status details the client got (written for clients)

Handlers note tenant, avatar and frames in the call's `CallFacts` (`noted()`, a context variable the
interceptor sets; None outside a call or with the log off). Never logged: credentials (the
authorization metadata, API keys), images, landmarks. Health checks (grpc.health.v1) and server
reflection, which probes make every few seconds, are logged at DEBUG.

In text format the message reads
    access Animate OK 10234.5 ms peer=ipv4:127.0.0.1:5555 tenant=acme avatar=mona frames=250
(a value with a space, a quote or another odd character JSON-quoted); in JSON format the fields are
the record's own, beside that message.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("talkinghead.access")
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128
MAX_AVATAR = 128  # a name longer than any avatar id (1-63) is cut here (the call was refused anyway)
QUIET = ("grpc.health.v1.Health/", "grpc.reflection.")  # probes: DEBUG
_PRINTABLE = re.compile(rf"[\x20-\x7e]{{1,{MAX_REQUEST_ID}}}")
_PLAIN = re.compile(r"[\w.:\-/\[\]@+]+", re.ASCII)  # shown unquoted in the text message


@dataclass(slots=True)
class CallFacts:
    """What a call's handlers learnt about it, for its access line."""

    tenant: str | None = None
    avatar: str | None = None
    frames: int | None = None


CALL: contextvars.ContextVar[CallFacts | None] = contextvars.ContextVar("access_call", default=None)


def noted() -> CallFacts | None:
    """The running call's facts (None: no access log, or not in a call)."""
    return CALL.get()


def note_tenant(tenant: str) -> None:
    facts = CALL.get()
    if facts is not None and tenant:
        facts.tenant = tenant


def note_avatar(avatar_id: str) -> None:
    facts = CALL.get()
    if facts is not None and avatar_id:
        facts.avatar = avatar_id[:MAX_AVATAR]


def request_id(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The client's x-request-id when it is 1-128 printable ASCII characters."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            if isinstance(value, str) and _PRINTABLE.fullmatch(value):
                return value
            return None
    return None


def _shown(value: object) -> str:
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


class AccessLog:
    """Writes the access lines (see the module docstring)."""

    def __init__(self, methods: Iterable[str]) -> None:
        # "talkinghead.v1.AnimationService/Animate" -> "Animate" (the text message's short name)
        self.short = {m: m.rsplit("/", 1)[-1] for m in methods}
        self.quiet = frozenset(m for m in self.short if m.startswith(QUIET))

    def level(self, method: str) -> int:
        return logging.DEBUG if method in self.quiet else logging.INFO

    def end(
        self,
        method: str,
        code: str,
        seconds: float,
        *,
        peer: str | None,
        facts: CallFacts | None,
        request: str | None,
        details: str | None,
    ) -> None:
        level = self.level(method)
        if not log.isEnabledFor(level):
            return
        duration_ms = round(seconds * 1000, 1)
        fields: dict[str, Any] = {"method": method, "code": code, "duration_ms": duration_ms}
        text = [f"access {self.short.get(method, method)} {code} {duration_ms:.1f} ms"]
        if peer:  # (none for a method gRPC answers itself: it was "peer=None")
            fields["peer"] = peer
            text.append(f"peer={_shown(peer)}")
        if facts is not None:
            for name in ("tenant", "avatar", "frames"):
                value = getattr(facts, name)
                if value is not None:
                    fields[name] = value
                    text.append(f"{name}={_shown(value)}")
        if request is not None:
            fields["request_id"] = request
            text.append(f"request_id={_shown(request)}")
        if code != "OK" and details:
            fields["details"] = details
            text.append(f"details={json.dumps(details)}")
        log.log(level, " ".join(text), extra=fields)
