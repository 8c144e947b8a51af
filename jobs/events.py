"""Avatar events: what every service replica must hear to keep its cache and models right.

    changed         the avatar was created or replaced: drop its cached record
    deleted         the avatar is gone: drop its record and its personalised model
    personalised    its generator_<id> is ready in every Triton: use it for new streams
    unpersonalised  its generator_<id> was unloaded and removed

On Redis they travel on the pub/sub channel jobs.keys.EVENTS; on one machine the local queue
appends them to `<jobs>/events.jsonl`, which the service follows. One JSON object per event.
A message that is not an event - malformed, of an unknown kind, or naming an id outside the
stored-id alphabet (facekit.ids) - is skipped (`from_json` gives None) and logged, at most once
a minute with the count of those skipped since.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from facekit.ids import shown, validate_stored_id

log = logging.getLogger("talkinghead.jobs.events")

CHANGED, DELETED, PERSONALISED, UNPERSONALISED = "changed", "deleted", "personalised", "unpersonalised"
EVENTS = (CHANGED, DELETED, PERSONALISED, UNPERSONALISED)


class RateLimited:
    """A warning at most every `every_s` seconds; the ones held back meanwhile are counted in the next."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0) -> None:
        self.logger, self.every_s = logger, every_s
        self._last = -float("inf")
        self._held = 0

    def warning(self, message: str, *args: object, exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        more = f" ({held} more since the last such warning)" if held else ""
        self.logger.warning(message + more, *args, exc_info=exc_info)


_skipped = RateLimited(log)


@dataclass(frozen=True, kw_only=True)
class Event:
    avatar_id: str
    event: str
    sent: float  # time.time() of the sender (latency is measured from it)

    def to_json(self) -> str:
        return json.dumps({"avatar_id": self.avatar_id, "event": self.event, "sent": self.sent})

    @classmethod
    def from_json(cls, text: str | bytes) -> Event | None:
        """None for anything but an event of a valid stored avatar id (a foreign publisher on the
        channel, a damaged line of events.jsonl, must not stop a replica nor empty its cache)."""
        try:
            raw = json.loads(text)
            event = cls(avatar_id=str(raw["avatar_id"]), event=str(raw["event"]), sent=float(raw["sent"]))
            if event.event not in EVENTS:
                raise ValueError(f"unknown event {shown(event.event)}")
            validate_stored_id(event.avatar_id)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            _skipped.warning("skipped an avatar event that is not one (%s): %s", error, shown(text))
            return None
        return event
