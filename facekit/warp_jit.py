"""The piecewise-affine warp's per-frame work, compiled (numba): facekit.warp's `dense_map` hands
the target's landmarks here (`dense_map`: its control points, each triangle's affine, the paint
order, the triangle labels painted, each pixel's affine at the pixel) instead of making ~170
OpenCV calls and a few dozen numpy calls on tiny arrays, whose binding overhead was most of the
warp's time. `control` is facekit.warp's `_control` for one face (a test holds them together).

`fill_convex` rasterises as `cv2.fillConvexPoly(image, points, color, cv2.LINE_8, shift)` does on
a one-channel uint8 image, pixel for pixel - OpenCV's fixed-point scanline fill (16 fraction
bits) plus its 8-connected outline - so the labels are OpenCV's bit for bit (tests/test_warp.py
compares them on 3,000 random triangles) and the maps those of the OpenCV and numpy code up to
float rounding. Integer division rounds toward zero here as in C (`_div`), not down as Python's
`//` does.

Compiled on first use (6-12 s on these 2 cores; ~0.3 s from numba's cache: facekit.jit).
"""

from __future__ import annotations

import numpy as np

from facekit.jit import jit as _jit

_XY_SHIFT = 16
_XY_ONE = 1 << _XY_SHIFT
_HALF = _XY_ONE >> 1


@_jit
def _div(a, b):
    """C's integer division: the quotient rounded toward zero."""
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


@_jit
def _clip_line(width, height, x1, y1, x2, y2):
    """OpenCV's clipLine on a width x height area: (inside, x1, y1, x2, y2) clipped to it."""
    right, bottom = width - 1, height - 1
    c1 = (x1 < 0) + (x1 > right) * 2 + (y1 < 0) * 4 + (y1 > bottom) * 8
    c2 = (x2 < 0) + (x2 > right) * 2 + (y2 < 0) * 4 + (y2 > bottom) * 8
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            a = 0 if c1 < 8 else bottom
            x1 += _div((a - y1) * (x2 - x1), y2 - y1)
            y1 = a
            c1 = (x1 < 0) + (x1 > right) * 2
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            x2 += _div((a - y2) * (x2 - x1), y2 - y1)
            y2 = a
            c2 = (x2 < 0) + (x2 > right) * 2
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                a = 0 if c1 == 1 else right
                y1 += _div((a - x1) * (y2 - y1), x2 - x1)
                x1 = a
                c1 = 0
            if c2:
                a = 0 if c2 == 1 else right
                y2 += _div((a - x2) * (y2 - y1), x2 - x1)
                x2 = a
                c2 = 0
    return (c1 | c2) == 0, x1, y1, x2, y2


@_jit
def _put(image, x, y, color):
    if 0 <= x < image.shape[1] and 0 <= y < image.shape[0]:
        image[y, x] = color


@_jit
def _line(image, x1, y1, x2, y2, color):
    """OpenCV's 8-connected line between fixed-point (16 fraction bits) ends."""
    inside, x1, y1, x2, y2 = _clip_line(
        np.int64(image.shape[1]) << _XY_SHIFT, np.int64(image.shape[0]) << _XY_SHIFT, x1, y1, x2, y2
    )
    if not inside:
        return
    dx, dy = x2 - x1, y2 - y1
    ax, ay = abs(dx), abs(dy)
    if ax > ay:
        if dx < 0:  # walk left to right
            x1, x2, y1, y2 = x2, x1, y2, y1
            dy = -dy
        x_step, y_step = np.int64(_XY_ONE), _div(dy << _XY_SHIFT, ax | 1)
        count = (x2 - x1) >> _XY_SHIFT
    else:
        if dy < 0:  # walk top to bottom
            x1, x2, y1, y2 = x2, x1, y2, y1
            dx = -dx
        x_step, y_step = _div(dx << _XY_SHIFT, ay | 1), np.int64(_XY_ONE)
        count = (y2 - y1) >> _XY_SHIFT
    x1 += _HALF
    y1 += _HALF
    _put(image, (x2 + _HALF) >> _XY_SHIFT, (y2 + _HALF) >> _XY_SHIFT, color)
    if ax > ay:
        x1 >>= _XY_SHIFT
        while count >= 0:
            _put(image, x1, y1 >> _XY_SHIFT, color)
            x1 += 1
            y1 += y_step
            count -= 1
    else:
        y1 >>= _XY_SHIFT
        while count >= 0:
            _put(image, x1 >> _XY_SHIFT, y1, color)
            x1 += x_step
            y1 += 1
            count -= 1


@_jit
def _next_edge(vx, vy, idx, step, y, edges, delta, shift):
    """From vertex `idx`, walk the polygon by `step` to the first edge that ends below row y:
    (found, its end vertex, its end row, its start x and its x step per row, both fixed-point,
    the edges left). None found: `edges` runs out (negative)."""
    npts = len(vx)
    up = _XY_SHIFT - shift
    j = idx + step
    if j >= npts:
        j -= npts
    while True:
        more = edges > 0
        edges -= 1
        if not more:
            return False, idx, np.int64(0), np.int64(0), np.int64(0), edges
        ty = (vy[j] + delta) >> shift
        if ty > y:
            xs, xe = vx[idx] << up, vx[j] << up
            return True, j, ty, xs, _div((xe - xs) * 2 + (ty - y), 2 * (ty - y)), edges
        idx = j
        j += step
        if j >= npts:
            j -= npts


@_jit
def fill_convex(image, vx, vy, color, shift):
    """cv2.fillConvexPoly(image, vertices, color, cv2.LINE_8, shift) for 1 <= shift <= 16 on a
    uint8 (H, W) image; the vertices' x and y (int64, `shift` fraction bits) in vx and vy."""
    npts = len(vx)
    height, width = image.shape
    delta = (1 << shift) >> 1
    up = _XY_SHIFT - shift
    p0x, p0y = vx[npts - 1] << up, vy[npts - 1] << up
    xmin = xmax = vx[0]
    ymin = ymax = vy[0]
    imin = 0
    for i in range(npts):
        if vy[i] < ymin:
            ymin = vy[i]
            imin = i
        ymax = max(ymax, vy[i])
        xmax = max(xmax, vx[i])
        xmin = min(xmin, vx[i])
        px, py = vx[i] << up, vy[i] << up
        _line(image, p0x, p0y, px, py, color)  # the outline, as OpenCV draws it first
        p0x, p0y = px, py
    xmin, xmax = (xmin + delta) >> shift, (xmax + delta) >> shift
    ymin, ymax = (ymin + delta) >> shift, (ymax + delta) >> shift
    if npts < 3 or xmax < 0 or ymax < 0 or xmin >= width or ymin >= height:
        return
    ymax = min(ymax, height - 1)
    # Two edges walked down from the top vertex, one forwards (a), one backwards (b). (The
    # np.int64 casts keep literal ints from compiling _next_edge four times over.)
    a_idx = b_idx = imin
    a_ye = b_ye = y = ymin
    a_x = b_x = np.int64(-_XY_ONE)
    a_dx = b_dx = np.int64(0)
    edges = npts
    while True:
        if y >= a_ye:
            found, j, ye, x, dx, edges = _next_edge(
                vx, vy, np.int64(a_idx), np.int64(1), y, edges, delta, shift
            )
            if found:
                a_idx, a_ye, a_x, a_dx = j, ye, x, dx
        if y >= b_ye:
            found, j, ye, x, dx, edges = _next_edge(vx, vy, np.int64(b_idx), npts - 1, y, edges, delta, shift)
            if found:
                b_idx, b_ye, b_x, b_dx = j, ye, x, dx
        if edges < 0:
            break
        if y >= 0:
            x1 = (min(a_x, b_x) + _HALF) >> _XY_SHIFT
            x2 = (max(a_x, b_x) + _HALF) >> _XY_SHIFT
            if x2 >= 0 and x1 < width:
                x = x1 if x1 > 0 else 0
                while x <= x2 and x < width:
                    image[y, x] = color
                    x += 1
        a_x += a_dx
        b_x += b_dx
        y += 1
        if y > ymax:
            break


@_jit
def paint_labels(labels, vertices, shift):
    """Triangle i of `vertices` (T, 3, 2) int64 (`shift` fraction bits) filled with label i into
    `labels` (H, W) uint8, in order: later triangles win shared pixels."""
    vx = np.empty(3, np.int64)
    vy = np.empty(3, np.int64)
    for i in range(vertices.shape[0]):
        for k in range(3):
            vx[k], vy[k] = vertices[i, k, 0], vertices[i, k, 1]
        fill_convex(labels, vx, vy, np.uint8(i), shift)


@_jit
def evaluate(labels, table, low, high, out):
    """out[y, x, c] = table[label, c, 0] x + table[label, c, 1] y + table[label, c, 2] in float32,
    clipped to [low, high]: each pixel's affine (table (256, 2, 3) float32) at the pixel."""
    height, width = labels.shape
    for y in range(height):
        fy = np.float32(y)
        for x in range(width):
            fx = np.float32(x)
            label = labels[y, x]
            for c in range(2):
                value = table[label, c, 0] * fx
                value = value + table[label, c, 1] * fy
                value = value + table[label, c, 2]
                out[y, x, c] = min(max(value, low), high)


@_jit
def control(points, size, span, heights, anchors, out):
    """facekit.warp's control points of one face, in float64 arithmetic (`_control` in numpy does
    the same for any batch): `points` (68, 2) clipped to [-8 size, 9 size], then the forehead arc
    (`span`, `heights`: the NUM_FOREHEAD fractions along the jaw tops and heights above the eye
    line), then `anchors` (16, 2) x size - 0.5, clipped again -> out (91, 2)."""
    low, high = -8.0 * size, 9.0 * size
    n = points.shape[0]
    for i in range(n):
        for c in range(2):
            out[i, c] = min(max(points[i, c], low), high)
    rx = ry = lx = ly = 0.0
    for i in range(36, 42):  # facekit.layout.RIGHT_EYE, then LEFT_EYE
        rx += out[i, 0]
        ry += out[i, 1]
        lx += out[i + 6, 0]
        ly += out[i + 6, 1]
    rx, ry, lx, ly = rx / 6, ry / 6, lx / 6, ly / 6
    cx, cy = (rx + lx) / 2, (ry + ly) / 2
    ax, ay = lx - rx, ly - ry
    length = np.sqrt(ax * ax + ay * ay)
    ex, ey = (ax / length, ay / length) if length > 1e-6 else (1.0, 0.0)  # the face's +x
    # jaw tops (0, 16) and nose base (33) in the face's frame: along the eye line, towards the chin
    a0 = (out[0, 0] - cx) * ex + (out[0, 1] - cy) * ey
    a16 = (out[16, 0] - cx) * ex + (out[16, 1] - cy) * ey
    down = (out[33, 1] - cy) * ex - (out[33, 0] - cx) * ey
    for k in range(span.shape[0]):
        across = a0 + (a16 - a0) * span[k]
        up = heights[k] * down
        out[n + k, 0] = min(max(cx + across * ex + up * ey, low), high)
        out[n + k, 1] = min(max(cy + across * ey - up * ex, low), high)
    m = n + span.shape[0]
    for k in range(anchors.shape[0]):
        for c in range(2):
            out[m + k, c] = min(max(anchors[k, c] * size - 0.5, low), high)


@_jit
def dense_map(target, size, triangles, src_corners, src_area, span, heights, anchors, min_det, shift, out):
    """facekit.warp.dense_map's work per frame, the source's part given (triangles (T, 3), their
    source corners as columns (T, 2, 3), their source areas x 2 (T,)): the target's control points,
    each triangle's target -> source affine, the paint order, the labels, each pixel's affine."""
    count = triangles.shape[0]
    ctrl = np.empty((target.shape[0] + span.shape[0] + anchors.shape[0], 2))
    control(target, size, span, heights, anchors, ctrl)
    rows = np.empty((count, 2, 3))
    det = np.empty(count)
    for t in range(count):
        x0, y0 = ctrl[triangles[t, 0], 0], ctrl[triangles[t, 0], 1]
        x1, y1 = ctrl[triangles[t, 1], 0], ctrl[triangles[t, 1], 1]
        x2, y2 = ctrl[triangles[t, 2], 0], ctrl[triangles[t, 2], 1]
        # rows = src adj(M) / det(M) for M = (x; y; 1) with the target's corners as columns; row i
        # of the adjugate is built from the other two corners j = i + 1, k = i + 2 (mod 3).
        a0, b0, c0 = y1 - y2, x2 - x1, x1 * y2 - x2 * y1
        a1, b1, c1 = y2 - y0, x0 - x2, x2 * y0 - x0 * y2
        a2, b2, c2 = y0 - y1, x1 - x0, x0 * y1 - x1 * y0
        d = c0 + c1 + c2
        det[t] = d
        for c in range(2):
            s0, s1, s2 = src_corners[t, c, 0], src_corners[t, c, 1], src_corners[t, c, 2]
            if abs(d) >= min_det:
                rows[t, c, 0] = (s0 * a0 + s1 * a1 + s2 * a2) / d
                rows[t, c, 1] = (s0 * b0 + s1 * b1 + s2 * b2) / d
                rows[t, c, 2] = (s0 * c0 + s1 * c1 + s2 * c2) / d
            else:  # collapsed: the translation taking its centroid to the source's
                rows[t, c, 0] = 1.0 if c == 0 else 0.0
                rows[t, c, 1] = 1.0 if c == 1 else 0.0
                corner = (x0 + x1 + x2) / 3 if c == 0 else (y0 + y1 + y2) / 3
                rows[t, c, 2] = (s0 + s1 + s2) / 3 - corner
    # Paint order, later ones winning shared pixels: by target / source area, so folded triangles
    # (< 0) come first, then collapsed ones (~0), then proper ones from the most squeezed, whose
    # affine is steepest and worst to extrapolate onto the pixels just outside them, to the least.
    order = np.argsort(det / np.maximum(src_area, 1e-12), kind="mergesort")
    # entry i: the affine of triangle order[i]; entry `count` and above: the identity, for pixels
    # no triangle covers (count <= 2 x 91 - 5 < 255: a uint8 label)
    table = np.zeros((256, 2, 3), np.float32)
    table[:, 0, 0] = 1.0
    table[:, 1, 1] = 1.0
    vertices = np.empty((count, 3, 2), np.int64)
    scale = float(1 << shift)
    for i in range(count):
        t = order[i]
        for c in range(2):
            for k in range(3):
                table[i, c, k] = np.float32(rows[t, c, k])
        for k in range(3):
            vertices[i, k, 0] = np.int64(np.rint(ctrl[triangles[t, k], 0] * scale))
            vertices[i, k, 1] = np.int64(np.rint(ctrl[triangles[t, k], 1] * scale))
    labels = np.full((size, size), np.uint8(count))
    paint_labels(labels, vertices, shift)
    # clipped to [-size, 2 size - 1]: sliver triangles can reach far
    evaluate(labels, table, np.float32(-size), np.float32(2 * size - 1), out)
