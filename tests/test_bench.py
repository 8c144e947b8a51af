"""`talkinghead bench` end to end in miniature: it picks the engine the service would, times every
engine this machine has, reports GFLOPs and the share of the CPU's peak, and drives a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from facekit import engines
from tests.service_fixtures import *  # noqa: F403

REPO = Path(__file__).resolve().parents[1]


def test_bench_reports_engines_and_peak_share(model_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--model-repository", str(model_repository), "--out", str(out)]
    argv += ["--batches", "1", "2", "--streams", "1", "--seconds", "2", "--raw-seconds", "0.3"]
    argv += ["--closed-loop-frames", "5"]
    done = subprocess.run(
        [sys.executable, "-m", "talkinghead.cli", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["engine"] in engines.ENGINES
    assert "generator engine:" in done.stdout
    assert set(report["engines"]) == set(engines.available())
    gflops = float(report["model"]["gflops_per_frame"])
    assert 1.0 < gflops < 10.0  # the shipped generator: 3.85
    for name, entry in report["engines"].items():
        assert entry["allowed"] == (
            name in engines.candidates(Path(report["model_path"]), report["model"]["model_id"])
        )
        for row in entry["rows"]:
            assert row["fps"] > 0
            assert row["gflops_per_s"] == round(row["fps"] * gflops, 1)
            assert 0 < row["fp32_peak_share"] < 2
    assert report["cpu_peak"]["fp32_gflops"] > 0
    (live,) = report["live"]
    assert live["admitted"] == 1 and live["achieved_fps"] > 0
