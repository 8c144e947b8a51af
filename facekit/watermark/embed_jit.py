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


@jit
def _linear_taps(size_out, size_in, step):
    """cv2.resize INTER_LINEAR's source index and weight of the next one along an axis upscaled by
    the integer `step` (size_out = step x size_in): centre-aligned, clamped at both ends."""
    index = np.empty(size_out, np.int64)
    weight = np.empty(size_out, np.float32)
    for d in range(size_out):
        f = (d + 0.5) / step - 0.5
        s = int(np.floor(f))
        f -= s
        if s < 0:
            f, s = 0.0, 0
        if s >= size_in - 1:
            f, s = 0.0, size_in - 1
        index[d], weight[d] = s, np.float32(f)
    return index, weight


@jit
def _average_2x2(top, bottom, left, channel):
    """OpenCV's 2x area average of one channel: the four pixels' sum, (sum + 2) >> 2."""
    total = np.int32(top[left, channel]) + np.int32(top[left + 1, channel])
    return (total + np.int32(bottom[left, channel]) + np.int32(bottom[left + 1, channel]) + 2) >> 2


@jit
def _grey_2x(frame):
    """cv2.cvtColor(cv2.resize(frame, half, INTER_AREA), RGB2GRAY) of a uint8 RGB frame, bit for
    bit: OpenCV's 2x area average (_average_2x2) and its 15-bit fixed-point grey weights."""
    small_h, small_w = frame.shape[0] // 2, frame.shape[1] // 2
    grey = np.empty((small_h, small_w), np.uint8)
    for y in range(small_h):
        top, bottom = frame[2 * y], frame[2 * y + 1]
        for x in range(small_w):
            red = _average_2x2(top, bottom, 2 * x, 0)
            green = _average_2x2(top, bottom, 2 * x, 1)
            blue = _average_2x2(top, bottom, 2 * x, 2)
            grey[y, x] = (red * 9798 + green * 19235 + blue * 3735 + 16384) >> 15
    return grey


@jit
def _grey_area(frame, step):
    """As _grey_2x for another integer `step`: OpenCV's area average is then the block's sum over
    its area rounded half to even (checked at 4x)."""
    small_h, small_w = frame.shape[0] // step, frame.shape[1] // step
    grey = np.empty((small_h, small_w), np.uint8)
    inverse_area = np.float32(1.0 / (step * step))
    for y in range(small_h):
        for x in range(small_w):
            red = green = blue = np.int32(0)
            for dy in range(step):
                line = frame[y * step + dy]
                for dx in range(step):
                    red += np.int32(line[x * step + dx, 0])
                    green += np.int32(line[x * step + dx, 1])
                    blue += np.int32(line[x * step + dx, 2])
            red = np.int32(np.rint(np.float32(red) * inverse_area))
            green = np.int32(np.rint(np.float32(green) * inverse_area))
            blue = np.int32(np.rint(np.float32(blue) * inverse_area))
            grey[y, x] = (red * 9798 + green * 19235 + blue * 3735 + 16384) >> 15
    return grey


@jit
def mark_scaled(frame, pattern, step, fine, coarse, floor, cap, strength):
    """embed.add_mark in one pass for a frame `step` (2 or 4) times the mask's side: what
    cv2.resize(INTER_AREA) down by `step`, cv2.cvtColor(RGB2GRAY), `texture_mask`, cv2.resize
    (INTER_LINEAR) back up and `add_mark` compute, without the intermediate frames and calls.

    The grey is OpenCV's to the bit: its area average ((sum + 2) >> 2 at 2x; sum / 16 rounded half
    to even at 4x) and its 15-bit grey weights. The upscaled mask is cv2's bilinear weights in
    float32, rows then columns, which may differ from OpenCV's by a unit in the last place (it fuses
    multiply-adds); the marked pixel then moves by one grey level where the sum lands within that of
    a half (tests/test_watermark.py bounds how often)."""
    height, width = frame.shape[0], frame.shape[1]
    small_h, small_w = height // step, width // step
    grey = _grey_2x(frame) if step == 2 else _grey_area(frame, step)
    mask = texture_mask(grey, fine, coarse, floor, cap)
    col, col_w = _linear_taps(width, small_w, step)
    row, row_w = _linear_taps(height, small_h, step)
    scale = np.float32(strength)
    one = np.float32(1.0)
    pixels = frame.reshape(height, 3 * width)
    out = np.empty((height, 3 * width), np.uint8)
    across = np.empty((small_h, width), np.float32)  # the mask's rows upscaled, then blended
    for r in range(small_h):
        for x in range(width):
            c0 = col[x]
            c1 = min(c0 + 1, small_w - 1)
            a = col_w[x]
            across[r, x] = mask[r, c0] * (one - a) + mask[r, c1] * a
    delta = np.empty(3 * width, np.float32)
    for y in range(height):
        upper = across[row[y]]
        lower = across[min(row[y] + 1, small_h - 1)]
        b = row_w[y]
        for x in range(width):
            value = pattern[y, x] * (upper[x] * (one - b) + lower[x] * b) * scale
            delta[3 * x] = value
            delta[3 * x + 1] = value
            delta[3 * x + 2] = value
        line = pixels[y]
        for i in range(3 * width):
            level = np.rint(np.float32(line[i]) + delta[i])
            out[y, i] = np.uint8(min(max(level, np.float32(0.0)), np.float32(255.0)))
    return out.reshape(height, width, 3)
