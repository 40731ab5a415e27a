"""The API rate ceiling: a token bucket shared by every page fetch, halved after a 429 and
recovering gradually; and the poller's idle interval."""

from __future__ import annotations

import pytest

from notifier.api import ApiClient, RateLimited
from notifier.config import load_settings
from notifier.poller import CycleResult, Poller
from notifier.simulator import Fault, FaultKind, Simulator
from notifier.store import memory_store
from notifier.throttle import Throttle

from samples import SIMULATOR_KEY


class FakeTime:
    """A clock that only moves when the throttle sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def throttle(rate: float, time: FakeTime) -> Throttle:
    return Throttle(rate, clock=time.clock, sleep=time.sleep)


async def test_calls_never_exceed_the_rate_after_a_one_second_burst() -> None:
    time = FakeTime()
    bucket = throttle(10, time)
    for _ in range(50):
        await bucket.take()
    assert time.now == pytest.approx(4.0)  # 10 at once, then one every 0.1 s


async def test_a_429_halves_the_rate_down_to_a_floor_and_successes_win_it_back() -> None:
    time = FakeTime()
    bucket = throttle(16, time)
    bucket.slowed()
    assert bucket.rate == 8
    for _ in range(10):
        bucket.slowed()
    assert bucket.rate == 1  # a sixteenth of the limit
    for _ in range(10):
        bucket.succeeded()
    assert bucket.rate == pytest.approx(1 + 10 * 16 / 20)
    for _ in range(20):
        bucket.succeeded()
    assert bucket.rate == 16


async def test_after_a_429_the_next_call_waits_for_a_fresh_token() -> None:
    time = FakeTime()
    bucket = throttle(10, time)
    await bucket.take()
    bucket.slowed()  # 5 calls a second, and the unspent burst is gone
    await bucket.take()
    assert time.now == pytest.approx(0.2)


async def test_every_page_fetch_goes_through_the_throttle(
    simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(30)
    settings = load_settings({"api_url": api_url, "api_key": SIMULATOR_KEY, "page_size": 10})
    async with ApiClient(settings) as api:
        taken = 0
        take = api.throttle.take

        async def counting() -> None:
            nonlocal taken
            taken += 1
            await take()

        api.throttle.take = counting  # type: ignore[method-assign]
        async for _ in api.listing():
            pass
        assert taken == simulator.calls == 3
        simulator.inject(Fault(FaultKind.RATE_LIMIT, retry_after="1"))
        with pytest.raises(RateLimited):
            await api.fetch_page(0, 10)
        assert api.throttle.rate == settings.api_rate_limit / 2


@pytest.mark.parametrize(
    ("unfinished", "events", "baseline", "interval"),
    [(0, 0, False, 30.0), (1, 0, False, 2.0), (0, 1, False, 2.0), (0, 0, True, 2.0)],
)
async def test_the_poller_stretches_to_the_idle_interval_when_nothing_is_unfinished(
    unfinished: int, events: int, baseline: bool, interval: float
) -> None:
    settings = load_settings({"api_key": SIMULATOR_KEY, "poll_interval": 2, "idle_interval": 30})
    async with ApiClient(settings) as api:
        poller = Poller(settings, memory_store(), api)
        result = CycleResult(baseline=baseline, events=events, unfinished=unfinished)
        assert poller.interval(result) == interval


async def test_without_an_idle_interval_the_poll_interval_always_applies() -> None:
    settings = load_settings({"api_key": SIMULATOR_KEY, "poll_interval": 2})
    async with ApiClient(settings) as api:
        poller = Poller(settings, memory_store(), api)
        assert poller.interval(CycleResult(baseline=False)) == 2


async def test_a_cycle_counts_the_unfinished_requests_it_listed(
    simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(40)
    busy = sum(r.status not in ("completed", "failed") for r in simulator.requests.values())
    settings = load_settings(
        {"api_url": api_url, "api_key": SIMULATOR_KEY, "webhook_url": "http://127.0.0.1:9/h"}
    )
    async with ApiClient(settings) as api:
        poller = Poller(settings, memory_store(), api)
        assert await poller.lease.acquire()
        assert (await poller.cycle()).unfinished == busy > 0
