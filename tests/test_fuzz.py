"""Fuzz every RPC against a real server on 127.0.0.1: no crash, no UNKNOWN or INTERNAL, at most one
log line per call and no traceback, and the server's memory back where it was afterwards.

Each method gets hypothesis-generated requests (tests/fuzzing.py: every field of the request
messages, with values that pass the first checks often enough to reach decoding, detection,
streams and the generator) and raw random or mutated payloads. The number of cases is
TALKINGHEAD_FUZZ_CASES (default 3000, about a minute on two busy cores); `make fuzz` runs
100,000 with a random seed (TALKINGHEAD_FUZZ_SEED; the default suite is derandomised, the same run
every time). The server is `talkinghead serve` in a child process (tests/service_process.py):
its RSS is its own, read after a full collection that its launcher runs on SIGUSR1 (a hook of the
test harness, not an RPC), first after a warm-up that takes every path to its working memory
(ONNX Runtime's arenas grow with the largest batch, the detector loads, caches fill), then at the
end. TALKINGHEAD_FUZZ_DETAILS=1 also prints the commonest statuses and messages: where cases stop.
"""

from __future__ import annotations

import collections
import os
import random
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, seed, settings

from tests import fuzzing
from tests.fuzzing import BAD, KEEP, METHODS, Method
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, PORTRAIT, metric_sum
from tests.service_process import ServerProcess

CASES = int(os.environ.get("TALKINGHEAD_FUZZ_CASES", "3000"))
SEED = os.environ.get("TALKINGHEAD_FUZZ_SEED", "")
DETAILS = bool(os.environ.get("TALKINGHEAD_FUZZ_DETAILS"))  # print the commonest statuses and messages
RAW_SHARE = 0.4  # of CASES: raw payloads spread over every method; the rest hypothesis messages
# Relative share of each method's hypothesis cases (the expensive ones - images, streams - less).
WEIGHTS = {"CreateAvatar": 2, "Animate": 3, "PersonaliseAvatar": 1, "WatchOperation": 1}
RSS_SLACK = 0.05
WARM_UP = 30  # cases per method before the memory baseline
MAX_BATCH = 4  # the fuzz server's: the warm-up reaches it (ONNX Runtime's arena grows with it)
CALL_TIMEOUT_S = 60.0
LOG_LINES_AT_START = 20  # the settings, the unset watermark key, ...


def _examples(method: Method) -> int:
    weights = {m.name: WEIGHTS.get(m.name, 1) for m in METHODS}
    share = (1 - RAW_SHARE) * CASES * weights[method.name] / sum(weights.values())
    return max(10, round(share))


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not SEED,
        suppress_health_check=list(HealthCheck),
    )


class Fuzz:
    """The fuzz server, a raw channel to it, and what the calls ended with."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.baseline = 0  # RSS after the warm-up
        self.channel = grpc.insecure_channel(
            server.address,
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        )
        self.codes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.details: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.failures: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
        self.cases = 0
        self.slowest = (0.0, "")

    def send(self, method: Method, payloads: list[bytes]) -> str:
        t0 = time.perf_counter()
        code, details = fuzzing.call(self.channel, method, payloads, timeout=CALL_TIMEOUT_S)
        if DETAILS:
            self.details[(method.name, code, re.sub(r"[0-9]+", "N", details)[:70])] += 1
        took = time.perf_counter() - t0
        if took > self.slowest[0]:
            self.slowest = (took, f"{method.name}: {fuzzing.describe(payloads, method, 200)}")
        self.cases += 1
        self.codes[(method.name, code)] += 1
        if code in BAD:
            examples = self.failures[(method.name, code)]
            if len(examples) < 5:
                examples.append(fuzzing.describe(payloads, method))
        return code

    def hypothesis(self, method: Method, examples: int) -> None:
        """`examples` hypothesis-generated calls of `method`."""

        @_settings(examples)
        @given(messages=fuzzing.requests(method))
        def run(messages: list[Message]) -> None:
            self.send(method, [m.SerializeToString() for m in messages])

        (seed(int(SEED))(run) if SEED else run)()

    def begin(self) -> None:
        """A test's cases start: its failures only, and the avatars they need are there (a raw
        payload may well have deleted one: mutated bytes can spell a DeleteAvatarRequest)."""
        self.failures.clear()
        self.restore()

    def restore(self) -> None:
        for avatar_id in KEEP:
            try:
                self.server.client.get_avatar(avatar_id)
            except grpc.RpcError:
                self.server.client.create_avatar(avatar_id, [PORTRAIT], consent=CONSENT, replace=True)

    def check(self) -> None:
        """Fail listing the server faults (status, count, up to five cases) since begin()."""
        bad = self.failures
        if bad:
            lines = [
                f"{name} -> {code} x{self.codes[(name, code)]}:\n    " + "\n    ".join(examples)
                for (name, code), examples in sorted(bad.items())
            ]
            pytest.fail("calls ended with a status that means a server fault:\n" + "\n".join(lines))

    def summary(self) -> str:
        by_code: collections.Counter[str] = collections.Counter()
        for (_, code), n in self.codes.items():
            by_code[code] += n
        per_method = "; ".join(
            f"{name}: " + " ".join(f"{c}={n}" for (m, c), n in sorted(self.codes.items()) if m == name)
            for name in sorted({m for m, _ in self.codes})
        )
        return (
            f"{self.cases} cases: "
            + ", ".join(f"{c} {n}" for c, n in by_code.most_common())
            + f"\n  {per_method}"
        )


@pytest.fixture(scope="module")
def fuzz(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    server = ServerProcess(
        repository=model_repository,
        root=tmp_path_factory.mktemp("fuzz"),
        env={
            "TALKINGHEAD_CACHE_BYTES": str(4 << 20),
            "TALKINGHEAD_MAX_BATCH": str(MAX_BATCH),
            "TALKINGHEAD_LOG_LEVEL": "WARNING",
        },
        args=("--max-image-bytes", str(2 << 20)),
    )
    try:
        harness = Fuzz(server)
        harness.restore()
        yield harness
        seeded = f"seed {SEED}" if SEED else "derandomised"
        log = server.log.read_text(errors="replace")
        print(f"\nfuzz ({seeded}): {harness.summary()}")
        print(f"fuzz: server log {len(log.splitlines())} lines, {len(log)} bytes")
        if DETAILS:  # where the cases stop, most common first
            for (name, code, details), n in harness.details.most_common(60):
                print(f"  {n:6d} {name} {code} {details}")
        print(f"fuzz: slowest case {harness.slowest[0]:.2f} s: {harness.slowest[1][:300]}")
        harness.channel.close()
    finally:
        server.stop()


def test_warm_up(fuzz: Fuzz) -> None:
    """A short fuzz of every method first (the models' arenas, the detector, the encoders and the
    caches reach their working size), then the memory baseline is taken."""
    rng = random.Random(1)
    animate = next(m for m in METHODS if m.name == "Animate")
    fuzz.begin()
    create = next(m for m in METHODS if m.name == "CreateAvatar")
    for call in fuzzing.warm_up_streams():
        assert fuzz.send(animate, call) in ("OK", "FAILED_PRECONDITION")  # a driving frame without a face
    for request in fuzzing.warm_up_creates(MAX_BATCH):
        assert fuzz.send(create, [request]) == "OK"
    for method in METHODS:
        for _ in range(WARM_UP):
            fuzz.send(method, fuzzing.raw_call(rng, method))
        fuzz.hypothesis(method, WARM_UP)
    fuzz.baseline = fuzz.server.collect()
    print(f"\nfuzz: RSS {fuzz.baseline / 2**20:.0f} MiB after the warm-up")
    fuzz.check()


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_hypothesis_requests(fuzz: Fuzz, method: Method) -> None:
    fuzz.begin()
    fuzz.hypothesis(method, _examples(method))
    if DETAILS:
        print(f" {method.name}: RSS {fuzz.server.collect() / 2**20:.0f} MiB", end="")
    fuzz.check()


def test_raw_payloads(fuzz: Fuzz) -> None:
    rng = random.Random(int(SEED) if SEED else 0)
    total = round(RAW_SHARE * CASES)
    fuzz.begin()
    for i in range(total):
        method = METHODS[i % len(METHODS)]
        fuzz.send(method, fuzzing.raw_call(rng, method))
    fuzz.check()


def test_server_is_whole_afterwards(fuzz: Fuzz) -> None:
    """Still alive and serving, no stream slot leaked, the log short and free of tracebacks, its
    memory back where it was after the warm-up."""
    server = fuzz.server
    assert server.alive, f"the server died: {server.log.read_text(errors='replace')[-3000:]}"
    fuzz.restore()
    assert server.client.health() == "SERVING"
    assert len(list(server.client.animate(KEEP[0], fuzzing.driver_requests(3)))) == 3
    deadline = time.monotonic() + 10
    while _metric(server, "talkinghead_active_streams") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server, "talkinghead_active_streams") == 0
    rss = server.collect()
    print(f"\nfuzz: RSS {fuzz.baseline / 2**20:.0f} MiB after the warm-up, {rss / 2**20:.0f} MiB at the end")
    assert rss <= fuzz.baseline * (1 + RSS_SLACK), (
        f"RSS {rss / 2**20:.0f} MiB after {fuzz.cases} cases, {fuzz.baseline / 2**20:.0f} MiB before: kept"
    )
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 300 :][:3000]
    assert len(log.splitlines()) <= fuzz.cases + LOG_LINES_AT_START, f"{len(log.splitlines())} log lines"


def _metric(server: ServerProcess, name: str) -> float:
    """The sum of every series of metric `name`."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return metric_sum(response.read().decode(), name)


def test_every_method_is_fuzzed() -> None:
    assert {m.name for m in METHODS} == {
        "CreateAvatar",
        "GetAvatar",
        "ListAvatars",
        "DeleteAvatar",
        "Animate",
        "PersonaliseAvatar",
        "GetOperation",
        "ListOperations",
        "WatchOperation",
        "CancelOperation",
        "Check",
        "Watch",
    }
