"""The invisible watermark as a user meets it: marked frames verify with their payload after the
edits a frame goes through (JPEG 75, half size, a 10% crop, the CLI's H.264), unmarked frames and
another deployment's marks do not, the mark costs little PSNR, and bad input is refused.
`talkinghead verify` on files. Frames: the demo portrait (facekit/assets), whole and face crops,
and a blurred crop standing in for a generator's smooth output."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from facekit.crop import crop_face
from facekit.detect import make_detector
from facekit.pasteback import Portrait, paste_back
from facekit.video import VideoWriter, read_image, save_png
from facekit.watermark import (
    THRESHOLD,
    MissingKeyError,
    Watermarker,
    embed,
    embed_jit,
    key_from_env,
    payload_for,
    require_key,
)
from facekit.watermark.attacks import crop, h264, half, jpeg
from facekit.watermark.code import CODED_BITS, decode, encode
from talkinghead.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
KEY = "test deployment key"
PAYLOAD = payload_for("tenant-a", "mona")


@pytest.fixture(scope="module")
def wm() -> Watermarker:
    return Watermarker(key=KEY)


@pytest.fixture(scope="module")
def frames() -> dict[str, np.ndarray]:
    portrait = read_image(ROOT / "facekit/assets/demo_portrait.png")  # (512, 512, 3)
    face = portrait[20:276, 120:376]  # the face, 256 px
    small = cv2.resize(face, (128, 128), interpolation=cv2.INTER_AREA)
    return {
        "crop128": small,
        "smooth128": cv2.GaussianBlur(small, (0, 0), 1.5),  # a generator's output is smoother
        "crop256": face,
        "portrait512": portrait,
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.parametrize("name", ["crop128", "smooth128", "crop256", "portrait512"])
@pytest.mark.parametrize(
    "attack",
    [lambda f: f, jpeg, half, crop, lambda f: crop(f, at=(0.0, 1.0)), lambda f: jpeg(crop(half(f)), 90)],
    ids=["none", "jpeg75", "half", "crop10-centre", "crop10-corner", "half-crop-jpeg90"],
)
def test_marked_frames_verify_with_their_payload(wm, frames, name, attack):
    found = wm.detect(attack(wm.mark(frames[name], PAYLOAD)))
    assert found.present and found.payload == PAYLOAD
    assert found.score > THRESHOLD and found.confidence > 0.999


def test_a_crop_is_located(wm, frames):
    marked = wm.mark(frames["crop256"], PAYLOAD)
    x, y, side = wm.detect(crop(marked, 0.1, at=(1.0, 0.0))).window  # right, top
    assert side == pytest.approx(0.9, abs=0.02) and x == pytest.approx(0.1, abs=0.02) and y < 0.02


def test_marks_survive_the_clis_h264(wm, frames):
    """JPEG 90 on the wire, then facekit.video.VideoWriter (libx264 CRF 18, yuv420p) and back."""
    sequence = [wm.mark(np.roll(frames["crop128"], shift, axis=1), PAYLOAD) for shift in range(0, 12, 2)]
    decoded = h264(sequence, jpeg_quality=90)
    found = [wm.detect(frame) for frame in decoded]
    assert all(d.present and d.payload == PAYLOAD for d in found)
    assert wm.combine(found).payload == PAYLOAD


def test_unmarked_frames_and_other_keys_do_not_verify(wm, frames):
    other = Watermarker(key=KEY + " of another deployment")
    for frame in frames.values():
        for image in (frame, jpeg(frame), half(frame), crop(frame)):
            assert not wm.detect(image).present
        found = wm.detect(other.mark(frame, PAYLOAD))
        assert not found.present and found.payload is None and found.confidence < 0.5


def test_the_mark_costs_little_psnr(wm, frames):
    for frame in frames.values():
        assert psnr(wm.mark(frame, PAYLOAD), frame) > 36.5  # RMS 3.5 grey levels: ~37.5 dB
    # what an evaluation against the real frame loses: a warp-like error of ~26 dB loses < 0.5 dB
    real = frames["crop128"]
    generated = np.clip(real + np.random.default_rng(0).normal(0, 12, real.shape), 0, 255).astype(np.uint8)
    assert psnr(generated, real) - psnr(wm.mark(generated, PAYLOAD), real) < 0.5


@pytest.mark.parametrize("size", [(128, 128), (256, 256), (512, 512), (1024, 512), (515, 517)])
def test_every_frame_size_carries_the_marks_full_strength(wm, size):
    """RMS 3.5 grey levels at every size (on a flat grey frame the texture mask is 1): stretched
    bilinearly over frames above 128 px the mark had 0.86-0.87 of it, so every paste-back frame
    carried a weaker mark than a crop."""
    width, height = size
    grey = np.full((height, width, 3), 128, np.uint8)
    added = wm.mark(grey, PAYLOAD).astype(np.float32) - grey
    assert float(np.sqrt(np.mean(np.square(added)))) == pytest.approx(embed.DEFAULT_STRENGTH, rel=0.03)


@pytest.fixture(scope="module")
def pasted() -> tuple[Portrait, np.ndarray, np.ndarray]:
    """The demo portrait prepared for paste-back (its 167 px face box: 0.33 of its side), a stand-in
    generated crop (its own 128 px face crop, blurred as a generator's output is) and its points."""
    image = read_image(ROOT / "facekit/assets/demo_portrait.png")
    face, points, box = crop_face(image, make_detector("dlib").detect(image)[0].points, 128)
    return Portrait.from_photo(image, box), cv2.GaussianBlur(face, (0, 0), 1.5), points


@pytest.mark.parametrize("region", ["crop", "face"])
def test_the_face_cut_out_of_a_paste_back_frame_carries_the_mark(wm, pasted, region):
    """Paste-back as the service does it: the generated crop marked, pasted into the portrait whose
    face box is marked too (`mark_box`), the whole frame marked. The face cut out at its box
    verifies with the payload, also after JPEG 75, and the whole frame still does. With the whole
    frame marked only (before 2026-12-05) the cut carried no mark the detector could find: the
    frame's mark is ~3 x too large there for its search down to 85% of the side."""
    portrait, generated, points = pasted
    x0, y0, side = portrait.origin
    boxed = Portrait(wm.mark_box(portrait.image, PAYLOAD, portrait.origin), portrait.box)
    frame = wm.mark(paste_back(boxed, wm.mark(generated, PAYLOAD), points, region=region), PAYLOAD)
    for image in (frame, jpeg(frame)):
        cut = wm.detect(image[y0 : y0 + side, x0 : x0 + side])
        assert cut.present and cut.payload == PAYLOAD, cut.score
        whole = wm.detect(image)
        assert whole.present and whole.payload == PAYLOAD, whole.score
    before = wm.mark(paste_back(portrait, generated, points, region=region), PAYLOAD)
    assert not wm.detect(before[y0 : y0 + side, x0 : x0 + side]).present


def test_mark_box_marks_the_box_only(wm, pasted):
    portrait, _, _ = pasted
    image = portrait.image
    x0, y0, side = portrait.origin
    marked = wm.mark_box(image, PAYLOAD, portrait.origin)
    changed = np.any(marked != image, axis=2)
    assert changed[y0 : y0 + side, x0 : x0 + side].mean() > 0.5
    changed[y0 : y0 + side, x0 : x0 + side] = False
    assert not changed.any()
    # the box's mark is the mark of a side x side frame: the same pixels as marking the cut alone
    assert np.array_equal(
        marked[y0 : y0 + side, x0 : x0 + side], wm.mark(image[y0 : y0 + side, x0 : x0 + side], PAYLOAD)
    )
    # a box partly outside the frame marks the part inside; one (almost) all outside, nothing
    width = image.shape[1]
    corner = wm.mark_box(image, PAYLOAD, (width - 100, -50, 200))
    assert np.array_equal(corner[50:, : width - 100], image[50:, : width - 100])
    assert np.any(corner[:150, width - 100 :] != image[:150, width - 100 :])
    assert np.array_equal(wm.mark_box(image, PAYLOAD, (width - 8, 0, 200)), image)


def test_marking_is_deterministic_and_per_payload(wm, frames):
    frame = frames["crop128"]
    assert np.array_equal(wm.mark(frame, PAYLOAD), Watermarker(key=KEY).mark(frame, PAYLOAD))
    assert not np.array_equal(wm.mark(frame, PAYLOAD), wm.mark(frame, PAYLOAD ^ 1))
    assert (
        wm.detect(wm.mark(frame, 0)).payload == 0
        and wm.detect(wm.mark(frame, 2**32 - 1)).payload == 2**32 - 1
    )


def test_bad_input_is_refused(wm, frames):
    with pytest.raises(ValueError, match="uint8 RGB"):
        wm.mark(frames["crop128"].astype(np.float32), PAYLOAD)
    with pytest.raises(ValueError, match="uint8 RGB"):
        wm.detect(frames["crop128"][..., 0])
    with pytest.raises(ValueError, match="too small"):
        wm.mark(frames["crop128"][:8, :8], PAYLOAD)
    with pytest.raises(ValueError, match="payload"):
        wm.mark(frames["crop128"], 2**32)
    with pytest.raises(TypeError, match="payload"):
        wm.mark(frames["crop128"], "mona")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        Watermarker(key="")
    with pytest.raises(ValueError, match="strength"):
        Watermarker(key=KEY, strength=0)


def _opencv_mark(frame: np.ndarray, pattern: np.ndarray, strength: float) -> np.ndarray:
    """The mark as OpenCV calls made it before the loops were compiled (embed.py, 2026-12)."""
    height, width = frame.shape[:2]
    factor = min(1.0, embed.MASK_SIDE / max(height, width))
    small = frame
    if factor < 1.0:
        size = (max(8, round(width * factor)), max(8, round(height * factor)))
        small = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
    detail = grey - cv2.GaussianBlur(grey, (0, 0), 1.0)
    energy = np.sqrt(cv2.GaussianBlur(detail * detail, (0, 0), 1.5))
    mask = np.clip(energy / (float(energy.mean()) + 1e-3), embed.MASK_FLOOR, embed.MASK_CAP).astype(
        np.float32
    )
    mask *= 1.0 / np.sqrt(float(np.mean(mask * mask)))
    if factor < 1.0:
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR)
    delta = cv2.multiply(pattern, mask, scale=strength)
    return cv2.add(frame, cv2.cvtColor(delta, cv2.COLOR_GRAY2RGB), dtype=cv2.CV_8U)


def test_the_compiled_mark_is_the_opencv_mark(wm, frames):
    """The compiled loops add what the OpenCV calls added: the same pixels, but for one grey level
    on a rare pixel whose sum lands within float rounding of a half (sums taken in another order)."""
    rng = np.random.default_rng(3)
    cases = dict(frames)
    cases["noise96x128"] = rng.integers(0, 256, (96, 128, 3), np.uint8)
    cases["flat40"] = np.full((40, 40, 3), 128, np.uint8)
    cases["white64"] = np.full((64, 64, 3), 255, np.uint8)  # saturates
    cases["strip16x300"] = np.ascontiguousarray(
        frames["portrait512"][200:216, 100:400]
    )  # the mask's 8 px floor
    cases["view"] = frames["portrait512"][::3, ::3]  # not contiguous
    differing, pixels = 0, 0
    for name, frame in cases.items():
        got = wm.mark(frame, PAYLOAD)
        want = _opencv_mark(frame, wm.pattern(PAYLOAD, (frame.shape[1], frame.shape[0])), wm.strength)
        diff = np.abs(got.astype(int) - want.astype(int))
        assert got.shape == frame.shape and got.dtype == np.uint8, name
        assert diff.max() <= 1, (name, diff.max())
        differing, pixels = differing + int((diff > 0).sum()), pixels + diff.size
    assert differing <= pixels * 1e-3, (differing, pixels)
    assert not np.array_equal(wm.mark(cases["flat40"], PAYLOAD), cases["flat40"])  # it does add a mark


@pytest.mark.parametrize("shape", [(128, 128), (96, 128), (256, 256), (256, 128)])
def test_the_one_pass_mark_is_the_separate_loops_mark(wm, shape):
    """Frames whose mask is 2 or 4 times smaller (the served 128 and 256 px) are marked in one
    compiled pass (embed_jit.mark_scaled): OpenCV's grey of the shrunk frame to the bit, the
    mask's upscaling to a unit in the last place, so the marked pixels of the separate loops."""
    height, width = shape
    rng = np.random.default_rng(height + width)
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), np.uint8), (0, 0), 1.0)
    pattern = np.ascontiguousarray(wm.pattern(PAYLOAD, (width, height)))
    step = embed._mask_step(height, width)
    assert step in (2, 4)
    small = (width // step, height // step)
    grey = cv2.cvtColor(cv2.resize(smooth, small, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
    got_grey = embed_jit._grey_2x(smooth) if step == 2 else embed_jit._grey_area(smooth, step)
    np.testing.assert_array_equal(got_grey, grey)
    for frame in (smooth, rng.integers(0, 256, (height, width, 3), np.uint8)):
        got = embed.add_mark(frame, pattern, strength=wm.strength)
        want = embed_jit.add_mark(frame, pattern, embed.texture_mask(frame), wm.strength)
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1 and (diff > 0).sum() <= diff.size * 1e-3, (diff.max(), (diff > 0).sum())
        assert not np.array_equal(got, frame)


def test_payload_code_corrects_errors_and_rejects_noise():
    rng = np.random.default_rng(1)
    bits = encode(PAYLOAD)
    assert bits.shape == (CODED_BITS,)
    noisy = (2.0 * bits - 1) * 1.5 + rng.normal(0, 1, CODED_BITS)  # ~7% of the bits flipped
    assert decode(noisy) == PAYLOAD
    wrong = sum(decode(rng.normal(0, 1, CODED_BITS)) is not None for _ in range(200))
    assert wrong < 10  # CRC-8: 1 in 256 random decodings pass


def test_payload_and_key_from_the_environment():
    assert payload_for("tenant-a", "mona") == PAYLOAD < 2**32
    assert payload_for("tenant-b", "mona") != PAYLOAD
    assert key_from_env({"TALKINGHEAD_WATERMARK_KEY": "s3cret"}) == "s3cret"
    assert key_from_env({"TALKINGHEAD_WATERMARK_KEY": ""}) is None and key_from_env({}) is None
    assert "s3cret" not in repr(Watermarker(key="s3cret"))


def test_verify_command(wm, frames, tmp_path, capsys, monkeypatch):
    save_png(tmp_path / "marked.png", wm.mark(frames["crop256"], PAYLOAD))
    save_png(tmp_path / "plain.png", frames["crop256"])
    with VideoWriter(tmp_path / "marked.mp4", fps=25, size=(128, 128)) as writer:
        for shift in range(8):
            writer.write(wm.mark(np.roll(frames["crop128"], shift, axis=0), PAYLOAD))
    monkeypatch.setenv("TALKINGHEAD_WATERMARK_KEY", KEY)
    assert cli(["verify", str(tmp_path / "marked.png"), str(tmp_path / "plain.png")]) == 0
    out = capsys.readouterr().out
    assert f"present, payload {PAYLOAD:08x}" in out and "watermark: absent; score" in out
    assert cli(["verify", str(tmp_path / "marked.mp4"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "video" and report["watermark"]["present"] is True
    assert report["watermark"]["share"] == 1.0 and report["watermark"]["payload"] == f"{PAYLOAD:08x}"
    assert cli(["verify", str(tmp_path / "marked.png"), "--key", "another key"]) == 0
    assert "watermark: absent" in capsys.readouterr().out
    monkeypatch.delenv("TALKINGHEAD_WATERMARK_KEY")
    assert cli(["verify", str(tmp_path / "marked.png"), str(tmp_path / "missing.png")]) == 2
    captured = capsys.readouterr()
    assert "not checked (no key" in captured.out and "missing.png: no such file" in captured.err


def test_verify_finds_a_splice_and_reads_files_by_their_content(wm, frames, tmp_path, capsys, monkeypatch):
    """8 generated (marked) frames spliced between 12 real ones: "absent" before, though 8 frames
    read the payload alone; now present in part, with the payload. An unmarked file's confidence
    is 0 (it was 1 - the false-alarm odds of its score: 0.9997 for a real photo whose decoding
    passed the CRC by chance). A video named .png or without a suffix is read as the video it is
    ("cannot read image", exit 2, before); a Matroska file, which cannot carry C2PA credentials,
    has none (exit 2 with c2pa's "NotSupported" before); with --json a missing file is an object."""
    plain = [np.roll(frames["crop128"], shift, axis=1) for shift in range(20)]
    spliced = [wm.mark(f, PAYLOAD) if 6 <= i < 14 else f for i, f in enumerate(plain)]
    for name, video in (("splice.mp4", spliced), ("plain.mp4", plain), ("marked.mkv", spliced[6:14])):
        with VideoWriter(tmp_path / name, fps=25, size=(128, 128)) as writer:
            for frame in video:
                writer.write(frame)
    (tmp_path / "clip.png").write_bytes((tmp_path / "splice.mp4").read_bytes())
    (tmp_path / "clip").write_bytes((tmp_path / "splice.mp4").read_bytes())
    save_png(tmp_path / "plain.png", frames["crop256"])
    monkeypatch.setenv("TALKINGHEAD_WATERMARK_KEY", KEY)

    assert cli(["verify", str(tmp_path / "splice.mp4")]) == 0
    out = capsys.readouterr().out
    assert "watermark: present in part: 8/20 frames marked (40%)" in out and f"payload {PAYLOAD:08x}" in out
    paths = [tmp_path / n for n in ("splice.mp4", "plain.mp4", "plain.png", "clip.png", "clip", "marked.mkv")]
    assert cli(["verify", "--json", *map(str, paths), str(tmp_path / "missing.mp4")]) == 2
    reports = {Path(r["path"]).name: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    splice = reports["splice.mp4"]["watermark"]
    assert splice["present"] and splice["partial"] and splice["payload"] == f"{PAYLOAD:08x}"
    assert splice["payload_frames"] >= 2 and splice["confidence"] > 0.999, splice
    for name in ("plain.mp4", "plain.png"):
        assert (
            reports[name]["watermark"]["present"] is False and reports[name]["watermark"]["confidence"] == 0
        )
    for name in ("clip.png", "clip"):
        assert reports[name]["kind"] == "video" and reports[name]["watermark"]["partial"], reports[name]
    mkv = reports["marked.mkv"]
    assert (
        mkv["watermark"]["present"] and not mkv["watermark"]["partial"] and mkv["credentials_error"] is None
    )
    assert mkv["credentials_note"] == "this format cannot carry them"
    assert reports["missing.mp4"] == {
        "path": str(tmp_path / "missing.mp4"),
        "error": f"{tmp_path}/missing.mp4: no such file",
    }
    assert cli(["verify", str(tmp_path / "marked.mkv")]) == 0
    assert "content credentials: none (this format cannot carry them)" in capsys.readouterr().out


def test_a_service_without_a_key_marks_with_the_key_its_file_keeps(tmp_path):
    file = tmp_path / "state" / "watermark.key"
    key, origin = require_key({}, production=False, key_file=file)
    assert origin == str(file) and file.read_text().strip() == key and len(key) >= 40
    assert file.stat().st_mode & 0o777 == 0o600  # a secret: the owner's only
    assert require_key({}, production=False, key_file=file) == (key, str(file))  # kept: old videos verify
    env = {"TALKINGHEAD_WATERMARK_KEY": "k"}
    assert require_key(env, production=False, key_file=file) == ("k", "$TALKINGHEAD_WATERMARK_KEY")
    assert require_key(env, production=True, key_file=file) == ("k", "$TALKINGHEAD_WATERMARK_KEY")
    # production takes the deployment's secret only, never a key a pod made itself
    with pytest.raises(MissingKeyError, match="TALKINGHEAD_WATERMARK_KEY"):
        require_key({}, production=True, key_file=file)
    (tmp_path / "empty.key").write_text("\n")
    with pytest.raises(MissingKeyError, match=r"empty\.key is empty"):
        require_key({}, production=False, key_file=tmp_path / "empty.key")
    with pytest.raises(MissingKeyError, match=r"cannot read or make .*state: Is a directory"):
        require_key({}, production=False, key_file=tmp_path / "state")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["watermark.key"]  # no temporary left


def test_services_starting_at_once_share_the_key_the_first_made(tmp_path):
    file = tmp_path / "watermark.key"
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: require_key({}, production=False, key_file=file)[0], range(32)))
    assert keys == {file.read_text().strip()}


def test_the_watermark_and_verify_stay_torch_free_and_serverless():
    code = (
        "import sys, facekit.watermark, client.verify_command, client.provenance\n"
        "bad = {m.split('.')[0] for m in sys.modules} & {'torch', 'training', 'export', 'service'}\n"
        "sys.exit(str(sorted(bad)) if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
