"""API calls and time per poll cycle on a large account: full sweeps against incremental ones.

    python bench/sweep.py [--requests 100000] [--unfinished 50] [--cycles 10]

For each listing order, the simulator (in this process) holds `--requests` finished
requests and `--unfinished` recent ones in progress; a poller on a redis-server of its own
runs the baseline, then `--cycles` steady cycles while a few requests finish between
cycles. It prints the calls and time of each kind of cycle, against a full sweep forced
with `full_sweep_every = 1` on the same account.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from notifier.api import ApiClient
from notifier.config import standalone_settings
from notifier.poller import Poller
from notifier.simulator import Order, Simulator
from notifier.store import connect_redis
from notifier.tasks import running

from common import markdown_table, redis_server

KEY = "bench-key"
# The rate ceiling is a setting, not a cost: lift it to time the sweep's own work.
UNTHROTTLED = 1_000_000


async def steady_cycles(
    simulator: Simulator, redis_url: str, cycles: int, full_sweep_every: int
) -> list[tuple[int, float]]:
    """(calls, seconds) of each steady cycle after the baseline."""
    async with simulator.serve() as api_url:
        settings = standalone_settings(
            api_url=api_url,
            api_key=KEY,
            redis_url=redis_url,
            key_prefix=f"bench-{uuid.uuid4().hex[:8]}",
            webhook_url="http://127.0.0.1:9/hook",
            full_sweep_every=full_sweep_every,
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
                    await poller.cycle()
                    return [await _timed(poller, simulator) for _ in range(cycles)]
        finally:
            await client.aclose()


async def _timed(poller: Poller, simulator: Simulator) -> tuple[int, float]:
    """Two requests finish, then one cycle: its calls and seconds."""
    unfinished = [r for r in simulator.requests.values() if r.status == "processing"]
    for request in unfinished[:2]:
        simulator.complete(request.id)
    calls, started = simulator.calls, time.perf_counter()
    await poller.cycle()
    return simulator.calls - calls, time.perf_counter() - started


def main() -> None:
    """Print the figures of each order."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--unfinished", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=10)
    args = parser.parse_args()
    rows = []
    with redis_server() as port:
        url = f"redis://127.0.0.1:{port}/0"
        for order in (Order.NEWEST_FIRST, Order.OLDEST_FIRST):
            for every, kind in ((1, "full sweep"), (10_000, "incremental")):
                simulator = Simulator(api_key=KEY, order=order, seed=7)
                simulator.history(args.requests, args.unfinished)
                # Full sweeps are slow and all alike: three of them tell enough.
                count = args.cycles if every > 1 else min(args.cycles, 3)
                figures = asyncio.run(steady_cycles(simulator, url, count, every))
                calls = [c for c, _ in figures]
                seconds = statistics.median(s for _, s in figures)
                rows.append((order, kind, f"{max(calls)}", f"{seconds * 1000:,.1f} ms"))
    print(
        f"{args.requests:,} finished requests, {args.unfinished} unfinished, page size 100, "
        f"{args.cycles} steady incremental cycles and 3 full ones per order:\n"
    )
    print(markdown_table(("order", "cycle", "API calls (most)", "median time"), rows, left=2))


if __name__ == "__main__":
    main()
