"""Whether the server's storage answers: `talkinghead_storage_up` and the per-service health.

With several replicas the avatars, the job queue and the audit log are in Redis; while it cannot be
reached every AvatarService, AnimationService and PersonalisationService call fails UNAVAILABLE
("the server's storage is unreachable"). `StorageWatch` probes it every PROBE_S (a Redis PING; the
avatar directory's stat without Redis), with PROBE_TIMEOUT_S to answer, on a thread of its own
(one probe at a time: a probe stuck on a silent connection does not pile up threads), and is told
at once by a call that found it unreachable (service/wire.py status_of). Up again only when a
probe answers. The server's health follows it (service/server.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("talkinghead.service.storage")
PROBE_S = 1.0
PROBE_TIMEOUT_S = 2.0


def probe_of(store: Any) -> Callable[[], None]:
    """A cheap check that `store` answers (raises when not): its `ping` (a Redis PING; a stat of
    the avatar directory), or nothing for a store without one."""
    ping: Callable[[], None] | None = getattr(store, "ping", None)
    return ping if ping is not None else (lambda: None)


class StorageWatch:
    def __init__(
        self, probe: Callable[[], None], on_change: Callable[[bool], None] = lambda up: None
    ) -> None:
        self.probe = probe
        self.on_change = on_change  # (the gauge)
        self.up = True
        self.since = time.monotonic()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="storage-probe")
        self._pending: asyncio.Future[None] | None = None

    def _set(self, up: bool, why: object = None) -> None:
        if up == self.up:
            return
        now = time.monotonic()
        if up:
            log.warning("the storage answers again after %.1f s", now - self.since)
        else:
            log.warning("the storage is unreachable (%s): its services are NOT_SERVING", why)
        self.up, self.since = up, now
        self.on_change(up)

    def failed(self, error: BaseException) -> None:
        """A call found the storage unreachable."""
        self._set(False, f"{type(error).__name__}: {error}")

    async def check(self) -> bool:
        """Probe once (at most one probe in flight); whether the storage answered."""
        loop = asyncio.get_running_loop()
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(loop.run_in_executor(self._pool, self.probe))
            self._pending.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            await asyncio.wait_for(asyncio.shield(self._pending), PROBE_TIMEOUT_S)
        except TimeoutError:
            self._set(False, f"no answer to a probe within {PROBE_TIMEOUT_S:g} s")
            return False
        except Exception as error:
            self._set(False, f"{type(error).__name__}: {error}")
            return False
        self._set(True)
        return True

    async def run(self) -> None:
        self.on_change(self.up)
        try:
            while True:
                await self.check()
                await asyncio.sleep(PROBE_S)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
