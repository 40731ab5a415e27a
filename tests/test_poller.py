"""Poll cycles end to end: the simulator over HTTP, the poller, and the store in Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import fakeredis
import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from notifier import lease as lease_module
from notifier import poller as poller_module
from notifier.api import (
    ApiClient,
    AuthError,
    ListingKeptChanging,
    RateLimited,
    TransientApiError,
    UnexpectedResponse,
)
from notifier.keys import Keys
from notifier.poller import Poller
from notifier.simulator import Fault, FaultKind, Simulator
from notifier.store import LeaseLost, connect_redis

from conftest import RedisFactory, RedisServer, eventually
from polling import (
    NOTIFY_ON,
    expected_transitions,
    make_settings,
    outbox,
    poller_of,
    running,
    statuses,
    transitions,
)
from proxy import CutProxy
from samples import SIMULATOR_KEY


@pytest.fixture(autouse=True)
def _key_never_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test of this module also checks that no log line holds the API key."""
    caplog.set_level(logging.DEBUG)
    yield
    assert SIMULATOR_KEY not in caplog.text


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed cycles are retried within tens of milliseconds, and a lease lasts 0.5 s."""
    monkeypatch.setattr(poller_module, "TRANSIENT_BACKOFF", (0.01, 0.05))
    monkeypatch.setattr(poller_module, "AUTH_BACKOFF", (0.02, 0.05))
    monkeypatch.setattr(lease_module, "MIN_TTL_S", 0.5)


@pytest.fixture
async def real_redis(redis_server: RedisServer) -> AsyncIterator[RedisFactory]:
    """Makes clients of the real redis-server (flushed first), closed after the test."""
    clients: list[redis.asyncio.Redis] = []

    def factory() -> redis.asyncio.Redis:
        clients.append(connect_redis(redis_server.url))
        return clients[-1]

    await factory().flushall()
    yield factory
    for client in clients:
        await client.aclose()


async def test_cycles_queue_exactly_the_transitions_since_the_last_cycle(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(120)
    simulator.create(15)
    async with poller_of(make_settings(api_url), redis_factory()) as poller:
        baseline = await poller.cycle()
        assert (baseline.baseline, baseline.listed, baseline.events) == (True, 135, 0)
        expected: Counter[tuple[str, str, str | None]] = Counter()
        for _ in range(6):
            before = statuses(simulator)
            simulator.progress(fail_ratio=0.3)
            expected += expected_transitions(before, statuses(simulator))
            result = await poller.cycle()
            assert not result.baseline
        assert sum(expected.values()) > 10
        assert {status for _, status, _ in expected} == set(NOTIFY_ON)
        assert transitions(await outbox(poller)) == expected
        assert await poller.store.tracked() == len(simulator.requests)


async def test_a_baseline_that_races_new_requests_notifies_no_old_request(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(200)
    # Requests arrive while the baseline pages through the newest-first listing.
    simulator.hooks.append(lambda call: simulator.create(2) if call <= 8 else None)
    async with poller_of(make_settings(api_url), redis_factory()) as poller:
        assert (await poller.cycle()).baseline
        simulator.hooks.clear()
        quiet = await poller.cycle()
        assert (quiet.listed, quiet.changed, quiet.events) == (216, 0, 0)
        # An old finished request the API only now lists is recorded, not notified ...
        (old,) = simulator.create(created_at=simulator.clock() - timedelta(hours=3))
        simulator.start(old.id)
        simulator.complete(old.id)
        # ... while one created and finished after the baseline is.
        (new,) = simulator.create()
        simulator.fail(new.id)
        result = await poller.cycle()
        assert (result.events, result.silenced) == (1, 1)
        assert transitions(await outbox(poller)) == {(new.id, "failed", None): 1}


@pytest.mark.parametrize("year", [9999, 1])
async def test_an_implausible_created_at_never_enters_the_baseline_nor_fails_a_cycle(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str, year: int
) -> None:
    simulator.backfill(30)
    (odd,) = simulator.create()
    odd.created_at = datetime(year, 12, 31, tzinfo=UTC)  # far ahead, or Go's zero time
    async with poller_of(make_settings(api_url), redis_factory()) as poller:
        assert (await poller.cycle()).baseline
        # A year-9999 newest would make every later request look older than the baseline.
        (new,) = simulator.create()
        simulator.fail(new.id)
        result = await poller.cycle()
        assert (result.events, result.silenced) == (1, 0)
        assert transitions(await outbox(poller)) == {(new.id, "failed", None): 1}
        assert poller.metrics.malformed_items._value.get() == 2  # skipped in both cycles


async def test_a_baseline_that_fails_half_way_keeps_what_it_recorded(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(100)
    simulator.hooks.append(
        lambda call: simulator.inject(Fault(FaultKind.SERVER_ERROR)) if call == 3 else None
    )
    async with poller_of(make_settings(api_url, list_concurrency=1), redis_factory()) as poller:
        with pytest.raises(TransientApiError):
            await poller.cycle()
        store = poller.store
        assert await store.tracked() == 40  # the two pages before the failure
        stored = [
            request
            for request in simulator.requests.values()
            if request.status == "processing" and await store.stored(request.id) is not None
        ]
        changed = stored[0]
        simulator.complete(changed.id)
        simulator.hooks.clear()
        result = await poller.cycle()
        assert result.baseline  # still the baseline: it had not completed
        assert result.events == 1
        assert transitions(await outbox(poller)) == {(changed.id, "completed", "processing"): 1}
        assert not (await poller.cycle()).baseline


async def test_redis_applies_one_page_while_the_next_is_read(
    redis_factory: RedisFactory,
    simulator: Simulator,
    api_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    simulator.backfill(200)
    async with poller_of(make_settings(api_url), redis_factory()) as poller:
        apply, running, most = poller.store.apply, 0, 0

        async def slow_apply(*args: Any) -> Any:
            nonlocal running, most
            running += 1
            most = max(most, running)
            try:
                await asyncio.sleep(0.01)  # a Redis busy with the script
                return await apply(*args)
            finally:
                running -= 1

        monkeypatch.setattr(poller.store, "apply", slow_apply)
        result = await poller.cycle()
        assert most == poller_module.APPLY_IN_FLIGHT == 2
        assert (result.listed, result.first_seen) == (200, 200)
        assert await poller.store.tracked() == 200


async def test_a_refused_page_fails_the_cycle_once_the_page_beside_it_is_applied(
    redis_factory: RedisFactory,
    simulator: Simulator,
    api_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    simulator.backfill(200)
    settings = make_settings(api_url, list_concurrency=1)
    async with poller_of(settings, redis_factory()) as poller:
        apply, calls = poller.store.apply, 0

        async def third_refused(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            call = calls
            if call == 2:
                await asyncio.sleep(0.3)  # still running when the third is refused
            if call == 3:
                raise LeaseLost("this poller no longer holds the lease")
            return await apply(*args)

        monkeypatch.setattr(poller.store, "apply", third_refused)
        with pytest.raises(LeaseLost):
            await poller.cycle()
        assert calls == 3
        assert await poller.store.tracked() == 40  # pages 1 and 2, each whole


async def test_notify_existing_notifies_what_was_already_finished_on_the_first_cycle(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(60)
    finished = {r.id for r in simulator.requests.values() if r.status in NOTIFY_ON}
    settings = make_settings(api_url, notify_existing=True)
    async with poller_of(settings, redis_factory()) as poller:
        await poller.cycle()
        await poller.cycle()
        assert {event.request.id for event in await outbox(poller)} == finished


async def test_a_poller_that_loses_the_lease_mid_cycle_writes_nothing(
    redis_factory: RedisFactory,
    simulator: Simulator,
    api_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    simulator.backfill(60, span=timedelta(minutes=5))
    settings = make_settings(api_url)
    async with (
        poller_of(settings, redis_factory()) as first,
        poller_of(settings, redis_factory(), hold=False) as second,
    ):
        await first.cycle()
        before = statuses(simulator)
        for request in simulator.requests.values():
            if request.status == "processing":
                simulator.complete(request.id)
        expected = expected_transitions(before, statuses(simulator))

        apply = first.store.apply

        async def apply_after_losing_the_lease(*args: Any) -> Any:
            await first.store.redis.delete(first.lease.key)  # it expired meanwhile
            assert await second.lease.acquire()
            return await apply(*args)

        monkeypatch.setattr(first.store, "apply", apply_after_losing_the_lease)
        with pytest.raises(LeaseLost):
            await first.cycle()
        assert await outbox(first) == []
        await second.cycle()
        assert transitions(await outbox(second)) == expected


async def test_overlapping_pollers_never_queue_a_transition_twice(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    # A lease is meant to prevent overlap; should it fail (a paused holder whose lease
    # expired), the atomic diff alone keeps every (request, status) once.
    simulator.backfill(50)
    settings = make_settings(api_url)
    async with (
        poller_of(settings, redis_factory()) as first,
        poller_of(settings, redis_factory(), hold=False) as second,
    ):
        second.lease.token = first.lease.token
        await first.cycle()
        expected: Counter[tuple[str, str, str | None]] = Counter()
        for _ in range(8):
            before = statuses(simulator)
            simulator.progress(fail_ratio=0.2)
            expected += expected_transitions(before, statuses(simulator))
            await asyncio.gather(first.cycle(), second.cycle())
        assert transitions(await outbox(first)) == expected


async def test_two_running_replicas_queue_500_transitions_once_each(
    real_redis: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    settings = make_settings(api_url, page_size=100)
    clients = [real_redis(), real_redis()]
    async with (
        poller_of(settings, clients[0], hold=False) as first,
        poller_of(settings, clients[1], hold=False) as second,
        running(first),
        running(second),
    ):
        await eventually(lambda: clients[0].exists(first.store.keys.last_cycle))
        for batch in range(25):  # 20 requests finish per batch, while both replicas run
            for request in simulator.create(20):
                simulator.start(request.id)
                if batch % 5 == 0:
                    simulator.fail(request.id)
                else:
                    simulator.complete(request.id)
            await asyncio.sleep(0.03)

        async def all_queued() -> bool:
            return await clients[0].xlen(first.store.keys.outbox) >= 500

        await eventually(all_queued)
        await asyncio.sleep(0.3)  # a few more cycles: nothing more may arrive
        # One holds the lease; `eventually`, as a slow renewal may hand it over meanwhile.
        await eventually(lambda: _true(first.lease.held != second.lease.held))
        queued = transitions(await outbox(first))
        repeated = {key: count for key, count in queued.items() if count > 1}
        assert len(queued) == 500
        assert repeated == {}


async def test_a_standby_replica_takes_over_within_one_ttl_when_the_poller_dies(
    redis_factory: RedisFactory,
    simulator: Simulator,
    api_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(api_url)
    async with (
        poller_of(settings, redis_factory(), hold=False) as first,
        poller_of(settings, redis_factory(), hold=False) as second,
    ):
        first_task = asyncio.create_task(first.run(asyncio.Event()))
        await eventually(lambda: _true(first.lease.held))
        async with running(second):
            await asyncio.sleep(0.3)
            assert not second.lease.held
            # The holder dies: it stops at once and never releases its lease.
            monkeypatch.setattr(first.lease, "release", _nothing)
            first_task.cancel()
            died = time.monotonic()
            with contextlib.suppress(asyncio.CancelledError):
                await first_task
            await eventually(lambda: _true(second.lease.held), timeout=5)
            took_over = time.monotonic() - died
            assert took_over <= first.lease.ttl_ms / 1000 + 0.2
            (request,) = simulator.create()
            simulator.fail(request.id)
            await eventually(lambda: _queued(second, 1))


async def test_a_standby_that_cannot_ask_redis_how_long_to_wait_backs_off_and_goes_on(
    redis_factory: RedisFactory, api_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(api_url)
    client = redis_factory()
    await client.set(Keys(settings.key_prefix).lease, "another-replica", px=60_000)
    async with poller_of(settings, client, hold=False) as standby:
        asked = 0

        async def failing_once() -> float:
            nonlocal asked
            asked += 1
            if asked == 1:
                raise RedisConnectionError("Redis went away")
            return 0.05

        monkeypatch.setattr(standby.lease, "seconds_until_free", failing_once)
        async with running(standby) as task:
            await eventually(lambda: _true(asked >= 2), timeout=5)
            assert not task.done()
            assert standby.last_error == "Redis is unreachable (Redis went away)"


async def test_redis_restarting_empty_goes_back_to_a_silent_baseline(
    redis_server: RedisServer,
    real_redis: RedisFactory,
    simulator: Simulator,
    api_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    simulator.backfill(80)
    client = real_redis()
    async with poller_of(make_settings(api_url), client, hold=False) as poller, running(poller):
        keys = poller.store.keys
        await eventually(lambda: client.exists(keys.last_cycle))
        (first,) = simulator.create()
        simulator.complete(simulator.start(first.id).id)
        await eventually(lambda: _queued(poller, 1))
        redis_server.stop()
        await asyncio.sleep(0.3)  # cycles fail while Redis is down
        redis_server.start()
        await eventually(lambda: _true(poller.rebaselines == 1))
        await eventually(lambda: client.hget(keys.epoch, "phase"), timeout=10)
        await eventually(lambda: _is_live(client, keys.epoch))
        await asyncio.sleep(0.3)
        assert await client.xlen(keys.outbox) == 0  # no old request notified again
        (second,) = simulator.create()
        simulator.fail(second.id)
        await eventually(lambda: _queued(poller, 1))
        assert transitions(await outbox(poller)) == {(second.id, "failed", None): 1}
    messages = [record.getMessage() for record in caplog.records]
    assert sum("Redis lost its data" in message for message in messages) == 1
    assert not any("NOGROUP" in message for message in messages)


async def test_a_new_baseline_after_lost_data_is_silent_even_with_notify_existing(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(60)
    settings = make_settings(api_url, notify_existing=True)
    async with poller_of(settings, redis_factory()) as poller:
        first = await poller.cycle()
        assert first.events > 0  # the namespace's very first baseline notifies them
        await poller.store.redis.flushall()
        assert await poller.lease.acquire()
        again = await poller.cycle()
        assert (again.baseline, again.events, poller.rebaselines) == (True, 0, 1)


async def test_the_poller_recovers_when_redis_comes_back_and_says_so_once(
    simulator: Simulator,
    api_url: str,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A real server behind a proxy the test cuts: the data survives the outage, and the
    # errors are those of a vanished server, whatever a fake connection would print.
    async with CutProxy.serve(redis_server.port) as proxy:
        client = connect_redis(proxy.url())
        await client.flushall()
        simulator.backfill(40)
        try:
            async with (
                poller_of(make_settings(api_url), client, hold=False) as poller,
                running(poller),
            ):
                await eventually(lambda: client.exists(poller.store.keys.last_cycle))
                proxy.cut()
                (request,) = simulator.create()
                simulator.fail(request.id)
                await eventually(lambda: _true(poller.last_error is not None))
                assert (poller.last_error or "").startswith("Redis is unreachable (")
                await asyncio.sleep(0.8)  # longer than the lease lasts (0.5 s here)
                proxy.restore()
                await eventually(lambda: _queued(poller, 1))
                await eventually(lambda: _true(poller.last_error is None))
                assert poller.rebaselines == 0  # the data survived: no new baseline
        finally:
            await client.aclose()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert sum(line.startswith("Redis is unreachable") for line in said) == 1
    assert sum(line.startswith("Redis is reachable again") for line in said) == 1
    assert not any("another replica" in line for line in said)  # it was this one's lease
    assert any("lapsed while Redis was out of reach" in line for line in said)


async def test_the_poller_retries_through_api_errors_and_a_revoked_key(
    redis_factory: RedisFactory,
    simulator: Simulator,
    api_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    simulator.backfill(40)
    async with (
        poller_of(make_settings(api_url), redis_factory(), hold=False) as poller,
        running(poller),
    ):
        await eventually(lambda: poller.store.redis.exists(poller.store.keys.last_cycle))
        simulator.inject(Fault(FaultKind.SERVER_ERROR), 2)
        simulator.inject(Fault(FaultKind.RATE_LIMIT, retry_after="0"))
        simulator.inject(Fault(FaultKind.INVALID_JSON))
        simulator.revoked_keys.add(SIMULATOR_KEY)
        await eventually(lambda: _true(poller.last_error is not None))
        await eventually(lambda: _true("rejected the API key" in (poller.last_error or "")))
        (request,) = simulator.create()
        simulator.fail(request.id)
        simulator.revoked_keys.clear()
        await eventually(lambda: _queued(poller, 1))
        await eventually(lambda: _true(poller.last_error is None))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("unauthorized" in message for message in errors)


@pytest.mark.parametrize(
    ("error", "failures", "low", "high"),
    [
        (RateLimited(3.5), 0, 3.5, 3.5),
        (RateLimited(3600), 0, 600, 600),
        (RateLimited(None), 0, 0, 1),
        (TransientApiError("503"), 0, 0, 1),
        (TransientApiError("503"), 3, 0, 8),
        (TransientApiError("503"), 30, 0, 60),
        (ListingKeptChanging("busy"), 2, 0, 4),
        (RedisConnectionError("refused"), 1, 0, 2),
        (AuthError(401, "invalid token"), 0, 30, 60),
        (AuthError(401, "invalid token"), 20, 30, 300),
        (UnexpectedResponse(404, "not found"), 0, 30, 60),
    ],
)
async def test_how_long_the_poller_waits_after_each_kind_of_failure(
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    failures: int,
    low: float,
    high: float,
) -> None:
    monkeypatch.undo()  # the real backoff constants
    settings = make_settings("http://127.0.0.1:9/api")
    async with ApiClient(settings) as api:
        poller = Poller(settings, fakeredis.FakeAsyncRedis(), api, rng=random.Random(1))
        for _ in range(20):
            assert low <= poller._failed(error, failures) <= high
        assert poller.last_error == (
            f"Redis is unreachable ({error})"
            if isinstance(error, RedisConnectionError)
            else str(error)
        )


async def _true(value: bool) -> bool:
    return value


async def _nothing(*_args: object) -> None:
    return None


async def _queued(poller: Poller, count: int) -> bool:
    return await poller.store.redis.xlen(poller.store.keys.outbox) >= count


async def _is_live(client: redis.asyncio.Redis, epoch_key: str) -> bool:
    return await client.hget(epoch_key, "phase") == "live"
