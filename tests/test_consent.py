"""Every avatar is backed by a consent record, and the audit log says who made, animated and deleted
which face: CreateAvatar without or with a malformed record is INVALID_ARGUMENT naming the field
(and stores nothing), GetAvatar returns the record, the CLI takes it as flags, and a delete leaves a
tombstone in the log that `talkinghead audit` exports. Real server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from api.talkinghead.v1 import avatar_pb2
from client.library import Client, consent_record, landmark_requests
from facekit import partial
from facekit.sequence import LandmarkSequence
from service.app import REMOVED
from service.store import LocalAvatarStore
from talkinghead.cli import main
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, ServerThread


def _record(**changes: object) -> avatar_pb2.ConsentRecord:
    record = avatar_pb2.ConsentRecord()
    record.CopyFrom(CONSENT)
    for name, value in changes.items():
        if name == "collect_time":
            record.collect_time.FromSeconds(int(value))  # type: ignore[call-overload]
        elif name == "collect_nanos":  # out of a Timestamp's range: -2e9 made 1 s a date in 1969
            record.collect_time.seconds, record.collect_time.nanos = 1, int(value)  # type: ignore[call-overload]
        else:
            setattr(record, name, value)
    return record


PERSONAL = {
    "basis": avatar_pb2.CONSENT_BASIS_PERSONAL_CONSENT,
    "source": "",
    "statement_version": "2026-11",
    "document_sha256": "ab" * 32,
}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"basis": avatar_pb2.CONSENT_BASIS_UNSPECIFIED}, "consent.basis"),
        ({"subject": "  "}, "consent.subject"),
        ({"collected_by": ""}, "consent.collected_by"),
        ({"source": ""}, "consent.source"),
        ({**PERSONAL, "statement_version": ""}, "consent.statement_version"),
        ({**PERSONAL, "document_sha256": "not-a-digest"}, "consent.document_sha256"),
        ({"statement_version": "v1"}, "consent.statement_version"),
        ({"collect_time": 4_102_444_800}, "consent.collect_time"),  # 2100
        ({"collect_nanos": -2_000_000_000}, "consent.collect_time.nanos"),
        ({"collect_nanos": 1_000_000_000}, "consent.collect_time.nanos"),
    ],
)
def test_a_malformed_consent_record_is_refused_naming_the_field(
    server: ServerThread, client: Client, changes: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        client.create_avatar("no-consent", [PORTRAIT], consent=_record(**changes))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (raised.value.details() or "")
    assert LocalAvatarStore(root=server.settings.avatar_store).get("no-consent") is None


def test_without_a_consent_record_nothing_is_created(server: ServerThread, client: Client) -> None:
    request = avatar_pb2.CreateAvatarRequest(
        avatar_id="no-consent", images=[avatar_pb2.SourceImage(data=PORTRAIT.read_bytes())]
    )
    with pytest.raises(grpc.RpcError) as raised:
        client.avatars.CreateAvatar(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "consent is required" in (raised.value.details() or "")
    assert LocalAvatarStore(root=server.settings.avatar_store).get("no-consent") is None


def test_the_record_travels_with_the_avatar_and_the_log_keeps_a_tombstone(
    server: ServerThread, client: Client, driver: LandmarkSequence, tmp_path: Path
) -> None:
    signed = tmp_path / "statement-signed.pdf"
    signed.write_bytes(b"%PDF-1.7 I agree that my face may be animated ...")
    consent = consent_record(
        subject="Ada Example",
        basis="personal",
        statement_version="2026-11",
        document=signed,
        collected_by="hr@example.com",
        collect_time=1_764_000_000,
    )
    first = client.create_avatar("ada", [PORTRAIT], consent=CONSENT, replace=True).consent.record_id
    made = client.create_avatar("ada", [PORTRAIT], consent=consent, replace=True)
    kept = client.get_avatar("ada").consent
    assert kept == made.consent and kept.record_id.startswith("cr-") and len(kept.record_id) == 19
    assert kept.document_sha256 == hashlib.sha256(signed.read_bytes()).hexdigest()
    assert (kept.subject, kept.statement_version, kept.collect_time.seconds) == (
        "Ada Example",
        "2026-11",
        1_764_000_000,
    )
    seq = LandmarkSequence(driver.points[:2], driver.frame_size, driver.fps)
    assert len(list(client.animate("ada", landmark_requests(seq)))) == 2
    client.delete_avatar("ada")

    log = [json.loads(line) for line in server.settings.audit_log.read_text().splitlines()]
    ada = [e for e in log if e["avatar_id"] == "ada"]
    assert [e["event"] for e in ada[-4:]] == ["create", "replace", "animate_start", "delete"]
    assert {e["consent_id"] for e in ada[-3:]} == {kept.record_id}
    # The replace is the first record's tombstone: its consent and what went with it.
    assert ada[-3]["detail"]["replaced"] == {"consent_id": first, "removed": list(REMOVED)}
    assert all(
        e["actor"].startswith("tenant=default role=admin credential=none peer=")
        and e["model_id"] == made.model_id
        for e in ada
    )
    tombstone = ada[-1]["detail"]
    assert tombstone["tombstone"] is True and "photos" in tombstone["removed"]
    with pytest.raises(grpc.RpcError):
        client.get_avatar("ada")

    out = tmp_path / "export.jsonl"
    argv = ["audit", "--audit-log", str(server.settings.audit_log), "--avatar", "ada", "--event", "delete"]
    assert main([*argv, "--out", str(out)]) == 0
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert exported == [{**ada[-1], "tenant": "default"}]  # (the event as logged, and its tenant)


def test_the_cli_takes_the_consent_record_as_flags(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--server", server.address]
    create = ["avatar", *flags, "create", "cli-mona", str(PORTRAIT), "--subject", "Mona Lisa (Leonardo)"]
    # a record the server would refuse is named in the CLI's own flags, before anything is sent
    assert main([*create, "--basis", "public-domain", "--collected-by", "studio"]) == 2
    assert capsys.readouterr().err == (
        "talkinghead avatar create: --basis public-domain needs --source (where the work comes from)\n"
    )
    assert (
        main([*create, "--basis", "personal", "--statement-version", "v1", "--collected-by", "studio"]) == 2
    )
    assert "--basis personal needs --document" in capsys.readouterr().err
    assert main(["avatar", *flags, "list"]) == 0
    assert "cli-mona" not in capsys.readouterr().out
    source = ["--source", "https://collections.louvre.fr/ark:/53355/cl010062370"]
    assert main([*create, "--basis", "public-domain", *source, "--collected-by", "studio"]) == 0
    out = capsys.readouterr().out
    assert "consent cr-" in out and "public_domain (https://collections.louvre.fr" in out
    assert main(["avatar", *flags, "delete", "cli-mona"]) == 0


def test_the_demo_will_not_stamp_its_portraits_consent_on_another_face(tmp_path: Path) -> None:
    """`make demo PORTRAIT=...` without SUBJECT and SOURCE stops before it starts anything: the
    bundled portrait's consent record names a NASA astronaut, not the user's photo."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("SUBJECT", "SOURCE")}
    env.update(PORTRAIT=str(root / "tests/golden/landmarks_128_w1_aa.png"), OUT=str(tmp_path / "demo"))
    done = subprocess.run(
        ["bash", "tools/demo.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "set SUBJECT" in done.stderr and "SOURCE" in done.stderr
    assert not (tmp_path / "demo").exists()  # no server started, nothing written
    # one's own face: a personal record, which has no SOURCE but needs the signed statement (the
    # demo passed --source whatever the basis, so a personal record could not be made at all)
    env.update(BASIS="personal", SUBJECT="Me", STATEMENT_VERSION="2026-11")
    done = subprocess.run(
        ["bash", "tools/demo.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "BASIS=personal: set SUBJECT" in done.stderr and "DOCUMENT" in done.stderr
    assert not (tmp_path / "demo").exists()


def _audit_log(path: Path, events: int) -> Path:
    """A log of `events` create events, as the service appends them."""
    with path.open("w") as log:
        for index in range(events):
            event = {"avatar_id": f"a{index}", "event": "create", "time": 1.0 + index, "actor": "t" * 100}
            log.write(json.dumps(event) + "\n")
    return path


def test_audit_writes_its_export_whole_or_not_at_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TALKINGHEAD_REDIS_URL", raising=False)
    log = _audit_log(tmp_path / "audit.jsonl", 3)
    kept = tmp_path / "november.jsonl"
    kept.write_text('{"an": "earlier export"}\n')
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(SystemExit, match=rf"^talkinghead audit: {missing}: no audit log there"):
        main(["audit", "--audit-log", str(missing), "--out", str(kept)])
    assert kept.read_text() == '{"an": "earlier export"}\n'  # not emptied before the log was found
    out = tmp_path / "exports" / "2026" / "december.jsonl"  # its folder is made
    assert main(["audit", "--audit-log", str(log), "--out", str(out)]) == 0
    # an export SIGKILLed mid-write left its hidden partial file: the next export removes it
    gone = subprocess.Popen(["true"])
    gone.wait()
    left = partial.partial_path(out)
    left = left.with_name(left.name.replace(f"-{os.getpid()}.", f"-{gone.pid}."))
    left.write_text('{"half": ')
    assert main(["audit", "--audit-log", str(log), "--out", str(out)]) == 0
    assert not left.exists()
    assert [json.loads(line)["avatar_id"] for line in out.read_text().splitlines()] == ["a0", "a1", "a2"]
    assert capsys.readouterr().err == f"3 event(s) -> {out}\n" * 2
    with pytest.raises(SystemExit, match=rf"^talkinghead audit: --out {kept / 'x.jsonl'}: a parent"):
        main(["audit", "--audit-log", str(log), "--out", str(kept / "x.jsonl")])
    with pytest.raises(SystemExit, match=rf"^talkinghead audit: --out {tmp_path}: is a directory$"):
        main(["audit", "--audit-log", str(log), "--out", str(tmp_path)])
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert names == [
        "audit.jsonl",
        "exports",
        "exports/2026",
        "exports/2026/december.jsonl",
        "november.jsonl",
    ]


def test_audit_selects_an_avatar_in_every_tenant_or_in_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--avatar mona` found nothing of a tenant's `mona` (stored as acme.mona); now it finds every
    tenant's, and --tenant (or --avatar acme.mona) narrows to one."""
    monkeypatch.delenv("TALKINGHEAD_REDIS_URL", raising=False)
    log = tmp_path / "audit.jsonl"
    ids = ["mona", "acme.mona", "globex.mona", "acme.ada"]
    log.write_text("".join(json.dumps({"avatar_id": a, "event": "create", "time": 1.0}) + "\n" for a in ids))

    def selected(*flags: str) -> list[str]:
        assert main(["audit", "--audit-log", str(log), *flags]) == 0
        return [json.loads(line)["avatar_id"] for line in capsys.readouterr().out.splitlines()]

    assert selected("--avatar", "mona") == ["mona", "acme.mona", "globex.mona"]
    assert selected("--avatar", "mona", "--tenant", "acme") == ["acme.mona"]
    assert selected("--avatar", "acme.mona") == ["acme.mona"]
    assert selected("--avatar", "default.mona") == ["mona"]  # (it found none: stored unprefixed)
    assert selected("--tenant", "acme") == ["acme.mona", "acme.ada"]
    assert selected("--tenant", "default") == ["mona"]


def test_audit_lists_refused_callers_under_no_tenant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call refused before its caller was authenticated (an unknown, forged or revoked key) has
    no avatar and no tenant, but `--tenant default` listed it as the default tenant's: an admin
    reading their tenant's audit saw strangers' refusals as theirs. Now an event is its avatar's
    tenant's, or - without an avatar - the tenant its actor names (a caller authenticated, then
    refused: `forbidden`), or no tenant's: `--no-tenant` lists those, and each exported line says
    its tenant (null: none). Lines written before (no tenant named anywhere) read the same way."""
    monkeypatch.delenv("TALKINGHEAD_REDIS_URL", raising=False)
    log = tmp_path / "audit.jsonl"
    refused = {"reason": "wrong_secret", "credential": "key:0123456789ab", "method": "/m"}
    events: list[dict[str, Any]] = [
        {"avatar_id": "mona", "event": "create", "actor": "tenant=default role=user peer=a"},
        {"avatar_id": "acme.ada", "event": "create", "actor": "tenant=acme role=user peer=b"},
        {"avatar_id": "", "event": "auth_refused", "actor": "peer=ipv4:10.0.0.7:4000", "detail": refused},
        {"avatar_id": "", "event": "auth_refused_suppressed", "actor": "peer=ipv4:10.0.0.7", "detail": {}},
        {"avatar_id": "", "event": "auth_refused", "actor": "tenant=acme peer=ipv4:10.0.0.8:1", "detail": {}},
    ]
    log.write_text("".join(json.dumps({**e, "time": 1.0 + i}) + "\n" for i, e in enumerate(events)))

    def selected(*flags: str) -> list[tuple[str, str, str | None]]:
        assert main(["audit", "--audit-log", str(log), *flags]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        return [(e["event"], e["actor"].split()[-1], e["tenant"]) for e in lines]

    assert selected("--tenant", "default") == [("create", "peer=a", "default")]
    assert selected("--tenant", "acme") == [
        ("create", "peer=b", "acme"),
        ("auth_refused", "peer=ipv4:10.0.0.8:1", "acme"),
    ]
    assert selected("--no-tenant") == [
        ("auth_refused", "peer=ipv4:10.0.0.7:4000", None),
        ("auth_refused_suppressed", "peer=ipv4:10.0.0.7", None),
    ]
    assert [tenant for *_, tenant in selected()] == ["default", "acme", None, None, "acme"]
    with pytest.raises(SystemExit):
        main(["audit", "--audit-log", str(log), "--tenant", "acme", "--no-tenant"])


def test_audit_into_a_pipe_its_reader_closed_stops_quietly(tmp_path: Path) -> None:
    """`talkinghead audit | head -3`: no BrokenPipeError traceback, exit status 0."""
    import os
    import subprocess
    import sys

    log = _audit_log(tmp_path / "audit.jsonl", 20_000)  # 2.6 MB: far more than a pipe holds
    env = {k: v for k, v in os.environ.items() if k != "TALKINGHEAD_REDIS_URL"}
    process = subprocess.Popen(
        [sys.executable, "-m", "talkinghead.cli", "audit", "--audit-log", str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    first = [process.stdout.readline() for _ in range(3)]
    process.stdout.close()  # as `head -3` exits
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0, err
    assert err == ""
    assert [json.loads(line)["avatar_id"] for line in first] == ["a0", "a1", "a2"]


def test_a_disk_that_fills_mid_event_leaves_the_audit_log_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk took part of a tombstone (os.write wrote the 102 bytes that fitted, helper-81):
    the next event was appended onto the cut line, and `talkinghead audit` refused to export any
    of the log. Now an append that does not fit whole fails (counted by the server) and leaves the
    file as it was; a line damaged anyway is skipped by the export, which says so."""
    import service.audit as audit
    from service.audit import AuditEvent, FileAuditLog

    monkeypatch.delenv("TALKINGHEAD_REDIS_URL", raising=False)
    path = tmp_path / "audit.jsonl"
    log = FileAuditLog(path=path)
    log.append(AuditEvent(event="create", avatar_id="b0", actor="t", model_id="m", consent_id="c"))
    whole = path.read_bytes()
    real_write = os.write
    monkeypatch.setattr(audit.os, "write", lambda fd, data: real_write(fd, data[:40]))  # the disk fills
    with pytest.raises(OSError, match="only 40 of the event's"):
        log.append(AuditEvent(event="delete", avatar_id="b1", actor="t", model_id="m", consent_id="c"))
    assert path.read_bytes() == whole  # the cut line taken back
    monkeypatch.setattr(audit.os, "write", real_write)  # room again
    log.append(AuditEvent(event="create", avatar_id="b2", actor="t", model_id="m", consent_id="c"))
    with path.open("a") as handle:  # a line damaged some other way
        handle.write('{"avatar_id": "b3", "eve\n')
    log.append(AuditEvent(event="create", avatar_id="b4", actor="t", model_id="m", consent_id="c"))
    out = tmp_path / "export.jsonl"
    assert main(["audit", "--audit-log", str(path), "--out", str(out)]) == 0
    assert [json.loads(line)["avatar_id"] for line in out.read_text().splitlines()] == ["b0", "b2", "b4"]
    assert capsys.readouterr().err.splitlines() == [
        f"3 event(s) -> {out}",
        "talkinghead audit: 1 line(s) of the log are not events (damaged): skipped",
    ]
