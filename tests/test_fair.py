"""service/fair.py: callers take turns on the detect thread; a backlog delays only its own caller."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from service.errors import ServiceError
from service.fair import FairExecutor

JOB_S = 0.02


def recorder(order: list[str]) -> Callable[[str], str]:
    def job(name: str) -> str:
        time.sleep(JOB_S)
        order.append(name)
        return name

    return job


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_callers_job_waits_for_one_job_of_each_other_caller_not_their_backlog() -> None:
    async def main() -> tuple[list[str], int, float, float]:
        order: list[str] = []
        job = recorder(order)
        with ThreadPoolExecutor(1) as pool:
            fair = FairExecutor(pool=pool, max_queued=100)
            backlog = [asyncio.create_task(fair.run("bulk", job, f"bulk{i}")) for i in range(50)]
            await asyncio.sleep(JOB_S / 2)  # bulk0 is running (more may have ended on a loaded host)
            t0, done = time.monotonic(), len(order)
            assert await fair.run("small", job, "small") == "small"
            waited = time.monotonic() - t0
            await asyncio.gather(*backlog)
            return order, done, waited, time.monotonic() - t0

    order, done, waited, everything = run(main())  # type: ignore[misc]
    # after the jobs already ended, the running one and at most one more
    assert order.index("small") <= done + 2, (done, order[:5])
    assert waited < everything / 5, (waited, everything)


def test_callers_are_served_in_turn() -> None:
    async def main() -> list[str]:
        order: list[str] = []
        job = recorder(order)
        with ThreadPoolExecutor(1) as pool:
            fair = FairExecutor(pool=pool, max_queued=100)
            tasks = [
                asyncio.create_task(fair.run(caller, job, f"{caller}{i}"))
                for caller in "abc"
                for i in range(3)
            ]
            await asyncio.gather(*tasks)
        return order

    # a0 starts at once and a goes to the back of the turns before b and c queue
    assert run(main()) == ["a0", "a1", "b0", "c0", "a2", "b1", "c1", "b2", "c2"]


def test_a_caller_may_queue_only_so_much() -> None:
    async def main() -> ServiceError:
        release = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            fair = FairExecutor(pool=pool, max_queued=2)
            running = asyncio.create_task(fair.run("greedy", release.wait, 10))
            await asyncio.sleep(0.01)
            queued = [asyncio.create_task(fair.run("greedy", time.sleep, 0)) for _ in range(2)]
            await asyncio.sleep(0.01)
            assert fair.queued("greedy") == 2
            with pytest.raises(ServiceError) as refused:
                await fair.run("greedy", time.sleep, 0)
            other = asyncio.create_task(fair.run("other", len, "ok"))  # another caller is not refused
            release.set()
            await asyncio.gather(running, *queued)
            assert await other == 2
        return refused.value

    error = run(main())
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert "2 requests of this caller are already waiting" in error.message  # type: ignore[attr-defined]


def test_a_cancelled_waiter_drops_its_job() -> None:
    async def main() -> list[str]:
        order: list[str] = []
        job = recorder(order)
        with ThreadPoolExecutor(1) as pool:
            fair = FairExecutor(pool=pool, max_queued=10)
            first = asyncio.create_task(fair.run("a", job, "first"))
            gone = asyncio.create_task(fair.run("a", job, "gone"))
            await asyncio.sleep(0)
            gone.cancel()
            await first
            await fair.run("a", job, "last")
        return order

    assert run(main()) == ["first", "last"]


def test_a_failed_job_keeps_nothing_alive_without_the_cycle_collector() -> None:
    class Photo:  # stands for a decoded photo in the failing job's frame
        pass

    refs: list[weakref.ref[Photo]] = []

    def failing() -> None:
        photo = Photo()
        refs.append(weakref.ref(photo))
        raise ValueError("no face")

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            fair = FairExecutor(pool=pool, max_queued=10)
            with pytest.raises(ValueError, match="no face"):
                await fair.run("a", failing)

    gc.disable()
    try:
        run(main())
        assert refs and refs[0]() is None, "the failed job's frame outlived it"
    finally:
        gc.enable()


def test_close_cancels_what_has_not_started() -> None:
    async def main() -> bool:
        release = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            fair = FairExecutor(pool=pool, max_queued=10)
            running = asyncio.create_task(fair.run("a", release.wait, 10))
            waiting = asyncio.create_task(fair.run("b", time.sleep, 0))
            await asyncio.sleep(0.01)
            fair.close()
            release.set()
            await running
            try:
                await waiting
            except asyncio.CancelledError:
                return True
        return False

    assert run(main())
