"""Consent records: on whose authority a face may be animated.

`check(pb)` turns CreateAvatarRequest.consent into the plain dict the stores keep (AvatarRecord.consent)
or raises INVALID_ARGUMENT naming the field; `to_pb(dict)` gives it back for GetAvatar. The record id
("cr-" + 16 hex digits of SHA-256 over the canonical JSON of the fields) names the record in the
audit log, in the personalised generator's metadata and in the content credentials of rendered files.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

from api.talkinghead.v1 import avatar_pb2 as pb
from service.errors import invalid

BASES = {
    pb.CONSENT_BASIS_PERSONAL_CONSENT: "personal_consent",
    pb.CONSENT_BASIS_PUBLIC_DOMAIN: "public_domain",
    pb.CONSENT_BASIS_LICENSED: "licensed",
}
_BASIS_OF = {name: value for value, name in BASES.items()}
_HEX64 = re.compile(r"[0-9a-f]{64}")
CLOCK_SKEW_S = 60.0


def _text(value: str, field: str, limit: int) -> str:
    text = value.strip()
    if not 1 <= len(text) <= limit:
        raise invalid(f"consent.{field} is required: 1-{limit} characters, got {len(text)}")
    if any(ord(c) < 32 for c in text):
        raise invalid(f"consent.{field} must not contain control characters")
    return text


def record_id(fields: dict[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in fields.items() if k != "record_id"}, sort_keys=True)
    return "cr-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def check(consent: pb.ConsentRecord, has_consent: bool, *, now: float | None = None) -> dict[str, Any]:
    """The consent record of a CreateAvatarRequest as a dict with its record_id, or INVALID_ARGUMENT."""
    if not has_consent:
        raise invalid("consent is required: who is depicted, the basis, who collected it and when")
    if consent.basis not in BASES:
        known = consent.basis in pb.ConsentBasis.values()
        got = pb.ConsentBasis.Name(consent.basis) if known else str(consent.basis)
        raise invalid(f"consent.basis must be PERSONAL_CONSENT, PUBLIC_DOMAIN or LICENSED, got {got}")
    basis = BASES[consent.basis]
    fields: dict[str, Any] = {
        "subject": _text(consent.subject, "subject", 200),
        "basis": basis,
        "statement_version": "",
        "document_sha256": "",
        "source": "",
        "collected_by": _text(consent.collected_by, "collected_by", 200),
    }
    if basis == "personal_consent":
        fields["statement_version"] = _text(consent.statement_version, "statement_version", 64)
        digest = consent.document_sha256.strip().lower()
        if not _HEX64.fullmatch(digest):
            raise invalid("consent.document_sha256 must be the signed document's SHA-256: 64 hex digits")
        fields["document_sha256"] = digest
        if consent.source:
            raise invalid("consent.source is for PUBLIC_DOMAIN and LICENSED works; leave it empty")
    else:
        fields["source"] = _text(consent.source, "source", 500)
        if consent.statement_version or consent.document_sha256:
            raise invalid(
                "consent.statement_version and consent.document_sha256 are for PERSONAL_CONSENT only"
            )
    if not consent.HasField("collect_time") or consent.collect_time.seconds <= 0:
        raise invalid("consent.collect_time is required: when the record was collected")
    if not 0 <= consent.collect_time.nanos <= 999_999_999:
        # (a Timestamp's nanos are 0..999,999,999: -2e9 made 1 s a date in 1969)
        raise invalid(f"consent.collect_time.nanos must be 0..999999999, got {consent.collect_time.nanos}")
    collected = consent.collect_time.seconds + consent.collect_time.nanos / 1e9
    if collected > (time.time() if now is None else now) + CLOCK_SKEW_S:
        raise invalid("consent.collect_time is in the future")
    fields["collect_time"] = round(collected, 3)
    fields["record_id"] = record_id(fields)
    return fields


def to_pb(fields: dict[str, Any]) -> pb.ConsentRecord:
    """A stored consent dict -> ConsentRecord (empty for avatars stored before consent existed)."""
    if not fields:
        return pb.ConsentRecord()
    out = pb.ConsentRecord(
        subject=fields["subject"],
        basis=_BASIS_OF[fields["basis"]],  # type: ignore[arg-type]
        statement_version=fields.get("statement_version", ""),
        document_sha256=fields.get("document_sha256", ""),
        source=fields.get("source", ""),
        collected_by=fields["collected_by"],
        record_id=fields["record_id"],
    )
    out.collect_time.FromNanoseconds(round(float(fields["collect_time"]) * 1e9))
    return out
