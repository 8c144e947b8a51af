"""The evaluation suite measures what a user would judge: references and driving frames follow the
protocol, its identity figures tell one person from another, and `talkinghead evaluate` writes a
table, JSON and contact sheets a person can read. Real clips come from ../shared/data/faces."""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facekit.motion import STABLE_POINTS
from facekit.smoothing import jitter
from talkinghead.cli import main as cli
from talkinghead.cli import run_module
from training import checkpoint
from training.config import EvalConfig
from training.evaluation import command
from training.evaluation.methods import Fitted, WarpBaseline
from training.evaluation.protocol import EvalClip
from training.evaluation.readings import FaceReading, correlation, mouth_opening, paired_nme, read_faces
from training.evaluation.report import Scores, against, pooled, score_frames
from training.metrics import PSNR_CAP_DB

FACES = Path(__file__).resolve().parents[2] / "shared/data/faces"
MODEL = Path(__file__).resolve().parents[1] / "models/talkinghead-small.pt"
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason=f"test clips not found at {FACES}")
CLIPS = ["dreamtalk_mead_w009", "dpe_s"]  # a woman and a man, both kept out of training


def _clip(n: int = 150, fps: float = 25.0) -> EvalClip:
    frames = np.zeros((n, 8, 8, 3), np.uint8)
    return EvalClip("synthetic", frames, np.zeros((n, 68, 2), np.float32), np.arange(n) / fps)


def test_references_lie_in_the_first_two_seconds_and_driving_frames_after() -> None:
    clip, protocol = _clip(), EvalConfig()
    refs8, refs1 = clip.references(8, protocol), clip.references(1, protocol)
    drive = clip.driving(protocol)
    assert len(refs8) == 8 and len(set(refs8)) == 8 and clip.times[refs8].max() < 2.0
    assert refs8[0] == 0 and refs8[-1] == 49  # spread over the whole window
    assert list(refs1) == [0]
    assert drive[0] == 50 and np.all(np.diff(drive) == 5) and drive[-1] == 145
    assert len(clip.driving(protocol, limit=4)) == 4
    with pytest.raises(ValueError, match="fewer than T"):
        _clip(n=40, fps=100.0).references(8, EvalConfig(reference_seconds=0.05))


def test_mouth_opening_and_correlation() -> None:
    pts = np.zeros((3, 68, 2))
    pts[:, 36], pts[:, 45] = (0, 0), (10, 0)  # outer eye corners 10 px apart
    for i, gap in enumerate((0.0, 2.0, 5.0)):
        pts[i, 61:64, 1], pts[i, 65:68, 1] = 0.0, gap
    assert np.allclose(mouth_opening(pts), [0.0, 0.2, 0.5])
    assert correlation(np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 6, 8])) == pytest.approx(1.0)
    assert np.isnan(correlation(np.array([1.0, 1, 1, 1]), np.array([1.0, 2, 3, 4])))  # a frozen mouth


def test_a_perfect_frame_counts_in_the_psnr_means() -> None:
    """A bit-exact frame scores the PSNR cap, finite, so the clip's and the pooled means count it
    (an infinite PSNR was dropped from them: the mean was the other frames' alone)."""
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    generated = real.copy()
    generated[1] = np.clip(real[1].astype(int) + rng.integers(-40, 41, real[1].shape), 0, 255)
    none = [FaceReading(None, None)] * 2
    scores = score_frames(generated, real, none, none, None)
    perfect, noisy = scores.values["psnr"]
    assert perfect == PSNR_CAP_DB and noisy < 30
    assert scores.means()["psnr"] == pytest.approx((PSNR_CAP_DB + noisy) / 2)
    assert pooled({"clip": scores})["psnr"] == pytest.approx((PSNR_CAP_DB + noisy) / 2)


def test_a_method_is_compared_with_the_warp_on_the_frames_both_measured() -> None:
    """A frame where only the method shows a face is often a hard one: in its own pooled NME it
    counts, against the warp it does not. The interval holds the mean, and people are counted."""
    nan = np.nan
    warp = {
        "a": Scores({"ssim": np.array([0.5, 0.6, 0.7]), "nme": np.array([0.010, 0.012, nan])}),
        "b": Scores({"ssim": np.array([0.4, 0.5]), "nme": np.array([0.020, 0.022])}),
    }
    method = {  # better SSIM for both people; NME better on every common frame, and a hard frame found
        "a": Scores({"ssim": np.array([0.55, 0.62, 0.75]), "nme": np.array([0.009, 0.011, 0.090])}),
        "b": Scores({"ssim": np.array([0.41, 0.52]), "nme": np.array([0.019, 0.021])}),
    }
    assert pooled(method)["nme"] > pooled(warp)["nme"]  # the hard frame makes it look worse
    figures = against(method, warp)
    nme, ssim = figures["nme"], figures["ssim"]
    assert nme["frames"] == 4 and nme["difference"] == pytest.approx(-0.001)
    assert nme["people_better"] == 2 == nme["people"]
    assert nme["low"] == pytest.approx(-0.001) and nme["high"] == pytest.approx(-0.001)
    assert ssim["frames"] == 5 and ssim["difference"] == pytest.approx(
        np.mean([0.05, 0.02, 0.05, 0.01, 0.02])
    )
    assert 0 < ssim["low"] < ssim["difference"] < ssim["high"] and ssim["people_better"] == 2
    # not measured at all (no PSNR here): no figures, not zeros
    nothing = {"difference": None, "low": None, "high": None, "frames": 0, "people_better": 0, "people": 0}
    assert figures["psnr"] == nothing
    assert against(warp, warp)["ssim"] == {
        "difference": 0.0,
        "low": 0.0,
        "high": 0.0,
        "frames": 5,
        "people_better": 0,
        "people": 2,
    }


@pytest.mark.parametrize("flag", ["--still-frames", "--jitter-frames"])
def test_motion_figures_refuse_fewer_than_two_frames(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        cli(["evaluate", flag, "1"])
    assert refused.value.code == 2 and f"{flag}: needs at least 2 frames, got 1" in capsys.readouterr().err


@pytest.mark.skipif(not MODEL.is_file(), reason=f"committed model not found at {MODEL}")
def test_steps_zero_is_reported_as_zero_steps() -> None:
    """--steps 0 fine-tunes 0 steps (training.finetune.personalise); the report said the config's."""
    meta = checkpoint.load(MODEL)
    cfg = checkpoint.config_of(meta)
    assert cfg.finetune.steps > 0
    header = functools.partial(command._header, meta=meta, cfg=cfg, protocol=cfg.evaluation, clips=[])
    every = list(command.METHODS)
    assert (
        header(argparse.Namespace(checkpoint=MODEL, steps=0, methods=every, snapshots=[]))["finetune_steps"]
        == 0
    )
    assert (
        header(argparse.Namespace(checkpoint=MODEL, steps=None, methods=every, snapshots=[]))[
            "finetune_steps"
        ]
        == cfg.finetune.steps
    )
    # without the fine-tuned method no steps are run: the report said the config's 150 all the same
    assert (
        header(argparse.Namespace(checkpoint=MODEL, steps=None, methods=["warp"], snapshots=[]))[
            "finetune_steps"
        ]
        is None
    )
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert parser.parse_args([]).steps is None


@pytest.mark.skipif(not MODEL.is_file(), reason=f"committed model not found at {MODEL}")
@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--snapshots", "40", "150"], "--snapshots are taken on the way to --steps: each must be below 150"),
        (["--steps", "60", "--snapshots", "80"], "each must be below 60"),
        (["--methods", "warp", "--snapshots", "40"], "--snapshots are rows of the fine-tuned method"),
    ],
)
def test_snapshots_are_fewer_steps_of_the_fine_tuned_method(argv: list[str], said: str) -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(MODEL), *argv])
    with pytest.raises(SystemExit) as refused:
        command._methods(args, checkpoint.load(MODEL))
    assert said in str(refused.value)


def test_jitter_is_measured_only_between_consecutive_frames_with_a_face() -> None:
    rng = np.random.default_rng(0)
    face = rng.uniform(20, 100, (68, 2))
    face[36], face[45] = (30, 50), (90, 50)  # outer eye corners 60 px apart
    frames = [face + rng.normal(0, 0.5, face.shape) for _ in range(5)]
    frames[3:] = [f + 30 for f in frames[3:]]  # the head moved while dlib missed frame 2
    readings = [FaceReading(p, np.zeros(128)) for p in frames]
    assert command.found_jitter(readings) == pytest.approx(jitter(np.stack(frames), STABLE_POINTS))
    readings[2] = FaceReading(None, None)
    runs = [np.stack(frames[:2]), np.stack(frames[3:])]
    expected = np.mean([jitter(r, STABLE_POINTS) for r in runs])  # one step each, same scale
    assert command.found_jitter(readings) == pytest.approx(expected, rel=0.01)
    assert command.found_jitter(readings) < 0.1  # not the 0.7-face jump across the miss
    no_pair = [FaceReading(None, None), readings[0], FaceReading(None, None), readings[1]]
    assert command.found_jitter(no_pair) is None and command.found_jitter([]) is None


class _Flat:
    """A collapsed model: flat grey frames, no face in any."""

    name = "collapsed"

    def fit(self, refs: np.ndarray, ref_points: np.ndarray) -> Fitted:
        return Fitted(lambda points: np.full((len(points), *refs.shape[1:]), 128, np.uint8), 0.0)


@pytest.mark.skipif(not MODEL.is_file(), reason=f"committed model not found at {MODEL}")
def test_a_run_says_whether_it_covered_the_full_protocol() -> None:
    """Only a run of every evaluation person of the checkpoint's config, every T, every driving
    frame and the stills makes a verdict the service acts on (facekit.engines.passed_engines)."""
    cfg = checkpoint.config_of(checkpoint.load(MODEL))
    people, protocol = list(cfg.meta.validation_videos), cfg.evaluation
    assert len(people) == 7

    def report(clips: list[str], shots: list[int], stills: int) -> dict:
        row = {"pooled": {}, "clips": {c: {"ssim": 0.7, "frames": 30.0} for c in clips}}
        names = {f"still{i}": {} for i in range(stills)}
        return {
            "clips": clips,
            "reenactment": {f"T={t}": {"feed-forward": row, "ceiling": row} for t in shots},
            "stills": {
                "rows": {"feed-forward": {"pooled": {}, "stills": names}},
                "skipped": {"x.png": "no face"},
            },
        }

    full = command.protocol_coverage(report(people, [1, 8], 17), cfg, protocol, 0, protocol.stills)
    assert full["full_protocol"] and full["reduced"] == []
    assert full["stills"] == 17 and full["stills_skipped"] == ["x.png"] and full["shots"] == [1, 8]
    assert full["driving_frames"] == dict.fromkeys(people, 30) and full["max_drive"] == 0
    tiny = command.protocol_coverage(report(["dpe_s"], [1], 0), cfg, protocol, 2, ("none",))
    assert not tiny["full_protocol"]
    assert tiny["reduced"][0].startswith("clips left out: dreamtalk_mead_w009, lia_vox_driving2")
    assert tiny["reduced"][1:] == [
        "T left out: 8",
        "at most 2 driving frames per clip (--max-drive)",
        f"stills none, not the config's {' '.join(protocol.stills)}",
    ]
    no_still = command.protocol_coverage(report(people, [1, 8], 0), cfg, protocol, 0, protocol.stills)
    assert no_still["reduced"] == ["no still scored"]  # every still skipped, or the step failed
    short = cfg.replace(**{"evaluation.still_frames": 16}).evaluation
    fewer = command.protocol_coverage(report(people, [1, 8], 17), cfg, short, 0, protocol.stills)
    assert fewer["reduced"] == [f"16 frames per still, not the config's {protocol.still_frames}"]
    # the verdict records it
    rows = {"feed-forward": {"pooled": {"ssim": 0.7}}, "feed-forward@x": {"pooled": {"ssim": 0.7}}}
    verdict = command.judge_engines({"reenactment": {"T=1": rows}}, ["x"], "m", tiny)[0]
    assert verdict.as_dict()["full_protocol"] is False and verdict.as_dict()["coverage"] == tiny


@pytest.mark.skipif(not MODEL.is_file(), reason=f"committed model not found at {MODEL}")
def test_missing_clips_end_the_run_up_front_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Evaluation clips that are not in the data folder end the run before any model is built,
    with one line naming the folder, the clips and the command that makes them (it ended with a
    FileNotFoundError traceback for the first clip's frames.npy)."""

    def no_models(*args: object, **kwargs: object) -> None:
        raise AssertionError("built the models before checking the clips")

    monkeypatch.setattr(command, "_methods", no_models)
    cfg = checkpoint.config_of(checkpoint.load(MODEL))
    data, out = tmp_path / "data", tmp_path / "eval"
    for name in ("meta.json", "landmarks.npy", "frames.npy"):  # dpe_s is there ...
        (data / "dpe_s").mkdir(parents=True, exist_ok=True)
        (data / "dpe_s" / name).write_bytes(b"")
    for name in ("meta.json", "landmarks.npy"):  # ... w009 without its frames
        (data / "dreamtalk_mead_w009").mkdir(exist_ok=True)
        (data / "dreamtalk_mead_w009" / name).write_bytes(b"")
    args = ["--checkpoint", str(MODEL), "--data", str(data), "--out", str(out)]
    with pytest.raises(SystemExit) as ended:
        run_module("training.evaluation.command", args, prog="talkinghead evaluate")
    line = ended.value.code
    assert isinstance(line, str) and "\n" not in line  # SystemExit(str): exit 1, the line on stderr
    others = [c for c in cfg.meta.validation_videos if c not in ("dpe_s", "dreamtalk_mead_w009")]
    assert others and line.startswith(f"talkinghead evaluate: evaluation clips not preprocessed in {data}: ")
    assert f"{', '.join(others)}: run `talkinghead preprocess " in line
    assert f" {data} --size {cfg.model.image_size}`" in line and "dpe_s" not in line
    assert line.endswith(
        f"dreamtalk_mead_w009: run `talkinghead preprocess {_faces()} {data} --restore-frames`"
    )
    assert "Traceback" not in capsys.readouterr().err and not out.exists()

    shutil.rmtree(data)  # no data folder at all; the stills' driver and the jitter clip are needed too
    with pytest.raises(SystemExit) as ended:
        cli(["evaluate", *args, "--clips", "lp_d0"])
    assert ended.value.code == (
        f"talkinghead evaluate: evaluation clips not preprocessed in {data} (no such folder): lp_d0, "
        f"{cfg.evaluation.still_driver} (the stills' driver), {cfg.evaluation.jitter_clip} (the jitter "
        f"clip): run `talkinghead preprocess {_faces()} {data} --size {cfg.model.image_size}`"
    )
    with pytest.raises(SystemExit) as ended:
        cli(["evaluate", *args, "--clips", "lp_d0", "--stills", "none", "--no-jitter"])
    assert str(ended.value.code).split(": ")[2] == "lp_d0"


def _faces() -> str:
    return min(os.path.relpath(command.FACES), str(command.FACES), key=len)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two evaluation clips preprocessed at 128 px (the committed model's size)."""
    if not FACES.is_dir():
        pytest.skip(f"test clips not found at {FACES}")
    out = tmp_path_factory.mktemp("pre")
    args = ["preprocess", str(FACES), str(out), "--size", "128", "--workers", "1"]
    assert cli(args + [arg for c in CLIPS for arg in ("--include", c)]) == 0
    return out


@needs_faces
def test_identity_figures_tell_people_apart(clips: Path) -> None:
    w009, dpe = (EvalClip.load(clips / c) for c in CLIPS)
    a, b, other = (read_faces(x) for x in (w009.frames[:4], w009.frames[60:64], dpe.frames[:4]))
    mean_a = np.mean([r.descriptor for r in a], axis=0)
    same = np.mean([np.linalg.norm(r.descriptor - mean_a) for r in b])
    different = np.mean([np.linalg.norm(r.descriptor - mean_a) for r in other])
    assert same < 0.45 < 0.6 < different, (same, different)
    assert np.nanmax(paired_nme(a, a)) == 0.0
    assert 0.0 < np.nanmean(paired_nme(a, b)) < 0.2


@needs_faces
@pytest.mark.skipif(not MODEL.is_file(), reason=f"committed model not found at {MODEL}")
def test_a_still_without_a_face_is_skipped_and_named(clips: Path, tmp_path: Path) -> None:
    """A still in which dlib finds no face is logged and skipped (it ended the whole run)."""
    faces = tmp_path / "faces"
    faces.mkdir()
    Image.new("RGB", (256, 256), (128, 128, 128)).save(faces / "blank_photo.png")
    shutil.copy(FACES / "lp_s1_photo.jpg", faces)
    cfg = checkpoint.config_of(checkpoint.load(MODEL))
    driver, protocol = EvalClip.load(clips / "dpe_s"), EvalConfig(still_frames=4)
    methods = {"warp": WarpBaseline()}
    stills = command.evaluate_stills(faces, ("*_photo.*",), driver, methods, protocol, cfg, tmp_path)
    assert stills["skipped"] == {"blank_photo.png": "no face found"}
    assert set(stills["rows"]["warp"]["stills"]) == {"lp_s1_photo"}
    assert stills["rows"]["warp"]["pooled"]["face_found"] == 1.0
    (faces / "lp_s1_photo.jpg").unlink()  # nothing left with a face: empty rows, not a crash
    stills = command.evaluate_stills(faces, ("*_photo.*",), driver, methods, protocol, cfg, tmp_path)
    assert stills["rows"] == {} and stills["skipped"] == {"blank_photo.png": "no face found"}
    report = {"checkpoint": "m", "model_id": "m", "step": 0, "created": "now", "clips": [], "image_size": 128}
    report |= {"finetune_steps": 0, "machine": {"cpus": 2}, "seconds": 1, "reenactment": {}, "stills": stills}
    assert "1 skipped (blank_photo.png: no face found)" in command.markdown(report, {})
    assert "; fine-tuning 0 steps; " in command.markdown(report, {})
    assert "; no fine-tuning (--methods without fine-tuned); " in command.markdown(
        report | {"finetune_steps": None}, {}
    )


@needs_faces
def test_a_model_that_makes_no_faces_has_no_jitter(clips: Path) -> None:
    """No frame with a face: jitter None (np.stack of no frames crashed the run at this step)."""
    clip = EvalClip.load(clips / EvalConfig().jitter_clip)
    out = command.evaluate_jitter(clip, {"collapsed": _Flat()}, EvalConfig(), 6)
    assert out["collapsed"] == {"raw": None, "smoothed": None} and out["driver"]["raw"] > 0


@needs_faces
@pytest.mark.skipif(not MODEL.is_file(), reason=f"committed model not found at {MODEL}")
def test_a_failing_later_step_leaves_the_reenactment_written(
    clips: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(command, "evaluate_stills", fail)
    monkeypatch.setattr(command, "evaluate_jitter", fail)
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(MODEL), "--data", str(clips), "--clips", "dpe_s", "--shots", "1"]
    args += ["--methods", "warp", "--max-drive", "2", "--faces", str(FACES), "--out", str(out)]
    assert cli(args) == 1  # failed steps: not a clean exit, but nothing computed is lost
    report = json.loads((out / "evaluation.json").read_text())
    assert report["reenactment"]["T=1"]["warp"]["pooled"]["frames"] == 2
    assert report["status"] == "incomplete" and "stills" not in report and "jitter" not in report
    assert report["errors"] == {s: "RuntimeError: broken on purpose" for s in ("stills", "jitter")}
    assert "**Incomplete**" in (out / "evaluation.md").read_text()
    assert not report["coverage"]["full_protocol"] and "no still scored" in report["coverage"]["reduced"]


@needs_faces
@pytest.mark.skipif(not MODEL.is_file(), reason=f"committed model not found at {MODEL}")
def test_evaluate_writes_table_json_and_sheets(clips: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(MODEL), "--data", str(clips), "--clips", *CLIPS, "--shots", "1"]
    args += ["--steps", "2", "--snapshots", "1", "--max-drive", "4", "--faces", str(FACES)]
    args += ["--stills", "lp_s1_photo.jpg", "--jitter-frames", "6", "--still-frames", "16"]
    assert cli([*args, "--out", str(out)]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    rows = report["reenactment"]["T=1"]
    assert set(rows) == {"warp", "feed-forward", "fine-tuned@1", "fine-tuned", "ceiling", "floor"}
    for name in ("warp", "feed-forward", "fine-tuned@1", "fine-tuned"):
        assert set(rows[name]["clips"]) == set(CLIPS) and rows[name]["pooled"]["frames"] == 8
    # the snapshot is taken on the way: less of the same fine-tuning's time
    assert 0 < rows["fine-tuned@1"]["pooled"]["fit_seconds"] < rows["fine-tuned"]["pooled"]["fit_seconds"]
    assert report["finetune_steps"] == 2 and report["finetune_snapshots"] == [1]
    # The yardstick separates people: a person's own frames are far closer to their references
    # than other people's, and the classical warp keeps the person.
    ceiling, floor = rows["ceiling"]["pooled"], rows["floor"]["pooled"]
    assert ceiling["identity_distance"] < 0.45 < 0.6 < floor["identity_distance"]
    assert rows["warp"]["pooled"]["identity_distance"] < 0.45
    # and the shipped model's feed-forward faces are their people too (no fine-tuning)
    assert rows["feed-forward"]["pooled"]["identity_distance"] < 0.45
    assert rows["warp"]["pooled"]["ssim"] > 0.6 and rows["warp"]["pooled"]["face_found"] == 1.0
    # each generated row against the warp, frame by frame; the warp and the real frames are not
    assert not {"warp", "ceiling", "floor"} & {k for k, v in rows.items() if "against" in v}
    for name in ("feed-forward", "fine-tuned@1", "fine-tuned"):
        ssim = rows[name]["against"]["ssim"]
        assert ssim["frames"] == 8 and ssim["people"] == len(CLIPS)
        assert ssim["low"] <= ssim["difference"] <= ssim["high"]
    stills = report["stills"]["rows"]
    assert set(stills["warp"]["stills"]) == {"lp_s1_photo"}
    assert stills["warp"]["pooled"]["mouth_correlation"] > 0.5  # the warp follows the driver's mouth
    # The shipped model's psi of different people differ far more than psi of one person's frames.
    assert report["embedder_spread"]["e_ratio"] > 5 and report["embedder_spread"]["e_dead_units"] < 0.1
    # jitter on the still head's first frames after the references, read on the generated faces
    jitter = report["jitter"]
    assert jitter["clip"] == EvalConfig().jitter_clip and jitter["frames"] == 6
    for name in ("driver", "warp", "feed-forward"):
        assert all(0 <= jitter[name][kind] < 0.2 for kind in ("raw", "smoothed")), (name, jitter[name])
    assert jitter["driver"]["smoothed"] < jitter["driver"]["raw"]  # the One-Euro filter steadies it
    table = (out / "evaluation.md").read_text()
    assert "| warp |" in table and "| floor |" in table and "One-shot stills" in table
    assert "Against the warp, frame by frame" in table
    assert "| row | SSIM - warp | PSNR dB - warp | NME - warp | identity dist - warp |" in table
    assert "| fine-tuned@1 |" in table and "fine-tuning 2 steps (fine-tuned@1: the same fine-tuning" in table
    assert "## Jitter on a still head (dreamtalk_mead_w009, 6 frames" in table
    for sheet in ("contact_sheet.png", "stills_sheet.png"):
        assert (out / sheet).stat().st_size > 10_000
    assert report["status"] == "complete" and "errors" not in report
    coverage = report["coverage"]  # a short run: a verdict from it would not be acted on
    assert not coverage["full_protocol"] and coverage["max_drive"] == 4 and coverage["stills"] == 1
    assert coverage["driving_frames"] == dict.fromkeys(CLIPS, 4) and coverage["shots"] == [1]


def test_the_contact_sheet_names_each_clip_whole(tmp_path: Path) -> None:
    """Clip names were cut at 14 characters: `styletalk_feifeili_clip1` and `_clip2` had the same
    label. Now a long name is broken over lines (after a '_' where there is one), none cut."""
    from training.evaluation import sheets

    frames = np.full((3, 64, 64, 3), 90, np.uint8)
    made = {"reference": frames[0], "real": frames, "warp": frames}
    labels = []
    for clip in ("styletalk_feifeili_clip1", "styletalk_feifeili_clip2"):
        sheets.save_contact_sheet(tmp_path / f"{clip}.png", {clip: made}, cell=64)
        labels.append(np.asarray(Image.open(tmp_path / f"{clip}.png"))[:64, :64])
    assert not np.array_equal(labels[0], labels[1])
    assert sheets._wrapped("styletalk_feifeili_clip1") == "styletalk_\nfeifeili_clip1"
    assert sheets._wrapped("averyveryverylongname", 8) == "averyver\nyverylon\ngname"
