"""Video round trip through H.264 (and the MPEG-4 fallback), contact sheets, PNG files."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from facekit import video
from facekit.video import VideoWriter, contact_sheet, iter_video, read_video, save_png

WIDTH, HEIGHT, COUNT, FPS = 96, 64, 20, 10.0


def _frames() -> np.ndarray:
    """Smooth gradients with a moving bright square: (COUNT, HEIGHT, WIDTH, 3) uint8."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = np.zeros((COUNT, HEIGHT, WIDTH, 3), np.uint8)
    for i in range(COUNT):
        frames[i, ..., 0] = x * 255 // WIDTH
        frames[i, ..., 1] = y * 255 // HEIGHT
        frames[i, ..., 2] = 60
        frames[i, 20:36, 4 * i : 4 * i + 16] = 230
    return frames


def _write(path: Path) -> np.ndarray:
    frames = _frames()
    with VideoWriter(path, fps=FPS, size=(WIDTH, HEIGHT)) as writer:
        for frame in frames:
            writer.write(frame)
    return frames


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_written_video_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str) -> None:
    if codec == "mpeg4":  # as if PyAV's FFmpeg had no libx264
        monkeypatch.setattr(video.av, "codecs_available", video.av.codecs_available - {"libx264"})
    path = tmp_path / "clip.mp4"
    written = _write(path)
    frames, fps = read_video(path)
    assert abs(len(frames) - COUNT) <= 1
    assert frames.shape[1:] == (HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    assert fps == pytest.approx(FPS)
    n = min(len(frames), COUNT)
    assert np.abs(frames[:n].astype(int) - written[:n]).mean() < 4


def test_subsampling_and_iteration(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    _write(path)
    frames, fps = read_video(path, every=2, max_frames=4)
    assert len(frames) == 4 and fps == pytest.approx(FPS / 2)
    assert sum(1 for _ in iter_video(path)) == COUNT


def test_bad_video_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(ValueError, match=r"junk\.mp4"):
        read_video(junk)
    with pytest.raises(FileNotFoundError, match=r"missing\.mp4"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "clips.mp4").mkdir()
    with pytest.raises(IsADirectoryError, match=r"clips\.mp4: is a directory, not a video file"):
        read_video(tmp_path / "clips.mp4")
    with pytest.raises(ValueError, match="even"):
        VideoWriter(tmp_path / "odd.mp4", fps=25, size=(65, 64))
    with (
        VideoWriter(tmp_path / "x.mp4", fps=25, size=(64, 64)) as writer,
        pytest.raises(ValueError, match="64"),
    ):
        writer.write(np.zeros((32, 32, 3), np.uint8))


def test_writer_refuses_containers_it_cannot_fill(tmp_path: Path) -> None:
    """The container comes from the extension: one that cannot hold H.264 (or MPEG-4), or none,
    is refused before any file is made, saying which extensions work."""
    for name, problem in [("clip.webm", "a '.webm' file"), ("clip", "a file without an extension")]:
        with pytest.raises(ValueError, match=rf"{name}: cannot write a video to {problem} \(use \.avi, "):
            VideoWriter(tmp_path / name, fps=25, size=(64, 64))
    assert list(tmp_path.iterdir()) == []
    _write(tmp_path / "clip.MKV")  # any case
    assert sum(1 for _ in iter_video(tmp_path / "clip.MKV")) == COUNT


def test_contact_sheet_layout() -> None:
    white = np.full((50, 100, 3), 255, np.uint8)  # wide: letterboxed into its square
    sheet = contact_sheet([[white, white, white], [white]], labels=["real", "fake"], cell=64)
    assert sheet.shape == (128, 256, 3) and sheet.dtype == np.uint8
    assert sheet[:64, :64].max() == 255  # label text drawn
    assert sheet[32, 64:].min() == 255 and sheet[2, 96].max() == 0  # image centred, black bars above
    assert sheet[64:, 128:].max() == 0  # short row padded with black
    assert contact_sheet([[white[..., 0]]], cell=32).shape == (32, 32, 3)  # grey accepted


def test_save_png_round_trip(tmp_path: Path) -> None:
    image = _frames()[3]
    save_png(tmp_path / "a.png", image)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), image)
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "b.png", image.astype(np.float32))


def test_frames_written_at_their_own_time_leave_the_one_before_on_screen(tmp_path: Path) -> None:
    """`pts`: a frame's slot (frames of 1/fps), so gaps (frames a live stream dropped) keep the timing."""
    path = tmp_path / "gaps.mp4"
    with VideoWriter(path, fps=25, size=(32, 32)) as writer:
        for slot in (0, 1, 4, 5, 9):
            writer.write(np.full((32, 32, 3), 20 * slot, np.uint8), pts=slot)
        with pytest.raises(ValueError, match="before the next free slot 10"):
            writer.write(np.zeros((32, 32, 3), np.uint8), pts=9)
        assert writer.frames_written == 5
    with av.open(str(path)) as container:
        times = sorted(round(float(frame.time), 4) for frame in container.decode(video=0))
    assert times == [0.0, 0.04, 0.16, 0.2, 0.36]


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
@pytest.mark.parametrize("suffix", sorted(video.WRITABLE_SUFFIXES))
def test_a_video_with_gaps_shows_each_frame_at_its_time_and_states_its_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str, suffix: str
) -> None:
    """A `--live` .mp4 whose stream dropped frames stated a length short of its last frame (helper-71:
    slots 0, 1, 2 and 24 at 25 fps said 0.16 s; the frames reach 1.0 s): x264's B-frames. Players
    that trust the container cut such a video short. An .avi or .mpg lost the gaps altogether
    (the four frames played in 0.16 s): those keep no frame times, so a gap repeats the frame."""
    if codec == "mpeg4":
        monkeypatch.setattr(video.av, "codecs_available", video.av.codecs_available - {"libx264"})
    path = tmp_path / f"gaps{suffix}"
    written = {0: 0, 1: 60, 2: 120, 24: 240}  # slot -> grey level
    with VideoWriter(path, fps=25, size=(32, 32)) as writer:
        for slot, level in written.items():
            writer.write(np.full((32, 32, 3), level, np.uint8), pts=slot)
    with av.open(str(path)) as container:
        decoded = [
            (frame.time, int(np.mean(frame.to_ndarray(format="rgb24"))))
            for frame in container.decode(video=0)
        ]
        stated = container.duration / 1e6 if container.duration else None
    if suffix in video.TIMED_SUFFIXES:  # each frame at its own time
        start = decoded[0][0]
        seen = {round((t - start) * 25): level for t, level in decoded}
        assert sorted(seen) == sorted(written), seen
    else:  # a frame a slot
        seen = dict(enumerate(level for _, level in decoded))
        assert len(seen) == 25, seen
    for slot in range(25):  # what is on screen in every slot: the frame written last by then
        expected = written[max(s for s in written if s <= slot)]
        shown = seen[max(s for s in seen if s <= slot)]
        assert abs(shown - expected) <= 3, (slot, shown, expected)
    if suffix not in (".mpg", ".mpeg"):  # (a program stream states no length: FFmpeg guesses one)
        assert stated == pytest.approx(1.0, abs=0.041), stated  # (the last frame shows for its 1/fps)
