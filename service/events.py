"""Following avatar events (jobs.events): every replica drops what it cached about a changed avatar.

`RedisEvents` subscribes to the pub/sub channel (redis.asyncio). A subscription can die without
the socket saying so (Redis rescheduled to another address, a NAT or conntrack entry dropped: no
RST, reads just wait), so it is pinged every `ping_s` (2 s) and one whose ping is not answered
within `dead_s` (3 s) counts as lost, as does any socket error (redis-py's own silent reconnects
are turned off: they resubscribe without saying that events were missed); TCP keepalive is on as
well. With each ping it reads a marker key (jobs.keys.EVENTS_EPOCH) that it set when it
subscribed: gone or changed, Redis lost its data (FLUSHALL, a restart without its dump) without
the subscription breaking, and `on_reset` drops what was cached from it.
`on_reset` (events may have been missed: drop every cached record and personalised session) is
called when a subscription is lost, and again once one is confirmed; `subscribed` is set only while
one is: the caller trusts its cache only then (service/app.py). While Redis stays away it retries
after 1 s, doubling to 5 s, and says so once when the outage starts, once a minute while it lasts
and once when it is over.
`FileEvents` follows the local queue's events.jsonl (one machine: the embedded worker's news). A
file truncated (logrotate's copytruncate: it is smaller than what was read, or no longer holds
the last bytes read where they were) is read again from its start, and one replaced (a new
inode: jobs.local starts a new file past a size) from the new file's start once the old one is
read to its end; both call `on_reset`, as events may have been missed.
Both call `on_event(event)` on the event loop; a message that is not an event (jobs.events: also
one naming an invalid avatar id) is skipped, and an event whose handling fails is logged and
skipped: neither ends the follower nor counts as an outage.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from jobs import keys
from jobs.events import Event, RateLimited
from jobs.local import EVENTS_FILE

log = logging.getLogger("talkinghead.service.events")
POLL_S = 0.1
TAIL_BYTES = 64
RETRY_S = (1.0, 5.0)  # the wait before resubscribing: first, and most (doubling between)
REMIND_S = 60.0  # while the outage lasts, a warning this often (the failures between log at DEBUG)
PING_S = 2.0  # the subscription is pinged this often (and the epoch marker read)
DEAD_S = 3.0  # a ping unanswered this long: the subscription is lost (also the socket timeout)
CONNECT_S = 5.0


class _Handler:
    """on_event and on_reset, each call guarded: a failure is logged (rate-limited) and skipped."""

    def __init__(self, on_event: Callable[[Event], None], on_reset: Callable[[], None]) -> None:
        self.on_event, self.on_reset = on_event, on_reset
        self._failed = RateLimited(log)

    def event(self, data: str | bytes) -> None:
        event = Event.from_json(data)
        if event is None:
            return
        try:
            self.on_event(event)
        except Exception as error:
            self._failed.warning("handling the avatar event %s failed; skipped", event, exc_info=error)

    def reset(self) -> None:
        try:
            self.on_reset()
        except Exception as error:
            self._failed.warning("dropping what was cached after missed avatar events failed", exc_info=error)


class FileEvents:
    def __init__(
        self, *, root: Path, on_event: Callable[[Event], None], on_reset: Callable[[], None] = lambda: None
    ) -> None:
        self.path = Path(root) / EVENTS_FILE
        self.handler = _Handler(on_event, on_reset)
        self._handle: IO[bytes] | None = None
        self._pending = b""
        self._tail = b""  # the last bytes read (up to TAIL_BYTES), checked to notice a truncation
        self._failed = RateLimited(log)

    async def run(self) -> None:
        self._open(at_end=True)  # earlier events are history
        try:
            while True:
                try:
                    self.poll()
                except Exception as error:  # (a disk error, say): the next poll tries again
                    self._failed.warning("following %s failed: %s", self.path, error)
                await asyncio.sleep(POLL_S)
        finally:
            self._close()

    def _open(self, *, at_end: bool) -> None:
        try:
            self._handle = self.path.open("rb")
        except FileNotFoundError:
            self._handle = None
            return
        if at_end:
            self._handle.seek(0, os.SEEK_END)

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle, self._pending, self._tail = None, b"", b""

    def poll(self) -> None:
        """Handle the lines appended since the last poll; notice a file truncated or replaced."""
        if self._handle is None:
            self._open(at_end=False)  # made since: every line in it is news
            if self._handle is None:
                return
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            now = None  # removed: a new one is read from its start when it comes (a new inode)
        held = os.fstat(self._handle.fileno())
        if now is not None and (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            self._read()  # the old file to its end: what was appended before it was replaced
            self._close()
            self._lost("was replaced")
            self._open(at_end=False)
        elif self._truncated(held.st_size):
            self._handle.seek(0)
            self._pending, self._tail = b"", b""
            self._lost("was truncated")
        if self._handle is not None:
            self._read()

    def _truncated(self, size: int) -> bool:
        """Whether the file was cut short since the last read: smaller than what was read, or (cut
        and written again past that point before this poll) no longer holding the bytes last read."""
        assert self._handle is not None
        offset = self._handle.tell()
        if size < offset:
            return True
        tail = self._tail
        return bool(tail) and os.pread(self._handle.fileno(), len(tail), offset - len(tail)) != tail

    def _read(self) -> None:
        assert self._handle is not None
        chunk = self._handle.read()
        if not chunk:
            return
        self._tail = (self._tail + chunk)[-TAIL_BYTES:]
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                self.handler.event(line)

    def _lost(self, what: str) -> None:
        log.info("%s %s: reading it from its start; cached avatars dropped", self.path, what)
        self.handler.reset()


class Silent(ConnectionError):
    """Redis did not answer the subscription's ping in time: the connection is gone without a word."""


def stop_if_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop. redis-py's reads can swallow a cancel
    that lands as their own timeout fires (a read with a timeout, asyncio.timeout on Python 3.11):
    the subscription loop then went on following events after Server.stop, for good."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class RedisEvents:
    def __init__(
        self,
        *,
        url: str,
        on_event: Callable[[Event], None],
        on_reset: Callable[[], None],
        ping_s: float = PING_S,
        dead_s: float = DEAD_S,
    ) -> None:
        self.url = url
        self.handler = _Handler(on_event, on_reset)
        self.ping_s, self.dead_s = ping_s, dead_s
        self.subscribed = asyncio.Event()

    def _client(self) -> Any:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        from jobs.redis_queue import keepalive_options

        return aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=CONNECT_S,
            socket_timeout=self.dead_s,
            socket_keepalive=True,
            socket_keepalive_options=keepalive_options(),
            # no silent reconnect: a resubscription must reset (events were missed meanwhile)
            retry=Retry(NoBackoff(), 0),
        )

    async def run(self) -> None:
        first = True
        wait, down_since, warned = RETRY_S[0], None, 0.0
        while True:
            stop_if_cancelled()
            client = self._client()
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(keys.EVENTS)
                    await self._confirmed(pubsub)
                    epoch = await self._epoch(client)
                    # Events published before now are not heard: neither what was cached before the
                    # first subscription nor records read from the store meanwhile are kept.
                    self.handler.reset()
                    self.subscribed.set()
                    if down_since is not None:
                        log.info(
                            "avatar events from Redis %s after %.0f s%s",
                            "started" if first else "resumed",
                            time.monotonic() - down_since,
                            "" if first else "; cached avatars dropped",
                        )
                    first = False
                    wait, down_since = RETRY_S[0], None
                    await self._follow(pubsub, client, epoch)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                stop_if_cancelled()
                if self.subscribed.is_set():  # lost now: what is cached may be stale from here on
                    self.subscribed.clear()
                    self.handler.reset()
                now = time.monotonic()
                if down_since is None:
                    down_since = warned = now
                    log.warning("avatar events from Redis interrupted (%s); resubscribing", error)
                elif now - warned >= REMIND_S:
                    warned = now
                    log.warning(
                        "avatar events from Redis still interrupted after %.0f s (%s); resubscribing",
                        now - down_since,
                        error,
                    )
                else:
                    log.debug("resubscribing to avatar events failed (%s); next try in %.0f s", error, wait)
                await asyncio.sleep(wait)
                wait = min(2 * wait, RETRY_S[1])
            finally:
                self.subscribed.clear()
                await client.aclose()

    async def _confirmed(self, pubsub: Any) -> None:
        """Wait for Redis to confirm the subscription (Silent after dead_s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.dead_s
        while (left := deadline - loop.time()) > 0:
            message = await pubsub.get_message(timeout=left)
            if message is not None and message.get("type") == "subscribe":
                return
        raise Silent(f"Redis did not confirm the subscription within {self.dead_s:g} s")

    async def _epoch(self, client: Any) -> bytes | None:
        """The marker of the data this subscription follows (set now if Redis has none)."""
        await client.set(keys.EVENTS_EPOCH, secrets.token_hex(8), nx=True)
        epoch: bytes | None = await client.get(keys.EVENTS_EPOCH)
        return epoch

    async def _follow(self, pubsub: Any, client: Any, epoch: bytes | None) -> None:
        """Handle messages until the subscription is lost: a ping every ping_s, answered within
        dead_s or Silent; the epoch marker read with it."""
        loop = asyncio.get_running_loop()
        next_ping, asked = loop.time() + self.ping_s, None
        while True:
            stop_if_cancelled()
            now = loop.time()
            if asked is None and now >= next_ping:
                await pubsub.ping()
                asked = now
                if await client.get(keys.EVENTS_EPOCH) != epoch:
                    log.warning(
                        "Redis lost its data (flushed, or restarted without it) under a live "
                        "subscription; cached avatars dropped"
                    )
                    self.handler.reset()
                    epoch = await self._epoch(client)
            elif asked is not None and now - asked >= self.dead_s:
                raise Silent(f"no answer to a ping of the subscription within {self.dead_s:g} s")
            due = next_ping if asked is None else asked + self.dead_s
            message = await pubsub.get_message(timeout=max(due - loop.time(), 0.01))
            if message is None:
                continue
            kind = message.get("type")
            if kind == "pong":
                next_ping, asked = (now if asked is None else asked) + self.ping_s, None
            elif kind == "message":
                self.handler.event(message["data"])
