"""The server's and the worker's logs as an operator ships them (Loki, Elasticsearch): one JSON
object a line with --log-format json, and the access log, one line per call (talkinghead.access).

Real servers only: a `talkinghead serve` subprocess (with its embedded worker, a child writing to the
same stderr) whose every output line must parse as JSON, one in the default text format whose access
lines are greppable, and an in-process server for what only a log capture shows (levels, the switch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from api.talkinghead.v1 import avatar_pb2
from client.library import Client, landmark_requests
from facekit.sequence import LandmarkSequence
from service.auth import FileRing, issue
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, REPO, ServerThread, copy_base_models, test_settings
from tests.service_process import ServerProcess

AVATARS = "talkinghead.v1.AvatarService"
ANIMATION = "talkinghead.v1.AnimationService"
FRAMES = 3


def _first(driver: LandmarkSequence, n: int) -> LandmarkSequence:
    return LandmarkSequence(driver.points[:n], driver.frame_size, driver.fps)


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def _wait_for(path: Path, pattern: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"no {pattern!r} in the log: {path.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def json_server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory, driver: LandmarkSequence
) -> Iterator[dict[str, Any]]:
    """A server subprocess with --log-format json, API keys and its embedded worker, put through
    a create, an Animate, a NOT_FOUND, a bad key and health checks; then stopped (its log is whole)."""
    root = tmp_path_factory.mktemp("json-logs")
    ring = FileRing(path=root / "keys.json")
    key = ring.update(lambda r: issue(r, "acme"))[1]
    repository = copy_base_models(model_repository, root / "repo")  # the worker sweeps its own
    server = ServerProcess(
        repository=repository,
        root=root,
        env={
            "TALKINGHEAD_API_KEYS": str(ring.path),
            "TALKINGHEAD_WORKER": "embedded",
            "TALKINGHEAD_WORKER_CHECKPOINT": str(REPO / "models/talkinghead-small.pt"),
        },
        args=("--log-format", "json"),
    )
    got: dict[str, Any] = {"key": key}
    try:
        with Client(target=server.address, api_key=key, timeout=120) as client:
            client.health()
            client.create_avatar("mona", [PORTRAIT], consent=CONSENT)
            client.health()
            got["frames"] = len(
                list(client.animate("mona", landmark_requests(_first(driver, FRAMES)), motion="relative"))
            )
            assert got["frames"] == FRAMES
            got["not_found"] = _code(
                lambda: client.avatars.GetAvatar(
                    avatar_pb2.GetAvatarRequest(avatar_id="nobody"),
                    metadata=[("x-request-id", "req-42")],
                    timeout=30,
                )
            )
            client.avatars.GetAvatar(
                avatar_pb2.GetAvatarRequest(avatar_id="mona"),
                metadata=[("x-request-id", "r" * 129)],
                timeout=30,
            )
        with Client(target=server.address, api_key=key[:-2] + "xx", timeout=30) as stranger:
            got["unauthenticated"] = _code(lambda: stranger.get_avatar("mona"))
            stranger.health()
        _wait_for(server.log, r"talkinghead\.worker")  # the embedded worker has logged (as JSON)
    finally:
        server.stop()
    text = server.log.read_text()
    got["text"] = text
    got["lines"] = [line for line in text.splitlines() if line.strip()]
    yield got


def _records(got: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in got["lines"]]


def _access(got: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in _records(got) if r["logger"] == "talkinghead.access"]


def test_every_line_of_server_and_worker_is_a_json_object(json_server) -> None:
    bad = []
    for line in json_server["lines"]:
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(record, dict) or not {"time", "level", "logger", "message"} <= set(record):
            bad.append(line)
    assert bad == [], bad[:5]
    records = _records(json_server)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]) for r in records)
    loggers = {r["logger"] for r in records}
    assert "talkinghead.service" in loggers and "talkinghead.worker" in loggers, loggers


def test_access_lines_say_method_code_tenant_avatar_frames_and_duration(json_server) -> None:
    lines = _access(json_server)
    assert all(r["level"] == "INFO" and r["duration_ms"] > 0 for r in lines)
    assert all(r["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:")) for r in lines)
    by = {(r["method"], r["code"]): r for r in lines}
    create = by[(f"{AVATARS}/CreateAvatar", "OK")]
    assert create["tenant"] == "acme" and create["avatar"] == "mona"
    assert "details" not in create and "frames" not in create
    animate = by[(f"{ANIMATION}/Animate", "OK")]
    assert animate["tenant"] == "acme" and animate["avatar"] == "mona"
    assert animate["frames"] == json_server["frames"] == FRAMES
    assert json_server["not_found"] == grpc.StatusCode.NOT_FOUND
    missing = by[(f"{AVATARS}/GetAvatar", "NOT_FOUND")]
    assert missing["avatar"] == "nobody" and missing["tenant"] == "acme"
    assert missing["request_id"] == "req-42"
    assert "nobody" in missing["details"]
    assert "request_id" not in by[(f"{AVATARS}/GetAvatar", "OK")], (
        "a request id over 128 characters is dropped"
    )
    assert json_server["unauthenticated"] == grpc.StatusCode.UNAUTHENTICATED
    refused = by[(f"{AVATARS}/GetAvatar", "UNAUTHENTICATED")]
    assert refused.get("tenant") is None and refused["details"]
    assert len(lines) == 5, [(r["method"], r["code"]) for r in lines]  # nothing per frame, no health


def test_health_checks_are_not_logged_at_info_and_no_line_holds_the_key(json_server) -> None:
    assert not [r for r in _access(json_server) if "Health" in r["method"]]
    key = json_server["key"]
    secret = key.split("_", 2)[2]  # the secret is base64url: it may hold "_" itself
    assert key not in json_server["text"] and secret not in json_server["text"]
    assert "authorization" not in json_server["text"].lower()


def test_text_format_is_the_default_and_its_access_lines_grep(model_repository: Path, tmp_path: Path) -> None:
    server = ServerProcess(repository=model_repository, root=tmp_path)
    try:
        with Client(target=server.address, timeout=30) as client:
            assert _code(lambda: client.get_avatar("nobody")) == grpc.StatusCode.NOT_FOUND
            list(client.list_avatars())
        with grpc.insecure_channel(server.address) as channel:  # a method the server does not have
            unknown = channel.unary_unary("/talkinghead.v1.Nope/Call")
            assert _code(lambda: unknown(b"", timeout=30)) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop()
    text = server.log.read_text()
    assert not text.lstrip().startswith("{")
    # gRPC answers it itself: no peer known, none written (it was "peer=None")
    assert re.search(r"access other UNIMPLEMENTED \d+\.\d ms$", text, re.M), text[-3000:]
    missing = [line for line in text.splitlines() if "access GetAvatar NOT_FOUND" in line]
    assert len(missing) == 1, text[-3000:]
    assert re.search(
        r"INFO talkinghead\.access: access GetAvatar NOT_FOUND \d+\.\d ms peer=ipv4:127\.0\.0\.1:\d+ "
        r"tenant=default avatar=nobody details=\".*nobody.*\"$",
        missing[0],
    ), missing[0]
    assert re.search(r"access ListAvatars OK \d+\.\d ms peer=\S+ tenant=default$", text, re.M), text[-3000:]


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="talkinghead.access")
    yield caplog


def _access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "talkinghead.access"]


def test_health_is_logged_at_debug_and_the_switch_turns_the_log_off(
    model_repository: Path, tmp_path: Path, captured: pytest.LogCaptureFixture
) -> None:
    for access_log in (True, False):
        captured.clear()
        server = ServerThread(
            settings=test_settings(model_repository, tmp_path / str(access_log), access_log=access_log)
        )
        try:
            with server.client() as client:
                client.health()
                list(client.list_avatars())
        finally:
            server.stop()
        records = _access_records(captured)
        if not access_log:
            assert records == []
            continue
        levels = {r.method: r.levelno for r in records}  # type: ignore[attr-defined]
        assert levels == {
            "grpc.health.v1.Health/Check": logging.DEBUG,
            f"{AVATARS}/ListAvatars": logging.INFO,
        }, levels


def test_json_formatter_keeps_a_record_on_one_line_with_its_fields_and_traceback() -> None:
    from facekit import logs

    formatter = logs.JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x.y", logging.ERROR, __file__, 1, "two\nlines %s", ("here",), None)
        import sys

        record.exc_info = sys.exc_info()
    record.tenant = "acme"
    line = formatter.format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "two\nlines here" and parsed["level"] == "ERROR" and parsed["logger"] == "x.y"
    assert parsed["tenant"] == "acme"
    assert "ValueError: boom" in parsed["exception"] and "Traceback" in parsed["exception"]


# ---- a log stream nobody reads ------------------------------------------------------------------


def _drain(fd: int) -> tuple[threading.Thread, list[bytes]]:
    """Read `fd` to its end in a thread: (the thread, what it read)."""
    chunks: list[bytes] = []

    def read() -> None:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, chunks


def test_a_server_whose_log_is_not_read_goes_on_answering(model_repository: Path, tmp_path: Path) -> None:
    """Its output into a pipe nobody reads for 1,500 calls (an access line each, ~250 KB): every call
    is answered, and once the pipe is read every line comes out. Before, the event loop wrote each
    line itself: the 64 KiB pipe filled and the server hung at call 519 (DEADLINE_EXCEEDED)."""
    read_end, write_end = os.pipe()
    try:
        server = ServerProcess(repository=model_repository, root=tmp_path, output=write_end)
    finally:
        os.close(write_end)  # (the server holds its own)
    try:
        with Client(target=server.address, timeout=10) as client:
            for _ in range(1500):
                assert list(client.list_avatars()) == []
        reader, chunks = _drain(read_end)
    finally:
        server.stop()
    reader.join(30)
    os.close(read_end)
    assert server.process.returncode == 0
    text = b"".join(chunks).decode()
    assert len(re.findall(r"access ListAvatars OK ", text)) == 1500, text[-2000:]
    assert "log records dropped" not in text  # 10,000 wait for the writer: none lost here


def _fill(fd: int) -> None:
    """Write into pipe `fd` until it is full."""
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(fd, b"." * 4096)
    os.set_blocking(fd, True)


def _logger_on(name: str, writer: logging.Handler) -> logging.Logger:
    """Logger `name` writing INFO and up through `writer` only, as "LEVEL message"."""
    writer.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger(name)
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(writer)
    return log


def test_a_full_log_queue_drops_records_and_says_how_many() -> None:
    """With the stream blocked and the queue full, logging returns at once and drops the record;
    the writer, writing again, says how many it lost, and writes what came after."""
    from facekit import logs

    read_end, write_end = os.pipe()
    _fill(write_end)
    stream = os.fdopen(write_end, "w")
    writer = logs.Writer(stream=stream, capacity=10)
    log = _logger_on("test.blocked", writer)
    try:
        logged = threading.Thread(target=lambda: [log.info("record %d", i) for i in range(100)])
        logged.start()
        logged.join(10)
        assert not logged.is_alive(), "logging blocked on a stream nobody reads"
        # 10 wait (and up to 10 the writer took before it blocked writing them): the rest were dropped
        assert 80 <= writer.dropped <= 90, writer.dropped
        deadline = time.monotonic() + 10
        while writer.waiting:  # the writer takes them (and blocks writing): room for the next
            assert time.monotonic() < deadline, "the writer took nothing"
            time.sleep(0.01)
        reader, chunks = _drain(read_end)
        log.info("after")
        writer.close()
        stream.close()
        reader.join(10)
    finally:
        log.removeHandler(writer)
    lines = b"".join(chunks).decode().lstrip(".").splitlines()
    assert lines[-1] == "INFO after", lines[-3:]
    assert f"WARNING {writer.dropped} log records dropped: the log stream was not read for a while" in lines
    assert len([line for line in lines if line.startswith("INFO record ")]) == 100 - writer.dropped


def test_a_warning_is_written_at_once_with_what_waited_before_it() -> None:
    """Info lines wait for the writer's next round (batched: an access line per call costs no
    thread switch); a warning wakes it, so a process killed just after one has written it, and
    the lines before it, in order."""
    from facekit import logs

    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    writer = logs.Writer(stream=stream, every_s=60.0)
    log = _logger_on("test.wake", writer)
    reader, chunks = _drain(read_end)
    try:
        log.info("before")
        time.sleep(0.3)
        assert not chunks, "an info line was written before the writer's round"
        log.warning("stopping: %s", "grace period over")
        deadline = time.monotonic() + 10
        while b"grace period over" not in b"".join(chunks):
            assert time.monotonic() < deadline, f"the warning waited for the writer's round: {chunks}"
            time.sleep(0.01)
        assert b"".join(chunks).decode().splitlines() == [
            "INFO before",
            "WARNING stopping: grace period over",
        ]
    finally:
        log.removeHandler(writer)
        writer.close()
        stream.close()
        reader.join(10)


def test_a_call_the_stopping_server_cuts_off_is_logged_as_its_client_saw_it(
    model_repository: Path, tmp_path: Path, captured: pytest.LogCaptureFixture, driver: LandmarkSequence
) -> None:
    """A stream still open when a stopping server's grace ended: its client got UNAVAILABLE
    ("Cancelling all calls"), while the access line and talkinghead_rpcs_total said CANCELLED,
    a client's own doing (helper-71, SIGTERM during an `animate`)."""
    server = ServerThread(settings=test_settings(model_repository, tmp_path))
    release = threading.Event()

    def requests() -> Iterator[Any]:
        yield from landmark_requests(_first(driver, 2))
        release.wait(20)  # the stream stays open, as a live client's does

    stopper = threading.Thread(target=lambda: server.stop(grace=0.3))
    try:
        server.wait_ready()
        with server.client() as client:
            client.create_avatar("cut", [PORTRAIT], consent=CONSENT)
            frames = client.animate("cut", requests())
            assert len([next(frames), next(frames)]) == 2
            stopper.start()
            threading.Timer(3.0, release.set).start()
            with pytest.raises(grpc.RpcError) as cut:
                next(frames)
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE, cut.value
    finally:
        release.set()
        if stopper.ident:
            stopper.join(30)
        else:
            server.stop()
    [line] = [r for r in _access_records(captured) if r.method == f"{ANIMATION}/Animate"]  # type: ignore[attr-defined]
    assert line.code == "UNAVAILABLE", line.code  # type: ignore[attr-defined]
