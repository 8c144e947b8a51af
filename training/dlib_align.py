"""dlib's face-chip alignment, differentiable: get_face_chip_details + extract_image_chips in torch.

`face_chip_theta` gives the affine_grid theta of dlib's chip geometry (150x150, padding 0.25) from
68-point landmarks; `chips` samples it. dlib does not sample a large face from the full-resolution
image: once a chip pixel spans over 2 image pixels (the chip covers over 300 px of the image; dlib
face boxes from ~250 px) it bilinearly samples a level of a 5x5 binomial pyramid (pyramid_down<2>,
one level per factor 2) built from a crop around the face. `chips()` rebuilds that crop, pyramid and
dlib's sampling points on it, including its level coordinate offset (a point p maps to
p/2 - (1.25, 0.75) while the level's pixel i sits at 2i + 2: at level 1 the chip is taken 0.5 px
left of and 0.5 px below the fitted position); `chips(pyramid=False)` is one batched grid_sample at
full resolution.

Measured against dlib 20.0 on the 17 photos/paintings and 8 clip frames of ../shared/data/faces
(tests/test_dlib_face.py; 12 of them from pyramid level 1) and 3 photos upscaled 2-5x (levels 2, 3):
- geometry: centre, width and angle equal get_face_chip_details' to 1e-9 (px, rad);
- chips(): every pixel within 2 grey levels of dlib.get_face_chip (3 at level 3), on average
  0.5 (level 0) to 1-2 (levels 1-3) above it, since dlib truncates to uint8 after sampling and after
  each pyramid level; descriptors within 0.010 (Euclidean) of dlib's compute_face_descriptor(img,
  shape), where two frames of one person are 0.20-0.38 apart and two people 0.68-0.99;
- chips(quantize=True) truncates like dlib (gradient straight through): 99.9% of the pixels equal,
  the rest 1 level off; descriptors within 0.001;
- chips(pyramid=False): the same below level 1; above it aliased, mean |difference| 3-6 levels (up
  to 240 at image borders, where dlib's pyramid level stops short of the edge), descriptors 0.05-0.15
  away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.blocks import assert_shape

CHIP = 150  # dlib's face-recognition chip side, pixels

# dlib's mean face shape (get_face_chip_details, interpolation.h): iBUG points 17..67 in [0, 1].
_MEAN_X = [
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124, 0.904991, 0.98004,
    0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036, 0.490127, 0.554217, 0.613373, 0.121737,
    0.187122, 0.265825, 0.334606, 0.260918, 0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751,
    0.719335, 0.254149, 0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874, 0.553364, 0.490127,
    0.42689,
]  # fmt: skip
_MEAN_Y = [
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891, 0.0187482, 0.038915,
    0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326, 0.609345, 0.628106, 0.609345, 0.587326,
    0.216423, 0.178758, 0.179852, 0.231733, 0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423,
    0.244077, 0.245099, 0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746, 0.784792, 0.824182,
    0.831803, 0.824182,
]  # fmt: skip
# dlib fits on nose, eyes and outer lips + upper inner lip: no jaw, brows or lower lip (33 points).
ALIGN_POINTS = [i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67)]


def chip_geometry(points: torch.Tensor, *, size: int, padding: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre (B, 2), step (B, 2, 2)), float64 image pixels: chip pixel j = (x, y) samples the image
    at centre + step @ (j - (size - 1) / 2), as dlib's get_face_chip_details + extract_image_chips do.

    dlib fits a least-squares similarity (Umeyama; in 2-D the complex ratio a + ib below) from its
    mean face, scaled into the chip with `padding` around it, to the 33 ALIGN_POINTS. It keeps the
    angle, the scale s and the image of the chip centre (size/2, size/2), and maps the chip's corner
    pixels onto the corners of a (size*s - 1)-wide square about that centre, so the step is
    R * (size*s - 1) / (size - 1), not exactly the fitted transform.
    """
    assert_shape(points, (None, 68, 2), "points")
    mean = torch.tensor([_MEAN_X, _MEAN_Y], dtype=torch.float64, device=points.device).T
    mean = mean[[i - 17 for i in ALIGN_POINTS]]  # (K, 2)
    src = (padding + mean) / (2 * padding + 1) * size  # (K, 2) chip pixels
    dst = points[:, ALIGN_POINTS].to(torch.float64)  # (B, K, 2) image pixels
    src_c, dst_c = src - src.mean(0), dst - dst.mean(1, keepdim=True)
    norm = (src_c**2).sum()
    a = (src_c * dst_c).sum((1, 2)) / norm  # s * cos(angle)
    b = (src_c[:, 0] * dst_c[..., 1] - src_c[:, 1] * dst_c[..., 0]).sum(1) / norm  # s * sin(angle)
    m = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # (B, 2, 2) chip -> image
    centre = dst.mean(1) + (m @ (size / 2 - src.mean(0))[:, None])[..., 0]  # (B, 2)
    scale = torch.sqrt(a**2 + b**2)
    return centre, m * ((size * scale - 1) / ((size - 1) * scale))[:, None, None]


def face_chip_theta(
    points: torch.Tensor, image_size: int | tuple[int, int], *, size: int = CHIP, padding: float = 0.25
) -> torch.Tensor:
    """(B, 2, 3) affine_grid theta (align_corners=False) of dlib's `get_face_chip(img, shape, size, padding)`.

    points: (B, 68, 2) iBUG landmarks, (x, y) pixels with pixel centres at integers (dlib's
    convention), of images of `image_size` S or (H, W). Differentiable in `points`.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    centre, step = chip_geometry(points, size=size, padding=padding)
    to_unit = step.new_tensor([2.0 / w, 2.0 / h])[None, :, None]  # pixels -> [-1, 1]
    theta = torch.cat([step * size / 2, (centre + 0.5)[..., None]], dim=2) * to_unit
    theta[:, :, 2] -= 1.0
    return theta.to(points.dtype if points.is_floating_point() else torch.float32)


def pyramid_levels(step: torch.Tensor) -> list[int]:
    """How many pyramid_down<2> levels dlib samples each chip from: n with 2**n < pixel step <= 2**(n+1)."""
    k = torch.linalg.vector_norm(step[:, :, 0], dim=1)  # (B,) image pixels per chip pixel
    return [max(0, int(torch.ceil(torch.log2(v)).item()) - 1) for v in k.detach().cpu()]


def _sample(image: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Bilinear samples (3, n, n) of image (3, h, w) in [-1, 1] at pixel coordinates at (n, n, 2);
    black where dlib gives 0 (any of the 4 neighbours outside the image)."""
    h, w = image.shape[1:]
    dims = torch.tensor([w, h], dtype=at.dtype, device=at.device)
    grid = ((2 * at + 1) / dims - 1).to(image.dtype)
    out = F.grid_sample(
        image[None] + 1, grid[None], mode="bilinear", padding_mode="zeros", align_corners=False
    )
    inside = ((at >= 0) & (at < dims - 1)).all(-1)  # (n, n)
    return out[0] * inside.to(out.dtype) - 1  # black (-1) outside, as dlib's 0


def truncate(x: torch.Tensor) -> torch.Tensor:
    """dlib's uint8 truncation of [-1, 1] values (floor of the 0..255 level), straight-through gradient."""
    floor = torch.floor((x.detach() + 1) * 127.5 + 1e-3) / 127.5 - 1  # 1e-3: float error below an integer
    return x + (floor - x).detach()


def _pyramid_down(image: torch.Tensor) -> torch.Tensor:
    """dlib's pyramid_down<2>: [1 4 6 4 1]/16 along rows then columns, valid, every 2nd pixel.

    (3, h, w) -> (3, (h - 3) // 2, (w - 3) // 2); output pixel i is centred on input pixel 2i + 2.
    Strided slices rather than a conv: no per-shape convolution setup for every new crop size.
    """
    for dim in (2, 1):
        n = (image.shape[dim] - 3) // 2
        every2 = (slice(None),) * dim + (slice(None, None, 2),)
        taps = [image.narrow(dim, k, 2 * n - 1)[every2] for k in range(5)]  # each (.., n, ..)
        image = ((taps[0] + taps[4]) + 4 * (taps[1] + taps[3]) + 6 * taps[2]) / 16
    return image


def _dlib_chip(
    image: torch.Tensor, centre: torch.Tensor, step: torch.Tensor, size: int, levels: int, quantize: bool
) -> torch.Tensor:
    """One chip (3, size, size) the way extract_image_chips takes it from image (3, H, W)."""
    j = torch.arange(size, dtype=torch.float64, device=image.device) - (size - 1) / 2
    offsets = torch.stack(torch.meshgrid(j, j, indexing="xy"), -1)  # (size, size, 2) chip (x, y)
    at = centre + offsets @ step.T  # (size, size, 2) image pixels
    corners = at[[0, 0, -1, -1], [0, -1, 0, -1]]  # (4, 2)
    grow = 2 ** (levels + 2) - 2  # dlib's crop margin: 2, 6, 14, ... px
    h, w = image.shape[1:]
    lo = torch.clamp(corners.min(0).values - grow, min=0)
    hi = torch.minimum(corners.max(0).values + grow, corners.new_tensor([w - 1, h - 1]))
    (x0, y0), (x1, y1) = torch.floor(lo + 0.5).long().tolist(), torch.floor(hi + 0.5).long().tolist()
    crop = image[:, y0 : y1 + 1, x0 : x1 + 1]
    at = at - at.new_tensor([x0, y0])
    for _ in range(levels):
        crop = truncate(_pyramid_down(crop)) if quantize else _pyramid_down(crop)
        at = at / 2 - at.new_tensor([1.25, 0.75])  # dlib's point_down (the level's pixel i is at 2i + 2)
    return truncate(_sample(crop, at)) if quantize else _sample(crop, at)


def chips(
    images: torch.Tensor,
    points: torch.Tensor,
    *,
    size: int = CHIP,
    padding: float = 0.25,
    pyramid: bool = True,
    quantize: bool = False,
) -> torch.Tensor:
    """dlib-aligned face chips (B, 3, size, size) of images (B, 3, H, W), one face (B, 68, 2) each.

    Differentiable in images and points. pyramid=True follows dlib's image pyramid for large faces
    (a short loop over the batch); pyramid=False is one batched bilinear grid_sample from
    face_chip_theta, identical while faces are under ~300 px, aliased above. quantize=True also
    truncates to dlib's uint8 levels where dlib does (forward only; the gradient passes straight through).
    """
    assert_shape(images, (None, 3, None, None), "images")
    assert_shape(points, (images.shape[0], 68, 2), "points")
    if not pyramid:
        theta = face_chip_theta(points, (images.shape[2], images.shape[3]), size=size, padding=padding)
        grid = F.affine_grid(theta.to(images.dtype), [images.shape[0], 3, size, size], align_corners=False)
        out = F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
        return truncate(out) if quantize else out
    centre, step = chip_geometry(points.to(images.device), size=size, padding=padding)
    levels = pyramid_levels(step)
    return torch.stack(
        [_dlib_chip(images[i], centre[i], step[i], size, levels[i], quantize) for i in range(len(levels))]
    )
