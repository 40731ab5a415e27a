"""Slack pacing: one message a second per Slack webhook URL, shared by every replica.

Every test runs on fakeredis and on a real redis-server, with an injected clock and no
sleeps: the slot's times come from the caller's clock, never from Redis.
"""

from __future__ import annotations

import redis.asyncio

from notifier.keys import Keys
from notifier.pacing import SlackSlot

from conftest import FakeClock, RedisFactory

SLACK_URL = "https://hooks.slack.com/services/T0PACING/B0PACING/PacingSecretToken1234"
OTHER_URL = "https://hooks.slack.com/services/T0PACING/B0OTHER/OtherSecretToken5678"


def slot(client: redis.asyncio.Redis, clock: FakeClock, url: str = SLACK_URL) -> SlackSlot:
    return SlackSlot(client, Keys("t"), url, clock=clock)


async def test_the_first_take_goes_at_once(redis_client: redis.asyncio.Redis) -> None:
    assert await slot(redis_client, FakeClock()).take() == 0


async def test_a_second_take_within_the_interval_waits_for_the_rest_of_it(
    redis_client: redis.asyncio.Redis,
) -> None:
    clock = FakeClock()
    pacing = slot(redis_client, clock)
    assert await pacing.take() == 0
    clock.at(0.4)
    assert await pacing.take() == 0.6
    # A refused take does not hold the slot longer: the wait shrinks as time passes.
    clock.at(0.9)
    assert await pacing.take() == 0.1


async def test_the_slot_is_free_again_one_interval_after_a_take(
    redis_client: redis.asyncio.Redis,
) -> None:
    clock = FakeClock()
    pacing = slot(redis_client, clock)
    assert await pacing.take() == 0
    clock.at(1.0)
    assert await pacing.take() == 0
    # ... and that take holds it for the next interval.
    clock.at(1.5)
    assert await pacing.take() == 0.5


async def test_two_urls_are_paced_independently(redis_client: redis.asyncio.Redis) -> None:
    clock = FakeClock()
    first, second = slot(redis_client, clock), slot(redis_client, clock, OTHER_URL)
    assert await first.take() == 0
    assert await second.take() == 0
    clock.at(0.25)
    assert await first.take() == 0.75
    assert await second.take() == 0.75


async def test_two_replicas_share_the_slot_of_a_url(redis_factory: RedisFactory) -> None:
    # Two clients of one Redis, as two replicas would hold, each with its own SlackSlot.
    clock = FakeClock()
    replica_a, replica_b = slot(redis_factory(), clock), slot(redis_factory(), clock)
    assert await replica_a.take() == 0
    clock.at(0.3)
    assert await replica_b.take() == 0.7
    assert await replica_a.take() == 0.7
    clock.at(1.0)
    assert await replica_b.take() == 0
    clock.at(1.2)
    assert await replica_a.take() == 0.8


async def test_defer_holds_the_slot_for_the_retry_after(
    redis_client: redis.asyncio.Redis,
) -> None:
    clock = FakeClock()
    pacing = slot(redis_client, clock)
    assert await pacing.take() == 0
    assert await pacing.defer(30) == 30
    assert await pacing.take() == 30
    clock.at(29.5)
    assert await pacing.take() == 0.5
    clock.at(30.0)
    assert await pacing.take() == 0


async def test_defer_on_a_free_slot_holds_it(redis_client: redis.asyncio.Redis) -> None:
    clock = FakeClock()
    pacing = slot(redis_client, clock)
    assert await pacing.defer(2.5) == 2.5
    assert await pacing.take() == 2.5
    clock.at(2.5)
    assert await pacing.take() == 0


async def test_defer_never_shortens_a_longer_hold(redis_client: redis.asyncio.Redis) -> None:
    clock = FakeClock()
    pacing = slot(redis_client, clock)
    assert await pacing.defer(30) == 30
    clock.at(10)
    assert await pacing.defer(5) == 20  # the 30 s hold stays: 20 s of it are left
    assert await pacing.take() == 20
    # A shorter interval after a take does not shorten it either.
    clock.at(30)
    assert await pacing.take() == 0
    assert await pacing.defer(0.2) == 1.0
    assert await pacing.take() == 1.0


async def test_defer_seen_by_another_replica(redis_factory: RedisFactory) -> None:
    clock = FakeClock()
    replica_a, replica_b = slot(redis_factory(), clock), slot(redis_factory(), clock)
    await replica_a.defer(3)
    clock.at(1)
    assert await replica_b.take() == 2


async def test_the_key_names_a_digest_never_the_url(redis_client: redis.asyncio.Redis) -> None:
    clock = FakeClock()
    await slot(redis_client, clock).take()
    await slot(redis_client, clock, OTHER_URL).defer(5)
    keys = await redis_client.keys("*")
    assert len(keys) == 2
    for key in keys:
        assert key.startswith("{t}:")
        for secret in ("hooks.slack.com", "services", "PacingSecretToken", "OtherSecretToken"):
            assert secret not in key
    assert set(keys) == {Keys("t").slack_slot(SLACK_URL), Keys("t").slack_slot(OTHER_URL)}


async def test_the_slot_key_expires_on_its_own(redis_client: redis.asyncio.Redis) -> None:
    # The expiry only cleans up: it outlives the hold, with a margin, and is always set.
    clock = FakeClock()
    await slot(redis_client, clock).take()
    ttl_ms = await redis_client.pttl(Keys("t").slack_slot(SLACK_URL))
    assert 1_000 < ttl_ms <= 61_000
    await slot(redis_client, clock).defer(120)
    ttl_ms = await redis_client.pttl(Keys("t").slack_slot(SLACK_URL))
    assert 120_000 < ttl_ms <= 180_000
