"""Measure the cost of turning an event into the bytes a route sends, per message.

    python bench/render.py [--events 20000] [--runs 5]

For each bundled template, `Renderer.render` (sandboxed Jinja2, JSON parse, Slack limit
check, compact re-serialisation) plus, for the webhook, the per-attempt headers with a
signature, against a baseline in the same run: `json.dumps` of the same contract body
built by hand in Python, the least any sender must do. Events carry realistic values
(a 200-character error message, a reference id, an output URL). Best of `--runs`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from collections.abc import Callable

import aiohttp

from notifier.config import load_settings
from notifier.models import Event
from notifier.render import Renderer
from notifier.sinks import Sink

from common import events

SECRET = "whsec_" + base64.b64encode(b"bench-signing-key-0123456789abcdef").decode()


def by_hand(event: Event) -> bytes:
    """The contract body written directly in Python: the baseline."""
    request = event.request.model_dump(mode="json")
    body = {
        "type": event.type,
        "timestamp": event.context()["event"]["detected_at"],
        "data": {**request, "previous_status": event.previous_status},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def best(runs: int, work: Callable[[], None]) -> float:
    """The shortest of `runs` timings of `work`, in seconds."""
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        timings.append(time.perf_counter() - started)
    return min(timings)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    settings = load_settings(
        {
            "slack_webhook_url": "https://hooks.slack.com/services/T0/B0/bench",
            "webhook_url": "http://127.0.0.1:9/hook",
            "webhook_secret": SECRET,
        }
    )
    slack, webhook = settings.routes
    renderer = Renderer(settings)
    completed, failed = events(args.events, "completed"), events(args.events, "failed")
    async with aiohttp.ClientSession() as session:
        sink = Sink(webhook, session, timeout=10)
        cases: dict[str, Callable[[], None]] = {
            "baseline: json.dumps of the body": lambda: [by_hand(e) for e in completed],
            "webhook default (render)": lambda: [renderer.render(webhook, e) for e in completed],
            "webhook default (render + sign)": lambda: [
                sink.headers(renderer.render(webhook, e)) for e in completed
            ],
            "slack completed (render)": lambda: [renderer.render(slack, e) for e in completed],
            "slack failed (render)": lambda: [renderer.render(slack, e) for e in failed],
        }
        for work in cases.values():  # compile the templates and warm up
            work()
        timings = {name: best(args.runs, work) for name, work in cases.items()}
    baseline = timings["baseline: json.dumps of the body"]
    print(f"rendering {args.events:,} events per case, best of {args.runs}")
    for name, seconds in timings.items():
        per_message = seconds / args.events * 1e6
        rate = args.events / seconds
        print(
            f"  {name:<34} {per_message:7.1f} µs/message {rate:>10,.0f}/s "
            f"{seconds / baseline:6.1f}x baseline"
        )


if __name__ == "__main__":
    asyncio.run(main())
