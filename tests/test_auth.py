"""Authentication, tenants, roles and quotas through a real server on 127.0.0.1 (service/auth.py).

Two tenants' keys against each other's avatars and operations, a stranger with no or junk
credentials, an admin acting for a tenant, key revocation on a running server, quotas, mTLS with a
client certificate from the right CA, from an unrelated CA and with none, and the refusal to listen
beyond loopback without authentication.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from client.library import Client, landmark_requests
from facekit.sequence import LandmarkSequence
from service.auth import ADMIN, FileRing, bind_cert, issue, revoke, set_quotas
from service.settings import Settings
from tests.redis_fixtures import RedisServer, free_port
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, REPO, ServerThread, test_settings


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code()


def _first(driver: LandmarkSequence, n: int) -> LandmarkSequence:
    return LandmarkSequence(driver.points[:n], driver.frame_size, driver.fps)


def _first_frames(client: Client, avatar_id: str, driver: LandmarkSequence, n: int = 2) -> list[np.ndarray]:
    return [
        f.image for f in client.animate(avatar_id, landmark_requests(_first(driver, n)), motion="relative")
    ]


@pytest.fixture(scope="module")
def keyed(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, dict[str, str], FileRing]]:
    root = tmp_path_factory.mktemp("auth")
    ring = FileRing(path=root / "keys.json")
    tokens = {
        "acme": ring.update(lambda r: issue(r, "acme"))[1],
        "globex": ring.update(lambda r: issue(r, "globex"))[1],
        "ops": ring.update(lambda r: issue(r, "ops", ADMIN))[1],
        "spare": ring.update(lambda r: issue(r, "acme", note="to revoke"))[1],
        "initech": ring.update(lambda r: issue(r, "initech"))[1],
    }
    ring.update(lambda r: set_quotas(r, "initech", max_streams=1, creates_per_minute=3))
    settings = test_settings(model_repository, root / "avatars", api_keys=str(ring.path))
    server = ServerThread(settings=settings)
    server.wait_ready()
    yield server, tokens, ring
    server.stop()


def test_calls_without_valid_credentials_are_refused_and_health_stays_open(keyed, driver) -> None:
    server, tokens, _ = keyed
    for key in (None, "junk", "thk_000000000000_not-the-secret", tokens["acme"][:-2] + "xx"):
        with Client(target=server.address, api_key=key) as stranger:
            assert _code(lambda: list(stranger.list_avatars())) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: stranger.get_avatar("mona")) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: _first_frames(stranger, "mona", driver)) == grpc.StatusCode.UNAUTHENTICATED
            assert (
                _code(lambda: stranger.get_operation("operations/" + "0" * 16))
                == grpc.StatusCode.UNAUTHENTICATED
            )
            stranger.wait_ready(10)  # health answers without credentials
    # A stranger's big upload is refused before it is read: no RESOURCE_EXHAUSTED, no decoding.
    with Client(target=server.address) as stranger:
        blob = b"\xff" * (30 * 1024 * 1024)
        started = time.monotonic()
        code = _code(lambda: stranger.create_avatar("big", [blob], consent=CONSENT))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - started < 10


def test_a_tenant_cannot_see_animate_or_delete_another_tenants_avatar(keyed, driver) -> None:
    server, tokens, _ = keyed
    with (
        Client(target=server.address, api_key=tokens["acme"]) as acme,
        Client(target=server.address, api_key=tokens["globex"]) as globex,
    ):
        acme.create_avatar("mona", [PORTRAIT], display_name="acme's", consent=CONSENT, replace=True)
        missing = _code(lambda: globex.get_avatar("never-made"))
        with pytest.raises(grpc.RpcError) as theirs:
            globex.get_avatar("mona")
        # The same answer as for an id that does not exist: no hint that acme has one.
        assert theirs.value.code() == missing == grpc.StatusCode.NOT_FOUND
        assert theirs.value.details() == "no avatar with id 'mona'"
        assert "mona" not in {a.avatar_id for a in globex.list_avatars()}
        assert _code(lambda: _first_frames(globex, "mona", driver)) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: globex.delete_avatar("mona")) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: globex.personalise("mona")) == grpc.StatusCode.NOT_FOUND
        # globex may have its own "mona": a separate avatar, not ALREADY_EXISTS.
        globex.create_avatar("mona", [PORTRAIT], display_name="globex's", consent=CONSENT, replace=True)
        assert acme.get_avatar("mona").display_name == "acme's"
        assert globex.get_avatar("mona").display_name == "globex's"
        assert len(_first_frames(acme, "mona", driver)) == 2
        globex.delete_avatar("mona")
        assert acme.get_avatar("mona").display_name == "acme's"
        # acme's operation is invisible to globex.
        operation = acme.personalise("mona")
        assert _code(lambda: globex.get_operation(operation.name)) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: globex.cancel_operation(operation.name)) == grpc.StatusCode.NOT_FOUND
        assert operation.name not in {o.name for o in globex.list_operations()}
        assert acme.get_operation(operation.name).metadata.avatar_id == "mona"
        acme.cancel_operation(operation.name)
    audit = [json.loads(line) for line in server.settings.audit_log.read_text().splitlines()]
    created = [e for e in audit if e["event"] == "create" and e["avatar_id"].endswith("mona")]
    assert {e["actor"].split()[0] for e in created} >= {"tenant=acme", "tenant=globex"}


def test_an_admin_acts_for_a_tenant_and_a_user_may_not(keyed) -> None:
    server, tokens, _ = keyed
    with Client(target=server.address, api_key=tokens["acme"]) as acme:
        acme.create_avatar("admin-seen", [PORTRAIT], consent=CONSENT, replace=True)
    with Client(target=server.address, api_key=tokens["ops"], tenant="acme") as ops:
        assert ops.get_avatar("admin-seen").avatar_id == "admin-seen"
    with Client(target=server.address, api_key=tokens["ops"]) as ops:
        assert _code(lambda: ops.get_avatar("admin-seen")) == grpc.StatusCode.NOT_FOUND  # its own tenant
    with Client(target=server.address, api_key=tokens["globex"], tenant="acme") as sneaky:
        assert _code(lambda: sneaky.get_avatar("admin-seen")) == grpc.StatusCode.PERMISSION_DENIED


def test_a_revoked_key_stops_working_on_the_running_server(keyed) -> None:
    server, tokens, ring = keyed
    with Client(target=server.address, api_key=tokens["spare"]) as spare:
        list(spare.list_avatars())
        key_id = tokens["spare"].split("_")[1]
        assert ring.update(lambda r: revoke(r, key_id))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                list(spare.list_avatars())
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            time.sleep(0.2)
        else:
            pytest.fail("a revoked key still worked 5 s later")


def test_quotas_refuse_with_a_retry_hint(keyed, driver) -> None:
    server, tokens, _ = keyed
    with Client(target=server.address, api_key=tokens["initech"]) as initech:
        made = 0
        with pytest.raises(grpc.RpcError) as refused:
            for i in range(5):
                initech.create_avatar(f"q{i}", [PORTRAIT], consent=CONSENT, replace=True)
                made += 1
        assert made == 3  # creates_per_minute = 3
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 avatars a minute" in refused.value.details()
        trailers = dict(refused.value.trailing_metadata() or ())
        assert int(trailers["retry-after"]) >= 1
        # One concurrent stream: a second is refused while the first is open.
        stream = initech.animate("q0", landmark_requests(_first(driver, 40)), motion="relative")
        next(stream)
        assert _code(lambda: _first_frames(initech, "q1", driver)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        del stream
    # acme has the default quotas and is not affected by initech's.
    with Client(target=server.address, api_key=tokens["acme"]) as acme:
        assert len(_first_frames(acme, "mona", driver)) == 2
    assert server.metric('talkinghead_quota_refusals_total{quota="creates_per_minute",tenant="initech"}') >= 1


def test_the_keys_command_issues_lists_and_revokes(tmp_path: Path) -> None:
    ring = tmp_path / "keys.json"

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "talkinghead.cli", "keys", "--keys", str(ring), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

    token = keys("issue", "--tenant", "acme", "--note", "studio").stdout.strip()
    assert token.startswith("thk_")
    listing = json.loads(keys("list").stdout)
    assert [(k["tenant"], k["note"], k["revoked"]) for k in listing["keys"]] == [("acme", "studio", "")]
    secret = token.split("_", 2)[2]
    assert secret not in ring.read_text() and secret not in keys("list").stdout
    keys("revoke", listing["keys"][0]["key_id"])
    assert json.loads(keys("list").stdout)["keys"][0]["revoked"] != ""
    quota = json.loads(keys("quota", "--tenant", "acme", "--max-streams", "4").stdout)
    assert quota["max_streams"] == 4
    bad = subprocess.run(
        [sys.executable, "-m", "talkinghead.cli", "keys", "--keys", str(ring), "issue", "--tenant", "Acme!"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "invalid tenant" in bad.stderr and "Traceback" not in bad.stderr


def test_bind_cert_says_what_it_bound(tmp_path: Path) -> None:
    """As revoke, unbind-cert, deny-cert and undeny-cert say what they did (bind-cert said nothing)."""
    ring = tmp_path / "keys.json"
    keys = [sys.executable, "-m", "talkinghead.cli", "keys", "--keys", str(ring)]
    for role, args in (("user", ()), ("admin", ("--role", "admin"))):
        bound = subprocess.run(
            [*keys, "bind-cert", "--common-name", f"studio-{role}.acme.example", "--tenant", "acme", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bound.returncode == 0, bound.stderr
        assert bound.stderr == f"bound studio-{role}.acme.example to tenant acme ({role})\n"
        assert bound.stdout == ""
    assert json.loads(ring.read_text())["certs"] == {
        "studio-user.acme.example": {"tenant": "acme", "role": "user"},
        "studio-admin.acme.example": {"tenant": "acme", "role": "admin"},
    }


def test_a_key_ring_file_keys_cannot_use_is_named_in_one_line(tmp_path: Path) -> None:
    """A key ring under a path that is not a folder: a traceback before."""
    (tmp_path / "a-file").write_text("")
    ring = tmp_path / "a-file" / "keys.json"
    for action in (["issue", "--tenant", "acme"], ["list"]):
        done = subprocess.run(
            [sys.executable, "-m", "talkinghead.cli", "keys", "--keys", str(ring), *action],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1 and done.stdout == "", done.stderr
        assert done.stderr.startswith(f"talkinghead keys: key ring {ring}: "), done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


# -- the keys and audit commands when Redis fails -----------------------------------------------
KEYS_ACTIONS: dict[str, tuple[str, ...]] = {
    "issue": ("--tenant", "acme"),
    "revoke": ("3f9a1c0b2d4e",),
    "list": (),
    "bind-cert": ("--common-name", "studio-01", "--tenant", "acme"),
    "unbind-cert": ("--common-name", "studio-01"),
    "deny-cert": ("studio-01",),
    "undeny-cert": ("studio-01",),
    "quota": ("--tenant", "acme", "--max-streams", "4"),
}


def _redis_commands(url: str, out: Path, actions: Iterable[str] = KEYS_ACTIONS) -> list[list[str]]:
    """Every keys action on the Redis key ring at `url`, and audit of its stream (to standard
    output and to `out`)."""
    keys = [
        ["keys", "--keys", "redis", "--redis-url", url, action, *KEYS_ACTIONS[action]] for action in actions
    ]
    return [*keys, ["audit", "--redis-url", url], ["audit", "--redis-url", url, "--out", str(out)]]


def _run_all(commands: list[list[str]]) -> list[tuple[str, int, str]]:
    """(command, exit status, standard error) of each `talkinghead` command, run side by side."""
    started = [
        (
            command,
            subprocess.Popen(
                [sys.executable, "-m", "talkinghead.cli", *command],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for command in commands
    ]
    done = []
    for command, process in started:
        _, stderr = process.communicate(timeout=60)
        done.append((" ".join(command), process.returncode, stderr))
    return done


def _says_in_one_line(done: list[tuple[str, int, str]], said: Callable[[str], str]) -> None:
    """Each command failed with status 1 and one line: `said(its program name)` and then why."""
    for command, status, stderr in done:
        prog = "talkinghead " + command.split()[0]
        why = (command, status, stderr)
        assert status == 1, why
        assert "Traceback" not in stderr and stderr.count("\n") == 1 and stderr.endswith("\n"), why
        assert stderr.startswith(said(prog)), why


def test_keys_and_audit_say_in_one_line_that_redis_cannot_be_reached(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there
    out = tmp_path / "export" / "audit.jsonl"
    done = _run_all(_redis_commands(url, out))
    _says_in_one_line(done, lambda prog: f"{prog}: cannot reach Redis at {url}: Connection refused")
    assert done[-1][2].endswith(f"; nothing written to {out}\n"), done[-1]
    assert not out.exists() and not any(out.parent.iterdir())


def test_keys_and_audit_say_in_one_line_that_redis_timed_out(tmp_path: Path) -> None:
    """A Redis that takes the connection and never answers (a listening socket nobody accepts on)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        done = _run_all(_redis_commands(url, tmp_path / "audit.jsonl", actions=["list"]))
    _says_in_one_line(done, lambda prog: f"{prog}: cannot reach Redis at {url}: timed out")


def test_keys_and_audit_say_in_one_line_what_redis_refused(tmp_path: Path) -> None:
    """A Redis that answers with an error: a wrong password (the URL shown without it), a key of
    another type where the ring and the audit stream are."""
    server = RedisServer(workdir=tmp_path / "redis")
    try:
        with redis.Redis(port=server.port) as client:
            client.set("talkinghead:audit", "not a stream")
            client.rpush("talkinghead:keyring", "not a ring")
            client.config_set("requirepass", "sesame")
        where = f"127.0.0.1:{server.port}/0"
        out = tmp_path / "audit.jsonl"
        done = _run_all(_redis_commands(f"redis://:sesame@{where}", out))
        _says_in_one_line(done, lambda prog: f"{prog}: Redis at redis://***@{where}: WRONGTYPE ")
        wrong = _run_all(_redis_commands(f"redis://:hunter2@{where}", out, actions=["list"]))
        _says_in_one_line(
            wrong, lambda prog: f"{prog}: Redis at redis://***@{where}: invalid username-password"
        )
        assert not any(word in stderr for _, _, stderr in done + wrong for word in ("sesame", "hunter2"))
        assert list(tmp_path.iterdir()) == [tmp_path / "redis"]
    finally:
        server.stop()


def test_listening_beyond_loopback_needs_authentication(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without authentication"):
        Settings(host="0.0.0.0")
    Settings(host="0.0.0.0", allow_unauthenticated=True)
    Settings(host="0.0.0.0", api_keys=str(tmp_path / "keys.json"), tls_terminated_upstream=True)
    Settings(host="127.0.0.1")
    serve = subprocess.run(
        [sys.executable, "-m", "talkinghead.cli", "serve", "--host", "0.0.0.0", "--grpc-port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert serve.returncode != 0 and "refusing to listen on 0.0.0.0" in serve.stderr
    # the message names settings as API_KEYS: it says how to set one
    assert "(a NAME here is TALKINGHEAD_NAME or --name" in serve.stderr, serve.stderr


def test_the_unauthenticated_warning_says_where_the_server_listens(caplog: pytest.LogCaptureFixture) -> None:
    """Only loopback is "fine" without authentication: on 0.0.0.0 (allowed on purpose) the warning
    said "fine on 0.0.0.0"."""
    from service.server import make_auth

    for host, said in (
        ("127.0.0.1", "(fine on 127.0.0.1;"),
        ("0.0.0.0", "on 0.0.0.0, reachable beyond this machine"),
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="talkinghead"):
            make_auth(Settings(host=host, allow_unauthenticated=True), None, None)
        assert said in caplog.text, caplog.text
        assert host == "127.0.0.1" or "fine on" not in caplog.text, caplog.text


# -- mTLS ---------------------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool, usage=None, san=None):  # type: ignore[no-untyped-def]
    now = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=3))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert, key) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    pem = serialization.Encoding.PEM
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(pem))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / f"{name}.crt", folder / f"{name}.key"


def _authority(folder: Path, name: str):  # type: ignore[no-untyped-def]
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(name, key, _name(name), key, ca=True)
    _write(folder, name, cert, key)
    return cert, key


def _leaf(folder: Path, name: str, ca, *, server: bool = False) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if server else None
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = _cert(name, key, ca_cert.subject, ca_key, ca=False, usage=usage, san=san)
    return _write(folder, name, cert, key)


def test_mtls_accepts_only_certificates_of_the_configured_ca(
    model_repository: Path, tmp_path: Path, driver
) -> None:
    trusted, stranger_ca = _authority(tmp_path, "clients-ca"), _authority(tmp_path, "other-ca")
    server_ca = _authority(tmp_path, "server-ca")
    server_cert, server_key = _leaf(tmp_path, "server", server_ca, server=True)
    good = _leaf(tmp_path, "acme", trusted)
    bound = _leaf(tmp_path, "studio-01", trusted)
    rogue = _leaf(tmp_path, "globex", stranger_ca)
    ring = FileRing(path=tmp_path / "keys.json")
    ring.update(lambda r: bind_cert(r, "studio-01", "acme"))
    settings = test_settings(
        model_repository,
        tmp_path / "avatars",
        tls_cert=server_cert,
        tls_key=server_key,
        tls_client_ca=tmp_path / "clients-ca.crt",
        api_keys=str(ring.path),
    )
    server = ServerThread(settings=settings)
    try:
        server.wait_ready()
        target = f"localhost:{server.server.grpc_port}"
        ca = tmp_path / "server-ca.crt"
        with Client(target=target, tls_ca=ca, tls_cert=good[0], tls_key=good[1], timeout=30) as acme:
            acme.create_avatar("cert-made", [PORTRAIT], consent=CONSENT)
            assert len(_first_frames(acme, "cert-made", driver)) == 2
        with Client(target=target, tls_ca=ca, tls_cert=bound[0], tls_key=bound[1], timeout=30) as studio:
            assert studio.get_avatar("cert-made").avatar_id == "cert-made"  # bound to tenant acme
        for cert in (rogue, None):
            files = {"tls_cert": cert[0], "tls_key": cert[1]} if cert else {}
            with Client(target=target, tls_ca=ca, timeout=10, **files) as refused:
                assert (
                    _code(lambda: list(refused.list_avatars())) == grpc.StatusCode.UNAVAILABLE
                )  # the handshake fails
        audit = server.settings.audit_log.read_text()
        assert "credential=cert:acme" in audit
    finally:
        server.stop()


def test_stream_frames_beyond_the_tenants_rate_are_dropped_for_live_streams(keyed, driver) -> None:
    server, tokens, ring = keyed
    ring.update(lambda r: set_quotas(r, "acme", max_fps=5))
    server.ring_read()
    refusals = 'talkinghead_quota_refusals_total{quota="fps",tenant="acme"}'
    counted = 'talkinghead_tenant_frames_total{tenant="acme"}'
    dropped = 'talkinghead_frames_dropped_total{reason="quota"}'
    before: dict[str, float] = {}
    for name in (refusals, counted, dropped):
        try:
            before[name] = server.metric(name)
        except KeyError:
            before[name] = 0.0
    try:
        with Client(target=server.address, api_key=tokens["acme"]) as acme:
            if "mona" not in {
                a.avatar_id for a in acme.list_avatars()
            }:  # (run alone: no earlier test made it)
                acme.create_avatar("mona", [PORTRAIT], consent=CONSENT)
            live = acme.animate(
                "mona", landmark_requests(_first(driver, 30)), motion="relative", overflow="drop-oldest"
            )
            frames = list(live)
            # 30 frames sent at once, 5 a second allowed (a burst of 2.5): most are dropped.
            assert server.metric(refusals) - before[refusals] >= 20
            assert len(frames) <= 10
            assert server.metric(counted) - before[counted] == 30  # every frame counted, dropped or not
            assert server.metric(dropped) - before[dropped] == server.metric(refusals) - before[refusals]
            live_refused = server.metric(refusals)
            started = time.monotonic()
            blocking = list(acme.animate("mona", landmark_requests(_first(driver, 8)), motion="relative"))
            assert len(blocking) == 8  # a blocking stream waits for its turn instead
            # each of the 8 counted once, and held back at most once, however long it waited
            assert server.metric(counted) - before[counted] == 38
            assert 1 <= server.metric(refusals) - live_refused <= 8
            assert time.monotonic() - started >= 0.8  # 8 frames at 5 a second, after a burst
    finally:
        ring.update(lambda r: set_quotas(r, "acme", max_fps=0))
        server.ring_read()


def test_the_cli_sends_the_api_key_from_the_environment_or_a_file(keyed, tmp_path: Path) -> None:
    server, tokens, _ = keyed
    with Client(target=server.address, api_key=tokens["acme"]) as acme:
        acme.create_avatar("cli-seen", [PORTRAIT], consent=CONSENT, replace=True)
    command = [sys.executable, "-m", "talkinghead.cli", "avatar", "list", "--server", server.address]
    listed = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"TALKINGHEAD_API_KEY": tokens["acme"]},
    )
    assert listed.returncode == 0, listed.stderr
    assert "cli-seen" in listed.stdout
    (tmp_path / "key").write_text(tokens["globex"] + "\n")
    other = subprocess.run(
        [*command, "--api-key-file", str(tmp_path / "key")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.returncode == 0 and "cli-seen" not in other.stdout
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, env={})
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr
