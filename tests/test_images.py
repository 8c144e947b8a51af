"""Decoding what clients send: the picture as its author meant it, and errors that say what was
wrong without the decoder's internals."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from service.errors import ServiceError
from service.images import decode_image, probe_image

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 1 << 20, "what": "image 0"}


def test_a_16_bit_grey_png_keeps_its_picture() -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")  # mode I;16
    decoded = decode_image(buffer.getvalue(), **LIMITS)  # type: ignore[arg-type]
    assert decoded.shape == (64, 64, 3) and decoded.dtype == np.uint8
    expected = (ramp.astype(np.float64) / 257).astype(np.uint8)
    assert np.abs(decoded[..., 0].astype(int) - expected).max() <= 1, "not clipped to white"


def test_undecodable_bytes_say_what_without_internals() -> None:
    with pytest.raises(ServiceError) as raised:
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, **LIMITS)  # type: ignore[arg-type]
    message = raised.value.message
    assert message.startswith("image 0: cannot decode the image")
    assert "0x" not in message and "BytesIO" not in message and "Error" not in message


def test_a_phone_cameras_jpeg_with_multi_picture_data_is_a_jpeg() -> None:
    """Many cameras write Multi-Picture (MPO) data into their JPEGs; Pillow names the format MPO
    and such a photo was refused as "unsupported image format MPO". Its first picture is the JPEG."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    second = Image.fromarray(np.zeros((48, 64, 3), np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="MPO", save_all=True, append_images=[second], quality=95)
    data = buffer.getvalue()
    assert data[:2] == b"\xff\xd8" and Image.open(io.BytesIO(data)).format == "MPO"
    plain = io.BytesIO()
    Image.open(io.BytesIO(data)).save(plain, format="PNG")  # the first picture, as decoded
    decoded = decode_image(data, **LIMITS)  # type: ignore[arg-type]
    assert decoded.shape == (48, 64, 3)
    assert np.array_equal(decoded, decode_image(plain.getvalue(), **LIMITS))  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "CMYK"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_photo_decodes_upright_to_the_pixels_pillow_shows(mode: str, orientation: int) -> None:
    """decode_image turns and converts in place and copies row strips (service/images.py _pixels:
    a 12-million-pixel photo peaked at 206 MiB, now 86); the pixels are those of Pillow's own
    exif_transpose + convert("RGB"), for any mode and EXIF orientation, over several strips."""
    rng = np.random.default_rng(orientation)
    picture = Image.fromarray(rng.integers(0, 255, (600, 40, 3), dtype=np.uint8)).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG" if mode == "CMYK" else "PNG", exif=exif.tobytes())
    data = buffer.getvalue()
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    decoded = decode_image(data, **LIMITS)  # type: ignore[arg-type]
    assert decoded.shape == expected.shape == ((600, 40, 3) if orientation in (1, 3) else (40, 600, 3))
    assert np.array_equal(decoded, expected)


# ---- images that cost far more to decode than their size (helper-74) ---------------------------


def _photo(fmt: str = "JPEG", **options: object) -> bytes:
    """A small picture with detail (a gradient and noise: not one colour)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:128]
    pixels = np.stack([x * 2, y * 2, (x + y)], axis=2) + rng.integers(0, 40, (96, 128, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _refused(data: bytes, **limits: object) -> str:
    with pytest.raises(ServiceError) as raised:
        decode_image(data, **{**LIMITS, **limits})  # type: ignore[arg-type]
    with pytest.raises(ServiceError):
        probe_image(data, **{**LIMITS, **limits})  # type: ignore[arg-type]
    return raised.value.message


def test_a_progressive_jpeg_of_endless_scans_is_refused_before_decoding() -> None:
    """Each scan walks every block again: 13,000 one-byte scans of a 36-Mpx picture (1 MB) held
    the server's detect thread for 33 CPU-s. An ordinary progressive JPEG (Pillow's: ~10) decodes."""
    progressive = _photo(progressive=True)
    assert decode_image(progressive, **LIMITS).shape == (96, 128, 3)  # type: ignore[arg-type]
    last = progressive.rindex(b"\xff\xda")
    scan, end = progressive[last:-2], progressive[-2:]  # the last scan, EOI
    bomb = progressive[:-2] + scan * 200 + end
    assert _refused(bomb).startswith("image 0: the JPEG has 2")  # (its own scans and 200 more)
    assert "more than the limit of 100" in _refused(bomb)


def test_a_jpeg_padded_with_segments_is_refused_before_its_header_is_parsed() -> None:
    """Every segment before the picture is parsed in Python, twice: 2.6 million empty APP5
    segments (10 MB) took 3.4 CPU-s a pass. A hundred, as a camera might write, decode."""
    photo = _photo()
    padded = lambda n: photo[:2] + b"\xff\xe5\x00\x02" * n + photo[2:]  # noqa: E731
    assert decode_image(padded(100), **LIMITS).shape == (96, 128, 3)  # type: ignore[arg-type]
    assert _refused(padded(600)) == "image 0: the JPEG has more than 512 segments before its picture"


def test_a_png_of_countless_chunks_is_refused_before_decoding() -> None:
    """870,000 empty chunks took 2.2 CPU-s to read through; libpng's 8 KiB IDATs are ~1,300 in
    the 10 MB a photo may have."""
    import zlib

    photo = _photo("PNG")
    chunk = b"\x00\x00\x00\x00prIv" + zlib.crc32(b"prIv").to_bytes(4, "big")
    padded = lambda n: photo[:33] + chunk * n + photo[33:]  # noqa: E731  (after IHDR)
    assert decode_image(padded(1000), **LIMITS).shape == (96, 128, 3)  # type: ignore[arg-type]
    assert _refused(padded(9000)) == "image 0: the PNG has more than 8192 chunks"


def test_a_tiny_file_of_millions_of_pixels_is_refused_from_its_header() -> None:
    """A 38-byte WebP declaring 6300x6300 of one colour decoded to +624 MB, 0.64 s; eight streams
    sent four such frames each (1.2 KB in all) for 30 CPU-s. No 8-bit PNG passes ~1,032 pixels a
    byte (deflate's bound) and photos stay under 100: 2,048 a byte is the limit."""
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 2000), (90, 120, 200)).save(buffer, format="WEBP", lossless=True)
    flat = buffer.getvalue()
    message = _refused(flat, max_pixels=40_000_000)
    assert message == (
        f"image 0: 2000x2000 pixels from {len(flat)} bytes: more than 2048 pixels a byte "
        "(a picture of one colour, or a decompression bomb)"
    )
    grey = io.BytesIO()
    Image.new("L", (1024, 1024), 0).save(grey, format="PNG", optimize=True)  # deflate's best case
    limits = {"max_pixels": 40_000_000}
    assert decode_image(grey.getvalue(), **{**LIMITS, **limits}).shape == (1024, 1024, 3)  # type: ignore[arg-type]


def test_probing_a_png_reads_its_header_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """getexif() decodes a PNG whole to look for EXIF behind its pixels: a request of 32 40-Mpx
    PNGs (3.7 MB) decoded every one (4.3 s) before being refused for 1.28 Gpx in all."""
    from PIL import PngImagePlugin

    loads: list[object] = []
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: loads.append(self))
    assert probe_image(_photo("PNG"), **LIMITS) == (128, 96)  # type: ignore[arg-type]
    assert loads == [], "the probe decoded the PNG"


def test_a_large_frame_is_never_compressed_past_png_level_3() -> None:
    """Paste-back frames up to 1024 px at PNG level 9 cost ~1 s of the server's CPU each, outside
    admission (helper-74: four such streams took a live stream's p50 from 31 to 261 ms); above
    256x256 pixels the level is 3 at most, at any size below it as asked."""
    from api.talkinghead.v1 import animation_pb2
    from service.images import encode_frame, encode_png

    rng = np.random.default_rng(1)
    large = rng.integers(0, 40, (512, 512, 3), dtype=np.uint8) + 100
    small = large[:256, :256].copy()
    png = animation_pb2.OUTPUT_ENCODING_PNG
    assert encode_frame(large, png, 9) == encode_png(large, 3) == encode_frame(large, png, 3)
    assert encode_frame(large, png, 1) == encode_png(large, 1)
    assert encode_frame(small, png, 9) == encode_png(small, 9) != encode_png(small, 3)
