"""The whole portrait moves: paste-back puts the generated crop where the face is, at the photo's
resolution, with no visible seam; the One-Euro filter removes jitter from a still head but keeps
real motion."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.data import astronaut

from facekit.crop import crop_face
from facekit.detect import make_detector
from facekit.pasteback import MAX_SIDE, Portrait, face_mask, paste_back
from facekit.smoothing import OneEuro, OneEuroParams, jitter, smooth_sequence


@pytest.fixture(scope="module")
def photo() -> tuple[np.ndarray, np.ndarray]:
    """The astronaut portrait (512 px) and its landmarks."""
    image = astronaut()
    return image, make_detector("dlib").detect(image)[0].points


def test_paste_back_of_the_photos_own_crop_changes_nothing_visible(photo) -> None:
    image, points = photo
    face, face_points, box = crop_face(image, points, 128)
    portrait = Portrait.from_photo(image, box)
    for region in ("face", "crop"):
        out = paste_back(portrait, face, face_points, region=region)
        assert out.shape == image.shape and out.dtype == np.uint8
        diff = np.abs(out.astype(int) - image)
        x0, y0 = int(box.cx - box.side / 2), int(box.cy - box.side / 2)
        outside = np.ones(image.shape[:2], bool)
        outside[max(y0, 0) : y0 + box.side, max(x0, 0) : x0 + box.side] = False
        assert diff[outside].max() == 0  # the photo outside the face box is untouched
        assert diff.mean() < 2.0  # inside: only the 128 px round trip's blur


def test_paste_back_puts_the_new_face_inside_the_face_only(photo) -> None:
    image, points = photo
    face, face_points, box = crop_face(image, points, 128)
    portrait = Portrait.from_photo(image, box)
    red = face.copy()
    red[face_mask(face_points, 128) > 0.99] = (255, 0, 0)  # a new face; the seam's band as before
    out = paste_back(portrait, red, face_points, region="face").astype(int)
    nose = np.round(points[30]).astype(int)
    assert out[nose[1], nose[0], 0] > 200 and out[nose[1], nose[0], 1] < 120  # the nose is the new face
    corner = (int(box.cx - box.side / 2) + 2, int(box.cy - box.side / 2) + 2)
    assert (
        np.abs(out[corner[1], corner[0]] - image[corner[1], corner[0]]).max() <= 1
    )  # the box's corner is not


def test_colour_is_matched_at_the_seam(photo) -> None:
    image, points = photo
    face, face_points, box = crop_face(image, points, 128)
    portrait = Portrait.from_photo(image, box)
    darker = np.clip(face.astype(int) - 40, 0, 255).astype(np.uint8)  # a generator 40 levels too dark
    out = paste_back(portrait, darker, face_points, region="face").astype(int)
    mask = face_mask(face_points, 128)
    inner = np.argwhere(mask > 0.99)
    y, x = inner[len(inner) // 2]
    scale = box.side / 128
    py, px = int(box.cy - box.side / 2 + (y + 0.5) * scale), int(box.cx - box.side / 2 + (x + 0.5) * scale)
    assert abs(out[py, px].mean() - image[py, px].mean()) < 15  # the 40-level offset is taken out


def test_large_photos_are_pasted_back_at_max_side() -> None:
    image = np.zeros((3000, 2000, 3), np.uint8)
    from facekit.crop import CropBox

    portrait = Portrait.from_photo(image, CropBox(1000.0, 1200.0, 1200))
    assert max(portrait.size) == MAX_SIDE and portrait.size == (683, 1024)
    assert portrait.box.side == 410


def test_one_euro_removes_jitter_of_a_still_head_and_follows_motion() -> None:
    rng = np.random.default_rng(0)
    theta = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    face = np.stack([64 + 30 * np.cos(theta), 64 + 30 * np.sin(theta)], -1)
    still = face + rng.normal(0, 0.8, (100, 68, 2))  # a detector's ~1 px jitter
    smoothed = smooth_sequence(still, fps=25)
    assert jitter(smoothed) < 0.35 * jitter(still)
    # a real move of 20 px within 0.2 s is followed, not smeared over a second
    moving = np.concatenate([np.repeat(face[None], 20, 0), np.repeat(face[None] + 20, 30, 0)])
    out = smooth_sequence(moving, fps=25, params=OneEuroParams(beta=2.0))
    assert np.abs(out[30] - moving[30]).max() < 2.0
    with pytest.raises(ValueError):
        OneEuro().filter(np.zeros((5, 2)), 0.0)
