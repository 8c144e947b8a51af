"""Regenerate the demo's inputs in facekit/assets/: a portrait and a talking landmark driver.

    python tools/make_demo_assets.py            # writes facekit/assets/demo_portrait.png, demo_driver.npz
    python tools/make_demo_assets.py --check    # exits 1 if the files on disk differ from a fresh run

The portrait is scikit-image's `astronaut()` (Eileen Collins, NASA, public domain). The driver is
`facekit.motion.synthetic_talking` applied to the astronaut's own 68 landmarks (found by dlib's
iBUG 300-W shape predictor from the face_recognition_models package, via facekit.detect), moved
into a 256 x 256 frame by the face-centred crop of facekit.crop. Reproducible: the same packages
give byte-identical files. Needs scikit-image (the `train` extra), dlib and face_recognition_models.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from facekit.crop import crop_box, transform_points
from facekit.detect import largest_face, make_detector
from facekit.motion import synthetic_talking
from facekit.sequence import LandmarkSequence
from facekit.video import save_png

ASSETS = Path(__file__).resolve().parent.parent / "facekit" / "assets"
FRAME = 256  # driver frame size, the generator's input size
CROP_SCALE = 1.8  # crop side / landmarks' extent (facekit.crop.crop_box's default)
SECONDS, FPS, SEED = 8.0, 25.0, 0


def astronaut() -> np.ndarray:
    """The portrait: uint8 (512, 512, 3) RGB."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def write_assets(folder: Path) -> list[Path]:
    portrait = astronaut()
    points = largest_face(make_detector("dlib"), portrait, "skimage.data.astronaut()").points  # (68, 2)
    neutral = transform_points(points, crop_box(points, CROP_SCALE), FRAME)  # face-centred, like the crops
    driver = synthetic_talking(neutral, frames=round(SECONDS * FPS), fps=FPS, seed=SEED)
    paths = [folder / "demo_portrait.png", folder / "demo_driver.npz"]
    save_png(paths[0], portrait)
    LandmarkSequence(driver, (FRAME, FRAME), FPS).save(paths[1])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare a fresh run with the files on disk")
    args = parser.parse_args(argv)
    if not args.check:
        ASSETS.mkdir(parents=True, exist_ok=True)
        for path in write_assets(ASSETS):
            print(f"wrote {path} ({path.stat().st_size:,} bytes)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = write_assets(Path(tmp))
        stale = [
            p.name
            for p in fresh
            if not (ASSETS / p.name).is_file() or p.read_bytes() != (ASSETS / p.name).read_bytes()
        ]
    if stale:
        print(f"stale in {ASSETS}: {stale}; rerun tools/make_demo_assets.py", file=sys.stderr)
        return 1
    print(f"{ASSETS}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
