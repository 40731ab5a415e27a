"""Time one complete listing through `ApiClient` against bare aiohttp loops, in the same run.

    python bench/list_requests.py [--requests 10000] [--page-size 100] [--runs 3]

The simulator runs in its own process with a frozen account. Each contender lists every
request (and decodes the JSON); the best of `--runs` is reported with its ratio to the
bare sequential loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp

from notifier.api import LIST_PATH, ApiClient
from notifier.config import load_settings

KEY = "bench-key"
CONCURRENCY = 4


async def bare_sequential(base_url: str, page_size: int) -> int:
    """The simplest correct loop: one page after another until the total is reached."""
    seen, offset, total = 0, 0, 1
    async with aiohttp.ClientSession(headers={"x-api-key": KEY}) as session:
        while offset < total:
            params = {"limit": page_size, "offset": offset}
            async with session.get(base_url + LIST_PATH, params=params) as response:
                body = await response.json()
            total = body["pagination"]["total"]
            offset += len(body["data"])
            seen += len(body["data"])
    return seen


async def bare_concurrent(base_url: str, page_size: int) -> int:
    """Page 1 for the total, then every other page with `CONCURRENCY` requests in flight."""
    async with aiohttp.ClientSession(headers={"x-api-key": KEY}) as session:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def page(offset: int) -> dict:
            async with (
                gate,
                session.get(
                    base_url + LIST_PATH, params={"limit": page_size, "offset": offset}
                ) as response,
            ):
                return await response.json()

        first = await page(0)
        step = len(first["data"])
        rest = await asyncio.gather(
            *(page(offset) for offset in range(step, first["pagination"]["total"], step))
        )
    return sum(len(body["data"]) for body in [first, *rest])


async def client_listing(base_url: str, page_size: int) -> int:
    """The notifier's client: validated requests, de-duplicated, complete or an error."""
    seen = 0
    settings = {"api_url": base_url, "api_key": KEY, "page_size": page_size}
    async with ApiClient(load_settings({**settings, "list_concurrency": CONCURRENCY})) as api:
        async for page in api.listing():
            seen += len(page.requests)
    return seen


def start_simulator(requests: int, page_size: int) -> tuple[subprocess.Popen[str], str]:
    """The simulator in its own process, frozen (no ticks), answering at most `page_size`."""
    process = subprocess.Popen(
        [
            sys.executable,
            *("-m", "notifier.simulator", "--port", "0", "--tick", "0", "--seed", "1"),
            *("--requests", str(requests), "--api-key", KEY, "--max-limit", str(page_size)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout or ():
        if match := re.search(r"(http://\S+/api)", line):
            return process, match.group(1)
    raise RuntimeError("the simulator exited before printing its URL")


async def time_once(
    contender: Callable[[str, int], Awaitable[int]], url: str, page_size: int, requests: int
) -> float:
    """Seconds one complete listing took; checked to have seen every request."""
    start = time.perf_counter()
    seen = await contender(url, page_size)
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
    process, url = start_simulator(args.requests, args.page_size)
    try:
        times = asyncio.run(measure(args, url))
    finally:
        process.terminate()
        process.wait()
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
