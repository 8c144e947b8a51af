"""Reading a Triton-layout model repository from disk: `<repo>/<model>/<version>/model.onnx`."""

from __future__ import annotations

from pathlib import Path

from facekit.contract import PERSONALISED_PREFIX


def latest_version(model_dir: Path, filename: str = "model.onnx") -> Path | None:
    """`<model_dir>/<highest numeric version>/<filename>`, or None when there is none."""
    if not model_dir.is_dir():
        return None
    versions = sorted(
        (int(p.name), p) for p in model_dir.iterdir() if p.name.isdigit() and (p / filename).is_file()
    )
    return versions[-1][1] / filename if versions else None


def personalised_ids(repository: Path) -> list[str]:
    """Avatar ids that have a personalised generator in `repository`."""
    if not repository.is_dir():
        return []
    return sorted(
        p.name[len(PERSONALISED_PREFIX) :]
        for p in repository.iterdir()
        if p.name.startswith(PERSONALISED_PREFIX) and latest_version(p) is not None
    )
