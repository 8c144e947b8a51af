"""Refused credentials leave a trace: every refusal counted in talkinghead_auth_failures_total by
reason (a fixed set, never the key or the peer), and logged at WARNING with the peer's address,
one line per address per window plus the count of those not logged, so a flood cannot fill the log.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client.library import Client
from service.auth import FileRing, issue, revoke
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import ServerThread, test_settings

CALLS_EACH = 20
REASONS = {
    *("missing", "malformed", "unknown_key", "wrong_secret", "revoked_key"),
    *("bad_cert", "unbound_cert", "revoked_cert", "forbidden"),
}


@pytest.fixture(scope="module")
def guarded(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, dict[str, str]]]:
    root = tmp_path_factory.mktemp("refusals")
    ring = FileRing(path=root / "keys.json")
    tokens = {"acme": ring.update(lambda r: issue(r, "acme"))[1]}
    tokens["revoked"] = ring.update(lambda r: issue(r, "acme"))[1]
    ring.update(lambda r: revoke(r, tokens["revoked"].split("_")[1]))
    server = ServerThread(settings=test_settings(model_repository, root / "avatars", api_keys=str(ring.path)))
    yield server, tokens
    server.stop()


def _failures(server: ServerThread) -> dict[str, float]:
    found = {}
    for line in server.metrics().splitlines():
        match = re.fullmatch(r"talkinghead_auth_failures_total\{(.*)\} (\S+)", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            assert set(labels) == {"reason"}, line  # never the key, the tenant or the peer
            found[labels["reason"]] = float(match.group(2))
    return found


def _log_window(server: ServerThread, seconds: float) -> None:
    """The server's refusal log: one line per address per `seconds`."""
    refusals = getattr(server.app.auth, "refusals", None)  # (a server without one logs nothing)
    if refusals is not None:
        refusals.every_s = seconds


def _refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "talkinghead.service.auth"
        and r.levelno == logging.WARNING
        and "refused" in r.getMessage()
    ]


def test_every_refused_call_is_counted_by_reason_and_a_flood_is_logged_once_per_address(
    guarded, caplog: pytest.LogCaptureFixture
) -> None:
    server, tokens = guarded
    _log_window(server, 2.0)  # (10 s in service)
    acme_id = tokens["acme"].split("_")[1]
    forged = f"thk_{acme_id}_not-the-secret"
    credentials = {
        "missing": None,
        "malformed": "junk",
        "unknown_key": "thk_000000000000_whatever",
        "wrong_secret": forged,
        "revoked_key": tokens["revoked"],
    }
    before = _failures(server)
    assert set(before) == REASONS  # every reason exported from the start, at 0
    caplog.set_level(logging.INFO, logger="talkinghead.service.auth")
    for key in credentials.values():
        with Client(target=server.address, api_key=key) as stranger:
            for _ in range(CALLS_EACH):
                with pytest.raises(grpc.RpcError) as refused:
                    list(stranger.list_avatars())
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    after = _failures(server)
    for reason in credentials:
        assert after[reason] - before[reason] == CALLS_EACH, reason
    lines = _refusal_lines(caplog)
    assert len(lines) == 1, lines  # 100 refusals from one address within the window: one line
    assert "ipv4:127.0.0.1:" in lines[0] and "ListAvatars" in lines[0]
    # the window is over (2 s): the key-ring task, every second, says what was not logged
    deadline = time.monotonic() + 10
    while len(lines := _refusal_lines(caplog)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(lines) == 2, lines
    assert "refused 99 more call(s)" in lines[1] and "ipv4:127.0.0.1" in lines[1]
    assert f"revoked_key {CALLS_EACH}" in lines[1] and f"wrong_secret {CALLS_EACH}" in lines[1]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "not-the-secret" not in logged and tokens["revoked"].split("_", 2)[2] not in logged


def test_a_user_acting_for_another_tenant_is_counted_and_logged(
    guarded, caplog: pytest.LogCaptureFixture
) -> None:
    server, tokens = guarded
    _log_window(server, 0.0)  # every refusal gets its line
    before = _failures(server)["forbidden"]
    caplog.set_level(logging.INFO, logger="talkinghead.service.auth")
    with (
        Client(target=server.address, api_key=tokens["acme"], tenant="globex") as sneaky,
        pytest.raises(grpc.RpcError) as refused,
    ):
        list(sneaky.list_avatars())
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _failures(server)["forbidden"] - before == 1
    line = _refusal_lines(caplog)[-1]
    assert "forbidden" in line and "ipv4:127.0.0.1:" in line and "tenant acme" in line


def test_the_refusal_log_bounds_its_lines_over_many_addresses() -> None:
    """A flood from many addresses at once: at most max_lines lines a window; the rest counted."""
    from service.auth import Refused
    from service.refusals import RefusalLog

    now = [0.0]
    refusals = RefusalLog(every_s=10.0, max_lines=5, max_peers=8, clock=lambda: now[0])
    error = Refused("unknown_key", "the API key is not valid")
    with _captured() as records:
        for i in range(1000):
            refusals.record(error, f"ipv4:10.0.{i // 250}.{i % 250}:4000", "/m")
        assert len(records) == 5
        now[0] = 11.0
        refusals.flush()
    assert len(records) == 6 and "995 more call(s) (unknown_key 995)" in records[-1]


@contextlib.contextmanager
def _captured() -> Iterator[list[str]]:
    """The auth logger's WARNING messages during the block."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("talkinghead.service.auth")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_refused_credentials_are_audited_bounded_and_never_with_their_secret(tmp_path: Path) -> None:
    """A call refused for a wrong, unknown or revoked key leaves an `auth_refused` audit event
    (before: none, only a log line): the caller's address, the reason, the method and the key's
    id - `key:<id>` of a ring key, a 12-hex SHA-256 prefix of a token that names none -, never the
    secret sent. A flood is bounded: at most AUTH_PER_KEY events per address and credential per
    window, the rest counted in one `auth_refused_suppressed` event when the window ends. None of
    them names a tenant (the caller was not authenticated), except a `forbidden` refusal's: an
    acme key acting for another tenant is acme's event (it named none, and the export listed it
    as the default tenant's)."""
    from service.audit import AUTH_PER_KEY, FileAuditLog, RefusalAudit
    from service.auth import Authenticator, Refused, token_id

    ring = FileRing(path=tmp_path / "keys.json")
    key_id, token = ring.update(lambda r: issue(r, "acme"))
    forged = f"thk_{key_id}_{'F0rged' * 7}"
    stranger = "thk_0123456789ab_" + "S3cret" * 7
    pasted = "S3cretPastedW1thoutItsPrefix" * 2
    now = [0.0]
    audit_log = FileAuditLog(path=tmp_path / "audit.jsonl")
    audit = RefusalAudit(log_=audit_log, clock=lambda: now[0])
    auth = Authenticator(store=ring, client_certs=False, audit=audit)
    method = "/talkinghead.v1.AvatarService/ListAvatars"

    def refuse(token: str, peer: str) -> None:
        with pytest.raises(Refused) as refused:
            auth.check_token([("authorization", f"Bearer {token}")])
        auth.refused(refused.value, peer, method)

    for port in range(40000, 40050):  # one machine, many ports: one caller
        refuse(forged, f"ipv4:10.0.0.7:{port}")
    refuse(stranger, "ipv4:10.0.0.8:5000")
    refuse(pasted, "ipv4:10.0.0.8:5001")
    ring.update(lambda r: revoke(r, key_id))
    auth.refresh()
    refuse(token, "ipv4:10.0.0.9:6000")
    now[0] = 61.0  # the window is over: what it suppressed is said
    audit.flush()

    events = list(audit_log.read())
    refused = [e for e in events if e["event"] == "auth_refused"]
    forged_events = [e for e in refused if e["actor"].startswith("peer=ipv4:10.0.0.7:")]
    assert len(forged_events) == AUTH_PER_KEY
    assert forged_events[0]["detail"] == {
        "reason": "wrong_secret",
        "credential": f"key:{key_id}",
        "method": method,
    }
    others = {e["detail"]["credential"]: e["detail"]["reason"] for e in refused if e not in forged_events}
    assert others == {
        token_id(stranger): "unknown_key",
        token_id(pasted): "malformed",
        f"key:{key_id}": "revoked_key",
    }
    suppressed = [e for e in events if e["event"] == "auth_refused_suppressed"]
    assert len(suppressed) == 1 and suppressed[0]["actor"] == "peer=ipv4:10.0.0.7"
    assert suppressed[0]["detail"]["refused"] == 50 - AUTH_PER_KEY
    assert suppressed[0]["detail"]["reasons"] == {"wrong_secret": 50 - AUTH_PER_KEY}
    written = (tmp_path / "audit.jsonl").read_text()
    for secret in ("F0rged", "S3cret", token.split("_", 2)[2]):
        assert secret not in written, "a secret in the audit log"
    assert len(events) == AUTH_PER_KEY + 3 + 1

    user_id, user = ring.update(lambda r: issue(r, "acme"))
    auth.refresh()
    acting = [("authorization", f"Bearer {user}"), ("x-talkinghead-tenant", "globex")]
    for _ in range(AUTH_PER_KEY + 2):  # authenticated (acme's key), then refused: acme's event
        with pytest.raises(Refused) as forbidden:
            auth.authenticate(acting, {})
        auth.refused(forbidden.value, "ipv4:10.0.0.10:7000", method)
    now[0] = 122.0
    audit.flush()
    later = list(audit_log.read())[len(events) :]
    assert [(e["event"], e["actor"]) for e in later] == [
        *[("auth_refused", "tenant=acme peer=ipv4:10.0.0.10:7000")] * AUTH_PER_KEY,
        ("auth_refused_suppressed", "tenant=acme peer=ipv4:10.0.0.10"),
    ]
    assert (
        later[0]["detail"]["reason"] == "forbidden" and later[0]["detail"]["credential"] == f"key:{user_id}"
    )
    events = list(audit_log.read())

    for port in range(1000):  # many credentials from many machines: bounded in all
        refuse(f"thk_{port:012x}_guess", f"ipv4:10.1.{port // 250}.{port % 250}:1")
    now[0] = 183.0
    audit.flush()
    assert len(list(audit_log.read())) - len(events) <= 60 + 21
