"""Steady cycles on large accounts: each reads the head of the listing, the page of every
request the notifier knows to be unfinished whatever its age, and a slice of the safety
net; no transition is missed when the listing moves, shuffles ties or loses requests.

Every poller test runs on fakeredis and on a real redis-server, against the simulator.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from notifier.api import ApiError, ListResponse
from notifier.models import LipsyncRequest
from notifier.poller import Poller
from notifier.simulator import Fault, FaultKind, Order, SimulatedRequest, Simulator
from notifier.sweep import (
    NEWEST_FIRST,
    OLDEST_FIRST,
    Observed,
    SweepState,
    WindowMismatch,
    check_order,
    net_budget,
    net_slice,
)

from conftest import FakeClock, RedisFactory
from polling import (
    NOTIFY_ON,
    expected_transitions,
    make_settings,
    outbox,
    poller_of,
    statuses,
    transitions,
)

Transitions = Counter[tuple[str, str, str | None]]
ORDERS = [Order.NEWEST_FIRST, Order.OLDEST_FIRST, Order.UNSTABLE]


def old_unfinished(simulator: Simulator, count: int) -> list[SimulatedRequest]:
    """`count` requests still queued or in progress, created through the past day among
    `history`'s finished ones: each on a page of its own, mostly."""
    rng = random.Random(count)
    now = simulator.clock()
    requests = []
    for _ in range(count):
        created = now - timedelta(hours=1, seconds=rng.randrange(82_800))
        (request,) = simulator.create(created_at=created.replace(microsecond=0))
        if rng.random() < 0.5:
            simulator.start(request.id)
        requests.append(request)
    return requests


def pages_holding(simulator: Simulator, requests: list[SimulatedRequest], page: int) -> int:
    """How many pages of `page` items the listing spreads `requests` over."""
    items, _ = simulator.page(0, len(simulator.requests))
    wanted = {request.id for request in requests}
    return len({index // page for index, item in enumerate(items) if item["id"] in wanted})


def finish_some(simulator: Simulator, requests: list[SimulatedRequest], count: int) -> None:
    """Move `count` of `requests` on by one step: queued ones start, others finish."""
    moving = [r for r in requests if r.status in ("queued", "processing")][:count]
    for request in moving:
        if request.status == "queued":
            simulator.start(request.id)
        else:
            simulator.complete(request.id)


@pytest.mark.parametrize("order", ORDERS)
async def test_a_steady_cycle_reads_the_head_and_the_pages_of_old_unfinished_requests(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str, order: Order
) -> None:
    simulator.order = order
    simulator.history(5_000, 50)
    old = old_unfinished(simulator, 30)
    settings = make_settings(api_url, page_size=100, safety_net_period=10**6)
    async with poller_of(settings, redis_factory()) as poller:
        await poller.cycle()  # the baseline: a whole listing that learns the order
        calls = []
        expected: Transitions = Counter()
        for _ in range(8):
            before, made = statuses(simulator), simulator.calls
            # The pages the cycle must read for the old ones it knows to be unfinished.
            waiting = [r for r in old if r.status in ("queued", "processing")]
            holding = pages_holding(simulator, waiting, 100)
            simulator.progress(fail_ratio=0.2)
            finish_some(simulator, old, 4)
            expected += expected_transitions(before, statuses(simulator))
            await poller.cycle()
            calls.append((simulator.calls - made, holding))
        made, holding = (sum(column) / len(calls) for column in zip(*calls, strict=True))
        print(f"\n{order}: (calls, pages holding old unfinished) per cycle: {calls}")
        assert made <= 3 + holding, calls
        assert transitions(await outbox(poller)) == expected
        assert sum(1 for rid, *_ in expected if rid in {r.id for r in old}) >= 20
        sweeps = poller.metrics.sweeps
        assert sweeps.labels("incremental")._value.get() == 8
        assert sweeps.labels("full")._value.get() == 1


@pytest.mark.parametrize("order", ORDERS)
async def test_each_step_of_a_day_old_request_is_seen_by_the_next_cycle(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str, order: Order
) -> None:
    simulator.order = order
    simulator.history(3_000, 20)
    (old,) = old_unfinished(simulator, 1)
    settings = make_settings(api_url, page_size=100, safety_net_period=10**6)
    async with poller_of(settings, redis_factory()) as poller:
        await poller.cycle()
        for step in ("queued", "processing", "completed"):
            if step == "processing" and old.status == "queued":
                simulator.start(old.id)
            elif step == "completed":
                if old.status == "queued":
                    simulator.start(old.id)
                    await poller.cycle()
                simulator.complete(old.id)
            await poller.cycle()
            assert (await poller.store.stored(old.id)).status == old.status
        (event,) = [e for e in await outbox(poller) if e.request.id == old.id]
        assert (event.status, event.previous_status) == ("completed", "processing")
        assert poller.metrics.sweeps.labels("full")._value.get() == 1  # the baseline only


@pytest.mark.parametrize("order", ORDERS)
async def test_requests_created_mid_cycle_are_never_missed(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str, order: Order
) -> None:
    simulator.order = order
    simulator.history(400, 30)
    old = old_unfinished(simulator, 10)
    settings = make_settings(api_url, page_size=20, safety_net_period=10**6)
    async with poller_of(settings, redis_factory()) as poller:
        await poller.cycle()
        at_baseline = statuses(simulator)

        created_at_call = 0

        def create(call: int) -> None:
            # The cycle's second list call creates two requests, one of them already failed.
            if call == created_at_call:
                _, failed = simulator.create(2, reference_id="mid-cycle")
                simulator.fail(failed.id)

        simulator.hooks.append(create)
        for _ in range(6):
            created_at_call = simulator.calls + 2
            simulator.progress(fail_ratio=0.3)
            finish_some(simulator, old, 1)  # some stay unfinished: a cycle reads 2+ pages
            await poller.cycle()
        simulator.hooks.clear()
        await poller.cycle()  # nothing moves: whatever is finished has been seen
        queued = Counter((rid, status) for rid, status, _ in transitions(await outbox(poller)))
        finished_since = {
            (rid, status)
            for rid, status in statuses(simulator).items()
            if status in NOTIFY_ON and at_baseline.get(rid) != status
        }
        assert len([rid for rid in statuses(simulator) if rid not in at_baseline]) >= 10
        assert set(queued) == finished_since
        assert max(queued.values()) == 1


@pytest.mark.parametrize("later", [Order.OLDEST_FIRST, Order.RANDOM])
async def test_no_transition_is_missed_when_the_order_changes_under_the_sweep(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str, later: Order
) -> None:
    simulator.history(600, 40)
    settings = make_settings(api_url, page_size=50)
    async with poller_of(settings, redis_factory()) as poller:
        await poller.cycle()
        expected = await cycles(poller, simulator, 2, fail_ratio=0.2)
        simulator.order = later  # what the sweep learned is now wrong
        expected += await cycles(poller, simulator, 4, fail_ratio=0.2)
        assert transitions(await outbox(poller)) == expected
        assert poller.metrics.sweeps.labels("rejected")._value.get() >= 1


async def cycles(
    poller: Poller, simulator: Simulator, count: int, **progress: float
) -> Transitions:
    """Run `count` cycles, moving the account on before each; the transitions expected."""
    expected: Transitions = Counter()
    for _ in range(count):
        before = statuses(simulator)
        simulator.progress(**progress)
        expected += expected_transitions(before, statuses(simulator))
        await poller.cycle()
    return expected


async def test_a_random_order_always_lists_everything(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.order = Order.RANDOM
    simulator.history(300, 20)
    async with poller_of(make_settings(api_url, page_size=50), redis_factory()) as poller:
        await poller.cycle()
        expected = await cycles(poller, simulator, 4, fail_ratio=0.2)
        assert transitions(await outbox(poller)) == expected
        assert poller.metrics.sweeps.labels("incremental")._value.get() == 0


@pytest.mark.parametrize("order", ORDERS)
async def test_a_deleted_unfinished_request_is_shown_gone_and_no_longer_looked_for(
    redis_factory: RedisFactory,
    simulator: Simulator,
    api_url: str,
    caplog: pytest.LogCaptureFixture,
    order: Order,
) -> None:
    simulator.order = order
    simulator.history(3_000, 10)
    kept, deleted = old_unfinished(simulator, 2)
    settings = make_settings(api_url, page_size=100, safety_net_period=10**6)
    async with poller_of(settings, redis_factory()) as poller:
        await poller.cycle()
        simulator.delete(deleted.id)
        for request in simulator.create(3):  # the listing moves as well
            simulator.fail(request.id)
        await poller.cycle()
        assert deleted.id not in await poller.store.unfinished()
        assert kept.id in await poller.store.unfinished()
        assert poller.metrics.gone._value.get() == 1
        assert poller.metrics.sweeps.labels("full")._value.get() == 1  # no full listing
        made = simulator.calls
        await poller.cycle()
        assert simulator.calls - made <= 3  # the head and the kept request's page
    (warning,) = [r for r in caplog.records if "no longer holds it" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert deleted.id in warning.getMessage()


async def test_many_deletions_before_an_old_request_are_followed_to_its_new_place(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.history(3_000, 10)
    (old,) = old_unfinished(simulator, 1)
    settings = make_settings(api_url, page_size=100, safety_net_period=10**6)
    async with poller_of(settings, redis_factory()) as poller:
        await poller.cycle()
        # 250 deletions between it and the head: it moves 2.5 pages from where it was.
        finished = [r for r in simulator.requests.values() if r.status == "completed"]
        for request in finished[:250]:
            simulator.delete(request.id)
        if old.status == "queued":
            simulator.start(old.id)
        simulator.complete(old.id)
        await poller.cycle()
        (event,) = [e for e in await outbox(poller) if e.request.id == old.id]
        assert event.status == "completed"
        assert poller.metrics.sweeps.labels("full")._value.get() == 1


async def test_a_finished_request_that_changes_again_is_seen_within_one_safety_net_period(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.history(2_000, 0)
    changed = next(r for r in simulator.requests.values() if r.status == "completed")
    clock = FakeClock()
    # 20 pages over 100 s, a cycle every 10 s: two pages a cycle, the whole listing in 10.
    settings = make_settings(api_url, page_size=100, safety_net_period=100, poll_interval=10)
    async with poller_of(settings, redis_factory(), clock=clock) as poller:
        await poller.cycle()
        changed.status, changed.error_message = "failed", "re-run: the output was corrupt"
        seen_after = None
        for cycle in range(1, 12):
            clock.advance(10)
            await poller.cycle()
            if seen_after is None and any(e.request.id == changed.id for e in await outbox(poller)):
                seen_after = cycle
        assert seen_after is not None
        assert seen_after <= 10
        (event,) = [e for e in await outbox(poller) if e.request.id == changed.id]
        assert (event.status, event.previous_status) == ("failed", "completed")
        assert poller.metrics.safety_net_pages._value.get() >= 20


async def test_a_request_the_listing_order_hid_is_recorded_within_one_period(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.history(1_000, 0)
    clock = FakeClock()
    settings = make_settings(api_url, page_size=100, safety_net_period=50, poll_interval=10)
    async with poller_of(settings, redis_factory(), clock=clock) as poller:
        await poller.cycle()
        # Backfilled by the API among old requests: the head never sees it.
        (hidden,) = simulator.create(created_at=simulator.clock() - timedelta(hours=20))
        for _ in range(6):
            clock.advance(10)
            await poller.cycle()
        assert await poller.store.stored(hidden.id) is not None


async def test_ties_of_equal_created_at_across_page_boundaries_in_an_unstable_order(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    # 300 requests submitted in the same second span 3 pages, and every response lists
    # them in a new order: each read of those pages finds only some of them.
    simulator.order = Order.UNSTABLE
    simulator.history(3_000, 0)
    submitted = simulator.clock().replace(microsecond=0)
    for request in simulator.create(300, reference_id="batch", created_at=submitted):
        simulator.start(request.id)
    settings = make_settings(api_url, page_size=100, safety_net_period=10**6)
    async with poller_of(settings, redis_factory()) as poller:
        await poller.cycle()
        expected: Transitions = Counter()
        steady_calls = []
        for _ in range(8):
            before, made = statuses(simulator), simulator.calls
            simulator.progress(fail_ratio=0.2)
            expected += expected_transitions(before, statuses(simulator))
            await poller.cycle()
            steady_calls.append(simulator.calls - made)
        assert transitions(await outbox(poller)) == expected
        assert sum(steady_calls) / len(steady_calls) <= 40, steady_calls


async def test_the_safety_net_reads_the_whole_listing_once_per_period(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.history(1_000, 0)  # 10 pages
    clock = FakeClock()
    settings = make_settings(api_url, page_size=100, safety_net_period=100, poll_interval=20)
    async with poller_of(settings, redis_factory(), clock=clock) as poller:
        await poller.cycle()
        read = []
        for _ in range(5):  # one period: 5 cycles of 20 s, 2 pages each
            clock.advance(20)
            before = poller.metrics.safety_net_pages._value.get()
            await poller.cycle()
            read.append(poller.metrics.safety_net_pages._value.get() - before)
        assert read == [2, 2, 2, 2, 2]
        assert (await poller.store.sweep())["cursor"] == "0"  # the pass came round


async def test_the_safety_net_takes_at_most_its_share_of_the_api_rate(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.history(800, 0)  # 8 pages
    clock = FakeClock()
    # A whole pass is owed at once, but 4 calls a second over a 1 s interval leave the
    # safety net 2, less the head's one call.
    settings = make_settings(
        api_url, page_size=100, safety_net_period=1, poll_interval=1, api_rate_limit=4
    )
    async with poller_of(settings, redis_factory(), clock=clock) as poller:
        await poller.cycle()
        clock.advance(1000)
        made = simulator.calls
        await poller.cycle()
        assert simulator.calls - made == 2


@pytest.mark.parametrize(
    "fault",
    [
        Fault(FaultKind.SERVER_ERROR),
        Fault(FaultKind.RATE_LIMIT, retry_after="1"),
        Fault(FaultKind.INVALID_JSON),
        Fault(FaultKind.MALFORMED_ITEM, index=3, field="status", value=None),
    ],
    ids=lambda fault: fault.kind.value,
)
async def test_a_steady_cycle_that_fails_half_way_loses_nothing(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str, fault: Fault
) -> None:
    simulator.history(2_000, 150)  # a head of two pages
    old = old_unfinished(simulator, 20)
    settings = make_settings(api_url, page_size=100, safety_net_period=10**6)
    async with poller_of(settings, redis_factory()) as poller:
        await poller.cycle()
        before = statuses(simulator)
        simulator.progress(fail_ratio=0.3)
        finish_some(simulator, old, 10)
        expected = expected_transitions(before, statuses(simulator))
        # The first page comes back; the fault hits the second.
        second = simulator.calls + 2
        simulator.hooks.append(lambda call: simulator.inject(fault) if call == second else None)
        with contextlib.suppress(ApiError):
            await poller.cycle()
        assert not simulator.faults  # the fault did hit a page
        simulator.hooks.clear()
        await poller.cycle()
        assert sum(expected.values()) > 10
        assert transitions(await outbox(poller)) == expected


# The pieces.


def response(offset: int, stamps: list[int], total: int = 1000) -> ListResponse:
    requests = [
        LipsyncRequest.model_validate(
            {"id": f"r{offset + i}", "status": "completed", "created_at": stamp / 1000}
        )
        for i, stamp in enumerate(stamps)
    ]
    return ListResponse(offset, requests, [], total, 100)


def test_a_page_out_of_the_learned_order_is_a_mismatch() -> None:
    check_order([response(0, [5_000, 4_000, 4_000, 1_000])], NEWEST_FIRST)
    check_order([response(0, [1_000, 4_000, 4_000])], OLDEST_FIRST)
    with pytest.raises(WindowMismatch, match="offset 7 is not newest-first"):
        check_order([response(7, [5_000, 6_000])], NEWEST_FIRST)


def test_the_safety_net_earns_pages_with_time_and_wraps_round() -> None:
    state = SweepState("e", NEWEST_FIRST, 1_000, 0, frozenset(), cursor=800, at_ms=0)
    # 10 pages over 100 s: 30 s earn 3 pages, read from the cursor round to the start.
    net = net_slice(state, 1_000, 100, now_ms=30_000, period_s=100, most=99)
    assert (net.offsets, net.cursor, net.credit) == ([800, 900, 0], 100, 0.0)
    # At most `most` now; the rest stays owed, but never more than a whole pass.
    net = net_slice(state, 1_000, 100, now_ms=10**9, period_s=100, most=2)
    assert (net.offsets, net.credit) == ([800, 900], 8.0)


def test_the_safety_net_budget_is_a_share_of_the_rate_less_what_the_cycle_spent() -> None:
    assert net_budget(rate=100, interval=15, spent=3) == 747
    assert net_budget(rate=1, interval=15, spent=3) == 4
    assert net_budget(rate=1, interval=2, spent=5) == 0


def test_a_stored_state_of_another_epoch_or_order_is_not_used() -> None:
    state = SweepState("epoch-1", NEWEST_FIRST, 100, 1_700, frozenset({"a", "b"}), 40, 1.5, 9)
    assert SweepState.parse(state.fields(), "epoch-1") == state
    assert SweepState.parse(state.fields(), "epoch-2") is None
    assert SweepState.parse({**state.fields(), "order": "random"}, "epoch-1") is None
    assert SweepState.parse({**state.fields(), "credit": "nan"}, "epoch-1") is None
    assert SweepState.parse({"epoch": "epoch-1"}, "epoch-1") is None


async def test_a_malformed_item_in_the_account_does_not_force_whole_listings(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.history(1_000, 10)
    (odd,) = simulator.create()
    odd.created_at = datetime(1, 1, 1, tzinfo=UTC)  # skipped by every read of its page
    async with poller_of(make_settings(api_url, page_size=100), redis_factory()) as poller:
        await poller.cycle()
        expected = await cycles(poller, simulator, 3, fail_ratio=0.2)
        assert transitions(await outbox(poller)) == expected
        assert poller.metrics.sweeps.labels("full")._value.get() == 1


def test_the_order_is_read_from_each_page_and_where_pages_meet() -> None:
    def observed(*pages: tuple[int, list[int]]) -> Observed:
        seen = Observed()
        for offset, stamps in pages:
            seen.add(response(offset, stamps))
        return seen

    assert observed((0, [5, 4, 4]), (3, [3, 1])).order() == NEWEST_FIRST
    assert observed((3, [4, 5]), (0, [1, 2, 3])).order() == OLDEST_FIRST
    assert observed((0, [5, 4]), (2, [6, 1])).order() is None  # inside a page
    assert observed((0, [5, 4]), (2, [6, 6])).order() is None  # where two pages meet
    assert observed((0, [9, 8, 7]), (1, [8, 7, 6])).order() == NEWEST_FIRST  # overlapping
    seen = observed((0, [9, 9, 8]), (3, [7]))
    assert (seen.newest, seen.edge) == (9, {"r0", "r1"})
