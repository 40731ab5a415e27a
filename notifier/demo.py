"""`notifier demo`: the whole flow on one machine, with no account, no Redis and no network.

The built-in API simulator serves an account on a free local port and the in-memory store
keeps the state; the service itself (poller, outbox, workers, templates, sinks) runs as in
`notifier run`. Its routes (Slack, a signed webhook and a Slack batch digest) post to a
console receiver on 127.0.0.1 that prints what arrives: the very bytes and headers the real
sinks send.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TextIO

import redis.asyncio
from aiohttp import web

from notifier.api import ApiClient
from notifier.config import Settings, standalone_settings
from notifier.delivery import Delivery, sink_session
from notifier.service import GRACE_S, Service
from notifier.simulator import Simulator, serve_app
from notifier.store import memory_store
from notifier.tasks import unless_stopped

EARLIER_REQUESTS = 12  # finished before the notifier starts: the baseline records them silently
BATCH = "episode-7-ja"
FAILURE = "no face detected in the input video"
POLL_INTERVAL_S = 0.5
DIGEST_WAIT_S = 1.0  # short, for the demo: a batch settles 1 s after its last change
CYCLE_TIMEOUT_S = 5.0
DEADLINE_S = 25.0  # the contract promises an exit in under 30 s
WEBHOOK_HEADERS = ("content-type", "user-agent", "webhook-id", "webhook-timestamp")
SIGNATURE = "webhook-signature"
WIDTH = 78


class DemoStalled(Exception):
    """The demo's flow did not move on within its deadline."""


class DemoInterrupted(Exception):
    """Ctrl-C stopped the demo."""


@dataclass(frozen=True, slots=True)
class Arrival:
    """One POST the console receiver got."""

    route: str
    headers: dict[str, str]
    body: bytes


class Console:
    """The demo's output: one line per step, with the seconds since the demo began."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        """A step of the story, stamped with the time since the start."""
        self.print(f"[{time.monotonic() - self.started:4.1f} s] {text}")

    def print(self, text: str = "") -> None:
        """Text as it is."""
        print(text, file=self.out, flush=True)


class ConsoleReceiver:
    """Stands in for Slack and for the webhook endpoint: prints each POST and accepts it."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.arrivals: list[Arrival] = []
        self._arrived = asyncio.Condition()

    def app(self) -> web.Application:
        """POST /slack and /digest answer like Slack ("ok"); POST /webhook like a receiver
        (204)."""
        app = web.Application()
        app.router.add_post("/slack", self._receive("slack", slack_lines, 200))
        app.router.add_post("/webhook", self._receive("webhook", webhook_lines, 204))
        app.router.add_post("/digest", self._receive("digest", slack_lines, 200))
        return app

    def _receive(
        self, route: str, show: Callable[[Arrival], list[str]], status: int
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            headers = {name.lower(): value for name, value in request.headers.items()}
            arrival = Arrival(route, headers, await request.read())
            title = f"{route} received POST {request.path} "
            self.console.say(title + "─" * max(3, WIDTH - len(title) - 8))
            for line in show(arrival):
                self.console.print(f"  {line}")
            async with self._arrived:
                self.arrivals.append(arrival)
                self._arrived.notify_all()
            return web.Response(status=status, text="ok" if status == 200 else None)

        return handle

    async def wait_for(self, count: int, timeout: float) -> None:
        """Wait until `count` POSTs arrived; `DemoStalled` after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout), self._arrived:
                await self._arrived.wait_for(lambda: len(self.arrivals) >= count)
        except TimeoutError:
            raise DemoStalled(
                f"only {len(self.arrivals)} of {count} messages arrived in time"
            ) from None


def slack_lines(arrival: Arrival) -> list[str]:
    """A compact rendering of a Block Kit message: the fallback text, then each block."""
    payload = json.loads(arrival.body)
    lines = [f"text: {payload.get('text', '')}"]
    for block in payload.get("blocks", []):
        lines.extend(f"┃ {line}" for line in _block_lines(block))
    return lines


def _block_lines(block: dict[str, Any]) -> list[str]:
    kind = block.get("type")
    if kind == "header":
        return [block["text"]["text"].upper()]
    if kind == "section":
        text = block.get("text", {}).get("text", "")
        fields = [
            field["text"].replace("\n", ": ", 1).replace("\n", ", ")
            for field in block.get("fields", [])
        ]
        pairs = ["    ".join(fields[at : at + 2]) for at in range(0, len(fields), 2)]
        return [*text.replace("```", "").splitlines(), *pairs]
    if kind == "context":
        return [" · ".join(element.get("text", "") for element in block["elements"])]
    if kind == "actions":
        return [
            "  ".join(
                f"[{e['text']['text']}] {e.get('url', '')}".strip() for e in block["elements"]
            )
        ]
    if kind == "divider":
        return ["─" * 40]
    return [f"({kind} block)"]


def webhook_lines(arrival: Arrival) -> list[str]:
    """The headers a receiver verifies, then the JSON body, indented."""
    lines = [f"{name}: {arrival.headers[name]}" for name in WEBHOOK_HEADERS]
    if SIGNATURE in arrival.headers:
        lines.append(f"{SIGNATURE}: {arrival.headers[SIGNATURE]}")
    body = json.dumps(json.loads(arrival.body), indent=2, ensure_ascii=False)
    return [*lines, "", *body.splitlines()]


def demo_settings(api_url: str, api_key: str, receiver: str) -> Settings:
    """The demo's own settings: the environment and any TOML file are not read."""
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    return standalone_settings(
        api_url=api_url,
        api_key=api_key,
        poll_interval=POLL_INTERVAL_S,
        slack_webhook_url=f"{receiver}/slack",
        webhook_url=f"{receiver}/webhook",
        webhook_secret=secret,
        routes=[
            {
                "name": "digest",
                "type": "slack",
                "url": f"{receiver}/digest",
                "digest": "reference_id",
                "digest_wait": DIGEST_WAIT_S,
            }
        ],
        http_port=0,
    )


async def run_demo(out: TextIO) -> None:
    """Tell the story of one batch, from submission to the messages; `DemoStalled` if the
    flow stops moving, `DemoInterrupted` after Ctrl-C."""
    console = Console(out)
    simulator = Simulator(api_key="sim-demo-key")
    simulator.backfill(EARLIER_REQUESTS)
    receiver = ConsoleReceiver(console)
    interrupted = asyncio.Event()
    async with (
        simulator.serve() as api_url,
        serve_app(receiver.app()) as receiver_url,
    ):
        settings = demo_settings(api_url, simulator.api_key, receiver_url)
        _introduce(console, api_url, receiver_url)
        client = memory_store()
        try:
            async with ApiClient(settings) as api, sink_session() as session:
                service = Service(settings, client, api, Delivery(settings, client, session))
                stop, cancel = asyncio.Event(), asyncio.Event()
                running = asyncio.create_task(service.run(stop, cancel))
                # Ctrl-C as an event, not asyncio.run's cancellation of this task: on
                # Python 3.11 a Redis call may swallow that (see tasks.py).
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGINT, interrupted.set)
                try:
                    story = _story(console, simulator, _Cycles(client, service), receiver)
                    await unless_stopped(story, interrupted)
                finally:
                    loop.remove_signal_handler(signal.SIGINT)
                    stop.set()
                    loop.call_later(GRACE_S, cancel.set)
                    await running
        finally:
            await client.aclose()
    if interrupted.is_set():
        raise DemoInterrupted


def _introduce(console: Console, api_url: str, receiver_url: str) -> None:
    console.print("notifier demo: the whole flow on this machine; no API key, Redis or network.")
    console.print(f"  API       the built-in Chamelaion API simulator at {api_url}")
    console.print("  store     in memory (fakeredis, running the same Lua scripts as Redis)")
    console.print("  routes    slack: Block Kit messages, at most one a second")
    console.print("            webhook: JSON signed per Standard Webhooks")
    console.print("            digest: one Slack message per settled batch (a reference_id)")
    console.print(f"  receiver  {receiver_url}/slack, /webhook and /digest print what arrives")
    console.print()


class _Cycles:
    """Waits for the service's next completed poll cycle."""

    def __init__(self, client: redis.asyncio.Redis, service: Service) -> None:
        self.client = client
        self.key = service.poller.store.keys.last_cycle

    async def next(self) -> None:
        """Return once a cycle that began after this call has completed."""
        # A deadline checked between calls, not a timeout that cancels one: on Python 3.11
        # a Redis call may swallow that cancellation (see tasks.py), and the wait went on
        # forever.
        deadline = time.monotonic() + CYCLE_TIMEOUT_S
        before = await self.client.get(self.key)
        # One change may be a cycle that was already under way: wait for two.
        for _ in range(2):
            while (now := await self.client.get(self.key)) == before:
                if time.monotonic() >= deadline:
                    raise DemoStalled("no poll cycle completed in time")
                await asyncio.sleep(0.02)
            before = now


async def _story(
    console: Console, simulator: Simulator, cycles: _Cycles, receiver: ConsoleReceiver
) -> None:
    deadline = time.monotonic() + DEADLINE_S
    await cycles.next()
    console.say(
        f"baseline: the first poll cycle recorded the account's {EARLIER_REQUESTS} earlier "
        f"requests silently (set NOTIFIER_NOTIFY_EXISTING to announce them)"
    )
    batch = simulator.create(3, reference_id=BATCH)
    for request in batch:
        simulator.start(request.id)
    console.say(f"api: 3 requests of batch {BATCH} submitted, now processing")
    await cycles.next()
    console.say("notifier: processing is not in NOTIFIER_NOTIFY_ON, so nothing is sent yet")
    first, second, third = (request.id for request in batch)
    simulator.complete(first)
    simulator.fail(second, FAILURE)
    console.say(f"api: {first[:8]}… completed; {second[:8]}… failed ({FAILURE})")
    await cycles.next()
    simulator.complete(third)
    console.say(f"api: {third[:8]}… completed")
    await receiver.wait_for(7, deadline - time.monotonic())
    _conclude(console, receiver)


def _conclude(console: Console, receiver: ConsoleReceiver) -> None:
    count = Counter(arrival.route for arrival in receiver.arrivals)
    ids = {
        arrival.headers["webhook-id"] for arrival in receiver.arrivals if arrival.route == "webhook"
    }
    console.print()
    console.say(
        f"done: 2 requests completed and 1 failed; slack got {count['slack']} messages, "
        f"webhook {count['webhook']} with {len(ids)} distinct webhook-ids, digest "
        f"{count['digest']} for the whole batch; the {EARLIER_REQUESTS} earlier requests "
        f"were not announced."
    )
    console.print(
        "Next: set NOTIFIER_API_KEY and NOTIFIER_SLACK_WEBHOOK_URL or NOTIFIER_WEBHOOK_URL, "
        "run `notifier check`, then `notifier run` (see docs/deployment.md)."
    )
