"""Requests that are not the method's message get INVALID_ARGUMENT and one log line; requests over
their method's size limit get RESOURCE_EXHAUSTED saying the limit, before anything is parsed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from api.talkinghead.v1 import animation_pb2 as pb
from api.talkinghead.v1 import avatar_pb2
from client.library import Client, to_landmarks
from facekit.sequence import LandmarkSequence
from service.errors import ServiceError
from service.server import DESCRIPTORS
from service.settings import Settings
from service.wire import MAX_MESSAGE_BYTES, Limits, add_service
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, ServerThread

CODE = grpc.StatusCode


@dataclass(frozen=True)
class Method:
    name: str
    path: str
    request: type[Message]
    client_streaming: bool
    server_streaming: bool


METHODS = [
    Method(
        name=m.name,
        path=f"/{service.full_name}/{m.name}",
        request=message_factory.GetMessageClass(m.input_type),
        client_streaming=m.client_streaming,
        server_streaming=m.server_streaming,
    )
    for service in DESCRIPTORS
    for m in service.methods
]
NOT_A_MESSAGE = b"\xff\xff\xff"  # field number 0x1fffff... with a truncated varint: no message parses it


def send(client: Client, method: Method, payloads: list[bytes]) -> grpc.RpcError:
    """The error `method` answers the serialized `payloads` with (sent as bytes, no serializer)."""
    channel = client.channel
    try:
        if method.client_streaming:
            for _ in channel.stream_stream(method.path)(iter(payloads), timeout=60):
                pass
        elif method.server_streaming:
            for _ in channel.unary_stream(method.path)(payloads[0], timeout=60):
                pass
        else:
            channel.unary_unary(method.path)(payloads[0], timeout=60)
    except grpc.RpcError as error:
        return error
    raise AssertionError(f"{method.name} accepted {payloads!r}")


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_malformed_request_is_invalid_argument_with_one_log_line(
    client: Client, method: Method, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    error = send(client, method, [NOT_A_MESSAGE])
    name = method.request.DESCRIPTOR.name
    assert error.code() == CODE.INVALID_ARGUMENT, (error.code(), error.details())
    assert error.details().startswith(f"malformed {name}: 3 bytes that are not a talkinghead.v1.{name}")
    assert "Traceback" not in error.details() and "0x" not in error.details()  # no internals
    about = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(about) == 1, about
    assert about[0].startswith(f"{method.name} from ipv4:127.0.0.1:")
    assert about[0].endswith(f": malformed {name} (3 bytes, DecodeError)")
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"


def test_a_string_that_is_not_utf8_is_malformed(client: Client) -> None:
    get = next(m for m in METHODS if m.name == "GetAvatar")
    error = send(client, get, [b"\x0a\x02\xff\xfe"])  # field 1 (avatar_id), 2 bytes, not UTF-8
    assert error.code() == CODE.INVALID_ARGUMENT and "malformed GetAvatarRequest" in error.details()


def test_a_malformed_stream_message_ends_the_stream_after_the_frames_before_it(
    client: Client, avatar: str, driver: LandmarkSequence
) -> None:
    frames = [
        pb.AnimateRequest(
            landmarks=pb.LandmarkFrame(
                sequence=i, landmarks=to_landmarks(driver.points[i]), frame_width=256, frame_height=256
            )
        ).SerializeToString()
        for i in range(2)
    ]
    start = pb.AnimateRequest(config=pb.StreamConfig(avatar_id=avatar)).SerializeToString()
    replies: list[bytes] = []
    stream = client.channel.stream_stream("/talkinghead.v1.AnimationService/Animate")
    with pytest.raises(grpc.RpcError) as raised:
        for reply in stream(iter([start, *frames, NOT_A_MESSAGE]), timeout=60):
            replies.append(reply)
    assert raised.value.code() == CODE.INVALID_ARGUMENT
    assert raised.value.details().startswith("malformed AnimateRequest")
    sequences = [pb.AnimateResponse.FromString(r).frame.sequence for r in replies[1:]]
    assert sequences == [0, 1]
    # the first message malformed: no stream is opened at all
    error = send(client, next(m for m in METHODS if m.name == "Animate"), [NOT_A_MESSAGE])
    assert error.code() == CODE.INVALID_ARGUMENT


def test_small_methods_refuse_large_messages_before_parsing(client: Client) -> None:
    get = next(m for m in METHODS if m.name == "GetAvatar")
    big = avatar_pb2.GetAvatarRequest(avatar_id="x" * 70_000).SerializeToString()
    error = send(client, get, [big])
    assert error.code() == CODE.RESOURCE_EXHAUSTED
    assert error.details() == (
        f"GetAvatarRequest of {len(big)} bytes exceeds the limit of 65536 bytes for GetAvatar"
    )
    # the bytes need not even parse: the size is checked first
    error = send(client, get, [b"\xff" * 70_000])
    assert error.code() == CODE.RESOURCE_EXHAUSTED


def test_create_avatar_takes_large_messages(client: Client) -> None:
    """1.5 MB of photo reach the image checks (the fixture's server takes 2 MiB photos)."""
    junk = np.random.default_rng(0).integers(0, 255, 1_500_000, np.uint8).tobytes()
    with pytest.raises(grpc.RpcError) as raised:
        client.create_avatar("large", [junk], consent=CONSENT)
    assert raised.value.code() == CODE.INVALID_ARGUMENT
    assert "image 0: cannot decode" in raised.value.details()


def test_an_animate_message_may_carry_one_driving_frame(
    server: ServerThread, client: Client, avatar: str
) -> None:
    animate = next(m for m in METHODS if m.name == "Animate")
    limit = server.settings.max_image_bytes + 64 * 1024
    start = pb.AnimateRequest(config=pb.StreamConfig(avatar_id=avatar)).SerializeToString()
    frame = pb.AnimateRequest(driving_frame=pb.DrivingFrame(image=b"\x00" * limit)).SerializeToString()
    error = send(client, animate, [start, frame])
    assert error.code() == CODE.RESOURCE_EXHAUSTED
    assert f"exceeds the limit of {limit} bytes for Animate" in error.details()


def test_limits_follow_the_settings() -> None:
    default = Limits.from_settings(Settings())
    assert default.of("CreateAvatar") == MAX_MESSAGE_BYTES  # 32 x 10 MiB: bounded by gRPC's limit
    assert default.of("Animate") == 10 * 2**20 + 64 * 1024
    assert default.of("GetAvatar") == default.of("WatchOperation") == 64 * 1024
    assert default.largest == MAX_MESSAGE_BYTES
    small = Limits.from_settings(Settings(max_images=2, max_image_bytes=1_000_000))
    assert small.of("CreateAvatar") == 2 * (1_000_000 + 4096) + 64 * 1024
    assert small.largest == small.of("CreateAvatar")


class _Limited(ServiceError):
    """A refusal with trailing metadata, the way a quota says when to retry."""

    def trailers(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after", "7"),)


class _WritingAnimation:
    """An Animate that writes its replies (context.write) instead of yielding them."""

    async def Animate(
        self, requests: AsyncIterator[pb.AnimateRequest], context: grpc.aio.ServicerContext
    ) -> None:
        async for request in requests:
            await context.write(
                pb.AnimateResponse(frame=pb.AnimatedFrame(sequence=request.landmarks.sequence))
            )
            if request.landmarks.sequence == 1:
                raise _Limited(CODE.RESOURCE_EXHAUSTED, "over the quota")


def test_a_servicer_that_writes_its_replies_is_served_too() -> None:
    """Streaming methods may be async generators or coroutines that write; errors that carry trailing
    metadata keep it."""

    async def main() -> tuple[list[int], grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
        server = grpc.aio.server()
        add_service(server, DESCRIPTORS[1], _WritingAnimation(), Limits())
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.stream_stream(
                    "/talkinghead.v1.AnimationService/Animate",
                    request_serializer=pb.AnimateRequest.SerializeToString,
                    response_deserializer=pb.AnimateResponse.FromString,
                )(iter([pb.AnimateRequest(landmarks=pb.LandmarkFrame(sequence=i)) for i in range(3)]))
                sequences = []
                with pytest.raises(grpc.aio.AioRpcError):
                    async for reply in call:
                        sequences.append(reply.frame.sequence)
                trailers = tuple(
                    (k, v) for k, v in (await call.trailing_metadata()) or () if k == "retry-after"
                )
                return sequences, await call.code(), await call.details(), trailers
        finally:
            await server.stop(0)

    sequences, code, details, trailers = asyncio.run(main())
    assert sequences == [0, 1]
    assert (code, details) == (CODE.RESOURCE_EXHAUSTED, "over the quota")
    assert trailers == (("retry-after", "7"),)


def test_health_answers_and_refuses_junk_the_same_way(client: Client) -> None:
    client.wait_ready(60)  # run alone, this test may come before the backend is warm
    assert client.health() == "SERVING"
    error = refused_raw(client, "/grpc.health.v1.Health/Check", NOT_A_MESSAGE)
    assert error.code() == CODE.INVALID_ARGUMENT
    assert error.details().startswith("malformed HealthCheckRequest")
    watch = client.channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def refused_raw(client: Client, path: str, data: bytes) -> grpc.RpcError:
    try:
        client.channel.unary_unary(path)(data, timeout=30)
    except grpc.RpcError as error:
        return error
    raise AssertionError(f"{path} accepted {data!r}")


def test_reflection_answers_and_refuses_junk_the_same_way(client: Client) -> None:
    from grpc_reflection.v1alpha import reflection_pb2

    path = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    info = client.channel.stream_stream(
        path,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (reply,) = info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
    assert "talkinghead.v1.AnimationService" in {s.name for s in reply.list_services_response.service}
    try:
        for _ in client.channel.stream_stream(path)(iter([NOT_A_MESSAGE]), timeout=30):
            pass
    except grpc.RpcError as error:
        assert error.code() == CODE.INVALID_ARGUMENT, (error.code(), error.details())
        assert error.details().startswith("malformed ServerReflectionRequest")
    else:
        raise AssertionError("reflection accepted bytes that are not a ServerReflectionRequest")
