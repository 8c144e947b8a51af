"""Evaluate a model the way the field does: self-reenactment of people it never saw, against a
classical warp, plus one-shot stills driven by another person.

Rows per T (references from the first 2 s of each evaluation clip, driving frames every 5th after):
`warp` (the nearest reference warped piecewise-affinely onto the driving landmarks), `feed-forward`
(psi = P·ê), `fine-tuned` (the model personalised on the T references), `ceiling` (the real
driving frames: the figures of the person themself) and `floor` (other evaluation people's
frames: the identity figures of somebody else). Figures: SSIM, PSNR, NME of dlib's landmarks on
generated vs real frame, share of frames with a face, identity distance and cosine of dlib's
face descriptor against the references' mean, fine-tuning wall time. Each generated row is also
compared with the warp frame by frame (`against`: SSIM, PSNR, NME and identity differences on the
frames both were measured, a 95 % bootstrap interval over people and frames, and how many people
are better). Stills: identity distance to the still, face found, correlation of the mouth opening
with the driver's.

Writes <out>/evaluation.json, evaluation.md, contact_sheet.png and stills_sheet.png.

examples:
  talkinghead evaluate --checkpoint models/talkinghead-small.pt --out out/evaluation
  talkinghead evaluate --methods warp feed-forward --shots 8 --stills none     # minutes, no fine-tuning
  make evaluate
  talkinghead evaluate --methods feed-forward --engines openvino openvino-bf16 \\
      --verdict models/talkinghead-small.engines.json      # the CPU engines' quality gate
  talkinghead evaluate --methods fine-tuned --shots 8 --steps 400 --snapshots 40 80 150 \\
      --stills none --no-jitter      # what more fine-tuning steps buy, from one fine-tuning per person

With --engines, each engine runs the exported generator of --repository as an extra feed-forward
row (`feed-forward@<engine>`) and is judged against PyTorch's feed-forward row on the same frames:
SSIM drop, identity-distance rise and face-found drop (NME rise recorded, not gated), the worst
over every T's pooled and per-person figures (and the stills'). --verdict writes that judgement
where `make model-repository` picks it up (facekit/engines.py), with what the run covered: only
the full protocol (every evaluation person of the config, every T, every driving frame, the
stills) makes a verdict the service acts on; a reduced run's is written and marked so.

Every clip the run reads (the evaluation clips, the stills' driver, the jitter clip) is looked for
in --data before any model is built: missing ones end the run with one line naming them and the
`talkinghead preprocess` command that makes them (exit 1). A still without a detectable face is
skipped and named; the reenactment rows are written as soon as they are computed, and a later step
(embedder spread, stills, jitter) that fails is named under `errors` while the rest is written
(exit 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facekit import cpus, engines
from facekit.arguments import whole_number
from facekit.detect import NoFaceError, make_detector
from facekit.motion import STABLE_POINTS
from facekit.smoothing import jitter, smooth_sequence
from training import checkpoint
from training.config import EvalConfig, ExperimentConfig
from training.evaluation import sheets
from training.evaluation.methods import FeedForward, FeedForwardOn, FineTuned, WarpBaseline
from training.evaluation.protocol import EvalClip, find_stills, load_still, still_driving
from training.evaluation.readings import (
    FaceReading,
    correlation,
    detection_rate,
    identity,
    mean_descriptor,
    mouth_opening,
    read_faces,
    reading_mouth,
)
from training.evaluation.report import (
    Scores,
    against,
    against_table,
    identity_only,
    jsonable,
    per_clip_table,
    pooled,
    score_frames,
    table,
)
from training.evaluation.spread import embedding_spread
from training.metrics import OUTER_EYE_CORNERS
from training.runtime import setup_logging

log = logging.getLogger("talkinghead.evaluate")
METHODS = ("warp", "feed-forward", "fine-tuned")
BASELINE = "warp"  # what every other generated row is compared with, frame by frame ("against")
REAL_ROWS = ("ceiling", "floor")  # the identity figures of real frames, not a method's
JITTER_FRAMES = 50  # 2 s of a nearly still head at 25 fps
FACES = Path(__file__).resolve().parents[3] / "shared" / "data" / "faces"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", type=Path, default=Path("models/talkinghead-small.pt"), help="default %(default)s"
    )
    parser.add_argument("--data", type=Path, help="preprocessed clips (default: the config's meta.data)")
    parser.add_argument("--faces", type=Path, default=FACES, help=f"folder of the stills (default {FACES})")
    parser.add_argument("--clips", nargs="+", help="evaluation clip ids (default: meta.validation_videos)")
    parser.add_argument(
        "--shots", nargs="+", type=whole_number(1), help="T values (default: the config's, 1 and 8)"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="default: all of them"
    )
    parser.add_argument("--steps", type=whole_number(1), help="fine-tuning steps (default: the config's)")
    parser.add_argument(
        "--snapshots",
        nargs="+",
        type=whole_number(1),
        default=[],
        help="fewer steps to score as well, each a row fine-tuned@<steps> taken from the same fine-tuning",
    )
    parser.add_argument(
        "--finetune-shots",
        nargs="+",
        type=whole_number(1),
        help="fine-tune only at these T (default: every T)",
    )
    parser.add_argument("--no-jitter", action="store_true", help="skip the landmark-jitter measurement")
    parser.add_argument(
        "--jitter-frames",
        type=frame_count,
        default=JITTER_FRAMES,
        help=f"driving frames of the jitter measurement (default {JITTER_FRAMES})",
    )
    parser.add_argument(
        "--max-drive",
        type=whole_number(0),
        default=0,
        help="at most this many driving frames per clip (0: all)",
    )
    parser.add_argument("--stills", nargs="+", help="still globs in --faces, or 'none' (default: config's)")
    parser.add_argument("--still-finetune", action="store_true", help="also fine-tune on each still (slow)")
    parser.add_argument(
        "--still-frames", type=frame_count, help="driving frames per still (default: the config's)"
    )
    parser.add_argument(
        "--threads", type=whole_number(0), default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        default=[],
        choices=engines.ENGINES,
        help="also run the exported generator on these CPU engines (needs the feed-forward method)",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("model_repository"),
        help="for --engines (default %(default)s)",
    )
    parser.add_argument("--verdict", type=Path, help="write the engines' verdicts here (JSON)")
    parser.add_argument("--out", type=Path, default=Path("out/evaluation"), help="default %(default)s")


def frame_count(text: str) -> int:
    """A frame count for a motion figure (jitter, mouth correlation): at least 2 frames."""
    count = int(text)
    if count < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 frames, got {count}")
    return count


def run(args: argparse.Namespace) -> int:
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        meta = checkpoint.load_meta(args.checkpoint, "the evaluation")
        cfg = checkpoint.config_of(meta)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"talkinghead evaluate: --checkpoint: {error}") from None
    overrides = {
        "evaluation.shots": args.shots,
        "evaluation.still_frames": args.still_frames,
    }
    protocol = cfg.replace(**{k: v for k, v in overrides.items() if v}).evaluation
    data = args.data or Path(cfg.meta.data)
    clip_ids = args.clips or list(cfg.meta.validation_videos)
    if not clip_ids:
        raise SystemExit("no evaluation clips: give --clips or set meta.validation_videos in the config")
    still_patterns = protocol.stills if args.stills is None else tuple(args.stills)
    needed = dict.fromkeys(clip_ids, "")
    if still_patterns != ("none",):
        needed.setdefault(protocol.still_driver, " (the stills' driver)")
    if not args.no_jitter:
        needed.setdefault(protocol.jitter_clip, " (the jitter clip)")
    if still_patterns != ("none",) and not find_stills(args.faces, still_patterns):
        where = args.faces if args.faces.is_dir() else f"{args.faces} (no such folder)"
        raise SystemExit(
            f"talkinghead evaluate: no stills matching {list(still_patterns)} in {where}: "
            "give --faces the folder that holds them, or --stills none"
        )
    if missing := missing_clips(data, needed, cfg.model.image_size):
        raise SystemExit(missing)  # before any model is built or frame read
    clips = [EvalClip.load(data / c) for c in clip_ids]
    methods = _methods(args, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict[str, Any] = _header(args, meta, cfg, protocol, clip_ids)
    reenact, samples = evaluate_clips(clips, methods, protocol, args.max_drive, args.finetune_shots)
    report["reenactment"] = reenact
    # The reenactment took most of the time: it is on disk before the later steps run, and a step
    # that fails is logged and named in the report (`errors`) while the others go on.
    report["status"] = "running"
    write_json(args.out, report)
    errors: dict[str, str] = {}
    if "feed-forward" in methods:
        emb = methods["feed-forward"].embedder  # type: ignore[attr-defined]
        _step(
            "embedder_spread",
            report,
            errors,
            lambda: embedding_spread(emb, [(c.frames, c.points) for c in clips], min(8, cfg.meta.k_shot)),
        )
    if still_patterns != ("none",):
        still_methods = {k: m for k, m in methods.items() if k != "fine-tuned" or args.still_finetune}

        def stills() -> dict[str, Any]:
            driver = next((c for c in clips if c.clip_id == protocol.still_driver), None)
            driver = driver or EvalClip.load(data / protocol.still_driver)
            return evaluate_stills(args.faces, still_patterns, driver, still_methods, protocol, cfg, args.out)

        _step("stills", report, errors, stills)
    if not args.no_jitter:
        jitter_methods = {k: m for k, m in methods.items() if k != "fine-tuned"}

        def jitter_figures() -> dict[str, Any]:
            still = next((c for c in clips if c.clip_id == protocol.jitter_clip), None)
            still = still or EvalClip.load(data / protocol.jitter_clip)
            return evaluate_jitter(still, jitter_methods, protocol, args.jitter_frames)

        _step("jitter", report, errors, jitter_figures)
    if errors:
        report["errors"] = errors
    report["status"] = "incomplete" if errors else "complete"
    report["coverage"] = coverage = protocol_coverage(report, cfg, protocol, args.max_drive, still_patterns)
    if args.engines:
        verdicts = judge_engines(report, args.engines, str(report["model_id"]), coverage)
        report["engines"] = {v.engine: v.as_dict() for v in verdicts}
        if args.verdict:
            engines.write_verdicts(args.verdict, verdicts)
            log.info("wrote the engine verdicts to %s", args.verdict)
            if not coverage["full_protocol"]:
                log.warning(
                    "%s is from a reduced run (%s): the service will not act on it",
                    args.verdict,
                    "; ".join(coverage["reduced"]),
                )
    report["seconds"] = round(time.monotonic() - started, 1)
    write(args.out, report, samples, cfg.model.image_size)
    if errors:
        log.error("evaluation incomplete: %s failed (the rest is written to %s)", ", ".join(errors), args.out)
        return 1
    return 0


def missing_clips(data: Path, needed: dict[str, str], size: int) -> str | None:
    """None when every needed clip (id -> why it is needed, shown after its id) is preprocessed in
    `data` (meta.json, landmarks.npy and frames.npy: what EvalClip.load reads), else one line naming
    the folder, the clips that are not, and the command that makes them."""
    faces = min(os.path.relpath(FACES), str(FACES), key=len)
    preprocess = f"run `talkinghead preprocess {faces} {data} --size {size}`"
    redo = "delete them and preprocess again"  # meta.json: preprocess counts them as done
    restore = f"run `talkinghead preprocess {faces} {data} --restore-frames`"
    groups: dict[str, list[str]] = {preprocess: [], redo: [], restore: []}
    for clip_id, why in needed.items():
        folder = data / clip_id
        if not (folder / "meta.json").is_file():
            fix = preprocess
        elif not (folder / "landmarks.npy").is_file():
            fix = redo
        elif not (folder / "frames.npy").is_file():
            fix = restore
        else:
            continue
        groups[fix].append(clip_id + why)
    if not any(groups.values()):
        return None
    where = f"{data} (no such folder)" if not data.is_dir() else str(data)
    fixes = "; ".join(f"{', '.join(ids)}: {fix}" for fix, ids in groups.items() if ids)
    return f"talkinghead evaluate: evaluation clips not preprocessed in {where}: {fixes}"


def _step(name: str, report: dict[str, Any], errors: dict[str, str], compute: Callable[[], Any]) -> None:
    """report[name] = compute(); a failure is logged and recorded in `errors` instead."""
    try:
        report[name] = compute()
    except Exception as error:
        log.exception("evaluation step %s failed; the other steps go on", name)
        errors[name] = f"{type(error).__name__}: {error}"


def _methods(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    made: dict[str, Any] = {}
    for name in args.methods:
        if name == "warp":
            made[name] = WarpBaseline()
        elif name == "feed-forward":
            made[name] = FeedForward(meta)
        else:
            steps = checkpoint.config_of(meta).finetune.steps if args.steps is None else args.steps
            if any(snapshot >= steps for snapshot in args.snapshots):
                raise SystemExit(f"--snapshots are taken on the way to --steps: each must be below {steps}")
            made[name] = FineTuned(meta, args.steps, args.snapshots)
    if args.snapshots and "fine-tuned" not in made:
        raise SystemExit("--snapshots are rows of the fine-tuned method: add --methods fine-tuned")
    if args.engines and "feed-forward" not in made:
        raise SystemExit("--engines are judged against the feed-forward row: add --methods feed-forward")
    for engine in args.engines:
        method = FeedForwardOn(meta, engine, args.repository, threads=args.threads)
        made[method.name] = method
    return made


def judge_engines(
    report: dict[str, Any], names: list[str], model_id: str, coverage: dict[str, Any] | None = None
) -> list[engines.Verdict]:
    """Each engine's row against PyTorch's feed-forward row on the same frames: the largest SSIM
    drop, identity-distance rise and face-found drop (and NME rise, not gated) over every T's
    pooled figures and every clip's (person's) own - one person ruined among seven hardly moves
    the pooled figure - (face found: pooled only, _POOLED_ONLY) and the stills' pooled identity
    distance and face found. The verdict
    names where each worst figure was, and records `coverage` (protocol_coverage)."""
    verdicts = []
    for name in names:
        row = f"feed-forward@{name}"
        places = []
        for t, rows in report["reenactment"].items():
            ours, theirs = rows["feed-forward"], rows[row]
            places.append((f"{t} pooled", ours["pooled"], theirs["pooled"]))
            for clip, figures in ours.get("clips", {}).items():
                places.append((f"{t} clip {clip}", figures, theirs["clips"].get(clip, {})))
        still_rows = report.get("stills", {}).get("rows", {})
        if row in still_rows:
            ours, theirs = (
                {k: v for k, v in r["pooled"].items() if k in _STILL_FIGURES}
                for r in (still_rows["feed-forward"], still_rows[row])
            )
            places.append(("stills pooled", ours, theirs))
        worst: dict[str, tuple[float, str]] = {}
        for where, ours, theirs in places:
            for figure, (key, sign) in _GATE_FIGURES.items():
                if key not in ours or (figure in _POOLED_ONLY and " clip " in where):
                    continue
                change = _change(theirs.get(key), ours[key], sign, missing=figure != "nme_rise")
                if change is not None and (figure not in worst or change > worst[figure][0]):
                    worst[figure] = (change, where)
        gated = {k: worst[k][0] if k in worst else float("inf") for k in _GATE_FIGURES if k != "nme_rise"}
        verdict = engines.Verdict(
            name,
            model_id,
            ssim_drop=gated["ssim_drop"],
            identity_rise=gated["identity_rise"],
            face_found_drop=gated["face_found_drop"],
            nme_rise=worst["nme_rise"][0] if "nme_rise" in worst else None,
            worst={k: where for k, (_, where) in worst.items()},
            coverage=coverage,
        )
        log.info("engine %s: %s", name, verdict.as_dict())
        verdicts.append(verdict)
    return verdicts


def protocol_coverage(
    report: dict[str, Any],
    cfg: ExperimentConfig,
    protocol: EvalConfig,
    max_drive: int,
    still_patterns: tuple[str, ...],
) -> dict[str, Any]:
    """What the run measured, and whether that is the checkpoint's full protocol: every evaluation
    clip of its config (meta.validation_videos), every T of its config, every driving frame (no
    --max-drive), and its stills (the config's globs, at least one still scored, the config's
    frames per still). Engine verdicts are acted on only from a full run
    (facekit.engines.passed_engines); `reduced` says what a reduced run left out."""
    expected = cfg.evaluation
    reenactment: dict[str, Any] = report.get("reenactment", {})
    shots = sorted(int(t.removeprefix("T=")) for t in reenactment)
    first: dict[str, Any] = next(iter(reenactment.values()), {})
    clip_rows: dict[str, Any] = next(
        (r["clips"] for k, r in first.items() if k != "_per_clip" and "clips" in r), {}
    )
    driving = {clip: int(figures.get("frames") or 0) for clip, figures in clip_rows.items()}
    stills: dict[str, Any] = report.get("stills") or {}
    still_rows: dict[str, Any] = next(iter(stills.get("rows", {}).values()), {})
    scored = sorted(still_rows.get("stills", {}))
    reduced = []
    if not cfg.meta.validation_videos:
        reduced.append("the config names no evaluation clips (meta.validation_videos)")
    left_out = [c for c in cfg.meta.validation_videos if c not in driving]
    if left_out:
        reduced.append(f"clips left out: {', '.join(left_out)}")
    if missing := [str(t) for t in expected.shots if t not in shots]:
        reduced.append(f"T left out: {', '.join(missing)}")
    if max_drive > 0:
        reduced.append(f"at most {max_drive} driving frames per clip (--max-drive)")
    if tuple(still_patterns) != tuple(expected.stills):
        reduced.append(f"stills {' '.join(still_patterns)}, not the config's {' '.join(expected.stills)}")
    elif not scored:
        reduced.append("no still scored")
    if protocol.still_frames != expected.still_frames:
        reduced.append(f"{protocol.still_frames} frames per still, not the config's {expected.still_frames}")
    return {
        "clips": list(driving),
        "shots": shots,
        "driving_frames": driving,
        "max_drive": max_drive,
        "stills": len(scored),
        "stills_skipped": sorted(stills.get("skipped", {})),
        "full_protocol": not reduced,
        "reduced": reduced,
    }


# verdict figure -> (report figure, +1 where the engine's higher value is worse, -1 where lower is)
_GATE_FIGURES = {
    "ssim_drop": ("ssim", -1),
    "identity_rise": ("identity_distance", 1),
    "face_found_drop": ("face_found", -1),
    "nme_rise": ("nme", 1),
}
# Face found is judged on the pooled figures only: one person has 11-30 driving frames, so a
# single borderline frame whose face dlib misses after sub-level pixel changes is a 3-9 % drop of
# that person's figure, while the pool's limit (0.01: under 2 of 191 frames at a T) still fails an
# engine that loses a face in several frames.
_POOLED_ONLY = ("face_found_drop",)
_STILL_FIGURES = ("identity_distance", "face_found")  # the stills' figures the gate reads


def _change(engine: float | None, pytorch: float | None, sign: int, *, missing: bool) -> float | None:
    """How much worse the engine's figure is than PyTorch's; None where PyTorch's row had nothing
    to measure; where only the engine's had nothing, infinite (a failed gate) if `missing` counts
    against it, else None. A figure measured nowhere is infinite in the verdict: nothing passed."""
    if pytorch is None:
        return None
    if engine is None:
        return float("inf") if missing else None
    return sign * (engine - pytorch) + 0.0  # + 0.0: no -0.0 in the verdict


def _header(
    args: argparse.Namespace,
    meta: dict[str, Any],
    cfg: ExperimentConfig,
    protocol: EvalConfig,
    clips: list[str],
) -> dict[str, Any]:
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "checkpoint": str(args.checkpoint),
        "model_id": checkpoint.fingerprint(meta),
        "config": cfg.name,
        "step": meta.get("step"),
        "image_size": cfg.model.image_size,
        # 0 is 0 steps; None: the fine-tuned method was not run
        "finetune_steps": (cfg.finetune.steps if args.steps is None else args.steps)
        if "fine-tuned" in args.methods
        else None,
        "finetune_snapshots": sorted(set(args.snapshots)),
        "protocol": protocol.__dict__,
        "clips": clips,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu": cpus.model_name(),
        },
    }


def evaluate_clips(
    clips: list[EvalClip],
    methods: dict[str, Any],
    protocol: EvalConfig,
    max_drive: int,
    finetune_shots: list[int] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every method at every T on every clip -> ({"T=8": {row: {"pooled", "clips"}}}, sheet samples)."""
    drive = {c.clip_id: c.driving(protocol, max_drive) for c in clips}
    real = {c.clip_id: c.frames[drive[c.clip_id]] for c in clips}
    real_readings = {c.clip_id: read_faces(real[c.clip_id]) for c in clips}
    out: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    for shots in protocol.shots:
        rows: dict[str, dict[str, Scores]] = {}
        for clip in clips:
            cid = clip.clip_id
            refs = clip.references(shots, protocol)
            reference = mean_descriptor(read_faces(clip.frames[refs]))
            samples.setdefault(cid, {})["real"] = real[cid]
            samples[cid]["reference"] = clip.frames[refs[0]]
            for name, method in methods.items():
                if name == "fine-tuned" and finetune_shots and shots not in finetune_shots:
                    continue
                fitted = method.fit(clip.frames[refs], clip.points[refs])
                for row, made in [*fitted.snapshots.items(), (name, fitted)]:
                    generated = made.render(clip.points[drive[cid]])
                    scores = score_frames(
                        generated, real[cid], read_faces(generated), real_readings[cid], reference
                    )
                    scores.seconds = made.seconds
                    rows.setdefault(row, {})[cid] = scores
                    log.info("T=%d %s %s: %s", shots, cid, row, json.dumps(jsonable(scores.means())))
                samples[cid][name] = generated
            ceiling, floor = REAL_ROWS
            rows.setdefault(ceiling, {})[cid] = identity_only(real_readings[cid], reference)
            others = [r for o, rr in real_readings.items() if o != cid for r in rr]
            rows.setdefault(floor, {})[cid] = identity_only(others, reference)
        out[f"T={shots}"] = {
            name: {"pooled": pooled(per_clip), "clips": {c: s.means() for c, s in per_clip.items()}}
            for name, per_clip in rows.items()
        }
        if BASELINE in rows:
            for name, per_clip in rows.items():
                if name not in (BASELINE, *REAL_ROWS):
                    out[f"T={shots}"][name]["against"] = against(per_clip, rows[BASELINE])
        out[f"T={shots}"]["_per_clip"] = rows  # for the markdown; dropped before JSON
    return out, samples


def evaluate_stills(
    faces: Path,
    patterns: tuple[str, ...],
    driver: EvalClip,
    methods: dict[str, Any],
    protocol: EvalConfig,
    cfg: ExperimentConfig,
    out: Path,
) -> dict[str, Any]:
    """One-shot stills driven by `driver`'s motion -> {"driver", "rows": {method: {"pooled", "stills"}},
    "skipped": {file: why}}. A still in which no face is found (or that cannot be read) is logged
    and skipped, not the end of the run."""
    paths = find_stills(faces, patterns)
    if not paths:
        log.warning("no stills matching %s in %s: the stills rows are empty", list(patterns), faces)
        return {}
    detector = make_detector("dlib")
    rows: dict[str, dict[str, dict[str, float | None]]] = {name: {} for name in methods}
    sheet_rows: list[tuple[str, np.ndarray, dict[str, np.ndarray]]] = []
    skipped: dict[str, str] = {}
    for path in paths:
        try:
            still = load_still(path, detector, cfg.model.image_size)
        except NoFaceError:
            log.warning("still %s: no face found in it, skipped", path)
            skipped[path.name] = "no face found"
            continue
        except OSError as error:  # not an image PIL can read
            log.warning("still %s: cannot be read (%s), skipped", path, error)
            skipped[path.name] = f"cannot be read: {error}"
            continue
        reference = read_faces(still.frame[None])[0].descriptor
        picks, points = still_driving(driver, still, protocol)
        driver_mouth = mouth_opening(driver.points[picks])
        made: dict[str, np.ndarray] = {}
        for name, method in methods.items():
            frames = method.fit(still.frame[None], still.points[None]).render(points)
            readings = read_faces(frames)
            dist, _ = identity(readings, reference)
            rows[name][still.name] = {
                "identity_distance": _nanmean(dist),
                "face_found": detection_rate(readings),
                "mouth_correlation": _finite(correlation(reading_mouth(readings), driver_mouth)),
            }
            made[name] = frames
            log.info("still %s %s: %s", still.name, name, rows[name][still.name])
        sheet_rows.append((still.name, still.frame, made))
    if not sheet_rows:
        log.warning("no face found in any of the %d stills: the stills rows are empty", len(paths))
        return {"driver": driver.clip_id, "rows": {}, "skipped": skipped}
    sheets.save_stills_sheet(out / "stills_sheet.png", sheet_rows, driver.frames[picks], cfg.model.image_size)
    return {
        "driver": driver.clip_id,
        "rows": {name: {"pooled": _pool_stills(per), "stills": per} for name, per in rows.items()},
        "skipped": skipped,
    }


def evaluate_jitter(
    clip: EvalClip, methods: dict[str, Any], protocol: EvalConfig, frames: int = JITTER_FRAMES
) -> dict[str, Any]:
    """Frame-to-frame jitter (face units, STABLE_POINTS) of the landmarks dlib reads on generated
    frames, driven by a nearly still head's raw landmarks and by their One-Euro-filtered version."""
    fps = 1.0 / float(np.median(np.diff(clip.times)))
    drive = np.flatnonzero(clip.times >= protocol.reference_seconds)[:frames]
    raw = clip.points[drive]
    smoothed = smooth_sequence(raw, fps)
    out: dict[str, Any] = {
        "clip": clip.clip_id,
        "frames": len(drive),
        "driver": {"raw": jitter(raw, STABLE_POINTS), "smoothed": jitter(smoothed, STABLE_POINTS)},
    }
    refs = clip.references(1, protocol)
    for name, method in methods.items():
        fitted = method.fit(clip.frames[refs], clip.points[refs])
        out[name] = {}
        for kind, points in (("raw", raw), ("smoothed", smoothed)):
            out[name][kind] = found_jitter(read_faces(fitted.render(points)))
    log.info("jitter: %s", out)
    return out


def found_jitter(readings: list[FaceReading]) -> float | None:
    """facekit.smoothing.jitter of the landmarks dlib read, over the runs of consecutive frames with
    a face: a step is measured only between neighbouring frames that both have one (the frames on
    either side of a miss are not neighbours). None without two consecutive frames with a face."""
    runs: list[np.ndarray] = []
    run: list[np.ndarray] = []
    for reading in [*readings, FaceReading(None, None)]:
        if reading.points is not None:
            run.append(reading.points)
            continue
        if len(run) > 1:
            runs.append(np.stack(run))
        run = []
    if not runs:
        return None
    i, j = OUTER_EYE_CORNERS
    scale = np.concatenate([np.linalg.norm(r[:, i] - r[:, j], axis=-1) for r in runs]).mean()
    steps = [np.linalg.norm(np.diff(r[:, STABLE_POINTS], axis=0), axis=-1).ravel() for r in runs]
    return float(np.concatenate(steps).mean() / scale)


def _pool_stills(per: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    keys = next(iter(per.values())).keys()
    return {k: _nanmean(np.array([v[k] if v[k] is not None else np.nan for v in per.values()])) for k in keys}


def _nanmean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _finite(value: float) -> float | None:
    return value if np.isfinite(value) else None


def write_json(out: Path, report: dict[str, Any]) -> None:
    """<out>/evaluation.json of the report as it stands (the markdown's per-clip scores left out)."""
    out.mkdir(parents=True, exist_ok=True)
    reenactment = {
        t: {k: v for k, v in rows.items() if k != "_per_clip"} for t, rows in report["reenactment"].items()
    }
    text = json.dumps(jsonable({**report, "reenactment": reenactment}), indent=1) + "\n"
    staged = out / ".evaluation.json"
    staged.write_text(text)
    os.replace(staged, out / "evaluation.json")


def write(out: Path, report: dict[str, Any], samples: dict[str, Any], cell: int) -> None:
    write_json(out, report)
    per_clip = {t: rows.pop("_per_clip") for t, rows in report["reenactment"].items()}
    (out / "evaluation.md").write_text(markdown(report, per_clip))
    sheets.save_contact_sheet(out / "contact_sheet.png", samples, cell)
    log.info("wrote %s (%s s)\n%s", out, report["seconds"], markdown(report, per_clip))


def _finetuning(steps: int | None, snapshots: list[int]) -> str:
    if steps is None:
        return "no fine-tuning (--methods without fine-tuned)"
    taken = ", ".join(f"fine-tuned@{n}" for n in snapshots)
    return f"fine-tuning {steps} steps" + (f" ({taken}: the same fine-tuning, earlier)" if snapshots else "")


def markdown(report: dict[str, Any], per_clip: dict[str, Any]) -> str:
    columns = ["ssim", "psnr", "nme", "face_found", "identity_distance", "identity_cosine"]
    parts = [
        f"# Evaluation of `{report['checkpoint']}` (model {report['model_id']}, step {report['step']})",
        f"{report['created']}; {len(report['clips'])} people never trained on: {', '.join(report['clips'])}; "
        f"scored at {report['image_size']} px; "
        f"{_finetuning(report['finetune_steps'], report.get('finetune_snapshots', []))}; "
        f"{report['machine']['cpus']} CPUs; {report['seconds']} s in all.",
    ]
    if report.get("errors"):
        failed = "; ".join(f"{step}: {why}" for step, why in report["errors"].items())
        parts.append(f"**Incomplete**: these steps failed and are missing below: {failed}.")
    for t, rows in report["reenactment"].items():
        parts.append(
            f"## Self-reenactment, {t}\n\n" + table({k: v["pooled"] for k, v in rows.items()}, columns)
        )
        if any("against" in row for row in rows.values()):
            parts.append(
                f"Against the {BASELINE}, frame by frame on the frames where both were measured (NME and "
                "identity: both show a face): mean difference, [95 % interval from a bootstrap over "
                "people, then their frames], people better of people:\n\n" + against_table(rows, BASELINE)
            )
        parts.append(per_clip_table(per_clip[t], "identity_distance"))
        generated = {k: v for k, v in per_clip[t].items() if k not in REAL_ROWS}
        if generated:
            parts.append(per_clip_table(generated, "ssim"))
    if "embedder_spread" in report:
        s = report["embedder_spread"]
        parts.append(
            "## Embedder spread\n\n"
            f"ê between people {s['e_between']:.4g}, within a person {s['e_within']:.4g} "
            f"(ratio {s['e_ratio']:.3g}); mean |ê| {s['e_norm']:.4g} (people apart by "
            f"{s['e_between_rel']:.1%} of it); dead units {s['e_dead_units']:.1%}."
        )
    if report.get("jitter"):
        j = report["jitter"]
        lines = ["| landmarks | raw driver | One-Euro driver |", "|---|---|---|"]
        for name in ("driver", *[k for k in j if k not in ("clip", "frames", "driver")]):
            lines.append(f"| {name} | {_fmt(j[name]['raw'])} | {_fmt(j[name]['smoothed'])} |")
        parts.append(
            f"## Jitter on a still head ({j['clip']}, {j['frames']} frames; mean frame-to-frame motion "
            "of the stable points, in outer-eye distances)\n\n" + "\n".join(lines)
        )
    if report.get("engines"):
        lines = [
            "| engine | SSIM drop | identity rise | face found drop | NME rise | passed | worst at |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, v in report["engines"].items():
            figures = [v["ssim_drop"], v["identity_rise"], v["face_found_drop"], v["nme_rise"]]
            where = "; ".join(f"{k}: {w}" for k, w in v["worst"].items())
            lines.append(
                f"| {name} | " + " | ".join(_fmt(f, 4) for f in figures) + f" | {v['passed']} | {where} |"
            )
        parts.append(
            f"## CPU engines against PyTorch (gate: SSIM drop <= {engines.MAX_SSIM_DROP}, identity "
            f"rise <= {engines.MAX_IDENTITY_RISE}, face found drop <= {engines.MAX_FACE_FOUND_DROP}; "
            "worst over every T's pooled and per-person figures and the stills; NME not gated)\n\n"
            + "\n".join(lines)
            + _coverage_line(report.get("coverage"))
        )
    if report.get("stills"):
        st = report["stills"]
        lines = ["| row | identity dist to still | face found | mouth corr |", "|---|---|---|---|"]
        for name, row in st["rows"].items():
            p = row["pooled"]
            lines.append(
                f"| {name} | {_fmt(p['identity_distance'])} | {_fmt(p['face_found'])} | "
                f"{_fmt(p['mouth_correlation'])} |"
            )
        scored = len(next(iter(st["rows"].values()))["stills"]) if st["rows"] else 0
        if st.get("skipped"):
            reasons = "; ".join(f"{name}: {why}" for name, why in st["skipped"].items())
            lines.append(f"\n{len(st['skipped'])} skipped ({reasons}).")
        parts.append(f"## One-shot stills driven by {st['driver']} ({scored} stills)\n\n" + "\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _coverage_line(coverage: dict[str, Any] | None) -> str:
    if not coverage:
        return ""
    if coverage["full_protocol"]:
        return "\n\nThe full protocol: the service acts on these verdicts."
    return (
        f"\n\nA reduced run ({'; '.join(coverage['reduced'])}): the verdicts are written but the "
        "service does not act on them."
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
