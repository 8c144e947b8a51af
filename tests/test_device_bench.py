"""`talkinghead bench --device`: the PyTorch generator benchmark (export/speed.py). The CUDA path
(bf16/fp16, channels-last, CUDA graphs) runs where a GPU is; here its CPU path runs end to end, and
`--device cuda` without a GPU must say so and exit cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "talkinghead.cli", "bench", "--out", str(tmp_path / "bench.json"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )


def test_cpu_path_times_every_model_and_counts_flops(tmp_path: Path) -> None:
    done = _bench(
        tmp_path,
        "--device",
        "cpu",
        "--configs",
        "smoke",
        "--device-batches",
        "1",
        "2",
        "--iters",
        "1",
        "--peak-tflops",
        "0.1",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "bench-cpu.json").read_text())
    models = {r["model"]: r for r in report["results"]}
    assert set(models) == {"smoke (random weights)", "talkinghead-small.pt"}
    shipped = models["talkinghead-small.pt"]
    assert 3.0 < shipped["gflops_per_frame"] < 5.0  # the 128 px generator: ~3.85 GFLOPs a frame
    assert [row["batch"] for row in shipped["rows"]] == [1, 2]
    assert all(row["frames_per_s"] > 0 and row["peak_share"] > 0 for row in shipped["rows"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the CUDA path would run for real")
def test_cuda_without_a_gpu_says_so_and_exits_cleanly(tmp_path: Path) -> None:
    done = _bench(tmp_path, "--device", "cuda")
    assert done.returncode == 0
    assert "no CUDA device here" in done.stdout
    assert not list(tmp_path.iterdir())
