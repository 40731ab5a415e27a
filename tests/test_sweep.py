"""Incremental sweeps: steady cycles on a large account list only its new and unfinished
requests, and no transition is missed when the listing does not move as predicted.

Every poller test runs on fakeredis and on a real redis-server, against the simulator.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from datetime import timedelta

import pytest

from notifier.api import ApiError
from notifier.poller import Poller
from notifier.simulator import Fault, FaultKind, Order, Simulator
from notifier.sweep import NEWEST_FIRST, OLDEST_FIRST, Observed, SweepState

from conftest import RedisFactory
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


@pytest.mark.parametrize("order", [Order.NEWEST_FIRST, Order.OLDEST_FIRST])
async def test_a_steady_cycle_lists_only_new_and_unfinished_requests_in_3_calls(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str, order: Order
) -> None:
    simulator.order = order
    simulator.history(5_000, 50)
    settings = make_settings(api_url, page_size=100)
    async with poller_of(settings, redis_factory()) as poller:
        await poller.cycle()  # the baseline: a full sweep that learns the order
        calls = []
        expected: Transitions = Counter()
        for _ in range(8):
            before, made = statuses(simulator), simulator.calls
            simulator.progress(fail_ratio=0.2)
            expected += expected_transitions(before, statuses(simulator))
            result = await poller.cycle()
            calls.append(simulator.calls - made)
            assert result.listed < 200
        assert max(calls) <= 3, calls
        assert sum(expected.values()) > 20
        assert transitions(await outbox(poller)) == expected
        sweeps = poller.metrics.sweeps
        assert sweeps.labels("incremental")._value.get() == 8
        assert sweeps.labels("full")._value.get() == 1


async def test_a_full_sweep_runs_every_full_sweep_every_cycles(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.history(500, 10)
    settings = make_settings(api_url, page_size=100, full_sweep_every=3)
    async with poller_of(settings, redis_factory()) as poller:
        kinds = []
        for _ in range(7):
            made = simulator.calls
            await poller.cycle()
            kinds.append("full" if simulator.calls - made > 3 else "incremental")
        assert kinds == ["full", "incremental", "incremental"] * 2 + ["full"]


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


async def test_a_random_order_is_never_swept_incrementally(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.order = Order.RANDOM
    simulator.history(300, 20)
    async with poller_of(make_settings(api_url, page_size=50), redis_factory()) as poller:
        await poller.cycle()
        expected = await cycles(poller, simulator, 4, fail_ratio=0.2)
        assert transitions(await outbox(poller)) == expected
        assert poller.metrics.sweeps.labels("incremental")._value.get() == 0


@pytest.mark.parametrize("order", [Order.NEWEST_FIRST, Order.OLDEST_FIRST, Order.UNSTABLE])
async def test_requests_created_mid_cycle_are_never_missed(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str, order: Order
) -> None:
    simulator.order = order
    simulator.history(400, 30)
    async with poller_of(make_settings(api_url, page_size=20), redis_factory()) as poller:
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
        assert poller.metrics.sweeps.labels("rejected")._value.get() >= 1
        assert set(queued) == finished_since
        assert max(queued.values()) == 1


async def test_an_old_request_that_changes_is_caught_by_the_next_full_sweep(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    simulator.history(500, 10)
    # Stuck for 8 hours: older than stalled_after, so it is left to the full sweeps.
    (stuck,) = simulator.create(created_at=simulator.clock() - timedelta(hours=8))
    simulator.start(stuck.id)
    settings = make_settings(api_url, page_size=100, full_sweep_every=4)
    async with poller_of(settings, redis_factory()) as poller:
        await poller.cycle()  # full
        await poller.cycle()  # incremental
        simulator.complete(stuck.id)
        await poller.cycle()  # incremental: the stuck request is outside the window
        await poller.cycle()  # incremental
        assert not [e for e in await outbox(poller) if e.request.id == stuck.id]
        await poller.cycle()  # the 4th since the last full sweep: full
        (event,) = [e for e in await outbox(poller) if e.request.id == stuck.id]
        assert (event.status, event.previous_status) == ("completed", "processing")


async def test_a_stuck_request_does_not_pin_the_window(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    (stuck,) = simulator.create(created_at=simulator.clock() - timedelta(hours=20))
    simulator.start(stuck.id)
    simulator.history(3_000, 20)
    async with poller_of(make_settings(api_url, page_size=100), redis_factory()) as poller:
        await poller.cycle()
        made = simulator.calls
        await cycles(poller, simulator, 3)
        assert simulator.calls - made <= 9


async def test_a_batch_of_equal_created_at_in_an_unstable_order_is_swept_incrementally(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str
) -> None:
    # 300 requests submitted in the same second span 3 pages, and every response lists
    # them in a new order: each read of those pages finds only some of them.
    simulator.order = Order.UNSTABLE
    simulator.history(3_000, 0)
    submitted = simulator.clock().replace(microsecond=0)
    for request in simulator.create(300, reference_id="batch", created_at=submitted):
        simulator.start(request.id)
    async with poller_of(make_settings(api_url, page_size=100), redis_factory()) as poller:
        await poller.cycle()
        sweeps = poller.metrics.sweeps.labels("incremental")
        expected: Transitions = Counter()
        incremental_calls = []
        for _ in range(8):
            before, made, swept = statuses(simulator), simulator.calls, sweeps._value.get()
            simulator.progress(fail_ratio=0.2)
            expected += expected_transitions(before, statuses(simulator))
            await poller.cycle()
            if sweeps._value.get() > swept:
                incremental_calls.append(simulator.calls - made)
        assert transitions(await outbox(poller)) == expected
        assert len(incremental_calls) >= 6, incremental_calls
        assert sum(incremental_calls) / len(incremental_calls) <= 40, incremental_calls


def test_the_order_is_read_from_created_at_page_by_page() -> None:
    def observed(*pages: tuple[int, list[int]]) -> Observed:
        seen = Observed()
        seen.pages.update(pages)
        return seen

    assert observed((0, [5, 4, 4]), (3, [3, 1])).order() == NEWEST_FIRST
    assert observed((3, [4, 5]), (0, [1, 2, 3])).order() == OLDEST_FIRST
    assert observed((0, [5, 4]), (2, [6, 1])).order() is None


def test_a_stored_state_of_another_epoch_or_without_an_edge_is_not_used() -> None:
    state = SweepState("epoch-1", NEWEST_FIRST, 100, 90, frozenset({"a", "b"}), 1_700, 3)
    assert SweepState.parse(state.fields(), "epoch-1") == state
    assert SweepState.parse(state.fields(), "epoch-2") is None
    assert SweepState.parse({**state.fields(), "edge": ""}, "epoch-1") is None
    assert SweepState.parse({**state.fields(), "order": "random"}, "epoch-1") is None
    assert SweepState.parse({"epoch": "epoch-1"}, "epoch-1") is None


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
async def test_an_incremental_cycle_that_fails_half_way_loses_nothing(
    redis_factory: RedisFactory, simulator: Simulator, api_url: str, fault: Fault
) -> None:
    simulator.history(2_000, 150)  # a window of two pages
    async with poller_of(make_settings(api_url, page_size=100), redis_factory()) as poller:
        await poller.cycle()
        before = statuses(simulator)
        simulator.progress(fail_ratio=0.3)
        expected = expected_transitions(before, statuses(simulator))
        # The window's first page comes back; the fault hits its second.
        second = simulator.calls + 2
        simulator.hooks.append(lambda call: simulator.inject(fault) if call == second else None)
        with contextlib.suppress(ApiError):
            await poller.cycle()
        assert not simulator.faults  # the fault did hit a page of the window
        simulator.hooks.clear()
        await poller.cycle()
        assert sum(expected.values()) > 10
        assert transitions(await outbox(poller)) == expected
