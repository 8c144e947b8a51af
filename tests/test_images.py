"""Decoding what clients send: the picture as its author meant it, and errors that say what was
wrong without the decoder's internals."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from service.errors import ServiceError
from service.images import decode_image

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
