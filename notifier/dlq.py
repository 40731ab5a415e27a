"""Dead letters: deliveries that gave up, kept for `notifier dlq list` and `dlq replay`.

A dead letter keeps the outbox entry it came from, so a replay sends the same event
(same `webhook-id`, same body) with its attempts reset.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio

from notifier.keys import Keys
from notifier.models import Event, MalformedEvent, format_timestamp
from notifier.outbox import Fields, OutboxItem, read_entry, retry_payload
from notifier.queue import Work
from notifier.store import load_script

# Field names of a dead letter besides the outbox entry's own (r, p, t; a digest's d, b,
# m, c, t).
FIELD_ROUTE = "route"
FIELD_ENTRY = "entry"
FIELD_ATTEMPTS = "attempts"
FIELD_ERROR = "error"
_OWN_FIELDS = (FIELD_ROUTE, FIELD_ENTRY, FIELD_ATTEMPTS, FIELD_ERROR)
PAGE = 500
STREAM_ID = re.compile(r"\d+-\d+")


def dead_letter_fields(work: Work, attempts: int, error: str) -> dict[str, str]:
    """The dead-letter stream entry of `work` after `attempts` attempts that ended in `error`."""
    own = {
        FIELD_ROUTE: work.route,
        FIELD_ENTRY: work.entry_id,
        FIELD_ATTEMPTS: str(attempts),
        FIELD_ERROR: error,
    }
    return {**work.fields, **own}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter, as `dlq list` shows it."""

    id: str  # the dead-letter stream id, which `dlq replay` takes
    route: str
    entry_id: str
    fields: Fields  # the outbox entry
    attempts: int
    error: str

    @classmethod
    def from_entry(cls, dead_letter_id: str, fields: Mapping[str, str]) -> DeadLetter:
        """Read a dead-letter stream entry."""
        event = {name: value for name, value in fields.items() if name not in _OWN_FIELDS}
        return cls(
            id=dead_letter_id,
            route=fields.get(FIELD_ROUTE, ""),
            entry_id=fields.get(FIELD_ENTRY, ""),
            fields=event,
            attempts=int(fields.get(FIELD_ATTEMPTS) or 0),
            error=fields.get(FIELD_ERROR, ""),
        )

    @property
    def time(self) -> datetime:
        """When the delivery was dead-lettered (the stream id's milliseconds)."""
        return datetime.fromtimestamp(int(self.id.split("-")[0]) / 1000, tz=UTC)

    def as_json(self) -> dict[str, Any]:
        """The `dlq list` line: id, route, request id, status, attempts, last error, time."""
        try:
            event: OutboxItem | None = read_entry(self.fields)
        except MalformedEvent:
            event = None
        request = event.request if isinstance(event, Event) else None
        return {
            "id": self.id,
            "route": self.route,
            "request_id": request.id if request else None,
            "status": event.status if event else None,
            "attempts": self.attempts,
            "error": self.error,
            "time": format_timestamp(self.time),
            "event_id": event.id if event else None,
            "reference_id": event.reference_id if event else None,
            "type": event.type if event else None,
        }


@dataclass(frozen=True, slots=True)
class Replayed:
    """What `dlq replay` did."""

    replayed: list[DeadLetter]
    missing: list[str]  # ids asked for that are not dead letters (any more)
    unrouted: list[DeadLetter]  # dead letters of routes this configuration lacks: kept


class DeadLetters:
    """The dead-letter stream of one namespace."""

    def __init__(
        self, client: redis.asyncio.Redis, keys: Keys, clock: Callable[[], float] = time.time
    ) -> None:
        self.redis = client
        self.keys = keys
        self._clock = clock
        self._replay = load_script(client, "replay")

    async def all(self) -> AsyncIterator[DeadLetter]:
        """Every dead letter, oldest first, read a page at a time."""
        start = "-"
        while True:
            page = await self.redis.xrange(self.keys.dead_letters, start, "+", count=PAGE)
            for dead_letter_id, fields in page:
                yield DeadLetter.from_entry(dead_letter_id, fields)
            if len(page) < PAGE:
                return
            start = "(" + page[-1][0]

    async def get(self, dead_letter_id: str) -> DeadLetter | None:
        """One dead letter by id, or None."""
        if not STREAM_ID.fullmatch(dead_letter_id):
            return None  # XRANGE would take a bare "1774868470250" as a range of ids
        found = await self.redis.xrange(self.keys.dead_letters, dead_letter_id, dead_letter_id)
        return DeadLetter.from_entry(*found[0]) if found else None

    async def replay(self, ids: Sequence[str] | None, routes: Sequence[str]) -> Replayed:
        """Re-queue the dead letters `ids` (None: all) due now with attempts reset; each one
        leaves the dead letters in the same atomic step. Those of unknown routes stay."""
        if ids is None:
            chosen = [dead_letter async for dead_letter in self.all()]
            missing: list[str] = []
        else:
            found = {dead_letter_id: await self.get(dead_letter_id) for dead_letter_id in ids}
            chosen = [dead_letter for dead_letter in found.values() if dead_letter]
            missing = [dead_letter_id for dead_letter_id, d in found.items() if d is None]
        replayed, unrouted = [], []
        for dead_letter in chosen:
            if dead_letter.route not in routes:
                unrouted.append(dead_letter)
            elif await self._requeue(dead_letter):
                replayed.append(dead_letter)
            else:
                missing.append(dead_letter.id)  # replayed by someone else meanwhile
        return Replayed(replayed, missing, unrouted)

    async def _requeue(self, dead_letter: DeadLetter) -> bool:
        keys = [
            self.keys.dead_letters,
            self.keys.retries(dead_letter.route),
            self.keys.retry_events(dead_letter.route),
        ]
        args = [
            dead_letter.id,
            dead_letter.entry_id,
            round(self._clock() * 1000),
            retry_payload(dead_letter.fields, 0),
        ]
        return bool(await self._replay(keys=keys, args=args))
