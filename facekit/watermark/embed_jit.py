"""The mark's per-frame arithmetic, compiled (numba): facekit.watermark.embed's `texture_mask`
(the two Gaussian blurs of the grey, the texture energy, clip and normalise) and `add_mark`
(pattern x mask x strength added to R, G and B, saturated) as two loops instead of ~15 OpenCV and
numpy calls on a 64 x 64 image, whose binding overhead was much of the mark's time: one core per
128 px frame 219-234 us with the OpenCV calls, 135-140 us compiled (BENCHMARKS.md).

They compute what the OpenCV calls computed (the grey comes from cv2.cvtColor, as before): the blurs
are cv2.GaussianBlur's (its kernels, separable rows then columns, reflect-101 borders) in float32,
the sum rounds half to even as cv2's saturate_cast does. Float sums taken in another order make
a marked pixel differ from the OpenCV one by one grey level at most, rarely
(tests/test_watermark.py). Resizing stays in OpenCV (embed.py). Compiled as facekit.jit says;
`warm_up` compiles or loads them before a server takes frames.
"""

from __future__ import annotations

import numpy as np

from facekit.jit import jit


@jit
def _reflect(index, size):
    """Index into [0, size) reflected without repeating the edge (BORDER_REFLECT_101)."""
    if size == 1:
        return 0
    while index < 0 or index >= size:
        index = -index if index < 0 else 2 * size - 2 - index
    return index


@jit
def _blur(image, kernel):
    """Separable blur of a float32 (H, W) image by `kernel` (odd length): rows, then columns,
    each a sum over the taps in order, a whole row at a time (so it vectorises)."""
    height, width = image.shape
    size = len(kernel)
    radius = size // 2
    padded = np.empty(width + 2 * radius, np.float32)
    rows = np.empty((height, width), np.float32)
    for y in range(height):
        for x in range(width + 2 * radius):
            padded[x] = image[y, _reflect(x - radius, width)]
        for x in range(width):
            rows[y, x] = kernel[0] * padded[x]
        for k in range(1, size):
            weight = kernel[k]
            for x in range(width):
                rows[y, x] += weight * padded[x + k]
    out = np.zeros((height, width), np.float32)
    for y in range(height):
        for k in range(size):
            source = _reflect(y + k - radius, height)
            weight = kernel[k]
            for x in range(width):
                out[y, x] += weight * rows[source, x]
    return out


@jit
def texture_mask(grey, fine, coarse, floor, cap):
    """(H, W) float32 mask of a uint8 grey (H, W) frame: the local energy of its detail (grey
    minus its `fine` blur, squared, `coarse` blurred, square-rooted) over its mean, clipped to
    [floor, cap], scaled to RMS 1."""
    height, width = grey.shape
    grey = grey.astype(np.float32)
    smooth = _blur(grey, fine)
    square = np.empty((height, width), np.float32)
    for y in range(height):
        for x in range(width):
            detail = grey[y, x] - smooth[y, x]
            square[y, x] = detail * detail
    energy = _blur(square, coarse)
    total = 0.0
    for y in range(height):
        for x in range(width):
            energy[y, x] = np.sqrt(energy[y, x])
            total += energy[y, x]
    scale = np.float32(total / (height * width) + 1e-3)
    squares = 0.0
    for y in range(height):
        for x in range(width):
            value = min(max(energy[y, x] / scale, np.float32(floor)), np.float32(cap))
            energy[y, x] = value
            squares += value * value
    norm = np.float32(1.0 / np.sqrt(squares / (height * width)))
    for y in range(height):
        for x in range(width):
            energy[y, x] *= norm
    return energy


@jit
def add_mark(frame, pattern, mask, strength):
    """uint8 RGB (H, W, 3) frame + strength x pattern x mask (both (H, W) float32) on each
    channel, rounded half to even and saturated -> a new uint8 frame. (Flat loops, the delta
    spread to the three channels first: the sum then vectorises.)"""
    count = pattern.shape[0] * pattern.shape[1]
    flat_pattern, flat_mask = pattern.reshape(count), mask.reshape(count)
    scale = np.float32(strength)
    delta = np.empty(3 * count, np.float32)
    for i in range(count):
        value = flat_pattern[i] * flat_mask[i] * scale
        delta[3 * i] = value
        delta[3 * i + 1] = value
        delta[3 * i + 2] = value
    pixels = frame.reshape(3 * count)
    out = np.empty(3 * count, np.uint8)
    for i in range(3 * count):
        value = np.rint(np.float32(pixels[i]) + delta[i])
        out[i] = np.uint8(min(max(value, np.float32(0.0)), np.float32(255.0)))
    return out.reshape(frame.shape)
