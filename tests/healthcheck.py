"""The image's gRPC health probe (deploy/docker/healthcheck.py) run as the chart's exec probes run
it: exit 0 SERVING, 1 not (or no answer), 2 a usage error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "docker" / "healthcheck.py"


def healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
