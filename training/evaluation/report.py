"""Figures of the evaluation suite: per-frame scores, their per-clip and pooled means, and the
markdown table and contact sheets a person reads.

Pooled figures are means over every scored frame of every clip (NaN-aware: NME and identity only
over frames where dlib found a face, which `face_found` reports). Two methods' pooled NME or
identity can therefore be means over different frames: the frames where only one of them shows a
face are often the hard ones. `against` compares a method with a baseline frame by frame, on the
frames where both were measured, with a bootstrap interval over people and frames. JSON holds plain
numbers only; NaN becomes null.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.evaluation.readings import FaceReading, identity, paired_nme
from training.metrics import psnr, ssim

# figure -> (column title, digits); the order of the markdown columns
FIGURES: dict[str, tuple[str, int]] = {
    "ssim": ("SSIM", 3),
    "psnr": ("PSNR dB", 2),
    "nme": ("NME", 4),
    "face_found": ("face found", 3),
    "identity_distance": ("identity dist", 3),
    "identity_cosine": ("identity cos", 3),
}


@dataclass
class Scores:
    """Per-frame figures of one method on one clip (arrays of equal length; NaN = not measured)."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = math.nan  # fitting time of the avatar (fine-tuning)

    def means(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {k: _mean(v) for k, v in self.values.items()}
        out["frames"] = float(len(next(iter(self.values.values())))) if self.values else 0.0
        if math.isfinite(self.seconds):
            out["fit_seconds"] = round(self.seconds, 1)
        return out


def score_frames(
    generated: np.ndarray,
    real: np.ndarray,
    readings: list[FaceReading],
    real_readings: list[FaceReading],
    reference: np.ndarray | None,
) -> Scores:
    """Every figure of generated frames against the real ones (readings of both already taken)."""
    dist, cos = identity(readings, reference)
    pairs = list(zip(generated, real, strict=True))
    return Scores(
        {
            "ssim": np.array([ssim(g, r) for g, r in pairs]),
            "psnr": np.array([psnr(g, r) for g, r in pairs]),
            "nme": paired_nme(readings, real_readings),
            "face_found": np.array([float(r.found) for r in readings]),
            "identity_distance": dist,
            "identity_cosine": cos,
        }
    )


def identity_only(readings: list[FaceReading], reference: np.ndarray | None) -> Scores:
    """Identity and detection figures of real frames (the ceiling and floor rows)."""
    dist, cos = identity(readings, reference)
    return Scores(
        {
            "face_found": np.array([float(r.found) for r in readings]),
            "identity_distance": dist,
            "identity_cosine": cos,
        }
    )


def pooled(per_clip: dict[str, Scores]) -> dict[str, float | None]:
    """Means over every frame of every clip; fit time is the mean over clips."""
    keys = next(iter(per_clip.values())).values.keys()
    out: dict[str, float | None] = {
        k: _mean(np.concatenate([s.values[k] for s in per_clip.values()])) for k in keys
    }
    out["frames"] = float(sum(len(s.values[next(iter(keys))]) for s in per_clip.values()))
    seconds = [s.seconds for s in per_clip.values() if math.isfinite(s.seconds)]
    if seconds:
        out["fit_seconds"] = round(float(np.mean(seconds)), 1)
    return out


# figure -> +1 where higher is better, -1 where lower is: what `against` compares, and how
PAIRED: dict[str, int] = {"ssim": 1, "psnr": 1, "nme": -1, "identity_distance": -1}
BOOTSTRAP_DRAWS = 2000


def against(
    method: dict[str, Scores], base: dict[str, Scores], *, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> dict[str, dict[str, float | int | None]]:
    """`method` minus `base`, frame by frame on the frames both measured, for each figure of
    PAIRED -> {figure: {"difference", "low", "high", "frames", "people_better", "people"}}.

    `difference` is the mean over those frames of every clip; `low`/`high` bound its 95 % interval
    from a two-stage bootstrap (draw the people with replacement, then each drawn person's frames):
    it says how far the mean could move with other people like these, not only other frames of
    these. `people_better` counts the people whose own mean difference is in the figure's better
    direction (higher SSIM/PSNR, lower NME/identity distance), of `people` with a common frame."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, float | int | None]] = {}
    for figure, sign in PAIRED.items():
        per_person = []
        for clip, scores in method.items():
            if clip in base and figure in scores.values and figure in base[clip].values:
                d = scores.values[figure] - base[clip].values[figure]
                if (d := d[np.isfinite(d)]).size:
                    per_person.append(d)
        if not per_person:
            out[figure] = {"difference": None, "low": None, "high": None, "frames": 0}
            out[figure] |= {"people_better": 0, "people": 0}
            continue
        sums = np.empty(draws)
        counts = np.empty(draws)
        for i in range(draws):
            people = rng.integers(len(per_person), size=len(per_person))
            drawn = [per_person[p][rng.integers(per_person[p].size, size=per_person[p].size)] for p in people]
            sums[i] = sum(float(d.sum()) for d in drawn)
            counts[i] = sum(d.size for d in drawn)
        low, high = np.percentile(sums / counts, [2.5, 97.5])
        out[figure] = {
            "difference": float(np.concatenate(per_person).mean()),
            "low": float(low),
            "high": float(high),
            "frames": int(sum(d.size for d in per_person)),
            "people_better": int(sum(sign * d.mean() > 0 for d in per_person)),
            "people": len(per_person),
        }
    return out


def against_table(rows: dict[str, dict[str, Any]], base: str) -> str:
    """A markdown table of each row's `against` figures (the rows that carry them)."""
    head = ["row", *(f"{FIGURES[f][0]} - {base}" for f in PAIRED)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        if "against" not in row:
            continue
        cells = []
        for figure in PAIRED:
            f, digits = row["against"][figure], FIGURES[figure][1]
            if f["difference"] is None:
                cells.append("–")
                continue
            cells.append(
                f"{f['difference']:+.{digits}f} [{f['low']:+.{digits}f}, {f['high']:+.{digits}f}] "
                f"{f['people_better']}/{f['people']}"
            )
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def _mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: dict[str, dict[str, Any]], columns: list[str]) -> str:
    """A markdown table: one row per name, the given figures as columns (+ frames, fit time)."""
    head = ["row", *(FIGURES[c][0] for c in columns), "frames", "fit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, means in rows.items():
        cells = [_cell(means.get(c), FIGURES[c][1]) for c in columns]
        frames = f"{int(means.get('frames') or 0)}"
        fit = _cell(means.get("fit_seconds"), 0)
        lines.append("| " + " | ".join([name, *cells, frames, fit]) + " |")
    return "\n".join(lines)


def per_clip_table(methods: dict[str, dict[str, Scores]], figure: str) -> str:
    """Clips as rows, methods as columns, one figure."""
    names = list(methods)
    clips = list(next(iter(methods.values())))
    title, digits = FIGURES[figure]
    lines = ["| clip | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for clip in clips:
        cells = [_cell(methods[m][clip].means().get(figure), digits) for m in names]
        lines.append(f"| {clip} | " + " | ".join(cells) + " |")
    return f"{title} per clip:\n\n" + "\n".join(lines)


def jsonable(value: Any) -> Any:
    """Strict JSON: NaN/inf -> None, numpy scalars -> Python, floats rounded to 5 digits."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return round(float(value), 5) if math.isfinite(value) else None
    return value
