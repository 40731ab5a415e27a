"""Measure detection latency: from a status change in the API to its webhook at a receiver.

    python bench/latency.py [--transitions 200] [--duration 60] [--requests 1000]
                            [--poll-interval 1] [--seed 1]

This process serves both ends on one event loop and one clock (`time.monotonic`): the
simulator (`notifier.simulator.Simulator`, served in-process) and a receiver (an aiohttp
app on 127.0.0.1 answering 200 to every POST). `notifier run` is a child process with
NOTIFIER_POLL_INTERVAL=`--poll-interval`, a webhook route (NOTIFIER_WEBHOOK_URL) to the
receiver, its HTTP server off, on a fresh namespace of the script's own redis-server (a
free port on 127.0.0.1, persistence off). Changing statuses in the simulator directly,
rather than letting it tick in another process, is what makes each change's moment
known on the receiver's clock; the change happens between two API responses, as a real
request finishes between two polls.

The account holds `--requests` requests: `--transitions` of them processing, created at
random moments of the past hour so that they are spread over the listing's pages, the
rest backfilled (mostly finished). Once the notifier has recorded its baseline, each
processing request is completed (one in ten: failed) at a random moment of `--duration`
seconds, and the moment is noted; the receiver notes the first arrival of each
`webhook-id` (the event id of the request and status). The simulator also notes when a
changed request is first listed after its change, which splits the latency into waiting
for the next poll to list it and the rest (the cycle's other pages, the Redis apply, the
outbox read, rendering, the POST). Reported: p50, p90, p99, max and mean of each (target:
p99 ≤ 1.5 s at a poll interval of 1 s), and the share of a core each process used while
the statuses changed (/proc, so Linux only), other processes of the machine included: a
busy machine delays polls and deliveries alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import redis.asyncio
from aiohttp import web

from notifier.keys import Keys
from notifier.models import event_id
from notifier.simulator import SimulatedRequest, Simulator, serve_app

from common import (
    BACKGROUND_WARNING,
    cpu_seconds,
    machine_cpu_seconds,
    markdown_table,
    notifier_command,
    notifier_env,
    notifier_source,
    redis_server,
)

KEY = "bench-key"
PREFIX = "bench-latency"
HOOK_PATH = "/hook"
SPAN = timedelta(hours=1)  # the account's requests were created over this past span
FAIL_RATIO = 0.1
TARGET_P99_S = 1.5
BASELINE_TIMEOUT_S = 30.0
DRAIN_S = 10.0  # after the last change, wait this long at most for the last webhooks
STOP_TIMEOUT_S = 15.0  # `notifier run` exits within 9 s of SIGTERM


class TimedSimulator(Simulator):
    """A simulator that notes when each changed request is first listed after its change."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.unlisted: dict[str, str] = {}  # request id -> event id: changed, not listed since
        self.listed_at: dict[str, float] = {}  # event id -> when first listed after the change

    def page(
        self, offset: int, limit: int, reference_id: str | None = None
    ) -> tuple[list[dict[str, str]], int]:
        items, total = super().page(offset, limit, reference_id)
        if self.unlisted:
            now = time.monotonic()
            for item in items:
                if (changed := self.unlisted.pop(item["id"], None)) is not None:
                    self.listed_at[changed] = now
        return items, total


@dataclass(frozen=True)
class Figures:
    """What one measurement saw, every moment on this process's `time.monotonic` clock."""

    changed_at: dict[str, float]  # event id -> when the simulator changed the status
    listed_at: dict[str, float]  # event id -> when a poll first listed the change
    arrived_at: dict[str, float]  # webhook-id -> when it first arrived at the receiver
    repeats: int  # webhooks that arrived again
    failed: int  # transitions to failed (the others: to completed)
    calls_per_s: float  # list calls the simulator answered while the statuses changed
    cpu_shares: dict[str, float]  # process -> share of a core it used meanwhile
    version: str  # of redis-server


class Receiver:
    """Notes when each webhook-id first arrives, and counts repeats."""

    def __init__(self) -> None:
        self.arrived_at: dict[str, float] = {}
        self.repeats = 0

    async def hook(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        await request.read()
        webhook_id = request.headers.get("webhook-id", "")
        if webhook_id in self.arrived_at:
            self.repeats += 1
        else:
            self.arrived_at[webhook_id] = arrived
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(HOOK_PATH, self.hook)
        return app


def build_account(args: argparse.Namespace) -> tuple[TimedSimulator, list[SimulatedRequest]]:
    """The account, and its `--transitions` processing requests spread over the listing."""
    simulator = TimedSimulator(api_key=KEY, seed=args.seed)
    simulator.backfill(args.requests - args.transitions, span=SPAN)
    rng = random.Random(args.seed)  # noqa: S311 - reproducible sample data, not a secret
    now = simulator.clock()
    watched = []
    for _ in range(args.transitions):
        created = (now - SPAN * rng.random()).replace(microsecond=0)
        (request,) = simulator.create(created_at=created)
        simulator.start(request.id)
        watched.append(request)
    return simulator, watched


async def wait_for_baseline(
    client: redis.asyncio.Redis, notifier: asyncio.subprocess.Process, log: Path
) -> None:
    """Until the notifier has completed its first cycle (the silent baseline)."""
    deadline = time.monotonic() + BASELINE_TIMEOUT_S
    while await client.get(Keys(PREFIX).last_cycle) is None:
        if notifier.returncode is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"notifier run recorded no baseline; its log ends:\n{tail}")
        await asyncio.sleep(0.05)


async def drive(
    simulator: TimedSimulator, watched: list[SimulatedRequest], args: argparse.Namespace
) -> dict[str, float]:
    """Finish every watched request at a random moment of `--duration`; event id -> when."""
    rng = random.Random(args.seed + 1)  # noqa: S311 - a reproducible schedule, not a secret
    offsets = sorted(rng.uniform(0, args.duration) for _ in watched)
    changed_at: dict[str, float] = {}
    start = time.monotonic()
    for offset, request in zip(offsets, watched, strict=True):
        await asyncio.sleep(start + offset - time.monotonic())
        if rng.random() < FAIL_RATIO:
            simulator.fail(request.id)
        else:
            simulator.complete(request.id)
        changed = event_id(request.id, request.status)
        changed_at[changed] = time.monotonic()
        simulator.unlisted[request.id] = changed
    return changed_at


async def drain(receiver: Receiver, expected: set[str]) -> None:
    """Until every expected webhook arrived, or `DRAIN_S` passed."""
    deadline = time.monotonic() + DRAIN_S
    while not expected <= receiver.arrived_at.keys() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def stop_notifier(notifier: asyncio.subprocess.Process) -> None:
    if notifier.returncode is None:
        notifier.terminate()
        try:
            await asyncio.wait_for(notifier.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            notifier.kill()
            await notifier.wait()


async def measure(args: argparse.Namespace, redis_port: int, log: Path) -> Figures:
    simulator, watched = build_account(args)
    receiver = Receiver()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    client = redis.asyncio.Redis(port=redis_port, decode_responses=True)
    async with simulator.serve() as api_url, serve_app(receiver.app()) as origin:
        env = notifier_env(
            api_url=api_url,
            api_key=KEY,
            redis_url=redis_url,
            key_prefix=PREFIX,
            webhook_url=origin + HOOK_PATH,
            poll_interval=str(args.poll_interval),
            http_port="0",
        )
        with log.open("wb") as out:
            notifier = await asyncio.create_subprocess_exec(
                *notifier_command("run"), env=env, stdout=out, stderr=out
            )
        try:
            await wait_for_baseline(client, notifier, log)
            pids = {
                "notifier run": notifier.pid,
                "redis-server": int((await client.info("server"))["process_id"]),
                "simulator and receiver (this process)": os.getpid(),
            }
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            machine_before = machine_cpu_seconds()
            calls_before, started = simulator.calls, time.monotonic()
            changed_at = await drive(simulator, watched, args)
            await drain(receiver, set(changed_at))
            elapsed = time.monotonic() - started
            listing_rate = (simulator.calls - calls_before) / elapsed
            used = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
            used["other processes"] = machine_cpu_seconds() - machine_before - sum(used.values())
            cpu_shares = {name: max(0.0, seconds) / elapsed for name, seconds in used.items()}
        finally:
            await stop_notifier(notifier)
            version = (await client.info("server"))["redis_version"]
            await client.aclose()
    return Figures(
        changed_at=changed_at,
        listed_at=simulator.listed_at,
        arrived_at=receiver.arrived_at,
        repeats=receiver.repeats,
        failed=sum(request.status == "failed" for request in watched),
        calls_per_s=listing_rate,
        cpu_shares=cpu_shares,
        version=version,
    )


def row(label: str, seconds: list[float]) -> list[str]:
    """p50, p90, p99, max and mean of `seconds`, in ms."""
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    figures = [cuts[49], cuts[89], cuts[98], max(seconds), statistics.fmean(seconds)]
    return [label, *(f"{figure * 1000:,.0f} ms" for figure in figures)]


def report(args: argparse.Namespace, figures: Figures) -> None:
    changed_at, listed_at, arrived_at = figures.changed_at, figures.listed_at, figures.arrived_at
    arrived = [changed for changed in changed_at if changed in arrived_at]
    listed = [changed for changed in arrived if changed in listed_at]
    unexpected = len(arrived_at.keys() - changed_at.keys())
    if len(arrived) < 2 or len(listed) < 2:
        raise SystemExit(f"only {len(arrived)} webhooks arrived; see the notifier's log")
    total = [arrived_at[changed] - changed_at[changed] for changed in arrived]
    pages = -(-args.requests // 100)
    python = os.path.relpath(sys.executable)
    command = " ".join([sys.executable if python.startswith("..") else python, *sys.argv])
    print(f"command: {command}")
    print(f"notifier: {notifier_source()}")
    print(
        f"{args.transitions} transitions ({args.transitions - figures.failed} completed, "
        f"{figures.failed} failed) at random moments over {args.duration:g} s; "
        f"{args.requests:,} requests in the account ({pages} pages of 100); notifier run with "
        f"NOTIFIER_POLL_INTERVAL={args.poll_interval:g} and a webhook route; simulator and "
        f"receiver in this process; redis-server {figures.version}; {os.cpu_count()} CPUs"
    )
    print()
    print(
        markdown_table(
            ["from → to", "p50", "p90", "p99", "max", "mean"],
            [
                row("status change → webhook arrival", total),
                row(
                    "status change → first listed by a poll",
                    [listed_at[changed] - changed_at[changed] for changed in listed],
                ),
                row(
                    "first listed → webhook arrival",
                    [arrived_at[changed] - listed_at[changed] for changed in listed],
                ),
            ],
        )
    )
    print()
    print(
        f"arrived: {len(arrived)} of {len(changed_at)}, {figures.repeats} repeats, "
        f"{unexpected} unexpected; the simulator answered "
        f"{figures.calls_per_s:.1f} list calls/s ({pages} per complete listing)"
    )
    shares = ", ".join(f"{name} {share:.0%}" for name, share in figures.cpu_shares.items())
    print(f"CPU while the statuses changed, as shares of one core: {shares}")
    if figures.cpu_shares["other processes"] > BACKGROUND_WARNING:
        print("WARNING: other processes were busy meanwhile: run again on a quiet machine")
    p99 = statistics.quantiles(total, n=100, method="inclusive")[98]
    complete = len(arrived) == len(changed_at)
    verdict = "PASS" if p99 <= TARGET_P99_S and complete else "FAIL"
    missing = "" if complete else f", {len(changed_at) - len(arrived)} webhooks missing"
    print(f"{verdict}: p99 detection latency {p99:.2f} s (target ≤ {TARGET_P99_S} s){missing}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transitions", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--requests", type=int, default=1000, help="in the account")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not 2 <= args.transitions <= args.requests:
        parser.error("--transitions must be at least 2 and at most --requests")
    if args.duration <= 0 or args.poll_interval < 0.1:
        parser.error("--duration must be positive and --poll-interval at least 0.1")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp, redis_server() as port:
            figures = asyncio.run(measure(args, port, Path(tmp) / "notifier.log"))
    except KeyboardInterrupt:
        raise SystemExit("interrupted; notifier run and redis-server are stopped") from None
    report(args, figures)


if __name__ == "__main__":
    main()
