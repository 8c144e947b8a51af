"""Showing a personalisation operation: one line, or a progress bar that follows its watch stream
(on a terminal; elsewhere - a log, a pipe - a line at each stage and at every tenth of the steps)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import TextIO

import grpc
from tqdm import tqdm

from api.talkinghead.v1 import personalisation_pb2 as ops
from client.library import RECONNECT_TIMEOUT_S, Client, describe_error, operation_error


def state_name(operation: ops.Operation) -> str:
    return ops.OperationState.Name(operation.metadata.state).removeprefix("OPERATION_STATE_")


TERMINAL = (ops.OPERATION_STATE_SUCCEEDED, ops.OPERATION_STATE_FAILED, ops.OPERATION_STATE_CANCELLED)


def stage_name(operation: ops.Operation) -> str:
    """Where the operation is: its stage while it runs ("queued", "fine-tuning", ...), the name of
    the state it ended in once done ("succeeded", "failed", "cancelled": the service's stage then
    says "done" whichever it was)."""
    m = operation.metadata
    if operation.done and m.state in TERMINAL:
        return state_name(operation).lower()
    return m.stage or state_name(operation).lower()


def describe(operation: ops.Operation) -> str:
    """`operations/<id>  avatar  STATE  step/total  ...` in one line."""
    m = operation.metadata
    line = f"{operation.name}  {m.avatar_id}  {state_name(operation)}  step {m.step}/{m.total_steps}"
    if m.elapsed.ToTimedelta().total_seconds():
        line += f"  {m.elapsed.ToTimedelta().total_seconds():.0f} s"
    if operation.HasField("response"):
        line += f"  -> {operation.response.model_name} v{operation.response.model_version}"
    elif operation.HasField("error"):
        line += f"  ({operation_error(operation)})"
    return line


class ProgressBar:
    """A tqdm bar of fine-tuning steps; the stage, the losses and the time left as its postfix."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.bar: tqdm | None = None
        self.said: tuple[str, int] | None = None  # (stage, tenth of the steps) last written
        self.seen = False  # the service has told of the operation at least once

    def __call__(self, operation: ops.Operation) -> None:
        self.seen = True
        if not self.out.isatty():  # a bar redrawn into a file is one endless line
            self._line(operation)
            return
        m = operation.metadata
        if self.bar is None:
            self.bar = tqdm(total=m.total_steps, desc=m.avatar_id, unit="step", file=self.out)
        self.bar.n = m.step
        left = m.remaining.ToTimedelta().total_seconds()
        losses = " ".join(f"{k}={v:.3g}" for k, v in sorted(m.losses.items())[:3])
        postfix = (
            stage_name(operation)
            + (f", ~{left:.0f} s left" if left else "")
            + (f", {losses}" if losses else "")
        )
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.refresh()
        if operation.done:
            self.bar.close()

    def note(self, text: str) -> None:
        """A line of its own (under the bar, on a terminal)."""
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def _line(self, operation: ops.Operation) -> None:
        m = operation.metadata
        tenth = 10 * m.step // m.total_steps if m.total_steps else 0
        stage = stage_name(operation)
        if (stage, tenth) == self.said and not operation.done:
            return
        self.said = (stage, tenth)
        left = m.remaining.ToTimedelta().total_seconds()
        when = f", ~{left:.0f} s left" if left and not operation.done else ""
        print(
            f"{m.avatar_id}: {stage}, step {m.step}/{m.total_steps}{when}",
            file=self.out,
            flush=True,
        )


def add_reconnect_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--retry-for",
        type=_seconds,
        default=RECONNECT_TIMEOUT_S,
        metavar="SECONDS",
        help="when the connection is lost, retry this long before giving up "
        f"(default {RECONNECT_TIMEOUT_S:.0f})",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def follow_to_end(
    client: Client, name: str, *, prog: str, retry_for: float, gave_up: str, known: bool = False
) -> ops.Operation | int:
    """Watch operation `name` until it is done, with a progress bar: the operation, or the exit
    code of a watch cut short, the user told how to find the operation again - 130 for Ctrl-C (it
    goes on), 1 for a service lost for `retry_for` s (the loss said once; `gave_up`: "gave up
    waiting"; whether it goes on is not known then). `known`:
    the service has already answered for it (it started it), else a service that never answers
    is not said to be running it."""
    progress = ProgressBar()
    progress.seen = known

    def lost(error: grpc.RpcError) -> None:
        what = "connection lost" if progress.seen else "the service does not answer"
        progress.note(f"{prog}: {what} ({describe_error(error)}); retrying for up to {retry_for:g} s")

    try:
        return client.wait_operation(
            name, on_progress=progress, reconnect_timeout=retry_for, on_reconnect=lost
        )
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {gone_on(name)}", file=sys.stderr)
        return 130
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        if not progress.seen:  # never reached: whether it exists, let alone goes on, is unknown
            print(
                f"{prog}: {describe_error(error)}; {gave_up}: the service never answered about {name}; "
                f"try again with `talkinghead operation watch {name}`",
                file=sys.stderr,
            )
            return 1
        # (whether it goes on is unknown: a service lost may have lost it, or finished it meanwhile)
        print(
            f"{prog}: {describe_error(error)}; {gave_up}: {name} was running when the service was lost; "
            f"see where it stands with `talkinghead operation get {name}`",
            file=sys.stderr,
        )
        return 1


def gone_on(name: str) -> str:
    """What to tell a user who stopped following `name`: it goes on, and how to follow it again."""
    return f"{name} continues on the service: follow it with `talkinghead operation watch {name}`"
