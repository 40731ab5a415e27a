"""The lease: one replica at a time polls and writes request state.

A key set with `SET NX PX` holds a random token; its holder renews it every third of
its TTL from a task of its own, and every write of the store checks the token, so a
poller that lost the lease (paused, partitioned) cannot write. When the holder dies,
the key expires and a standby replica takes over within one TTL.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import redis.asyncio
from redis.exceptions import RedisError

from notifier.backoff import sleep_unless
from notifier.keys import Keys
from notifier.outages import OutageLog
from notifier.store import load_script

log = logging.getLogger(__name__)

MIN_TTL_S = 10.0


def lease_ttl(poll_interval: float) -> float:
    """Seconds a lease lasts unrenewed: three poll intervals, and never under 10 s."""
    return max(3 * poll_interval, MIN_TTL_S)


class Lease:
    """This process's claim on the lease of one namespace."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: Keys,
        ttl_s: float,
        redis_outage: OutageLog | None = None,
    ) -> None:
        self.redis = client
        self.redis_outage = redis_outage or OutageLog("Redis")
        self.key = keys.lease
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.token = uuid.uuid4().hex
        self.held = False
        self._renew = load_script(client, "renew")
        self._release = load_script(client, "release")

    async def acquire(self) -> bool:
        """Take the lease if it is free (or renew it if already ours); True if held now."""
        if await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            self.held = True
        else:
            await self.renew()
        return self.held

    async def renew(self) -> bool:
        """Extend the lease if it is still ours; False (and `held` cleared) if it was lost."""
        self.held = bool(await self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))
        return self.held

    async def release(self) -> None:
        """Give the lease up so a standby takes over at once; a no-op if it is not ours."""
        self.held = False
        await self._release(keys=[self.key], args=[self.token])

    async def seconds_until_free(self) -> float:
        """How long the current holder's lease lasts unless renewed (0 if it is free)."""
        remaining_ms = await self.redis.pttl(self.key)
        if remaining_ms == -1:  # a key without expiry was not set by a notifier: retry later
            remaining_ms = self.ttl_ms
        return min(max(0, remaining_ms), self.ttl_ms) / 1000

    async def keep_renewed(self, stop: asyncio.Event) -> None:
        """Renew every third of the TTL until `stop` is set or the lease is lost."""
        while not stop.is_set():
            await sleep_unless(stop, self.ttl_ms / 3000)
            if stop.is_set():
                return
            try:
                if not await self.renew():
                    await self.say_who_holds_it()
                    return
            except (RedisError, OSError) as exc:
                # Keep the claim: the store refuses writes if the key expires meanwhile.
                self.redis_outage.failed(exc)
            else:
                self.redis_outage.recovered()

    async def say_who_holds_it(self) -> None:
        """Log why this process no longer holds the lease: another replica took it, or it
        lapsed while Redis was out of reach (then this process takes it again)."""
        try:
            holder = await self.redis.get(self.key)
        except (RedisError, OSError):
            holder = None
        if holder is None or holder == self.token:
            log.info("the polling lease lapsed while Redis was out of reach; taking it again")
        else:
            log.warning("another replica holds the polling lease now; standing by")
