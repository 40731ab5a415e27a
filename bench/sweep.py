"""Steady cycles on a large account: API calls per cycle and detection latency over one
whole safety-net period, in each listing order.

    python bench/sweep.py [--requests 100000] [--days 30] [--old 30] [--recent 50]
                          [--interval 0.5] [--period 120] [--duration S] [--rate 0]
                          [--orders ...]

The simulator (in this process) holds `--requests` finished requests created over
`--days` days, `--old` unfinished ones spread through the oldest of those days and
`--recent` new ones in progress. A `notifier run` poller (the real loop, on a redis-server
of its own, every `--interval` seconds) records the baseline with the API's rate lifted,
then runs for one safety-net period (`--period` seconds; `--duration` for less) while
every unfinished request moves on at random moments: queued ones start, processing ones
finish (a tenth fail).

Printed per order: API calls per steady cycle, averaged over the period, against the
target of 3 + the pages that hold the old unfinished requests; safety-net pages read; and
detection latency, from a status change to its event in the outbox (p50, p99, max),
against the target p99 ≤ interval + 0.5 s. With `--rate N`, the API allows N list calls a
second after the baseline (60 a minute: `--rate 1`), and the table shows what the
notifier does then: its calls a minute, and how long a whole safety-net pass takes at the
pages a cycle it could give the safety net.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from notifier.api import ApiClient
from notifier.config import standalone_settings
from notifier.keys import Keys
from notifier.models import Event
from notifier.outbox import read_entry
from notifier.poller import Poller
from notifier.simulator import Order, SimulatedRequest, Simulator
from notifier.store import connect_redis
from notifier.tasks import running

from common import markdown_table, redis_server

KEY = "bench-key"
PAGE = 100
UNTHROTTLED = 1_000_000  # the rate ceiling is a setting, not a cost: lifted for the baseline
ORDERS = {"newest-first": Order.NEWEST_FIRST, "oldest-first": Order.OLDEST_FIRST}
ORDERS["unstable"] = Order.UNSTABLE


@dataclass(frozen=True)
class Figures:
    """What one order's period showed."""

    cycles: int
    calls: int
    net_pages: int
    holding: int  # pages that held the old unfinished requests at the start
    latencies: list[float]  # seconds, status change -> event in the outbox
    changes: int  # notified changes made during the period
    seconds: float  # how long the steady cycles ran
    pages: int  # pages of the whole listing

    @property
    def calls_per_cycle(self) -> float:
        return self.calls / max(1, self.cycles)

    @property
    def pass_minutes(self) -> float:
        """How long a whole safety-net pass takes at the pages a cycle it read."""
        per_second = self.net_pages / self.seconds
        return self.pages / per_second / 60 if per_second else math.inf


def account(args: argparse.Namespace, order: Order) -> tuple[Simulator, list[SimulatedRequest]]:
    """The simulated account, and its old unfinished requests."""
    simulator = Simulator(api_key=KEY, order=order, seed=7)
    simulator.history(args.requests, args.recent, span=timedelta(days=args.days))
    rng = random.Random(11)  # noqa: S311 - reproducible sample data
    now = simulator.clock()
    old = []
    for _ in range(args.old):
        created = now - timedelta(days=args.days - rng.random())  # within the oldest day
        (request,) = simulator.create(created_at=created.replace(microsecond=0))
        if rng.random() < 0.5:
            simulator.start(request.id)
        old.append(request)
    return simulator, old


def pages_holding(simulator: Simulator, requests: list[SimulatedRequest]) -> int:
    """How many pages of the listing hold `requests`."""
    items, _ = simulator.page(0, len(simulator.requests))
    wanted = {request.id for request in requests}
    return len({index // PAGE for index, item in enumerate(items) if item["id"] in wanted})


async def move_on(
    simulator: Simulator, seconds: float, changed: dict[tuple[str, str], float]
) -> None:
    """Move every unfinished request on at random moments over `seconds`, a step at a
    time, noting when each notified change was made (unix seconds)."""
    rng = random.Random(3)  # noqa: S311 - reproducible sample data
    steps = []
    for request in simulator.requests.values():
        if request.status in ("queued", "processing"):
            moments = sorted(rng.uniform(0.05, 0.95) * seconds for _ in range(2))
            steps += [(moment, request.id) for moment in moments]
    steps.sort()
    started = time.monotonic()
    for moment, request_id in steps:
        await asyncio.sleep(max(0.0, started + moment - time.monotonic()))
        request = simulator.requests[request_id]
        if request.status == "queued":
            simulator.start(request_id)
        elif request.status == "processing":
            if rng.random() < 0.1:
                simulator.fail(request_id)
            else:
                simulator.complete(request_id)
            changed[(request_id, request.status)] = time.time()


async def measure(args: argparse.Namespace, order: Order, redis_url: str) -> Figures:
    """Run the baseline, then one safety-net period of steady cycles."""
    simulator, old = account(args, order)
    holding = pages_holding(simulator, old)
    async with simulator.serve() as api_url:
        settings = standalone_settings(
            api_url=api_url,
            api_key=KEY,
            redis_url=redis_url,
            key_prefix=f"bench-{uuid.uuid4().hex[:8]}",
            webhook_url="http://127.0.0.1:9/hook",
            poll_interval=args.interval,
            safety_net_period=args.period,
            page_size=PAGE,
            api_rate_limit=UNTHROTTLED,
            http_port=0,
        )
        client = connect_redis(redis_url)
        try:
            async with ApiClient(settings) as api:
                poller = Poller(settings, client, api)
                if not await poller.lease.acquire():
                    raise SystemExit("another poller holds the benchmark's lease")
                async with running(poller.lease.keep_renewed):
                    await poller.cycle()  # the baseline
                if args.rate:
                    api.throttle.limit = api.throttle.rate = args.rate
                completed = poller.metrics.cycles.labels("completed")
                before = (simulator.calls, completed._value.get(), _net(poller))
                changed: dict[tuple[str, str], float] = {}
                stop = asyncio.Event()
                started = time.monotonic()
                loop = asyncio.create_task(poller.run(stop))
                duration = args.duration or args.period
                await move_on(simulator, duration, changed)
                await asyncio.sleep(max(0.0, duration * 0.05) + 2 * args.interval)
                stop.set()
                await loop
                seconds = time.monotonic() - started
                detected = await _detected(client, settings.key_prefix)
        finally:
            await client.aclose()
    latencies = [detected[key] - at for key, at in changed.items() if key in detected]
    if len(latencies) < len(changed):
        raise SystemExit(f"{len(changed) - len(latencies)} changes were never notified")
    return Figures(
        cycles=int(completed._value.get() - before[1]),
        calls=simulator.calls - before[0],
        net_pages=_net(poller) - before[2],
        holding=holding,
        latencies=latencies,
        changes=len(changed),
        seconds=seconds,
        pages=math.ceil(len(simulator.requests) / PAGE),
    )


def _net(poller: Poller) -> int:
    return int(poller.metrics.safety_net_pages._value.get())


async def _detected(client: object, prefix: str) -> dict[tuple[str, str], float]:
    """(request id, status) -> when the poller queued its event (unix seconds)."""
    entries = await client.xrange(Keys(prefix).outbox)  # type: ignore[attr-defined]
    events = [read_entry(fields) for _, fields in entries]
    return {
        (event.request.id, event.status): event.detected_ms / 1000
        for event in events
        if isinstance(event, Event)
    }


def percentile(values: Sequence[float], share: float) -> float:
    """The `share` percentile of `values` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--days", type=float, default=30, help="the account's age")
    parser.add_argument("--old", type=int, default=30, help="unfinished in the oldest day")
    parser.add_argument("--recent", type=int, default=50, help="new ones in progress")
    parser.add_argument("--interval", type=float, default=0.5, help="NOTIFIER_POLL_INTERVAL")
    parser.add_argument("--period", type=float, default=120, help="safety-net period (s)")
    parser.add_argument("--duration", type=float, default=0, help="seconds (0: one period)")
    parser.add_argument("--rate", type=float, default=0, help="API calls a second (0: none)")
    parser.add_argument("--orders", nargs="+", choices=list(ORDERS), default=list(ORDERS))
    args = parser.parse_args()
    rows = []
    with redis_server() as port:
        url = f"redis://127.0.0.1:{port}/0"
        for name in args.orders:
            figures = asyncio.run(measure(args, ORDERS[name], url))
            lat = figures.latencies
            rows.append(
                (
                    name,
                    f"{figures.calls_per_cycle:.2f}",
                    f"≤ {3 + figures.holding}",
                    f"{figures.net_pages / max(1, figures.cycles):.2f}",
                    f"{figures.pass_minutes:,.1f} min",
                    f"{figures.calls / figures.seconds * 60:.1f}",
                    figures.cycles,
                    figures.changes,
                    f"{statistics.median(lat):.2f} s",
                    f"{percentile(lat, 0.99):.2f} s",
                    f"{max(lat):.2f} s",
                )
            )
    rate = f"{args.rate:g} list calls a second" if args.rate else "no API rate limit"
    print(
        f"{args.requests:,} finished requests over {args.days:g} days, {args.old} unfinished "
        f"in the oldest day, {args.recent} recent; pages of {PAGE}; poll interval "
        f"{args.interval:g} s; safety-net period {args.period:g} s, observed for "
        f"{args.duration or args.period:g} s; {rate} after the baseline; detection target "
        f"p99 ≤ {args.interval + 0.5:g} s\n"
    )
    headers = (
        "order",
        "API calls / cycle",
        "target",
        "safety-net pages / cycle",
        "safety-net pass",
        "API calls / minute",
        "cycles",
        "changes",
        "detection p50",
        "p99",
        "max",
    )
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
