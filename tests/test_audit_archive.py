"""`talkinghead audit --until DATE --out FILE --remove`: the audit log only grew (~0.5 KB an event,
in Redis memory with replicas), and nothing could trim it. The archive moves the events before DATE
to a new file - on disk before they leave the log -, while the service goes on appending: no event
lost, none in both places once it succeeded, none in neither whatever failed. The file log and the
real Redis stream, through the command an operator runs."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

import service.audit as audit
from service.audit import REDIS_STREAM, AuditEvent, FileAuditLog, RedisAuditLog
from talkinghead.cli import main
from tests.redis_fixtures import *  # noqa: F403


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()


def _line(index: int, when: float) -> str:
    return json.dumps({"avatar_id": f"a{index}", "event": "create", "time": when, "actor": "t"}) + "\n"


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["avatar_id"] for line in path.read_text().splitlines() if line.startswith('{"a')]


@pytest.fixture(autouse=True)
def _no_redis_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TALKINGHEAD_REDIS_URL", raising=False)


def test_archive_moves_the_old_events_out_while_the_service_appends(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """20,000 events of before the date and after it (out of order near it, as replicas' clocks
    make them), a damaged line, and a writer appending the whole time: the archive holds exactly
    the old events, the log everything else in its order, and every append is in the log once."""
    log = tmp_path / "audit.jsonl"
    times = [1000.0 + i - (3 if i % 7 == 0 else 0) for i in range(20_000)]
    lines = [_line(i, t) for i, t in enumerate(times)]
    lines.insert(5000, '{"avatar_id": "cut", "eve\n')
    log.write_text("".join(lines))
    until = 1000.0 + 10_000
    writer, stop, appended = FileAuditLog(path=log), threading.Event(), []

    def append() -> None:
        while not stop.is_set() or len(appended) < 50:
            name = f"n{len(appended)}"
            writer.append(AuditEvent(event="animate_start", avatar_id=name, actor="t", time=until + 1e6))
            appended.append(name)

    thread = threading.Thread(target=append)
    thread.start()
    out = tmp_path / "archive" / "2026H1.jsonl"
    try:
        assert (
            main(["audit", "--audit-log", str(log), "--until", _when(until), "--out", str(out), "--remove"])
            == 0
        )
    finally:
        stop.set()
        thread.join()
    old = [f"a{i}" for i, t in enumerate(times) if t < until]
    rest = [f"a{i}" for i, t in enumerate(times) if t >= until]
    assert _ids(out) == old
    assert all(json.loads(line)["tenant"] == "default" for line in out.read_text().splitlines())
    left = log.read_text().splitlines()
    assert left[0] == '{"avatar_id": "cut", "eve'  # a damaged line is never moved (nor lost)
    assert [json.loads(line)["avatar_id"] for line in left[1:]] == rest + appended
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{len(old)} event(s) -> {out}, removed from the log",
        "talkinghead audit: 1 line(s) of the log are not events (damaged): left in the log",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "archive",
        "audit.jsonl",
        "audit.jsonl.archive.lock",
    ]
    # the next archive of the same date finds nothing more to move, and writes an empty archive
    again = tmp_path / "archive" / "again.jsonl"
    assert (
        main(["audit", "--audit-log", str(log), "--until", _when(until), "--out", str(again), "--remove"])
        == 0
    )
    assert again.read_text() == "" and log.read_text().splitlines() == left


def test_an_archive_that_fails_removes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the archive is on disk, the log keeps every event; after it (the log cannot be
    rewritten: its disk is full), the command says the events are in both and what to do."""
    log = tmp_path / "audit.jsonl"
    log.write_text("".join(_line(i, 1000.0 + i) for i in range(10)))
    before = log.read_bytes()
    out = tmp_path / "old.jsonl"
    args = ["audit", "--audit-log", str(log), "--until", _when(1005), "--out", str(out), "--remove"]
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the archive cannot be made durable
    with pytest.raises(
        SystemExit, match=rf"^talkinghead audit: No space left on device; nothing written to {out}$"
    ):
        main(args)
    assert log.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl", "audit.jsonl.archive.lock"]
    monkeypatch.setattr(os, "fsync", real_fsync)
    real_replace = os.replace

    def log_refused(source: Any, target: Any) -> None:
        if Path(target) == log:
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", log_refused)
    with pytest.raises(SystemExit) as failed:
        main(args)
    assert str(failed.value) == (
        f"talkinghead audit: No space left on device; 5 event(s) written to {out} are still in the log "
        f"too: delete {out} before archiving again"
    )
    assert log.read_bytes() == before and _ids(out) == ["a0", "a1", "a2", "a3", "a4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit.jsonl",
        "audit.jsonl.archive.lock",
        "old.jsonl",
    ]
    monkeypatch.setattr(os, "replace", real_replace)
    capsys.readouterr()
    # an archive is never written over: the events in it would be gone from everywhere
    with pytest.raises(SystemExit, match=rf"--out {out}: exists; an archive is never written over"):
        main(args)
    out.unlink()
    real_fsync = os.fsync

    def another_writes_out(fd: int) -> None:  # a file appears at --out while the archive is written
        real_fsync(fd)
        if not out.exists():
            out.write_text("another's\n")

    monkeypatch.setattr(os, "fsync", another_writes_out)
    with pytest.raises(SystemExit, match="a file appeared there during the archive; nothing removed"):
        main(args)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert out.read_text() == "another's\n" and log.read_bytes() == before
    out.unlink()
    assert main(args) == 0
    assert _ids(out) == ["a0", "a1", "a2", "a3", "a4"] and _ids(log) == ["a5", "a6", "a7", "a8", "a9"]


def test_one_archive_at_a_time_and_its_flags(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_text("".join(_line(i, 1000.0 + i) for i in range(4)))
    before = log.read_bytes()
    out = tmp_path / "old.jsonl"
    base = ["audit", "--audit-log", str(log)]
    refusals = {
        ("--out", str(out), "--remove"): "--remove needs --until (the events before it) and --out",
        ("--until", "2026-01-01", "--remove"): "--remove needs --until (the events before it) and --out",
        ("--until", "2026-01-01", "--out", str(out), "--remove", "--tenant", "acme"): (
            "--remove moves every event before --until: it takes no --avatar, --tenant"
        ),
        ("--until", "2999-01-01", "--out", str(out), "--remove"): (
            "--until 2999-01-01T00:00:00 is in the future: only past events can be moved out"
        ),
    }
    for flags, message in refusals.items():
        with pytest.raises(SystemExit, match=f"^talkinghead audit: {re.escape(message)}"):
            main([*base, *flags])
    with (tmp_path / "audit.jsonl.archive.lock").open("a") as held:  # another archive runs
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SystemExit) as busy:
            main([*base, "--until", "2026-01-01", "--out", str(out), "--remove"])
    assert str(busy.value) == (
        f"talkinghead audit: another archive of {log} is running; nothing written, nothing removed"
    )
    assert log.read_bytes() == before and not out.exists()
    # --until alone selects, as --since does, and removes nothing
    assert main([*base, "--until", _when(1002), "--out", str(out)]) == 0
    assert _ids(out) == ["a0", "a1"] and log.read_bytes() == before


def test_a_writer_that_opened_the_log_before_the_swap_appends_to_the_new_one(tmp_path: Path) -> None:
    """A service's append that opened the file and waited for its lock while the archive swapped
    a new file in would have written into the file swapped out (gone): it opens the new one."""
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(_line(i, 1000.0 + i) for i in range(3)))
    path.chmod(0o640)
    owner = (4321, 4321) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    os.chown(path, *owner)  # the service's user; the archive runs as root (the new log was root's 0644)
    log, writer = FileAuditLog(path=path), FileAuditLog(path=path)
    done = threading.Event()
    late = threading.Thread(
        target=lambda: (writer.append(AuditEvent(event="delete", avatar_id="late", actor="t")), done.set())
    )

    def keep(events: Any) -> None:
        assert [e["avatar_id"] for e in events] == ["a0"]
        # appended while the archive is written: copied from the old file's tail at the swap
        writer.append(AuditEvent(event="create", avatar_id="during", actor="t"))

    real_open_locked = FileAuditLog._open_locked

    def swap_under_a_waiting_writer(self: FileAuditLog) -> int:
        fd = real_open_locked(self)
        if self is log:  # the archive holds the lock: the writer opens the old file and waits
            late.start()
            assert not done.wait(0.3)
        return fd

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FileAuditLog, "_open_locked", swap_under_a_waiting_writer)
        assert log.archive(1001.0, keep) == 1
        late.join(10)
    assert done.is_set()
    assert _ids(path) == ["a1", "a2", "during", "late"]
    assert (stat.S_IMODE(path.stat().st_mode), path.stat().st_uid, path.stat().st_gid) == (0o640, *owner)


def test_archive_of_the_redis_stream(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In Redis the events Redis appended before the date go (XTRIM MINID); a current one stays; an
    entry that is not an event stops the archive there (the stream keeps it and what follows)."""
    from jobs.redis_queue import connect

    client = connect(redis_url)
    for second in range(1, 6):
        client.xadd(REDIS_STREAM, {"event": _line(second, float(second))}, id=f"{second * 1000}-0")
        if second == 4:
            client.xadd(REDIS_STREAM, {"event": b'{"cut'}, id="4500-0")
    RedisAuditLog(client=client).append(AuditEvent(event="create", avatar_id="now", actor="t"))
    out = tmp_path / "old.jsonl"
    args = ["audit", "--redis-url", redis_url, "--until", _when(3.5), "--out", str(out), "--remove"]
    assert main(args) == 0
    assert _ids(out) == ["a1", "a2", "a3"]
    assert [e[0] for e in client.xrange(REDIS_STREAM)][:3] == [b"4000-0", b"4500-0", b"5000-0"]
    assert client.xlen(REDIS_STREAM) == 4
    assert capsys.readouterr().err == f"3 event(s) -> {out}, removed from the log\n"
    out2 = tmp_path / "old2.jsonl"
    assert main([*args[:3], "--until", _when(10), "--out", str(out2), "--remove"]) == 0
    assert _ids(out2) == ["a4"]
    assert [e[0] for e in client.xrange(REDIS_STREAM)][:2] == [b"4500-0", b"5000-0"]
    assert client.xlen(REDIS_STREAM) == 3
    assert capsys.readouterr().err.splitlines() == [
        f"1 event(s) -> {out2}, removed from the log",
        "talkinghead audit: 1 line(s) of the log are not events (damaged): the archive stopped at it; "
        "it and the events after it stay in the log",
    ]
    # the export skips it (a JSON error ended every export before)
    assert main(["audit", "--redis-url", redis_url]) == 0
    shown = capsys.readouterr()
    assert [json.loads(line)["avatar_id"] for line in shown.out.splitlines()] == ["a5", "now"]
    assert "1 line(s) of the log are not events (damaged): skipped" in shown.err
    client.set(audit.REDIS_ARCHIVING, "another")
    with pytest.raises(
        SystemExit, match="another archive of the Redis audit stream is running; nothing written"
    ):
        main([*args[:3], "--until", _when(10), "--out", str(tmp_path / "x.jsonl"), "--remove"])
    client.close()
