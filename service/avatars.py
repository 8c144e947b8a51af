"""Making an avatar: photos -> landmarks -> face crops -> embedder -> stored psi (AdaIN parameters).

The crop is training's (training/finetune.py prepare_images): the largest face's landmarks,
facekit.crop.crop_box at the model's crop scale, facekit.crop.crop to S x S, points transformed
into the crop, landmark images drawn with the model's DrawStyle. psi = mean of the embedder's
`adain` outputs over the K photos (= P·mean(e), P being linear), stored with mean(e), the K face
crops and their landmarks, and the first photo for paste-back.

Work is bounded by what was sent: `probe` reads every photo's header before anything is decoded
(bytes and pixels per photo, pixels of all the photos together, supplied landmarks within their
photo and describing a face whose full-resolution crop is at most twice the photo), then
`prepare_one` decodes, detects and crops one photo at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from api.talkinghead.v1 import avatar_pb2
from facekit.contract import ModelInfo
from facekit.crop import crop_box, crop_face
from facekit.detect import LandmarkDetector
from facekit.pasteback import Portrait
from facekit.rasterize import draw_batch
from service.errors import invalid
from service.images import decode_image, encode_jpeg, encode_png, probe_image
from service.landmarks import parse_points
from service.store import AvatarRecord

MAX_DISPLAY_NAME = 256
PORTRAIT_QUALITY = 95  # JPEG quality of the stored source photo (paste-back blends into it)


@dataclass(frozen=True, kw_only=True)
class Prepared:
    crops: np.ndarray  # (K, S, S, 3) uint8
    points: np.ndarray  # (K, 68, 2) float32 in the crops
    reports: list[dict[str, object]]  # ImageReport fields per photo
    portrait: Portrait  # the first photo (<= 1024 px) and its crop box: what paste-back blends into


@dataclass(frozen=True, kw_only=True)
class PreparedImage:
    crop: np.ndarray  # (S, S, 3) uint8
    points: np.ndarray  # (68, 2) float32 in the crop
    report: dict[str, object]
    portrait: Portrait | None  # the photo (<= 1024 px) when asked for (the first photo's)


def max_crop_side(width: int, height: int, size: int) -> int:
    """The largest face crop a (width, height) photo may need: twice its side (the geometric mean of
    width and height: 4 times its area), or 4 S.

    A crop is cut at full resolution before it is resized to S, so its cost is its side squared;
    landmarks found in a photo, or lying within it, never need more."""
    return max(round(2 * math.sqrt(width * height)), 4 * size)


def probe(
    images: Sequence[avatar_pb2.SourceImage],
    *,
    crop_scale: float,
    size: int,
    max_bytes: int,
    max_pixels: int,
    max_request_pixels: int,
) -> list[tuple[int, int]]:
    """(width, height) of every photo from its header, before anything is decoded: each within
    the byte and pixel limits, all together within `max_request_pixels`, supplied landmarks within
    their photo (landmarks.FRAME_MARGIN) and describing a face whose crop fits `max_crop_side`.
    Raises INVALID_ARGUMENT naming the photo and the limit."""
    sizes = []
    for index, source in enumerate(images):
        what = f"image {index}"
        width, height = probe_image(source.data, max_bytes=max_bytes, max_pixels=max_pixels, what=what)
        sizes.append((width, height))
        if source.HasField("landmarks"):
            points = parse_points(source.landmarks.xy, what=f"{what} landmarks", frame=(width, height))
            side = crop_box(points, crop_scale).side
            limit = max_crop_side(width, height, size)
            if side > limit:
                raise invalid(
                    f"{what} landmarks: the face they describe needs a crop of {side} px a side; a "
                    f"{width}x{height} photo allows at most {limit} px (a face inside the photo)"
                )
    total = sum(w * h for w, h in sizes)
    if total > max_request_pixels:
        raise invalid(
            f"the images have {total} pixels in all ({', '.join(f'{w}x{h}' for w, h in sizes)}); the "
            f"limit per request is {max_request_pixels} pixels: send fewer or smaller photos"
        )
    return sizes


def prepare_one(
    index: int,
    source: avatar_pb2.SourceImage,
    info: ModelInfo,
    detector: LandmarkDetector,
    *,
    max_bytes: int,
    max_pixels: int,
    portrait: bool,
) -> PreparedImage:
    """Decode one photo, find and crop its face (blocking: run in a worker thread); `probe` has
    checked its header and landmarks."""
    size = info.image_size
    what = f"image {index}"
    rgb = decode_image(source.data, max_bytes=max_bytes, max_pixels=max_pixels, what=what)
    height, width = rgb.shape[:2]
    warnings: list[str] = []
    faces_found = 0
    if source.HasField("landmarks"):
        face_points = parse_points(source.landmarks.xy, what=f"{what} landmarks", frame=(width, height))
    else:
        faces = detector.detect(rgb)
        faces_found = len(faces)
        if not faces:
            raise invalid(
                f"{what}: no face found ({width}x{height} pixels); send a clearer photo or its landmarks"
            )
        if len(faces) > 1:
            warnings.append(f"{len(faces)} faces found; the largest was used")
        face_points = faces[0].points
    face_crop, crop_points, box = crop_face(rgb, face_points, size, scale=info.crop_scale)
    if box.side < size:
        warnings.append(f"small face: crop of {box.side} px is upscaled to {size} px (may look soft)")
    x0, y0 = box.cx - box.side / 2, box.cy - box.side / 2
    if x0 < 0 or y0 < 0 or x0 + box.side > width or y0 + box.side > height:
        warnings.append("the face crop extends beyond the photo; that part is filled with black")
    report: dict[str, object] = {
        "index": index,
        "faces_found": faces_found,
        "landmarks_supplied": source.HasField("landmarks"),
        "width": width,
        "height": height,
        "crop_side": box.side,
        "warnings": warnings,
    }
    return PreparedImage(
        crop=face_crop,
        points=crop_points,
        report=report,
        portrait=Portrait.from_photo(rgb, box) if portrait else None,
    )


def combine(parts: Sequence[PreparedImage]) -> Prepared:
    """The photos' crops and reports together; the first photo is the paste-back portrait."""
    portrait = parts[0].portrait
    assert portrait is not None, "the first photo is prepared with its portrait"
    return Prepared(
        crops=np.stack([p.crop for p in parts]),
        points=np.stack([p.points for p in parts]).astype(np.float32),
        reports=[p.report for p in parts],
        portrait=portrait,
    )


def landmark_images(prepared: Prepared, info: ModelInfo) -> np.ndarray:
    return draw_batch(prepared.points, info.image_size, info.draw_style)  # (K, S, S, 3)


def make_record(
    avatar_id: str,
    display_name: str,
    prepared: Prepared,
    embedding: np.ndarray,
    adain: np.ndarray,
    info: ModelInfo,
    consent: dict[str, Any],
) -> AvatarRecord:
    """embedding (K, 512), adain (K, D) from the embedder -> the avatar's record."""
    k = len(prepared.crops)
    assert embedding.shape == (k, info.embedding_size) and adain.shape == (k, info.adain_size), (
        embedding.shape,
        adain.shape,
    )
    return AvatarRecord(
        avatar_id=avatar_id,
        adain=adain.mean(axis=0).astype(np.float32),
        embedding=embedding.mean(axis=0).astype(np.float32),
        points=prepared.points[0],
        model_id=info.model_id,
        image_size=info.image_size,
        create_time=time.time(),
        display_name=display_name,
        images=prepared.reports,
        preview_png=encode_png(prepared.crops[0], 6),
        crops=prepared.crops,
        crop_points=prepared.points,
        portrait_jpeg=encode_jpeg(prepared.portrait.image, PORTRAIT_QUALITY),
        portrait_box=(prepared.portrait.box.cx, prepared.portrait.box.cy, prepared.portrait.box.side),
        consent=consent,
    )


def check_request(request: avatar_pb2.CreateAvatarRequest, max_images: int) -> None:
    if not 1 <= len(request.images) <= max_images:
        raise invalid(f"an avatar needs 1-{max_images} images, got {len(request.images)}")
    if len(request.display_name) > MAX_DISPLAY_NAME:
        raise invalid(
            f"display_name is {len(request.display_name)} characters; the limit is {MAX_DISPLAY_NAME}"
        )
