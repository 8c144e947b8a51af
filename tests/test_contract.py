"""The export/serving contract (facekit/contract.py) pinned: changing it breaks every served model.

A change here is deliberate: re-export the models, and update ../shared/DESIGN.md, the README's model table
and both sides (export writes by the contract, the service reads by it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from facekit import contract
from facekit.contract import Meta, ModelInfo
from facekit.ids import DEFAULT_TENANT, scoped_id, split_id, validate_avatar_id
from facekit.rasterize import DrawStyle

ROOT = Path(__file__).resolve().parent.parent


def test_model_names() -> None:
    assert (contract.EMBEDDER, contract.GENERATOR) == ("embedder", "generator")
    assert contract.personalised_name("mona-1") == "generator_mona-1"
    with pytest.raises(ValueError, match="invalid avatar id"):
        contract.personalised_name("../etc")
    with pytest.raises(ValueError, match="invalid avatar id"):
        contract.personalised_name("mona\n")  # a second avatar, file and model beside "mona"
    with pytest.raises(ValueError) as long:
        contract.personalised_name("m" * 9000)
    assert len(str(long.value)) < 250, "a rejected id is not echoed whole"
    assert contract.model_name({Meta.KIND: "embedder"}) == "embedder"
    assert contract.model_name({Meta.KIND: "personalised", Meta.AVATAR: "mona"}) == "generator_mona"
    # A tenant's avatar is stored as <tenant>.<id> (facekit/ids.py); nothing else may hold a dot.
    assert contract.personalised_name("acme.mona") == "generator_acme.mona"
    for bad in ("a.b.c", ".mona", "acme.", "Acme.mona"):
        with pytest.raises(ValueError, match="invalid avatar id"):
            contract.personalised_name(bad)
    assert split_id(scoped_id("acme", "mona")) == ("acme", "mona")
    assert scoped_id(DEFAULT_TENANT, "mona") == "mona" and split_id("mona") == (DEFAULT_TENANT, "mona")
    with pytest.raises(ValueError):
        validate_avatar_id("acme.mona")  # clients never name a stored id


def test_tensor_names_dtypes_and_shapes() -> None:
    signatures = {
        kind: (
            [(t.name, t.dtype, t.shape) for t in s.inputs],
            [(t.name, t.dtype, t.shape) for t in s.outputs],
        )
        for kind, s in contract.SIGNATURES.items()
    }
    image = ("B", "S", "S", 3)
    assert signatures == {
        "embedder": (
            [("image", "uint8", image), ("landmark_image", "uint8", image)],
            [("embedding", "float32", ("B", "E")), ("adain", "float32", ("B", "D"))],
        ),
        "generator": (
            [("landmark_image", "uint8", image), ("adain", "float32", ("B", "D"))],
            [("image", "uint8", image)],
        ),
        "personalised": ([("landmark_image", "uint8", image)], [("image", "uint8", image)]),
    }
    warp = {
        kind: [t.name for t in contract.signature(kind, warp_guided=True).inputs] for kind in contract.KINDS
    }
    assert warp == {
        "embedder": ["image", "landmark_image"],
        "generator": ["landmark_image", "adain", "warped"],
        "personalised": ["landmark_image", "warped"],
    }
    warped = contract.signature("personalised", warp_guided=True).inputs[1]
    assert (warped.dtype, warped.shape) == ("uint8", image)
    assert contract.signature("generator", warp_guided=False) == contract.SIGNATURES["generator"]
    assert contract.EMBEDDING_SIZE == 512
    adain = contract.SIGNATURES["generator"].inputs[1]
    assert adain.dims(image_size=128, adain_size=2240) == [2240]
    assert contract.SIGNATURES["generator"].outputs[0].dims(image_size=128, adain_size=2240) == [128, 128, 3]


def test_metadata_keys() -> None:
    assert Meta.PREFIX == "talkinghead."
    assert Meta.KEYS == (
        "talkinghead.kind",
        "talkinghead.image_size",
        "talkinghead.adain_size",
        "talkinghead.embedding_size",
        "talkinghead.draw_style",
        "talkinghead.crop_scale",
        "talkinghead.model_id",
        "talkinghead.step",
        "talkinghead.avatar",
        "talkinghead.warp_guided",
        "talkinghead.consent_record",
        "talkinghead.avatar_created",
        "talkinghead.avatar_store",
        "talkinghead.job",
        "talkinghead.gflops_per_frame",
    )
    assert contract.KINDS == ("embedder", "generator", "personalised")


def test_metadata_round_trip_and_exact_strings() -> None:
    info = ModelInfo(
        image_size=128,
        adain_size=2240,
        embedding_size=512,
        draw_style=DrawStyle(line_width=1, antialias=True),
        crop_scale=1.8,
        model_id="abc123",
    )
    meta = info.metadata(kind="personalised", step=7, avatar="mona")
    assert meta == {
        "talkinghead.kind": "personalised",
        "talkinghead.image_size": "128",
        "talkinghead.adain_size": "2240",
        "talkinghead.embedding_size": "512",
        "talkinghead.draw_style": '{"antialias": true, "line_width": 1}',
        "talkinghead.crop_scale": "1.8",
        "talkinghead.model_id": "abc123",
        "talkinghead.step": "7",
        "talkinghead.avatar": "mona",
        "talkinghead.warp_guided": "false",
    }
    assert ModelInfo.from_metadata(meta, where="test") == info
    warp = ModelInfo(**{**info.__dict__, "warp_guided": True})
    assert ModelInfo.from_metadata(warp.metadata(kind="generator", step=0), where="test").warp_guided
    assert [t.name for t in warp.signature("generator").inputs] == ["landmark_image", "adain", "warped"]
    assert Meta.AVATAR not in info.metadata(kind="generator", step=0)
    with pytest.raises(ValueError, match="names its avatar"):
        info.metadata(kind="personalised", step=0)
    with pytest.raises(ValueError, match="unknown kind"):
        info.metadata(kind="discriminator", step=0)


def test_older_metadata_defaults_and_malformed_metadata() -> None:
    minimal = {
        "talkinghead.image_size": "256",
        "talkinghead.adain_size": "10",
        "talkinghead.draw_style": '{"antialias": false, "line_width": 2}',
        "talkinghead.model_id": "m",
    }
    info = ModelInfo.from_metadata(minimal, where="old.onnx")
    assert (info.embedding_size, info.crop_scale, info.warp_guided) == (512, 1.8, False)
    with pytest.raises(ValueError, match="malformed"):
        ModelInfo.from_metadata({**minimal, "talkinghead.warp_guided": "yes"}, where="old.onnx")
    with pytest.raises(ValueError, match=r"old\.onnx: missing or malformed talkinghead\.\* metadata"):
        ModelInfo.from_metadata({**minimal, "talkinghead.image_size": "big"}, where="old.onnx")


def test_contract_is_torch_free() -> None:
    code = "import sys, facekit.contract; sys.exit('torch' in sys.modules or 'training' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


def test_latest_version_is_the_highest_number(tmp_path: Path) -> None:
    model = tmp_path / "generator"
    assert contract.latest_version(model) is None
    for version in ("1", "2", "10", "staging"):
        (model / version).mkdir(parents=True)
        (model / version / contract.MODEL_FILE).write_bytes(b"onnx")
    (model / "11").mkdir()  # a version without its file yet
    assert contract.latest_version(model) == model / "10" / "model.onnx"
