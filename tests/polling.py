"""Helpers of the poll-cycle tests: settings against the simulator, a poller holding the
lease, and the transitions a cycle queued or should have queued."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio

from notifier import tasks
from notifier.api import ApiClient
from notifier.config import Settings, load_settings
from notifier.digest import Digest
from notifier.metrics import Metrics
from notifier.models import Event
from notifier.outbox import OutboxItem, read_entry
from notifier.poller import Poller
from notifier.simulator import Simulator

from samples import SIMULATOR_KEY

NOTIFY_ON = ("completed", "failed")


def make_settings(api_url: str, **flags: Any) -> Settings:
    return load_settings(
        {
            "api_url": api_url,
            "api_key": SIMULATOR_KEY,
            "webhook_url": "http://127.0.0.1:9/hook",
            "page_size": 20,
            "poll_interval": 0.1,
            **flags,
        }
    )


@contextlib.asynccontextmanager
async def poller_of(
    settings: Settings,
    client: redis.asyncio.Redis,
    *,
    hold: bool = True,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Poller]:
    """A poller with its own API session (and `clock` for detection and settling times);
    holding the lease unless told otherwise, and renewing it as `notifier run` does (a
    test's cycles may outlast a short test TTL)."""
    async with ApiClient(settings, metrics) as api:
        poller = Poller(settings, client, api, clock=clock, rng=random.Random(7))
        if not hold:
            yield poller
            return
        assert await poller.lease.acquire()
        async with tasks.running(poller.lease.keep_renewed):
            yield poller


@contextlib.asynccontextmanager
async def running(poller: Poller) -> AsyncIterator[asyncio.Task[None]]:
    """`poller.run()` in the background, stopped (and its error raised) on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(poller.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


async def outbox(poller: Poller) -> list[Event]:
    """The per-request events in the outbox (batch digests aside)."""
    return [item for item in await _entries(poller) if isinstance(item, Event)]


async def digests(poller: Poller) -> list[Digest]:
    """The batch digests in the outbox, oldest first."""
    return [item for item in await _entries(poller) if isinstance(item, Digest)]


async def _entries(poller: Poller) -> list[OutboxItem]:
    entries = await poller.store.redis.xrange(poller.store.keys.outbox)
    return [read_entry(fields) for _, fields in entries]


def transitions(events: list[Event]) -> Counter[tuple[str, str, str | None]]:
    return Counter((e.request.id, e.status, e.previous_status) for e in events)


def statuses(simulator: Simulator) -> dict[str, str]:
    return {request.id: request.status for request in simulator.requests.values()}


def expected_transitions(
    before: dict[str, str], after: dict[str, str]
) -> Counter[tuple[str, str, str | None]]:
    """What one cycle should queue: each entry into a notify_on status since `before`."""
    return Counter(
        (request_id, status, before.get(request_id))
        for request_id, status in after.items()
        if status in NOTIFY_ON and before.get(request_id) != status
    )
