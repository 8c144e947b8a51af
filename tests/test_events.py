"""The avatar event followers (service/events.py) on a real redis-server and a real events.jsonl:
a subscription that dies without a word (half-open TCP) is noticed within seconds; what is not an
event, or an event whose handling fails, is skipped without ending the follower or counting as an
outage. And what avatar changes do to open streams, on real servers: a delete or replace, here or
on another replica, ends them; a personalised stream never switches to a generator made for
another record of its avatar id."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import onnx
import pytest

from api.talkinghead.v1 import animation_pb2 as pb
from client.library import Client, landmark_requests
from facekit import contract
from facekit.sequence import LandmarkSequence
from jobs import keys
from jobs.events import CHANGED, DELETED, PERSONALISED, Event
from jobs.local import EVENTS_FILE, LocalQueue
from jobs.redis_queue import connect
from service import app as app_module
from service.events import DEAD_S, PING_S, RETRY_S, FileEvents, RedisEvents
from service.store import LocalAvatarStore
from tests.redis_fixtures import *  # noqa: F403
from tests.redis_fixtures import RedisServer
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, ServerThread, copy_base_models, test_settings


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


class Proxy:
    """A TCP proxy to 127.0.0.1:`target` in the test's event loop. `black_hole()` stops forwarding
    on every connection open now without closing it - a Redis that moved away without a RST (its
    pod rescheduled, a conntrack entry dropped) - while new connections are forwarded."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.generation = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Proxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def black_hole(self) -> None:
        self.generation += 1

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)
        mine = self.generation
        pipes = [
            asyncio.create_task(self._pipe(reader, upstream_writer, mine)),
            asyncio.create_task(self._pipe(upstream_reader, writer, mine)),
        ]
        self.tasks.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            writer.close()
            upstream_writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mine: int) -> None:
        while data := await reader.read(65536):
            if mine == self.generation:  # else swallowed: never forwarded, never closed
                writer.write(data)
                await writer.drain()
        if mine == self.generation:
            writer.close()


def test_a_subscription_that_dies_without_a_word_is_noticed_and_renewed(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis goes silent on the subscription's connection (half-open TCP: no RST, reads wait
    forever). Its next ping goes unanswered: within PING_S + DEAD_S (5 s) the subscription counts
    as lost - `subscribed` cleared, the cache dropped - and a new one is made (here through the
    same proxy, which forwards new connections) that hears events again. Before, `listen()` waited
    forever: the replica served replaced and deleted avatars from its cache as long as it ran."""
    heard: list[str] = []
    resets: list[float] = []
    publisher = connect(redis_server.url)
    noticed: list[float] = []

    # pinged every 1 s and lost after 1.5 s unanswered, half the service's PING_S and DEAD_S: the
    # silence is noticed within 2.5 s, not 5 s
    ping_s, dead_s = PING_S / 2, DEAD_S / 2

    async def scenario(proxy: Proxy) -> None:
        source = RedisEvents(
            url=proxy.url,
            on_event=lambda e: heard.append(e.avatar_id),
            on_reset=lambda: resets.append(0),
            ping_s=ping_s,
            dead_s=dead_s,
        )

        async def steps() -> None:
            await asyncio.wait_for(source.subscribed.wait(), timeout=5)
            await asyncio.to_thread(publisher.publish, keys.EVENTS, event("before"))
            await until(lambda: heard == ["before"], 2, "an event through the proxy")
            subscribed = len(resets)
            proxy.black_hole()
            await asyncio.to_thread(publisher.publish, keys.EVENTS, event("unheard"))
            noticed.append(
                await until(lambda: not source.subscribed.is_set(), ping_s + dead_s + 1, "the silence")
            )
            assert len(resets) == subscribed + 1, "the cache is dropped as the subscription is lost"
            await asyncio.wait_for(source.subscribed.wait(), timeout=RETRY_S[0] + 2)
            await asyncio.to_thread(publisher.publish, keys.EVENTS, event("after"))
            await until(lambda: heard == ["before", "after"], 2, "an event on the new subscription")

        await running(source, steps)

    async def main() -> None:
        proxy = await Proxy(redis_server.port).start()
        try:
            await scenario(proxy)
        finally:
            await proxy.close()

    with caplog.at_level(logging.WARNING, logger="talkinghead.service.events"):
        asyncio.run(main())
    print(f"half-open subscription noticed {noticed[0]:.2f} s after Redis went silent")
    assert "avatar events from Redis interrupted" in caplog.text


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


def test_file_events_follow_events_jsonl_truncated_or_started_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """events.jsonl truncated under the follower (logrotate's copytruncate): it reads the file again
    from its start and drops what it cached (events may have been missed); before, its offset
    stayed past the end and it never handled another event. Past MAX_EVENTS_BYTES the publisher
    replaces the file with a new one (before, it grew forever): the follower reads the old one to
    its end and the new one from its start, missing nothing."""
    from jobs import local

    monkeypatch.setattr(local, "MAX_EVENTS_BYTES", 300, raising=False)  # ~3 events a file
    queue = LocalQueue(root=tmp_path)
    path = tmp_path / EVENTS_FILE
    heard: list[str] = []
    resets: list[int] = []
    source = FileEvents(
        root=tmp_path, on_event=lambda e: heard.append(e.avatar_id), on_reset=lambda: resets.append(0)
    )

    async def scenario() -> None:
        await asyncio.sleep(0.2)
        queue.publish("a", CHANGED)
        await until(lambda: heard == ["a"], 2, "an event")
        with path.open("r+") as f:  # copytruncate
            f.truncate(0)
        queue.publish("b", CHANGED)
        await until(lambda: heard == ["a", "b"], 2, "an event after the file was truncated")
        assert len(resets) == 1, "a truncated file may have lost events: the cache is dropped"

        sent = []
        for burst in range(6):
            for i in range(3):
                sent.append(f"r{burst}-{i}")
                queue.publish(sent[-1], CHANGED)
            assert path.stat().st_size <= 300 + 100, "the file is bounded"
            await asyncio.sleep(0.25)
        await until(lambda: heard[2:] == sent, 2, f"every event across the new files (heard {heard})")
        assert len(resets) >= 4, "the publisher started new files, and the follower noticed"

    asyncio.run(running(source, scenario))


class Streaming:
    """An Animate stream in a thread: frames at 25/s (the driver's, over and over) until it ends
    or `stop()`; the time each frame came, and how the stream ended."""

    def __init__(self, client: Client, avatar_id: str, driver: LandmarkSequence) -> None:
        self.received: list[float] = []
        self.status: tuple[grpc.StatusCode, str] | None = None
        self.started: pb.StreamStarted | None = None
        self.ended_at = 0.0
        self._stop = threading.Event()
        seq = LandmarkSequence(driver.points[:25], driver.frame_size, driver.fps)
        self._requests = list(landmark_requests(seq, clock=False))
        self._thread = threading.Thread(target=self._run, args=(client, avatar_id), daemon=True)
        self._thread.start()

    def _paced(self) -> Iterator[pb.AnimateRequest]:
        for request in itertools.cycle(self._requests):
            if self._stop.wait(0.04):
                return
            yield request

    def _run(self, client: Client, avatar_id: str) -> None:
        try:
            for _ in client.animate(avatar_id, self._paced(), encoding="raw"):
                self.started = client.last_started
                self.received.append(time.monotonic())
            self.status = (grpc.StatusCode.OK, "")
        except grpc.RpcError as error:
            self.status = (error.code(), error.details() or "")
        self.ended_at = time.monotonic()

    def frames(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            assert self.status is None, f"the stream ended: {self.status}"
            assert time.monotonic() < deadline, f"{len(self.received)} frames in {timeout} s"
            time.sleep(0.01)

    def ended(self, timeout: float) -> tuple[grpc.StatusCode, str]:
        """How the stream ended within `timeout` s (else it is stopped and the test fails)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop()
            pytest.fail(f"the stream still ran {timeout} s later ({len(self.received)} frames)")
        assert self.status is not None
        return self.status

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def after(self, moment: float) -> int:
        return sum(t > moment for t in self.received)


def test_deleting_or_replacing_an_avatar_ends_its_streams_here_and_on_other_replicas(
    model_repository: Path, tmp_path: Path, redis_url: str, driver: LandmarkSequence
) -> None:
    """Before, a stream kept rendering a deleted avatar (200 of a 10 s stream's 250 frames came
    after the delete returned) or a replaced one until the client stopped it, whichever replica
    the delete ran on. Now a delete ends the avatar's streams NOT_FOUND and a replace ABORTED -
    at once on the replica that ran it, within the avatar event's delivery on the others - while
    a `personalised` event (a running stream keeps its model) ends nothing."""
    replicas = [
        ServerThread(settings=test_settings(model_repository, tmp_path / f"store{i}", redis_url=redis_url))
        for i in (1, 2)
    ]
    publisher = connect(redis_url)
    try:
        for replica in replicas:
            replica.wait_ready()
        one, two = (r.client() for r in replicas)
        cases = [  # (avatar, the replica whose client changes it, the change, the stream's end)
            ("elsewhere", one, "delete", grpc.StatusCode.NOT_FOUND, "avatar 'elsewhere' was deleted"),
            ("here", two, "delete", grpc.StatusCode.NOT_FOUND, "avatar 'here' was deleted"),
            (
                "swapped",
                one,
                "replace",
                grpc.StatusCode.ABORTED,
                "avatar 'swapped' was replaced; open a new stream",
            ),
            (
                "mine",
                two,
                "replace",
                grpc.StatusCode.ABORTED,
                "avatar 'mine' was replaced; open a new stream",
            ),
        ]
        for avatar, changer, change, code, details in cases:
            one.create_avatar(avatar, [PORTRAIT], consent=CONSENT)
            stream = Streaming(replicas[1].client(), avatar, driver)
            stream.frames(3)
            publisher.publish(keys.EVENTS, event(avatar, PERSONALISED))  # (ends nothing)
            stream.frames(len(stream.received) + 5)
            if change == "delete":
                changer.delete_avatar(avatar)
            else:
                changer.create_avatar(avatar, [PORTRAIT], consent=CONSENT, replace=True)
            done = time.monotonic()
            assert stream.ended(2.0) == (code, details), (avatar, change)
            print(
                f"{change} of {avatar!r} on replica {1 if changer is one else 2}: the stream on replica 2 "
                f"ended {stream.ended_at - done:.3f} s after it returned, {stream.after(done)} frames later"
            )
            late = stream.after(done + 0.5)
            assert late == 0, f"{avatar}: {late} frames came later than 0.5 s after the {change} returned"
        assert replicas[1].app.streams.avatars() == [] and replicas[1].app.active_streams == 0
        # a stream of the new record is not ended by the replace that made it
        stream = Streaming(replicas[1].client(), "swapped", driver)
        stream.frames(10)
        stream.stop()
        assert stream.status == (grpc.StatusCode.OK, "")
    finally:
        for replica in replicas:
            replica.stop()


def test_a_delete_missed_while_the_store_cannot_be_read_still_ends_its_streams(
    model_repository: Path,
    tmp_path: Path,
    redis_url: str,
    driver: LandmarkSequence,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica whose connections to Redis went half-open missed a delete's event; once it had
    subscribed again, its one check of the open streams against the store timed out (the other
    connections were half-open too), and the stream rendered the deleted avatar to its end (20 s
    of a 20 s stream). After missed events a failed check is tried again while the avatar has
    streams: here the store fails twice, and the stream ends NOT_FOUND at the third try (tried
    again after 0.25 s and 0.5 s here, not 1 s and 2 s)."""
    monkeypatch.setattr(app_module, "CHECK_RETRY_S", (0.25, 1.25))
    replica = ServerThread(settings=test_settings(model_repository, tmp_path / "store", redis_url=redis_url))
    try:
        replica.wait_ready()
        client = replica.client()
        client.create_avatar("missed", [PORTRAIT], consent=CONSENT)
        stream = Streaming(replica.client(), "missed", driver)
        stream.frames(3)
        store, failures = replica.app.store, itertools.count()
        real_get = store.get

        def unreachable_twice(avatar_id: str) -> object:
            if next(failures) < 2:
                raise TimeoutError("Timeout reading from socket")
            return real_get(avatar_id)

        store.get = unreachable_twice
        redis = connect(redis_url)  # deleted behind the replica's back: no event comes
        redis.delete(keys.avatar("missed"))
        redis.zrem(keys.AVATARS, "missed")
        replica.loop.call_soon_threadsafe(replica.app.on_events_lost)
        assert stream.ended(10.0) == (grpc.StatusCode.NOT_FOUND, "avatar 'missed' was deleted")
        assert next(failures) >= 3, "the store was asked again after it failed"
    finally:
        replica.stop()


def _personalised_generator(repository: Path, avatar_id: str, version: int, stamp: str) -> None:
    """`generator_<avatar_id>` version `version`, stamped as fine-tuned on the record `stamp`
    (the template's weights: which record a generator is for is its stamp)."""
    template = contract.latest_version(repository / contract.GENERATOR)
    assert template is not None
    model = onnx.load(str(template.parent / "personalised-template.onnx"))
    meta = {p.key: p for p in model.metadata_props}
    meta[contract.Meta.AVATAR].value = avatar_id
    if contract.Meta.AVATAR_CREATED in meta:
        meta[contract.Meta.AVATAR_CREATED].value = stamp
    else:
        model.metadata_props.add(key=contract.Meta.AVATAR_CREATED, value=stamp)
    target = repository / f"generator_{avatar_id}" / str(version)
    target.mkdir(parents=True)
    onnx.save(model, str(target / ".model.onnx"))
    shutil.move(target / ".model.onnx", target / contract.MODEL_FILE)


def test_a_personalised_stream_never_switches_to_another_records_generator(
    model_repository: Path, tmp_path: Path, driver: LandmarkSequence
) -> None:
    """A stream opened on an avatar's personalised generator keeps it; when the generator is
    dropped (a `personalised` event: a new version was published) the latest version is opened
    again for its next frames - before, whatever record that version was fine-tuned on: a
    stream whose avatar had been replaced and personalised again rendered the new record's
    face. Now the generator must be the stream's record's (its stamp), else the stream ends
    UNAVAILABLE as for a withdrawn generator; new streams use the shared generator."""
    repository = copy_base_models(model_repository, tmp_path / "repo")
    settings = test_settings(repository, tmp_path / "store")
    running = ServerThread(settings=settings)
    try:
        running.wait_ready()
        c = running.client()
        c.create_avatar("tuned", [PORTRAIT], consent=CONSENT)
        record = LocalAvatarStore(root=settings.avatar_store).get("tuned")
        assert record is not None
        _personalised_generator(repository, "tuned", 1, contract.avatar_stamp(record.create_time))
        stream = Streaming(running.client(), "tuned", driver)
        stream.frames(3)
        assert stream.started is not None and stream.started.personalised
        errors = 'talkinghead_backend_errors_total{kind="unavailable",operation="generate"}'
        errors_before = running.metric(errors, 0.0)
        # version 2, made for another record of the id (one that replaced it: a replace this
        # replica missed, or whose stream-ending raced it), and the worker's event
        _personalised_generator(repository, "tuned", 2, contract.avatar_stamp(record.create_time + 60))
        LocalQueue(root=settings.jobs).publish("tuned", PERSONALISED)
        code, details = stream.ended(3.0)
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "personalised generator was withdrawn" in details
        # the avatar changed under the stream: no backend error (it tripped the backend's alerts)
        assert running.metric(errors, 0.0) == errors_before
        frames = list(
            c.animate(
                "tuned",
                landmark_requests(LandmarkSequence(driver.points[:2], driver.frame_size, driver.fps)),
                encoding="raw",
            )
        )
        assert len(frames) == 2 and c.last_started is not None and not c.last_started.personalised
    finally:
        running.stop()
