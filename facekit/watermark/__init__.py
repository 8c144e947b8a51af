"""An invisible, keyed watermark on generated frames: "synthetic, made by this deployment" + 32 bits.

    from facekit.watermark import Watermarker, payload_for
    wm = Watermarker(key=secret)                         # the deployment's secret (settings, never code)
    frame = wm.mark(frame, payload_for(tenant, avatar))  # every frame the service sends
    wm.detect(image)  # -> Detection(present, score, confidence, payload, window)

Design (measured in docs/watermark.json, `python -m facekit.watermark.bench`):
- carriers.py: the key -> 93 orthonormal pseudo-random patterns on a 128 x 128 grid stretched over
  the frame, in the band 12-36 cycles per frame side (so scaling the frame keeps the pattern, a crop
  shows a scaled, shifted window of it); one is the sync pattern, 92 carry the payload bits.
- code.py: 32-bit payload + CRC-8, K = 7 rate-1/2 convolutional code (92 coded bits), soft Viterbi.
- embed.py: the pattern added to luma (equally to R, G, B), scaled by the frame's texture (a mask
  of 0.8-1.5), RMS 3.5 grey levels (PSNR ~37.5 dB against the unmarked frame).
- detect.py: whitening (phase-only spectrum + local energy normalisation), an exhaustive search
  over window scale (crops up to 15%) and offset for the sync pattern, then the payload at the peak;
  present when the score reaches 6, or 4.5 with a payload whose CRC matches.
- attacks.py, bench*.py: the edits a frame meets after the service, and the measurement.
- keys.py: the key from the environment, the payload of a tenant and an avatar.
Torch-free: numpy and OpenCV only.
"""

from facekit.watermark.detect import MAX_CROP, THRESHOLD, THRESHOLD_WITH_PAYLOAD
from facekit.watermark.keys import KEY_ENV, MissingKeyError, key_from_env, payload_for, require_key
from facekit.watermark.watermarker import Detection, VideoDetection, Watermarker

__all__ = [
    "KEY_ENV",
    "MAX_CROP",
    "THRESHOLD",
    "THRESHOLD_WITH_PAYLOAD",
    "Detection",
    "MissingKeyError",
    "VideoDetection",
    "Watermarker",
    "key_from_env",
    "payload_for",
    "require_key",
]
