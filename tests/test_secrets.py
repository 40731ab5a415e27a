"""No command shows a secret: not the API key, a webhook secret, a Slack or webhook URL,
in text or JSON logs, on stdout, in /metrics, /readyz or the dead letters, even when a
receiver quotes its own URL back in an error.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from notifier.simulator import Simulator
from notifier.store import connect_redis

from conftest import RedisServer, eventually
from receiver import Receiver
from replicas import Replica
from samples import SIMULATOR_KEY

MARK = "ZZLEAK"  # every secret below holds it; nothing the notifier prints may
SLACK_PATH = "/services/T0ZZLEAK/B0ZZLEAK/ZZLEAKslacktoken"
HOOK_PATH = "/hook/ZZLEAK-hook-token"
# A query token, percent-encoded: a receiver may echo it decoded, or only the path.
HOOK_QUERY = "?tenant=acme&token=ZZLEAKquery%2Ftoken"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"ZZLEAK-webhook-signing-key").decode()
assert MARK in SIMULATOR_KEY


@dataclass
class Leaky:
    """A configuration full of secrets, and receivers that quote them back."""

    env: dict[str, str]
    simulator: Simulator
    receiver: Receiver
    logs: Path

    async def command(self, *args: str) -> str:
        """Run `notifier ARGS`; everything it printed."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "notifier",
            *args,
            env={**os.environ, **self.env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 60)
        return output.decode()


async def _quote_url(request: web.Request) -> web.Response:
    # A receiver that echoes what it got: its own URL, which holds the token.
    status = 400 if request.path.startswith("/services") else 500
    token = request.query.get("token")
    return web.Response(
        status=status,
        text=f"invalid_token for {request.url} (path {request.path}, token {token})",
    )


@pytest.fixture
async def leaky(
    redis_server: RedisServer,
    simulator: Simulator,
    api_url: str,
    webhook_receiver: Receiver,
    tmp_path: Path,
) -> Leaky:
    client = connect_redis(redis_server.url)
    await client.flushall()
    await client.aclose()
    webhook_receiver.handle(SLACK_PATH, _quote_url)
    webhook_receiver.handle(HOOK_PATH, _quote_url)
    return Leaky(
        {
            "NOTIFIER_API_URL": api_url,
            "NOTIFIER_API_KEY": SIMULATOR_KEY,
            "NOTIFIER_REDIS_URL": redis_server.url,
            "NOTIFIER_SLACK_WEBHOOK_URL": webhook_receiver.url(SLACK_PATH),
            "NOTIFIER_WEBHOOK_URL": webhook_receiver.url(HOOK_PATH) + HOOK_QUERY,
            "NOTIFIER_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "NOTIFIER_POLL_INTERVAL": "0.5",
            "NOTIFIER_RETRY_BASE_DELAY": "0.1",
            "NOTIFIER_RETRY_MAX_ATTEMPTS": "2",
        },
        simulator,
        webhook_receiver,
        tmp_path,
    )


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_command_prints_a_secret(leaky: Leaky, log_format: str) -> None:
    leaky.env["NOTIFIER_LOG_FORMAT"] = log_format
    requests = leaky.simulator.create(2)
    for created in requests:
        leaky.simulator.start(created.id)
    printed = {
        "check": await leaky.command("check"),
        "send-test": await leaky.command("send-test"),
        "once": await leaky.command("once"),  # the baseline
    }
    replica = Replica("run", leaky.env, leaky.logs / "run.log")
    await replica.start()
    try:
        await replica.ready()
        for created in requests:
            leaky.simulator.complete(created.id)
        # Two events, two routes, each refused: four dead letters, with quoted answers.
        await eventually(lambda: len(leaky.receiver.seen) >= 8, "every attempt made", timeout=20)
        await asyncio.sleep(0.5)
        for path in ("/metrics", "/readyz", "/healthz"):
            status, body = await replica.get(path)
            assert status == 200, body
            printed[path] = body
        replica.send(signal.SIGTERM)
        assert await replica.exited(10) == 0
    finally:
        await replica.stop()
    printed["run"] = replica.output()
    printed["dlq list"] = await leaky.command("dlq", "list")
    printed["dlq replay"] = await leaky.command("dlq", "replay", "--all")
    leaky.env["NOTIFIER_API_KEY"] = "sk-rejected-ZZLEAK-key"
    printed["run, rejected key"] = await leaky.command("run")

    assert printed["dlq list"].count("\n") >= 4  # the failures were really printed
    assert "dead-lettered" in printed["run"]
    assert "notifier_deliveries_total" in printed["/metrics"]
    assert "invalid token" in printed["run, rejected key"]
    leaks = {name: text for name, text in printed.items() if MARK in text}
    assert not leaks, {
        name: text[max(0, text.index(MARK) - 200) :][:400] for name, text in leaks.items()
    }
