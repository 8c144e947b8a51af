"""How the server and the worker log: `text` for a person at a terminal, `json` for a log pipeline.

    configure("INFO", "json")

json: one object a line (a message with newlines stays on its line: JSON escapes them): `time` (UTC,
ISO 8601 with milliseconds and Z), `level`, `logger`, `message`, every structured field the record
carries (`log.info(..., extra={"tenant": "acme"})`), and `exception` (the formatted traceback) when
there is one. Python warnings go through logging too, so they come out as JSON as well. What C
libraries (gRPC's core, ONNX Runtime) write to stderr themselves does not pass through Python's
logging and stays as they wrote it.

Stdlib only: the service image and the worker image both carry facekit/.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

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


def configure(level: str, fmt: str = "text") -> None:
    """The root logger at `level`, writing to stderr in `fmt` (replacing any handler it had)."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(fmt == "json")  # warnings.warn's lines, as JSON too
