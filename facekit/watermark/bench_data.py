"""Frames for the watermark bench: real face crops and whole frames, and generated frames.

- real: every clip of ../shared/data/faces, decoded (facekit.video), dlib landmarks, one stable
  face-centred box per clip (facekit.crop.crop_box over its frames), crops at S px;
- generated: the evaluation people (training/configs/small.yaml `validation_videos`) self-reenacted
  as the evaluation protocol does (references: T = 8 frames of the first 2 s; driving: every 5th
  frame after): by the classical warp baseline (facekit.warp.warp_nearest), and, given a model
  repository, by the served feed-forward model through ONNX Runtime (E on the references, psi =
  mean AdaIN, G on the driving landmarks);
- stills: the portraits, resized to 1024 px on the long side (paste-back output size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facekit.crop import crop, crop_box, transform_points
from facekit.detect import LandmarkDetector
from facekit.video import iter_video, read_image, video_info
from facekit.warp import warp_nearest

EVAL_CLIPS = (  # training/configs/small.yaml meta.validation_videos: never trained on
    "dreamtalk_mead_w009",
    "dpe_s",
    "lia_vox_driving2",
    "styletalk_nice_clip1",
    "styletalk_feifeili_clip1",
    "lp_d11",
    "latentsync_demo1",
)
STILL_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True, kw_only=True)
class Clip:
    name: str
    frames: np.ndarray  # (N, H, W, 3) uint8, whole decoded frames (every `every`-th)
    points: np.ndarray  # (N, 68, 2) float32 landmarks in the frames
    times: np.ndarray  # (N,) seconds

    def crops(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Face crops with the clip's one box: ((N, size, size, 3) uint8, (N, 68, 2) crop points)."""
        box = crop_box(self.points)
        images = np.stack([crop(frame, box, size) for frame in self.frames])
        return images, transform_points(self.points, box, size)


def load_clip(path: Path, detector: LandmarkDetector, *, every: int, max_frames: int) -> Clip | None:
    """Decode, find the largest face per frame (frames without one are skipped); None if no face."""
    fps = video_info(path).fps or 25.0
    frames, points, times = [], [], []
    for index, frame in enumerate(iter_video(path, every=every, max_frames=max_frames)):
        faces = detector.detect(frame)
        if faces:
            frames.append(frame)
            points.append(faces[0].points)
            times.append(index * every / fps)
    if not frames:
        return None
    return Clip(name=path.stem, frames=np.stack(frames), points=np.stack(points), times=np.array(times))


def reenactment_split(
    clip: Clip, *, shots: int = 8, reference_s: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """(reference indices, driving indices) of a clip loaded with every = 5 (the protocol's spacing)."""
    window = np.flatnonzero(clip.times < reference_s)
    refs = window[np.linspace(0, len(window) - 1, min(shots, len(window))).round().astype(int)]
    return refs, np.flatnonzero(clip.times >= reference_s)


def warp_generated(clip: Clip, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(generated (M, S, S, 3), real driving crops (M, S, S, 3)) by the classical warp."""
    images, pts = clip.crops(size)
    refs, drive = reenactment_split(clip)
    return warp_nearest(images[refs], pts[refs], pts[drive]), images[drive]


def model_generated(clip: Clip, repository: Path) -> tuple[np.ndarray, np.ndarray]:
    """(generated, real driving crops) by the repository's feed-forward generator (ONNX Runtime)."""
    import onnxruntime as ort

    from facekit.contract import EMBEDDER, GENERATOR, ModelInfo, latest_version
    from facekit.rasterize import draw_batch

    sessions = {}
    for name in (EMBEDDER, GENERATOR):
        path = latest_version(repository / name)
        if path is None:
            raise FileNotFoundError(f"{repository / name}: no model.onnx")
        sessions[name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = sessions[GENERATOR].get_modelmeta().custom_metadata_map
    info = ModelInfo.from_metadata(meta, where=str(repository))
    images, pts = clip.crops(info.image_size)
    refs, drive = reenactment_split(clip)
    draw = lambda p: draw_batch(p, info.image_size, info.draw_style)  # noqa: E731
    _, adain = sessions[EMBEDDER].run(None, {"image": images[refs], "landmark_image": draw(pts[refs])})
    psi = adain.mean(axis=0, keepdims=True)
    out = []
    for index in drive:
        feeds = {"landmark_image": draw(pts[index : index + 1]), "adain": psi}
        if info.warp_guided:
            feeds["warped"] = warp_nearest(images[refs], pts[refs], pts[index : index + 1])
        out.append(sessions[GENERATOR].run(None, feeds)[0][0])
    return np.stack(out), images[drive]


def stills(faces: Path, long_side: int = 1024) -> list[np.ndarray]:
    """The portraits in `faces`, resized so their long side is `long_side` (sides made even)."""
    import cv2

    out = []
    for path in sorted(p for p in faces.iterdir() if p.suffix.lower() in STILL_SUFFIXES):
        image = read_image(path)
        factor = long_side / max(image.shape[:2])
        width, height = (round(image.shape[1] * factor) // 2 * 2, round(image.shape[0] * factor) // 2 * 2)
        out.append(
            cv2.resize(
                image, (width, height), interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
            )
        )
    return out
