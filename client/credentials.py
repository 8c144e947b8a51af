"""Content credentials (C2PA) on the files the CLI writes, and reading them back (`c2pa-python`).

    creds = credentials_from_env()            # $TALKINGHEAD_C2PA_CERT / $TALKINGHEAD_C2PA_KEY, or None
    sign_file(Path("out/mona.mp4"), Provenance(model_id="3f2a...", consent_record_id="cr-17"), creds)
    report = read_credentials(Path("out/mona.mp4"))   # ManifestReport, or None when unsigned

The manifest says: made by "talkinghead" (claim generator), one action `c2pa.created` whose
digitalSourceType is IPTC's trainedAlgorithmicMedia and, when known, `when` the frames were made
(the signer's clock, UTC), and the assertion `com.talkinghead.generation` holding the model id (the
served model's `talkinghead.model_id`), the avatar id, the avatar's consent record id and, in a
file that carries it (the video, not the contact sheet), the invisible watermark's payload. With
$TALKINGHEAD_C2PA_TIMESTAMP_URL (an RFC 3161 time-stamp authority) the signature is time-stamped
by it (a network call at signing). Signed with the PEM certificate
chain (end-entity first) and private key of the settings: EC P-256/384/521 (ES256/384/512), RSA
(PS256) or Ed25519. C2PA signers need an end-entity certificate (not self-signed) with the
digitalSignature key usage and an extended key usage C2PA accepts (emailProtection,
documentSigning or the C2PA signing OID), under a CA; readers trust it when that CA is among
their trust anchors ($TALKINGHEAD_C2PA_TRUST, a PEM file), and report "Valid" (intact, signer not
vouched for) otherwise.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CERT_ENV, KEY_ENV, TRUST_ENV = "TALKINGHEAD_C2PA_CERT", "TALKINGHEAD_C2PA_KEY", "TALKINGHEAD_C2PA_TRUST"
TIMESTAMP_ENV = "TALKINGHEAD_C2PA_TIMESTAMP_URL"
GENERATOR = "talkinghead"
ASSERTION = "com.talkinghead.generation"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MIME_TYPES = {
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".mov": "video/quicktime",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("talkinghead")
    except PackageNotFoundError:
        return "0"


@dataclass(frozen=True, kw_only=True)
class SigningCredentials:
    cert_chain: bytes  # PEM, end-entity certificate first
    private_key: bytes  # PEM (PKCS#8 or traditional), unencrypted
    timestamp_url: str | None = None  # RFC 3161 authority; None: no timestamp

    @property
    def algorithm(self) -> str:
        """The C2PA signing algorithm the key implies (es256, es384, es512, ps256, ed25519)."""
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        key = load_pem_private_key(self.private_key, password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            curves = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
            if key.curve.name in curves:
                return curves[key.curve.name]
        elif isinstance(key, rsa.RSAPrivateKey):
            return "ps256"
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            return "ed25519"
        raise ValueError(f"C2PA cannot sign with a {type(key).__name__} key")

    @classmethod
    def from_files(cls, cert: Path, key: Path, *, timestamp_url: str | None = None) -> SigningCredentials:
        return cls(
            cert_chain=Path(cert).read_bytes(),
            private_key=Path(key).read_bytes(),
            timestamp_url=timestamp_url,
        )


def credentials_from_env(environ: Mapping[str, str] | None = None) -> SigningCredentials | None:
    """Credentials from $TALKINGHEAD_C2PA_CERT and $TALKINGHEAD_C2PA_KEY (None when unset);
    one without the other is a ValueError."""
    env = os.environ if environ is None else environ
    cert, key = env.get(CERT_ENV, ""), env.get(KEY_ENV, "")
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError(f"set both {CERT_ENV} and {KEY_ENV} (PEM files), or neither")
    return SigningCredentials.from_files(Path(cert), Path(key), timestamp_url=env.get(TIMESTAMP_ENV) or None)


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """What made a file: recorded in its manifest."""

    model_id: str  # the served model's talkinghead.model_id ("" when unknown)
    consent_record_id: str | None = None  # the avatar's consent record (None: not recorded)
    watermark_payload: int | None = None  # the invisible mark's 32-bit payload, when the file carries it
    avatar_id: str | None = None  # the avatar the frames show
    created: float | None = None  # when the frames were made (time.time()); the action's `when`


def manifest(provenance: Provenance, *, title: str, mime: str) -> dict[str, Any]:
    """The manifest definition `sign_file` signs."""
    generation: dict[str, Any] = {
        "model_id": provenance.model_id,
        "consent_record_id": provenance.consent_record_id,
    }
    if provenance.avatar_id is not None:
        generation["avatar_id"] = provenance.avatar_id
    if provenance.watermark_payload is not None:
        generation["watermark_payload"] = f"{provenance.watermark_payload:08x}"
    agent = {"name": GENERATOR, "version": _version()}
    created: dict[str, Any] = {
        "action": "c2pa.created",
        "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
        "softwareAgent": agent,
    }
    if provenance.created is not None:
        when = datetime.datetime.fromtimestamp(provenance.created, datetime.UTC)
        created["when"] = when.isoformat(timespec="seconds").replace("+00:00", "Z")
    return {
        "claim_generator_info": [agent],
        "title": title,
        "format": mime,
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [created]}},
            {"label": ASSERTION, "data": generation},
        ],
    }


def mime_type(path: Path) -> str:
    try:
        return MIME_TYPES[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"{path}: C2PA signing supports {', '.join(sorted(MIME_TYPES))}") from None


def _signer_info(credentials: SigningCredentials, *, timestamp: bool = True) -> Any:
    import c2pa

    return c2pa.C2paSignerInfo(
        credentials.algorithm.encode(),
        credentials.cert_chain,
        credentials.private_key,
        credentials.timestamp_url if timestamp else None,
    )


def check_not_self_signed(credentials: SigningCredentials) -> None:
    """ValueError for a self-signed signing certificate: C2PA's certificate profile wants an
    end-entity certificate a CA issued, but c2pa-python signs with one (and `verify` then says
    "Valid"), so it is refused here."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        leaf = x509.load_pem_x509_certificates(credentials.cert_chain)[0]
    except ValueError as error:
        raise ValueError(f"C2PA cannot sign with it: no PEM certificate in it ({error})") from error
    if leaf.issuer != leaf.subject:
        return
    try:
        leaf.verify_directly_issued_by(leaf)
    except (ValueError, TypeError, InvalidSignature):
        return  # a CA's certificate of the same name, not its own signature
    raise ValueError(
        "C2PA cannot sign with it: the certificate is self-signed; C2PA wants an end-entity "
        "certificate issued by a CA"
    )


def trial_signature(credentials: SigningCredentials) -> None:
    """Sign a tiny PNG in memory (no time-stamp authority: no network call): ValueError with
    c2pa's reason when it refuses the certificate or key (no key usage it accepts, expired), or
    ours when it is self-signed, so that a command finds out before it does the work whose
    output it would sign."""
    import io

    import c2pa
    import numpy as np
    from PIL import Image

    check_not_self_signed(credentials)
    source, dest = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(source, format="PNG")
    source.seek(0)
    definition = json.dumps(manifest(Provenance(model_id=""), title="trial.png", mime="image/png"))
    try:
        with (
            c2pa.Signer.from_info(_signer_info(credentials, timestamp=False)) as signer,
            c2pa.Builder(definition) as builder,
        ):
            builder.sign(signer, "image/png", source, dest)
    except c2pa.C2paError as error:
        raise ValueError(f"C2PA cannot sign with it: {error}") from error


def sign_file(
    path: Path, provenance: Provenance, credentials: SigningCredentials, *, title: str | None = None
) -> None:
    """Embed a signed manifest in `path` (rewritten through a temporary file, then renamed);
    `title`: the file's name in the manifest (default `path`'s: give the final name when `path`
    is a partial file to be renamed)."""
    import c2pa

    path = Path(path)
    mime = mime_type(path)
    check_not_self_signed(credentials)
    info = _signer_info(credentials)
    definition = json.dumps(manifest(provenance, title=title or path.name, mime=mime))
    staging = path.with_name(f".{path.name}.c2pa{path.suffix}")
    try:
        with (
            c2pa.Signer.from_info(info) as signer,
            c2pa.Builder(definition) as builder,
            path.open("rb") as source,
            staging.open("w+b") as dest,
        ):
            builder.sign(signer, mime, source, dest)
        staging.replace(path)
    finally:
        staging.unlink(missing_ok=True)


@dataclass(frozen=True, kw_only=True)
class ManifestReport:
    """The active manifest of a file, as `talkinghead verify` reports it."""

    state: str  # "Trusted", "Valid" (intact, signer not among the trust anchors) or "Invalid"
    claim_generator: str
    actions: list[dict[str, Any]]  # action, digitalSourceType, softwareAgent
    generation: dict[str, Any]  # the com.talkinghead.generation assertion ({} when absent)
    signer: dict[str, Any]  # issuer, common_name, alg
    failures: list[str] = field(default_factory=list)  # validation failure codes

    @property
    def trained_algorithmic_media(self) -> bool:
        return any(a.get("digitalSourceType") == TRAINED_ALGORITHMIC_MEDIA for a in self.actions)


def _report(store: dict[str, Any], manifest: dict[str, Any]) -> ManifestReport:
    assertions = {a.get("label", ""): a.get("data", {}) for a in manifest.get("assertions", [])}
    actions = assertions.get("c2pa.actions.v2", assertions.get("c2pa.actions", {})).get("actions", [])
    generators = manifest.get("claim_generator_info") or [{}]
    results = store.get("validation_results", {}).get("activeManifest", {})
    signature = manifest.get("signature_info", {})
    return ManifestReport(
        state=str(store.get("validation_state", "Invalid")),
        claim_generator=str(generators[0].get("name", manifest.get("claim_generator", ""))),
        actions=list(actions),
        generation=dict(assertions.get(ASSERTION, {})),
        signer={k: signature[k] for k in ("issuer", "common_name", "alg") if k in signature},
        failures=[str(f.get("code")) for f in results.get("failure", [])],
    )


class CannotCarry(ValueError):
    """The file's format cannot carry a C2PA manifest (Matroska, MPEG, WebM, BMP, ...)."""


def read_credentials(path: Path, *, trust_anchors: bytes | None = None) -> ManifestReport | None:
    """The file's active C2PA manifest, validated (against `trust_anchors`, PEM, when given), or None
    when the file carries none. A format that cannot carry one raises CannotCarry; an unreadable
    file ValueError."""
    import c2pa

    settings: dict[str, Any] = {"verify": {"verify_trust": trust_anchors is not None}}
    if trust_anchors is not None:
        settings["trust"] = {"trust_anchors": trust_anchors.decode()}
    try:
        with c2pa.Context.from_dict(settings) as context, c2pa.Reader(str(path), context=context) as reader:
            store = json.loads(reader.json())
    except c2pa.C2paError.ManifestNotFound:
        return None
    except c2pa.C2paError.NotSupported as error:
        raise CannotCarry(f"{path}: this format cannot carry content credentials") from error
    except c2pa.C2paError as error:
        raise ValueError(f"{path}: cannot read content credentials ({error})") from error
    active = store.get("manifests", {}).get(store.get("active_manifest", ""), None)
    return None if active is None else _report(store, active)


def has_certificate(pem: bytes) -> bool:
    """Whether PEM text holds at least one X.509 certificate."""
    from cryptography import x509

    try:
        return bool(x509.load_pem_x509_certificates(pem))
    except ValueError:
        return False


def read_trust_anchors(path: Path) -> bytes:
    """The PEM trust anchors in `path`: OSError when it cannot be read, ValueError (naming the
    file) when it holds no certificate, which c2pa would report against the file checked."""
    pem = Path(path).read_bytes()
    if not has_certificate(pem):
        raise ValueError(f"{path}: no PEM certificate in it")
    return pem


def trust_from_env(environ: Mapping[str, str] | None = None) -> bytes | None:
    """PEM trust anchors from the file $TALKINGHEAD_C2PA_TRUST names (None when unset)."""
    name = (os.environ if environ is None else environ).get(TRUST_ENV, "")
    return read_trust_anchors(Path(name)) if name else None
