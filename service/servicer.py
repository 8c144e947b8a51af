"""gRPC servicers: protobuf <-> App operations. Requests arrive parsed and failures become statuses
in service/wire.py; Animate sets its own (it frees its stream slot first), UNAUTHENTICATED too when
the key ring revokes its credential while it runs (service/auth.py CallGuard)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from api.talkinghead.v1 import animation_pb2, animation_pb2_grpc, avatar_pb2, avatar_pb2_grpc
from api.talkinghead.v1.landmarks_pb2 import Landmarks
from service import consent
from service.access_log import note_avatar, note_tenant, noted
from service.app import App, actor_of, public_id
from service.auth import Principal, Refused, revoked_call
from service.errors import idle, precondition, stalled_reader
from service.store import AvatarRecord
from service.stream import Stream, next_request
from service.wire import Status, status_of

log = logging.getLogger("talkinghead.service")
STATUS_WAIT_S = 1.0  # how long an ending stream's status may wait behind replies the client does not take
# A request stream that ends with no reply owed is a half-close, or a client that vanished (killed:
# its connection reset). gRPC ends the request stream first either way and cancels the call a
# moment later for a vanished one; nothing on the call tells the two apart at that point (its done
# callback reports an OK sent into the dead connection as not cancelled). So the call waits this
# long for the cancel before it ends OK. Killed idle clients counted OK, 40 tries each on a loaded
# 2-core machine: no wait 4, 5 ms 0, 20 ms 0; every normal stream end pays the wait (0.1 s before).
VANISHED_WAIT_S = 0.01


def to_avatar(record: AvatarRecord, *, personalised: bool, details: bool, preview: bool) -> avatar_pb2.Avatar:
    created = Timestamp()
    created.FromNanoseconds(int(record.create_time * 1e9))
    avatar = avatar_pb2.Avatar(
        avatar_id=public_id(record),
        display_name=record.display_name,
        create_time=created,
        image_count=len(record.images),
        model_id=record.model_id,
        personalised=personalised,
        image_size=record.image_size,
        consent=consent.to_pb(record.consent),
    )
    if details:
        avatar.images.extend(avatar_pb2.ImageReport(**report) for report in record.images)  # type: ignore[arg-type]
    if preview:
        avatar.preview_png = record.preview_png
        avatar.crop_landmarks.CopyFrom(Landmarks(xy=record.points.reshape(-1).tolist()))
    return avatar


def caller(app: App, context: grpc.aio.ServicerContext) -> Principal:
    """Who makes this call (service/auth.py); Refused (UNAUTHENTICATED / PERMISSION_DENIED: counted
    and logged with the peer) or ServiceError INVALID_ARGUMENT (a malformed tenant header)."""
    try:
        principal = app.auth.authenticate(context.invocation_metadata() or (), context.auth_context())
    except Refused as error:
        app.auth.refused(error, context.peer())
        note_tenant(error.tenant)  # (PERMISSION_DENIED: the tenant whose key it was)
        raise
    note_tenant(principal.tenant)  # the access line's (service/access_log.py)
    return principal


class AvatarServicer(avatar_pb2_grpc.AvatarServiceServicer):
    def __init__(self, *, app: App) -> None:
        self.app = app

    def admit_CreateAvatar(self, context: Any) -> contextlib.AbstractContextManager[None]:
        """A slot among the creates in flight, before the request (up to 64 MiB) is read."""
        return self.app.limits.create_call(caller(self.app, context))

    async def CreateAvatar(self, request: avatar_pb2.CreateAvatarRequest, context: Any) -> avatar_pb2.Avatar:
        principal = caller(self.app, context)
        record = await self.app.create_avatar(
            request, principal=principal, actor=actor_of(principal, context.peer())
        )
        personalised = await self.app.personalised(record)
        return to_avatar(record, personalised=personalised, details=True, preview=True)

    async def GetAvatar(self, request: avatar_pb2.GetAvatarRequest, context: Any) -> avatar_pb2.Avatar:
        record = await self.app.get_record(request.avatar_id, caller(self.app, context))
        personalised = await self.app.personalised(record)
        return to_avatar(record, personalised=personalised, details=True, preview=request.include_preview)

    async def ListAvatars(
        self, request: avatar_pb2.ListAvatarsRequest, context: Any
    ) -> avatar_pb2.ListAvatarsResponse:
        records, token, total = await self.app.list_avatars(
            request.page_size, request.page_token, caller(self.app, context)
        )
        avatars = [
            to_avatar(r, personalised=await self.app.personalised(r), details=False, preview=False)
            for r in records
        ]
        return avatar_pb2.ListAvatarsResponse(avatars=avatars, next_page_token=token, total_size=total)

    async def DeleteAvatar(
        self, request: avatar_pb2.DeleteAvatarRequest, context: Any
    ) -> avatar_pb2.DeleteAvatarResponse:
        principal = caller(self.app, context)
        await self.app.delete_avatar(
            request.avatar_id, principal=principal, actor=actor_of(principal, context.peer())
        )
        return avatar_pb2.DeleteAvatarResponse()


class AnimationServicer(animation_pb2_grpc.AnimationServiceServicer):
    def __init__(self, *, app: App) -> None:
        self.app = app

    async def Animate(
        self, request_iterator: AsyncIterator[animation_pb2.AnimateRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """A coroutine that writes its replies (not a generator that yields them): each write has a
        deadline, so a client that stops reading cannot hold its stream slot forever."""
        timeout = self.app.settings.stream_idle_timeout
        stream: Stream | None = None
        reader: asyncio.Task[None] | None = None
        failure: Status | None = None
        writes = WriteDeadline(timeout)
        sent = 0  # frames written, for the access line
        try:
            principal = caller(self.app, context)
            try:
                first = await asyncio.wait_for(next_request(request_iterator), timeout)
            except TimeoutError:
                raise idle(timeout) from None
            if first is None:
                return
            kind = first.WhichOneof("message")
            if kind != "config":
                got = "an empty AnimateRequest" if kind is None else f"`{kind}`"
                raise precondition(f"the first message of a stream must be `config`, got {got}")
            note_avatar(first.config.avatar_id)
            stream = await self.app.open_stream(
                first.config, principal=principal, actor=actor_of(principal, context.peer())
            )
            context.add_done_callback(lambda _: stream.close("CANCELLED") if stream else None)
            await writes.write(context, animation_pb2.AnimateResponse(started=stream.started))
            reader = asyncio.create_task(stream.read(request_iterator), name="animate-reader")
            async for response in stream.replies():
                await writes.write(context, response)
                sent += 1
            await asyncio.sleep(VANISHED_WAIT_S)  # a vanished client's cancel lands here: CANCELLED
        except asyncio.CancelledError:
            revoked = revoked_call()  # the key ring revoked its credential (service/auth.py CallGuard)
            if revoked is None:
                failure = (grpc.StatusCode.CANCELLED, "", ())
                raise
            failure = (revoked.code, revoked.message, ())
        except grpc.aio.AbortError:
            raise
        except ClientGone:  # it cancelled or hung up, and a write found out: no fault (no ERROR)
            failure = (grpc.StatusCode.CANCELLED, "", ())
        except Exception as error:  # a ServiceError's status, or INTERNAL (logged)
            failure = status_of(error, "Animate")
        finally:
            facts = noted()
            if facts is not None:
                facts.frames = sent
            writes.close()
            if reader is not None:
                reader.cancel()
            if stream is not None:  # the slot comes back now, whatever happens to the status
                stream.close(failure[0].name if failure else "OK")
                # the done callback's closure holds this variable, and the call's context holds the
                # callback until the cycle collector frees it: it must not hold the stream's memory
                stream = None
        # Sent here, not by an abort inside the except block (wire.py). A status queues behind
        # replies the client has not taken: when it cannot go out within STATUS_WAIT_S the handler
        # gives up (the slot is already free; gRPC drops the call with its connection).
        if failure is not None:
            code, details, trailers = failure
            try:
                await asyncio.wait_for(context.abort(code, details, trailers), STATUS_WAIT_S)
            except TimeoutError:
                log.info("stream ended %s; the client takes no replies: %s", code.name, details)
            except grpc.aio.InternalError:  # the status could not go out: the client had left
                log.info("stream ended %s; the client had left: %s", code.name, details)


class WriteDeadline:
    """The deadline of one stream's replies: a reply that gRPC cannot hand over for `timeout` s
    (flow control holds the write: the client stopped reading) ends the stream with
    DEADLINE_EXCEEDED. One timer for the stream, re-armed when it fires during a write, not a
    timer set and cancelled for every reply."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._since: float | None = None  # loop.time() when the write in progress began
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    async def write(self, context: grpc.aio.ServicerContext, response: animation_pb2.AnimateResponse) -> None:
        self._since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._since + self.timeout, self._check)
        try:
            await context.write(response)
        except asyncio.CancelledError:
            if not self._expired or self._task is None or self._task.cancelling() > 1:
                raise  # the call itself was cancelled
            self._task.uncancel()
            raise stalled_reader(self.timeout) from None
        except grpc.aio.InternalError:  # the write's batch failed: the call is over on the client's side
            raise ClientGone from None
        finally:
            self._since = None

    def _check(self) -> None:
        self._timer = None
        if self._since is None:  # no write in progress: the next one arms the timer again
            return
        due = self._since + self.timeout
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
        elif self._task is not None:
            self._expired = True
            self._task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ClientGone(Exception):
    """A reply could not be written: the client cancelled the call or its connection closed."""
