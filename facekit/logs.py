"""How the server and the worker log: `text` for a person at a terminal, `json` for a log pipeline.

    configure("INFO", "json")

json: one object a line (a message with newlines stays on its line: JSON escapes them): `time` (UTC,
ISO 8601 with milliseconds and Z), `level`, `logger`, `message`, every structured field the record
carries (`log.info(..., extra={"tenant": "acme"})`), and `exception` (the formatted traceback) when
there is one. Python warnings go through logging too, so they come out as JSON as well. What C
libraries (gRPC's core, ONNX Runtime) write to stderr themselves does not pass through Python's
logging and stays as they wrote it.

Lines are written by a thread of their own (`Writer`), never by the thread that logs: a stderr that
nobody reads for a while (a log collector stalled, `serve 2>&1 | less` paused) filled its pipe and
then blocked the server's event loop in the write - every call hung (519 calls, ~64 KiB of access
lines, in the test). Records wait in a bounded queue, written together every 50 ms; a warning or
an error wakes the writer at once (with what waited before it), so a process killed right after
one (a SIGKILL at the end of a grace period, a crash in a C library) has written it. When the
queue is full records are dropped, and the writer says how many once it can write again.

Stdlib only: the service image and the worker image both carry facekit/.
"""

from __future__ import annotations

import atexit
import collections
import copy
import datetime as dt
import json
import logging
import sys
import threading
from typing import Any, TextIO

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# what every LogRecord has: anything else on a record came with `extra=` (a structured field)
_STANDARD = frozenset(
    {
        *logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__,
        "message",
        "asctime",
        "taskName",
    }
)


class JsonFormatter(logging.Formatter):
    """One JSON object a line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        created = dt.datetime.fromtimestamp(record.created, dt.UTC)
        entry: dict[str, Any] = {
            "time": f"{created:%Y-%m-%dT%H:%M:%S}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and name not in entry:
                entry[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)  # (non-ASCII escaped: any stderr encoding)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


QUEUE_RECORDS = 10_000  # records waiting for the writer; beyond, dropped and counted
WRITE_EVERY_S = 0.05  # the writer writes what waits this often, in one write (a line is this late)
EXIT_FLUSH_S = 2.0  # at exit, the writer gets this long to write what waits (its stream may be stuck)


class Writer(logging.Handler):
    """Hands records to a daemon thread that formats them and writes them to `stream` (default
    sys.stderr, looked up at each write) every WRITE_EVERY_S, together, or at once for a record at
    WARNING or above. emit() freezes the record's message and traceback (its arguments may change
    after the call), appends it and returns: it never blocks, and wakes the writer only for a
    warning or an error (an access line per call does not cost a thread switch). With `capacity`
    records waiting, a record is dropped and counted, and the writer's next lines begin by saying
    how many were."""

    def __init__(
        self, stream: TextIO | None = None, capacity: int = QUEUE_RECORDS, every_s: float = WRITE_EVERY_S
    ) -> None:
        super().__init__()
        self.stream, self.capacity, self.every_s = stream, capacity, every_s
        self.dropped = 0
        self._waiting: collections.deque[logging.LogRecord] = collections.deque()
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._write_all, name="log-writer", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Records waiting for the writer."""
        return len(self._waiting)

    def emit(self, record: logging.LogRecord) -> None:
        if len(self._waiting) >= self.capacity:
            self.dropped += 1  # (the GIL: at worst a drop miscounted when two threads race here)
            return
        try:
            self._waiting.append(self._frozen(record))
            if record.levelno >= logging.WARNING:
                self._wake.set()
        except Exception:
            self.handleError(record)

    @staticmethod
    def _frozen(record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record

    def _write_all(self) -> None:
        reported = 0
        while True:
            self._wake.wait(self.every_s)
            self._wake.clear()
            stopping = self._stop.is_set()
            lines = []
            if self.dropped != reported:
                lost, reported = self.dropped - reported, self.dropped
                lines.append(self._line(self._dropped(lost)))
            while self._waiting:
                lines.append(self._line(self._waiting.popleft()))
            if lines:
                try:
                    stream = self.stream or sys.stderr
                    stream.write("".join(lines))
                    stream.flush()
                except Exception:  # a stream closed or broken: what the logging module does with it
                    logging.Handler.handleError(self, self._dropped(len(lines)))
            if stopping:
                return

    def _line(self, record: logging.LogRecord) -> str:
        try:
            return self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return ""

    @staticmethod
    def _dropped(count: int) -> logging.LogRecord:
        return logging.makeLogRecord(
            {
                "name": __name__,
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": f"{count} log records dropped: the log stream was not read for a while",
            }
        )

    def close(self) -> None:
        """Write what waits (EXIT_FLUSH_S at most: its stream may be stuck), then stop the thread."""
        self._stop.set()
        self._wake.set()
        self._thread.join(EXIT_FLUSH_S)
        super().close()


def configure(level: str, fmt: str = "text") -> None:
    """The root logger at `level`, writing to stderr in `fmt` through a Writer (replacing any
    handler it had); what waits is written at exit."""
    handler = Writer()
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    atexit.register(handler.close)
    logging.captureWarnings(fmt == "json")  # warnings.warn's lines, as JSON too
