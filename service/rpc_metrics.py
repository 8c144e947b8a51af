"""Every call's final status, counted where gRPC hands the call to the server's handlers.

`RpcMetrics` is the server's outermost interceptor (before service/auth.py's AuthInterceptor), so
it sees every call: those the AuthInterceptor refuses UNAUTHENTICATED before their request is read,
those refused at their start (NOT_FOUND, RESOURCE_EXHAUSTED at max_streams, UNAVAILABLE while the
storage is unreachable, INVALID_ARGUMENT), and those that ran. Each ends one count of
`talkinghead_rpcs_total{method, code}` (method: `<service>/<method>` of the protos the server
serves, `other` for a name it does not know, so a scanner cannot make series; code: the gRPC status
name), and an Animate call one of `talkinghead_streams_total{code}` as well.

The code is the one the client gets: what the handler set or aborted with, CANCELLED when the call
was cancelled (the client cancelled, hung up, or its deadline passed), UNAVAILABLE when the server
cancelled it, stopping, at the end of its grace period (the client reads "Cancelling all calls"),
UNKNOWN when a handler raised (gRPC's answer to an unhandled exception).

With an `AccessLog` (TALKINGHEAD_ACCESS_LOG, on by default) it also writes each call's access line
as it ends (service/access_log.py): the same method and code, the call's duration, peer and
x-request-id, and what its handlers noted in the call's `CallFacts` (tenant, avatar, frames). Its
work is done once per call, at its start and end; nothing runs per message or frame.

While a call runs, `STORAGE_FAILED` holds the server's storage watch (service/storage.py): a
handler that finds the storage unreachable (service/wire.py status_of) tells it at once.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from service.access_log import CALL, AccessLog, CallFacts, request_id
from service.metrics import Metrics
from service.wire import STORAGE_FAILED

OTHER = "other"
ANIMATE = "talkinghead.v1.AnimationService/Animate"
# Exported at 0 from the start for every talkinghead method: the failed-calls alert counts these
# with rate(), which misses the first value of a series born mid-window (the first failures of a
# kind went uncounted).
STARTING_CODES = ("OK", "UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED", "UNKNOWN")


def code_name(context: grpc.aio.ServicerContext) -> str:
    """The status the handler set (OK when none)."""
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    for known in grpc.StatusCode:  # (an int, as some gRPC versions return it)
        if known.value[0] == code:
            return known.name
    return "UNKNOWN"


def failed_code(error: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The status of a call whose handler raised `error`: CANCELLED for a cancelled call, the
    aborted status for context.abort, UNKNOWN (gRPC's answer) for anything else."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    if isinstance(error, grpc.aio.AbortError):
        return code_name(context)
    return "UNKNOWN"


class RpcMetrics(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        metrics: Metrics,
        methods: Iterable[str],
        on_storage_failure: Callable[[BaseException], None] | None = None,
        access: AccessLog | None = None,
    ) -> None:
        self.metrics = metrics
        self.methods = frozenset(methods)  # "<full service name>/<method>"
        self.on_storage_failure = on_storage_failure
        self.access = access
        self._cut_off: float | None = None  # (perf_counter) when a stopping server cancels its calls
        for method in self.methods:
            if method.startswith("talkinghead."):
                for code in STARTING_CODES:
                    metrics.rpcs_total.labels(method, code)
                    if method == ANIMATE:
                        metrics.streams_total.labels(code)

    def stopping(self, grace: float) -> None:
        """The server stops now, cancelling what still runs in `grace` seconds: those calls end
        UNAVAILABLE for their clients, and are counted and logged so (not CANCELLED)."""
        self._cut_off = time.perf_counter() + grace

    def count(self, method: str, code: str) -> None:
        self.metrics.rpcs_total.labels(method, code).inc()
        if method == ANIMATE:
            self.metrics.streams_total.labels(code).inc()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        name = (handler_call_details.method or "").lstrip("/")
        method = name if name in self.methods else OTHER
        started = time.perf_counter()
        handler = await continuation(handler_call_details)
        access = self.access
        request = request_id(handler_call_details.invocation_metadata) if access is not None else None
        if handler is None:  # gRPC answers UNIMPLEMENTED
            self.count(method, "UNIMPLEMENTED")
            if access is not None:
                access.end(
                    method,
                    "UNIMPLEMENTED",
                    time.perf_counter() - started,
                    peer=None,  # (no context: gRPC answers this call itself)
                    facts=None,
                    request=request,
                    details=None,
                )
            return handler
        kind = ("stream" if handler.request_streaming else "unary") + (
            "_stream" if handler.response_streaming else "_unary"
        )
        behavior = getattr(handler, kind)
        if behavior is None:
            return handler
        wrapped: Callable[..., Any] = (
            self._generator(behavior, method, started, request)
            if inspect.isasyncgenfunction(behavior)
            else self._coroutine(behavior, method, started, request)
        )
        return handler._replace(**{kind: wrapped})  # type: ignore[attr-defined]  # a namedtuple

    def _ended(
        self,
        method: str,
        code: str,
        started: float,
        context: grpc.aio.ServicerContext,
        facts: CallFacts | None,
        request_id: str | None,
    ) -> None:
        """Count the call; write its access line."""
        if code == "CANCELLED" and self._cut_off is not None and time.perf_counter() >= self._cut_off:
            code = "UNAVAILABLE"
        self.count(method, code)
        if self.access is not None:
            self.access.end(
                method,
                code,
                time.perf_counter() - started,
                peer=context.peer(),
                facts=facts,
                request=request_id,
                details=context.details() if code != "OK" else None,
            )

    def _coroutine(
        self, behavior: Callable[..., Any], method: str, started: float, request_id: str | None
    ) -> Callable[..., Awaitable[Any]]:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = STORAGE_FAILED.set(self.on_storage_failure)
            facts = CallFacts() if self.access is not None else None
            call = CALL.set(facts)
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                code = code_name(context)
                return result
            except BaseException as error:
                code = failed_code(error, context)
                raise
            finally:
                STORAGE_FAILED.reset(token)
                CALL.reset(call)
                self._ended(method, code, started, context, facts, request_id)

        return counted

    def _generator(
        self, behavior: Callable[..., Any], method: str, started: float, request_id: str | None
    ) -> Callable[..., AsyncIterator[Any]]:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            STORAGE_FAILED.set(self.on_storage_failure)  # (the call's own task: gone with it)
            facts = CallFacts() if self.access is not None else None
            CALL.set(facts)
            try:
                async for reply in behavior(request, context):
                    yield reply
                code = code_name(context)
            except BaseException as error:
                code = failed_code(error, context)
                raise
            finally:
                self._ended(method, code, started, context, facts, request_id)

        return counted
