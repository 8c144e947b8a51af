"""Per-tenant quotas (service/auth.py's Quotas): concurrent streams, frames per second, CreateAvatar
per minute, how many avatars a tenant keeps and how many personalisations it has queued or running.

Streams, frame rates and create rates are counted per replica (in memory); the avatar and
personalisation counts come from the store and the job queue, so they hold across replicas. A
refusal is RESOURCE_EXHAUSTED with a message that names the quota and a `retry-after` hint
(seconds) in the trailing metadata.

The quotas applied are the tenant's as the key ring says now (`quotas_of`, which the App sets to
Authenticator.quotas), not those of the call that opened a stream: a stream opened before an
operator lowered max_fps is held to the new rate. A rate change keeps the tokens already spent
(at most the new burst is saved up), so changing a quota never hands out a fresh burst.

The per-tenant metrics (talkinghead_tenant_streams, talkinghead_tenant_frames_total,
talkinghead_quota_refusals_total) are labelled with the tenant only when the key ring names it
(an unrevoked key, a certificate binding or quotas) or it is `default`; any other tenant - one an
admin acts for by x-talkinghead-tenant, every header-chosen tenant with authentication off, an
unbound certificate's common name - counts as `other`, so callers cannot make series without
bound. A tenant the ring drops loses its series (`prune`, each second: App), and one it names gets
its series there, every quota's refusals at 0: a rate or increase() over a series that first
appears at 1 misses that first frame or refusal.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from facekit.ids import DEFAULT_TENANT
from service.auth import Principal, Quotas, Ring
from service.errors import ServiceError, exhausted
from service.metrics import Metrics

# talkinghead_quota_refusals_total's `quota`: the quotas TenantLimits refuses by
QUOTA_NAMES = ("streams", "fps", "creates_per_minute", "creates_in_flight", "avatars", "personalisations")


@dataclass
class Bucket:
    """A token bucket: `rate` tokens a second, at most `burst` saved up."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.burst  # a new bucket starts full

    def take(self, now: float | None = None) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is there."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def retune(self, rate: float, burst: float, now: float | None = None) -> None:
        """A new rate from now on: what was saved up at the old rate until now is kept, at most the
        new burst (a new full bucket here let two streams at two rates refill it every frame)."""
        now = time.monotonic() if now is None else now
        self.tokens = min(burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp, self.rate, self.burst = now, rate, burst


def _bucket(buckets: dict[str, Bucket], tenant: str, rate: float, burst: float) -> Bucket:
    """The tenant's bucket, retuned when its quota changed."""
    bucket = buckets.get(tenant)
    if bucket is None:
        bucket = buckets[tenant] = Bucket(rate=rate, burst=burst)
    elif bucket.rate != rate or bucket.burst != burst:
        bucket.retune(rate, burst)
    return bucket


@contextlib.contextmanager
def held(counts: collections.Counter[str], key: str) -> Iterator[None]:
    """One more of `key` in `counts` while inside (the key gone again at 0)."""
    counts[key] += 1
    try:
        yield
    finally:
        counts[key] -= 1
        if not counts[key]:
            del counts[key]


OTHER_TENANT = "other"  # the metrics' label of a tenant the key ring does not name


def ring_tenants(ring: Ring) -> frozenset[str]:
    """The tenants the key ring names: of its unrevoked keys, certificate bindings and quotas."""
    named = {str(entry.get("tenant", "")) for entry in ring.keys.values() if not entry.get("revoked")}
    named.update(str(entry.get("tenant", "")) for entry in ring.certs.values())
    named.update(ring.tenants)
    return frozenset(named | {DEFAULT_TENANT})


def refused(message: str, retry_after: float) -> ServiceError:
    error = exhausted(f"{message}; retry in {max(1, math.ceil(retry_after))} s")
    error.retry_after = retry_after
    return error


class TenantLimits:
    def __init__(
        self,
        metrics: Metrics,
        quotas_of: Callable[[str], Quotas] | None = None,
        *,
        max_creates: int = 4,
        max_creates_per_tenant: int = 2,
        ring_of: Callable[[], Ring] | None = None,
    ) -> None:
        self.metrics = metrics
        # the key ring now (Authenticator.ring): which tenants get a label of their own (None: all)
        self.ring_of = ring_of
        self._ring: Ring | None = None
        self._named: frozenset[str] = frozenset()
        self._labels: dict[str, set[str]] = {}  # label -> the quota labels of its refusal series
        # tenant -> its quotas now (a dict lookup); None: each call's principal.quotas
        self.quotas_of = quotas_of
        self.max_creates, self.max_creates_per_tenant = max_creates, max_creates_per_tenant
        self.create_calls: collections.Counter[str] = collections.Counter()
        self.streams: defaultdict[str, int] = defaultdict(int)
        self._frames: dict[str, Bucket] = {}
        self._creates: dict[str, Bucket] = {}

    def quotas(self, principal: Principal) -> Quotas:
        return principal.quotas if self.quotas_of is None else self.quotas_of(principal.tenant)

    def label(self, tenant: str) -> str:
        """The tenant's label in the metrics: its name if the key ring names it, else OTHER_TENANT."""
        label = tenant
        if self.ring_of is not None:
            ring = self.ring_of()
            if ring is not self._ring:
                self._ring, self._named = ring, ring_tenants(ring)
            label = tenant if tenant in self._named else OTHER_TENANT
        self._labels.setdefault(label, set())
        return label

    def _streams_gauge(self) -> None:
        """talkinghead_tenant_streams of every label from the streams open now."""
        counts: collections.Counter[str] = collections.Counter()
        for tenant, open_ in self.streams.items():
            counts[self.label(tenant)] += open_
        for label in self._labels:
            self.metrics.tenant_streams.labels(label).set(counts[label])

    def prune(self) -> None:
        """Remove the series of the tenants the key ring no longer names (their streams, if any,
        count as OTHER_TENANT's from now on), and start those of the tenants it names at 0."""
        if self.ring_of is None:
            return
        self.label(DEFAULT_TENANT)  # (the ring as it is now)
        for label in self._named | {OTHER_TENANT}:
            quotas = self._labels.setdefault(label, set())
            if len(quotas) < len(QUOTA_NAMES):
                self.metrics.tenant_frames.labels(label)
                for quota in QUOTA_NAMES:
                    self.metrics.quota_refusals.labels(label, quota)
                quotas.update(QUOTA_NAMES)
        for label in [x for x in self._labels if x not in self._named and x != OTHER_TENANT]:
            for family, values in (
                (self.metrics.tenant_streams, [(label,)]),
                (self.metrics.tenant_frames, [(label,)]),
                (self.metrics.quota_refusals, [(label, quota) for quota in self._labels[label]]),
            ):
                for value in values:
                    with contextlib.suppress(KeyError):
                        family.remove(*value)
            del self._labels[label]
        self._streams_gauge()

    def _refuse(self, principal: Principal, quota: str, message: str, retry_after: float) -> ServiceError:
        self._count_refusal(principal.tenant, quota)
        return refused(message, retry_after)

    def _count_refusal(self, tenant: str, quota: str) -> None:
        label = self.label(tenant)
        self._labels[label].add(quota)
        self.metrics.quota_refusals.labels(label, quota).inc()

    def take_stream(self, principal: Principal) -> None:
        limit = self.quotas(principal).max_streams
        if limit and self.streams[principal.tenant] >= limit:
            raise self._refuse(
                principal,
                "streams",
                f"tenant {principal.tenant!r} has its {limit} concurrent streams open",
                5.0,
            )
        self.streams[principal.tenant] += 1
        self._streams_gauge()

    def release_stream(self, tenant: str) -> None:
        self.streams[tenant] = max(0, self.streams[tenant] - 1)
        if not self.streams[tenant]:
            del self.streams[tenant]
        self._streams_gauge()

    def frame(self, principal: Principal, retry: bool = False) -> float:
        """Take one of the tenant's frames per second: 0.0 when granted, else the seconds until the
        next is (live streams drop the frame, blocking ones wait and ask again with `retry`: the
        frame and its wait are counted once, on its first ask)."""
        if not retry:
            self.metrics.tenant_frames.labels(self.label(principal.tenant)).inc()
        rate = self.quotas(principal).max_fps
        if not rate:
            return 0.0
        wait = _bucket(self._frames, principal.tenant, rate, max(1.0, rate / 2)).take()
        if wait and not retry:
            self._count_refusal(principal.tenant, "fps")
        return wait

    def create(self, principal: Principal) -> None:
        per_minute = self.quotas(principal).creates_per_minute
        if not per_minute:
            return
        wait = _bucket(self._creates, principal.tenant, per_minute / 60.0, float(per_minute)).take()
        if wait:
            raise self._refuse(
                principal,
                "creates_per_minute",
                f"tenant {principal.tenant!r} may create {per_minute} avatars a minute",
                wait,
            )

    @contextlib.contextmanager
    def create_call(self, principal: Principal) -> Iterator[None]:
        """Hold one of the server's CreateAvatar calls in flight (TALKINGHEAD_MAX_CREATES, of one
        tenant MAX_CREATES_PER_TENANT) while one is served; taken before its request is read
        (service/wire.py). Each holds its photos (up to 64 MiB) until its turn at the one detect
        thread: one create of 63 MB raises the server's peak RSS by ~210 MB, and as this gate (4, 2
        per tenant) admits at most 8, by 0.87 GB at most. A tenant with none in flight gets one while
        the server has fewer than twice max_creates: other tenants' creates never lock it out."""
        tenant, total = principal.tenant, sum(self.create_calls.values())
        mine = self.create_calls[tenant]
        room = self.max_creates * (2 if mine == 0 else 1)
        if mine >= self.max_creates_per_tenant or total >= room:
            raise self._refuse(
                principal,
                "creates_in_flight",
                f"{mine} avatars of tenant {tenant!r} and {total - mine} of others are being created on "
                "this server",
                2.0,
            )
        with held(self.create_calls, tenant):
            yield

    def personalisations(self, principal: Principal, count: int) -> None:
        """`count`: the tenant's personalisations queued or running now."""
        limit = self.quotas(principal).max_personalisations
        if limit and count >= limit:
            raise self._refuse(
                principal,
                "personalisations",
                f"tenant {principal.tenant!r} has its {limit} personalisations queued or running",
                30.0,
            )

    def avatars(self, principal: Principal, count: int) -> None:
        limit = self.quotas(principal).max_avatars
        if limit and count >= limit:
            raise self._refuse(
                principal, "avatars", f"tenant {principal.tenant!r} keeps its limit of {limit} avatars", 60.0
            )
