"""The store: one atomic Lua call per page diffs request state and queues events.

Every test runs on fakeredis and on a real redis-server.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import fakeredis
import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from notifier.config import Settings, load_settings
from notifier.keys import STATE_BUCKETS
from notifier.models import Event, LipsyncRequest
from notifier.outbox import read_entry
from notifier.store import (
    BASELINE_GRACE_MS,
    Epoch,
    EpochChanged,
    GroupMissing,
    LeaseLost,
    Store,
    open_redis,
)

from conftest import RedisServer
from samples import DETECTED_MS

TOKEN = "token-of-this-poller"  # noqa: S105 - a lease token, not a secret
BASE = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
ROUTES = {"webhook_url": "http://127.0.0.1:9/hook", "slack_webhook_url": "https://hooks.example/s"}


def request(
    request_id: str, status: str, *, minutes: float = 0, finished: float | None = None
) -> LipsyncRequest:
    """A request created `minutes` after BASE, finished `finished` minutes after BASE."""
    return LipsyncRequest(
        id=request_id,
        status=status,
        created_at=BASE + timedelta(minutes=minutes),
        finished_at=None if finished is None else BASE + timedelta(minutes=finished),
    )


def make_store(
    client: redis.asyncio.Redis, clock_s: float = DETECTED_MS / 1000, **flags: object
) -> Store:
    settings: Settings = load_settings({**ROUTES, **flags})
    return Store(client, settings, clock=lambda: clock_s)


async def hold_lease(store: Store, token: str = TOKEN) -> None:
    await store.redis.set(store.keys.lease, token)


async def events(store: Store) -> list[Event]:
    return [read_entry(fields) for _, fields in await store.redis.xrange(store.keys.outbox)]


async def begun_store(
    client: redis.asyncio.Redis, *, notify_existing: bool = False, **flags: object
) -> tuple[Store, Epoch]:
    """A store holding the lease, with a cycle begun on an empty namespace."""
    store = make_store(client, **flags)
    await hold_lease(store)
    return store, await store.begin(TOKEN, notify_existing=notify_existing)


async def live_store(
    client: redis.asyncio.Redis, baseline: list[LipsyncRequest], **flags: object
) -> tuple[Store, Epoch]:
    """A store whose baseline recorded `baseline` and is complete."""
    store, epoch = await begun_store(client, **flags)
    await store.apply(baseline, epoch, TOKEN)
    assert await store.finish(epoch, TOKEN) is True
    return store, await store.begin(TOKEN, notify_existing=False)


# Epoch and consumer groups.


async def test_the_first_begin_creates_a_baseline_epoch_and_a_group_per_route(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, epoch = await begun_store(redis_client)
    assert epoch.baseline
    assert epoch.created
    groups = await redis_client.xinfo_groups(store.keys.outbox)
    assert sorted(group["name"] for group in groups) == ["slack", "webhook"]
    assert {group["last-delivered-id"] for group in groups} == {"0-0"}
    again = await store.begin(TOKEN, notify_existing=False)
    assert again == Epoch(id=epoch.id, baseline=True, created=False)


async def test_a_route_added_later_starts_after_what_was_already_queued(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, epoch = await live_store(redis_client, [])
    await store.apply([request("a", "completed")], epoch, TOKEN)
    (last_id, _), *_ = await redis_client.xrevrange(store.keys.outbox, count=1)
    settings = load_settings(ROUTES)
    settings.routes.append(settings.routes[0].model_copy(update={"name": "archive"}))
    grown = Store(redis_client, settings)
    await grown.begin(TOKEN, notify_existing=False)
    groups = {g["name"]: g for g in await redis_client.xinfo_groups(store.keys.outbox)}
    assert groups["archive"]["last-delivered-id"] == last_id
    assert groups["webhook"]["last-delivered-id"] == "0-0"


async def test_no_event_is_appended_while_a_route_lacks_its_group(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, epoch = await live_store(redis_client, [request("a", "processing")])
    await redis_client.xgroup_destroy(store.keys.outbox, "slack")
    with pytest.raises(GroupMissing, match="route slack has no consumer group"):
        await store.apply([request("a", "completed"), request("b", "failed")], epoch, TOKEN)
    assert await events(store) == []
    assert (await store.stored("a")).status == "processing"
    assert await store.stored("b") is None
    await store.begin(TOKEN, notify_existing=False)  # the next cycle creates it again
    applied = await store.apply([request("a", "completed")], epoch, TOKEN)
    assert applied.events == 1


# Baseline.


async def test_the_baseline_records_every_request_silently(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, epoch = await begun_store(redis_client)
    applied = await store.apply(
        [request("a", "completed"), request("b", "failed"), request("c", "queued")], epoch, TOKEN
    )
    assert (applied.changed, applied.events) == (3, 0)
    assert await events(store) == []
    assert (await store.stored("a")).accounted == {"completed"}
    assert (await store.stored("c")).accounted == frozenset()


async def test_notify_existing_notifies_finished_requests_of_the_first_baseline(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, epoch = await begun_store(redis_client, notify_existing=True)
    await store.apply([request("a", "completed"), request("c", "queued")], epoch, TOKEN)
    (event,) = await events(store)
    assert (event.request.id, event.previous_status) == ("a", None)


async def test_a_stored_request_that_changes_during_an_interrupted_baseline_is_notified(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, epoch = await begun_store(redis_client)
    await store.apply([request("a", "processing")], epoch, TOKEN)
    # The cycle failed before finishing: the next one is still a baseline ...
    epoch = await store.begin(TOKEN, notify_existing=False)
    assert epoch.baseline
    applied = await store.apply(
        [request("a", "completed"), request("b", "completed")], epoch, TOKEN
    )
    # ... which silences only "b", a request without stored state.
    assert applied.events == 1
    (event,) = await events(store)
    assert (event.request.id, event.previous_status) == ("a", "processing")


async def test_finishing_the_baseline_makes_the_epoch_live_and_records_the_cycle(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, epoch = await live_store(redis_client, [request("a", "queued")])
    assert not epoch.baseline
    assert await store.finish(epoch, TOKEN) is False
    assert await redis_client.get(store.keys.last_cycle) == str(DETECTED_MS)


async def test_after_the_baseline_a_request_first_seen_finished_is_notified(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, epoch = await live_store(redis_client, [request("old", "queued", minutes=60)])
    new = request("new", "completed", minutes=61, finished=62)
    applied = await store.apply([new], epoch, TOKEN)
    assert (applied.events, applied.silenced) == (1, 0)
    (event,) = await events(store)
    assert event == Event(new, previous_status=None, detected_ms=DETECTED_MS)


@pytest.mark.parametrize(
    ("created_minutes", "notified"),
    [(55, False), (55.0002, True), (54, False), (59, True), (0, False)],
)
async def test_a_request_first_seen_finished_but_older_than_the_baseline_is_silenced(
    redis_client: redis.asyncio.Redis, created_minutes: float, notified: bool
) -> None:
    # The baseline's newest request was created at minute 60: the horizon is minute 55.
    store, epoch = await live_store(redis_client, [request("newest", "queued", minutes=60)])
    assert BASELINE_GRACE_MS == 5 * 60 * 1000
    applied = await store.apply([request("late", "failed", minutes=created_minutes)], epoch, TOKEN)
    assert (applied.events, applied.silenced) == (int(notified), int(not notified))
    assert (await store.stored("late")).accounted == {"failed"}  # silenced once, for good


# Once per (request, status).


async def test_each_entry_into_a_notify_on_status_is_notified_with_its_previous_status(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, epoch = await live_store(redis_client, [request("a", "queued")])
    await store.apply([request("a", "processing")], epoch, TOKEN)
    await store.apply([request("a", "completed", finished=3)], epoch, TOKEN)
    (event,) = await events(store)
    assert (event.status, event.previous_status) == ("completed", "processing")


async def test_repeats_regressions_and_stale_pages_never_notify_twice(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, epoch = await live_store(redis_client, [request("a", "processing")])
    sequence = ["completed", "completed", "processing", "completed", "failed", "completed"]
    for status in sequence:
        await store.apply([request("a", status)], epoch, TOKEN)
    assert [(e.status, e.previous_status) for e in await events(store)] == [
        ("completed", "processing"),
        ("failed", "completed"),
    ]
    assert (await store.stored("a")).status == "completed"


async def test_the_same_request_twice_in_one_page_is_notified_once(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, epoch = await live_store(redis_client, [request("a", "processing")])
    applied = await store.apply(
        [request("a", "completed"), request("a", "completed")], epoch, TOKEN
    )
    assert (applied.changed, applied.events) == (1, 1)


async def test_snapshots_travel_only_for_the_requests_that_queue_an_event(
    redis_client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Building a snapshot for every listed request cost a fifth of a cycle's CPU; a page
    # goes without them, and the script asks again for those its events need.
    made: list[str] = []
    snapshot = LipsyncRequest.snapshot

    def counting(self: LipsyncRequest) -> str:
        made.append(self.id)
        return snapshot(self)

    monkeypatch.setattr(LipsyncRequest, "snapshot", counting)
    finished = [request(f"done-{n}", "completed", finished=1) for n in range(20)]
    store, epoch = await live_store(redis_client, [*finished, request("a", "processing")])
    assert made == []  # a baseline queues nothing, so it needs no snapshot
    applied = await store.apply(
        [*finished, request("a", "failed"), request("b", "completed")], epoch, TOKEN
    )
    assert (applied.changed, applied.events, applied.first_seen) == (2, 2, 1)
    assert made == ["a", "b"]
    assert [(e.request.id, e.status, e.previous_status) for e in await events(store)] == [
        ("a", "failed", "processing"),
        ("b", "completed", None),
    ]


async def test_ids_and_statuses_of_any_characters_survive_the_packed_page(
    redis_client: redis.asyncio.Redis,
) -> None:
    # A page travels as one packed string; lengths in bytes, not separators, delimit it.
    odd = ["id with spaces 12 34 ", "ünïcødé-✓", "7 1 2 3 4 5 ", "a|b|c"]
    store, epoch = await live_store(redis_client, [request(rid, "processing") for rid in odd])
    applied = await store.apply(
        [request(rid, "completed", finished=1) for rid in odd] + [request("x", "weird 9 9 ✓")],
        epoch,
        TOKEN,
    )
    assert (applied.changed, applied.events) == (5, 4)
    assert sorted(e.request.id for e in await events(store)) == sorted(odd)
    assert (await store.stored("x")).status == "weird 9 9 ✓"
    assert (await store.stored("ünïcødé-✓")).finished_s is not None


async def test_unknown_statuses_are_stored_whole_and_never_notify(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, epoch = await live_store(redis_client, [request("a", "processing")])
    applied = await store.apply([request("a", "cancelled|by user")], epoch, TOKEN)
    assert (applied.changed, applied.events) == (1, 0)
    assert (await store.stored("a")).status == "cancelled|by user"
    await store.apply([request("a", "failed")], epoch, TOKEN)
    (event,) = await events(store)
    assert event.previous_status == "cancelled|by user"


async def test_notify_on_decides_which_statuses_fire(redis_client: redis.asyncio.Redis) -> None:
    store, epoch = await live_store(redis_client, [request("a", "queued")], notify_on="processing")
    await store.apply([request("a", "processing")], epoch, TOKEN)
    await store.apply([request("a", "completed")], epoch, TOKEN)
    assert [event.status for event in await events(store)] == ["processing"]


# Refusals: the lease, the epoch.


async def test_a_poller_without_the_lease_writes_nothing(redis_client: redis.asyncio.Redis) -> None:
    store, epoch = await live_store(redis_client, [request("a", "processing")])
    await hold_lease(store, "another-poller")
    with pytest.raises(LeaseLost):
        await store.apply([request("a", "completed")], epoch, TOKEN)
    with pytest.raises(LeaseLost):
        await store.finish(epoch, TOKEN)
    with pytest.raises(LeaseLost):
        await store.begin(TOKEN, notify_existing=False)
    assert (await store.stored("a")).status == "processing"
    assert await events(store) == []


async def test_writes_with_an_epoch_that_is_gone_are_refused(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, epoch = await live_store(redis_client, [request("a", "processing")])
    await redis_client.flushall()  # Redis restarted without persistence
    await hold_lease(store)
    with pytest.raises(EpochChanged, match="gone or replaced"):
        await store.apply([request("a", "completed")], epoch, TOKEN)
    assert await store.stored("a") is None
    fresh = await store.begin(TOKEN, notify_existing=False)
    assert fresh.created
    assert fresh.baseline
    assert fresh.id != epoch.id


async def test_writes_with_a_replaced_epoch_are_refused(redis_client: redis.asyncio.Redis) -> None:
    store, epoch = await live_store(redis_client, [])
    await redis_client.hset(store.keys.epoch, "id", "someone-else")
    for write in (
        store.apply([request("a", "completed")], epoch, TOKEN),
        store.finish(epoch, TOKEN),
        store.prune(epoch, TOKEN, range(4), 1),
    ):
        with pytest.raises(EpochChanged):
            await write


async def test_the_scripts_are_loaded_again_after_redis_forgets_them(
    redis_client: redis.asyncio.Redis,
) -> None:
    store, epoch = await live_store(redis_client, [request("a", "processing")])
    await redis_client.script_flush()
    applied = await store.apply([request("a", "completed")], epoch, TOKEN)
    assert applied.events == 1


async def test_a_page_touches_only_keys_of_its_hash_tag(redis_client: redis.asyncio.Redis) -> None:
    store, epoch = await live_store(redis_client, [])
    await store.apply([request(f"id-{n}", "queued") for n in range(300)], epoch, TOKEN)
    keys = [key async for key in redis_client.scan_iter()]
    assert keys
    assert all(key.startswith("{notifier}:") for key in keys)
    assert await store.tracked() == 300


# Pruning.


async def test_prune_forgets_requests_finished_before_the_retention(
    redis_client: redis.asyncio.Redis,
) -> None:
    old = request("old", "completed", minutes=0, finished=10)
    recent = request("recent", "failed", minutes=0, finished=50)
    waiting = request("waiting", "queued", minutes=-600)
    store, epoch = await live_store(redis_client, [old, recent, waiting])
    now = (BASE + timedelta(minutes=60)).timestamp()
    store = Store(redis_client, load_settings(ROUTES), clock=lambda: now)
    pruned = await store.prune(epoch, TOKEN, range(STATE_BUCKETS), retention_s=30 * 60)
    assert pruned == 1
    assert await store.stored("old") is None
    assert (await store.stored("recent")).finished_s is not None
    assert (await store.stored("waiting")).status == "queued"


async def test_a_pruned_request_listed_again_is_never_notified_again(
    redis_client: redis.asyncio.Redis,
) -> None:
    # Created after the baseline's horizon, notified, then forgotten.
    store, epoch = await live_store(redis_client, [request("first", "queued", minutes=0)])
    done = request("done", "completed", minutes=30, finished=31)
    assert (await store.apply([done], epoch, TOKEN)).events == 1
    later = (BASE + timedelta(days=31)).timestamp()
    store = Store(redis_client, load_settings(ROUTES), clock=lambda: later)
    assert await store.prune(epoch, TOKEN, range(STATE_BUCKETS), retention_s=30 * 86400) == 1
    applied = await store.apply([done], epoch, TOKEN)
    assert (applied.events, applied.silenced) == (0, 1)
    # A request created after the forgotten one finished is still notified.
    newer = request("newer", "failed", minutes=32)
    assert (await store.apply([newer], epoch, TOKEN)).events == 1


async def test_prune_waits_for_the_baseline_to_finish(redis_client: redis.asyncio.Redis) -> None:
    store, epoch = await begun_store(redis_client)
    await store.apply([request("old", "completed", finished=1)], epoch, TOKEN)
    assert await store.prune(epoch, TOKEN, range(STATE_BUCKETS), retention_s=1) == 0
    assert await store.stored("old") is not None


# Connecting.


def test_without_a_redis_url_the_store_is_in_memory_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        client = open_redis(load_settings())
    assert isinstance(client, fakeredis.FakeAsyncRedis)
    (record,) = caplog.records
    assert "NOTIFIER_REDIS_URL is not set" in record.getMessage()
    assert "not kept across restarts" in record.getMessage()


async def test_a_redis_that_refuses_connections_fails_without_the_password() -> None:
    settings = load_settings({"redis_url": "redis://:ZZ-redis-pass@127.0.0.1:1/0"})
    client = open_redis(settings)
    store = Store(client, settings)
    with pytest.raises(RedisConnectionError) as caught:
        await store.begin(TOKEN, notify_existing=False)
    await client.aclose()
    assert "ZZ-redis-pass" not in str(caught.value)
    assert "ZZ-redis-pass" not in repr(caught.value)


async def test_a_page_is_applied_whole_or_not_at_all_when_redis_goes_away() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    store, epoch = await live_store(client, [request("a", "processing")])
    server.connected = False
    with pytest.raises(RedisConnectionError):
        await store.apply([request("a", "completed"), request("b", "failed")], epoch, TOKEN)
    server.connected = True
    assert (await store.stored("a")).status == "processing"
    assert await events(store) == []


async def test_a_restarted_redis_is_used_again_at_once_despite_stale_connections(
    redis_server: RedisServer,
) -> None:
    client = open_redis(load_settings({"redis_url": redis_server.url}))
    # Several pooled connections, all of them dead after the restart.
    await asyncio.gather(*(client.ping() for _ in range(4)))
    redis_server.stop()
    redis_server.start()
    try:
        assert await asyncio.gather(*(client.ping() for _ in range(4))) == [True] * 4
    finally:
        await client.aclose()
