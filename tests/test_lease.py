"""The lease: one poller at a time, renewed by its holder, taken over when it dies."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio

from notifier.keys import Keys
from notifier.lease import Lease, lease_ttl
from notifier.tasks import running

KEYS = Keys("notifier")
TTL = 0.4


@pytest.mark.parametrize(
    ("poll_interval", "ttl"), [(0.1, 10.0), (3.0, 10.0), (3.5, 10.5), (15.0, 45.0)]
)
def test_the_ttl_is_three_poll_intervals_and_at_least_ten_seconds(
    poll_interval: float, ttl: float
) -> None:
    assert lease_ttl(poll_interval) == ttl


async def test_only_one_lease_holder_at_a_time(redis_client: redis.asyncio.Redis) -> None:
    first, second = Lease(redis_client, KEYS, TTL), Lease(redis_client, KEYS, TTL)
    assert await first.acquire()
    assert not await second.acquire()
    assert await first.acquire()  # acquiring again while holding it renews it
    assert await redis_client.get(KEYS.lease) == first.token
    assert 0 < await redis_client.pttl(KEYS.lease) <= TTL * 1000


async def test_a_released_lease_is_free_at_once(redis_client: redis.asyncio.Redis) -> None:
    first, second = Lease(redis_client, KEYS, TTL), Lease(redis_client, KEYS, 10)
    await first.acquire()
    await first.release()
    assert not first.held
    assert await second.acquire()
    await first.release()  # not its lease any more: a no-op
    assert await redis_client.get(KEYS.lease) == second.token


async def test_renewing_a_lost_lease_says_so(redis_client: redis.asyncio.Redis) -> None:
    lease = Lease(redis_client, KEYS, TTL)
    await lease.acquire()
    await redis_client.set(KEYS.lease, "someone-else")
    assert not await lease.renew()
    assert not lease.held
    assert await redis_client.get(KEYS.lease) == "someone-else"


async def test_a_renewed_lease_outlives_its_ttl(redis_client: redis.asyncio.Redis) -> None:
    lease, standby = Lease(redis_client, KEYS, TTL), Lease(redis_client, KEYS, TTL)
    await lease.acquire()
    async with running(lease.keep_renewed):
        await asyncio.sleep(TTL * 3)
        assert not await standby.acquire()
        assert lease.held


async def test_the_renewal_task_ends_when_the_lease_is_lost(
    redis_client: redis.asyncio.Redis,
) -> None:
    lease = Lease(redis_client, KEYS, TTL)
    await lease.acquire()
    await redis_client.set(KEYS.lease, "someone-else")
    await asyncio.wait_for(lease.keep_renewed(asyncio.Event()), timeout=TTL * 2)
    assert not lease.held


async def test_the_renewal_task_ends_soon_after_it_is_told_to_stop(
    redis_client: redis.asyncio.Redis,
) -> None:
    lease = Lease(redis_client, KEYS, TTL)
    await lease.acquire()
    stop = asyncio.Event()
    renewer = asyncio.create_task(lease.keep_renewed(stop))
    await asyncio.sleep(TTL)  # it has renewed at least once
    stop.set()
    await asyncio.wait_for(renewer, timeout=0.1)
    assert lease.held  # stopping renewal is not giving the lease up


async def test_a_standby_takes_over_within_one_ttl_when_the_holder_dies(
    redis_client: redis.asyncio.Redis,
) -> None:
    dead = Lease(redis_client, KEYS, TTL)
    await dead.acquire()
    died = time.monotonic()  # it never renews again
    standby = Lease(redis_client, KEYS, TTL)
    while not await standby.acquire():
        await asyncio.sleep(await standby.seconds_until_free() + 0.01)
    assert time.monotonic() - died <= TTL + 0.2


async def test_seconds_until_free(redis_client: redis.asyncio.Redis) -> None:
    lease = Lease(redis_client, KEYS, TTL)
    assert await lease.seconds_until_free() == 0
    await Lease(redis_client, KEYS, TTL).acquire()
    assert 0 < await lease.seconds_until_free() <= TTL
    await redis_client.set(KEYS.lease, "no-expiry")  # not set by a notifier
    assert await lease.seconds_until_free() == TTL
