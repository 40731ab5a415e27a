"""Slack pacing: at most one message per second per Slack webhook URL, across replicas.

Slack rate-limits incoming webhooks to about one message a second. The slot lives in
Redis, so replicas share it; the delivery workers take it before each Slack send.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis.asyncio

from notifier.keys import Keys
from notifier.store import load_script

SLACK_INTERVAL_S = 1.0


class SlackSlot:
    """The pacing slot of one Slack webhook URL (its key names a digest, never the URL)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: Keys,
        url: str,
        *,
        interval_s: float = SLACK_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._key = keys.slack_slot(url)
        self._interval_ms = round(interval_s * 1000)
        self._clock = clock
        self._take = load_script(client, "slot_take")
        self._defer = load_script(client, "slot_defer")

    async def take(self) -> float:
        """Claim the slot: 0 if a message may go now, else the seconds until it is free."""
        wait_ms = await self._take(keys=[self._key], args=[self._now_ms(), self._interval_ms])
        return int(wait_ms) / 1000

    async def free_in(self) -> float:
        """Seconds until the slot is free, without taking it (0 if free now)."""
        free_at = await self._client.get(self._key)
        return max(0, int(free_at or 0) - self._now_ms()) / 1000

    async def defer(self, seconds: float) -> float:
        """Hold the slot for `seconds` from now (Slack's Retry-After); the seconds it is held."""
        held_ms = await self._defer(keys=[self._key], args=[self._now_ms(), round(seconds * 1000)])
        return int(held_ms) / 1000

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)
