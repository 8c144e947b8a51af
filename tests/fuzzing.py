"""The fuzz suite's parts (tests/test_fuzz.py): every method of the API, requests as raw bytes.

- `METHODS`: every RPC of AvatarService, AnimationService, PersonalisationService and
  grpc.health.v1.Health, read from the service descriptors (a method added to a .proto is fuzzed
  without touching this file).
- `requests(method)`: hypothesis strategies for a method's request (a list of messages for the
  Animate stream), built from the message descriptors: every field, every scalar range, unknown
  enum values, NaN and infinities, oneofs, nesting; fields that gate deeper paths (avatar ids,
  images, landmarks, consent, operation names, page tokens) draw often from values that pass the
  first checks, so the fuzz reaches decoding, detection, streams and the generator.
- `raw_payloads(rng)`: random bytes and mutated (truncated, bit-flipped, spliced) valid
  messages, for every method.
- `call(channel, method, payloads)`: sends serialized bytes with no client-side (de)serializer
  and returns the status code name the server answered with.
"""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from hypothesis import strategies as st
from PIL import Image

from api.talkinghead.v1 import animation_pb2, avatar_pb2, personalisation_pb2
from facekit.sequence import LandmarkSequence
from tests.service_fixtures import CONSENT, DRIVER, PORTRAIT, png_bytes

SERVICES = (
    avatar_pb2.DESCRIPTOR.services_by_name["AvatarService"],
    animation_pb2.DESCRIPTOR.services_by_name["AnimationService"],
    personalisation_pb2.DESCRIPTOR.services_by_name["PersonalisationService"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],  # probes reach it before anything else
)
# Avatars the fuzz server holds from the start (Animate, Get and Personalise reach real work with
# them); DeleteAvatar and CreateAvatar draw from MUTABLE, so KEEP stays.
KEEP = ("fz-keep", "fz-keep2")
MUTABLE = ("fz-a", "fz-b", "fz-c")
ID = st.from_regex(r"[a-z0-9][a-z0-9-]{0,15}", fullmatch=True)


@dataclass(frozen=True)
class Method:
    service: str  # talkinghead.v1.AvatarService
    name: str  # CreateAvatar
    request: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


def _class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


METHODS = tuple(
    Method(
        service=service.full_name,
        name=m.name,
        request=_class(m.input_type),
        client_streaming=m.client_streaming,
        server_streaming=m.server_streaming,
    )
    for service in SERVICES
    for m in service.methods
)


# -- values that reach past the first checks --------------------------------------------------
def _png_header(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's shape; no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@cache
def images() -> tuple[bytes, ...]:
    """Encoded images, good and bad: a real face, faceless pictures of every mode, truncations,
    headers claiming huge sizes, other formats."""
    portrait = PORTRAIT.read_bytes()
    face = Image.open(PORTRAIT).convert("RGB")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    small_face = face.resize((160, 160))
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    small_face.save(rotated, format="JPEG", exif=exif.tobytes())
    return (
        portrait,
        _encoded(small_face, "JPEG", quality=80),
        _encoded(small_face, "WEBP"),
        rotated.getvalue(),
        png_bytes(np.full((8, 8, 3), 200, np.uint8)),
        _encoded(noise, "JPEG"),
        _encoded(noise.convert("CMYK"), "JPEG"),
        _encoded(noise.convert("P"), "PNG"),
        _encoded(noise.convert("LA"), "PNG"),
        _encoded(Image.fromarray(np.full((40, 40), 40000, np.uint16)), "PNG"),  # 16-bit grey
        _encoded(noise, "GIF"),
        _encoded(noise, "BMP"),
        portrait[: len(portrait) // 2],  # truncated
        portrait[:64],
        _png_header(60_000, 60_000),
        _png_header(7_000, 7_000),
        _png_header(1, 1_000_000),
        _png_header(0, 10),
        _png_header(2**31 - 1, 2**31 - 1),
        b"\xff\xd8\xff\xe0" + b"\0" * 40,  # a JPEG start, nothing else
        b"RIFF\x10\0\0\0WEBPVP8 ",
        b"not an image",
        b"",
    )


def _image(index: int) -> bytes:
    return images()[index]


# by index: a strategy's repr would otherwise hold every image's bytes (hypothesis computes it)
IMAGE = st.integers(0, len(images()) - 1).map(_image)
FACES = 4  # images()[:FACES] show a face
FACE = st.integers(0, FACES - 1).map(_image)


@cache
def driver_points() -> np.ndarray:
    return LandmarkSequence.load(DRIVER).points  # (200, 68, 2) in a 256 x 256 frame


def driver_requests(count: int) -> list[Message]:
    """The demo driver's first `count` frames as landmark frames (what a good client sends)."""
    return [_landmark_frame(i, _face_xy(i, 1.0, 0.0, 0.0, 0.0, 0), 256, 256) for i in range(count)]


def _face_xy(frame: int, scale: float, dx: float, dy: float, noise: float, seed: int) -> list[float]:
    points = driver_points()[frame % len(driver_points())] * scale + (dx, dy)
    points = points + np.random.default_rng(seed).normal(0, noise, points.shape)
    return [float(v) for v in points.astype(np.float32).reshape(-1)]


def _floats(width: int) -> st.SearchStrategy[float]:
    """Any float of this width, NaNs, infinities and subnormals included. Engines run earlier in
    this process (tests call them on the main thread) leave the CPU's flush-to-zero flags set on
    it (facekit/engines.py DENORMALS), and hypothesis then refuses st.floats with subnormals; so
    they come from raw bit patterns (a float32 one reads back as 0 on such a thread)."""
    fmt, size = ("<f", 4) if width == 32 else ("<d", 8)
    raw = st.integers(0, 2 ** (8 * size) - 1).map(lambda b: struct.unpack(fmt, b.to_bytes(size, "little"))[0])
    return st.one_of(st.floats(width=width, allow_subnormal=False), raw)


FLOAT32 = _floats(32)
FLOAT64 = _floats(64)
LANDMARK_XY = st.one_of(
    st.builds(
        _face_xy,
        st.integers(0, 199),
        st.sampled_from([1.0, 1.0, 0.5, 2.0, 8.0, 64.0, 0.001, 0.0]),
        st.sampled_from([0.0, 0.0, 100.0, -300.0, 20_000.0, -131_000.0]),
        st.sampled_from([0.0, 0.0, 50.0, 5_000.0, -131_000.0]),
        st.sampled_from([0.0, 0.0, 1.0, 30.0, 1e4]),
        st.integers(0, 3),
    ),
    st.lists(FLOAT32, min_size=136, max_size=136),
    st.lists(
        st.sampled_from([0.0, 1.0, -1.0, 1e38, -1e38, float("nan"), float("inf")]), min_size=136, max_size=136
    ),
    st.lists(FLOAT32, max_size=140),
)
FRAME_SIDE = st.one_of(
    st.sampled_from([256, 256, 512, 1, 2, 16384, 16385, 0, -1]), st.integers(-(2**31), 2**31 - 1)
)


def _page_token(kind: str, rest: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{rest}".encode()).decode()


PAGE_TOKEN = st.one_of(
    st.builds(_page_token, st.sampled_from(["after", "before"]), st.text(max_size=30)),
    st.builds(
        lambda f, h: _page_token("before", f"{f!r}:{h}"),
        FLOAT64,
        st.text("0123456789abcdef", max_size=17),
    ),
    st.text(max_size=40),
)
OPERATION_NAME = st.one_of(
    st.builds(lambda h: "operations/" + h, st.text("0123456789abcdef", min_size=16, max_size=16)),
    st.text(max_size=40),
)


def _ids(known: Sequence[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(list(known)), ID, st.text(max_size=40))


# field full name -> strategy for it (its value; a repeated field's whole list)
OVERRIDES: dict[str, st.SearchStrategy[Any]] = {
    "talkinghead.v1.CreateAvatarRequest.avatar_id": _ids(MUTABLE),
    "talkinghead.v1.DeleteAvatarRequest.avatar_id": _ids(MUTABLE),
    "talkinghead.v1.GetAvatarRequest.avatar_id": _ids(KEEP + MUTABLE),
    "talkinghead.v1.StreamConfig.avatar_id": _ids(KEEP),
    "talkinghead.v1.PersonaliseAvatarRequest.avatar_id": _ids(KEEP + MUTABLE),
    "talkinghead.v1.ListOperationsRequest.avatar_id": _ids(KEEP),
    "talkinghead.v1.SourceImage.data": st.one_of(IMAGE, st.binary(max_size=64)),
    "talkinghead.v1.DrivingFrame.image": st.one_of(IMAGE, st.binary(max_size=64)),
    "talkinghead.v1.Landmarks.xy": LANDMARK_XY,
    "talkinghead.v1.LandmarkFrame.frame_width": FRAME_SIDE,
    "talkinghead.v1.LandmarkFrame.frame_height": FRAME_SIDE,
    "talkinghead.v1.StreamConfig.neutral_frame_width": FRAME_SIDE,
    "talkinghead.v1.StreamConfig.neutral_frame_height": FRAME_SIDE,
    "talkinghead.v1.StreamConfig.queue_depth": st.one_of(
        st.integers(-1, 66), st.integers(-(2**31), 2**31 - 1)
    ),
    "talkinghead.v1.ListAvatarsRequest.page_token": PAGE_TOKEN,
    "talkinghead.v1.ListOperationsRequest.page_token": PAGE_TOKEN,
    "talkinghead.v1.GetOperationRequest.name": OPERATION_NAME,
    "talkinghead.v1.CancelOperationRequest.name": OPERATION_NAME,
    "talkinghead.v1.WatchOperationRequest.name": OPERATION_NAME,
}


def _consent() -> st.SearchStrategy[Message]:
    return _often(st.just(CONSENT), message(avatar_pb2.ConsentRecord.DESCRIPTOR, depth=2))


def _often(good: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` three times in four (a valid value gets a request past the first checks)."""
    return st.sampled_from((True, True, True, False)).flatmap(lambda g: good if g else other)


# -- generic values by field type -------------------------------------------------------------
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
TEXT = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=24),
    st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "/", "\0"]), st.integers(0, 3000)),
)


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        return st.one_of(st.integers(max(low, -3), 100), st.integers(low, high), st.sampled_from([low, high]))
    if kind == FieldDescriptor.TYPE_FLOAT:
        return FLOAT32
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return FLOAT64
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return TEXT
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(values), st.integers(-(2**31), 2**31 - 1))
    if kind == FieldDescriptor.TYPE_MESSAGE:
        if field.full_name == "talkinghead.v1.CreateAvatarRequest.consent":
            return _consent()
        return message(field.message_type, depth=depth + 1)
    raise AssertionError(f"unhandled field type {kind} of {field.full_name}")


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.full_name in OVERRIDES:
        return OVERRIDES[field.full_name]
    if field.full_name == "talkinghead.v1.CreateAvatarRequest.images":
        return _source_images()
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(_scalar(key, depth), _scalar(value, depth), max_size=3)
    if field.is_repeated:
        return st.lists(_scalar(field, depth), max_size=4)
    return _scalar(field, depth)


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    out = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(out, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target.update(value)
        elif field.is_repeated:
            if field.message_type is not None:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(out, name, value)
    return out


MAX_DEPTH = 4


@cache
def message(descriptor: Descriptor, *, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of `descriptor`: each field set or not, at most one field of each oneof."""
    cls = _class(descriptor)
    if depth > MAX_DEPTH:
        return st.just(cls())
    plain = {
        f.name: _field(f, depth)
        for f in descriptor.fields
        if f.containing_oneof is None or f.containing_oneof.name.startswith("_")
    }
    choices = [
        st.one_of(
            st.just({}), *(st.builds(lambda v, n=f.name: {n: v}, _field(f, depth)) for f in oneof.fields)
        )
        for oneof in descriptor.oneofs
        if not oneof.name.startswith("_")  # proto3 `optional` is a synthetic oneof of one field
    ]
    return st.builds(
        lambda fields, *picked: _build(cls, {k: v for d in (fields, *picked) for k, v in d.items()}),
        st.fixed_dictionaries({}, optional=plain),
        *choices,
    )


# -- Animate: a stream of requests -----------------------------------------------------------
def _landmark_frame(sequence: int, xy: list[float], width: int, height: int) -> Message:
    return animation_pb2.AnimateRequest(
        landmarks=animation_pb2.LandmarkFrame(
            sequence=sequence, landmarks={"xy": xy}, frame_width=width, frame_height=height
        )
    )


def _good_config(avatar_id: str, motion: int, crop: bool, paste: bool, encoding: int) -> Message:
    return animation_pb2.AnimateRequest(
        config=animation_pb2.StreamConfig(
            avatar_id=avatar_id,
            motion=motion,  # type: ignore[arg-type]
            crop_to_face=crop,
            paste_back=paste,
            encoding=encoding,  # type: ignore[arg-type]
            overflow=animation_pb2.OVERFLOW_POLICY_BLOCK,
        )
    )


ANY_ANIMATE = message(animation_pb2.AnimateRequest.DESCRIPTOR)
FIRST = _often(
    st.builds(
        _good_config,
        st.sampled_from(KEEP),
        st.sampled_from([0, 1, 2]),
        st.booleans(),
        st.booleans(),
        st.sampled_from([1, 2, 3]),
    ),
    ANY_ANIMATE,
)
NEXT = st.one_of(
    st.builds(_landmark_frame, st.integers(0, 2**64 - 1), LANDMARK_XY, FRAME_SIDE, FRAME_SIDE),
    ANY_ANIMATE,
)
ANIMATE_STREAM = st.builds(lambda first, rest: [first, *rest], FIRST, st.lists(NEXT, max_size=3))


def _source_image(data: bytes, xy: list[float] | None) -> Message:
    image = avatar_pb2.SourceImage(data=data)
    if xy is not None:
        image.landmarks.xy.extend(xy)
    return image


SOURCE_IMAGE = _often(
    st.builds(_source_image, _often(FACE, IMAGE), st.none() | LANDMARK_XY),
    message(avatar_pb2.SourceImage.DESCRIPTOR, depth=1),
)


def _source_images() -> st.SearchStrategy[list[Message]]:
    return st.lists(SOURCE_IMAGE, max_size=4)


CREATE = st.builds(
    avatar_pb2.CreateAvatarRequest,
    avatar_id=_often(st.sampled_from(MUTABLE), _ids(MUTABLE)),
    images=st.lists(SOURCE_IMAGE, min_size=1, max_size=3),
    display_name=TEXT,
    replace=_often(st.just(True), st.booleans()),
    consent=_consent(),
)


# Frames per warm-up stream: sent at once, they queue behind the first call, so the next batches
# are as large as the server makes them (the fuzz server's MAX_BATCH is 4); 24 took 3x as long.
WARM_UP_FRAMES = 9


def warm_up_streams() -> list[list[bytes]]:
    """Animate calls that take every path of a stream to its largest allocation: each encoding,
    paste-back or not, both motions, a landmark image, batches as large as the server makes them,
    driving frames. (ONNX Runtime's arena, for one, grows with the largest batch and stays.)"""
    calls = []
    for encoding in (1, 2, 3):
        for paste in (False, True):
            for motion in (1, 2):
                config = animation_pb2.StreamConfig(
                    avatar_id=KEEP[0],
                    encoding=encoding,  # type: ignore[arg-type]
                    paste_back=paste,
                    motion=motion,  # type: ignore[arg-type]
                    queue_depth=32,
                    overflow=animation_pb2.OVERFLOW_POLICY_BLOCK,
                    include_landmark_image=True,
                )
                frames = [
                    _landmark_frame(i, _face_xy(i, 1.0, 0, 0, 0, 0), 256, 256) for i in range(WARM_UP_FRAMES)
                ]
                calls.append([animation_pb2.AnimateRequest(config=config), *frames])
    for image in images()[:FACES]:
        config = animation_pb2.StreamConfig(avatar_id=KEEP[0], paste_back=True)
        frame = animation_pb2.DrivingFrame(image=image)
        calls.append(
            [animation_pb2.AnimateRequest(config=config), animation_pb2.AnimateRequest(driving_frame=frame)]
        )
    return [[m.SerializeToString() for m in call] for call in calls]


def warm_up_creates(batch: int) -> list[bytes]:
    """CreateAvatar calls of 1 to `batch` photos, detected and with landmarks: the embedder's
    batch sizes, the detector and the encoders reach their working memory."""
    calls = []
    for count in range(1, batch + 1):
        for xy in (None, _face_xy(0, 1.0, 0.0, 0.0, 0.0, 0)):
            photos = [_source_image(images()[0], xy) for _ in range(count)]
            request = avatar_pb2.CreateAvatarRequest(
                avatar_id=MUTABLE[0], images=photos, consent=CONSENT, replace=True
            )
            calls.append(request.SerializeToString())
    return calls


def requests(method: Method) -> st.SearchStrategy[list[Message]]:
    """The messages of one call of `method` (one for unary requests)."""
    if method.client_streaming:
        return ANIMATE_STREAM
    if method.name == "CreateAvatar":
        return _often(CREATE, message(method.request.DESCRIPTOR)).map(lambda m: [m])
    return message(method.request.DESCRIPTOR).map(lambda m: [m])


# -- raw payloads -----------------------------------------------------------------------------
def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and buf:  # truncate
            del buf[rng.randrange(len(buf)) :]
        elif op == 1 and buf:  # flip bits
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 2:  # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and buf:  # overwrite with an interesting byte
            buf[rng.randrange(len(buf))] = rng.choice([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x1A, 0x22])
        elif op == 4:  # a varint field with a huge length
            buf[rng.randrange(len(buf) + 1) :] = (
                bytes([rng.choice([0x0A, 0x12, 0x1A])]) + b"\xff" * 9 + b"\x01"
            )
        elif op == 5 and buf:  # duplicate a slice
            i = rng.randrange(len(buf))
            buf[i:i] = buf[i : i + rng.randint(1, 32)]
    return bytes(buf)


@cache
def _seeds() -> tuple[bytes, ...]:
    """Valid serialized messages of every request type, the mutations' starting points."""
    face = _face_xy(0, 1.0, 0.0, 0.0, 0.0, 0)
    return (
        avatar_pb2.CreateAvatarRequest(
            avatar_id="fz-a", images=[avatar_pb2.SourceImage(data=images()[4])], consent=CONSENT
        ).SerializeToString(),
        avatar_pb2.GetAvatarRequest(avatar_id=MUTABLE[0], include_preview=True).SerializeToString(),
        avatar_pb2.ListAvatarsRequest(page_size=3, page_token=_page_token("after", "a")).SerializeToString(),
        animation_pb2.AnimateRequest(
            config=animation_pb2.StreamConfig(avatar_id=KEEP[0], queue_depth=2)
        ).SerializeToString(),
        _landmark_frame(1, face, 256, 256).SerializeToString(),
        personalisation_pb2.PersonaliseAvatarRequest(avatar_id=MUTABLE[1], steps=5).SerializeToString(),
        personalisation_pb2.GetOperationRequest(name="operations/0123456789abcdef").SerializeToString(),
        personalisation_pb2.ListOperationsRequest(avatar_id=MUTABLE[2], page_token="x").SerializeToString(),
    )


def raw_payload(rng: random.Random) -> bytes:
    """Random bytes, or a valid message of some type mutated."""
    kind = rng.random()
    if kind < 0.3:
        return rng.randbytes(rng.choice([0, 1, 2, 3, 5, 8, 16, 64, 300]))
    if kind < 0.35:
        return rng.randbytes(rng.choice([65_000, 70_000, 300_000]))  # around the small-message limit
    return _mutate(rng, rng.choice(_seeds()))


def raw_call(rng: random.Random, method: Method) -> list[bytes]:
    if method.client_streaming:
        # a valid config first (often), then raw messages: reaches the stream's reader
        first = [rng.choice(_seeds()[3:4])] if rng.random() < 0.5 else []
        return first + [raw_payload(rng) for _ in range(rng.randint(1, 3))]
    return [raw_payload(rng)]


# -- calling ----------------------------------------------------------------------------------
def call(
    channel: grpc.Channel, method: Method, payloads: list[bytes], *, timeout: float = 60.0
) -> tuple[str, str]:
    """Send `payloads` (serialized requests) to `method`: the status code name it ends with, and
    its details.

    Server-streaming calls read at most `WATCH_REPLIES` replies, then cancel (an operation's
    watch runs until the operation is done)."""
    try:
        if method.client_streaming:
            stream = channel.stream_stream(method.path, request_serializer=None, response_deserializer=None)
            for _ in stream(iter(payloads), timeout=timeout):
                pass
        elif method.server_streaming:
            watch = channel.unary_stream(method.path, request_serializer=None, response_deserializer=None)
            replies = watch(payloads[0], timeout=timeout)
            for count, _ in enumerate(replies, 1):
                if count >= WATCH_REPLIES:
                    replies.cancel()
                    break
        else:
            unary = channel.unary_unary(method.path, request_serializer=None, response_deserializer=None)
            unary(payloads[0], timeout=timeout)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
        return code.name, error.details() or ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK.name, ""


WATCH_REPLIES = 1
# A server fault: an unhandled error (UNKNOWN, INTERNAL, DATA_LOSS), a call that outlived its
# minute (work unbounded by what was sent), the server gone (UNAVAILABLE).
BAD = frozenset({"UNKNOWN", "INTERNAL", "DATA_LOSS", "DEADLINE_EXCEEDED", "UNAVAILABLE"})


def describe(payloads: list[bytes], method: Method, limit: int = 300) -> str:
    """A failing case, short: the parsed messages where they parse, else the bytes."""
    shown = []
    for data in payloads:
        try:
            text = str(method.request.FromString(data)).replace("\n", " ")
        except Exception:
            text = repr(data[:80])
        shown.append(text if len(text) <= limit else text[:limit] + "...")
    return " | ".join(shown)
