"""The piecewise-affine warp (facekit/warp.py): exact where it should be, finite where it cannot be,
and on real frames closer to the later frame than the reference it starts from.

Landmarks: the demo driver's frames (the astronaut's dlib landmarks, facekit/assets) at 128 px.
The real-data test needs ../shared/data/faces (marked `data`, skipped when that folder is absent).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import facekit
from facekit import warp_jit
from facekit.crop import resize_points
from facekit.warp import (
    _ANCHORS,
    _SPAN,
    FOREHEAD_HEIGHTS,
    NUM_ANCHORS,
    NUM_CONTROL,
    border_anchors,
    control_points,
    dense_map,
    nearest_reference,
    triangulate,
    warp_image,
)

REPO = Path(__file__).resolve().parent.parent
FACES = REPO.parent / "shared/data/faces"
S = 128


@pytest.fixture(scope="module")
def driver() -> np.ndarray:
    """200 frames of landmarks (200, 68, 2) in a 128 px face crop; frame 0 is a neutral face."""
    points = np.load(Path(facekit.__file__).parent / "assets" / "demo_driver.npz")["points"]
    return resize_points(points, 256, S).astype(np.float64)


@pytest.fixture(scope="module")
def face(driver: np.ndarray) -> np.ndarray:
    return driver[0]


@pytest.fixture(scope="module")
def texture() -> np.ndarray:
    """A smooth random colour texture (S, S, 3) uint8: every region different, no flat areas."""
    noise = np.random.default_rng(0).uniform(0, 255, (S, S, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.0)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255
    return smooth.astype(np.uint8)


def _grid() -> np.ndarray:
    y, x = np.mgrid[0:S, 0:S].astype(np.float64)
    return np.stack([x, y], -1)  # (S, S, 2)


def _interior(source: np.ndarray, target: np.ndarray, margin: int = 2) -> np.ndarray:
    """Target pixels of the triangles with no border-anchor corner, `margin` px in: (S, S) bool.
    Delaunay lets a few anchor triangles reach a little inside the face's hull (at the temples)."""
    triangles = triangulate(control_points(source, S))
    face_only = triangles[(triangles < NUM_CONTROL - NUM_ANCHORS).all(1)]
    mask = np.zeros((S, S), np.uint8)
    for corners in np.round(control_points(target, S)[face_only] * 16).astype(np.int32):
        cv2.fillConvexPoly(mask, corners, 1, cv2.LINE_8, 4)
    return cv2.erode(mask, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)).astype(bool)


def _similarity(degrees: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """2 x 3 forward similarity about the image centre."""
    m = cv2.getRotationMatrix2D(((S - 1) / 2, (S - 1) / 2), degrees, scale)
    m[:, 2] += shift
    return m


def _open_mouth(points: np.ndarray, amount: float) -> np.ndarray:
    """The face with its jaw dropped by `amount` inter-ocular distances (lower lip and chin)."""
    out = points.copy()
    iod = np.linalg.norm(points[42:48].mean(0) - points[36:42].mean(0))
    weight = np.zeros(68)
    weight[4:13] = np.sin(np.pi * np.arange(1, 10) / 10)  # lower jaw, chin (8) most
    weight[[55, 56, 57, 58, 59, 65, 66, 67]] = [0.6, 0.9, 1.0, 0.9, 0.6, 0.9, 1.0, 0.9]  # lower lips
    out[:, 1] += amount * iod * weight
    return out


def _smile(points: np.ndarray, amount: float) -> np.ndarray:
    """The face with its mouth corners pulled out and up by `amount` inter-ocular distances."""
    out = points.copy()
    iod = np.linalg.norm(points[42:48].mean(0) - points[36:42].mean(0))
    for index, side in ((48, -1), (60, -1), (54, 1), (64, 1)):
        out[index] += amount * iod * np.array([side, -0.5])
    return out


def _closed_eyes(points: np.ndarray) -> np.ndarray:
    out = points.copy()
    for upper, lower in ((37, 41), (38, 40), (43, 47), (44, 46)):
        out[upper] = out[lower]
    return out


def test_identity_map_is_the_pixel_grid_and_leaves_the_image_as_it_was(
    face: np.ndarray, texture: np.ndarray
) -> None:
    field = dense_map(face, face, S)
    assert field.shape == (S, S, 2) and field.dtype == np.float32
    np.testing.assert_allclose(field, _grid(), atol=1e-4)
    out = warp_image(texture, face, face)
    assert out.shape == texture.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - texture).max() <= 1


@pytest.mark.parametrize(
    ("degrees", "scale", "shift"), [(0, 1, (5.5, -3.25)), (12, 1.15, (2, 4)), (-8, 0.85, (0, 0))]
)
def test_a_similarity_of_all_landmarks_is_that_similarity_inside_the_face(
    face: np.ndarray, texture: np.ndarray, degrees: float, scale: float, shift: tuple[float, float]
) -> None:
    forward = _similarity(degrees, scale, shift)  # source -> target
    target = face @ forward[:, :2].T + forward[:, 2]
    inside = _interior(face, target)
    assert inside.sum() > 0.2 * S * S  # the face covers a good part of the crop

    inverse = cv2.invertAffineTransform(forward)  # target pixel -> source position
    expected = _grid() @ inverse[:, :2].T + inverse[:, 2]
    field = dense_map(face, target, S)
    assert np.abs(field - expected)[inside].max() < 1e-3

    warped = warp_image(texture, face, target)
    reference = cv2.warpAffine(
        texture, forward, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    error = np.abs(warped.astype(int) - reference)[inside]
    assert error.mean() < 0.5 and error.max() <= 3  # cv2's 1/32 px fixed point on both sides
    assert np.abs(texture.astype(int) - reference)[inside].mean() > 10  # the motion is visible


@pytest.mark.parametrize("motion", [(6.0, 4.0), (-5.0, 8.0)])
def test_border_anchors_stay_put_while_the_face_moves(
    face: np.ndarray, texture: np.ndarray, motion: tuple[float, float]
) -> None:
    moved = face + motion
    anchors = border_anchors(S)
    assert anchors.shape == (NUM_ANCHORS, 2)
    assert {tuple(a) for a in anchors} >= {(-0.5, -0.5), (S - 0.5, -0.5), (-0.5, S - 0.5), (S - 0.5, S - 0.5)}
    assert np.any((anchors == -0.5) | (anchors == S - 0.5), axis=1).all()  # all on the outer edge
    for points in (face, moved):
        np.testing.assert_array_equal(control_points(points, S)[-NUM_ANCHORS:], anchors)

    shift = np.linalg.norm(dense_map(face, moved, S) - _grid(), axis=-1)  # (S, S) pixels
    assert shift[S // 2, S // 2] == pytest.approx(np.hypot(*motion), abs=1e-3)  # the face moves
    edge = np.concatenate([shift[0], shift[-1], shift[:, 0], shift[:, -1]])
    assert edge.max() < 0.5  # half a pixel from the anchors, at most
    out = warp_image(texture, face, moved)
    corners = (slice(None, None, S - 1), slice(None, None, S - 1))
    assert np.abs(out[corners].astype(int) - texture[corners]).max() <= 3


@pytest.mark.parametrize(
    "make_target",
    [
        pytest.param(lambda p: np.c_[S - 1 - p[:, 0], p[:, 1]], id="mirrored"),
        pytest.param(lambda p: np.full_like(p, S / 2), id="collapsed-to-a-point"),
        pytest.param(lambda p: np.c_[p[:, 0], np.full(len(p), S / 2)], id="collapsed-to-a-line"),
        pytest.param(lambda p: np.random.default_rng(1).permutation(p), id="shuffled"),
        pytest.param(lambda p: p[::-1], id="reversed-order"),
        pytest.param(lambda p: p * 1e6, id="far-away"),
        pytest.param(lambda p: p * 1e306, id="near-the-float-limit"),
        pytest.param(lambda p: (p - S / 2) * -3 + S / 2, id="upside-down-and-huge"),
        pytest.param(lambda p: _closed_eyes(_open_mouth(p, 1.5)), id="eyes-shut-jaw-through-the-neck"),
    ],
)
def test_folded_or_degenerate_targets_give_finite_maps_and_images(
    face: np.ndarray, texture: np.ndarray, make_target
) -> None:
    target = make_target(face)
    field = dense_map(face, target, S)
    assert field.shape == (S, S, 2) and np.isfinite(field).all()
    assert field.min() >= -S and field.max() <= 2 * S - 1
    out = warp_image(texture, face, target)
    assert out.shape == texture.shape and out.dtype == np.uint8


@pytest.mark.parametrize("size", [48, 128, 256])
def test_warped_images_are_opencvs_three_channel_remap_byte_for_byte(driver: np.ndarray, size: int) -> None:
    """warp_image remaps through RGBA where that is faster: the bytes must stay the 3-channel remap's."""
    rng = np.random.default_rng(size)
    scale = size / S
    for frame in (1, 57, 123, 199):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        src, dst = driver[0] * scale, driver[frame] * scale
        field = dense_map(src, dst, size)
        expected = cv2.remap(image, field, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)  # type: ignore[call-overload]
        out = warp_image(image, src, dst)
        assert out.shape == (size, size, 3) and out.flags.c_contiguous
        np.testing.assert_array_equal(out, expected)


def test_degenerate_sources_give_finite_maps(face: np.ndarray) -> None:
    for source in (np.full_like(face, 40.0), np.c_[face[:, 0], np.full(68, 50.0)], face * 0, face * -1e306):
        for target in (face, source):
            field = dense_map(source, target, S)
            assert np.isfinite(field).all() and field.min() >= -S and field.max() <= 2 * S - 1


def test_a_fold_is_covered_by_the_unfolded_triangles(face: np.ndarray) -> None:
    """Eyelids pushed past each other fold the eye triangles over. Where a properly oriented
    triangle covers a pixel, its displacement is a blend of its corners', so no pixel moves
    further than the landmarks do (plus half a pixel at shared edges); a folded triangle on top
    would sample far away (13.7 px with the paint order reversed)."""
    target = face.copy()
    for upper, lower in ((37, 41), (38, 40), (43, 47), (44, 46)):
        target[upper], target[lower] = face[lower] + (0, 1), face[upper] - (0, 1)
    shift = np.linalg.norm(dense_map(face, target, S) - _grid(), axis=-1)  # (S, S)
    assert shift.max() <= np.linalg.norm(target - face, axis=-1).max() + 0.5
    below_the_nose = slice(int(face[33, 1]) + 10, S)
    assert shift[below_the_nose].max() < 1e-3  # the mouth and chin stay where they were


def test_bad_inputs_are_rejected_with_the_reason(face: np.ndarray, texture: np.ndarray) -> None:
    with pytest.raises(ValueError, match="NaN"):
        dense_map(face, np.where(np.arange(68)[:, None] == 3, np.nan, face), S)
    with pytest.raises(ValueError, match="shape"):
        dense_map(face[:60], face, S)
    with pytest.raises(ValueError, match="size"):
        dense_map(face, face, 1)
    with pytest.raises(ValueError, match="square uint8"):
        warp_image(texture[:, :100], face, face)
    with pytest.raises(ValueError, match="square uint8"):
        warp_image(texture.astype(np.float32), face, face)


def test_nearest_reference_matches_expression_not_head_pose(face: np.ndarray) -> None:
    refs = np.stack([face, _open_mouth(face, 0.5), _smile(face, 0.25), _closed_eyes(face)])
    pose = _similarity(20, 0.7, (10, -5))

    def posed(points: np.ndarray) -> np.ndarray:
        return points @ pose[:, :2].T + pose[:, 2]

    assert nearest_reference(refs, posed(_open_mouth(face, 0.4))) == 1
    assert nearest_reference(refs, posed(_smile(face, 0.3))) == 2
    assert nearest_reference(refs, posed(_closed_eyes(face))) == 3
    assert nearest_reference(refs, posed(face)) == 0
    # A neutral driver picks the neutral reference, even when the open mouth is in its exact pose.
    assert nearest_reference(np.stack([face, posed(_open_mouth(face, 0.5))]), posed(face)) == 0
    # Ties go to the lowest index.
    assert nearest_reference(np.stack([refs[2], refs[1], refs[1]]), refs[1]) == 1
    with pytest.raises(ValueError, match="ref_points"):
        nearest_reference(face, face)


def test_the_compiled_painter_paints_labels_as_opencv_does_pixel_for_pixel() -> None:
    """facekit/warp_jit.py's port of cv2.fillConvexPoly (LINE_8, 4 fraction bits), on random
    triangles: inside the image, reaching far out of it, tiny, collinear and with repeated
    corners; five per image, later ones painting over earlier ones, as dense_map paints."""
    rng = np.random.default_rng(7)
    for case in range(600):
        size = int(rng.choice([8, 33, 128]))
        spread = float(rng.choice([0.3, 1.0, 4.0, 12.0]))
        corners = np.round(rng.uniform(-spread * size, (1 + spread) * size, (5, 3, 2)) * 16).astype(np.int64)
        if case % 3 == 0:
            corners[0, 2] = corners[0, 1]  # a repeated corner
            corners[1, 2] = (corners[1, 0] + corners[1, 1]) // 2  # collinear
            corners[2] = corners[2, :1] + rng.integers(-20, 20, (3, 2))  # within a pixel or two
        ours = np.full((size, size), 200, np.uint8)
        opencv = ours.copy()
        warp_jit.paint_labels(ours, corners, 4)
        for label, triangle in enumerate(corners.astype(np.int32)):
            cv2.fillConvexPoly(opencv, triangle, label, cv2.LINE_8, 4)
        np.testing.assert_array_equal(ours, opencv, err_msg=f"case {case}: {corners.tolist()}")


def test_the_compiled_control_points_are_the_numpy_ones(driver: np.ndarray) -> None:
    """dense_map's compiled control points (facekit/warp_jit.py, one face) against the numpy ones
    `control_points` gives for any batch: real faces, a degenerate one, one far out of the image."""
    faces = [driver[i] for i in range(0, 200, 13)]
    faces += [np.full((68, 2), 64.0), driver[0] * 40 - 3000]
    for face in faces:
        compiled = np.empty((NUM_CONTROL, 2))
        warp_jit.control(face, S, _SPAN, FOREHEAD_HEIGHTS, _ANCHORS, compiled)
        np.testing.assert_allclose(compiled, control_points(face, S), rtol=0, atol=1e-9)


def test_importing_facekit_warp_does_not_import_torch() -> None:
    code = "import sys, facekit.warp; sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={"PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == 0


@pytest.mark.data
def test_real_frame_warped_onto_a_later_frame_is_closer_to_it() -> None:
    """A talking woman (MEAD w009): frame 0 warped onto the landmarks of frame 25 (1 s later) is
    closer (SSIM) to the real frame 25 than frame 0 itself is."""
    clip = FACES / "dreamtalk_mead_w009.mp4"
    if not clip.is_file():
        pytest.skip(f"test face clip not found at {clip}")
    from skimage.metrics import structural_similarity

    from facekit.crop import crop, crop_box, transform_points
    from facekit.detect import make_detector
    from facekit.video import read_video

    frames, fps = read_video(clip, max_frames=26)
    assert fps == pytest.approx(25.0)
    detector = make_detector("dlib")
    points = [detector.detect(frames[i])[0].points for i in (0, 25)]
    box = crop_box(np.stack(points))  # one box for the clip, as training and the service crop
    first, later = (crop(frames[i], box, S) for i in (0, 25))
    source, target = (transform_points(p, box, S) for p in points)

    def ssim(a: np.ndarray, b: np.ndarray) -> float:
        return float(structural_similarity(a, b, channel_axis=-1, data_range=255))

    unwarped, warped = ssim(first, later), ssim(warp_image(first, source, target), later)
    assert warped > unwarped + 0.03, f"SSIM warped {warped:.3f} vs unwarped {unwarped:.3f}"
