"""A throwaway certificate authority for the C2PA tests: a root CA and an end-entity signing
certificate under it, made with `cryptography` (what c2pa-python's signer accepts: an end-entity
certificate, not self-signed, with the digitalSignature key usage and an extended key usage C2PA
allows - here emailProtection -, the chain PEM end-entity first)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class SigningCA:
    root: Path  # PEM: the trust anchor
    chain: Path  # PEM: end-entity certificate, then the root
    key: Path  # PEM: the end-entity private key (PKCS#8)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "talkinghead tests"),
        ]
    )


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _certificate(
    subject: str, key: PrivateKey, issuer: x509.Name, issuer_key: PrivateKey, *, ca: bool, eku: bool
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(_usage(ca=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_ca(folder: Path, *, rsa_key: bool = False, eku: bool = True, self_signed: bool = False) -> SigningCA:
    """Write root.pem, chain.pem, key.pem into `folder`. rsa_key: an RSA-2048 end entity (PS256)
    instead of EC P-256 (ES256); eku/self_signed: make certificates C2PA must refuse."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _certificate(
        "talkinghead test root", root_key, _name("talkinghead test root"), root_key, ca=True, eku=False
    )
    key: PrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    issuer, issuer_key = (_name("talkinghead signer"), key) if self_signed else (root.subject, root_key)
    leaf = _certificate("talkinghead signer", key, issuer, issuer_key, ca=False, eku=eku)
    pem = serialization.Encoding.PEM
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "root.pem").write_bytes(root.public_bytes(pem))
    (folder / "chain.pem").write_bytes(
        leaf.public_bytes(pem) + (b"" if self_signed else root.public_bytes(pem))
    )
    (folder / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return SigningCA(root=folder / "root.pem", chain=folder / "chain.pem", key=folder / "key.pem")
