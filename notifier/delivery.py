"""Delivery in one process: a worker per route, their heartbeat and their upkeep.

One worker per route (`worker.py`), so a slow or dead endpoint only ever holds its own
route's slots. The process proves it is alive with a heartbeat; its upkeep takes over
the deliveries of processes whose heartbeat is gone and trims the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import redis.asyncio
from redis.exceptions import RedisError

from notifier.backoff import full_jitter, sleep_unless
from notifier.config import Settings
from notifier.keys import Keys
from notifier.metrics import Metrics
from notifier.outages import OutageLog
from notifier.pacing import SlackSlot
from notifier.queue import Backlog, Outbox, RouteQueue
from notifier.render import Renderer
from notifier.retry import RetryPolicy
from notifier.sinks import Sink
from notifier.tasks import running
from notifier.worker import REDIS_BACKOFF, RouteWorker, Tally

log = logging.getLogger(__name__)

# A worker's heartbeat lasts this long unrenewed; its pending deliveries are taken over
# once it is gone, so a killed process's work moves on within about this long.
HEARTBEAT_TTL_S = 5.0
# How often each process looks for stopped workers, and trims the outbox.
MAINTENANCE_S = 1.0
TRIM_EVERY_S = 60.0


def consumer_name() -> str:
    """A consumer name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def sink_session() -> aiohttp.ClientSession:
    """The HTTP session of the sinks: no connection limit of its own, since each route
    bounds its sends in flight, and one route must not wait for another's connections."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


class Heartbeat:
    """This process's proof of life: while it lasts, no one takes its pending deliveries."""

    def __init__(
        self, client: redis.asyncio.Redis, keys: Keys, consumer: str, redis_outage: OutageLog
    ) -> None:
        self.redis = client
        self.key = keys.heartbeat(consumer)
        self._redis_outage = redis_outage
        self.beating = asyncio.Event()  # set once a beat reached Redis: workers may read

    async def beat(self) -> None:
        """Set (or set again, if it lapsed) the heartbeat for one TTL."""
        await self.redis.set(self.key, "1", px=round(HEARTBEAT_TTL_S * 1000))
        self.beating.set()

    async def keep(self, stop: asyncio.Event) -> None:
        """Beat now and every third of the TTL until `stop` is set; failures are logged once
        per outage, for the whole process."""
        while not stop.is_set():
            try:
                await self.beat()
            except (RedisError, OSError) as exc:
                self._redis_outage.failed(exc)
            else:
                self._redis_outage.recovered()
            await sleep_unless(stop, HEARTBEAT_TTL_S / 3)

    async def end(self) -> None:
        """Stop proving life: the process has nothing pending any more."""
        await self.redis.delete(self.key)


class Delivery:
    """Every route's worker in this process, their heartbeat and their upkeep."""

    def __init__(
        self,
        settings: Settings,
        client: redis.asyncio.Redis,
        session: aiohttp.ClientSession,
        *,
        consumer: str | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        redis_outage: OutageLog | None = None,
    ) -> None:
        self.consumer = consumer or consumer_name()
        self.redis_outage = redis_outage = redis_outage or OutageLog("Redis")
        self.tally = Tally()
        self.metrics = metrics = metrics or Metrics()
        keys = Keys(settings.key_prefix)
        rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.heartbeat = Heartbeat(client, keys, self.consumer, redis_outage)
        self.outbox = Outbox(client, keys, clock)
        renderer, policy = Renderer(settings), RetryPolicy(settings, rng)
        self.workers = [
            RouteWorker(
                route,
                RouteQueue(client, keys, route.name, self.consumer, clock),
                renderer=renderer,
                sink=Sink(route, session, settings.delivery_timeout, clock),
                policy=policy,
                tally=self.tally,
                slot=SlackSlot(client, keys, route.url.get_secret_value(), clock=clock)
                if route.type == "slack"
                else None,
                delivery_timeout=settings.delivery_timeout,
                rng=rng,
                metrics=metrics,
                redis_outage=redis_outage,
            )
            for route in settings.routes
        ]
        self._routes = [route.name for route in settings.routes]
        self._rng = rng

    async def run(self, stop: asyncio.Event, cancel: asyncio.Event | None = None) -> None:
        """Deliver until `stop` is set; sends in flight then finish before it returns, or,
        once `cancel` is set, are cancelled and handed back, due now."""
        async with running(self.heartbeat.keep), running(self._keep_up):
            # Nothing is read before the heartbeat exists: other replicas would take it.
            await _first(self.heartbeat.beating.wait(), stop.wait())
            await asyncio.gather(*(worker.run(stop, cancel) for worker in self.workers))
        # Anything still pending here (an outcome Redis refused) is taken over at once.
        with contextlib.suppress(RedisError, OSError):
            await self.heartbeat.end()

    async def deliver_due(self) -> Tally:
        """One pass: deliver everything due now on every route, then return the outcomes."""
        await self.heartbeat.beat()
        async with running(self.heartbeat.keep):
            await self.maintain(trim=True)
            await asyncio.gather(*(worker.drain() for worker in self.workers))
        await self.heartbeat.end()
        return self.tally

    async def backlog(self) -> Backlog:
        """Retries, pending and unread deliveries of every configured route, summed."""
        parts = [await worker.queue.backlog() for worker in self.workers]
        return Backlog(
            retries=sum(part.retries for part in parts),
            pending=sum(part.pending for part in parts),
            unread=sum(part.unread for part in parts),
        )

    async def maintain(self, *, trim: bool) -> None:
        """Find stopped workers' deliveries; with `trim`, also record the routes served
        and trim the outbox."""
        for worker in self.workers:
            await worker.queue.find_orphans()
        if trim:
            await self.outbox.mark_served(self._routes)
            deleted = await self.outbox.trim(self._routes)
            if deleted:
                log.debug("trimmed %d delivered entries from the outbox", deleted)

    async def _keep_up(self, stop: asyncio.Event) -> None:
        next_trim, failures = 0.0, 0
        while not stop.is_set():
            trim = time.monotonic() >= next_trim
            try:
                await self.maintain(trim=trim)
            except (RedisError, OSError) as exc:
                self.redis_outage.failed(exc)
                await sleep_unless(stop, full_jitter(failures, *REDIS_BACKOFF, self._rng))
                failures += 1
                continue
            self.redis_outage.recovered()
            failures = 0
            if trim:
                next_trim = time.monotonic() + TRIM_EVERY_S
            await sleep_unless(stop, MAINTENANCE_S)


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of `waits` is done; cancel the others."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
