"""Time one complete listing through `ApiClient` against bare aiohttp loops, in the same run.

    python bench/list_requests.py [--requests 10000] [--page-size 100] [--runs 3]

The simulator runs in its own process with a frozen account. Each contender lists every
request (and decodes the JSON; the bare loops are those of bench/bare_listing.py); the best
of `--runs` is reported with its ratio to the bare sequential loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable

from bare_listing import CONCURRENCY, bare_concurrent, bare_sequential

from notifier.api import ApiClient
from notifier.config import load_settings

from common import simulator_process

KEY = "bench-key"


async def client_listing(base_url: str, key: str, page_size: int) -> int:
    """The notifier's client: validated requests, de-duplicated, complete or an error."""
    seen = 0
    settings = {"api_url": base_url, "api_key": key, "page_size": page_size}
    async with ApiClient(load_settings({**settings, "list_concurrency": CONCURRENCY})) as api:
        async for page in api.listing():
            seen += len(page.requests)
    return seen


async def time_once(
    contender: Callable[[str, str, int], Awaitable[int]], url: str, page_size: int, requests: int
) -> float:
    """Seconds one complete listing took; checked to have seen every request."""
    start = time.perf_counter()
    seen = await contender(url, KEY, page_size)
    elapsed = time.perf_counter() - start
    if seen != requests:
        raise RuntimeError(f"{contender.__name__} saw {seen} requests, expected {requests}")
    return elapsed


async def measure(args: argparse.Namespace, url: str) -> dict[str, float]:
    """The best time of each contender over `args.runs` interleaved rounds."""
    contenders = (bare_sequential, bare_concurrent, client_listing)
    times = dict.fromkeys((contender.__name__ for contender in contenders), float("inf"))
    for _ in range(args.runs):  # interleaved, so drift hits every contender alike
        for contender in contenders:
            elapsed = await time_once(contender, url, args.page_size, args.requests)
            times[contender.__name__] = min(times[contender.__name__], elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    # The simulator answers at most `--page-size` items, whatever `limit` asks for.
    with simulator_process(args.requests, KEY, max_limit=args.page_size) as simulator:
        times = asyncio.run(measure(args, simulator.url))
    sequential, concurrent = times["bare_sequential"], times["bare_concurrent"]
    pages = -(-args.requests // args.page_size)
    print(
        f"listing {args.requests:,} requests, {pages} pages of {args.page_size}, "
        f"best of {args.runs}, {os.cpu_count()} CPUs, simulator in its own process"
    )
    for name, elapsed in times.items():
        print(
            f"  {name:<16} {elapsed * 1000:8.1f} ms   {elapsed / sequential:5.2f}x sequential"
            f"   {elapsed / concurrent:5.2f}x concurrent"
        )


if __name__ == "__main__":
    main()
