"""Turn a folder of talking-head videos into face crops + landmarks for meta-learning.

Input: a folder of videos, flat (clip.mp4, ...) or in VoxCeleb2's layout (id/video/clip.mp4),
told apart by depth. Clip id = path relative to the input without suffix ("id/video/clip" or
"clip"); video id (one discriminator column each) = the clip's folder ("id/video"), or the file
stem for a flat folder. For each clip, one fixed square box around the median landmarks
(facekit.crop, --scale x landmark extent) is cut from every kept frame, so crops are temporally
stable; frames without a face are dropped. Output per clip, in OUT/<clip id>/:

  frames.npy     uint8 (N, S, S, 3) RGB crops, S = --size (default: the config's image_size)
  landmarks.npy  float32 (N, 68, 2) in crop pixel coordinates
  meta.json      written last and atomically: a clip with meta.json is complete

Reruns skip complete clips, so an interrupted run resumes. A run whose crop parameters (--size,
--scale, --shift-y, --every, --max-frames, --detector) differ from those a finished clip's meta.json
records refuses to start, and names them: give it another OUT (or delete those clips to redo them),
so a folder never mixes crops of two kinds. OUT/report.json lists every clip as done / exists
(from an earlier run) / skipped, with the reason. frames.npy is large (~39 MB for 8 s at 256 px);
`--restore-frames` rebuilds it from the videos and meta.json without a detector, so a machine
without the landmark models needs only landmarks.npy, meta.json and the videos.

examples:
  talkinghead preprocess ../shared/data/faces data/preprocessed-128 --config small
  talkinghead preprocess ../shared/data/faces data/preprocessed-256 --config paper --workers 2
  talkinghead preprocess vox2/dev/mp4 data/vox --every 5 --max-frames 64 --include 'id0001*'
  talkinghead preprocess ../shared/data/faces data/preprocessed-256 --restore-frames

(each config's meta.data names the folder `talkinghead train --config ...` reads)
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facekit.arguments import positive, whole_number
from facekit.crop import CROP_SCALE, CropBox, crop, crop_box, transform_points
from facekit.detect import DETECTORS, LandmarkDetector, make_detector
from facekit.video import VIDEO_SUFFIXES, iter_video, video_info


@dataclass(frozen=True)
class Clip:
    path: Path  # the video file
    clip_id: str  # relative path without suffix, '/'-separated
    video_id: str  # groups clips of one recording (one discriminator column)


@dataclass(frozen=True)
class Job:
    size: int  # S, crop side in pixels
    scale: float  # crop side / landmark extent
    shift_y: float  # crop centre moved down by this fraction of the side
    every: int
    max_frames: int  # 0: all
    min_frames: int  # fewer frames with a face -> skipped
    detector: str


# The Job fields a clip's meta.json records that make its crops what they are: a finished clip made
# with other values is not this run's (a meta.json without max_frames, older, is not checked on it).
CROP_PARAMETERS = ("size", "scale", "shift_y", "every", "max_frames", "detector")


def differences(meta: dict[str, Any], job: Job) -> dict[str, Any]:
    """The crop parameters a clip's meta.json records with other values than `job`'s: name -> recorded."""
    return {k: meta[k] for k in CROP_PARAMETERS if k in meta and meta[k] != getattr(job, k)}


@dataclass(frozen=True)
class Outcome:
    clip_id: str
    status: str  # done | exists | skipped
    reason: str = ""
    frames: int = 0  # frames written
    no_face: int = 0  # frames dropped for want of a face
    seconds: float = 0.0


def find_clips(root: Path) -> tuple[list[Clip], str]:
    """Every video under `root`, sorted, and the layout name ("flat", "voxceleb" or "mixed")."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    clips = []
    for path in paths:
        rel = path.relative_to(root).with_suffix("")
        parent = rel.parent.as_posix()
        clips.append(Clip(path=path, clip_id=rel.as_posix(), video_id=rel.name if parent == "." else parent))
    depths = {len(c.path.relative_to(root).parts) for c in clips}
    layout = "flat" if depths <= {1} else "voxceleb" if depths == {3} else "mixed"
    return clips, layout


def select(clips: list[Clip], include: list[str] | None, exclude: list[str]) -> list[Clip]:
    """Clips whose id matches any `include` glob (all when None) and no `exclude` glob."""
    return [c for c in clips if selected(c.clip_id, include, exclude)]


def selected(clip_id: str, include: list[str] | None, exclude: list[str]) -> bool:
    def matches(patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(clip_id, p) for p in patterns)

    return (include is None or matches(include)) and not matches(exclude)


_DETECTOR: LandmarkDetector | None = None  # one per worker process


def _init_worker(detector: str) -> None:
    import cv2

    global _DETECTOR
    cv2.setNumThreads(1)
    _DETECTOR = make_detector(detector)
    _DETECTOR.detect(np.zeros((8, 8, 3), np.uint8))  # load the models now, not inside the first clip's timing


def _detect(path: Path, job: Job, detector: LandmarkDetector) -> tuple[list[int], list[np.ndarray], int]:
    """Frame numbers and (68, 2) landmarks of kept frames with a face, and the count without one."""
    indices, points, no_face = [], [], 0
    for k, frame in enumerate(iter_video(path, every=job.every, max_frames=job.max_frames)):
        index = k * job.every
        faces = detector.detect(frame)
        if faces:
            indices.append(index)
            points.append(faces[0].points)
        else:
            no_face += 1
    return indices, points, no_face


def process_clip(clip: Clip, out: Path, job: Job, detector: LandmarkDetector) -> Outcome:
    """Crop one clip into out/<clip id>/ (see the module docstring); never raises for bad videos."""
    import av

    start = time.monotonic()
    folder = out / clip.clip_id
    if (folder / "meta.json").is_file():
        other = differences(json.loads((folder / "meta.json").read_text()), job)
        if other:  # run() refuses such a folder up front; kept, never overwritten
            return Outcome(clip.clip_id, "skipped", f"made with other crop parameters: {other}")
        return Outcome(clip.clip_id, "exists")
    try:
        info = video_info(clip.path)
        indices, points, no_face = _detect(clip.path, job, detector)
    except (av.FFmpegError, ValueError, OSError) as err:
        return Outcome(clip.clip_id, "skipped", f"unreadable: {err}")
    if len(indices) < job.min_frames:
        reason = f"too few frames with a face ({len(indices)} < {job.min_frames}; {no_face} without)"
        return Outcome(clip.clip_id, "skipped", reason, no_face=no_face)
    pts = np.stack(points)  # (N, 68, 2) source pixels
    box = crop_box(pts, job.scale, shift_y=job.shift_y)
    folder.mkdir(parents=True, exist_ok=True)
    row = write_frames(clip.path, folder / "frames.npy", indices, box, job.size, job.every)
    if row != len(indices):
        return Outcome(clip.clip_id, "skipped", f"video decoded differently twice ({row} != {len(indices)})")
    np.save(folder / "landmarks.npy", transform_points(pts, box, job.size))
    meta = {
        "source": str(clip.path.resolve()),
        "clip_id": clip.clip_id,
        "video_id": clip.video_id,
        "fps": info.fps / job.every,
        "source_fps": info.fps,
        "original_size": [info.width, info.height],
        "crop_box": box._asdict(),
        "size": job.size,
        "frames_kept": len(indices),
        "frames_no_face": no_face,
        "frame_indices": indices,
        "every": job.every,
        "max_frames": job.max_frames,
        "scale": job.scale,
        "shift_y": job.shift_y,
        "detector": job.detector,
    }
    _write_json_atomic(folder / "meta.json", meta)
    return Outcome(
        clip.clip_id, "done", frames=len(indices), no_face=no_face, seconds=time.monotonic() - start
    )


def write_frames(video: Path, path: Path, indices: list[int], box: CropBox, size: int, every: int) -> int:
    """Crop frames number `indices` (sorted multiples of `every`) of `video` into `path`, uint8 (n, S, S, 3).

    Returns how many were found; fewer than asked means the video is shorter than it was.
    """
    frames = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(indices), size, size, 3))
    row = 0
    for k, frame in enumerate(iter_video(video, every=every, max_frames=indices[-1] // every + 1)):
        if row < len(indices) and k * every == indices[row]:
            frames[row] = crop(frame, box, size)  # (S, S, 3)
            row += 1
    frames.flush()
    return row


def restore_frames(clip_dir: Path, src: Path) -> int:
    """Recreate a clip's frames.npy from its video (SRC/<clip id>.<ext>) and meta.json: no detector.

    For machines without the landmark models: carry landmarks.npy + meta.json and the videos,
    then decode and crop there. Returns the number of frames written.
    """
    meta = json.loads((clip_dir / "meta.json").read_text())
    video = src / (meta["clip_id"] + Path(meta["source"]).suffix)
    box = CropBox(**meta["crop_box"])
    indices, size, every = meta["frame_indices"], meta["size"], meta["every"]
    written = write_frames(video, clip_dir / "frames.npy", indices, box, size, every)
    if written != meta["frames_kept"]:
        raise ValueError(f"{video}: found {written} of the {meta['frames_kept']} frames in meta.json")
    return written


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _worker(task: tuple[Clip, Path, Job]) -> Outcome:
    assert _DETECTOR is not None, "worker not initialised"
    try:
        return process_clip(*task, detector=_DETECTOR)
    except Exception as err:  # one odd clip must not end a days-long run: report it and go on
        return Outcome(task[0].clip_id, "skipped", f"error: {type(err).__name__}: {err}")


def run_all(clips: list[Clip], out: Path, job: Job, workers: int) -> list[Outcome]:
    """Process clips (in a pool when workers > 1) with a progress bar; outcomes in clip order."""
    from tqdm import tqdm

    tasks = [(c, out, job) for c in clips]
    bar = tqdm(total=len(tasks), unit="clip", desc="preprocess", file=sys.stderr)
    by_id: dict[str, Outcome] = {}
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(job.detector)
        results = map(_worker, tasks)
        for outcome in results:
            by_id[outcome.clip_id] = outcome
            bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")  # no forked dlib/torch/OpenMP state
        # SIGTERM as Ctrl-C: leaving the `with` terminates the pool (before, the parent died and its
        # orphaned workers went on writing clips)
        before = signal.signal(signal.SIGTERM, _terminated)
        try:
            with ctx.Pool(
                min(workers, len(tasks)), initializer=_init_worker, initargs=(job.detector,)
            ) as pool:
                for outcome in pool.imap_unordered(_worker, tasks):
                    by_id[outcome.clip_id] = outcome
                    bar.update()
        finally:
            signal.signal(signal.SIGTERM, before)
    bar.close()
    return [by_id[c.clip_id] for c in clips]


class Terminated(KeyboardInterrupt):
    exit_status = 143  # 128 + SIGTERM, as talkinghead.cli reports it


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="folder of videos (flat, or id/video/clip.mp4)")
    parser.add_argument("out", type=Path, help="output folder (created; finished clips are kept)")
    parser.add_argument(
        "--size", type=whole_number(8), help="crop size S in pixels (default: --config's image_size)"
    )
    parser.add_argument(
        "--config",
        default="small",
        help="a built-in config or a YAML path: its model gives the crop size (default small, as train's)",
    )
    parser.add_argument(
        "--scale",
        type=positive(),
        default=CROP_SCALE,
        help=f"crop side / landmark extent (default {CROP_SCALE})",
    )
    parser.add_argument(
        "--shift-y", type=float, default=0.0, help="move the crop down by this fraction of its side (<0: up)"
    )
    parser.add_argument("--every", type=whole_number(1), default=1, help="keep every Nth frame (default 1)")
    parser.add_argument(
        "--max-frames", type=whole_number(0), default=0, help="kept frames per clip at most (0: all)"
    )
    parser.add_argument(
        "--min-frames", type=whole_number(1), default=16, help="skip clips with fewer faces (default 16)"
    )
    parser.add_argument(
        "--workers",
        type=whole_number(1),
        default=min(4, os.cpu_count() or 1),
        help="processes (default: min(4, CPUs))",
    )
    parser.add_argument("--detector", choices=sorted(DETECTORS), default="dlib", help="default: dlib")
    parser.add_argument(
        "--include", action="append", metavar="GLOB", help="only clip ids matching (repeatable)"
    )
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="leave out (repeatable)"
    )
    parser.add_argument(
        "--restore-frames",
        action="store_true",
        help="only recreate missing frames.npy of finished clips from SRC and meta.json (no detector)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list the clips and video ids, process nothing"
    )


def _crop_size(args: argparse.Namespace) -> int:
    if args.size is not None:
        return int(args.size)
    from training.config import load_config

    # by default the crops of train's default config (ModelConfig()'s 256 px were resized as read)
    return load_config(args.config).model.image_size


def _summarise(outcomes: list[Outcome], out: Path, meta: dict[str, Any]) -> None:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "exists", "skipped")}
    report = {**meta, "counts": counts, "clips": [asdict(o) for o in outcomes]}
    _write_json_atomic(out / "report.json", report)
    done = [o for o in outcomes if o.status == "done"]
    frames = sum(o.frames for o in done)
    per_frame = sum(o.seconds for o in done) / max(frames, 1)
    print(
        f"{counts['done']} clips done ({frames} frames, {1000 * per_frame:.1f} ms/frame/worker), "
        f"{counts['exists']} already there, {counts['skipped']} skipped; report: {out / 'report.json'}"
    )
    for o in outcomes:
        if o.status == "skipped":
            print(f"  skipped {o.clip_id}: {o.reason}", file=sys.stderr)


def _other_parameters(clips: list[Clip], out: Path, job: Job) -> str | None:
    """None when no finished clip in `out` was made with crop parameters other than `job`'s, else one
    line naming them, how many clips, and what to do (a resumed run must not mix two kinds of crop)."""
    finished, other = 0, 0
    recorded: dict[str, set[str]] = {}
    for clip in clips:
        path = out / clip.clip_id / "meta.json"
        if not path.is_file():
            continue
        finished += 1
        try:
            differ = differences(json.loads(path.read_text()), job)
        except (OSError, ValueError):  # unreadable: process_clip reports it
            continue
        other += bool(differ)
        for name, value in differ.items():
            recorded.setdefault(name, set()).add(str(value))
    if not other:
        return None
    params = "; ".join(
        f"--{name.replace('_', '-')} {' and '.join(sorted(values))}, not {getattr(job, name)}"
        for name, values in recorded.items()
    )
    return (
        f"talkinghead preprocess: {other} of the {finished} finished clips in {out} were made with other "
        f"crop parameters ({params}): give another output folder, or delete those clips to redo them"
    )


def _restore_all(src: Path, out: Path, include: list[str] | None, exclude: list[str]) -> int:
    """--restore-frames: every finished clip in `out` that --include/--exclude select and whose
    frames.npy is missing (the filters were ignored: every such clip was restored)."""
    done, failed = 0, 0
    for meta_path in sorted(out.rglob("meta.json")):
        clip_id = meta_path.parent.relative_to(out).as_posix()
        if (meta_path.parent / "frames.npy").is_file() or not selected(clip_id, include, exclude):
            continue
        try:
            restore_frames(meta_path.parent, src)
            done += 1
        except (ValueError, OSError) as err:
            print(f"cannot restore {meta_path.parent}: {err}", file=sys.stderr)
            failed += 1
    print(f"restored frames.npy of {done} clips in {out}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    if not args.src.is_dir():
        print(f"talkinghead preprocess: no such folder {args.src}", file=sys.stderr)
        return 2
    all_clips, layout = find_clips(args.src)
    clips = select(all_clips, args.include, args.exclude)
    if not clips:
        print(f"talkinghead preprocess: no videos ({len(all_clips)} before filters) under {args.src}")
        return 1
    if args.restore_frames:
        return _restore_all(args.src, args.out, args.include, args.exclude)
    if args.dry_run:
        for c in clips:
            print(f"{c.clip_id}\tvideo={c.video_id}")
        print(f"{len(clips)} clips, {len({c.video_id for c in clips})} videos, layout {layout}")
        return 0
    job = Job(
        _crop_size(args),
        args.scale,
        args.shift_y,
        args.every,
        args.max_frames,
        args.min_frames,
        args.detector,
    )
    if refusal := _other_parameters(clips, args.out, job):
        print(refusal, file=sys.stderr)
        return 2
    try:
        make_detector(args.detector)  # fail here (e.g. missing weights), not in every pool worker
    except (RuntimeError, ValueError, ModuleNotFoundError) as err:
        print(f"talkinghead preprocess: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes = run_all(clips, args.out, job, args.workers)
    meta = {"src": str(args.src.resolve()), "layout": layout, **asdict(job)}
    _summarise(outcomes, args.out, meta)
    if not any(o.status in ("done", "exists") for o in outcomes):
        print(f"talkinghead preprocess: no usable clip in {args.src} (see why above)", file=sys.stderr)
        return 1
    return 0
