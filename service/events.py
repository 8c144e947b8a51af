"""Following avatar events (jobs.events): every replica drops what it cached about a changed avatar.

`RedisEvents` subscribes to the pub/sub channel (redis.asyncio); after a lost connection it
resubscribes and reports a reset (events may have been missed: the caller drops its whole cache).
`FileEvents` follows the local queue's events.jsonl (one machine: the embedded worker's news).
Both call `on_event(event)` on the event loop; a malformed message is skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from jobs import keys
from jobs.events import Event
from jobs.local import EVENTS_FILE

log = logging.getLogger("talkinghead.service.events")
POLL_S = 0.1
RETRY_S = 1.0


class FileEvents:
    def __init__(self, *, root: Path, on_event: Callable[[Event], None]) -> None:
        self.path = Path(root) / EVENTS_FILE
        self.on_event = on_event

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
                event = Event.from_json(line)
                if event is not None:
                    self.on_event(event)
            await asyncio.sleep(POLL_S)


class RedisEvents:
    def __init__(self, *, url: str, on_event: Callable[[Event], None], on_reset: Callable[[], None]) -> None:
        self.url = url
        self.on_event = on_event
        self.on_reset = on_reset
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        import redis.asyncio as aioredis

        first = True
        while True:
            client = aioredis.Redis.from_url(self.url, socket_connect_timeout=5)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(keys.EVENTS)
                    if not first:
                        self.on_reset()  # what was published while we were away is lost
                    first = False
                    self.subscribed.set()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            event = Event.from_json(message["data"])
                            if event is not None:
                                self.on_event(event)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.subscribed.clear()
                log.warning("avatar events from Redis interrupted (%s); resubscribing", error)
                await asyncio.sleep(RETRY_S)
            finally:
                await client.aclose()
