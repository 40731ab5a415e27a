"""Bare aiohttp listings of the API: the baselines the notifier's listing is measured against.

    python bench/bare_listing.py API_URL --key KEY [--page-size 100] [--concurrency 1]

Imported by bench/list_requests.py, which times these loops in its own process, and run
as a process of its own by bench/cycle.py, which times the whole process: so this module
imports nothing but aiohttp, the least a script that lists the account must load. Run
alone, it lists every request (`--concurrency 1`: one page after another; more: page 1
for the total, then the other pages that many at a time) and prints how many it saw.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp

# The list endpoint under the API base URL; notifier.api.LIST_PATH, not imported from
# there, since importing the notifier would add its start-up to the baseline's.
LIST_PATH = "/v1/lipsync/requests"
CONCURRENCY = 4


async def bare_sequential(base_url: str, key: str, page_size: int) -> int:
    """The simplest correct loop: one page after another until the total is reached."""
    seen, offset, total = 0, 0, 1
    async with aiohttp.ClientSession(headers={"x-api-key": key}) as session:
        while offset < total:
            params = {"limit": page_size, "offset": offset}
            async with session.get(base_url + LIST_PATH, params=params) as response:
                body = await response.json()
            total = body["pagination"]["total"]
            offset += len(body["data"])
            seen += len(body["data"])
    return seen


async def bare_concurrent(
    base_url: str, key: str, page_size: int, concurrency: int = CONCURRENCY
) -> int:
    """Page 1 for the total, then every other page with `concurrency` requests in flight."""
    async with aiohttp.ClientSession(headers={"x-api-key": key}) as session:
        gate = asyncio.Semaphore(concurrency)

        async def page(offset: int) -> dict:
            async with (
                gate,
                session.get(
                    base_url + LIST_PATH, params={"limit": page_size, "offset": offset}
                ) as response,
            ):
                return await response.json()

        first = await page(0)
        step = len(first["data"]) or page_size
        rest = await asyncio.gather(
            *(page(offset) for offset in range(step, first["pagination"]["total"], step))
        )
    return sum(len(body["data"]) for body in [first, *rest])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("api_url", help="the API base URL, e.g. http://127.0.0.1:8000/api")
    parser.add_argument("--key", required=True, help="the API key the simulator accepts")
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=1, help="1 = the sequential loop")
    args = parser.parse_args()
    if args.concurrency == 1:
        listing = bare_sequential(args.api_url, args.key, args.page_size)
    else:
        listing = bare_concurrent(args.api_url, args.key, args.page_size, args.concurrency)
    print(asyncio.run(listing))


if __name__ == "__main__":
    main()
