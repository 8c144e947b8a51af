"""Landmark motion: identity-preserving reenactment and a procedural talking driver.

`transfer_motion` is what the service does to a stream of driving landmarks before drawing them:
the generator takes the face *shape* from the landmark image (PAPER.md, "Known failure modes":
identity leaks from the driver's landmarks), so a different person's landmarks must first be
turned into the same motion performed by the avatar's own face.

`synthetic_talking` makes a driving sequence from one face shape alone (speech-like mouth motion,
blinks, head motion, eyebrow raises); the demo drives a portrait with it.

Points are pixel (x, y), y down; a similarity is an (A, t) pair acting as p -> p @ A.T + t with
A = s R (uniform scale times rotation).
"""

from __future__ import annotations

import numpy as np

from facekit.layout import LEFT_EYE, NUM_POINTS, RIGHT_EYE

# Points that move with the head but barely with expression: outer jaw near the ears, nose
# bridge and lower nose, eye corners. Head pose is fitted on these so that an open mouth or a
# raised brow is not mistaken for a nod or a zoom.
STABLE_POINTS = np.array([0, 1, 2, 14, 15, 16, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45])


def _check_points(points: np.ndarray, *, name: str, batched: bool) -> np.ndarray:
    pts = np.asarray(points, np.float64)
    shape = ("N", NUM_POINTS, 2) if batched else (NUM_POINTS, 2)
    if pts.ndim != len(shape) or pts.shape[-2:] != (NUM_POINTS, 2):
        raise ValueError(f"{name} must have shape {shape}, got {pts.shape}")
    if batched and len(pts) == 0:
        raise ValueError(f"{name} is empty (0 frames)")
    if not np.isfinite(pts).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return pts


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity src -> dst (Umeyama 1991), batched over leading axes.

    src, dst: (..., K, 2). Returns A (..., 2, 2) = s R and t (..., 2) minimising
    sum_k |dst_k - (A src_k + t)|^2, with R a proper rotation (no reflection).
    """
    mu_src, mu_dst = src.mean(axis=-2, keepdims=True), dst.mean(axis=-2, keepdims=True)
    x, y = src - mu_src, dst - mu_dst  # (..., K, 2)
    var_src = (x**2).sum(axis=(-2, -1)) / x.shape[-2]  # (...)
    if np.any(var_src <= 1e-12):
        raise ValueError("cannot fit a similarity to coincident points")
    cov = np.swapaxes(y, -1, -2) @ x / x.shape[-2]  # (..., 2, 2)
    u, sigma, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u) * np.linalg.det(vt))  # -1 would be a reflection
    d = np.where(d == 0, 1.0, d)
    rotation = u @ (np.stack([np.ones_like(d), d], axis=-1)[..., :, None] * vt)
    scale = (sigma[..., 0] + sigma[..., 1] * d) / var_src  # (...)
    a = scale[..., None, None] * rotation
    t = mu_dst[..., 0, :] - (a @ mu_src[..., 0, :, None])[..., 0]
    return a, t


def _apply(a: np.ndarray, t: np.ndarray, points: np.ndarray) -> np.ndarray:
    """p -> A p + t for (..., K, 2) points."""
    return points @ np.swapaxes(a, -1, -2) + t[..., None, :]


def _invert(a: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a_inv = np.linalg.inv(a)
    return a_inv, -(a_inv @ t[..., None])[..., 0]


def transfer_motion(driver: np.ndarray, source: np.ndarray, *, neutral_index: int = 0) -> np.ndarray:
    """Re-enact the driver's motion with the source's face: (N, 68, 2), (68, 2) -> (N, 68, 2) float32.

    With D_0 the driver's neutral frame (`driver[neutral_index]`), D_t frame t and S the source:

      C   = fit(D_0 -> S)      places the driver's face onto the source's (scale = size ratio)
      M_t = fit(D_0 -> D_t)    the driver's head motion at t, in the driver's image
      G_t = C M_t C^-1         the same head motion performed around the source's face
      L_t = M_t^-1(D_t) - D_0  expression: frame t brought back to the neutral pose, minus neutral
      out_t = G_t(S + A_C L_t) expression deltas rotated and scaled (A_C = linear part of C) onto
                               the source, then posed by G_t

    Fits use `STABLE_POINTS` only. The output keeps S's face shape (out at the neutral frame is S
    itself), and with driver[neutral_index] == source it reproduces the driver exactly. The
    driver's neutral frame should be a closed-mouth, eyes-open face: deltas are measured from it.
    """
    drv = _check_points(driver, name="driver", batched=True)  # (N, 68, 2)
    src = _check_points(source, name="source", batched=False)  # (68, 2)
    if not -len(drv) <= neutral_index < len(drv):
        raise ValueError(f"neutral_index {neutral_index} out of range for {len(drv)} driver frames")
    neutral = drv[neutral_index]  # (68, 2)
    a_c, t_c = fit_similarity(neutral[STABLE_POINTS], src[STABLE_POINTS])  # (2, 2), (2,)
    a_m, t_m = fit_similarity(neutral[STABLE_POINTS], drv[:, STABLE_POINTS])  # (N, 2, 2), (N, 2)
    a_mi, t_mi = _invert(a_m, t_m)
    expression = _apply(a_mi, t_mi, drv) - neutral  # (N, 68, 2), in the neutral pose
    expressive = src + expression @ a_c.T  # (N, 68, 2), source in its own pose
    # G_t = C M_t C^-1: x -> A_C (A_M (A_C^-1 (x - t_C)) + t_M) + t_C
    a_ci, t_ci = _invert(a_c, t_c)
    a_g = a_c @ a_m @ a_ci  # (N, 2, 2)
    t_g = (a_c @ (a_m @ t_ci[:, None] + t_m[..., None]))[..., 0] + t_c  # (N, 2)
    return _apply(a_g, t_g, expressive).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Procedural talking driver. Displacements are in face units (inter-ocular distance, IOD) along
# the face's own axes: +x from the subject's right eye to their left eye, +y towards the chin.

_JAW_WEIGHT = np.sin(np.pi * np.arange(17) / 16) ** 2  # chin (8) follows the jaw fully, ears not
# (point, lip-drop weight): lower lip and inner lower lip ride the jaw; corners half.
_LOWER_LIP = {55: 0.55, 56: 0.9, 57: 1.0, 58: 0.9, 59: 0.55, 65: 0.9, 66: 1.0, 67: 0.9}
_UPPER_LIP = {49: 0.5, 50: 0.8, 51: 1.0, 52: 0.8, 53: 0.5, 61: 0.8, 62: 1.0, 63: 0.8}
_CORNERS = {48: -1.0, 54: 1.0, 60: -1.0, 64: 1.0}  # sign of +x for each mouth corner
_LIDS = ((37, 41), (38, 40), (43, 47), (44, 46))  # (upper, lower) eyelid pairs
_BROW_WEIGHT = np.array([0.5, 0.8, 1.0, 1.0, 0.9, 0.9, 1.0, 1.0, 0.8, 0.5])  # points 17..26
# Extra depth (in cylinder radii) of the nose above the face's cylinder: bridge 27-30, tip 30.
_NOSE_DEPTH = np.zeros(NUM_POINTS)
_NOSE_DEPTH[27:36] = [0.1, 0.2, 0.3, 0.45, 0.25, 0.3, 0.35, 0.3, 0.25]

# Amplitudes in IOD (lengths) and degrees (angles): conversational values, tuned by eye on
# rasterized previews (not fitted to recorded speech).
JAW_DROP = 0.18  # chin displacement at a fully open syllable
LIP_DROP = 0.25  # lower-lip displacement (the lip parts from the teeth a little beyond the jaw)
LIP_RAISE = 0.05  # upper lip goes up as the mouth opens
MOUTH_WIDTH = 0.05  # corner displacement for "ee" (+) / "oo" (-) syllables
BROW_RAISE = 0.13
HEAD_ROLL_DEG, HEAD_YAW_DEG, HEAD_PITCH_DEG = 3.0, 9.0, 5.0
HEAD_SHIFT = 0.06  # slow drift of the whole head


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _bump(time: np.ndarray, start: float, rise: float, hold: float, fall: float) -> np.ndarray:
    """0 -> 1 over `rise` s from `start`, 1 for `hold` s, back to 0 over `fall` s (smoothstep edges)."""
    up = _smoothstep((time - start) / rise)
    down = 1 - _smoothstep((time - start - rise - hold) / fall)
    return np.minimum(up, down)


def _wander(rng: np.random.Generator, time: np.ndarray, *, low_hz: float, high_hz: float) -> np.ndarray:
    """Smooth random signal in about [-1, 1]: three sinusoids of random frequency and phase."""
    freq = rng.uniform(low_hz, high_hz, 3)
    phase = rng.uniform(0, 2 * np.pi, 3)
    weight = np.array([1.0, 0.6, 0.35])
    return (weight[:, None] * np.sin(2 * np.pi * freq[:, None] * time + phase[:, None])).sum(0) / weight.sum()


def _speech(rng: np.random.Generator, time: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phrases of syllables separated by pauses -> mouth opening [0, 1], width [-1, 1], phrase mask."""
    opening, width, phrase = np.zeros_like(time), np.zeros_like(time), np.zeros_like(time)
    t = 0.5  # the first half second stays neutral
    while t < time[-1]:
        end = t + rng.uniform(1.2, 3.2)
        phrase = np.maximum(phrase, _bump(time, t - 0.2, 0.2, end - t, 0.3))
        while t < end:
            length = rng.uniform(0.14, 0.30)  # one syllable: 3-8 frames at 25 fps
            shape = _bump(time, t, 0.45 * length, 0.1 * length, 0.45 * length)
            opening = np.maximum(opening, rng.uniform(0.35, 1.0) * shape)
            width += rng.uniform(-1.0, 1.0) * shape
            t += length * rng.uniform(0.85, 1.0)  # syllables run into each other
        t += rng.uniform(0.25, 0.9)  # pause
    return opening, np.clip(width, -1, 1), phrase


def _events(
    rng: np.random.Generator, time: np.ndarray, *, gap: tuple[float, float], first: float
) -> list[float]:
    starts, t = [], first + rng.uniform(0, gap[1] - gap[0])
    while t < time[-1]:
        starts.append(t)
        t += rng.uniform(*gap)
    return starts


def _face_frame(base: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre (2,), axes (2, 2) rows = unit +x, +y of the face, and IOD in pixels."""
    right, left = base[RIGHT_EYE].mean(0), base[LEFT_EYE].mean(0)
    iod = float(np.linalg.norm(left - right))
    if iod < 1e-6:
        raise ValueError("base face has coincident eyes; cannot size the motion")
    ex = (left - right) / iod
    ey = np.array([-ex[1], ex[0]])  # ex turned 90 degrees towards the chin (y is down)
    return base.mean(0), np.stack([ex, ey]), iod


def _expression(
    local: np.ndarray, opening: np.ndarray, width: np.ndarray, blink: np.ndarray, brow: np.ndarray
) -> np.ndarray:
    """Apply mouth, blink and brow motion to (68, 2) face-unit points -> (N, 68, 2)."""
    out = np.repeat(local[None], len(opening), axis=0)  # (N, 68, 2)
    o = opening[:, None]
    out[:, :17, 1] += JAW_DROP * o * _JAW_WEIGHT
    for index, weight in _LOWER_LIP.items():
        out[:, index, 1] += LIP_DROP * weight * opening
    for index, weight in _UPPER_LIP.items():
        out[:, index, 1] -= LIP_RAISE * weight * opening
    for index, sign in _CORNERS.items():
        out[:, index, 1] += 0.35 * LIP_DROP * opening
        out[:, index, 0] += sign * (MOUTH_WIDTH * width - 0.04 * opening)  # opening narrows a little
    # Blink: the upper lid travels 80% of the way to the lower one, the lower lid the other 20%.
    for upper, lower in _LIDS:
        gap = local[lower] - local[upper]  # (2,)
        out[:, upper] += 0.8 * blink[:, None] * gap
        out[:, lower] -= 0.2 * blink[:, None] * gap
    out[:, 17:27, 1] -= BROW_RAISE * brow[:, None] * _BROW_WEIGHT
    for upper, _ in _LIDS:  # raised brows open the eyes slightly
        out[:, upper, 1] -= 0.02 * brow
    return out


def _head_pose(local: np.ndarray, roll: np.ndarray, yaw: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """Rotate (N, 68, 2) face-unit points by per-frame angles (radians) using a pseudo-depth.

    Depth: a cylinder as wide as the jaw, the nose standing out of it. Yaw then compresses the
    side turning away and moves the nose most; pitch moves the inner face against the outline.
    """
    x, y = local[..., 0], local[..., 1]  # (N, 68)
    radius = 0.5 * (local[0, 16, 0] - local[0, 0, 0])
    z = np.sqrt(np.clip(radius**2 - x**2, 0, None)) + radius * _NOSE_DEPTH  # (N, 68)
    yw, pt, rl = yaw[:, None], pitch[:, None], roll[:, None]
    x1 = x * np.cos(yw) + z * np.sin(yw)
    z1 = -x * np.sin(yw) + z * np.cos(yw)
    y1 = y * np.cos(pt) + z1 * np.sin(pt)  # pitch > 0 nods down: the nose drops the most
    x2 = x1 * np.cos(rl) - y1 * np.sin(rl)
    y2 = x1 * np.sin(rl) + y1 * np.cos(rl)
    return np.stack([x2, y2], axis=-1)


def synthetic_talking(base: np.ndarray, *, frames: int, fps: float, seed: int = 0) -> np.ndarray:
    """A talking-head driving sequence made from one neutral face shape: (68, 2) -> (frames, 68, 2).

    Speech-like mouth opening (syllables of 0.14-0.3 s in phrases of 1.2-3.2 s with pauses),
    blinks every 2.5-4.5 s (about 0.25 s each), occasional eyebrow raises, and gentle head roll,
    yaw and nod with a slow drift. Amplitudes scale with the face's inter-ocular distance and
    follow its orientation, so `base` may be any size or position in pixels. Frame 0 is `base`
    itself (the neutral frame `transfer_motion` measures from); all motion fades in over 0.5 s.
    Deterministic for a given `seed`. `base` should be a closed-mouth, open-eyed face.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    pts = _check_points(base, name="base", batched=False)
    centre, axes, iod = _face_frame(pts)
    local = (pts - centre) @ axes.T / iod  # (68, 2) face units
    rng = np.random.default_rng(seed)
    time = np.arange(frames) / fps  # (N,)
    fade = _smoothstep(time / 0.5)

    opening, width, phrase = _speech(rng, time)
    blink = np.zeros_like(time)
    for start in _events(rng, time, gap=(2.5, 4.5), first=0.8):
        blink = np.maximum(blink, _bump(time, start, 0.07, 0.04, 0.14))
    brow = np.zeros_like(time)
    for start in _events(rng, time, gap=(3.0, 6.0), first=1.5):
        brow = np.maximum(brow, rng.uniform(0.5, 1.0) * _bump(time, start, 0.25, rng.uniform(0.2, 0.6), 0.4))

    deg = np.pi / 180
    smooth = np.convolve(opening, np.ones(5) / 5)[2 : 2 + frames]  # centred 5-frame mean, (N,)
    nod = 0.4 * smooth * phrase  # small emphasis nods with speech
    roll = HEAD_ROLL_DEG * deg * _wander(rng, time, low_hz=0.08, high_hz=0.3)
    yaw = HEAD_YAW_DEG * deg * _wander(rng, time, low_hz=0.05, high_hz=0.25)
    pitch = HEAD_PITCH_DEG * deg * (0.6 * _wander(rng, time, low_hz=0.1, high_hz=0.4) + nod)
    shift = HEAD_SHIFT * np.stack([_wander(rng, time, low_hz=0.05, high_hz=0.2) for _ in range(2)], -1)

    moved = _expression(local, opening * fade, width * fade, blink * fade, brow * fade)  # (N, 68, 2)
    posed = _head_pose(moved, roll * fade, yaw * fade, pitch * fade) + (shift * fade[:, None])[:, None]
    return (centre + iod * posed @ axes).astype(np.float32)
