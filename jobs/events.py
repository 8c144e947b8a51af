"""Avatar events: what every service replica must hear to keep its cache and models right.

    changed         the avatar was created or replaced: drop its cached record
    deleted         the avatar is gone: drop its record and its personalised model
    personalised    its generator_<id> is ready in every Triton: use it for new streams
    unpersonalised  its generator_<id> was unloaded and removed

On Redis they travel on the pub/sub channel jobs.keys.EVENTS; on one machine the local queue
appends them to `<jobs>/events.jsonl`, which the service follows. One JSON object per event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

CHANGED, DELETED, PERSONALISED, UNPERSONALISED = "changed", "deleted", "personalised", "unpersonalised"
EVENTS = (CHANGED, DELETED, PERSONALISED, UNPERSONALISED)


@dataclass(frozen=True, kw_only=True)
class Event:
    avatar_id: str
    event: str
    sent: float  # time.time() of the sender (latency is measured from it)

    def to_json(self) -> str:
        return json.dumps({"avatar_id": self.avatar_id, "event": self.event, "sent": self.sent})

    @classmethod
    def from_json(cls, text: str | bytes) -> Event | None:
        """None for anything malformed (a foreign publisher on the channel must not stop a replica)."""
        try:
            raw = json.loads(text)
            event = cls(avatar_id=str(raw["avatar_id"]), event=str(raw["event"]), sent=float(raw["sent"]))
        except (ValueError, KeyError, TypeError):
            return None
        return event if event.event in EVENTS else None
