"""Errors the service reports to clients: a gRPC status code and a message saying what was wrong."""

from __future__ import annotations

import grpc

from facekit.ids import split_id


class CorruptRecord(Exception):
    """A stored avatar record that cannot be read (cut short, damaged, not a file). The call ends
    DATA_LOSS naming the avatar (service/wire.py); `detail` (where, and why) goes to the log only.
    A delete removes it and a replace writes over it: the way out for the avatar's owner."""

    def __init__(self, stored_id: str, detail: str) -> None:
        public = split_id(stored_id)[1]
        super().__init__(
            f"the stored record of avatar {public!r} cannot be read (damaged or cut short): "
            "delete it, or create it again with replace"
        )
        self.stored_id, self.detail = stored_id, detail

    @classmethod
    def reading(cls, stored_id: str, where: str, error: BaseException) -> CorruptRecord:
        """The record at `where` (a file, a Redis key) failed to read with `error`."""
        return cls(stored_id, f"{where}: {type(error).__name__}: {error}")


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after: float | None = None  # seconds: sent as trailing metadata `retry-after`

    def trailers(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after is None:
            return ()
        return (("retry-after", str(max(1, round(self.retry_after)))),)


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def precondition(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message)


def exhausted(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def unavailable(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)


def backend_unavailable(reason: str) -> ServiceError:
    """The model backend cannot serve now; `reason` is BackendUnavailable.reason (no internals)."""
    return unavailable(f"the model backend is unavailable: {reason}; retry later")


def aborted(message: str) -> ServiceError:
    """A concurrent change to the same resource won; the client may retry."""
    return ServiceError(grpc.StatusCode.ABORTED, message)


def exists(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS, message)


def deadline(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def idle(seconds: float) -> ServiceError:
    """The client sent nothing for `seconds` while owed no reply (Settings.stream_idle_timeout)."""
    return deadline(
        f"no frame or keepalive for {seconds:g} s: the stream was closed; "
        "send keepalive messages to hold an idle stream open"
    )


def stalled_reader(seconds: float) -> ServiceError:
    """The client took no reply for `seconds` (it stopped reading: gRPC flow control held the reply)."""
    return deadline(
        f"the client took no reply for {seconds:g} s: the stream was closed; read the replies as they come"
    )


def detached(error: ServiceError) -> ServiceError:
    """A copy of `error` - its class and every attribute - without its traceback, context or cause:
    one to keep or raise again, which does not hold the frames (and their locals) it passed through."""
    copy = type(error).__new__(type(error))
    copy.__dict__.update(error.__dict__)
    copy.args = error.args
    return copy
