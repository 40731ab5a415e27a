"""Dead letters: listing them (`notifier dlq list`) and replaying them (`dlq replay`).

Every test runs on fakeredis and on a real redis-server. Dead letters are made the way a
delivery worker makes them: read from the outbox, then resolved as "dead".
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

import pytest
import redis.asyncio
from redis.exceptions import ResponseError

import notifier.dlq
from notifier.dlq import DeadLetter, DeadLetters, dead_letter_fields
from notifier.keys import Keys
from notifier.models import Event, LipsyncRequest, event_id
from notifier.outbox import entry_of, read_entry
from notifier.queue import RouteQueue

from conftest import RedisFactory
from samples import COMPLETED, DETECTED_MS

KEYS = Keys("t")
NOW = 1_700_000_000.0
ROUTES = ["webhook", "slack"]


def clock() -> float:
    return NOW


def event(n: int) -> Event:
    """The sample completed request, as request `req-{n}` of its batch."""
    request = LipsyncRequest.model_validate({**COMPLETED, "id": f"req-{n}"})
    return Event(request, previous_status="processing", detected_ms=DETECTED_MS + n)


async def dead_letter(
    client: redis.asyncio.Redis,
    fields: dict[str, str],
    *,
    route: str = "webhook",
    error: str = "HTTP 410 Gone",
) -> DeadLetter:
    """Queue `fields` in the outbox, read it on `route` and dead-letter it after 3 attempts,
    as a delivery worker does; returns the dead letter."""
    try:
        await client.xgroup_create(KEYS.outbox, route, "$", mkstream=True)
    except ResponseError as exc:
        if not str(exc).startswith("BUSYGROUP"):
            raise
    await client.xadd(KEYS.outbox, fields)
    queue = RouteQueue(client, KEYS, route, "worker", clock=clock)
    (work,) = await queue.take_new(1)
    assert await queue.resolve(work, "dead", dead_letter=dead_letter_fields(work, 3, error))
    ((dead_letter_id, dead_fields),) = await client.xrevrange(KEYS.dead_letters, count=1)
    return DeadLetter.from_entry(dead_letter_id, dead_fields)


async def dead_letters(
    client: redis.asyncio.Redis, count: int, route: str = "webhook"
) -> list[DeadLetter]:
    return [await dead_letter(client, entry_of(event(n)), route=route) for n in range(count)]


async def retried(client: redis.asyncio.Redis, route: str) -> list[str]:
    """The entry ids in a route's retry set, sorted."""
    return sorted(await client.zrange(KEYS.retries(route), 0, -1))


async def listed(client: redis.asyncio.Redis) -> list[DeadLetter]:
    return [d async for d in DeadLetters(client, KEYS, clock).all()]


# Listing.


@pytest.mark.parametrize("count", [4, 5])
async def test_all_lists_every_dead_letter_oldest_first_a_page_at_a_time(
    redis_client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    made = await dead_letters(redis_client, count)
    monkeypatch.setattr(notifier.dlq, "PAGE", 2)
    found = await listed(redis_client)
    assert found == made
    assert [d.fields for d in found] == [entry_of(event(n)) for n in range(count)]


async def test_all_without_dead_letters_lists_nothing(redis_client: redis.asyncio.Redis) -> None:
    assert await listed(redis_client) == []


async def test_a_dead_letter_lists_its_event_attempts_and_error(
    redis_client: redis.asyncio.Redis,
) -> None:
    made = await dead_letter(redis_client, entry_of(event(1)), error="HTTP 410 Gone")
    line = made.as_json()
    assert line == {
        "id": made.id,
        "route": "webhook",
        "request_id": "req-1",
        "status": "completed",
        "attempts": 3,
        "error": "HTTP 410 Gone",
        "time": line["time"],
        "event_id": event_id("req-1", "completed"),
        "reference_id": COMPLETED["reference_id"],
        "type": "lipsync.request.completed",
    }
    assert line["event_id"] == event(1).id
    assert line["time"].endswith("Z")
    dead_lettered_at = datetime.fromisoformat(line["time"])
    assert dead_lettered_at.utcoffset().total_seconds() == 0
    assert round(dead_lettered_at.timestamp() * 1000) == int(made.id.split("-")[0])
    json.dumps(line)  # a line of `dlq list`


async def test_the_time_of_a_dead_letter_is_its_stream_ids_milliseconds(
    redis_client: redis.asyncio.Redis,
) -> None:
    fields = {**entry_of(event(1)), "route": "webhook", "entry": "1-0", "attempts": "2"}
    await redis_client.xadd(KEYS.dead_letters, {**fields, "error": "x"}, id="1774868470250-0")
    (found,) = await listed(redis_client)
    assert found.as_json()["time"] == "2026-03-30T11:01:10.250000Z"


async def test_a_malformed_dead_letter_still_lists_without_its_request(
    redis_client: redis.asyncio.Redis,
) -> None:
    made = await dead_letter(
        redis_client, {"junk": "yes"}, error="outbox entry is not an event: KeyError"
    )
    (found,) = await listed(redis_client)
    assert found == made
    assert found.fields == {"junk": "yes"}
    line = found.as_json()
    assert line["request_id"] is None
    assert line["status"] is None
    assert line["event_id"] is None
    assert line["reference_id"] is None
    assert (line["route"], line["attempts"]) == ("webhook", 3)
    assert line["error"] == "outbox entry is not an event: KeyError"


async def test_get_finds_a_dead_letter_by_id_or_returns_none(
    redis_client: redis.asyncio.Redis,
) -> None:
    made = await dead_letter(redis_client, entry_of(event(1)))
    dlq = DeadLetters(redis_client, KEYS, clock)
    assert await dlq.get(made.id) == made
    assert await dlq.get("1-0") is None
    assert await dlq.get("nope") is None
    # Redis reads a bare millisecond as a range of ids; only a whole id names a dead letter.
    assert await dlq.get(made.id.split("-")[0]) is None


# Replaying.


async def test_replay_requeues_a_dead_letter_due_now_with_attempts_reset(
    redis_client: redis.asyncio.Redis,
) -> None:
    made = await dead_letter(redis_client, entry_of(event(1)))
    done = await DeadLetters(redis_client, KEYS, clock).replay([made.id], ROUTES)
    assert (done.replayed, done.missing, done.unrouted) == ([made], [], [])
    assert await listed(redis_client) == []
    retries = await redis_client.zrange(KEYS.retries("webhook"), 0, -1, withscores=True)
    assert retries == [(made.entry_id, round(NOW * 1000))]
    payload = await redis_client.hget(KEYS.retry_events("webhook"), made.entry_id)
    assert json.loads(payload) == {**entry_of(event(1)), "a": 0}


async def test_a_replayed_dead_letter_is_sent_again_as_the_same_event(
    redis_client: redis.asyncio.Redis,
) -> None:
    made = await dead_letter(redis_client, entry_of(event(1)))
    await DeadLetters(redis_client, KEYS, clock).replay([made.id], ROUTES)
    queue = RouteQueue(redis_client, KEYS, "webhook", "worker", clock=clock)
    (work,) = await queue.take_retries(10, visibility_s=30)
    assert (work.entry_id, work.fields, work.attempts, work.source) == (
        made.entry_id,
        entry_of(event(1)),
        0,
        "retry",
    )
    assert read_entry(work.fields).id == event(1).id  # the same webhook-id


async def test_replay_reports_ids_that_are_not_dead_letters_as_missing(
    redis_client: redis.asyncio.Redis,
) -> None:
    made = await dead_letter(redis_client, entry_of(event(1)))
    done = await DeadLetters(redis_client, KEYS, clock).replay(["1-0", "nope"], ROUTES)
    assert (done.replayed, done.missing, done.unrouted) == ([], ["1-0", "nope"], [])
    assert await listed(redis_client) == [made]
    assert await redis_client.exists(KEYS.retries("webhook")) == 0


async def test_a_dead_letter_of_a_route_not_configured_stays(
    redis_client: redis.asyncio.Redis,
) -> None:
    made = await dead_letter(redis_client, entry_of(event(1)), route="archive")
    done = await DeadLetters(redis_client, KEYS, clock).replay([made.id], ROUTES)
    assert (done.replayed, done.missing, done.unrouted) == ([], [], [made])
    assert await listed(redis_client) == [made]
    assert await redis_client.exists(KEYS.retries("archive"), KEYS.retry_events("archive")) == 0


async def test_replay_of_all_requeues_every_dead_letter_of_a_configured_route(
    redis_client: redis.asyncio.Redis,
) -> None:
    webhook = await dead_letters(redis_client, 3, route="webhook")
    slack = await dead_letter(redis_client, entry_of(event(7)), route="slack")
    archive = await dead_letter(redis_client, entry_of(event(8)), route="archive")
    done = await DeadLetters(redis_client, KEYS, clock).replay(None, ROUTES)
    assert (done.replayed, done.missing, done.unrouted) == ([*webhook, slack], [], [archive])
    assert await listed(redis_client) == [archive]
    assert await retried(redis_client, "webhook") == sorted(d.entry_id for d in webhook)
    assert await retried(redis_client, "slack") == [slack.entry_id]


async def test_a_dead_letter_replayed_twice_at_once_is_requeued_once(
    redis_factory: RedisFactory,
) -> None:
    made = await dead_letter(redis_factory(), entry_of(event(1)))
    first = DeadLetters(redis_factory(), KEYS, clock)
    second = DeadLetters(redis_factory(), KEYS, clock)
    done = await asyncio.gather(first.replay([made.id], ROUTES), second.replay([made.id], ROUTES))
    assert sorted(len(d.replayed) for d in done) == [0, 1]
    assert sorted(d.missing for d in done) == [[], [made.id]]
    client = redis_factory()
    assert await retried(client, "webhook") == [made.entry_id]
    assert await listed(client) == []
