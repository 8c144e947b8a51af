"""The avatar event followers (service/events.py) on a real redis-server and a real events.jsonl:
what is not an event, or an event whose handling fails, is skipped without ending the follower or
counting as an outage."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from jobs import keys
from jobs.events import CHANGED, DELETED, Event
from jobs.local import EVENTS_FILE, LocalQueue
from jobs.redis_queue import connect
from service.events import FileEvents, RedisEvents
from tests.redis_fixtures import *  # noqa: F403


def event(avatar_id: str, kind: str = CHANGED) -> str:
    return Event(avatar_id=avatar_id, event=kind, sent=time.time()).to_json()


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition` holds (polled every 10 ms); fails saying `what` after `timeout`."""
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def running(follower: FileEvents | RedisEvents, scenario: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.create_task(follower.run())
    try:
        await scenario()
    finally:
        assert not task.done(), f"the follower ended: {task}"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_redis_events_skip_a_foreign_event_and_a_failing_handler_without_an_outage(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An event naming an id outside the alphabet ("../x", from a foreign publisher) is skipped
    with a warning; an event whose handler raises is logged and skipped. Before, the first raised
    out of the subscription's loop: counted as an outage, the cache dropped and ~1 s of events
    missed while it resubscribed."""
    heard: list[str] = []
    resets: list[float] = []

    def on_event(e: Event) -> None:
        if e.avatar_id == "boom":
            raise RuntimeError("a bug in handling one event")
        heard.append(e.avatar_id)

    source = RedisEvents(url=redis_url, on_event=on_event, on_reset=lambda: resets.append(time.monotonic()))
    publisher = connect(redis_url)

    async def scenario() -> None:
        await asyncio.wait_for(source.subscribed.wait(), timeout=5)
        before = len(resets)
        for message in (
            json.dumps({"avatar_id": "../x", "event": DELETED, "sent": time.time()}),
            event("boom"),
            "not json",
            event("after"),
        ):
            await asyncio.to_thread(publisher.publish, keys.EVENTS, message)
        await until(lambda: heard == ["after"], 2, "the event after the bad ones was not heard")
        assert source.subscribed.is_set() and len(resets) == before, "treated as an outage"

    with caplog.at_level(logging.WARNING):
        asyncio.run(running(source, scenario))
    text = caplog.text
    assert "interrupted" not in text
    assert "skipped an avatar event" in text and "'../x'" in text
    assert "handling the avatar event" in text and "a bug in handling one event" in text


def test_file_events_skip_a_foreign_line_and_a_failing_handler_and_go_on(tmp_path: Path) -> None:
    """events.jsonl with a line naming an invalid id and an event whose handler raises: both are
    skipped and the events after them are handled. Before, the first ended the follower silently:
    no later event (a personalisation done, a generator withdrawn) was ever handled."""
    queue = LocalQueue(root=tmp_path)
    heard: list[str] = []

    def on_event(e: Event) -> None:
        if e.avatar_id == "boom":
            raise RuntimeError("a bug in handling one event")
        heard.append(e.avatar_id)

    source = FileEvents(root=tmp_path, on_event=on_event)

    async def scenario() -> None:
        await asyncio.sleep(0.2)
        with (tmp_path / EVENTS_FILE).open("a") as f:
            f.write(json.dumps({"avatar_id": "../x", "event": DELETED, "sent": time.time()}) + "\n")
        queue.publish("boom", CHANGED)
        queue.publish("first", CHANGED)
        await until(lambda: heard == ["first"], 2, "the event after the bad ones was not heard")
        queue.publish("second", DELETED)
        await until(lambda: heard == ["first", "second"], 2, "a later event was not heard")

    asyncio.run(running(source, scenario))
