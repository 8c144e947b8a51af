"""Image bytes in and out: safe decoding of client images, fast encoding of generated frames.

(Clients decode the frames with client.library.decode_frame.)
"""

from __future__ import annotations

import io
import struct
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from api.talkinghead.v1 import animation_pb2
from service.errors import invalid

FORMATS = ("JPEG", "PNG", "WEBP")
# Pillow's name for a JPEG carrying Multi-Picture data (many phone cameras write it): the first
# picture is the JPEG itself, the only one decoded
_AS_JPEG = ("MPO",)
JPEG_QUALITY = 90  # default when the stream asks for 0
PNG_LEVEL = 1  # default zlib level: fast; level 9 saves 3-4 % for ~3x the time (128-512 px frames)
# The PNG level a frame larger than LARGE_FRAME pixels (paste_back, up to 1024 px) is encoded at,
# at most: a 1024 px frame took 56 / 81 / 249 / 1,061 ms at levels 1 / 3 / 6 / 9 for 1.37 / 1.31
# / 1.24 / 1.22 MB, outside admission and the batcher's cost model (four such streams took a live
# stream's p50 from 31 to 261 ms, helper-74); a 128 px one 1.2-3.8 ms at any level.
LARGE_FRAME, LARGE_FRAME_PNG_LEVEL = 256 * 256, 3
# What an image may cost to decode beyond its pixel count (helper-74 measured each, on 2 cores):
# a progressive JPEG's every scan walks every block again (one 36-Mpx image of 13,000 one-byte
# scans, 1 MB: 33 CPU-s, holding the detect thread; a camera's has ~10, jpegtran's ~10, mozjpeg's
# ~20); every segment before the picture is parsed in Python, twice (2.6 million empty APP5
# segments, 10 MB: 3.4 CPU-s a pass; a camera's JPEG has ~10-30, ICC profiles split into <= 255);
# every PNG chunk too (870,000 empty chunks: 2.2 CPU-s; libpng writes 8 KiB IDATs: ~1,300 in
# 10 MB); and a WebP declaring 6300x6300 of one colour is 38 bytes (0.64 s and +624 MB to decode).
# Deflate cannot pass ~1,032:1, so no 8-bit PNG reaches 1,100 pixels a byte; photos are < 100.
MAX_JPEG_SCANS = 100
MAX_JPEG_SEGMENTS = 512  # before the first scan
MAX_PNG_CHUNKS = 8192
MAX_PIXELS_PER_BYTE = 2048
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})  # TEM, RSTn, SOI, EOI: no length


def _check_structure(data: bytes, what: str) -> None:
    """Refuse, before any decoder sees it, an image whose container would cost far more to parse
    or decode than its size (the limits above). A structure this walk cannot follow is left to
    the decoder, which refuses it."""
    if data[:2] == b"\xff\xd8":
        scans = data.count(b"\xff\xda")  # (0xFF in coded data is stuffed: FF 00, so none is a scan)
        if scans > MAX_JPEG_SCANS:
            raise invalid(f"{what}: the JPEG has {scans} scans, more than the limit of {MAX_JPEG_SCANS}")
        position, segments = 2, 0
        while position + 4 <= len(data) and data[position] == 0xFF:
            marker = data[position + 1]
            if marker == 0xFF:  # fill byte
                position += 1
                continue
            if marker == 0xDA:  # the first scan: the picture's header is behind
                return
            segments += 1
            if segments > MAX_JPEG_SEGMENTS:
                raise invalid(
                    f"{what}: the JPEG has more than {MAX_JPEG_SEGMENTS} segments before its picture"
                )
            position += (
                2 if marker in _JPEG_STANDALONE else 2 + struct.unpack_from(">H", data, position + 2)[0]
            )
    elif data[:8] == _PNG_SIGNATURE:
        position, chunks = 8, 0
        while position + 8 <= len(data):
            length, kind = struct.unpack_from(">I4s", data, position)
            chunks += 1
            if chunks > MAX_PNG_CHUNKS:
                raise invalid(f"{what}: the PNG has more than {MAX_PNG_CHUNKS} chunks")
            if kind == b"IEND":
                return
            position += 12 + length


def _open(data: bytes, *, max_bytes: int, max_pixels: int, what: str) -> Image.Image:
    """The image with only its header read, or ServiceError(INVALID_ARGUMENT) naming `what`."""
    if not data:
        raise invalid(f"{what}: empty image")
    if len(data) > max_bytes:
        raise invalid(f"{what}: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    _check_structure(data, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own bound (~179 million pixels) is far above ours
        raise invalid(f"{what}: the image has more pixels than the limit of {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise invalid(CANNOT_DECODE.format(what=what)) from None
    if image.format not in FORMATS and image.format not in _AS_JPEG:
        raise invalid(f"{what}: unsupported image format {image.format}; send JPEG, PNG or WebP")
    width, height = image.size
    if width * height > max_pixels:
        raise invalid(f"{what}: {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    if width * height > MAX_PIXELS_PER_BYTE * len(data):
        raise invalid(
            f"{what}: {width}x{height} pixels from {len(data)} bytes: more than {MAX_PIXELS_PER_BYTE} "
            "pixels a byte (a picture of one colour, or a decompression bomb)"
        )
    return image


# the decoder's own words name internals (object addresses, decoder states): not sent back
CANNOT_DECODE = "{what}: cannot decode the image: not a valid JPEG, PNG or WebP file"
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that turn the picture a quarter


def probe_image(data: bytes, *, max_bytes: int, max_pixels: int, what: str) -> tuple[int, int]:
    """(width, height) of the picture `decode_image` would return (EXIF orientation applied), from
    the header alone: the same checks, nothing decoded."""
    image = _open(data, max_bytes=max_bytes, max_pixels=max_pixels, what=what)
    width, height = image.size
    try:
        if image.format == "PNG":  # getexif() decodes a PNG whole to look behind its pixels
            exif = Image.Exif()
            exif.load(image.info.get("exif") or b"")
        else:
            exif = image.getexif()
        orientation = exif.get(0x0112)
    except Exception:  # a broken EXIF block: decode_image's exif_transpose fails or ignores it
        orientation = None
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, what: str) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> uint8 RGB (H, W, 3), EXIF orientation applied.

    Raises ServiceError(INVALID_ARGUMENT) naming `what` when the bytes are empty, too many,
    undecodable, another format, or the picture has more than `max_pixels` pixels (checked from
    the header, before decoding, so a decompression bomb costs nothing).
    """
    image = _open(data, max_bytes=max_bytes, max_pixels=max_pixels, what=what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            ImageOps.exif_transpose(image, in_place=True)  # decodes; a copy only where it turns
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: convert("RGB") clips to white
                grey = np.asarray(image)
                grey = (grey // 257 if grey.dtype.kind == "u" else np.clip(grey, 0, 65535) // 257).astype(
                    np.uint8
                )
                return np.repeat(grey[..., None], 3, axis=2)
            if image.mode != "RGB":
                image = image.convert("RGB")
            return _pixels(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise invalid(CANNOT_DECODE.format(what=what)) from None


STRIP_ROWS = 256


def _pixels(image: Image.Image) -> np.ndarray:
    """An RGB image's pixels as a (H, W, 3) array, copied a strip of rows at a time: np.asarray
    copies the whole picture through tobytes first, beside Pillow's own (4 bytes a pixel). A
    12-million-pixel photo peaked at 206 MiB decoding, now at 80 MiB."""
    width, height = image.size
    pixels = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, STRIP_ROWS):
        bottom = min(top + STRIP_ROWS, height)
        pixels[top:bottom] = np.asarray(image.crop((0, top, width, bottom)))
    return pixels


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
        level = quality or PNG_LEVEL
        if image.shape[0] * image.shape[1] > LARGE_FRAME:
            level = min(level, LARGE_FRAME_PNG_LEVEL)
        return encode_png(image, level)
    return encode_jpeg(image, quality or JPEG_QUALITY)
