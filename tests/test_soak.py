"""`make soak` in small (marker slow): tools/soak.py with 8 live streams for 30 s against a real
`talkinghead serve` passes its checks (server RSS growth after warm-up < 5 %, every stream OK,
frames lost only by the drop policy, every slot released) and writes its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import REPO

pytestmark = pytest.mark.slow


def test_a_short_soak_passes(model_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = ["--streams", "8", "--duration", "30", "--warmup", "10", "--sample", "2"]
    argv += ["--model-repository", str(model_repository), "--out", str(out)]
    run = subprocess.run(
        [sys.executable, "tools/soak.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert out.exists(), run.stdout[-2000:] + run.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert run.returncode == 0 and figures["passed"], json.dumps(figures["checks"], indent=1)
    assert figures["checks"]["slots"]["streams_ended"] == 8
    assert figures["throughput"]["frames_per_second_delivered"] > 0
    assert len(figures["samples"]) >= 10
