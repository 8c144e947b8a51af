"""What `talkinghead animate` adds to the files it writes: it checks that the service's frames
carry the watermark (when $TALKINGHEAD_WATERMARK_KEY is set; the service marks, the CLI only
reads) and signs the video and contact sheet with C2PA content credentials (when a signing
certificate is configured; otherwise the files are written unsigned and the CLI says so once).

    add_provenance_arguments(parser)                      # --consent-record, --c2pa-cert, --c2pa-key
    signing_credentials(args, trial=True)                 # before any work: ValueError if unusable
    status = finish_outputs(args, model_id=started.model_id, paths=[video, sheet])  # before the commit
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from client.credentials import (
    CERT_ENV,
    KEY_ENV,
    Provenance,
    SigningCredentials,
    credentials_from_env,
    has_certificate,
    sign_file,
    trial_signature,
)
from client.outputs import reason
from client.verify import check_video
from facekit.watermark import KEY_ENV as WATERMARK_KEY_ENV
from facekit.watermark import Watermarker, key_from_env

CHECKED_FRAMES = 16  # frames of the written video the watermark check reads


def add_provenance_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("provenance (watermark check, C2PA content credentials)")
    group.add_argument(
        "--consent-record", help="consent record id for the manifest (default: the avatar's, from the server)"
    )
    group.add_argument(
        "--c2pa-cert", type=Path, help=f"PEM certificate chain to sign with (default ${CERT_ENV})"
    )
    group.add_argument(
        "--c2pa-key", type=Path, help=f"PEM private key of that certificate (default ${KEY_ENV})"
    )


def signing_credentials(args: argparse.Namespace, *, trial: bool = False) -> SigningCredentials | None:
    """From --c2pa-cert/--c2pa-key, else the environment; None when not configured. A file that is
    missing or holds no certificate or usable key is a ValueError naming its flag (or variable),
    and so, with `trial`, is a certificate C2PA refuses to sign with (a trial signature in memory):
    `animate` calls this before it renders anything, so that signing rarely fails after; and it
    signs its files before they replace anything, so that a signing failing then writes nothing."""
    cert, key = getattr(args, "c2pa_cert", None), getattr(args, "c2pa_key", None)
    if cert is None and key is None:
        try:
            credentials = credentials_from_env()
        except OSError as error:
            raise ValueError(f"${CERT_ENV} / ${KEY_ENV}: {error.filename}: {reason(error)}") from error
        names = (f"${CERT_ENV}", f"${KEY_ENV}")
    elif cert is None or key is None:
        raise ValueError("give both --c2pa-cert and --c2pa-key")
    else:
        names = (f"--c2pa-cert {cert}", f"--c2pa-key {key}")
        try:
            credentials = SigningCredentials.from_files(cert, key)
        except OSError as error:
            flag = names[0] if Path(error.filename or "") == cert else names[1]
            raise ValueError(f"{flag}: {reason(error)}") from error
    if credentials is None:
        return None
    if not has_certificate(credentials.cert_chain):
        raise ValueError(f"{names[0]}: no PEM certificate in it")
    try:
        credentials.algorithm  # noqa: B018 (it parses the key)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{names[1]}: not an unencrypted PEM key C2PA can sign with ({error})") from error
    if trial:
        try:
            trial_signature(credentials)
        except ValueError as error:
            raise ValueError(f"{names[0]}: {error}") from error
    return credentials


def watermark_payload(video: Path) -> int | None:
    """Check the written video for the deployment's mark; print what was found; its payload."""
    key = key_from_env()
    if key is None:
        print(f"watermark: not checked (set ${WATERMARK_KEY_ENV} to check the service's mark)")
        return None
    found = check_video(video, Watermarker(key=key), max_frames=CHECKED_FRAMES)
    if not found.present:
        print(
            f"watermark: not found ({found.marked}/{found.frames} checked frames marked): "
            "the service did not mark them, or used another key"
        )
        return None
    payload = "unreadable" if found.payload is None else f"{found.payload:08x}"
    print(f"watermark: present in {found.marked}/{found.frames} checked frames, payload {payload}")
    return found.payload


def finish_outputs(
    args: argparse.Namespace, *, model_id: str, paths: Sequence[Path], names: Sequence[Path] | None = None
) -> int:
    """Check and sign the written files (paths[0]: the video); 0, or 1 when signing failed (a
    file may then be signed or not: sign partial files, and discard them on failure). `names`:
    the files' final names, when `paths` are partial files (the manifests' titles, the messages)."""
    if not paths:
        return 0
    names = list(paths if names is None else names)
    try:
        credentials = signing_credentials(args)
        payload = watermark_payload(paths[0])
    except (OSError, ValueError) as error:
        print(f"talkinghead animate: {error}", file=sys.stderr)
        return 1
    if credentials is None:
        print(f"content credentials: not configured (${CERT_ENV}, ${KEY_ENV}): the files are unsigned")
        return 0
    provenance = Provenance(
        model_id=model_id,
        consent_record_id=getattr(args, "consent_record", None),
        watermark_payload=payload,
        avatar_id=getattr(args, "avatar", None),
        created=time.time(),
    )
    for index, (path, name) in enumerate(zip(paths, names, strict=True)):
        try:
            # the contact sheet as a whole does not read as marked (its tiles do): its manifest claims none
            claim = provenance if index == 0 else replace(provenance, watermark_payload=None)
            sign_file(path, claim, credentials, title=Path(name).name)
        except Exception as error:  # c2pa.C2paError and I/O errors: the file stays, unsigned
            print(f"talkinghead animate: signing {name} failed: {error}", file=sys.stderr)
            return 1
    print(f"content credentials: signed {', '.join(map(str, names))}")
    return 0
