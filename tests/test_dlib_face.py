"""dlib's face-recognition ResNet in torch (training.dlib_face, training.dlib_align) against dlib itself.

Real faces: the 17 photos/paintings of ../shared/data/faces and 2 frames of each of 4 clips there
(tests marked `data`, skipped with the reason when that folder is absent); landmarks from dlib's HOG
detector and 68-point predictor, as training.metrics uses them. Measured on 2 CPU cores: (a) max
|torch - dlib| 3.4e-7 on dlib's own chips; (b) chips from `chips()` give descriptors within 0.010
(Euclidean) of dlib's compute_face_descriptor(img, shape), 0.0009 with quantize=True, where two
frames of one person here are 0.20-0.38 apart and two people 0.68-0.99.
"""

from __future__ import annotations

import copy
import glob
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training.dlib_align import chip_geometry, pyramid_levels
from training.dlib_dat import DlibFormatError
from training.dlib_face import CHIP, LEVEL_SHAPES, DlibFaceNet, chips, default_model_path, face_chip_theta

FACES = Path(__file__).resolve().parents[2] / "shared/data/faces"
CLIPS = ["lp_d3", "sadtalker_katiehill", "dpe_s", "dreamtalk_mead_w009"]  # 2 x 512 px, 2 x 256 px
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason=f"test face images not found at {FACES}")


@pytest.fixture(scope="module")
def net() -> DlibFaceNet:
    return DlibFaceNet()


def _load_faces() -> list[dict[str, Any]]:
    from PIL import Image

    from facekit.video import read_video
    from training.metrics import _face_models

    images = {Path(p).name: np.asarray(Image.open(p).convert("RGB")) for p in _face_files()}
    for clip in CLIPS:
        frames, _ = read_video(FACES / f"{clip}.mp4", max_frames=2, every=40)  # frames 0 and 40
        images |= {f"{clip}.mp4#{40 * i}": frame for i, frame in enumerate(frames)}
    detector, predictor, _ = _face_models()
    faces = []
    for name, image in images.items():
        rects = detector(image, 0) or detector(image, 1)
        assert rects, f"no face found in {name}"
        shape = predictor(image, max(rects, key=lambda r: r.area()))
        points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)  # (68, 2)
        faces.append({"name": name, "image": image, "shape": shape, "points": points})
    return faces


def _face_files() -> list[str]:
    return sorted(glob.glob(str(FACES / "*photo*")) + glob.glob(str(FACES / "*painting*")))


@pytest.fixture(scope="module")
def faces() -> list[dict[str, Any]]:
    if not FACES.is_dir():
        pytest.skip(f"test face images not found at {FACES}")
    return _load_faces()


@pytest.fixture(scope="module")
def recognizer() -> Any:
    from training.metrics import _face_models

    return _face_models()[2]


def _tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_model_file_parses_into_a_frozen_network(net: DlibFaceNet, tmp_path: Path) -> None:
    assert sum(p.numel() for p in net.parameters()) == 5_614_592
    assert not any(p.requires_grad for p in net.parameters())
    assert not net.train().training
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(default_model_path().read_bytes()[:1_000_000])
    with pytest.raises(DlibFormatError, match="end of data"):
        DlibFaceNet(path=truncated)


def test_features_have_the_documented_shapes(net: DlibFaceNet) -> None:
    x = torch.rand(2, 3, CHIP, CHIP) * 2 - 1
    descriptor, activations = net.features(x)
    assert descriptor.shape == (2, 128)
    assert [tuple(a.shape[1:]) for a in activations] == LEVEL_SHAPES
    assert all(a.shape[0] == 2 and a.min() >= 0 for a in activations)  # after a ReLU
    torch.testing.assert_close(net(x), descriptor)


@pytest.mark.data
@needs_faces
def test_descriptor_of_dlib_chips_equals_dlib(net: DlibFaceNet, faces: list, recognizer: Any) -> None:
    import dlib

    dlib_chips = [dlib.get_face_chip(f["image"], f["shape"], size=CHIP, padding=0.25) for f in faces]
    expected = np.array([recognizer.compute_face_descriptor(chip) for chip in dlib_chips])
    with torch.no_grad():
        ours = net(torch.cat([_tensor(chip) for chip in dlib_chips])).numpy()
    assert np.abs(ours - expected).max() < 1e-5  # measured 3.4e-7


@pytest.mark.data
@needs_faces
def test_chip_geometry_equals_get_face_chip_details(faces: list) -> None:
    import dlib

    points = torch.from_numpy(np.stack([f["points"] for f in faces])).double()
    centre, step = chip_geometry(points, size=CHIP, padding=0.25)
    for f, c, s in zip(faces, centre.numpy(), step.numpy(), strict=True):
        details = dlib.get_face_chip_details(f["shape"], CHIP, 0.25)
        rect = details.rect
        assert c == pytest.approx(
            [(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2], abs=1e-6
        )
        assert np.hypot(*s[:, 0]) * (CHIP - 1) + 1 == pytest.approx(rect.width(), abs=1e-6)
        assert np.arctan2(s[1, 0], s[0, 0]) == pytest.approx(details.angle, abs=1e-9)
    h, w = faces[0]["image"].shape[:2]
    theta = face_chip_theta(points[:1], (h, w))[0].numpy()  # chip centre -> image point `centre`
    assert theta[:, 2] == pytest.approx((2 * centre[0].numpy() + 1) / [w, h] - 1, abs=1e-9)


@pytest.mark.data
@needs_faces
def test_aligned_chips_give_dlibs_descriptor(net: DlibFaceNet, faces: list, recognizer: Any) -> None:
    import dlib

    float_chips, exact_chips, levels = [], [], []
    for f in faces:
        image, points = _tensor(f["image"]), torch.from_numpy(f["points"])[None]
        float_chips.append(chips(image, points))
        exact_chips.append(chips(image, points, quantize=True))
        levels += pyramid_levels(chip_geometry(points, size=CHIP, padding=0.25)[1])
        reference = dlib.get_face_chip(f["image"], f["shape"], size=CHIP, padding=0.25).astype(np.float32)
        diff = np.abs((exact_chips[-1][0].permute(1, 2, 0).numpy() + 1) * 127.5 - reference)
        assert diff.max() <= 1.01 and (diff > 0.5).mean() < 0.01, f["name"]  # a few off-by-one levels
    assert set(levels) == {0, 1}  # both of dlib's paths ran: full resolution and one pyramid level
    expected = np.array([recognizer.compute_face_descriptor(f["image"], f["shape"]) for f in faces])
    with torch.no_grad():
        ours = net(torch.cat(float_chips + exact_chips)).numpy().reshape(2, len(faces), 128)
    distance = np.linalg.norm(ours - expected, axis=2)  # (2, faces)
    assert distance[0].max() < 0.02  # measured 0.0101
    assert distance[1].max() < 0.002  # measured 0.0009


@pytest.mark.data
@needs_faces
def test_gradients_reach_the_image_and_the_landmarks(net: DlibFaceNet, faces: list) -> None:
    f = next(f for f in faces if f["name"] == "lp_d3.mp4#0")  # 512 px frame, chip from pyramid level 1
    image = _tensor(f["image"]).requires_grad_()
    points = torch.from_numpy(f["points"])[None].requires_grad_()
    net(chips(image, points)).square().sum().backward()
    assert image.grad is not None and points.grad is not None
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert torch.isfinite(points.grad).all() and points.grad.abs().sum() > 0
    centre, step = chip_geometry(points.detach(), size=CHIP, padding=0.25)
    assert pyramid_levels(step) == [1]
    signs = torch.tensor([[-1.0, -1], [-1, 1], [1, -1], [1, 1]], dtype=torch.float64)
    corners = centre + signs * (CHIP - 1) / 2 @ step[0].T  # (4, 2) the chip's corner pixels in the image
    xy = image.grad.abs().sum(1)[0].nonzero().flip(1).double()  # pixels with a gradient: dlib's crop only
    assert (xy >= corners.min(0).values - 6).all() and (xy <= corners.max(0).values + 6).all()

    net64 = copy.deepcopy(net).double()  # autograd against central differences, in float64
    x0, p0 = image.detach().double(), points.detach().double()
    generator = torch.Generator().manual_seed(0)
    dx, dp = (torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in (x0, p0))
    x, p = x0.clone().requires_grad_(), p0.clone().requires_grad_()
    grad_x, grad_p = torch.autograd.grad(net64(chips(x, p)).square().sum(), (x, p))
    h = 1e-7  # the network is piecewise linear: a larger step crosses ReLU kinks
    with torch.no_grad():
        for (ahead, behind), grad, direction in (
            (((x0 + h * dx, p0), (x0 - h * dx, p0)), grad_x, dx),
            (((x0, p0 + h * dp), (x0, p0 - h * dp)), grad_p, dp),
        ):
            change = net64(chips(*ahead)).square().sum() - net64(chips(*behind)).square().sum()
            assert change.item() / (2 * h) == pytest.approx((grad * direction).sum().item(), rel=1e-3)
