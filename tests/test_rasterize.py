"""The landmark rasterizer is a training/serving contract: golden images pin it pixel for pixel.

If a golden test fails, the drawing changed and every trained checkpoint is invalid. Regenerate the
PNGs only together with a retrained model (see tests/golden/README.md).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facekit.layout import GROUPS
from facekit.rasterize import DrawStyle, draw_batch, draw_landmarks

GOLDEN = Path(__file__).parent / "golden"
POINTS = np.load(GOLDEN / "points_256.npy")  # the astronaut's face (skimage.data), 256 px crop


@pytest.mark.parametrize(("size", "width", "aa"), [(256, 2, True), (128, 1, True), (128, 1, False)])
def test_golden(size: int, width: int, aa: bool) -> None:
    got = draw_landmarks(POINTS * size / 256, size, DrawStyle(line_width=width, antialias=aa))
    want = np.asarray(Image.open(GOLDEN / f"landmarks_{size}_w{width}_{'aa' if aa else 'noaa'}.png"))
    assert got.dtype == np.uint8 and got.shape == (size, size, 3)
    assert np.array_equal(got, want), f"{np.count_nonzero((got != want).any(-1))} pixels differ"


def test_every_group_is_drawn_in_its_own_colour() -> None:
    img = draw_landmarks(POINTS, 256, DrawStyle(line_width=2, antialias=False))
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    for group in GROUPS:
        assert group.color in colours, group.name
    assert len({g.color for g in GROUPS}) == len(GROUPS)


def test_antialiasing_and_width_change_the_drawing() -> None:
    thin = draw_landmarks(POINTS, 256, DrawStyle(line_width=1, antialias=True))
    thick = draw_landmarks(POINTS, 256, DrawStyle(line_width=3, antialias=True))
    hard = draw_landmarks(POINTS, 256, DrawStyle(line_width=1, antialias=False))
    assert np.count_nonzero(thick.any(-1)) > 1.5 * np.count_nonzero(thin.any(-1))
    assert len(np.unique(thin)) > len(np.unique(hard))  # blended edge values only with anti-aliasing


def test_batch_matches_single() -> None:
    batch = draw_batch(np.stack([POINTS, POINTS + 3]), 256)
    assert np.array_equal(batch[0], draw_landmarks(POINTS, 256))


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (np.zeros((67, 2)), "shape"),
        (np.full((68, 2), np.nan), "NaN"),
        (np.full((68, 2), np.inf), "infinite"),
        (np.array([["a", "b"]] * 68), "numeric"),
    ],
)
def test_bad_points_are_rejected_with_a_reason(points: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        draw_landmarks(points, 64)


def test_points_far_outside_the_frame_do_not_crash() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns when a cast to int32 overflows
        img = draw_landmarks(POINTS * 1e6, 64)
    assert img.shape == (64, 64, 3)


@pytest.mark.parametrize("far", [1e12, -1e12])
def test_a_far_off_point_draws_its_line_toward_where_it_lies(far: float) -> None:
    """A point beyond int32 once scaled to fixed point draws as one at the clipping bound on its
    own side, not a line across the frame the other way."""
    size = 64
    bound = 9 * size if far > 0 else -8 * size
    face = POINTS * (size / 256)  # in the frame: the point's line shows
    far_off, at_bound = face.copy(), face.copy()
    far_off[0, 0], at_bound[0, 0] = far, bound
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drawn = draw_landmarks(far_off, size)
    np.testing.assert_array_equal(drawn, draw_landmarks(at_bound, size))
