"""Meta-learning episodes: K + 1 distinct frames of one video, matching landmark images, flips."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage.data import astronaut  # NASA portrait, public domain

from facekit.crop import resize_points
from facekit.detect import DlibDetector
from facekit.layout import GROUPS, LEFT_EYE, RIGHT_EYE
from facekit.rasterize import DrawStyle, draw_landmarks
from talkinghead.cli import main
from training.data import EpisodeDataset, flip_points, load_frames

FACES = Path(__file__).resolve().parents[2] / "shared/data/faces"
S = 32  # stored crop size of the synthetic clips
# clip id -> (video id, frames); clip "c/short" has too few frames for K + 1 = 4
GROUP_COLOURS = {g.name: g.color for g in GROUPS}
CLIPS = {"a/one": ("a", 6), "a/two": ("a", 5), "b/one": ("b", 7), "c/short": ("c", 3)}


def _clip_code(clip_id: str) -> int:
    return 40 * sorted(CLIPS).index(clip_id)


def _write_clip(root: Path, clip_id: str, video_id: str, n: int) -> None:
    """Frame j of a clip is flat grey (code + j) with a white left column; landmarks are random."""
    folder = root / clip_id
    folder.mkdir(parents=True)
    frames = np.empty((n, S, S, 3), np.uint8)
    for j in range(n):
        frames[j] = _clip_code(clip_id) + j
    frames[:, :, 0] = 255  # marks the left edge, to see flips
    points = np.random.default_rng(len(clip_id) + n).uniform(4, S - 4, (n, 68, 2)).astype(np.float32)
    np.save(folder / "frames.npy", frames)
    np.save(folder / "landmarks.npy", points)
    meta = {"clip_id": clip_id, "video_id": video_id, "frames_kept": n, "size": S}
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for clip_id, (video_id, n) in CLIPS.items():
        _write_clip(tmp_path, clip_id, video_id, n)
    (tmp_path / "unfinished").mkdir()  # no meta.json: an interrupted preprocess, ignored
    np.save(tmp_path / "unfinished" / "frames.npy", np.zeros((9, S, S, 3), np.uint8))
    return tmp_path


def _identify(image: torch.Tensor) -> int:
    """Frame code of a (3, S, S) episode image in [-1, 1] (the grey level of its middle pixel)."""
    middle = image.shape[-1] // 2
    return round((float(image[0, middle, middle]) + 1) * 127.5)


def test_episode_shapes_ranges_and_distinct_frames(root: Path) -> None:
    data = EpisodeDataset(root=root, k_shot=3, image_size=S)
    assert data.video_ids == ["a", "b"] and data.num_videos == len(data) == 2  # "c" has too few frames
    assert data.skipped_clips == ["c/short"]
    for i, video in enumerate(data.video_ids):
        for _ in range(5):
            ep = data[i]
            assert ep["ref_images"].shape == ep["ref_landmarks"].shape == (3, 3, S, S)
            assert ep["target_image"].shape == ep["target_landmarks"].shape == (3, S, S)
            assert ep["video"].dtype == torch.int64 and int(ep["video"]) == i
            for key in ("ref_images", "ref_landmarks", "target_image", "target_landmarks"):
                assert ep[key].dtype == torch.float32 and -1 <= ep[key].min() <= ep[key].max() <= 1
            codes = [_identify(x) for x in [*ep["ref_images"], ep["target_image"]]]
            assert len(set(codes)) == 4  # K + 1 distinct frames ...
            clips = {c for c, (v, n) in CLIPS.items() if v == video}
            owner = [c for c in clips if all(_clip_code(c) <= k < _clip_code(c) + CLIPS[c][1] for k in codes)]
            assert len(owner) == 1  # ... all of one clip of video i


def test_landmark_images_belong_to_their_frames(root: Path) -> None:
    style = DrawStyle(line_width=1, antialias=False)
    data = EpisodeDataset(root=root, k_shot=3, image_size=S, draw_style=style)
    ep = data.episode(1, np.random.default_rng(3), flip=False)
    _, points = load_frames(root / "b/one")
    images, drawings = [*ep["ref_images"], ep["target_image"]], [*ep["ref_landmarks"], ep["target_landmarks"]]
    for image, drawn in zip(images, drawings, strict=True):
        j = _identify(image) - _clip_code("b/one")
        assert torch.equal(drawn, _as_tensor(draw_landmarks(points[j], S, style)))


def test_exclude_keeps_validation_clips_out(root: Path) -> None:
    data = EpisodeDataset(root=root, k_shot=3, image_size=S, exclude=["a/*"])
    assert data.video_ids == ["b"]
    data = EpisodeDataset(root=root, k_shot=3, image_size=S, include=["a/t*", "b/*"])
    assert [c.clip_id for c in data.clips_of[0]] == ["a/two"]
    with pytest.raises(ValueError, match="K \\+ 1 = 4"):
        EpisodeDataset(root=root, k_shot=3, image_size=S, include=["c/*"])


@pytest.mark.parametrize("damage", ["missing", "cut short"])
def test_a_clip_without_its_frames_is_named_before_training(root: Path, damage: str) -> None:
    """A clip whose frames.npy is gone (the state preprocess --restore-frames rebuilds) or cut
    short: before, training ran until the clip was first drawn, then died in a traceback
    (FileNotFoundError, "mmap length is greater than file size"), losing every step since the
    last checkpoint (helper-77). Now the dataset names the file and the command that rebuilds it."""
    clip = root / sorted(CLIPS)[0] / "frames.npy"
    if damage == "missing":
        clip.unlink()
    else:
        clip.write_bytes(clip.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"frames\.npy: missing, cut short .* --restore-frames"):
        EpisodeDataset(root=root, k_shot=3, image_size=S)


def _as_tensor(drawn: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(drawn).float().div(127.5).sub(1).permute(2, 0, 1)


def test_resized_episode_scales_the_landmarks(root: Path) -> None:
    data = EpisodeDataset(root=root, k_shot=2, image_size=16)
    ep = data.episode(1, np.random.default_rng(0), flip=False)  # video "b" has the one clip "b/one"
    assert ep["ref_images"].shape == (2, 3, 16, 16)
    j = _identify(ep["target_image"]) - _clip_code("b/one")  # flat grey survives INTER_AREA
    expected = draw_landmarks(resize_points(load_frames(root / "b/one")[1][j], S, 16), 16)
    assert torch.equal(ep["target_landmarks"], _as_tensor(expected))


def test_flip_mirrors_image_and_landmarks_together(root: Path) -> None:
    data = EpisodeDataset(root=root, k_shot=3, image_size=S, flip=True)
    plain = data.episode(1, np.random.default_rng(7), flip=False)
    mirrored = data.episode(1, np.random.default_rng(7), flip=True)  # same frames, mirrored
    assert torch.equal(mirrored["target_image"], plain["target_image"].flip(-1))
    assert (mirrored["target_image"][:, :, -1] == 1).all()  # the white column moved to the right
    j = _identify(plain["target_image"]) - _clip_code("b/one")
    points = load_frames(root / "b/one")[1][j]
    assert torch.equal(mirrored["target_landmarks"], _as_tensor(draw_landmarks(flip_points(points, S), S)))


def _colour_centre(drawn: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    ys, xs = np.nonzero((drawn == colour).all(axis=2))
    return np.array([xs.mean(), ys.mean()])


def test_flipped_points_are_what_a_detector_finds_in_the_mirrored_photo() -> None:
    image = astronaut()
    width = image.shape[1]
    detector = DlibDetector()
    original = detector.detect(image)[0].points
    mirrored = detector.detect(np.ascontiguousarray(image[:, ::-1]))[0].points
    predicted = flip_points(original, width)
    assert np.abs(predicted - mirrored).mean() < 3.0  # pixels, in a 512 px photo
    # the subject's left eye now sits where her right eye was, mirrored, and is drawn in the left-eye colour
    assert np.allclose(predicted[LEFT_EYE].mean(0)[0], width - 1 - original[RIGHT_EYE].mean(0)[0])
    assert predicted[LEFT_EYE, 0].mean() > predicted[RIGHT_EYE, 0].mean()
    left_colour, right_colour = GROUP_COLOURS["left_eye"], GROUP_COLOURS["right_eye"]
    before, after = draw_landmarks(original, width), draw_landmarks(predicted, width)
    x, y = _colour_centre(before, right_colour)
    assert np.allclose(_colour_centre(after, left_colour), (width - 1 - x, y), atol=1.0)


def test_dataloader_workers_draw_different_episodes(root: Path) -> None:
    data = EpisodeDataset(root=root, k_shot=3, image_size=S, seed=5)
    loader = torch.utils.data.DataLoader(data, batch_size=1, sampler=[1] * 8, num_workers=2)
    picks = {tuple(_identify(x) for x in batch["ref_images"][0]) for batch in loader}
    assert len(picks) > 4


@pytest.mark.data
@pytest.mark.skipif(not FACES.is_dir(), reason=f"test clips not found at {FACES}")
def test_episodes_from_preprocessed_real_clips(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "dagan_driving.mp4").symlink_to(FACES / "dagan_driving.mp4")
    args = ["preprocess", str(src), str(tmp_path / "out"), "--size", "128", "--max-frames", "12"]
    assert main([*args, "--min-frames", "9", "--workers", "1"]) == 0
    data = EpisodeDataset(root=tmp_path / "out", k_shot=8, image_size=64)
    ep = data[0]
    assert ep["ref_images"].shape == (8, 3, 64, 64)
    # the landmark drawing lies on the face: its lines cover pixels whose colour is skin, not background
    lines = (ep["target_landmarks"] > -1).any(0)
    assert 0.02 < lines.float().mean() < 0.3
    frame = ((ep["target_image"].permute(1, 2, 0) + 1) * 127.5).numpy().astype(np.uint8)
    face = DlibDetector().detect(cv2.resize(frame, (128, 128)))
    assert face, "a face in the episode's target frame"


def test_with_no_clip_left_the_dataset_says_why(root: Path, tmp_path: Path) -> None:
    """Data holding only the config's evaluation people said "run preprocess", though it had been."""
    with pytest.raises(ValueError, match=r"all 4 clips under .* are filtered out \(exclude \['\*'\]\)"):
        EpisodeDataset(root=root, k_shot=3, image_size=S, exclude=["*"])
    with pytest.raises(ValueError, match=r"no preprocessed clips under .*: run `talkinghead preprocess`"):
        EpisodeDataset(root=tmp_path / "empty", k_shot=3, image_size=S)
