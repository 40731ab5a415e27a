"""Batch digests: what tracking batches adds to a poll cycle, and what one batch's digest costs.

    python bench/digest.py [--requests 20000] [--batch 1000] [--rounds 5]

The simulator (in this process) holds `--requests` finished requests in batches of 250,
each with its reference_id. Every round, on fresh namespaces and in alternating order, a
poller without a digest route and one with a webhook digest route each record the
baseline; then a new batch of `--batch` requests is listed in progress and finishes, and
both time the cycle that applies the completions. The digest route's poller then settles
the batch (its digest_wait passed on its clock) and the settle step is timed alone, as is
rendering the frozen digest for Slack and for a webhook. Figures are the best of the
rounds, with the ratio of the digest route's cycles to the plain ones of the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio

from notifier.api import ApiClient
from notifier.config import Settings, standalone_settings
from notifier.digest import Digest
from notifier.outbox import read_entry
from notifier.poller import Poller
from notifier.render import Renderer
from notifier.simulator import Simulator
from notifier.store import connect_redis
from notifier.tasks import running

from common import markdown_table, redis_server

KEY = "bench-key"
BATCH_SIZE = 250
UNTHROTTLED = 1_000_000
WAIT_S = 3600.0  # the digest route's digest_wait: no digest settles in the timed cycles
PREFIXES = itertools.count()


@dataclass
class Clock:
    """Real time, moved forward past digest_wait when the batch is to settle."""

    ahead_s: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead_s


@dataclass
class Figures:
    """Seconds of each timed step, one entry per round."""

    steps: dict[str, list[float]] = field(default_factory=dict)

    def add(self, step: str, seconds: float) -> None:
        self.steps.setdefault(step, []).append(seconds)

    def best(self, step: str) -> float:
        return min(self.steps[step])


def settings_of(api_url: str, redis_url: str, *, digest: bool) -> Settings:
    routes = [
        {
            "name": "batches",
            "type": "webhook",
            "url": "http://127.0.0.1:9/batches",
            "digest": "reference_id",
            "digest_wait": WAIT_S,
        }
    ]
    return standalone_settings(
        api_url=api_url,
        api_key=KEY,
        redis_url=redis_url,
        key_prefix=f"bench-digest-{next(PREFIXES)}",
        webhook_url="http://127.0.0.1:9/hook",
        api_rate_limit=UNTHROTTLED,
        routes=routes if digest else [],
    )


async def timed(step: Callable[[], Any]) -> float:
    started = time.perf_counter()
    await step()
    return time.perf_counter() - started


async def one_round(
    simulator: Simulator, api_url: str, redis_url: str, batch: int, first: str
) -> tuple[dict[str, float], Digest]:
    """Both pollers' baseline and completion cycles, then the digest route's settle step."""
    client: redis.asyncio.Redis = connect_redis(redis_url)
    seconds: dict[str, float] = {}
    kinds = ["plain", "digest"] if first == "plain" else ["digest", "plain"]
    pollers: dict[str, Poller] = {}
    clock = Clock()
    try:
        async with ApiClient(settings_of(api_url, redis_url, digest=False)) as api:
            for kind in kinds:
                settings = settings_of(api_url, redis_url, digest=kind == "digest")
                pollers[kind] = Poller(settings, client, api, clock=clock)
            new = simulator.create(batch, reference_id=f"bench-batch-{next(PREFIXES)}")
            for request in new:
                simulator.start(request.id)
            for kind in kinds:
                poller = pollers[kind]
                if not await poller.lease.acquire():
                    raise RuntimeError("a fresh namespace's lease was taken")
                async with running(poller.lease.keep_renewed):
                    seconds[f"{kind} baseline"] = await timed(poller.cycle)
            for request in new:
                simulator.complete(request.id)
            for kind in kinds:
                poller = pollers[kind]
                async with running(poller.lease.keep_renewed):
                    seconds[f"{kind} completions"] = await timed(poller.cycle)
            store, poller = pollers["digest"].store, pollers["digest"]
            clock.ahead_s = WAIT_S + 1
            epoch = await store.begin(poller.lease.token, notify_existing=False)
            async with running(poller.lease.keep_renewed):
                started = time.perf_counter()
                settled = await store.settle_batches(epoch, poller.lease.token)
                seconds["settle"] = time.perf_counter() - started
            [(_, fields)] = await client.xrevrange(store.keys.outbox, count=1)
            digest = read_entry(fields)
            if settled.digests != 1 or not isinstance(digest, Digest):
                raise RuntimeError(f"the batch did not settle into one digest: {settled}")
            seconds["entry bytes"] = sum(len(k) + len(v.encode()) for k, v in fields.items())
            for poller in pollers.values():
                await poller.lease.release()
    finally:
        await client.aclose()
    return seconds, digest


def render_seconds(digest: Digest) -> dict[str, float]:
    """Best of 5 renders of the digest, per route type."""
    settings = standalone_settings(
        slack_webhook_url="https://hooks.slack.com/services/T0/B0/x",
        webhook_url="http://127.0.0.1:9/hook",
    )
    renderer = Renderer(settings)
    best = {}
    for route in settings.routes:
        renderer.render(route, digest)  # compile the template once
        times = []
        for _ in range(5):
            started = time.perf_counter()
            renderer.render(route, digest)
            times.append(time.perf_counter() - started)
        best[f"render {route.type}"] = min(times)
    return best


async def measure(args: argparse.Namespace) -> tuple[Figures, Digest]:
    simulator = Simulator(api_key=KEY, seed=7)
    for start in range(0, args.requests, BATCH_SIZE):
        count = min(BATCH_SIZE, args.requests - start)
        for request in simulator.create(count, reference_id=f"history-{start // BATCH_SIZE}"):
            simulator.start(request.id)
            simulator.complete(request.id)
    figures = Figures()
    with redis_server() as port:
        redis_url = f"redis://127.0.0.1:{port}/0"
        async with simulator.serve() as api_url:
            await one_round(simulator, api_url, redis_url, args.batch, "plain")  # warm-up
            for round_ in range(args.rounds):
                first = "plain" if round_ % 2 else "digest"
                seconds, digest = await one_round(simulator, api_url, redis_url, args.batch, first)
                for step, value in seconds.items():
                    figures.add(step, value)
    return figures, digest


def report(args: argparse.Namespace, figures: Figures, digest: Digest) -> None:
    ms = lambda seconds: f"{seconds * 1000:,.1f} ms"  # noqa: E731
    rows = []
    for cycle in ("baseline", "completions"):
        plain, with_digest = figures.steps[f"plain {cycle}"], figures.steps[f"digest {cycle}"]
        ratios = [d / p for p, d in zip(plain, with_digest, strict=True)]
        rows.append(
            [
                f"{cycle} cycle",
                ms(min(plain)),
                ms(min(with_digest)),
                f"{min(with_digest) / min(plain):.2f}x (median {statistics.median(ratios):.2f}x)",
            ]
        )
    print(
        f"{args.requests:,} finished requests in batches of {BATCH_SIZE}, then a batch of "
        f"{args.batch:,} finishing; best of {args.rounds} rounds"
    )
    print(markdown_table(["cycle", "no digest route", "one digest route", "digest / plain"], rows))
    print()
    steps = [
        ["settle step (one batch)", ms(figures.best("settle"))],
        ["digest entry in the outbox", f"{figures.best('entry bytes') / 1000:,.0f} kB"],
    ]
    for step, seconds in render_seconds(digest).items():
        steps.append([f"{step} ({len(digest.members):,} requests)", ms(seconds)])
    print(markdown_table(["digest of the batch", "cost"], steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    figures, digest = asyncio.run(measure(args))
    report(args, figures, digest)


if __name__ == "__main__":
    main()
