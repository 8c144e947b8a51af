"""Figures of the evaluation suite: per-frame scores, their per-clip and pooled means, and the
markdown table and contact sheets a person reads.

Pooled figures are means over every scored frame of every clip (NaN-aware: NME and identity only
over frames where dlib found a face, which `face_found` reports). JSON holds plain numbers only;
NaN becomes null.
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
