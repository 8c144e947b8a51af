"""Face crops: the box follows the landmarks, and a point lands on the crop pixel showing it."""

from __future__ import annotations

import numpy as np
import pytest

from facekit.crop import CropBox, crop, crop_box, resize_points, transform_points, untransform_points


def _face(cx: float = 100.0, cy: float = 80.0, w: float = 40.0, h: float = 50.0) -> np.ndarray:
    """A (68, 2) point set whose bounding box is centred at (cx, cy), w x h."""
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.5, 0.5, (68, 2)) * (w, h)
    pts[0], pts[1] = (-w / 2, -h / 2), (w / 2, h / 2)
    return (pts + np.array([cx, cy])).astype(np.float32)


def _blob(shape: tuple[int, int], x: float, y: float, sigma: float = 3.0) -> np.ndarray:
    """uint8 (H, W, 3) image with a Gaussian spot centred at sub-pixel (x, y)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    spot = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.repeat((spot * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def _centroid(image: np.ndarray) -> np.ndarray:
    """Intensity-weighted (x, y) of channel 0."""
    weights = image[..., 0].astype(np.float64)
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    return np.array([(xx * weights).sum(), (yy * weights).sum()]) / weights.sum()


def test_box_is_centred_and_scaled_on_the_landmarks() -> None:
    box = crop_box(_face(), scale=2.0)
    assert box.side == 100  # 2 x max(40, 50)
    assert (box.cx, box.cy) == (100.0, 80.0)
    assert (box.cx - box.side / 2).is_integer() and (box.cy - box.side / 2).is_integer()


def test_clip_box_uses_the_median_so_one_bad_frame_does_not_move_it() -> None:
    frames = np.stack([_face(), _face(), _face(cx=300.0, w=200.0), _face(), _face()])  # (5, 68, 2)
    assert crop_box(frames, scale=2.0) == crop_box(_face(), scale=2.0)


def test_shift_y_moves_the_box_up() -> None:
    assert crop_box(_face(), 2.0, shift_y=-0.1).cy == crop_box(_face(), 2.0).cy - 10


def test_bad_landmarks_are_rejected() -> None:
    with pytest.raises(ValueError, match="68, 2"):
        crop_box(np.zeros((5, 2)))


@pytest.mark.parametrize("size", [64, 100, 160])  # shrink (INTER_AREA), same, enlarge
@pytest.mark.parametrize("x, y", [(100.3, 80.7), (71.0, 60.0), (128.6, 101.2)])
def test_a_point_lands_on_the_crop_pixel_that_shows_it(size: int, x: float, y: float) -> None:
    image = _blob((160, 200), x, y)
    box = crop_box(_face(), scale=2.0)
    crop_image = crop(image, box, size)
    assert crop_image.shape == (size, size, 3) and crop_image.dtype == np.uint8
    expected = transform_points(np.array([x, y]), box, size)
    assert np.abs(_centroid(crop_image) - expected).max() < 0.05


def test_same_size_crop_is_exact_slicing() -> None:
    image = np.random.default_rng(1).integers(0, 256, (120, 150, 3), dtype=np.uint8)
    box = CropBox(cx=70.0, cy=60.0, side=40)
    assert np.array_equal(crop(image, box, 40), image[40:80, 50:90])
    assert np.allclose(transform_points(np.array([[50.0, 40.0], [89.0, 79.0]]), box, 40), [[0, 0], [39, 39]])


def test_outside_the_image_is_black() -> None:
    image = np.full((50, 50, 3), 200, np.uint8)
    out = crop(image, CropBox(cx=0.0, cy=25.0, side=50), 50)  # left half of the box is off the image
    assert not out[:, :25].any() and (out[:, 25:] == 200).all()
    assert not crop(image, CropBox(cx=500.0, cy=500.0, side=20), 10).any()  # wholly outside


def test_untransform_inverts_transform() -> None:
    pts = _face()
    box = crop_box(pts, 1.8)
    back = untransform_points(transform_points(pts, box, 256), box, 256)
    assert np.allclose(back, pts, atol=1e-4)


def test_resize_points_matches_a_resized_image() -> None:
    import cv2

    image = _blob((128, 128), 40.4, 90.2)
    small = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)
    expected = resize_points(np.array([40.4, 90.2]), 128, 64)
    assert np.abs(_centroid(small) - expected).max() < 0.05
