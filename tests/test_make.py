"""What `make` does before it installs anything: a venv that cannot fit on the disk is refused at
once, saying what it needs and what is free, instead of pip failing minutes in ("[Errno 28] No space
left on device") with a half-installed venv left behind (tools/need_disk.py); a test run without
room for its temporary files stops before its first test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def need_disk(*args: str) -> subprocess.CompletedProcess[str]:
    """tools/need_disk.py run as make runs it: GIB PATH WHAT."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "need_disk.py"), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def make(target: str, *settings: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`make -s target SETTING=...` in the checkout, with this interpreter as the system Python."""
    return subprocess.run(
        ["make", "-s", target, *settings, f"PYTHON={sys.executable}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("target", "venv_var", "gib_var", "what"),
    [
        ("venv", "VENV", "VENV_GIB", "PyTorch"),
        ("triton-venv", "TRITON_VENV", "TRITON_VENV_GIB", "the bundled Triton"),
    ],
)
def test_a_venv_that_cannot_fit_is_refused_before_it_is_made(
    tmp_path: Path, target: str, venv_var: str, gib_var: str, what: str
) -> None:
    venv = tmp_path / "venv"
    done = make(target, f"{venv_var}={venv}", f"{gib_var}=1000000")
    assert done.returncode != 0
    assert f"{venv} ({what}" in done.stderr
    assert "needs about 1e+06 GiB of free disk" in done.stderr
    assert f"{tmp_path} has " in done.stderr and " GiB free" in done.stderr
    assert not venv.exists()


def test_the_check_passes_where_there_is_room(tmp_path: Path) -> None:
    done = need_disk("0.001", str(tmp_path / "a" / "b"), "x")
    assert done.returncode == 0 and done.stderr == ""


def test_a_requirement_that_is_not_a_size_is_refused(tmp_path: Path) -> None:
    for bad in ("3GB", "-1", "nan"):
        done = need_disk(bad, str(tmp_path), "x")
        assert done.returncode == 2
        assert f"GIB must be a number of GiB, 0 or more, got {bad!r}" in done.stderr


def test_a_test_run_without_room_for_its_temporary_files_stops_before_the_first_test(tmp_path: Path) -> None:
    def check(gib: str) -> subprocess.CompletedProcess[str]:
        return make("test-disk", f"TEST_GIB={gib}", env={**os.environ, "TMPDIR": str(tmp_path)})

    short = check("1000000")
    assert short.returncode != 0
    assert "make test (its temporary files" in short.stderr
    assert f"{tmp_path} has " in short.stderr and "point TMPDIR at a disk with room" in short.stderr
    skipped = check("0")
    assert skipped.returncode == 0 and skipped.stderr == ""
