"""The watermark bench's bookkeeping: per-attack tallies, the false-positive summary, timings."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from facekit.watermark import detect as search
from facekit.watermark.watermarker import Detection, Watermarker

EULER = 0.5772156649


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255.0**2 / mse) if mse > 0 else math.inf


def _stats(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {f"p{q}": round(float(np.percentile(v, q)), 2) for q in (1, 5, 50)} | {
        "min": round(float(v.min()), 2)
    }


@dataclass
class Tally:
    """Detections of marked frames per attack, plus PSNR of marked vs unmarked and vs the real frame."""

    results: dict[str, list[tuple[bool, bool, float]]] = field(default_factory=dict)
    psnr: list[float] = field(default_factory=list)
    eval_psnr: list[tuple[float, float]] = field(default_factory=list)  # (generated, marked) vs real

    @property
    def frames(self) -> int:
        return len(self.psnr)

    def add(self, attack: str, found: Detection, payload: int | None) -> None:
        read = payload is not None and found.payload == payload
        self.results.setdefault(attack, []).append((found.present, read, found.score))

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {"frames": self.frames}
        for attack, rows in self.results.items():
            present, read, scores = zip(*rows, strict=True)
            entry: dict[str, object] = {"frames": len(rows), "detected": round(float(np.mean(present)), 4)}
            if attack != "other_key":
                entry["payload_read"] = round(float(np.mean(read)), 4)
            out[attack] = entry | {"score": _stats(list(scores))}
        finite = [p for p in self.psnr if math.isfinite(p)]
        out["psnr_marked_vs_unmarked_db"] = {
            "mean": round(float(np.mean(finite)), 2),
            "min": round(min(finite), 2),
        }
        if self.eval_psnr:
            before, after = (np.array(v) for v in zip(*self.eval_psnr, strict=True))
            out["eval_psnr_vs_real_db"] = {
                "unmarked": round(float(before.mean()), 3),
                "marked": round(float(after.mean()), 3),
                "cost": round(float((before - after).mean()), 3),
                "cost_max": round(float((before - after).max()), 3),
            }
        return out


def _gumbel_tail(scores: np.ndarray, threshold: float) -> float:
    """P(score >= threshold) from a Gumbel (maximum of many hypotheses) fitted by moments."""
    beta = float(scores.std()) * math.sqrt(6) / math.pi
    mu = float(scores.mean()) - EULER * beta
    return 1.0 - math.exp(-math.exp(-(threshold - mu) / beta))


def _expected_rate(scores: np.ndarray) -> float:
    """The false-positive rate the decision rule implies under the fitted score tail."""
    high = _gumbel_tail(scores, search.THRESHOLD)
    return high + (_gumbel_tail(scores, search.THRESHOLD_WITH_PAYLOAD) - high) * search.CRC_PASS


def null_summary(nulls: dict[str, list[tuple[float, bool]]], *, other: dict[str, Tally]) -> dict[str, object]:
    """Per set of unmarked frames and over all: false positives, score tail, margin to THRESHOLD."""
    out: dict[str, object] = {}
    everything = [row for rows in nulls.values() for row in rows]
    for name, rows in [*sorted(nulls.items()), ("all", everything)]:
        scores = np.array([score for score, _ in rows], np.float64)
        positives = sum(present for _, present in rows)
        out[name] = {
            "frames": len(rows),
            "false_positives": positives,
            "rate": round(positives / len(rows), 5),
            "max_score": round(float(scores.max()), 2),
            "p99_score": round(float(np.percentile(scores, 99)), 2),
            "mean_score": round(float(scores.mean()), 2),
            "above_threshold_with_payload": int((scores >= search.THRESHOLD_WITH_PAYLOAD).sum()),
            "margin_to_threshold": round(search.THRESHOLD - float(scores.max()), 2),
            "gumbel_expected_rate": float(f"{_expected_rate(scores):.2e}"),
        }
    wrong = [row for tally in other.values() for row in tally.results.get("other_key", [])]
    out["other_key_on_marked"] = {
        "frames": len(wrong),
        "false_positives": sum(1 for present, _, _ in wrong if present),
        "max_score": round(max((s for _, _, s in wrong), default=0.0), 2),
    }
    return out


def _cpu_ms(call: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median CPU and wall milliseconds per call (CPU time: other jobs on the machine inflate wall)."""
    call()
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        call()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return {"cpu": round(float(np.median(cpu)) * 1e3, 3), "wall": round(float(np.median(wall)) * 1e3, 3)}


def timing(wm: Watermarker, portrait: np.ndarray) -> dict[str, object]:
    """ms per frame at 128/256/1024 px (a portrait resized): mark (pattern cached, as a stream sees
    it), pattern build (once per stream and size), detect (unmarked: the full search; marked: the
    uncropped hypothesis ends it). Run with cv2.setNumThreads(1): one core's cost."""
    out: dict[str, object] = {}
    for side in (128, 256, 1024):
        frame = cv2.resize(portrait, (side, side), interpolation=cv2.INTER_AREA)
        marked = wm.mark(frame, 7)
        fresh = iter(range(1000, 2000))  # a new payload each call: the pattern is built, not cached
        out[str(side)] = {
            "mark": _cpu_ms(functools.partial(wm.mark, frame, 7), 300 if side < 1024 else 40),
            "pattern_build": _cpu_ms(lambda: wm.pattern(next(fresh), (side, side)), 20),  # noqa: B023
            "detect_unmarked": _cpu_ms(functools.partial(wm.detect, frame), 5),
            "detect_marked": _cpu_ms(functools.partial(wm.detect, marked), 5),
        }
    return out
