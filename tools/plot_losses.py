"""Plot a run's loss curves (<run>/metrics.jsonl) into a PNG for the model card, without matplotlib.

example:
  python tools/plot_losses.py runs/small/metrics.jsonl models/loss_curves.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np

PANELS = (
    ("cnt_vgg19", "cnt_pixel", "g_total"),
    ("cnt_face", "id_face", "cnt_region"),
    ("adv", "fm", "l1_vs_warp"),
    ("d_real", "d_fake", "d_total"),
    ("cnt_ssim", "ssim_vs_warp", "sec_per_step"),
)
COLOURS = ((230, 80, 40), (40, 140, 230), (60, 170, 60))


def smooth(values: np.ndarray, window: int = 10) -> np.ndarray:
    if len(values) < window:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def panel(rows: list[dict[str, float]], keys: tuple[str, ...], w: int = 360, h: int = 200) -> np.ndarray:
    img = np.full((h, w, 3), 255, np.uint8)
    series = {k: smooth(np.array([r[k] for r in rows if k in r], float)) for k in keys}
    series = {k: v for k, v in series.items() if len(v)}
    steps = np.array([r["step"] for r in rows], float)
    if not series:
        cv2.putText(img, f"{', '.join(keys)}: not logged", (10, h // 2), 0, 0.45, (0, 0, 0), 1)
        return img
    # x is the step: a term logged only in part of the run (a resumed run's new term) sits there
    first, last = float(steps[0]), max(float(steps[-1]), float(steps[0]) + 1)
    lo = min(float(v.min()) for v in series.values())
    hi = max(float(v.max()) for v in series.values())
    hi = hi if hi > lo else lo + 1
    x0, y0, x1, y1 = 50, 20, w - 10, h - 30
    cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
    for (k, v), colour in zip(series.items(), COLOURS, strict=False):
        at = np.array([r["step"] for r in rows if k in r], float)[-len(v) :]  # each window's last step
        xs = x0 + (at - first) / (last - first) * (x1 - x0)
        ys = y1 - (v - lo) / (hi - lo) * (y1 - y0)
        cv2.polylines(img, [np.stack([xs, ys], 1).astype(np.int32)], False, colour[::-1], 1, cv2.LINE_AA)
        cv2.putText(img, k, (x0 + 5 + 120 * list(series).index(k), y0 - 5), 0, 0.45, colour[::-1], 1)
    for val, y in ((hi, y0), (lo, y1)):
        cv2.putText(img, f"{val:.3g}", (2, y + 4), 0, 0.38, (0, 0, 0), 1)
    cv2.putText(img, f"step {int(steps[0])}..{int(steps[-1])}", (x0, h - 10), 0, 0.4, (0, 0, 0), 1)
    return img


def main(src: str, dst: str) -> None:
    rows = [json.loads(line) for line in Path(src).read_text().splitlines() if line.strip()]
    grid = [[panel(rows, (key,)) for key in keys] for keys in PANELS]  # one term per panel, own scale
    img = np.concatenate([np.concatenate(row, axis=1) for row in grid], axis=0)
    cv2.imwrite(dst, img[..., ::-1])
    print(f"wrote {dst} from {len(rows)} logged steps")


if __name__ == "__main__":
    main(*sys.argv[1:3])
