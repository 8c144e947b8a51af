"""gRPC PersonalisationService: protobuf <-> Personaliser operations (service/personalisation.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from api.talkinghead.v1 import personalisation_pb2 as pb
from api.talkinghead.v1 import personalisation_pb2_grpc
from facekit.ids import scoped_id, split_id
from jobs import record
from jobs.record import Job
from service.app import App, actor_of, check_id
from service.errors import ServiceError
from service.personalisation import PREFIX
from service.servicer import caller

STATES = {
    record.QUEUED: pb.OPERATION_STATE_QUEUED,
    record.RUNNING: pb.OPERATION_STATE_RUNNING,
    record.SUCCEEDED: pb.OPERATION_STATE_SUCCEEDED,
    record.FAILED: pb.OPERATION_STATE_FAILED,
    record.CANCELLED: pb.OPERATION_STATE_CANCELLED,
}
PRESETS = {
    pb.PERSONALISATION_PRESET_UNSPECIFIED: "",
    pb.PERSONALISATION_PRESET_FAST: "fast",
    pb.PERSONALISATION_PRESET_BALANCED: "balanced",
    pb.PERSONALISATION_PRESET_BEST: "best",
}


def _time(seconds: float) -> Timestamp | None:
    if not seconds:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _duration(seconds: float) -> Duration:
    value = Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def to_operation(job: Job) -> pb.Operation:
    progress = pb.PersonalisationProgress(
        avatar_id=split_id(job.avatar_id)[1],
        state=STATES[job.state],  # type: ignore[arg-type]
        stage=job.stage,
        step=job.step,
        total_steps=job.steps,
        losses=job.losses,
        elapsed=_duration(job.elapsed()),
        remaining=_duration(job.remaining()),
        create_time=_time(job.create_time),
        start_time=_time(job.start_time),
        end_time=_time(job.end_time),
        attempt=job.attempt,
        worker=job.worker,
    )
    operation = pb.Operation(name=PREFIX + job.id, metadata=progress, done=job.done)
    if job.state == record.SUCCEEDED:
        operation.response.CopyFrom(
            pb.PersonalisationResult(
                model_name=job.model_name, model_version=job.model_version, steps=job.steps
            )
        )
    elif job.done:
        operation.error.CopyFrom(pb.OperationError(code=job.error_code, message=job.error))
    return operation


class PersonalisationServicer(personalisation_pb2_grpc.PersonalisationServiceServicer):
    def __init__(self, *, app: App) -> None:
        self.app = app

    async def PersonaliseAvatar(self, request: pb.PersonaliseAvatarRequest, context: Any) -> pb.Operation:
        if request.HasField("preset") and request.preset not in PRESETS:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown preset {request.preset}")
        if request.HasField("steps") and request.steps < 1:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"steps must be 1-2000, got {request.steps}")
        principal = caller(self.app, context)
        job = await self.app.personalise(
            request.avatar_id,
            principal=principal,
            steps=request.steps,
            preset=PRESETS.get(request.preset, ""),
            actor=actor_of(principal, context.peer()),
        )
        return to_operation(job)

    async def GetOperation(self, request: pb.GetOperationRequest, context: Any) -> pb.Operation:
        return to_operation(await self.app.personaliser.get(request.name, caller(self.app, context).tenant))

    async def ListOperations(
        self, request: pb.ListOperationsRequest, context: Any
    ) -> pb.ListOperationsResponse:
        tenant = caller(self.app, context).tenant
        avatar_id = scoped_id(tenant, check_id(request.avatar_id)) if request.avatar_id else ""
        jobs, token = await self.app.personaliser.list(
            tenant=tenant, avatar_id=avatar_id, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListOperationsResponse(operations=[to_operation(j) for j in jobs], next_page_token=token)

    async def CancelOperation(self, request: pb.CancelOperationRequest, context: Any) -> pb.Operation:
        return to_operation(
            await self.app.personaliser.cancel(request.name, caller(self.app, context).tenant)
        )

    async def WatchOperation(
        self, request: pb.WatchOperationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Operation]:
        # a ServiceError ends the call with its status in service/wire.py (no abort in an except)
        tenant = caller(self.app, context).tenant
        async for job in self.app.personaliser.watch(request.name, tenant):
            yield to_operation(job)
