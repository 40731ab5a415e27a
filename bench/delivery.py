"""Measure deliveries per second through the full path against a bare aiohttp POST loop.

    python bench/delivery.py [--deliveries 5000] [--runs 3] [--concurrency 4]
                             [--receiver-latency-ms 0]

The script starts its own redis-server (a free port on 127.0.0.1, persistence off, a
temporary directory) and a receiver in another process (this script with
`--serve-receiver PORT`: an aiohttp app answering 200 "ok" to every POST /hook, after
`--receiver-latency-ms`, the round trip a real endpoint takes), and stops both at the
end, Ctrl-C included. With no latency the receiver answers at once and the figures
compare CPU per delivery, the worst case for the full path.

Full path: one webhook route to the receiver, signed with a whsec_ secret, with
`max_concurrency` = `--concurrency`, configured through a TOML [[routes]] file and
`load_settings`. Each pass uses a fresh key prefix: it creates the route's consumer
group, XADDs `--deliveries` distinct completed events (`outbox.entry_of`) in a pipeline,
then times one `Delivery.deliver_due()` (outbox -> render -> sign -> POST -> ack), and
checks that the tally and the receiver both count every delivery. Building the
`Delivery` is outside the timing; compiling the template on its first render is inside.

Baseline, in the same run and to the same receiver: the body of one event rendered and
signed once, then `--concurrency` tasks POSTing it (same headers, `sink_session()`,
response read) until `--deliveries` POSTs are done. No Redis, no rendering, no signing.

One untimed warm-up pass of each, then `--runs` passes of each, alternating; the best of
each is reported as deliveries/s and as µs/delivery (wall time over deliveries, the
inverse of the rate, not a latency), with the ratio full path / bare loop (target ≥ 0.5).
Logging is left unconfigured (WARNING), so the per-delivery INFO line the service writes
is not included.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import redis
import redis.asyncio
from aiohttp import web

from notifier.config import Settings, load_settings
from notifier.delivery import Delivery, sink_session
from notifier.keys import Keys
from notifier.outbox import entry_of
from notifier.render import Renderer
from notifier.sinks import Sink

from common import events, free_port, redis_server, stop, wait_until

TARGET_RATIO = 0.5
ROUTE = "webhook"
SECRET = "whsec_" + base64.b64encode(b"bench-signing-key-0123456789abcdef").decode()
HOOK_PATH = "/hook"
COUNT_PATH = "/count"
XADD_BATCH = 1000
WARM_UP_DELIVERIES = 500
PASSES = itertools.count()  # numbers each full-path pass: its own key prefix


# The receiver: runs in its own process (`--serve-receiver PORT`).


def serve_receiver(port: int, latency_ms: float) -> None:
    """Answer 200 "ok" to every POST /hook (body read) after `latency_ms`; GET /count says
    how many came."""
    received = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal received
        await request.read()
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)
        received += 1
        return web.Response(text="ok")

    async def count(_request: web.Request) -> web.Response:
        return web.Response(text=str(received))

    app = web.Application()
    app.router.add_post(HOOK_PATH, hook)
    app.router.add_get(COUNT_PATH, count)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# The two processes the benchmark talks to.


def receiver_answers(port: int) -> bool:
    try:
        return received(port) >= 0
    except (urllib.error.URLError, OSError):
        return False


def received(port: int) -> int:
    """How many POSTs the receiver has answered so far."""
    url = f"http://127.0.0.1:{port}{COUNT_PATH}"
    with urllib.request.urlopen(url, timeout=1) as response:
        return int(response.read())


@contextmanager
def servers(latency_ms: float) -> Iterator[tuple[int, int]]:
    """A redis-server (persistence off) and the receiver; yields their ports."""
    with redis_server() as redis_port:
        receiver_port = free_port()
        receiver = subprocess.Popen(
            [
                sys.executable,
                __file__,
                *("--serve-receiver", str(receiver_port)),
                *("--receiver-latency-ms", str(latency_ms)),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_until(receiver, lambda: receiver_answers(receiver_port), "the receiver")
            yield redis_port, receiver_port
        finally:
            stop(receiver)


# The contenders.


def make_settings(
    workdir: Path, receiver_url: str, concurrency: int, prefix: str, own_templates: bool = False
) -> Settings:
    """One signed webhook route to the receiver, as a user would configure it; with
    `own_templates`, a templates directory of the user's (an empty one: the bundled template
    still renders, but as user templates do, on a pool thread with a deadline)."""
    config = workdir / "notifier.toml"
    config.write_text(
        "[[routes]]\n"
        f'name = "{ROUTE}"\n'
        'type = "webhook"\n'
        f'url = "{receiver_url}"\n'
        f'secret = "{SECRET}"\n'
        f"max_concurrency = {concurrency}\n",
        encoding="utf-8",
    )
    flags = {"config": str(config), "key_prefix": prefix}
    if own_templates:
        (workdir / "templates").mkdir(exist_ok=True)
        flags["templates_dir"] = str(workdir / "templates")
    return load_settings(flags)


async def full_path(
    client: redis.asyncio.Redis,
    workdir: Path,
    receiver_url: str,
    count: int,
    args: argparse.Namespace,
) -> float:
    """Seconds one `deliver_due` took to deliver `count` fresh events; checked."""
    run = f"{next(PASSES):04x}"
    settings = make_settings(
        workdir, receiver_url, args.concurrency, f"bench-delivery-{run}", args.own_templates
    )
    outbox = Keys(settings.key_prefix).outbox
    await client.xgroup_create(outbox, ROUTE, "0", mkstream=True)
    queued = events(count, "completed")
    for start in range(0, count, XADD_BATCH):
        async with client.pipeline(transaction=False) as pipe:
            for event in queued[start : start + XADD_BATCH]:
                pipe.xadd(outbox, entry_of(event))
            await pipe.execute()
    async with sink_session() as session:
        delivery = Delivery(settings, client, session)
        started = time.perf_counter()
        tally = await delivery.deliver_due()
        elapsed = time.perf_counter() - started
    if tally.delivered != count or tally.retried or tally.dead or tally.skipped:
        raise RuntimeError(f"full path: {tally}, expected {count} delivered")
    return elapsed


async def bare_loop(
    url: str, body: bytes, headers: dict[str, str], count: int, tasks: int
) -> float:
    """Seconds `tasks` tasks took to POST `body` `count` times, reading each answer."""
    timeout = aiohttp.ClientTimeout(total=10)
    left = count

    async def poster(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(
                url, data=body, headers=headers, allow_redirects=False, timeout=timeout
            ) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"bare loop: HTTP {response.status}")

    async with sink_session() as session:
        started = time.perf_counter()
        await asyncio.gather(*(poster(session) for _ in range(tasks)))
        return time.perf_counter() - started


async def measure(
    args: argparse.Namespace, workdir: Path, redis_port: int, receiver_port: int
) -> tuple[dict[str, float], str, int]:
    """Best seconds of each contender over `args.runs` alternating passes, the Redis
    version and the body size."""
    url = f"http://127.0.0.1:{receiver_port}{HOOK_PATH}"
    client = redis.asyncio.Redis(host="127.0.0.1", port=redis_port, decode_responses=True)
    # The baseline's body and headers: one event rendered and signed once.
    settings = make_settings(workdir, url, args.concurrency, "bench-delivery-baseline")
    (route,) = settings.routes
    message = Renderer(settings).render(route, events(1, "completed")[0])
    async with aiohttp.ClientSession() as session:
        headers = Sink(route, session, settings.delivery_timeout).headers(message)

    async def checked(name: str, work: Callable[[int], Awaitable[float]], count: int) -> float:
        """Seconds of one pass of `work`, checked against the receiver's own count."""
        before = await asyncio.to_thread(received, receiver_port)
        elapsed = await work(count)
        arrived = await asyncio.to_thread(received, receiver_port) - before
        # Ctrl-C cancels this task, but redis-py on Python 3.11 can swallow a cancellation
        # (asyncio.wait_for around its socket writes): honour it here, between passes.
        if asyncio.current_task().cancelling():
            raise asyncio.CancelledError
        if arrived != count:
            raise RuntimeError(f"{name}: the receiver got {arrived} POSTs, expected {count}")
        return elapsed

    contenders: dict[str, Callable[[int], Awaitable[float]]] = {
        "bare": lambda n: bare_loop(url, message.body, headers, n, args.concurrency),
        "full": lambda n: full_path(client, workdir, url, n, args),
    }
    best = dict.fromkeys(contenders, float("inf"))
    try:
        for name, work in contenders.items():  # warm-up: connections, scripts, imports
            await checked(name, work, min(args.deliveries, WARM_UP_DELIVERIES))
        for _ in range(args.runs):  # alternating, so drift hits both alike
            for name, work in contenders.items():
                best[name] = min(best[name], await checked(name, work, args.deliveries))
        version = (await client.info("server"))["redis_version"]
    finally:
        await client.aclose()
    return best, version, len(message.body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--receiver-latency-ms",
        type=float,
        default=0.0,
        help="the receiver waits this long before answering (a real endpoint's round trip)",
    )
    parser.add_argument(
        "--own-templates",
        action="store_true",
        help="set a templates directory: renders go to the pool thread, as user templates do",
    )
    parser.add_argument("--serve-receiver", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_receiver is not None:
        serve_receiver(args.serve_receiver, args.receiver_latency_ms)
        return
    if args.deliveries < 1 or args.runs < 1 or args.concurrency < 1:
        parser.error("--deliveries, --runs and --concurrency must be at least 1")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:
            workdir = Path(tmp)
            with servers(args.receiver_latency_ms) as (redis_port, receiver_port):
                best, version, body_bytes = asyncio.run(
                    measure(args, workdir, redis_port, receiver_port)
                )
    except KeyboardInterrupt:
        raise SystemExit("interrupted; redis-server and the receiver are stopped") from None

    n, concurrency = args.deliveries, args.concurrency
    bare, full = best["bare"], best["full"]
    python = os.path.relpath(sys.executable)
    command = " ".join([sys.executable if python.startswith("..") else python, *sys.argv])
    print(f"command: {command}")
    print(
        f"{n:,} deliveries per pass, concurrency {concurrency}, best of {args.runs}, "
        f"{os.cpu_count()} CPUs, redis-server {version}, receiver in its own process "
        f"answering after {args.receiver_latency_ms:g} ms, body {body_bytes} B"
        + (", own templates (rendered on a pool thread)" if args.own_templates else "")
    )
    for label, seconds in (
        ("bare aiohttp POST loop", bare),
        ("full path (deliver_due)", full),
    ):
        print(
            f"  {label:<26} {n / seconds:>9,.0f} deliveries/s {seconds / n * 1e6:>8.1f} µs/delivery"
            f" {seconds * 1000:>9.1f} ms"
        )
    ratio = bare / full
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    print(f"{verdict}: full path / bare loop = {ratio:.2f} (target ≥ {TARGET_RATIO})")


if __name__ == "__main__":
    main()
