"""Requests arrive as bytes and are parsed here, after a size check, not inside gRPC.

`add_service(server, descriptor, servicer, limits)` registers every method of a service with a
generic handler built from its descriptor, with no request deserializer, so the handler
1. checks the serialized size against the method's limit (`Limits`): RESOURCE_EXHAUSTED saying the
   limit, before any parsing or decoding;
2. parses the message: bytes that are not the method's request message end the call with
   INVALID_ARGUMENT "malformed <Message>: ..." and one log line (gRPC's own deserialisation
   answers INTERNAL, or UNKNOWN on streaming methods, and logs a traceback each time);
   for the Animate request stream, each message as it is read;
   A single-request method the servicer also has `admit_<Method>(context)` for (a context manager,
   or an exception refusing the call) is served as a request stream, so that it is admitted before
   its message is read (CreateAvatar: its photos are up to 64 MiB), and its received bytes are let
   go once parsed (only the parsed request lives on);
3. calls the servicer's method (a coroutine, or for a streaming reply an async generator or a
   coroutine that writes with context.write) and turns what escapes it into a status: a ServiceError into its
   code and message, anything else into INTERNAL (logged). The status is set on the context after
   the `except` block, never by raising `context.abort` inside it: an abort raised there chains the
   caught exception - and through its traceback every frame's locals, a decoded photo among them -
   into a reference cycle with the call's context, which only the cycle collector frees.

Limits (serialized request bytes): CreateAvatar max_images x (max_image_bytes + 4 KiB) + 64 KiB,
at most MAX_MESSAGE_BYTES (gRPC's receive limit, the transport's own bound); each Animate stream
message max_image_bytes + 64 KiB (a driving frame); every other method 64 KiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from service.access_log import note_avatar
from service.errors import CorruptRecord, ServiceError
from service.settings import Settings

log = logging.getLogger("talkinghead.service.wire")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # gRPC's receive and send limit: the largest CreateAvatar
SMALL_MESSAGE_BYTES = 64 * 1024  # ids, names, tokens, a config: every method without images
IMAGE_OVERHEAD_BYTES = 4 * 1024  # a SourceImage's landmarks (136 floats) and framing
STREAM_OVERHEAD_BYTES = 64 * 1024  # a driving frame's fields besides its image

Status = tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]  # code, details, trailing metadata
# While a call runs, the server's storage watch (service/storage.py; set by service/rpc_metrics.py):
# a failure status_of finds to be unreachable storage is reported to it at once, not at its next probe.
STORAGE_FAILED: contextvars.ContextVar[Callable[[BaseException], None] | None] = contextvars.ContextVar(
    "storage_failed", default=None
)


@dataclass(frozen=True)
class Limits:
    """The largest serialized request (each message of a request stream) each method accepts."""

    per_method: dict[str, int] = field(default_factory=dict)  # method name -> bytes
    default: int = SMALL_MESSAGE_BYTES
    why: dict[str, str] = field(default_factory=dict)  # method name -> what the limit allows

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        images, image_bytes = settings.max_images, settings.max_image_bytes
        create = images * (image_bytes + IMAGE_OVERHEAD_BYTES) + SMALL_MESSAGE_BYTES
        return cls(
            per_method={
                "CreateAvatar": min(create, MAX_MESSAGE_BYTES),
                "Animate": min(image_bytes + STREAM_OVERHEAD_BYTES, MAX_MESSAGE_BYTES),
            },
            why={
                "CreateAvatar": f"up to {images} photos of at most {image_bytes} bytes each",
                "Animate": f"a message; a driving frame's image has at most {image_bytes} bytes",
            },
        )

    def of(self, method: str) -> int:
        return self.per_method.get(method, self.default)

    def explain(self, method: str) -> str:
        return self.why.get(method, "")

    @property
    def largest(self) -> int:
        """gRPC's own receive limit (larger messages never reach a handler)."""
        return max(self.default, *self.per_method.values())


def set_status(context: grpc.aio.ServicerContext, status: Status) -> None:
    """End the call with `status` once the handler returns (no exception raised, none kept)."""
    code, details, trailers = status
    context.set_code(code)
    context.set_details(details)
    if trailers:
        context.set_trailing_metadata(trailers)


def status_of(error: Exception, what: str) -> Status:
    """The status a failure ends a call with: a ServiceError's own; UNAVAILABLE where the server's
    storage cannot be reached or is full (logged); anything else INTERNAL, logged with its traceback."""
    if isinstance(error, ServiceError):
        # e.g. retry-after, where an error carries trailing metadata
        trailers: tuple[tuple[str, str], ...] = tuple(getattr(error, "trailers", tuple)())
        return error.code, error.message, trailers
    if unreachable(error):
        log.warning("%s failed: storage unreachable: %s: %s", what, type(error).__name__, error)
        report = STORAGE_FAILED.get()
        if report is not None:
            report(error)
        return grpc.StatusCode.UNAVAILABLE, "the server's storage is unreachable; retry later", ()
    if full(error):
        log.error("%s failed: storage full: %s", what, error)  # an operator must make room
        return grpc.StatusCode.UNAVAILABLE, "the server's storage is full; retry later", ()
    if isinstance(error, OSError) and error.errno in REFUSING:
        log.error("%s failed: storage refused: %s", what, error)  # read-only, permissions, a failing disk
        return grpc.StatusCode.UNAVAILABLE, "the server's storage refused the request; retry later", ()
    if isinstance(error, CorruptRecord):
        log.error("%s failed: %s", what, error.detail)  # an operator may look at the file
        return grpc.StatusCode.DATA_LOSS, str(error), ()
    log.error("%s failed: %s: %s", what, type(error).__name__, error, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}", ()


# The server's storage refusing a read or write that is not about one record: mounted read-only,
# its permissions changed, a disk failing. It was INTERNAL, with a traceback each time (helper-81).
REFUSING = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


def full(error: BaseException) -> bool:
    """The server's storage has no room: a disk full or over quota, a Redis at its maxmemory with
    nothing it may evict (redis-py's OutOfMemoryError: "command not allowed when used memory >
    'maxmemory'")."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return redis_error(error, "OutOfMemoryError")


def unreachable(error: BaseException) -> bool:
    """A store the server needs (Redis: avatars, audit log, job queue) could not be reached: a
    connection refused, broken or timed out. The call may succeed later: UNAVAILABLE, not INTERNAL."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return redis_error(error, "ConnectionError", "TimeoutError")


def redis_error(error: BaseException, *kinds: str) -> bool:
    """A redis-py exception (told by its module: the service need not import redis), and where
    `kinds` are given one of those classes or a subclass of one."""
    cls = type(error)
    if not cls.__module__.startswith("redis"):
        return False
    return not kinds or any(base.__name__ in kinds for base in cls.__mro__)


def redis_failure(prog: str, url: str, error: BaseException) -> str | None:
    """One line for a redis-py error (None for any other error): `cannot reach Redis at URL: why`
    (refused, timed out, no such host), else `Redis at URL: its error` (a wrong password, an error
    reply); a password in the URL masked."""
    from jobs.keys import shown_url

    if not redis_error(error):
        return None
    where = shown_url(url)
    cause = error.__context__  # the socket's error, under redis-py's message that repeats the address
    why = str(error) or type(error).__name__
    if unreachable(error) and not redis_error(error, "AuthenticationError"):
        if isinstance(cause, OSError):
            why = cause.strerror or str(cause) or why
        return f"{prog}: cannot reach Redis at {where}: {' '.join(why.split()).rstrip('.')}"
    return f"{prog}: Redis at {where}: {' '.join(why.split()).rstrip('.')}"


@dataclass(frozen=True)
class Parser:
    cls: type[Message]
    method: str
    limit: int
    why: str = ""  # what the limit allows, for the message
    names_avatar: bool = False  # the message has an avatar_id: the access line shows it

    def noted(self, request: Message) -> None:
        """A single request's avatar id in the call's access line (service/access_log.py)."""
        if self.names_avatar:
            note_avatar(request.avatar_id)  # type: ignore[attr-defined]

    def __call__(self, data: bytes, peer: str) -> Message | Status:
        """The request, or the status refusing it (one log line)."""
        name = self.cls.DESCRIPTOR.name
        if len(data) > self.limit:
            log.warning("%s from %s: %d bytes over the limit of %d", self.method, peer, len(data), self.limit)
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{name} of {len(data)} bytes exceeds the limit of {self.limit} bytes for {self.method}"
                + (f" ({self.why})" if self.why else ""),
                (),
            )
        try:
            return self.cls.FromString(data)
        except Exception as error:  # DecodeError, and whatever else the parser may raise
            kind = type(error).__name__
        log.warning("%s from %s: malformed %s (%d bytes, %s)", self.method, peer, name, len(data), kind)
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"malformed {name}: {len(data)} bytes that are not a {self.cls.DESCRIPTOR.full_name} in the "
            "protobuf wire format (a truncated message, a field of the wrong type or a string that is "
            "not UTF-8)",
            (),
        )


async def _requests(raw: AsyncIterator[bytes], parse: Parser, peer: str) -> AsyncIterator[Message]:
    """A request stream, message by message; a malformed one raises ServiceError where it is read."""
    async for data in raw:
        parsed = parse(data, peer)
        if isinstance(parsed, tuple):
            raise ServiceError(parsed[0], parsed[1])
        yield parsed


async def _settle(call: Awaitable[Any], parse: Parser, context: grpc.aio.ServicerContext) -> Any:
    """The reply of a single-reply call, or its failure set as the status (after the except)."""
    try:
        return await call
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as error:
        failure = status_of(error, parse.method)
    set_status(context, failure)
    return None


async def _relay(
    replies: AsyncIterator[Any], parse: Parser, context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    """The replies of a streaming call, then its failure set as the status (after the except)."""
    failure: Status | None = None
    try:
        async for reply in replies:
            yield reply
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as error:
        failure = status_of(error, parse.method)
    if failure is not None:
        set_status(context, failure)


def _unary_unary(impl: Callable[..., Awaitable[Any]], parse: Parser) -> Callable[..., Awaitable[Any]]:
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await _answer(impl, parse(data, context.peer()), parse, context)

    return handle


async def _answer(
    impl: Callable[..., Awaitable[Any]],
    request: Message | Status,
    parse: Parser,
    context: grpc.aio.ServicerContext,
) -> Any:
    """A single request's reply, or the status its parse refused it with."""
    if isinstance(request, tuple):
        set_status(context, request)
        return None
    parse.noted(request)
    return await _settle(impl(request, context), parse, context)


def _unary_stream(impl: Callable[..., Any], parse: Parser) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(impl):  # a coroutine that writes its replies (context.write)
        return _unary_unary(impl, parse)

    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        request = parse(data, context.peer())
        if isinstance(request, tuple):
            set_status(context, request)
            return
        parse.noted(request)
        async for reply in _relay(impl(request, context), parse, context):
            yield reply

    return handle


def _stream_stream(impl: Callable[..., Any], parse: Parser) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(impl):  # a coroutine that writes its replies (context.write)
        return _stream_unary(impl, parse)

    async def handle(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for reply in _relay(impl(_requests(raw, parse, context.peer()), context), parse, context):
            yield reply

    return handle


def _stream_unary(impl: Callable[..., Awaitable[Any]], parse: Parser) -> Callable[..., Awaitable[Any]]:
    async def handle(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        return await _settle(impl(_requests(raw, parse, context.peer()), context), parse, context)

    return handle


def _admitted_unary(
    impl: Callable[..., Awaitable[Any]],
    parse: Parser,
    admit: Callable[[grpc.aio.ServicerContext], contextlib.AbstractContextManager[None]],
) -> Callable[..., Awaitable[Any]]:
    """A single-request method served as a request stream, so that `admit` (which raises to refuse)
    runs before its one message is read: a refused call never has its request received whole."""

    async def handle(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        try:
            slot = admit(context)
            slot.__enter__()
        except Exception as error:
            failure = status_of(error, parse.method)
        else:
            try:
                return await _answer(impl, await _only_message(raw, parse, context.peer()), parse, context)
            finally:
                slot.__exit__(None, None, None)
        set_status(context, failure)
        return None

    return handle


async def _only_message(raw: AsyncIterator[bytes], parse: Parser, peer: str) -> Message | Status:
    """The request stream's first message parsed, with its bytes let go: gRPC's receiver keeps the
    last message it yielded until it is advanced or closed, and the parsed message is a copy (a
    60 MB CreateAvatar was held twice for the whole call)."""
    messages = aiter(raw)
    data = await anext(messages, None)
    close = getattr(messages, "aclose", None)
    if close is not None:
        await close()
    if data is None:
        return grpc.StatusCode.INVALID_ARGUMENT, f"no {parse.method} request sent", ()
    return parse(data, peer)


def method_handler(method: MethodDescriptor, servicer: object, limits: Limits) -> grpc.RpcMethodHandler:
    request = message_factory.GetMessageClass(method.input_type)
    response = message_factory.GetMessageClass(method.output_type)
    impl = getattr(servicer, method.name)
    avatar = method.input_type.fields_by_name.get("avatar_id")
    parse = Parser(
        cls=request,
        method=method.name,
        limit=limits.of(method.name),
        why=limits.explain(method.name),
        names_avatar=avatar is not None and avatar.type == avatar.TYPE_STRING and not method.client_streaming,
    )
    serialize = response.SerializeToString
    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _stream_stream(impl, parse), response_serializer=serialize
        )
    if method.client_streaming:
        return grpc.stream_unary_rpc_method_handler(_stream_unary(impl, parse), response_serializer=serialize)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(_unary_stream(impl, parse), response_serializer=serialize)
    admit = getattr(servicer, f"admit_{method.name}", None)
    if admit is not None:
        return grpc.stream_unary_rpc_method_handler(
            _admitted_unary(impl, parse, admit), response_serializer=serialize
        )
    return grpc.unary_unary_rpc_method_handler(_unary_unary(impl, parse), response_serializer=serialize)


def add_service(
    server: grpc.aio.Server, service: ServiceDescriptor, servicer: object, limits: Limits
) -> None:
    """Serve every method of `service` with `servicer`'s method of the same name, requests parsed
    here (see the module docstring)."""
    handlers = {method.name: method_handler(method, servicer, limits) for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
