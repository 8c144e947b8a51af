"""Every Triton behind a name: one TritonBackend per address, each call on the least busy one.

One tritonclient InferenceServerClient is one HTTP/2 connection, and Kubernetes balances a Service
per connection, never moving one: a server pod given the Triton ClusterIP Service sent all its
inference to the one Triton pod it happened to connect to, so with triton.replicaCount > 1 (or the
HPA adding Tritons) the others idled, the HPA's average queue metric flapped, and when that Triton
went away the server reported NOT_SERVING until it reconnected - to a new pod on a new address it
never would without a new connection.

So `TALKINGHEAD_TRITON_URL` may name several Tritons:

  - `host:port` where host is an IP address literal (make up's 127.0.0.1:8001, a sidecar): one
    Triton, the TritonBackend alone, exactly as before (`make_triton_backend`);
  - `host:port` where host is a name: every address it resolves to (IPv4 ones, or IPv6 where it
    has none; the chart's headless Triton Service lists each ready Triton pod), resolved again
    every `resolve_s` (15 s), and every second while no Triton behind it is ready (a replaced
    single Triton comes back on a new address);
  - a comma-separated list of those (`10.0.0.5:8001,10.0.0.6:8001`): all of them.

`TritonPool` keeps one TritonBackend (client, readiness monitor, model loads) per address. A call
goes to the ready Triton with the fewest calls of this replica in flight (round robin among equals;
one whose call is stalled only when all are); a call cut because its Triton went away (the
connection broke, or the monitor lost it) is made once more on another. Health is SERVING while at
least one Triton serves. A new address is connected to and used once it has loaded the models; an
address the name no longer resolves to gets no new calls and is closed once its calls in flight
have finished; a failed resolution changes nothing. Every Triton must serve the same base model:
calls go to those serving the model the first ready one served (another only once none of those is
left). `lanes` is the sum of the ready Tritons' generator instances and `loads` changes whenever
the set of ready Tritons (or one's models) changes, so the service measures its capacity again.
`readiness` says which Tritons serve (the server publishes it: talkinghead_triton_ready).
A personalised generator is loaded on every ready Triton when a stream opens on it
(has_personalised). Its calls name one version, the newest any ready Triton has for the stream's
record, and go only to the Tritons that have that version; one that lacks it (new since, or still
on an older version while the worker loads a new one Triton by Triton) loads it in the
background. Before, a call ran whatever its Triton held, and while the worker loaded a new version
a stream's frames alternated between the two generators for seconds. A call whose Triton let go
of its version goes to another that still has it, and only once none has is the version looked
up again: a stream moves to a new version once, never back.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np

from facekit.contract import ModelInfo, personalised_name
from facekit.engines import OFFLINE
from service.backends.base import BackendUnavailable, generator_feeds
from service.backends.triton import NotLoaded, TritonBackend
from service.settings import host_port

log = logging.getLogger("talkinghead.service.triton")
T = TypeVar("T")
RESOLVE_S = 15.0  # how often the name is resolved again
RESOLVE_EMPTY_S = 1.0  # ... while no Triton behind it is ready
TICK_S = 0.25  # drained Tritons are closed, and readiness followed, this often
WENT_AWAY = "it went away"  # BackendUnavailable.reason of a call whose Triton was lost


def targets(url: str) -> list[tuple[str, int]]:
    """`host:port[,host:port...]` -> [(host, port)]; an IPv6 host in brackets."""
    found = []
    for part in url.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"Triton URL {url!r}: expected host:port[,host:port...]")
        found.append((host.removeprefix("[").removesuffix("]"), int(port)))
    return found


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def fixed_address(url: str) -> bool:
    """One Triton at an IP address literal: nothing to resolve, nothing to spread."""
    found = targets(url)
    return len(found) == 1 and _literal(found[0][0])


def resolve(url: str) -> list[str]:
    """The `address:port` of every Triton `url` names now (blocking: getaddrinfo). IPv4 addresses
    of a name, its IPv6 ones only where it has none (`localhost` is one Triton, not two). Raises
    OSError (socket.gaierror) when a name does not resolve."""
    found: list[str] = []
    for host, port in targets(url):
        if _literal(host):
            hosts = [host]
        else:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            v4 = [str(info[4][0]) for info in infos if info[0] == socket.AF_INET]
            hosts = v4 or [str(info[4][0]) for info in infos if info[0] == socket.AF_INET6]
        for address in (host_port(h, port) for h in hosts):
            if address not in found:
                found.append(address)
    if not found:
        raise OSError(f"{url} resolves to no address")
    return found


def make_triton_backend(url: str, **kwargs: Any) -> TritonBackend | TritonPool:
    """The Triton backend for TALKINGHEAD_TRITON_URL: one Triton at an address literal as before,
    else every Triton behind the name(s)."""
    if fixed_address(url):
        return TritonBackend(url=url, **kwargs)
    return TritonPool(url=url, **kwargs)


class TritonPool:
    """The Backend over every Triton `url` names (module docstring). `resolver` returns the
    addresses (`address:port`) now - by default `resolve(url)`, run in a thread; a test hands in
    its own. `member` are TritonBackend's keyword arguments, for each Triton."""

    name = "triton"
    remote_inference = True

    def __init__(
        self,
        *,
        url: str,
        resolver: Callable[[], list[str]] | None = None,
        resolve_s: float = RESOLVE_S,
        **member: Any,
    ) -> None:
        targets(url)  # a malformed URL fails here, at start, not in the first resolution
        self.url = url
        self._resolver = resolver if resolver is not None else lambda: resolve(url)
        self.resolve_s = resolve_s
        self._member = member
        self._members: dict[str, TritonBackend] = {}  # address -> its backend, in the name's order
        self._draining: dict[str, TritonBackend] = {}  # no longer resolved: closed once idle
        self._model: str | None = None  # the model id calls go to
        self._seen: tuple[tuple[str, int], ...] = ()
        self.loads = 0  # Backend.loads: changes with the ready Tritons (`_follow`)
        self.batches_cheaper = True  # the ready Tritons' (`_follow`)
        self._turn = itertools.count()
        self._resolved_at = -1e9
        self._resolve_failing = False
        self._task: asyncio.Task[None] | None = None
        self._background: dict[tuple[str, str], asyncio.Task[Any]] = {}

    # -- membership ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._resolved_at = time.monotonic()
        await self._resolve()
        self._task = asyncio.create_task(self._maintain(), name="triton-pool")

    async def close(self) -> None:
        tasks = [*([self._task] if self._task is not None else []), *self._background.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        members = [*self._members.values(), *self._draining.values()]
        self._members, self._draining = {}, {}
        await asyncio.gather(*(member.close() for member in members), return_exceptions=True)

    def addresses(self) -> list[str]:
        """The Tritons in use (resolved now), in order."""
        return list(self._members)

    def members(self) -> dict[str, TritonBackend]:
        return dict(self._members)

    async def _resolve(self) -> None:
        try:
            found = await asyncio.to_thread(self._resolver)
        except (OSError, ValueError) as error:
            if not self._resolve_failing:
                log.warning(
                    "cannot resolve the Tritons behind %s (keeping %s): %s", self.url, self.addresses(), error
                )
            self._resolve_failing = True
            return
        if self._resolve_failing:
            log.info("the Tritons behind %s resolve again", self.url)
        self._resolve_failing = False
        await self._reconcile(list(dict.fromkeys(found)))

    async def _reconcile(self, wanted: list[str]) -> None:
        before = self.addresses()
        for address in wanted:
            if address in self._members:
                continue
            back = self._draining.pop(address, None)
            member = back if back is not None else TritonBackend(url=address, **self._member)
            self._members[address] = member
            if back is None:
                await member.start()
        for address in [address for address in self._members if address not in wanted]:
            self._draining[address] = self._members.pop(address)
            log.info(
                "Triton at %s is no longer behind %s: no new calls; closed once its calls end",
                address,
                self.url,
            )
        if self.addresses() != before:
            log.info("Tritons behind %s: %s", self.url, ", ".join(self.addresses()) or "none")

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                for address, member in list(self._draining.items()):
                    if member.in_flight() == 0:
                        del self._draining[address]
                        await member.close()
                        log.info("closed the connection to Triton at %s (drained)", address)
                every = self.resolve_s if self._usable() else min(RESOLVE_EMPTY_S, self.resolve_s)
                if time.monotonic() - self._resolved_at >= every:
                    self._resolved_at = time.monotonic()
                    await self._resolve()
                self._follow()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any one failure, or the pool stops following
                log.exception("following the Tritons behind %s failed", self.url)

    # -- which Tritons serve -------------------------------------------------------------------
    def _usable(self) -> list[TritonBackend]:
        """The Tritons whose models are loaded and answer, of the model calls go to."""
        loaded = [member for member in self._members.values() if member.loaded()]
        if not loaded:
            return []
        if self._model not in {member.info.model_id for member in loaded}:
            if self._model is not None:
                log.warning(
                    "no Triton behind %s serves model %s any more: serving %s",
                    self.url,
                    self._model,
                    loaded[0].info.model_id,
                )
            self._model = loaded[0].info.model_id
        return [member for member in loaded if member.info.model_id == self._model]

    def _follow(self) -> None:
        """`loads` changes when the ready Tritons do (one joins, leaves or reloads its models).
        Every tick, and on each readiness check."""
        usable = self._usable()
        if usable:
            self.batches_cheaper = usable[0].batches_cheaper
        seen = tuple((member.url, member.loads) for member in usable)
        if seen != self._seen:
            if usable:
                log.info(
                    "%d of %d Triton(s) behind %s ready (%s): generator in %d instance(s) in all",
                    len(usable),
                    len(self._members),
                    self.url,
                    ", ".join(member.url for member in usable),
                    sum(member.lanes() for member in usable),
                )
                self.loads += 1
            self._seen = seen

    async def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._usable():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        self._follow()
        return True

    def loaded(self) -> bool:
        return bool(self._usable())

    def is_ready(self) -> bool:
        """At least one Triton serves (loaded, no call of it stalled)."""
        self._follow()
        return any(member.is_ready() for member in self._usable())

    def readiness(self) -> dict[str, bool]:
        """Each Triton in use (by `address:port`) -> whether it serves now: loaded the model calls
        go to, answering, no call of it stalled (talkinghead_triton_ready). `is_ready` is whether
        any does; this says which one does not."""
        usable = self._usable()
        return {address: member in usable and member.is_ready() for address, member in self._members.items()}

    def stalled(self) -> str | None:
        usable = self._usable()
        if not usable or any(member.is_ready() for member in usable):
            return None
        return "; ".join(f"{member.url}: {member.stalled()}" for member in usable)

    @property
    def info(self) -> ModelInfo:
        usable = self._usable()
        if not usable:
            raise BackendUnavailable(f"no Triton behind {self.url} is ready")
        return usable[0].info

    def lanes(self, avatar_id: str = "") -> int:
        """The generator's instances on all ready Tritons: calls side by side at full speed."""
        return max(1, sum(member.lanes(avatar_id) for member in self._usable()))

    # -- calls ---------------------------------------------------------------------------------
    def _pick(self, among: list[TritonBackend]) -> TritonBackend:
        if not among:
            raise BackendUnavailable(f"no Triton behind {self.url} is ready")
        fresh = [member for member in among if member.stalled() is None] or among
        least = min(member.in_flight() for member in fresh)
        ties = [member for member in fresh if member.in_flight() == least]
        return ties[next(self._turn) % len(ties)]

    async def _on_some(
        self,
        work: Callable[[TritonBackend], Awaitable[T]],
        among: Callable[[], list[TritonBackend]] | None = None,
    ) -> T:
        """`work` on the least busy Triton; once more on another when that one went away meanwhile."""
        candidates = among or self._usable
        member = self._pick(candidates())
        try:
            return await work(member)
        except BackendUnavailable as error:
            others = [other for other in candidates() if other is not member]
            if error.reason != WENT_AWAY or not others:
                raise
            log.info("Triton at %s went away during a call: retrying on another", member.url)
        return await work(self._pick(others))

    async def embed(self, images: np.ndarray, landmark_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return await self._on_some(lambda member: member.embed(images, landmark_images))

    async def generate(
        self,
        landmark_images: np.ndarray,
        adain: np.ndarray,
        warped: np.ndarray | None = None,
        *,
        priority: int = OFFLINE,
    ) -> np.ndarray:
        return await self._on_some(
            lambda member: member.generate(landmark_images, adain, warped, priority=priority)
        )

    async def has_personalised(self, avatar_id: str, made_for: str = "") -> bool:
        """Looks it up, and loads it, on every ready Triton; whether any has it."""
        usable = self._usable()
        if not usable:
            return False
        found = await asyncio.gather(*(member.has_personalised(avatar_id, made_for) for member in usable))
        return any(found)

    def _load_elsewhere(self, avatar_id: str, version: int) -> None:
        """Have the ready Tritons that lack `version` of the generator (or a newer one: new since
        it was loaded, or still on an older version) load it, once each."""
        for member in self._usable():
            pinned = member.pinned(avatar_id)
            key = (member.url, personalised_name(avatar_id))
            if (pinned is not None and pinned.version >= version) or key in self._background:
                continue
            task = asyncio.ensure_future(member.pin(avatar_id, at_least=version))
            self._background[key] = task
            task.add_done_callback(lambda done, key=key: self._background.pop(key, None))  # type: ignore[misc]

    def _pins(self, avatar_id: str, made_for: str) -> dict[TritonBackend, int]:
        """The ready Tritons holding a generator for the record `made_for` -> the version each has."""
        pins = {}
        for member in self._usable():
            pinned = member.pinned(avatar_id)
            if pinned is not None and member.knows_personalised(avatar_id, made_for):
                pins[member] = pinned.version
        return pins

    def _version(self, avatar_id: str, made_for: str) -> int | None:
        """The version calls name: the newest a ready Triton has for the record `made_for`."""
        return max(self._pins(avatar_id, made_for).values(), default=None)

    def _having(self, avatar_id: str, made_for: str, version: int) -> list[TritonBackend]:
        return [member for member, held in self._pins(avatar_id, made_for).items() if held == version]

    async def generate_personalised(
        self,
        avatar_id: str,
        landmark_images: np.ndarray,
        warped: np.ndarray | None = None,
        *,
        priority: int = OFFLINE,
        made_for: str = "",
    ) -> np.ndarray:
        feeds = generator_feeds(self.info, landmark_images, None, warped)
        version = self._version(avatar_id, made_for)
        retries = 2  # a Triton that went away, or let go of the version
        while True:
            among = [] if version is None else self._having(avatar_id, made_for, version)
            if version is None or not among:  # first call, or no Triton has it any more: look again
                await self.has_personalised(avatar_id, made_for)
                version = self._version(avatar_id, made_for)
                if version is None:  # withdrawn, or made for another record, or no Triton
                    picked = self._pick(self._usable())
                    version = await picked.checked_version(avatar_id, made_for)  # raises, as it says
                among = self._having(avatar_id, made_for, version)
            self._load_elsewhere(avatar_id, version)
            member = self._pick(among)
            try:
                return await member.run_personalised(avatar_id, version, feeds, priority)
            except NotLoaded:
                if not retries:
                    raise
                name = personalised_name(avatar_id)
                log.info("Triton at %s let go of %s version %d", member.url, name, version)
            except BackendUnavailable as error:
                others = [o for o in self._having(avatar_id, made_for, version) if o is not member]
                if error.reason != WENT_AWAY or not others or not retries:
                    raise
                log.info("Triton at %s went away during a call: retrying on another", member.url)
            retries -= 1

    def loaded_personalised(self) -> int:
        return len(set().union(*(member.personalised_names() for member in self._members.values())))

    def forget_personalised(self, avatar_id: str) -> None:
        for member in [*self._members.values(), *self._draining.values()]:
            member.forget_personalised(avatar_id)

    def forget_all_personalised(self) -> None:
        for member in [*self._members.values(), *self._draining.values()]:
            member.forget_all_personalised()
