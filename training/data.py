"""Meta-learning episodes (PAPER.md, "Meta-learning episode") read from `talkinghead preprocess` output.

Each clip folder holds frames.npy (N, S, S, 3) uint8, landmarks.npy (N, 68, 2) and meta.json; the
frames are memory-mapped, so an episode reads only its K + 1 frames from disk. Item i of
`EpisodeDataset` is an episode of video i (`video_ids[i]`), which is also D's column index.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from facekit.crop import resize_points
from facekit.layout import NUM_POINTS
from facekit.rasterize import DrawStyle, draw_landmarks
from facekit.warp import warp_nearest

# iBUG 300-W point i of a mirrored face is point FLIP_PERMUTATION[i] of the original (mirrored in x).
FLIP_PERMUTATION: tuple[int, ...] = (
    *range(16, -1, -1),  # jaw 0..16 reversed
    *range(26, 21, -1),  # right eyebrow 17..21 <- left eyebrow 26..22
    *range(21, 16, -1),  # left eyebrow 22..26 <- right eyebrow 21..17
    27, 28, 29, 30,  # nose bridge (centre line)
    35, 34, 33, 32, 31,  # lower nose
    45, 44, 43, 42, 47, 46,  # right eye <- left eye
    39, 38, 37, 36, 41, 40,  # left eye <- right eye
    54, 53, 52, 51, 50, 49, 48,  # outer lips, upper
    59, 58, 57, 56, 55,  # outer lips, lower
    64, 63, 62, 61, 60,  # inner lips, upper
    67, 66, 65,  # inner lips, lower
)  # fmt: skip
assert sorted(FLIP_PERMUTATION) == list(range(NUM_POINTS))
DEFAULT_STYLE = DrawStyle()


def flip_points(points: np.ndarray, width: int) -> np.ndarray:
    """Landmarks (..., 68, 2) of an image -> those of the image mirrored left-right (width pixels)."""
    pts = np.asarray(points, np.float32)[..., FLIP_PERMUTATION, :].copy()
    pts[..., 0] = (width - 1) - pts[..., 0]
    return pts


@dataclass(frozen=True)
class ClipInfo:
    folder: Path
    clip_id: str
    video_id: str
    frames: int  # N
    size: int  # S as stored


def list_clips(
    root: Path | str, include: list[str] | None = None, exclude: list[str] | tuple[str, ...] = ()
) -> list[ClipInfo]:
    """Complete clips (folders with meta.json) under `root`, filtered by clip-id globs, sorted by id."""
    clips = []
    for meta_path in sorted(Path(root).rglob("meta.json")):
        meta = json.loads(meta_path.read_text())
        clip_id = meta["clip_id"]
        if include is not None and not any(fnmatch.fnmatchcase(clip_id, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(clip_id, p) for p in exclude):
            continue
        clips.append(ClipInfo(meta_path.parent, clip_id, meta["video_id"], meta["frames_kept"], meta["size"]))
    return clips


def _nothing_usable(
    root: Path | str,
    kept: list[ClipInfo],
    include: list[str] | None,
    exclude: list[str] | tuple[str, ...],
    k_shot: int,
) -> str:
    """Why no clip under `root` can make an episode, and what to do: none preprocessed there, every
    one filtered out (the evaluation people of a config whose data holds only them), or every one
    too short."""
    if kept:
        return f"no clip under {root} has K + 1 = {k_shot + 1} frames ({len(kept)} clips after filters)"
    everything = list_clips(root)
    if not everything:
        return f"no preprocessed clips under {root}: run `talkinghead preprocess`"
    filters = ([f"include {list(include)}"] if include is not None else []) + (
        [f"exclude {list(exclude)}"] if exclude else []
    )
    return f"all {len(everything)} clips under {root} are filtered out ({', '.join(filters)})"


def load_frames(clip_dir: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """All of a clip: frames uint8 (N, S, S, 3) memory-mapped, landmarks float32 (N, 68, 2)."""
    folder = Path(clip_dir)
    frames = np.load(folder / "frames.npy", mmap_mode="r")
    points = np.load(folder / "landmarks.npy").astype(np.float32)
    if frames.ndim != 4 or points.shape != (len(frames), NUM_POINTS, 2):
        raise ValueError(f"{folder}: frames {frames.shape} and landmarks {points.shape} do not match")
    return frames, points


def check_frames(clip: ClipInfo) -> None:
    """ValueError unless the clip's frames.npy is there, whole, with the frames its meta.json counts
    (its header read and its length checked: nothing loaded)."""
    path = clip.folder / "frames.npy"
    try:
        frames = np.load(path, mmap_mode="r")
        ok = frames.ndim == 4 and len(frames) == clip.frames
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"{path}: missing, cut short or not the {clip.frames} frames meta.json counts; rebuild it "
            "with `talkinghead preprocess SRC OUT --restore-frames` (or remove the clip's folder)"
        )


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)
    return x.movedim(-1, -3)


class StepSampler(Sampler[tuple[int, int, int]]):
    """(video, step, slot) for every slot of every step from `start`, without end: each step's
    videos drawn with replacement from a generator of (seed, step) alone, `batch` slots a rank,
    this rank's share of `batch` x `world`. So a run resumed at step n draws what it would have
    drawn uninterrupted (with RandomSampler a resume drew a new order from torch's state)."""

    def __init__(
        self, num_videos: int, batch: int, seed: int, start: int, rank: int = 0, world: int = 1
    ) -> None:
        self.num_videos, self.batch, self.seed, self.start = num_videos, batch, seed, start
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        step = self.start
        while True:
            videos = np.random.default_rng([self.seed, step]).integers(
                self.num_videos, size=self.batch * self.world
            )
            for slot in range(self.rank * self.batch, (self.rank + 1) * self.batch):
                yield int(videos[slot]), step, slot
            step += 1


class EpisodeDataset(Dataset):
    """Episode i: K + 1 distinct random frames of one random clip of video i (with `warp`, also
    the reference nearest to the target warped onto its landmarks, for a warp-guided G)."""

    def __init__(
        self,
        *,
        root: Path | str,
        k_shot: int,
        image_size: int,
        draw_style: DrawStyle = DEFAULT_STYLE,
        include: list[str] | None = None,
        exclude: list[str] | tuple[str, ...] = (),
        flip: bool = False,
        warp: bool = False,
        seed: int = 0,
    ) -> None:
        if k_shot < 1:
            raise ValueError(f"k_shot must be >= 1, got {k_shot}")
        self.k_shot, self.image_size, self.draw_style = k_shot, image_size, draw_style
        self.flip, self.warp, self.seed = flip, warp, seed
        clips = list_clips(root, include, list(exclude))
        usable = [c for c in clips if c.frames >= k_shot + 1]
        if not usable:
            raise ValueError(_nothing_usable(root, clips, include, exclude, k_shot))
        for clip in usable:  # (before: a clip whose frames were missing stopped training when first drawn)
            check_frames(clip)
        self.skipped_clips = [c.clip_id for c in clips if c.frames < k_shot + 1]
        self.video_ids: list[str] = sorted({c.video_id for c in usable})
        index = {v: i for i, v in enumerate(self.video_ids)}
        self.clips_of: list[list[ClipInfo]] = [[] for _ in self.video_ids]
        for c in usable:
            self.clips_of[index[c.video_id]].append(c)
        self._rng_key: object = None
        self._rng = np.random.default_rng(seed)

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    def __len__(self) -> int:
        return self.num_videos

    def _generator(self) -> np.random.Generator:
        """One stream per process: DataLoader workers (re)seed from their torch worker seed."""
        info = get_worker_info()
        key = None if info is None else (info.id, info.seed)
        if key != self._rng_key:
            self._rng_key = key
            self._rng = np.random.default_rng(self.seed if info is None else [self.seed, info.seed])
        return self._rng

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict[str, torch.Tensor]:
        """Video `key`'s episode from this process's stream, or for (video, step, slot) - what
        `StepSampler` gives - the episode that step and slot always draw, whatever ran before it
        (a resumed run draws what an uninterrupted one would have)."""
        if isinstance(key, tuple):
            video, step, slot = key
            return self.episode(video, np.random.default_rng([self.seed, step, slot]))
        return self.episode(key, self._generator())

    def episode(self, i: int, rng: np.random.Generator, flip: bool | None = None) -> dict[str, torch.Tensor]:
        """Episode of video i drawn with `rng`; `flip` None: mirror with probability 1/2 when self.flip."""
        clips = self.clips_of[i]
        clip = clips[int(rng.integers(len(clips)))]
        picks = np.sort(rng.choice(clip.frames, size=self.k_shot + 1, replace=False))
        order = rng.permutation(self.k_shot + 1)  # the target is a random one of the K + 1
        frames, points = self._read(clip, picks)
        frames, points = frames[order], points[order]  # (K+1, S, S, 3), (K+1, 68, 2)
        if flip is None:
            flip = self.flip and bool(rng.integers(2))
        if flip:
            frames = frames[:, :, ::-1]
            points = flip_points(points, self.image_size)
        drawn = np.stack([draw_landmarks(p, self.image_size, self.draw_style) for p in points])
        images, landmarks = to_tensor(frames), to_tensor(drawn)  # (K+1, 3, S, S) each
        item = {
            "ref_images": images[:-1],
            "ref_landmarks": landmarks[:-1],
            "target_image": images[-1],
            "target_landmarks": landmarks[-1],
            "target_points": torch.from_numpy(np.ascontiguousarray(points[-1], np.float32)),
            "video": torch.tensor(i, dtype=torch.int64),
        }
        if self.warp:  # the nearest of the K references, warped onto the target's landmarks
            item["target_warped"] = to_tensor(warp_nearest(frames[:-1], points[:-1], points[-1:])[0])
        return item

    def _read(self, clip: ClipInfo, picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frames uint8 (n, S, S, 3) at image_size and their landmarks (n, 68, 2)."""
        frames, points = load_frames(clip.folder)
        chosen, pts = np.array(frames[picks]), points[picks]  # reads only these frames
        size = self.image_size
        if chosen.shape[1] != size:
            interp = cv2.INTER_AREA if size < chosen.shape[1] else cv2.INTER_LINEAR
            chosen = np.stack([cv2.resize(f, (size, size), interpolation=interp) for f in chosen])
            pts = resize_points(pts, clip.size, size)
        return chosen, pts
