"""Who is calling: API keys, client certificates, tenants, roles and quotas.

Every call of the talkinghead services is made by a `Principal`: a tenant (whose avatars, streams,
personalisations and quotas it uses) and a role: `user`, or `admin` for operators, who may act for
any tenant by sending the metadata `x-talkinghead-tenant: <tenant>`. Credentials:

- API keys, sent as `authorization: Bearer thk_<key id>_<secret>`. The key ring keeps only the
  SHA-256 of the secret (256 random bits: a slow hash would add nothing), the tenant, the role and
  when the key was revoked. `talkinghead keys` issues, revokes and lists them. The ring is a JSON
  file (TALKINGHEAD_API_KEYS=<path>; a mounted Kubernetes Secret works: it is reread when it
  changes) or a Redis key (TALKINGHEAD_API_KEYS=redis, shared by every replica). The server
  rereads it every REFRESH_S seconds, so a revoked key stops working within that time.
- mTLS client certificates (TALKINGHEAD_TLS_CLIENT_CA): the TLS handshake requires a certificate
  that CA signed; the subject's common name is the tenant (role user) unless the ring binds that
  name to another tenant or role (`talkinghead keys bind-cert`, `unbind-cert`). With
  TALKINGHEAD_TLS_BOUND_CERTS_ONLY only bound names are accepted. `keys deny-cert` revokes a common
  name (bound or not) until `keys undeny-cert`. A bearer key, when also sent, wins.
- Neither configured: every caller is the implicit tenant `default` with the admin role, and the
  server refuses to listen on anything but loopback unless TALKINGHEAD_ALLOW_UNAUTHENTICATED is set.
  Beyond loopback API keys also need TLS, here or in front (service/settings.py).

`AuthInterceptor` refuses a call without valid credentials before its request message is read
(UNAUTHENTICATED), so a stranger's 60 MB upload costs nothing. A call that streams its replies
(Animate, WatchOperation: long-lived) is watched by a `CallGuard` while it runs: when a ring
reload revokes its key, denies or unbinds its certificate, it ends UNAUTHENTICATED ("the API key
was revoked") right after that reload, at no cost per frame. grpc.health.v1 stays open for
probes, and server reflection too while it is on (TALKINGHEAD_REFLECTION). Every refusal is a
`Refused` with a reason of REFUSAL_REASONS: counted by reason (talkinghead_auth_failures_total) and
logged at WARNING with the peer's address by `service.refusals.RefusalLog`, which bounds the
lines a flood makes.

The ring also holds per-tenant quotas (`talkinghead keys quota`; finite numbers >= 0, else the
ring is not loaded); tenants without an entry get DEFAULT_QUOTAS. service/quota.py enforces them
as the current ring says (`Authenticator.quotas`), for streams already open too.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import fcntl
import hashlib
import hmac
import inspect
import json
import logging
import math
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from facekit.ids import DEFAULT_TENANT, validate_tenant
from service.audit import RefusalAudit
from service.errors import ServiceError
from service.refusals import RefusalLog

log = logging.getLogger("talkinghead.service.auth")
USER, ADMIN = "user", "admin"
ROLES = (USER, ADMIN)
TOKEN_PREFIX = "thk_"
TENANT_HEADER = "x-talkinghead-tenant"
REFRESH_S = 1.0
REDIS_KEY = "talkinghead:keyring"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Quotas:
    """What one tenant may use (0 = no limit beyond the server's own)."""

    max_avatars: int = 1000
    max_streams: int = 16  # concurrent Animate streams per replica
    max_fps: float = 400.0  # frames per second over all the tenant's streams, per replica
    creates_per_minute: int = 30  # CreateAvatar calls per replica
    max_personalisations: int = 4  # queued + running personalisations (all replicas' queue)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Quotas:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(
                f"unknown quota(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}"
            )
        return cls(**{name: _quota(name, value) for name, value in raw.items()})


def _quota(name: str, value: Any) -> Any:
    """One quota value, as its field's type: a finite number >= 0. NaN or infinity would pass any
    `< 0` check and then grant everything (a bucket of rate NaN never runs dry)."""
    kind = type(getattr(DEFAULT_QUOTAS, name))
    try:
        number = float(value)
        if isinstance(value, bool) or not math.isfinite(number) or number < 0:
            raise ValueError
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"quota {name} must be a finite number >= 0 (0 = no limit), got {value!r}") from None


DEFAULT_QUOTAS = Quotas()
UNLIMITED = Quotas(max_avatars=0, max_streams=0, max_fps=0.0, creates_per_minute=0, max_personalisations=0)


@dataclass(frozen=True)
class Principal:
    tenant: str
    role: str
    credential: str  # what authenticated it: "key:<id>", "cert:<common name>" or "none"
    quotas: Quotas = DEFAULT_QUOTAS

    @property
    def admin(self) -> bool:
        return self.role == ADMIN

    def describe(self) -> str:
        """As the audit log names the caller."""
        return f"tenant={self.tenant} role={self.role} credential={self.credential}"


ANONYMOUS = Principal(tenant=DEFAULT_TENANT, role=ADMIN, credential="none", quotas=UNLIMITED)


# Why a call was refused for its credentials: talkinghead_auth_failures_total's `reason` (a fixed
# set; never the key, the tenant or the peer) and the refusal log's.
MISSING = "missing"  # no API key, and no client certificate where one would do
MALFORMED = "malformed"  # an authorization header that is not `Bearer thk_<key id>_<secret>`
UNKNOWN_KEY = "unknown_key"  # no such key id in the ring
WRONG_SECRET = "wrong_secret"  # a key id of the ring with another secret (a forged key)
REVOKED_KEY = "revoked_key"  # a revoked key (also: an open call whose key was revoked)
BAD_CERT = "bad_cert"  # a client certificate whose common name names no tenant
UNBOUND_CERT = "unbound_cert"  # one the ring does not bind, where only bound ones are accepted
REVOKED_CERT = "revoked_cert"  # a denied common name (`keys deny-cert`)
FORBIDDEN = "forbidden"  # PERMISSION_DENIED: a user key acting for another tenant
REFUSAL_REASONS = (
    MISSING,
    MALFORMED,
    UNKNOWN_KEY,
    WRONG_SECRET,
    REVOKED_KEY,
    BAD_CERT,
    UNBOUND_CERT,
    REVOKED_CERT,
    FORBIDDEN,
)
INVALID_KEY = "the API key is not valid (unknown, revoked or malformed)"


class Refused(ServiceError):
    """A call refused for its credentials: UNAUTHENTICATED (or PERMISSION_DENIED), and why (one of
    REFUSAL_REASONS) for the metric and the log; `detail` is what the log adds (never a secret)."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        detail: str = "",
        code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED,
        credential: str = "none",
        tenant: str = "",
    ) -> None:
        super().__init__(code, message)
        self.reason = reason
        self.detail = detail
        self.credential = credential  # as the audit log names it (RefusalAudit): never a secret
        self.tenant = tenant  # an authenticated caller's (FORBIDDEN); "": the caller is not known


def unauthenticated(message: str, reason: str = MISSING) -> Refused:
    return Refused(reason, message)


# -- the key ring document --------------------------------------------------------------------
def empty_ring() -> dict[str, Any]:
    return {"version": 1, "keys": {}, "certs": {}, "denied_certs": {}, "tenants": {}}


def token_id(token: str) -> str:
    """What the audit log names a token that is no ring key by: 12 hex digits of its SHA-256 (the
    same token, the same id; nothing of it can be read back)."""
    return "token:" + hashlib.sha256(token.encode(errors="replace")).hexdigest()[:12]


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return role


def issue(ring: dict[str, Any], tenant: str, role: str = USER, note: str = "") -> tuple[str, str]:
    """Add a key to `ring`; returns (key id, the token to give the client: shown once, never stored)."""
    validate_tenant(tenant)
    _check_role(role)
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    ring["keys"][key_id] = {
        "tenant": tenant,
        "role": role,
        "sha256": _hash(secret),
        "created": time.time(),
        "revoked": 0.0,
        "note": note[:200],
    }
    return key_id, f"{TOKEN_PREFIX}{key_id}_{secret}"


def revoke(ring: dict[str, Any], key_id: str) -> bool:
    entry = ring["keys"].get(key_id)
    if entry is None or entry["revoked"]:
        return False
    entry["revoked"] = time.time()
    return True


def bind_cert(ring: dict[str, Any], common_name: str, tenant: str, role: str = USER) -> None:
    validate_tenant(tenant)
    ring["certs"][common_name] = {"tenant": tenant, "role": _check_role(role)}


def unbind_cert(ring: dict[str, Any], common_name: str) -> bool:
    """Remove a binding: the name is its own tenant again (or, bound certificates only, refused)."""
    return ring["certs"].pop(common_name, None) is not None


def deny_cert(ring: dict[str, Any], common_name: str) -> bool:
    """Refuse certificates of this common name, bound or not (rings written before this had no
    `denied_certs`; servers older than it ignore the entry)."""
    denied = ring.setdefault("denied_certs", {})
    if common_name in denied:
        return False
    denied[common_name] = {"denied": time.time()}
    return True


def undeny_cert(ring: dict[str, Any], common_name: str) -> bool:
    return ring.setdefault("denied_certs", {}).pop(common_name, None) is not None


def set_quotas(ring: dict[str, Any], tenant: str, **values: Any) -> Quotas:
    validate_tenant(tenant)
    merged = {**ring["tenants"].get(tenant, {}), **{k: v for k, v in values.items() if v is not None}}
    quotas = Quotas.from_dict(merged)
    ring["tenants"][tenant] = merged
    return quotas


@dataclass(frozen=True)
class Ring:
    """A parsed snapshot of the key ring, for lookups."""

    keys: Mapping[str, Mapping[str, Any]]
    certs: Mapping[str, Mapping[str, str]]
    tenants: Mapping[str, Quotas]
    denied_certs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Ring:
        tenants = {name: Quotas.from_dict(q) for name, q in raw.get("tenants", {}).items()}
        return cls(
            keys=dict(raw.get("keys", {})),
            certs=dict(raw.get("certs", {})),
            tenants=tenants,
            denied_certs=dict(raw.get("denied_certs", {})),
        )

    def quotas(self, tenant: str) -> Quotas:
        return self.tenants.get(tenant, DEFAULT_QUOTAS)

    def check_token(self, token: str) -> Principal:
        """The key's principal; Refused (saying why) when it is not a valid key of this ring."""
        if not token.startswith(TOKEN_PREFIX):
            raise Refused(MALFORMED, INVALID_KEY, credential=token_id(token))
        key_id, _, secret = token[len(TOKEN_PREFIX) :].partition("_")
        entry = self.keys.get(key_id)
        if not key_id or not secret:
            raise Refused(MALFORMED, INVALID_KEY, credential=token_id(token))
        if entry is None:
            raise Refused(UNKNOWN_KEY, INVALID_KEY, credential=token_id(token))
        key = f"key:{key_id}"
        if not hmac.compare_digest(entry["sha256"], _hash(secret)):
            raise Refused(WRONG_SECRET, INVALID_KEY, detail=f"key {key_id}", credential=key)
        if entry.get("revoked"):  # only once the secret is right: a stranger learns nothing
            raise Refused(REVOKED_KEY, "the API key was revoked", detail=f"key {key_id}", credential=key)
        tenant = entry["tenant"]
        return Principal(
            tenant=tenant, role=entry["role"], credential=f"key:{key_id}", quotas=self.quotas(tenant)
        )

    def check_cert(self, common_name: str, bound_only: bool = False) -> Principal:
        """The principal of a client certificate the CA signed, by its common name; Refused when
        the name is denied, unbound where only bound ones are accepted, or names no tenant."""
        detail, cert = f"common name {common_name!r}", f"cert:{common_name}"
        if common_name in self.denied_certs:
            raise Refused(REVOKED_CERT, "the client certificate was revoked", detail=detail, credential=cert)
        bound = self.certs.get(common_name)
        if bound is None and bound_only:
            raise Refused(
                UNBOUND_CERT,
                "the client certificate's common name is bound to no tenant on this server",
                detail=detail,
                credential=cert,
            )
        tenant, role = (bound["tenant"], bound["role"]) if bound else (common_name, USER)
        try:
            validate_tenant(tenant)
        except ValueError:
            raise Refused(
                BAD_CERT,
                "the client certificate's common name is not a valid tenant name",
                detail=detail,
                credential=cert,
            ) from None
        return Principal(
            tenant=tenant, role=role, credential=f"cert:{common_name}", quotas=self.quotas(tenant)
        )


EMPTY = Ring.parse(empty_ring())


# -- where the ring lives ---------------------------------------------------------------------
class RingStore(Protocol):
    def load(self) -> dict[str, Any]: ...

    def update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        """Apply `change` to the document under a lock and write it back; returns its result."""
        ...

    def version(self) -> object:
        """Changes whenever the document may have changed (cheap)."""
        ...


@dataclass
class FileRing:
    path: Path

    def version(self) -> object:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> dict[str, Any]:
        try:
            raw: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return empty_ring()
        return raw

    def update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            ring = self.load()
            result = change(ring)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys-")
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(ring, out, indent=1, sort_keys=True)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, 0o600)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            return result


@dataclass
class RedisRing:
    client: Any  # redis.Redis

    def version(self) -> object:
        return self.client.get(REDIS_KEY + ":serial")

    def load(self) -> dict[str, Any]:
        raw = self.client.get(REDIS_KEY)
        return json.loads(raw) if raw else empty_ring()

    def update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        import redis

        while True:
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(REDIS_KEY)
                    raw = pipe.get(REDIS_KEY)
                    ring = json.loads(raw) if raw else empty_ring()
                    result = change(ring)
                    pipe.multi()
                    pipe.set(REDIS_KEY, json.dumps(ring, sort_keys=True))
                    pipe.incr(REDIS_KEY + ":serial")
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue


def ring_store(location: str, redis_url: str = "") -> RingStore:
    """TALKINGHEAD_API_KEYS: `redis` (with a Redis URL) or a file path."""
    if location == "redis":
        if not redis_url:
            raise ValueError("TALKINGHEAD_API_KEYS=redis needs TALKINGHEAD_REDIS_URL")
        from jobs.redis_queue import connect

        return RedisRing(client=connect(redis_url))
    return FileRing(path=Path(location))


# -- authenticating calls ---------------------------------------------------------------------
def bearer(metadata: Iterable[tuple[str, Any]]) -> str | None:
    for key, value in metadata:
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _header(metadata: Iterable[tuple[str, Any]], name: str) -> str | None:
    for key, value in metadata:
        if key == name:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None


class Authenticator:
    """Turns a call's metadata (and verified client certificate) into a Principal."""

    def __init__(
        self,
        *,
        store: RingStore | None,
        client_certs: bool,
        bound_certs_only: bool = False,
        on_refusal: Callable[[str], None] | None = None,
        audit: RefusalAudit | None = None,
    ) -> None:
        self.store = store
        self.audit = audit  # audit events of refusals, bounded (service/audit.py RefusalAudit)
        self.client_certs = client_certs
        self.bound_certs_only = bound_certs_only  # only certificates the ring binds
        self.on_refusal = on_refusal  # counts a refusal by reason (the metric)
        self.refusals = RefusalLog()
        self._guards: set[CallGuard] = set()  # long-lived calls running (CallGuard)
        self.ring = EMPTY
        self._version: object = object()
        self._broken: object = object()  # the version that would not load
        self._task: asyncio.Task[None] | None = None
        if store is not None:
            self.refresh()

    @property
    def enabled(self) -> bool:
        return self.store is not None or self.client_certs

    def refresh(self) -> None:
        """Reload the ring if it changed; a broken ring keeps the last good one (logged)."""
        if self.store is None:
            return
        try:
            version = self.store.version()
            if version in (self._version, self._broken):
                return
            try:
                ring = Ring.parse(self.store.load())
            except ValueError:  # said once for this version; tried again when it changes
                self._broken = version
                raise
            self.ring, self._version = ring, version
            log.info(
                "key ring loaded: %d key(s), %d certificate binding(s), %d denied, %d tenant quota(s)",
                len(ring.keys),
                len(ring.certs),
                len(ring.denied_certs),
                len(ring.tenants),
            )
        except Exception as error:
            log.error("could not load the key ring (keeping the last one): %s", error)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(REFRESH_S)
            if self.store is not None:
                ring = self.ring
                await loop.run_in_executor(None, self.refresh)
                if self.ring is not ring:
                    self.check_guarded()
            self.refusals.flush()
            if self.audit is not None:
                self.audit.flush()

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self.run(), name="key-ring")

    def close(self) -> list[asyncio.Task[None]]:
        """Stop rereading the ring; the task cancelled (to await), if any."""
        if self._task is None:
            return []
        self._task.cancel()
        return [self._task]

    def revoked(self, principal: Principal) -> Refused | None:
        """Why a call's credential no longer holds in the current ring, None while it does: its key
        revoked (or gone), its certificate denied, unbound where only bound ones count, or bound
        now to another tenant or role. A few dict lookups."""
        kind, _, name = principal.credential.partition(":")
        if kind == "key":
            entry = self.ring.keys.get(name)
            if entry is None or entry.get("revoked"):
                return Refused(
                    REVOKED_KEY,
                    "the API key was revoked",
                    detail=f"key {name}",
                    credential=principal.credential,
                )
        elif kind == "cert":
            try:
                now = self.ring.check_cert(name, self.bound_certs_only)
            except Refused as error:
                return error
            if now.role != principal.role or (not principal.admin and now.tenant != principal.tenant):
                return Refused(
                    REVOKED_CERT,
                    "the client certificate's binding was removed or changed",
                    detail=f"common name {name!r}",
                    credential=principal.credential,
                )
        return None

    def guard(self, context: grpc.aio.ServicerContext, method: str, *, cancel: bool) -> CallGuard | None:
        """Watch the running call's credential until `unguard` (None: nothing to watch, or the call
        will be refused by its handler)."""
        try:
            principal = self.authenticate(context.invocation_metadata() or (), context.auth_context())
        except ServiceError:
            return None
        if principal.credential == ANONYMOUS.credential:
            return None
        guard = CallGuard(principal=principal, peer=context.peer(), method=method, cancel=cancel)
        self._guards.add(guard)
        return guard

    def unguard(self, guard: CallGuard) -> None:
        self._guards.discard(guard)

    def check_guarded(self) -> None:
        """End the watched calls whose credential the ring (just reloaded) no longer accepts."""
        for guard in list(self._guards):
            error = self.revoked(guard.principal)
            if error is not None:
                self._guards.discard(guard)
                self.refused(error, guard.peer, guard.method)
                guard.fire(error)

    def refused(self, error: Refused, peer: str, method: str = "") -> None:
        """Count a refusal (talkinghead_auth_failures_total by reason), log it and audit it (both
        bounded)."""
        if self.on_refusal is not None:
            self.on_refusal(error.reason)
        self.refusals.record(error, peer, method)
        if self.audit is not None:
            self.audit.record(
                peer=peer,
                credential=error.credential,
                reason=error.reason,
                method=method,
                tenant=error.tenant,
            )

    def check_token(self, metadata: Iterable[tuple[str, Any]]) -> Principal | None:
        """The key's principal; None when no key was sent; Refused when one was sent but is bad."""
        token = bearer(metadata)
        if token is None:
            return None
        return self.ring.check_token(token)  # without a ring (no API keys) every key is unknown

    def authenticate(self, metadata: Iterable[tuple[str, Any]], auth_context: Mapping[str, Any]) -> Principal:
        metadata = list(metadata)
        if not self.enabled:
            principal = ANONYMOUS
        else:
            principal = self.check_token(metadata) or self._from_cert(auth_context)
        acting = _header(metadata, TENANT_HEADER)
        if acting is None or acting == principal.tenant:
            return principal
        if not principal.admin:
            raise Refused(
                FORBIDDEN,
                f"only the admin role may send {TENANT_HEADER}",
                detail=f"{principal.credential} of tenant {principal.tenant}",
                code=grpc.StatusCode.PERMISSION_DENIED,
                credential=principal.credential,
                tenant=principal.tenant,
            )
        try:
            validate_tenant(acting)
        except ValueError as error:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{TENANT_HEADER}: {error}") from None
        return Principal(
            tenant=acting, role=principal.role, credential=principal.credential, quotas=self.quotas(acting)
        )

    def quotas(self, tenant: str) -> Quotas:
        """The tenant's quotas as the ring says now (a dict lookup; unlimited without authentication)."""
        return self.ring.quotas(tenant) if self.enabled else UNLIMITED

    def _from_cert(self, auth_context: Mapping[str, Any]) -> Principal:
        names = auth_context.get("x509_common_name") or []
        if self.client_certs and names:
            name = names[0].decode(errors="replace") if isinstance(names[0], bytes) else str(names[0])
            return self.ring.check_cert(name, self.bound_certs_only)
        raise unauthenticated(
            "this call needs credentials: an API key (authorization: Bearer ...) or a client certificate"
        )


_GUARD: contextvars.ContextVar[CallGuard | None] = contextvars.ContextVar("call_guard", default=None)
_END = object()  # a reply stream's end (_next)


class CallGuard:
    """One long-lived call whose credential is watched (Authenticator.guard). When the ring revokes
    it, `fire` resolves `revoked` and, with `cancel`, cancels the call's task once: the handler
    ends where it waits, and `revoked_call()` (or the interceptor) turns that cancel into the
    UNAUTHENTICATED status."""

    def __init__(self, *, principal: Principal, peer: str, method: str, cancel: bool) -> None:
        self.principal, self.peer, self.method = principal, peer, method
        self.task = asyncio.current_task() if cancel else None
        self.revoked: asyncio.Future[Refused] = asyncio.get_running_loop().create_future()
        self._taken = False

    def fire(self, error: Refused) -> None:
        if self.revoked.done():
            return
        self.revoked.set_result(error)
        if self.task is not None:
            self.task.cancel()

    def taken(self) -> Refused | None:
        """In the call's `except CancelledError`: the revocation, when it alone cancelled the task
        (the cancel is taken back, once); None when the call itself was cancelled."""
        if self._taken or not self.revoked.done() or self.task is None or self.task.cancelling() != 1:
            return None
        self._taken = True
        self.task.uncancel()
        return self.revoked.result()


def revoked_call() -> Refused | None:
    """In a guarded call's `except asyncio.CancelledError`: why its credential was revoked (the
    cancel taken back: end the call with this error's status), or None (re-raise)."""
    guard = _GUARD.get()
    return guard.taken() if guard is not None else None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuse unauthenticated calls before their request is read.

    The refusal is a request-streaming handler that never reads, whatever the method's shape:
    gRPC only reads a message when the handler asks for it."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if not self.auth.enabled or method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        try:
            if self.auth.check_token(metadata) is None and not self.auth.client_certs:
                raise unauthenticated("this call needs credentials: an API key (authorization: Bearer ...)")
        except Refused as error:  # (kept by the call: without its traceback's frames)
            return _refusal(error.with_traceback(None), self.auth, method)
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler  # one reply: the credential was good when it was asked
        return _guarded(handler, self.auth, method)


def _guarded(handler: grpc.RpcMethodHandler, auth: Authenticator, method: str) -> grpc.RpcMethodHandler:
    """The handler of a call that streams its replies, ended UNAUTHENTICATED when its credential is
    revoked while it runs: a coroutine (it writes its replies) by cancelling its task, an async
    generator by ending the wait for its next reply."""
    kind = "stream_stream" if handler.request_streaming else "unary_stream"
    behavior = getattr(handler, kind)

    async def writes(request: Any, context: grpc.aio.ServicerContext) -> Any:
        guard = auth.guard(context, method, cancel=True)
        if guard is None:
            return await behavior(request, context)
        token = _GUARD.set(guard)
        try:
            return await behavior(request, context)
        except asyncio.CancelledError:
            error = guard.taken()
            if error is None:
                raise
        finally:
            _GUARD.reset(token)
            auth.unguard(guard)
        await context.abort(error.code, error.message)

    async def yields(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        guard = auth.guard(context, method, cancel=False)
        replies = behavior(request, context)
        try:
            while True:
                if guard is None:
                    reply = await _next(replies)
                else:  # the next reply, or the revocation, whichever comes first
                    step = asyncio.ensure_future(_next(replies))
                    try:
                        await asyncio.wait((step, guard.revoked), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        if not step.done():  # revoked, or the call cancelled: stop the generator
                            step.cancel()
                            await asyncio.gather(step, return_exceptions=True)
                    if step.cancelled():
                        break
                    reply = step.result()
                if reply is _END:
                    return
                yield reply
        finally:
            if guard is not None:
                auth.unguard(guard)
            await replies.aclose()
        assert guard is not None
        error = guard.revoked.result()
        await context.abort(error.code, error.message)

    wrapped = yields if inspect.isasyncgenfunction(behavior) else writes
    return handler._replace(**{kind: wrapped})  # type: ignore[attr-defined]  # a namedtuple


async def _next(replies: AsyncIterator[Any]) -> Any:
    try:
        return await anext(replies)
    except StopAsyncIteration:
        return _END


def _refusal(error: Refused, auth: Authenticator, method: str) -> grpc.RpcMethodHandler:
    """A handler that counts and logs the refusal (the peer is known only here) and ends the call."""
    code, message = error.code, error.message

    async def refuse(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        auth.refused(error, context.peer(), method)
        await context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(refuse)
