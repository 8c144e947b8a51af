"""`talkinghead preprocess`: crops + landmarks per clip, resumable, bad inputs reported not fatal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facekit.detect import DlibDetector, Face
from facekit.video import VideoWriter
from talkinghead.cli import main
from training import preprocess
from training.preprocess import find_clips, select

FACES = Path(__file__).resolve().parents[2] / "shared/data/faces"
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason=f"test clips not found at {FACES}")
CLIPS = ("lp_d0", "dagan_driving")  # 512 px and 256 px sources, one frontal talking face each


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_voxceleb_layout_groups_clips_by_video(tmp_path: Path) -> None:
    _touch(
        tmp_path, "id001/vidA/00001.mp4", "id001/vidA/00002.mp4", "id002/vidB/00001.mp4", "id001/notes.txt"
    )
    clips, layout = find_clips(tmp_path)
    assert layout == "voxceleb"
    assert [(c.clip_id, c.video_id) for c in clips] == [
        ("id001/vidA/00001", "id001/vidA"),
        ("id001/vidA/00002", "id001/vidA"),
        ("id002/vidB/00001", "id002/vidB"),
    ]
    assert [c.clip_id for c in select(clips, ["id001/*"], ["*/00002"])] == ["id001/vidA/00001"]


def test_flat_layout_uses_file_stems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _touch(tmp_path / "src", "alice.mp4", "bob.MOV")
    clips, layout = find_clips(tmp_path / "src")
    assert layout == "flat" and [(c.clip_id, c.video_id) for c in clips] == [
        ("alice", "alice"),
        ("bob", "bob"),
    ]
    assert main(["preprocess", str(tmp_path / "src"), str(tmp_path / "out"), "--dry-run"]) == 0
    assert "2 clips, 2 videos, layout flat" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_clip_without_faces_is_skipped_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """... and a run that leaves nothing to train on exits 1 saying so (it exited 0, helper-77)."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    with VideoWriter(src / "empty_room.mp4", fps=25, size=(64, 64)) as writer:
        for _ in range(5):
            writer.write(np.full((64, 64, 3), 90, np.uint8))
    assert main(["preprocess", str(src), str(out), "--size", "32", "--workers", "1"]) == 1
    assert f"no usable clip in {src}" in capsys.readouterr().err
    (entry,) = json.loads((out / "report.json").read_text())["clips"]
    assert entry["status"] == "skipped" and entry["no_face"] == 5
    assert entry["reason"].startswith("too few frames with a face (0 < 16")
    assert not (out / "empty_room" / "meta.json").exists()


class _CentredFace:
    """A stand-in landmark detector: the same face in the middle of every frame (no model files)."""

    name = "dlib"

    def detect(self, image: np.ndarray) -> list[Face]:
        h, w = image.shape[:2]
        angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
        points = np.stack([w / 2 + w / 5 * np.cos(angles), h / 2 + h / 4 * np.sin(angles)], -1)
        return [Face((w / 4, h / 4, 3 * w / 4, 3 * h / 4), points.astype(np.float32), 1.0)]


def test_a_rerun_with_other_crop_parameters_is_refused_and_the_same_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finished clips made at another size (or --every, ...) are not this run's: the run refuses to
    start, names the parameters and leaves the clips as they are (it counted them "already there"
    and wrote report.json with the new size over a folder of the old crops). The same parameters
    resume as before."""
    monkeypatch.setattr(preprocess, "make_detector", lambda name: _CentredFace())
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("talk_a", "talk_b"):
        with VideoWriter(src / f"{name}.mp4", fps=25, size=(64, 64)) as writer:
            for _ in range(6):
                writer.write(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    args = ["preprocess", str(src), str(out), "--min-frames", "4", "--workers", "1"]
    assert main([*args, "--size", "32"]) == 0
    assert json.loads((out / "talk_a" / "meta.json").read_text())["max_frames"] == 0
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    for other, recorded in (
        (["--size", "16"], "--size 32, not 16"),
        (["--size", "32", "--every", "2", "--max-frames", "3"], "--every 1, not 2; --max-frames 0, not 3"),
    ):
        assert main([*args, *other]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"talkinghead preprocess: 2 of the 2 finished clips in {out} were made with other crop "
            f"parameters ({recorded}): give another output folder, or delete those clips to redo them\n"
        )
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept  # report.json too

    (out / "talk_b" / "meta.json").unlink()  # as if the first run had died in this clip
    assert main([*args, "--size", "32"]) == 0
    assert "1 clips done" in capsys.readouterr().out and (out / "talk_b" / "meta.json").is_file()
    assert (out / "talk_a" / "frames.npy").read_bytes() == kept[out / "talk_a" / "frames.npy"]
    assert main([*args, "--size", "32"]) == 0
    assert ", 2 already there, " in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["counts"] == {"done": 0, "exists": 2, "skipped": 0}


def _args(src: Path, out: Path, workers: int) -> list[str]:
    sizes = ["--size", "128", "--max-frames", "20", "--min-frames", "8"]
    return ["preprocess", str(src), str(out), *sizes, "--workers", str(workers)]


@pytest.mark.data
@needs_faces
def test_two_clips_end_to_end_and_resumable(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for name in CLIPS:
        (src / f"{name}.mp4").symlink_to(FACES / f"{name}.mp4")
    (src / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4000))  # not a video

    assert main(_args(src, out, workers=2)) == 0
    report = json.loads((out / "report.json").read_text())
    status = {c["clip_id"]: (c["status"], c["reason"]) for c in report["clips"]}
    assert status["broken"][0] == "skipped" and status["broken"][1].startswith("unreadable")
    detector = DlibDetector()
    for name in CLIPS:
        assert status[name] == ("done", "")
        frames = np.load(out / name / "frames.npy")
        points = np.load(out / name / "landmarks.npy")
        meta = json.loads((out / name / "meta.json").read_text())
        assert frames.shape == (20, 128, 128, 3) and frames.dtype == np.uint8
        assert points.shape == (20, 68, 2) and points.dtype == np.float32
        assert meta["video_id"] == name and meta["frames_kept"] == 20 and meta["fps"] == 25.0
        assert meta["source"] == str((src / f"{name}.mp4").resolve())
        assert abs(points[..., 0].mean() - 64) < 13  # the face is in the middle of the crop
        # the stored landmarks are where a detector finds the face in the stored crop
        found = detector.detect(frames[10])
        assert found and np.abs(found[0].points - points[10]).mean() < 2.0

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    (out / CLIPS[1] / "meta.json").unlink()  # as if the run had died while writing this clip
    assert main(_args(src, out, workers=1)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"done": 1, "exists": 1, "skipped": 1}
    for path, stamp in stamps.items():
        assert (path.stat().st_mtime_ns == stamp) == (path.parent.name == CLIPS[0]), path

    # a machine without the landmark models rebuilds the crops from the videos and meta.json
    # (only the clips --include/--exclude select: every clip was restored, helper-77)
    frames_file, other = out / CLIPS[0] / "frames.npy", out / CLIPS[1] / "frames.npy"
    kept = np.load(frames_file)
    frames_file.unlink()
    other.unlink()
    assert main(["preprocess", str(src), str(out), "--restore-frames", "--include", CLIPS[0]]) == 0
    assert np.array_equal(np.load(frames_file), kept)
    assert not other.exists()


def test_without_a_config_the_crops_are_the_size_train_reads_by_default() -> None:
    """`talkinghead train` takes the small config (128 px) by default; preprocess without --config
    cut 256 px crops for it: four times the disk, and every frame resized again as train reads it."""
    import argparse

    from training.config import load_config

    parser = argparse.ArgumentParser()
    preprocess.add_arguments(parser)
    assert (
        preprocess._crop_size(parser.parse_args(["in", "out"]))
        == load_config("small").model.image_size
        == 128
    )
    assert preprocess._crop_size(parser.parse_args(["in", "out", "--config", "paper"])) == 256
    assert preprocess._crop_size(parser.parse_args(["in", "out", "--size", "64"])) == 64
