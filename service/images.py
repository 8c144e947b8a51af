"""Image bytes in and out: safe decoding of client images, fast encoding of generated frames.

(Clients decode the frames with client.library.decode_frame.)
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from api.talkinghead.v1 import animation_pb2
from service.errors import invalid

FORMATS = ("JPEG", "PNG", "WEBP")
JPEG_QUALITY = 90  # default when the stream asks for 0
PNG_LEVEL = 1  # default zlib level: fast; level 9 saves ~10 % for ~5x the time


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, what: str) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> uint8 RGB (H, W, 3), EXIF orientation applied.

    Raises ServiceError(INVALID_ARGUMENT) naming `what` when the bytes are empty, too many,
    undecodable, another format, or the picture has more than `max_pixels` pixels (checked from
    the header, before decoding, so a decompression bomb costs nothing).
    """
    if not data:
        raise invalid(f"{what}: empty image")
    if len(data) > max_bytes:
        raise invalid(f"{what}: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise invalid(f"{what}: unsupported image format {image.format}; send JPEG, PNG or WebP")
            width, height = image.size
            if width * height > max_pixels:
                raise invalid(f"{what}: {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
            upright = ImageOps.exif_transpose(image)
            if upright.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: convert("RGB") clips to white
                grey = (np.asarray(upright, np.float64) / 257.0).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(upright.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        # the decoder's own words name internals (object addresses, decoder states): not sent back
        raise invalid(f"{what}: cannot decode the image: not a valid JPEG, PNG or WebP file") from None


def encode_png(image: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    ok, buf = cv2.imencode(
        ".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, level]
    )
    assert ok
    return buf.tobytes()


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    assert ok
    return buf.tobytes()


def decode_stored(data: bytes) -> np.ndarray:
    """An image the service encoded itself (PNG/JPEG) -> uint8 RGB (H, W, 3)."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("stored image does not decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def encode_frame(image: np.ndarray, encoding: int, quality: int) -> bytes:
    """uint8 RGB (H, W, 3) -> bytes in `encoding` (an OutputEncoding value; UNSPECIFIED = JPEG)."""
    if encoding == animation_pb2.OUTPUT_ENCODING_RAW_RGB:
        return np.ascontiguousarray(image).tobytes()
    if encoding == animation_pb2.OUTPUT_ENCODING_PNG:
        return encode_png(image, quality or PNG_LEVEL)
    return encode_jpeg(image, quality or JPEG_QUALITY)
