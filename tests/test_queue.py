"""The delivery queue: the outbox read through one consumer group per route, each route's
retry set, taking over stopped workers' deliveries, and trimming the outbox.

Every test runs on fakeredis and on a real redis-server, with an injected clock and no
sleeps: retry scores and the routes' last-served times come from the caller's clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
import redis.asyncio
from redis.exceptions import ResponseError

from notifier.dlq import DeadLetter, DeadLetters, dead_letter_fields
from notifier.keys import Keys
from notifier.queue import (
    REMOVED_ROUTE_GRACE_S,
    ROUTE_SEEN_WINDOW_S,
    Backlog,
    Outbox,
    RouteQueue,
    Work,
)

from conftest import FakeClock
from samples import DETECTED_MS

KEYS = Keys("t")
ROUTE = "webhook"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def entry(n: int) -> dict[str, str]:
    """The fields of an outbox entry; the queue never reads them."""
    return {"r": f'{{"id":"request-{n}"}}', "p": "p", "t": str(DETECTED_MS + n)}


async def outbox(
    client: redis.asyncio.Redis, count: int, *, routes: tuple[str, ...] = (ROUTE,)
) -> list[str]:
    """An outbox with a group per route, all starting at the beginning, and `count`
    entries; returns their ids."""
    for route in routes:
        await client.xgroup_create(KEYS.outbox, route, "0", mkstream=True)
    return [await client.xadd(KEYS.outbox, entry(n)) for n in range(count)]


def route_queue(
    client: redis.asyncio.Redis, clock: FakeClock, *, route: str = ROUTE, consumer: str = "A"
) -> RouteQueue:
    return RouteQueue(client, KEYS, route, consumer, clock=clock)


async def scheduled(queue: RouteQueue, *dues: float, attempts: int = 1) -> list[Work]:
    """Read one new entry per due, and schedule each as a retry due that many seconds from
    now; returns the outbox works, in order."""
    works = await queue.take_new(len(dues))
    assert len(works) == len(dues)
    for work, due in zip(works, dues, strict=True):
        assert await queue.resolve(work, "retry", due_s=due, attempts=attempts)
    return works


async def pending_ids(client: redis.asyncio.Redis, route: str, consumer: str) -> list[str]:
    pending = await client.xpending_range(
        KEYS.outbox, route, min="-", max="+", count=100, consumername=consumer
    )
    return [item["message_id"] for item in pending]


async def consumers(client: redis.asyncio.Redis, route: str = ROUTE) -> dict[str, int]:
    """The consumers of a route's group -> how many entries each holds."""
    return {c["name"]: c["pending"] for c in await client.xinfo_consumers(KEYS.outbox, route)}


async def outbox_ids(client: redis.asyncio.Redis) -> list[str]:
    return [entry_id for entry_id, _ in await client.xrange(KEYS.outbox)]


async def resolve_all(queue: RouteQueue, count: int) -> None:
    """Read `count` new entries of the queue's route and resolve each as delivered."""
    works = await queue.take_new(count)
    assert len(works) == count
    for work in works:
        assert await queue.resolve(work, "done")


# Reading new entries.


async def test_take_new_reads_each_entry_once_per_route(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 3)
    a = route_queue(redis_client, clock, consumer="A")
    b = route_queue(redis_client, clock, consumer="B")
    first = await a.take_new(2)
    assert [(w.entry_id, w.fields, w.attempts, w.source, w.route) for w in first] == [
        (ids[0], entry(0), 0, "outbox", ROUTE),
        (ids[1], entry(1), 0, "outbox", ROUTE),
    ]
    # Another consumer of the same group gets only what nobody read yet.
    assert [w.entry_id for w in await b.take_new(10)] == [ids[2]]
    assert await a.take_new(10) == []
    assert await b.take_new(10) == []


async def test_every_route_gets_every_entry(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 3, routes=("webhook", "slack"))
    webhook = route_queue(redis_client, clock, route="webhook")
    slack = route_queue(redis_client, clock, route="slack")
    assert [w.entry_id for w in await webhook.take_new(10)] == ids
    assert [(w.route, w.entry_id) for w in await slack.take_new(10)] == [
        ("slack", entry_id) for entry_id in ids
    ]


async def test_a_blocking_read_with_nothing_new_waits_without_hammering_the_store(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    # fakeredis 2.40 answers XREADGROUP BLOCK with COUNT at once; a worker looping on that
    # kept a core busy in `notifier run` with the in-memory store.
    await outbox(redis_client, 0)
    reads = 0
    execute = redis_client.execute_command

    async def counting(*args: object, **options: object) -> object:
        nonlocal reads
        reads += args[0] == "XREADGROUP"
        return await execute(*args, **options)

    redis_client.execute_command = counting  # type: ignore[method-assign]
    started = time.monotonic()
    assert await route_queue(redis_client, clock).take_new(10, block_s=0.3) == []
    assert time.monotonic() - started >= 0.29
    assert reads <= 10  # Redis: 1; the in-memory store: one every 50 ms


async def test_a_blocking_read_returns_an_entry_added_while_it_waits(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    await outbox(redis_client, 0)
    reading = asyncio.create_task(route_queue(redis_client, clock).take_new(10, block_s=5))
    await asyncio.sleep(0.1)
    added = await redis_client.xadd(KEYS.outbox, entry(1))
    started = time.monotonic()
    assert [work.entry_id for work in await reading] == [added]
    assert time.monotonic() - started < 1


async def test_take_new_before_any_outbox_exists_takes_nothing(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    # Workers start before the first poll cycle has created the outbox and its groups.
    assert await route_queue(redis_client, clock).take_new(10) == []


async def test_take_new_without_the_routes_group_takes_nothing(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    await outbox(redis_client, 2)
    assert await route_queue(redis_client, clock, route="archive").take_new(10) == []


async def test_a_blocking_read_without_the_routes_group_waits_instead_of_spinning(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    started = time.monotonic()
    assert await route_queue(redis_client, clock).take_new(10, block_s=0.3) == []
    assert time.monotonic() - started >= 0.3


async def test_an_outbox_created_while_looking_for_orphans_is_no_error(
    redis_client: redis.asyncio.Redis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # XINFO CONSUMERS answered "no such key"; the first poll cycle created the outbox
    # before the queue could check whether it exists.
    await outbox(redis_client, 1)

    async def missing(*_args: object) -> None:
        raise ResponseError("no such key")

    monkeypatch.setattr(redis_client, "xinfo_consumers", missing)
    queue = route_queue(redis_client, clock)
    await queue.find_orphans()
    assert queue.orphaned == []


# Resolving outbox entries.


async def test_settling_done_takes_the_entry_off_the_pending_list(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 2)
    queue = route_queue(redis_client, clock)
    first, _ = await queue.take_new(2)
    assert await queue.resolve(first, "done") is True
    assert await pending_ids(redis_client, ROUTE, "A") == [ids[1]]
    assert await redis_client.exists(KEYS.retries(ROUTE), KEYS.dead_letters) == 0


async def test_settling_work_another_worker_settled_returns_false_and_writes_nothing(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    await outbox(redis_client, 1)
    queue = route_queue(redis_client, clock)
    (work,) = await queue.take_new(1)
    assert await queue.resolve(work, "done") is True
    assert await queue.resolve(work, "done") is False
    assert await queue.resolve(work, "retry", due_s=5, attempts=1) is False
    letter = dead_letter_fields(work, 1, "HTTP 410")
    assert await queue.resolve(work, "dead", dead_letter=letter) is False
    assert await redis_client.exists(KEYS.retries(ROUTE), KEYS.retry_events(ROUTE)) == 0
    assert await redis_client.exists(KEYS.dead_letters) == 0


async def test_a_retry_of_an_outbox_entry_acks_it_and_schedules_it_with_its_attempts(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 3)
    queue = route_queue(redis_client, clock)
    (work,) = await queue.take_new(1)
    assert await queue.resolve(work, "retry", due_s=7.5, attempts=2) is True
    assert await pending_ids(redis_client, ROUTE, "A") == []
    assert await redis_client.zrange(KEYS.retries(ROUTE), 0, -1, withscores=True) == [
        (ids[0], clock.ms + 7500)
    ]
    payload = await redis_client.hget(KEYS.retry_events(ROUTE), ids[0])
    assert json.loads(payload) == {**entry(0), "a": 2}
    assert await queue.backlog() == Backlog(retries=1, pending=0, unread=2)


async def test_dead_lettering_an_outbox_entry_acks_it_and_keeps_it_as_a_dead_letter(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 1)
    queue = route_queue(redis_client, clock)
    (work,) = await queue.take_new(1)
    letter = dead_letter_fields(work, 1, "HTTP 410 Gone")
    assert await queue.resolve(work, "dead", dead_letter=letter) is True
    assert await pending_ids(redis_client, ROUTE, "A") == []
    assert await redis_client.exists(KEYS.retries(ROUTE)) == 0
    (dead,) = [d async for d in DeadLetters(redis_client, KEYS).all()]
    assert (dead.route, dead.entry_id, dead.fields, dead.attempts, dead.error) == (
        ROUTE,
        ids[0],
        entry(0),
        1,
        "HTTP 410 Gone",
    )


async def test_hand_back_makes_an_outbox_entry_due_now_with_its_attempts_unchanged(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 1)
    queue = route_queue(redis_client, clock)
    (work,) = await queue.take_new(1)
    assert await queue.hand_back(work) is True
    assert await pending_ids(redis_client, ROUTE, "A") == []
    assert await redis_client.zscore(KEYS.retries(ROUTE), ids[0]) == clock.ms
    (again,) = await queue.take_retries(10, visibility_s=30)
    assert (again.entry_id, again.fields, again.attempts) == (ids[0], entry(0), 0)


async def test_hand_back_of_a_retry_makes_it_due_now_with_its_attempts_unchanged(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 1)
    queue = route_queue(redis_client, clock)
    await scheduled(queue, 0, attempts=3)
    (work,) = await queue.take_retries(10, visibility_s=30)
    assert await queue.hand_back(work) is True
    assert await redis_client.zscore(KEYS.retries(ROUTE), ids[0]) == clock.ms
    assert await redis_client.hgetall(KEYS.retry_claims(ROUTE)) == {}
    (again,) = await queue.take_retries(10, visibility_s=30)
    assert again.attempts == 3


# Taking retries.


async def test_take_retries_takes_only_retries_due_by_now(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 3)
    queue = route_queue(redis_client, clock)
    await scheduled(queue, 0, 10, -5)
    taken = await queue.take_retries(10, visibility_s=30)
    assert sorted(w.entry_id for w in taken) == [ids[0], ids[2]]
    assert {w.source for w in taken} == {"retry"}


async def test_take_retries_until_takes_retries_due_by_then(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 3)
    queue = route_queue(redis_client, clock)
    await scheduled(queue, 5, 10, 60)
    taken = await queue.take_retries(10, visibility_s=30, until=clock.ms + 10_000)
    assert [w.entry_id for w in taken] == ids[:2]


async def test_take_retries_takes_at_most_count_the_earliest_first(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 3)
    queue = route_queue(redis_client, clock)
    await scheduled(queue, -1, -3, -2)
    assert [w.entry_id for w in await queue.take_retries(2, visibility_s=30)] == [ids[1], ids[2]]
    assert [w.entry_id for w in await queue.take_retries(2, visibility_s=30)] == [ids[0]]


async def test_a_taken_retry_stays_in_the_retry_set_hidden_until_its_visibility_ends(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 1)
    queue = route_queue(redis_client, clock)
    await scheduled(queue, 0)
    before = await redis_client.zscore(KEYS.retries(ROUTE), ids[0])
    (work,) = await queue.take_retries(10, visibility_s=30)
    assert work.entry_id == ids[0]
    after = await redis_client.zscore(KEYS.retries(ROUTE), ids[0])
    assert after is not None
    assert after > before
    assert after == clock.ms + 30_000
    assert await redis_client.hexists(KEYS.retry_events(ROUTE), ids[0])
    assert await redis_client.hgetall(KEYS.retry_claims(ROUTE)) == {ids[0]: "A"}
    assert await queue.take_retries(10, visibility_s=30) == []
    other = route_queue(redis_client, clock, consumer="B")
    assert await other.take_retries(10, visibility_s=30) == []


async def test_an_unsettled_retry_is_due_again_after_its_visibility_time(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 1)
    queue = route_queue(redis_client, clock)
    await scheduled(queue, 0)
    await queue.take_retries(10, visibility_s=30)
    other = route_queue(redis_client, clock, consumer="B")
    clock.advance(29.999)
    assert await other.take_retries(10, visibility_s=30) == []
    clock.advance(0.001)
    (work,) = await other.take_retries(10, visibility_s=30)
    assert work.entry_id == ids[0]
    assert await redis_client.hgetall(KEYS.retry_claims(ROUTE)) == {ids[0]: "B"}


async def test_a_retrys_event_and_attempts_round_trip_through_the_retry_set(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 1)
    queue = route_queue(redis_client, clock)
    await scheduled(queue, 0, attempts=4)
    (work,) = await queue.take_retries(10, visibility_s=30)
    assert work == Work(ROUTE, ids[0], entry(0), 4, "retry")


async def test_a_retry_whose_event_is_gone_is_dropped_when_due(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    await redis_client.zadd(KEYS.retries(ROUTE), {"1-0": clock.ms})
    queue = route_queue(redis_client, clock)
    assert await queue.take_retries(10, visibility_s=30) == []
    assert await redis_client.exists(KEYS.retries(ROUTE)) == 0


# Resolving retries.


async def test_settling_a_retry_done_forgets_it_everywhere(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 1)
    queue = route_queue(redis_client, clock)
    await scheduled(queue, 0)
    (work,) = await queue.take_retries(10, visibility_s=30)
    assert await queue.resolve(work, "done") is True
    assert await redis_client.zscore(KEYS.retries(ROUTE), ids[0]) is None
    assert await redis_client.hget(KEYS.retry_events(ROUTE), ids[0]) is None
    assert await redis_client.hget(KEYS.retry_claims(ROUTE), ids[0]) is None
    assert await queue.resolve(work, "done") is False
    assert await queue.backlog() == Backlog(retries=0, pending=0, unread=0)


async def test_settling_a_retry_again_reschedules_it_with_the_new_attempts(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 1)
    queue = route_queue(redis_client, clock)
    await scheduled(queue, 0, attempts=1)
    (work,) = await queue.take_retries(10, visibility_s=30)
    clock.advance(3)
    assert await queue.resolve(work, "retry", due_s=20, attempts=2) is True
    assert await redis_client.zscore(KEYS.retries(ROUTE), ids[0]) == clock.ms + 20_000
    assert await redis_client.hgetall(KEYS.retry_claims(ROUTE)) == {}
    assert json.loads(await redis_client.hget(KEYS.retry_events(ROUTE), ids[0])) == {
        **entry(0),
        "a": 2,
    }
    clock.advance(20)
    (again,) = await queue.take_retries(10, visibility_s=30)
    assert again == Work(ROUTE, ids[0], entry(0), 2, "retry")


async def test_dead_lettering_a_retry_keeps_a_dead_letter_and_forgets_the_retry(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 1)
    queue = route_queue(redis_client, clock)
    await scheduled(queue, 0, attempts=5)
    (work,) = await queue.take_retries(10, visibility_s=30)
    letter = dead_letter_fields(work, 6, "HTTP 503 after 6 attempts")
    assert await queue.resolve(work, "dead", dead_letter=letter) is True
    assert await redis_client.exists(KEYS.retries(ROUTE), KEYS.retry_events(ROUTE)) == 0
    assert await redis_client.exists(KEYS.retry_claims(ROUTE)) == 0
    ((dead_id, fields),) = await redis_client.xrange(KEYS.dead_letters)
    assert fields == {
        **entry(0),
        "route": ROUTE,
        "entry": ids[0],
        "attempts": "6",
        "error": "HTTP 503 after 6 attempts",
    }
    assert DeadLetter.from_entry(dead_id, fields) == DeadLetter(
        id=dead_id,
        route=ROUTE,
        entry_id=ids[0],
        fields=entry(0),
        attempts=6,
        error="HTTP 503 after 6 attempts",
    )


async def test_a_retry_settled_by_another_worker_returns_false_and_writes_nothing(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    await outbox(redis_client, 1)
    queue = route_queue(redis_client, clock)
    await scheduled(queue, 0)
    (work,) = await queue.take_retries(10, visibility_s=30)
    assert await queue.resolve(work, "done") is True
    assert await queue.resolve(work, "retry", due_s=5, attempts=2) is False
    assert await queue.resolve(work, "dead", dead_letter=dead_letter_fields(work, 2, "x")) is False
    assert await redis_client.exists(KEYS.retries(ROUTE), KEYS.retry_events(ROUTE)) == 0
    assert await redis_client.exists(KEYS.dead_letters) == 0


# Taking over stopped workers' deliveries.


async def test_the_entries_of_a_consumer_without_heartbeat_are_taken_over_as_they_are(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 3)
    dead = route_queue(redis_client, clock, consumer="A")
    live = route_queue(redis_client, clock, consumer="B")
    await dead.take_new(3)
    await redis_client.set(KEYS.heartbeat("B"), "1")
    await live.find_orphans()
    assert live.orphaned == ["A"]
    taken = await live.take_orphans(10)
    assert [(w.entry_id, w.fields, w.attempts, w.source) for w in taken] == [
        (entry_id, entry(n), 0, "outbox") for n, entry_id in enumerate(ids)
    ]
    assert await pending_ids(redis_client, ROUTE, "A") == []
    assert await pending_ids(redis_client, ROUTE, "B") == ids
    assert live.orphaned == []


async def test_take_orphans_takes_at_most_count_and_the_rest_on_the_next_call(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 3)
    await route_queue(redis_client, clock, consumer="A").take_new(3)
    live = route_queue(redis_client, clock, consumer="B")
    await live.find_orphans()
    assert [w.entry_id for w in await live.take_orphans(2)] == ids[:2]
    assert [w.entry_id for w in await live.take_orphans(2)] == ids[2:]
    assert await live.take_orphans(2) == []
    assert live.orphaned == []


async def test_the_entries_of_a_consumer_with_a_heartbeat_are_left_alone(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 2)
    await route_queue(redis_client, clock, consumer="A").take_new(2)
    await redis_client.set(KEYS.heartbeat("A"), "1")
    live = route_queue(redis_client, clock, consumer="B")
    await live.find_orphans()
    assert live.orphaned == []
    assert await live.take_orphans(10) == []
    assert await pending_ids(redis_client, ROUTE, "A") == ids


async def test_a_consumer_whose_heartbeat_comes_back_before_the_take_over_keeps_its_entries(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 2)
    await route_queue(redis_client, clock, consumer="A").take_new(2)
    live = route_queue(redis_client, clock, consumer="B")
    await live.find_orphans()
    assert live.orphaned == ["A"]
    await redis_client.set(KEYS.heartbeat("A"), "1")
    assert await live.take_orphans(10) == []
    assert live.orphaned == []
    assert await pending_ids(redis_client, ROUTE, "A") == ids


async def test_a_consumer_without_heartbeat_holding_nothing_is_removed_from_the_group(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    await outbox(redis_client, 2)
    await resolve_all(route_queue(redis_client, clock, consumer="A"), 2)
    live = route_queue(redis_client, clock, consumer="B")
    assert await consumers(redis_client) == {"A": 0}
    await live.find_orphans()
    assert live.orphaned == []
    assert await consumers(redis_client) == {}


async def test_a_taken_over_consumer_is_removed_on_the_next_look(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    await outbox(redis_client, 2)
    await route_queue(redis_client, clock, consumer="A").take_new(2)
    live = route_queue(redis_client, clock, consumer="B")
    await redis_client.set(KEYS.heartbeat("B"), "1")
    await live.find_orphans()
    await live.take_orphans(10)
    assert await consumers(redis_client) == {"A": 0, "B": 2}
    await live.find_orphans()
    assert await consumers(redis_client) == {"B": 2}


async def test_a_consumer_with_a_heartbeat_is_never_removed(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    await outbox(redis_client, 1)
    await resolve_all(route_queue(redis_client, clock, consumer="A"), 1)
    await redis_client.set(KEYS.heartbeat("A"), "1")
    await route_queue(redis_client, clock, consumer="B").find_orphans()
    assert await consumers(redis_client) == {"A": 0}


async def test_find_orphans_without_a_group_finds_nothing(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    queue = route_queue(redis_client, clock, route="archive", consumer="B")
    await queue.find_orphans()  # no outbox at all
    assert queue.orphaned == []
    await outbox(redis_client, 1)
    await queue.find_orphans()  # an outbox without the route's group
    assert queue.orphaned == []


async def test_retries_claimed_by_a_consumer_without_heartbeat_are_made_due_now(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 2)
    dead = route_queue(redis_client, clock, consumer="A")
    await scheduled(dead, 0, 0, attempts=2)
    await dead.take_retries(10, visibility_s=300)
    clock.advance(5)
    live = route_queue(redis_client, clock, consumer="B")
    await live.find_orphans()
    assert await redis_client.zrange(KEYS.retries(ROUTE), 0, -1, withscores=True) == [
        (ids[0], clock.ms),
        (ids[1], clock.ms),
    ]
    assert await redis_client.hgetall(KEYS.retry_claims(ROUTE)) == {}
    taken = await live.take_retries(10, visibility_s=300)
    assert [(w.entry_id, w.attempts) for w in taken] == [(ids[0], 2), (ids[1], 2)]


async def test_retries_claimed_by_a_consumer_with_a_heartbeat_are_left_alone(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 1)
    owner = route_queue(redis_client, clock, consumer="A")
    await scheduled(owner, 0)
    await owner.take_retries(10, visibility_s=300)
    await redis_client.set(KEYS.heartbeat("A"), "1")
    live = route_queue(redis_client, clock, consumer="B")
    await live.find_orphans()
    assert await redis_client.zscore(KEYS.retries(ROUTE), ids[0]) == clock.ms + 300_000
    assert await redis_client.hgetall(KEYS.retry_claims(ROUTE)) == {ids[0]: "A"}
    assert await live.take_retries(10, visibility_s=300) == []


# The idle backstop.


async def test_reclaim_idle_takes_only_entries_idle_longer_than_min_idle(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 2)
    await route_queue(redis_client, clock, consumer="A").take_new(2)
    await redis_client.set(KEYS.heartbeat("A"), "1")  # alive but stuck: only the backstop helps
    backstop = route_queue(redis_client, clock, consumer="B")
    assert await backstop.reclaim_idle(10, min_idle_s=3600) == []
    assert await pending_ids(redis_client, ROUTE, "A") == ids
    taken = await backstop.reclaim_idle(10, min_idle_s=0)
    assert [(w.entry_id, w.fields, w.source) for w in taken] == [
        (ids[0], entry(0), "outbox"),
        (ids[1], entry(1), "outbox"),
    ]
    assert await pending_ids(redis_client, ROUTE, "B") == ids


async def test_reclaim_idle_before_any_outbox_exists_takes_nothing(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    # The backstop runs as soon as a worker starts, maybe before the first poll cycle.
    assert await route_queue(redis_client, clock).reclaim_idle(10, min_idle_s=0) == []


async def test_reclaim_idle_without_the_routes_group_takes_nothing(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    await outbox(redis_client, 2)
    queue = route_queue(redis_client, clock, route="archive")
    assert await queue.reclaim_idle(10, min_idle_s=0) == []


# Trimming the outbox.


async def test_trim_deletes_entries_every_route_has_settled(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 5, routes=("webhook", "slack"))
    await resolve_all(route_queue(redis_client, clock, route="webhook"), 5)
    await resolve_all(route_queue(redis_client, clock, route="slack"), 3)
    assert await Outbox(redis_client, KEYS, clock).trim(["webhook", "slack"]) == 2
    # The last entry slack read stays as the trim's mark; the unread ones stay too.
    assert await outbox_ids(redis_client) == ids[2:]


async def test_trim_keeps_the_oldest_pending_entry_of_any_route(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 5, routes=("webhook", "slack"))
    webhook = route_queue(redis_client, clock, route="webhook")
    for work in await webhook.take_new(5):
        if work.entry_id != ids[1]:
            await webhook.resolve(work, "done")
    await resolve_all(route_queue(redis_client, clock, route="slack"), 5)
    assert await Outbox(redis_client, KEYS, clock).trim(["webhook", "slack"]) == 1
    assert await outbox_ids(redis_client) == ids[1:]


async def test_trim_keeps_everything_a_route_has_not_read(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 3, routes=("webhook", "slack"))
    await resolve_all(route_queue(redis_client, clock, route="webhook"), 3)
    assert await Outbox(redis_client, KEYS, clock).trim(["webhook", "slack"]) == 0
    assert await outbox_ids(redis_client) == ids


async def test_trim_without_an_outbox_deletes_nothing(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    assert await Outbox(redis_client, KEYS, clock).trim(["webhook"]) == 0


async def test_mark_served_records_when_each_route_was_served(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    outbox_ = Outbox(redis_client, KEYS, clock)
    await outbox_.mark_served([])
    assert await redis_client.exists(KEYS.routes_seen) == 0
    await outbox_.mark_served(["webhook", "slack"])
    clock.advance(60)
    await outbox_.mark_served(["slack"])
    assert await redis_client.hgetall(KEYS.routes_seen) == {
        "webhook": str(clock.ms - 60_000),
        "slack": str(clock.ms),
    }


async def test_a_route_another_replica_served_recently_still_holds_the_trim(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 4, routes=("webhook", "archive"))
    await resolve_all(route_queue(redis_client, clock, route="webhook"), 4)
    other_replica = Outbox(redis_client, KEYS, clock)
    await other_replica.mark_served(["webhook", "archive"])
    clock.advance(ROUTE_SEEN_WINDOW_S - 1)
    this_replica = Outbox(redis_client, KEYS, clock)
    assert await this_replica.trim(["webhook"]) == 0
    assert await outbox_ids(redis_client) == ids
    # Unserved for longer than the window: its unread entries no longer hold the trim,
    # but its group stays until the grace period ends.
    clock.advance(2)
    assert await this_replica.trim(["webhook"]) == 3
    assert await outbox_ids(redis_client) == ids[3:]
    groups = {g["name"] for g in await redis_client.xinfo_groups(KEYS.outbox)}
    assert groups == {"webhook", "archive"}


async def test_a_route_unserved_for_the_grace_period_loses_its_group_and_retries(
    redis_client: redis.asyncio.Redis, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    await outbox(redis_client, 3, routes=("webhook", "archive"))
    archive = route_queue(redis_client, clock, route="archive")
    await scheduled(archive, 0, 60)
    await archive.take_retries(1, visibility_s=30)  # one of them is claimed
    await resolve_all(route_queue(redis_client, clock, route="webhook"), 3)
    outbox_ = Outbox(redis_client, KEYS, clock)
    await outbox_.mark_served(["webhook", "archive"])
    clock.advance(REMOVED_ROUTE_GRACE_S)
    await outbox_.trim(["webhook"])
    assert len(await redis_client.xinfo_groups(KEYS.outbox)) == 2  # exactly 7 days: kept
    clock.advance(1)
    with caplog.at_level(logging.WARNING, logger="notifier.queue"):
        await outbox_.trim(["webhook"])
    groups = {g["name"] for g in await redis_client.xinfo_groups(KEYS.outbox)}
    assert groups == {"webhook"}  # served by this replica: never removed, however old
    archive_keys = (
        KEYS.retries("archive"),
        KEYS.retry_events("archive"),
        KEYS.retry_claims("archive"),
    )
    assert await redis_client.exists(*archive_keys) == 0
    assert await redis_client.hkeys(KEYS.routes_seen) == ["webhook"]
    (record,) = [r for r in caplog.records if r.name == "notifier.queue"]
    assert record.levelno == logging.WARNING
    assert "route archive" in record.getMessage()
    assert "2 scheduled retries" in record.getMessage()


async def test_a_group_no_replica_ever_served_starts_its_grace_period_at_the_first_trim(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    ids = await outbox(redis_client, 2, routes=("webhook", "archive"))
    await resolve_all(route_queue(redis_client, clock, route="webhook"), 2)
    outbox_ = Outbox(redis_client, KEYS, clock)
    assert await outbox_.trim(["webhook"]) == 0
    assert await redis_client.hget(KEYS.routes_seen, "archive") == str(clock.ms)
    assert await outbox_ids(redis_client) == ids
    clock.advance(REMOVED_ROUTE_GRACE_S + 1)
    await outbox_.trim(["webhook"])
    assert {g["name"] for g in await redis_client.xinfo_groups(KEYS.outbox)} == {"webhook"}


# What is left to do.


async def test_backlog_counts_retries_pending_and_unread_entries(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    await outbox(redis_client, 6)
    queue = route_queue(redis_client, clock)
    assert await queue.backlog() == Backlog(retries=0, pending=0, unread=6)
    first, second, third, _ = await queue.take_new(4)
    await queue.resolve(first, "retry", due_s=60, attempts=1)
    await queue.resolve(second, "retry", due_s=0, attempts=1)
    await queue.take_retries(10, visibility_s=30)  # a claimed retry is still a retry
    await queue.resolve(third, "done")
    backlog = await queue.backlog()
    assert backlog == Backlog(retries=2, pending=1, unread=2)
    assert backlog.total == 5


async def test_backlog_of_a_route_without_a_group_counts_only_its_retries(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    queue = route_queue(redis_client, clock, route="archive")
    assert await queue.backlog() == Backlog(retries=0, pending=0, unread=0)
    await redis_client.zadd(KEYS.retries("archive"), {"1-0": clock.ms})
    assert await queue.backlog() == Backlog(retries=1, pending=0, unread=0)


async def test_backlog_counts_the_unread_entries_of_a_route_added_to_a_live_outbox(
    redis_client: redis.asyncio.Redis, clock: FakeClock
) -> None:
    # begin.lua creates the group of a route added to a live epoch at the end of the
    # outbox ('$'). Until that group reads, Redis cannot say how far behind it is: XINFO
    # GROUPS gives its lag as nil.
    await outbox(redis_client, 2)
    await redis_client.xgroup_create(KEYS.outbox, "archive", "$")
    await redis_client.xadd(KEYS.outbox, entry(2))
    queue = route_queue(redis_client, clock, route="archive")
    assert await queue.backlog() == Backlog(retries=0, pending=0, unread=1)
