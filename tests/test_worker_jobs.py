"""The personalisation worker's life around a job: a job directory or Redis that fails to take its
end, a graceful stop in the middle of fine-tuning, the time-left estimate it feeds, a cancel
that comes after the last progress write, and the temp folders of killed exports. Real worker
processes (`talkinghead worker`), a real tmpfs and a real Redis where the behaviour depends on
them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.service_fixtures import REPO


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


# -- 4. a worker killed while exporting -----------------------------------------------------------------


def test_export_folders_of_killed_workers_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    """A worker killed while exporting left its temp folder (5.6 MB of ONNX for the small model,
    ~150 MB for the paper's) for good, one more each time the embedded worker was restarted. A
    worker starting now removes those whose owner is gone (a real process, killed), and leaves
    one a live worker is exporting into."""
    from worker import models

    code = (
        "import sys, time, tempfile\n"
        f"tempfile.tempdir = {str(tmp_path)!r}\n"
        "from worker.models import export_folder\n"
        "with export_folder() as tmp:\n"
        "    (tmp / 'generator_x.onnx').write_bytes(bytes(1000)); print(tmp, flush=True); time.sleep(600)\n"
    )
    owners = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        killed, live = (Path(p.stdout.readline().strip()) for p in owners)  # type: ignore[union-attr]
        owners[0].kill()
        owners[0].wait()
        assert killed.is_dir() and live.is_dir()
        assert models.sweep_exports(tmp_path) == [killed]
        assert not killed.exists() and (live / "generator_x.onnx").exists()
    finally:
        for owner in owners:
            _stop(owner)  # type: ignore[arg-type]
    assert models.sweep_exports(tmp_path) == [live]
