"""Following avatar events (jobs.events): every replica drops what it cached about a changed avatar.

`RedisEvents` subscribes to the pub/sub channel (redis.asyncio); after a lost connection it
resubscribes and reports a reset (events may have been missed: the caller drops its whole cache).
While Redis stays away it retries after 1 s, doubling to 5 s (how stale a replica may stay after
Redis is back), and says so once when the outage starts, once a minute while it lasts and once
when it is over.
`FileEvents` follows the local queue's events.jsonl (one machine: the embedded worker's news).
Both call `on_event(event)` on the event loop; a message that is not an event (jobs.events: also
one naming an invalid avatar id) is skipped, and an event whose handling fails is logged and
skipped: neither ends the follower nor counts as an outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from jobs import keys
from jobs.events import Event, RateLimited
from jobs.local import EVENTS_FILE

log = logging.getLogger("talkinghead.service.events")
POLL_S = 0.1
RETRY_S = (1.0, 5.0)  # the wait before resubscribing: first, and most (doubling between)
REMIND_S = 60.0  # while the outage lasts, a warning this often (the failures between log at DEBUG)


class _Handler:
    """on_event, each call guarded: a failure is logged (rate-limited) and the event skipped."""

    def __init__(self, on_event: Callable[[Event], None]) -> None:
        self.on_event = on_event
        self._failed = RateLimited(log)

    def event(self, data: str | bytes) -> None:
        event = Event.from_json(data)
        if event is None:
            return
        try:
            self.on_event(event)
        except Exception as error:
            self._failed.warning("handling the avatar event %s failed; skipped", event, exc_info=error)


class FileEvents:
    def __init__(self, *, root: Path, on_event: Callable[[Event], None]) -> None:
        self.path = Path(root) / EVENTS_FILE
        self.handler = _Handler(on_event)

    async def run(self) -> None:
        offset = self.path.stat().st_size if self.path.exists() else 0  # earlier events are history
        pending = b""
        while True:
            try:
                with self.path.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
            except FileNotFoundError:
                chunk = b""
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    self.handler.event(line)
            await asyncio.sleep(POLL_S)


class RedisEvents:
    def __init__(self, *, url: str, on_event: Callable[[Event], None], on_reset: Callable[[], None]) -> None:
        self.url = url
        self.handler = _Handler(on_event)
        self.on_reset = on_reset
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        import redis.asyncio as aioredis

        first = True
        wait, down_since, warned = RETRY_S[0], None, 0.0
        while True:
            client = aioredis.Redis.from_url(self.url, socket_connect_timeout=5)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(keys.EVENTS)
                    if not first:
                        self.on_reset()  # what was published while we were away is lost
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
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.handler.event(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.subscribed.clear()
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
                await client.aclose()
