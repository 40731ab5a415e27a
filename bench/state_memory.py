"""Measure Redis memory per tracked request for the store's request state, on a real redis-server.

    python bench/state_memory.py [--requests 100000] [--page-size 100] [--seed 1]

The script starts its own redis-server (a free port on 127.0.0.1, persistence off, a
temporary directory) and stops it at the end. Under the lease, a baseline cycle applies
`--requests` requests with UUID4 ids (70% completed, 10% failed, 10% queued, 10%
processing, created over 30 days) through `Store.apply`, then a second cycle lists them
all again with every queued request now processing and every processing one completed.

Reported: the growth of `INFO memory` used_memory from after `begin` to after each cycle,
divided by the request count; the exact `MEMORY USAGE` of the 4,096 state buckets divided
by the request count; the buckets' encodings; and the apply rate. Three things that are
not request state are kept out of used_memory: the benchmark connection's own buffers
(mem_clients_normal, subtracted), the latency histogram Redis 7 allocates for each
command on its first call (latency tracking is turned off), and the outbox the second
cycle fills (measured, then deleted: it is delivery backlog, drained by the workers).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from datetime import UTC, datetime, timedelta

import redis
import redis.asyncio

from notifier.config import load_settings
from notifier.keys import STATE_BUCKETS
from notifier.models import LipsyncRequest
from notifier.store import Epoch, Store, load_script

from common import redis_server

TARGET_BYTES = 120  # per tracked request, at 100,000 requests
TARGET_AT = 100_000
TOKEN = "bench-lease-token"  # noqa: S105 - a lease token, not a secret
SPREAD = timedelta(days=30)
# The second cycle's listing: what each status has become since the first.
ADVANCE = {"queued": "processing", "processing": "completed"}


def make_requests(count: int, seed: int) -> list[LipsyncRequest]:
    """`count` requests, newest first as the API lists them, with a realistic status mix."""
    rng = random.Random(seed)  # noqa: S311 - reproducible sample data, not a secret
    now = datetime.now(UTC)
    requests = []
    for _ in range(count):
        created = now - SPREAD * rng.random()
        roll = rng.random()
        status = (
            "completed"
            if roll < 0.7
            else "failed"
            if roll < 0.8
            else "queued"
            if roll < 0.9
            else "processing"
        )
        requests.append(build(str(uuid.UUID(int=rng.getrandbits(128), version=4)), status, created))
    requests.sort(key=lambda request: request.created_at, reverse=True)
    return requests


def build(request_id: str, status: str, created: datetime) -> LipsyncRequest:
    """A request as the API would list it in this status."""
    finished = status in ("completed", "failed")
    return LipsyncRequest(
        id=request_id,
        status=status,
        created_at=created,
        started_at=created + timedelta(seconds=5) if status != "queued" else None,
        finished_at=created + timedelta(seconds=90) if finished else None,
        output_url=f"https://cdn.example.com/{request_id}.mp4" if status == "completed" else None,
        error_message="face not detected" if status == "failed" else None,
    )


def advanced(requests: Sequence[LipsyncRequest]) -> list[LipsyncRequest]:
    """The same requests a while later: queued ones processing, processing ones completed."""
    return [
        build(request.id, ADVANCE[request.status], request.created_at)
        if request.status in ADVANCE
        else request
        for request in requests
    ]


async def cycle(
    store: Store, requests: Sequence[LipsyncRequest], page_size: int
) -> tuple[float, int, int]:
    """One complete cycle under the lease: seconds it took, requests changed, events queued."""
    epoch: Epoch = await store.begin(TOKEN, False)
    changed = events = 0
    start = time.perf_counter()
    for offset in range(0, len(requests), page_size):
        applied = await store.apply(requests[offset : offset + page_size], epoch, TOKEN)
        changed += applied.changed
        events += applied.events
    await store.finish(epoch, TOKEN)
    return time.perf_counter() - start, changed, events


async def used_memory(client: redis.asyncio.Redis) -> int:
    """used_memory less this connection's buffers, which hold pages, not state."""
    info = await client.info("memory")
    return int(info["used_memory"]) - int(info["mem_clients_normal"])


async def bucket_figures(client: redis.asyncio.Redis, store: Store) -> dict[str, object]:
    """Exact MEMORY USAGE of every state bucket, their sizes and encodings."""
    keys = [store.keys.state(bucket) for bucket in range(STATE_BUCKETS)]
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.memory_usage(key, samples=0)
            pipe.hlen(key)
            pipe.object("encoding", key)
        replies = await pipe.execute()
    usages, lengths, encodings = replies[0::3], replies[1::3], replies[2::3]
    config = await client.config_get("hash-max-listpack-entries")
    limit = int(config["hash-max-listpack-entries"])
    return {
        "bytes": sum(usage or 0 for usage in usages),
        "tracked": sum(lengths),
        "sample": encodings[0],
        "listpack": encodings.count("listpack"),
        "hashtable": encodings.count("hashtable"),
        "empty": encodings.count(None),
        "max_len": max(lengths),
        "limit": limit,
        "over_limit": sum(length > limit for length in lengths),
    }


async def measure(port: int, args: argparse.Namespace) -> None:
    requests = make_requests(args.requests, args.seed)
    later = advanced(requests)
    client = redis.asyncio.Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        # No ~25 KB histogram per command on its first call; an older Redis has none.
        with suppress(redis.ResponseError):
            await client.config_set("latency-tracking", "no")
        store = Store(client, load_settings({"key_prefix": "bench"}))
        await client.set(store.keys.lease, TOKEN)
        await store.begin(TOKEN, False)  # the epoch exists before the baseline figure
        for name in ("begin", "apply", "finish", "prune"):  # the script cache too
            await client.script_load(load_script(client, name, common=True).script)
        before = await used_memory(client)

        first_s, first_changed, _ = await cycle(store, requests, args.page_size)
        after_first = await used_memory(client)
        first = await bucket_figures(client, store)

        second_s, second_changed, events = await cycle(store, later, args.page_size)
        outbox_bytes = await client.memory_usage(store.keys.outbox, samples=0) or 0
        await client.delete(store.keys.outbox)
        after_second = await used_memory(client)
        second = await bucket_figures(client, store)
        version = (await client.info("server"))["redis_version"]
    finally:
        await client.aclose()

    n = args.requests
    if first["tracked"] != n or second["tracked"] != n:
        raise RuntimeError(f"tracked {first['tracked']}/{second['tracked']}, expected {n}")
    pages = -(-n // args.page_size)
    print(
        f"request state of {n:,} requests in {STATE_BUCKETS:,} buckets, {pages:,} pages of "
        f"{args.page_size}, redis-server {version}, seed {args.seed}"
    )
    print(f"  {'':<36} {'after cycle 1':>14} {'after cycle 2':>14}")
    rows = [
        ("used_memory growth, B/request", (after_first - before) / n, (after_second - before) / n),
        ("MEMORY USAGE of buckets, B/request", first["bytes"] / n, second["bytes"] / n),
        ("used_memory growth, MB", (after_first - before) / 1e6, (after_second - before) / 1e6),
    ]
    for label, one, two in rows:
        print(f"  {label:<36} {one:>14.2f} {two:>14.2f}")
    print(f"  {'requests changed':<36} {first_changed:>14,} {second_changed:>14,}")
    print(f"  {'apply rate, requests/s':<36} {n / first_s:>14,.0f} {n / second_s:>14,.0f}")
    print(
        f"  buckets: sample encoding {second['sample']}, {second['listpack']:,} listpack, "
        f"{second['hashtable']:,} hashtable, {second['empty']:,} empty"
    )
    print(
        f"  largest bucket holds {second['max_len']} entries: {second['over_limit']} buckets "
        f"over hash-max-listpack-entries {second['limit']}"
    )
    print(
        f"  cycle 2 queued {events:,} events: outbox {outbox_bytes / 1e6:.1f} MB "
        f"({outbox_bytes / max(events, 1):.0f} B/event), deleted before measuring"
    )
    per_request = (after_second - before) / n
    verdict = "PASS" if per_request <= TARGET_BYTES else "FAIL"
    scale = "" if n == TARGET_AT else f" (the target is set at {TARGET_AT:,} requests)"
    print(
        f"{verdict}: {per_request:.1f} B per tracked request against a target of "
        f"≤ {TARGET_BYTES} B{scale}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=TARGET_AT)
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.requests < 1 or args.page_size < 1:
        parser.error("--requests and --page-size must be at least 1")
    with redis_server() as port:
        asyncio.run(measure(port, args))


if __name__ == "__main__":
    main()
