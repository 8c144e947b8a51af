"""Measure the watermark: detection after each attack, false positives, PSNR cost, time per frame.

    python -m facekit.watermark.bench --faces ../shared/data/faces --out docs/watermark.json \\
        [--repository model_repository] [--quick]

Generated frames: the evaluation people by the classical warp and (with --repository) by the
served model; real frames: every clip's face crops at 128 px, whole frames (256/512 px) and the
portraits at 1024 px. Each sequence gets a random payload; a frame counts as detected when the
mark is present, and as read when the decoded payload is the one embedded. False positives:
the detector over unmarked real frames (crops, whole frames, stills; as they are, after JPEG 75
and at half size) and over marked frames with another key. Figures go to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import cv2
import numpy as np

from facekit.watermark import detect as search
from facekit.watermark.attacks import FRAME_ATTACKS, h264, half, jpeg
from facekit.watermark.bench_data import EVAL_CLIPS, Clip, load_clip, model_generated, stills, warp_generated
from facekit.watermark.bench_stats import Tally, null_summary, psnr, timing
from facekit.watermark.carriers import BAND, GRID, SCHEME
from facekit.watermark.code import CODED_BITS, CRC_BITS, PAYLOAD_BITS
from facekit.watermark.embed import MASK_CAP, MASK_FLOOR, SYNC_SHARE
from facekit.watermark.watermarker import Watermarker

KEY = "bench-key: any secret string"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--faces", type=Path, default=Path("../shared/data/faces"), help="clips + stills")
    parser.add_argument("--out", type=Path, default=Path("docs/watermark.json"), help="JSON figures")
    parser.add_argument("--repository", type=Path, help="model repository: also the served model's frames")
    parser.add_argument("--quick", action="store_true", help="a few clips and frames (minutes less)")
    parser.add_argument("--seed", type=int, default=0)


def mark_sequence(
    wm: Watermarker,
    other: Watermarker,
    frames: np.ndarray,
    tally: Tally,
    rng: np.random.Generator,
    *,
    video: bool,
    reference: np.ndarray | None = None,
) -> None:
    """Mark `frames` with one random payload, attack, detect; add to `tally` (per attack)."""
    payload = int(rng.integers(0, 1 << 32))
    marked = [wm.mark(frame, payload) for frame in frames]
    for original, frame in zip(frames, marked, strict=True):
        tally.psnr.append(psnr(frame, original))
        tally.add("other_key", other.detect(frame), None)
    if reference is not None:
        for gen, frame, real in zip(frames, marked, reference, strict=True):
            tally.eval_psnr.append((psnr(gen, real), psnr(frame, real)))
    for name, attack in FRAME_ATTACKS.items():
        for frame in marked:
            tally.add(name, wm.detect(attack(frame)), payload)
    if video:
        for name, quality in (("h264", None), ("jpeg90+h264", 90)):
            for frame in h264(marked, jpeg_quality=quality):
                tally.add(name, wm.detect(frame), payload)


Nulls = dict[str, list[tuple[float, bool]]]  # (score, present) of unmarked frames, by set


def null_sets(wm: Watermarker, clip: Clip, crops: np.ndarray, nulls: Nulls) -> None:
    """Scores of unmarked real frames: crops and whole frames, as they are, JPEG'd and halved."""
    for name, images in (("crop128", crops), (f"frame{clip.frames.shape[1]}", clip.frames[::2])):
        for index, image in enumerate(images):
            nulls.setdefault(name, []).append(_null(wm, image))
            variant = jpeg(image) if index % 2 else half(image)
            nulls.setdefault(name + ("+jpeg75" if index % 2 else "+half"), []).append(_null(wm, variant))


def _null(wm: Watermarker, image: np.ndarray) -> tuple[float, bool]:
    found = wm.detect(image)
    return found.score, found.present


def run_clips(args: argparse.Namespace, wm: Watermarker, other: Watermarker) -> dict[str, object]:
    from facekit.detect import make_detector

    detector, rng = make_detector("dlib"), np.random.default_rng(args.seed)
    clips = sorted(args.faces.glob("*.mp4"))
    if args.quick:
        clips = [c for i, c in enumerate(clips) if i % 8 == 0 or c.stem in EVAL_CLIPS[:2]]
    sets = {name: Tally() for name in ("generated_warp", "generated_model", "real_crop128", "real_frame")}
    nulls: Nulls = {}
    for path in clips:
        evaluated = path.stem in EVAL_CLIPS  # the protocol: 2 s of references, then every 5th frame
        clip = load_clip(path, detector, every=5 if evaluated else 3, max_frames=40 if evaluated else 24)
        if clip is None:
            continue
        crops, _ = clip.crops(128)
        few = slice(0, 4 if args.quick else 8)
        mark_sequence(wm, other, crops[few], sets["real_crop128"], rng, video=True)
        mark_sequence(wm, other, clip.frames[:3], sets["real_frame"], rng, video=True)
        null_sets(wm, clip, crops if not args.quick else crops[:8], nulls)
        if path.stem in EVAL_CLIPS:
            generated, real = warp_generated(clip, 128)
            mark_sequence(wm, other, generated, sets["generated_warp"], rng, video=True, reference=real)
            if args.repository is not None:
                generated, real = model_generated(clip, args.repository)
                mark_sequence(wm, other, generated, sets["generated_model"], rng, video=True, reference=real)
        print(f"{path.stem}: {len(clip.frames)} frames", flush=True)
    return {"sets": sets, "nulls": nulls}


def design(wm: Watermarker) -> dict[str, object]:
    return {
        "scheme": SCHEME,
        "grid": GRID,
        "band_cycles_per_side": list(BAND),
        "strength_rms_grey_levels": wm.strength,
        "texture_mask": [MASK_FLOOR, MASK_CAP],
        "sync_share": SYNC_SHARE,
        "payload_bits": PAYLOAD_BITS,
        "crc_bits": CRC_BITS,
        "coded_bits": CODED_BITS,
        "max_crop": search.MAX_CROP,
        "threshold": search.THRESHOLD,
        "threshold_with_payload": search.THRESHOLD_WITH_PAYLOAD,
    }


def run(args: argparse.Namespace) -> int:
    cv2.setNumThreads(1)  # one core's cost per frame; the machine's other jobs take the rest
    started = time.time()
    wm, other = Watermarker(key=KEY), Watermarker(key=KEY + " (another deployment)")
    found = run_clips(args, wm, other)
    sets: dict[str, Tally] = found["sets"]  # type: ignore[assignment]
    nulls: Nulls = found["nulls"]  # type: ignore[assignment]
    portraits = stills(args.faces)
    sets["stills1024"] = Tally()
    rng = np.random.default_rng(args.seed + 1)
    for image in portraits:
        mark_sequence(wm, other, image[None], sets["stills1024"], rng, video=False)
        for variant in (image, half(image), half(half(image))):  # 1024, 512, 256 px
            nulls.setdefault("still", []).append(_null(wm, variant))
    false_positives = null_summary(nulls, other=sets)
    report = {
        "command": "python -m facekit.watermark.bench "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v not in (None, False)),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "design": design(wm),
        "marked": {name: tally.summary() for name, tally in sets.items() if tally.frames},
        "false_positives": false_positives,
        "timing_ms_one_thread": timing(wm, portraits[0]),
        "seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(false_positives["all"], indent=1))
    print(f"wrote {args.out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
