"""The log of refused credentials (service/auth.py's interceptor refuses, this says so): WARNING
lines that a flood cannot turn into a flood of lines. Counted by reason in
talkinghead_auth_failures_total as well (service/metrics.py)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.auth import Refused

log = logging.getLogger("talkinghead.service.auth")
REFUSAL_LOG_EVERY_S = 10.0  # at most one refusal line per peer address in this time (RefusalLog)
REFUSAL_LOG_MAX_LINES = 50  # and at most these many in all


def peer_address(peer: str) -> str:
    """A gRPC peer without its port (`ipv4:10.0.0.7:51234` -> `ipv4:10.0.0.7`): a flood from one
    machine comes from many ports."""
    kind, _, rest = peer.partition(":")
    address, colon, port = rest.rpartition(":")
    return f"{kind}:{address}" if kind in ("ipv4", "ipv6") and colon and port.isdigit() else peer


@dataclass
class _Peer:
    logged: float  # clock() of its last line
    unlogged: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> refusals since


class RefusalLog:
    """WARNING lines for refused credentials, so that a flood cannot fill the log: at most one line
    per peer address per `every_s` seconds, and at most `max_lines` lines in all per `every_s`.
    What is not logged is counted, and said (with the reasons) by the address's next line or by
    `flush()` (the key-ring task calls it every second) once its `every_s` is over. At most
    `max_peers` addresses are remembered; refusals from more at once are counted together."""

    def __init__(
        self,
        *,
        every_s: float = REFUSAL_LOG_EVERY_S,
        max_lines: int = REFUSAL_LOG_MAX_LINES,
        max_peers: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_s, self.max_lines, self.max_peers, self.clock = every_s, max_lines, max_peers, clock
        self._peers: dict[str, _Peer] = {}
        self._window = -math.inf  # clock() when the current window of max_lines began
        self._lines = 0  # lines in it
        self._others: dict[str, int] = {}  # reason -> refusals not logged for want of lines or room

    def record(self, error: Refused, peer: str, method: str) -> None:
        now = self.clock()
        address = peer_address(peer)
        seen = self._peers.get(address)
        if seen is not None and now - seen.logged < self.every_s:
            _count(seen.unlogged, error.reason)
            return
        if not self._line_available(now) or (seen is None and not self._room(now)):
            _count(self._others, error.reason)
            return
        unlogged = seen.unlogged if seen is not None else {}
        self._peers[address] = _Peer(logged=now)
        detail = f" ({error.detail})" if error.detail else ""
        log.warning(
            "refused %s from %s: %s%s: %s%s",
            method or "a call",
            peer,
            error.reason,
            detail,
            error.message,
            f"; and {_said(unlogged)} from {address} not logged since" if unlogged else "",
        )

    def flush(self) -> None:
        """Say what was not logged, of addresses whose `every_s` is over; forget quiet ones."""
        now = self.clock()
        for address, seen in list(self._peers.items()):
            if now - seen.logged < self.every_s:
                continue
            if seen.unlogged:
                log.warning(
                    "refused %s from %s in the last %.0f s", _said(seen.unlogged), address, now - seen.logged
                )
                self._peers[address] = _Peer(logged=now)
            else:
                del self._peers[address]
        if self._others and now - self._window >= self.every_s:
            log.warning(
                "refused %s from addresses over the log's limit, not logged one by one", _said(self._others)
            )
            self._others = {}

    def _line_available(self, now: float) -> bool:
        if now - self._window >= self.every_s:
            self._window, self._lines = now, 0
        self._lines += 1
        return self._lines <= self.max_lines

    def _room(self, now: float) -> bool:
        if len(self._peers) >= self.max_peers:
            self.flush()
        return len(self._peers) < self.max_peers


def _count(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1


def _said(counts: Mapping[str, int]) -> str:
    """{"unknown_key": 40, "missing": 2} -> "42 more call(s) (unknown_key 40, missing 2)"."""
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{sum(counts.values())} more call(s) ({reasons})"
