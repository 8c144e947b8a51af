"""C2PA content credentials on the CLI's files: the video and contact sheet carry a signed manifest
(made by talkinghead, trainedAlgorithmicMedia, model id, consent record id) that c2pa-python reads
back and validates against the tests' own CA; `talkinghead verify` reports it; `animate`'s hook
signs when configured and says the files are unsigned when not."""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import pytest

c2pa = pytest.importorskip("c2pa", reason="c2pa-python is not installed (make venv installs it)")

from client.credentials import (  # noqa: E402
    ASSERTION,
    TRAINED_ALGORITHMIC_MEDIA,
    Provenance,
    SigningCredentials,
    credentials_from_env,
    read_credentials,
    sign_file,
)
from client.provenance import finish_outputs  # noqa: E402
from facekit.video import VideoWriter, read_video, save_png  # noqa: E402
from facekit.watermark import Watermarker  # noqa: E402
from talkinghead.cli import main as cli  # noqa: E402
from tests.c2pa_ca import SigningCA, make_ca  # noqa: E402

KEY, PAYLOAD = "test deployment key", 0x5EED1234
PROVENANCE = Provenance(
    model_id="model-3f2a", consent_record_id="consent-17", watermark_payload=PAYLOAD, avatar_id="mona"
)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> SigningCA:
    return make_ca(tmp_path_factory.mktemp("ca"))


def write_outputs(folder: Path) -> tuple[Path, Path]:
    """A marked 8-frame video and contact sheet, as animate writes them."""
    rng = np.random.default_rng(0)
    base = np.clip(rng.normal(128, 40, (128, 128, 3)), 0, 255).astype(np.uint8)
    wm = Watermarker(key=KEY)
    video, sheet = folder / "out.mp4", folder / "sheet.png"
    with VideoWriter(video, fps=25, size=(128, 128)) as writer:
        for shift in range(8):
            writer.write(wm.mark(np.roll(base, shift, axis=1), PAYLOAD))
    save_png(sheet, np.concatenate([wm.mark(base, PAYLOAD)] * 2, axis=1))
    return video, sheet


def read_store(path: Path) -> dict:
    with c2pa.Reader(str(path)) as reader:
        return json.loads(reader.json())


def test_signed_files_carry_the_manifest(ca, tmp_path):
    video, sheet = write_outputs(tmp_path)
    credentials = SigningCredentials.from_files(ca.chain, ca.key)
    assert credentials.algorithm == "es256"
    for path in (video, sheet):
        sign_file(path, PROVENANCE, credentials)
        store = read_store(path)  # c2pa-python itself, default settings
        manifest = store["manifests"][store["active_manifest"]]
        assert manifest["claim_generator_info"][0]["name"] == "talkinghead"
        assertions = {a["label"]: a["data"] for a in manifest["assertions"]}
        actions = assertions.get("c2pa.actions.v2", assertions.get("c2pa.actions"))["actions"]
        assert [a["action"] for a in actions] == ["c2pa.created"]
        assert actions[0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
        assert assertions[ASSERTION] == {
            "model_id": "model-3f2a",
            "consent_record_id": "consent-17",
            "avatar_id": "mona",
            "watermark_payload": f"{PAYLOAD:08x}",
        }
        assert manifest["signature_info"]["common_name"] == "talkinghead signer"
        assert read_credentials(path, trust_anchors=ca.root.read_bytes()).state == "Trusted"
        assert read_credentials(path).state == "Valid"  # intact; nobody vouched for the signer
    frames, _ = read_video(video)  # still an ordinary video, still marked
    assert len(frames) == 8 and Watermarker(key=KEY).detect_frames(frames).payload == PAYLOAD


def test_rsa_signers_use_ps256(tmp_path):
    ca = make_ca(tmp_path / "rsa", rsa_key=True)
    _, sheet = write_outputs(tmp_path)
    credentials = SigningCredentials.from_files(ca.chain, ca.key)
    assert credentials.algorithm == "ps256"
    sign_file(sheet, PROVENANCE, credentials)
    assert read_credentials(sheet, trust_anchors=ca.root.read_bytes()).state == "Trusted"


def test_tampering_and_bad_certificates_are_caught(ca, tmp_path):
    _, sheet = write_outputs(tmp_path)
    sign_file(sheet, PROVENANCE, SigningCredentials.from_files(ca.chain, ca.key))
    data = bytearray(sheet.read_bytes())
    idat = data.index(b"IDAT") + 40
    data[idat] ^= 0xFF  # one byte of the image data
    sheet.write_bytes(bytes(data))
    report = read_credentials(sheet, trust_anchors=ca.root.read_bytes())
    assert report.state == "Invalid" and report.failures
    unsigned = tmp_path / "unsigned.png"
    save_png(unsigned, np.zeros((16, 16, 3), np.uint8))
    assert read_credentials(unsigned) is None
    no_eku = make_ca(tmp_path / "no-eku", eku=False)  # C2PA wants an extended key usage it allows
    with pytest.raises(c2pa.C2paError, match="certificate"):
        sign_file(unsigned, PROVENANCE, SigningCredentials.from_files(no_eku.chain, no_eku.key))
    assert read_credentials(unsigned) is None  # a failed signing leaves the file as it was
    with pytest.raises(ValueError, match="TALKINGHEAD_C2PA_KEY"):
        credentials_from_env({"TALKINGHEAD_C2PA_CERT": str(ca.chain)})
    pair = {"TALKINGHEAD_C2PA_CERT": str(ca.chain), "TALKINGHEAD_C2PA_KEY": str(ca.key)}
    assert credentials_from_env(pair).timestamp_url is None  # type: ignore[union-attr]
    stamped = credentials_from_env({**pair, "TALKINGHEAD_C2PA_TIMESTAMP_URL": "http://tsa.example/rfc3161"})
    assert stamped is not None and stamped.timestamp_url == "http://tsa.example/rfc3161"


def test_verify_reports_the_credentials(ca, tmp_path, capsys, monkeypatch):
    video, _ = write_outputs(tmp_path)
    sign_file(video, PROVENANCE, SigningCredentials.from_files(ca.chain, ca.key))
    monkeypatch.setenv("TALKINGHEAD_WATERMARK_KEY", KEY)
    assert cli(["verify", str(video), "--trust", str(ca.root)]) == 0
    out = capsys.readouterr().out
    assert "present: 8/8 frames marked" in out and f"payload {PAYLOAD:08x}" in out
    assert "content credentials: Trusted, signed by talkinghead signer" in out
    assert "trained algorithmic media" in out and "model id model-3f2a, consent record consent-17" in out
    assert cli(["verify", str(video), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["credentials"]["state"] == "Valid" and report["credentials"]["trained_algorithmic_media"]


def test_verify_with_a_key_still_reports_a_damaged_files_credentials(ca, tmp_path, capsys, monkeypatch):
    """A signed video cut in half: with a key, verify stopped at "cannot open or decode the video"
    and never showed the manifest's own verdict, which without a key it did (Invalid, the hash
    mismatch). Now both: the watermark not checked, the credentials Invalid, exit 2."""
    video, _ = write_outputs(tmp_path)
    sign_file(video, PROVENANCE, SigningCredentials.from_files(ca.chain, ca.key))
    data = video.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    monkeypatch.setenv("TALKINGHEAD_WATERMARK_KEY", KEY)
    assert cli(["verify", str(cut), "--trust", str(ca.root)]) == 2
    out = capsys.readouterr().out
    assert "watermark: not checked: " in out
    assert "content credentials: Invalid" in out and "validation failures: " in out
    garbage = tmp_path / "notes.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    assert cli(["verify", str(garbage)]) == 2  # no pixels and no manifest: an error, as before
    assert "cannot" in capsys.readouterr().err


def test_animate_signs_its_outputs_when_configured(ca, tmp_path, capsys, monkeypatch):
    video, sheet = write_outputs(tmp_path)
    args = argparse.Namespace(consent_record="consent-17", avatar="mona", c2pa_cert=None, c2pa_key=None)
    monkeypatch.delenv("TALKINGHEAD_C2PA_CERT", raising=False)
    monkeypatch.delenv("TALKINGHEAD_C2PA_KEY", raising=False)
    monkeypatch.delenv("TALKINGHEAD_WATERMARK_KEY", raising=False)
    assert finish_outputs(args, model_id="model-3f2a", paths=[video, sheet]) == 0
    assert "the files are unsigned" in capsys.readouterr().out
    assert read_credentials(video) is None and read_credentials(sheet) is None
    monkeypatch.setenv("TALKINGHEAD_C2PA_CERT", str(ca.chain))
    monkeypatch.setenv("TALKINGHEAD_C2PA_KEY", str(ca.key))
    monkeypatch.setenv("TALKINGHEAD_WATERMARK_KEY", KEY)
    assert finish_outputs(args, model_id="model-3f2a", paths=[video, sheet]) == 0
    out = capsys.readouterr().out
    assert f"watermark: present in 8/8 checked frames, payload {PAYLOAD:08x}" in out and "signed" in out
    for path in (video, sheet):
        report = read_credentials(path, trust_anchors=ca.root.read_bytes())
        assert report.state == "Trusted" and report.generation["consent_record_id"] == "consent-17"
        assert report.generation["avatar_id"] == "mona"
    # The payload is claimed by the video, which carries the mark, not by the sheet, which does not.
    assert read_credentials(video).generation["watermark_payload"] == f"{PAYLOAD:08x}"  # type: ignore[union-attr]
    assert "watermark_payload" not in read_credentials(sheet).generation  # type: ignore[union-attr]
    store = read_store(video)
    assertions = {a["label"]: a["data"] for a in store["manifests"][store["active_manifest"]]["assertions"]}
    (action,) = assertions.get("c2pa.actions.v2", assertions.get("c2pa.actions"))["actions"]
    made = datetime.datetime.fromisoformat(action["when"])
    assert abs(made.timestamp() - time.time()) < 60 and made.tzinfo is not None
