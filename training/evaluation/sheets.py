"""Contact sheets of the evaluation suite: what a person looks at to judge the numbers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from facekit.video import contact_sheet, save_png

COLUMNS = 6  # driving frames shown per row


def _picks(n: int, k: int = COLUMNS) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))


def _wrapped(name: str, width: int = 14) -> str:
    """A clip or still name in lines of at most `width` characters, broken after a '_' where one
    is (it was cut at `width`: two clips of one source looked the same)."""
    lines = [""]
    for piece in re.findall(r"[^_]*_|[^_]+", name):
        for start in range(0, len(piece), width):
            chunk = piece[start : start + width]
            if lines[-1] and len(lines[-1]) + len(chunk) > width:
                lines.append("")
            lines[-1] += chunk
    return "\n".join(lines)


def save_contact_sheet(path: Path, samples: dict[str, dict[str, Any]], cell: int) -> None:
    """Per clip: the real driving frames, then each method's frames for them; the first column
    is the first reference frame (of the largest T)."""
    rows, labels = [], []
    for clip, made in samples.items():
        picks = _picks(len(made["real"]))
        for name, frames in made.items():
            if name == "reference":
                continue
            first = made["reference"] if name == "real" else np.zeros_like(made["reference"])
            rows.append([first, *(frames[i] for i in picks)])
            labels.append(_wrapped(clip) + f"\n{name}" if name == "real" else name)
    save_png(path, contact_sheet(rows, labels=labels, cell=cell))


def save_stills_sheet(
    path: Path, stills: list[tuple[str, np.ndarray, dict[str, np.ndarray]]], driver: np.ndarray, cell: int
) -> None:
    """First row: the driver's frames; then per still: the still, then each method's frames."""
    picks = _picks(len(driver), 4)
    methods = list(stills[0][2]) if stills else []
    rows = [[np.zeros_like(driver[0]), *(driver[i] for _ in methods for i in picks)]]
    labels = ["driver"]
    for name, still, made in stills:
        rows.append([still, *(made[m][i] for m in methods for i in picks)])
        labels.append(_wrapped(name))
    save_png(path, contact_sheet(rows, labels=labels, cell=cell))
