"""`notifier demo`: the whole flow with no API key, no Redis and no network, in under 30 s.

It shows what Slack and the webhook receive: a compact rendering of each Block Kit
message, and each webhook's headers and JSON body.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest

from notifier import demo
from notifier.cli import main
from notifier.demo import FAILURE, Arrival, run_demo, slack_lines
from notifier.simulator import Simulator

# The demo reads no setting: every one of these would break it if it did.
HOSTILE_ENVIRONMENT = {
    "NOTIFIER_POLL_INTERVAL": "bogus",
    "NOTIFIER_REDIS_URL": "redis://127.0.0.1:1/0",
    "NOTIFIER_API_URL": "http://127.0.0.1:1/api",
    "NOTIFIER_CONFIG": "/nonexistent/notifier.toml",
    "NOTIFIER_HTTP_PORT": "1",
    "NOTIFIER_LOG_FORMAT": "yaml",
}


@dataclass
class Shown:
    """One message as the demo printed it."""

    route: str
    lines: list[str]

    def webhook(self) -> tuple[dict[str, str], dict]:
        """The headers and the parsed body of a webhook."""
        blank = self.lines.index("")
        headers = dict(line.split(": ", 1) for line in self.lines[:blank])
        return headers, json.loads("\n".join(self.lines[blank + 1 :]))


def shown(output: str) -> list[Shown]:
    """The messages in the demo's output: a heading line, then indented lines."""
    messages: list[Shown] = []
    current: Shown | None = None
    for line in output.splitlines():
        if heading := re.search(r"\] (slack|webhook|digest) received POST /\1 ", line):
            current = Shown(heading.group(1), [])
            messages.append(current)
        elif current is not None and line.startswith("  "):
            current.lines.append(line[2:])
        else:
            current = None
    return messages


@pytest.fixture(scope="module")
def output() -> str:
    """What one demo printed, run in-process."""
    out = io.StringIO()
    asyncio.run(run_demo(out))
    return out.getvalue()


def offline(command: list[str]) -> list[str]:
    """`command` in a network namespace of its own, where only loopback exists."""
    wrapped = ["unshare", "--user", "--map-root-user", "--net", "sh", "-c"]
    wrapped += ['ip link set lo up && exec "$@"', "sh", *command]
    probe = subprocess.run([*wrapped[: -len(command)], "true"], capture_output=True, check=False)
    if shutil.which("unshare") is None or probe.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot run without a network here: {probe.stderr!r}")
        pytest.skip("unshare cannot make a network namespace on this machine")
    return wrapped


def test_the_demo_runs_with_no_network_and_no_settings_in_under_30_seconds() -> None:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("NOTIFIER_", "CHAMELAION_"))
    }
    started = time.monotonic()
    result = subprocess.run(
        offline([sys.executable, "-m", "notifier", "demo"]),
        env={**environment, **HOSTILE_ENVIRONMENT},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 30
    assert result.stderr == ""  # no warning, no traceback
    routes = [message.route for message in shown(result.stdout)]
    assert sorted(routes) == ["digest"] + ["slack"] * 3 + ["webhook"] * 3


def test_the_webhook_gets_two_completed_and_one_failed_event_with_their_headers(
    output: str,
) -> None:
    webhooks = [message.webhook() for message in shown(output) if message.route == "webhook"]
    bodies = sorted((body for _, body in webhooks), key=lambda body: body["type"])
    assert [body["type"] for body in bodies] == [
        "lipsync.request.completed",
        "lipsync.request.completed",
        "lipsync.request.failed",
    ]
    failed = bodies[2]["data"]
    assert (failed["status"], failed["error_message"], failed["output_url"]) == (
        "failed",
        FAILURE,
        None,
    )
    assert {body["data"]["previous_status"] for body in bodies} == {"processing"}
    for headers, body in webhooks:
        assert headers["content-type"] == "application/json"
        assert headers["user-agent"].startswith("chamelaion-notifier/")
        assert uuid.UUID(headers["webhook-id"])
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
        assert re.fullmatch(r"v1,[A-Za-z0-9+/]{43}=", headers["webhook-signature"])
        assert body["data"]["reference_id"] == "episode-7-ja"
    assert len({headers["webhook-id"] for headers, _ in webhooks}) == 3


def test_slack_gets_a_compact_rendering_of_each_block_kit_message(output: str) -> None:
    slack = [message.lines for message in shown(output) if message.route == "slack"]
    headers = sorted(lines[1] for lines in slack)
    assert headers == ["┃ ✅ LIP SYNC COMPLETED", "┃ ✅ LIP SYNC COMPLETED", "┃ ❌ LIP SYNC FAILED"]
    for lines in slack:
        assert lines[0].startswith("text: Lip sync request `")
        assert any("*Reference*: episode-7-ja" in line for line in lines)
    failed = next(lines for lines in slack if "FAILED" in lines[1])
    assert f"┃ {FAILURE}" in failed
    completed = next(lines for lines in slack if "COMPLETED" in lines[1])
    assert any(re.fullmatch(r"┃ \[Open output\] https://\S+\.mp4", line) for line in completed)


def test_the_accounts_earlier_requests_are_recorded_silently(output: str) -> None:
    assert "recorded the account's 12 earlier requests silently" in output
    assert len(shown(output)) == 7  # the batch's three on two routes, its digest, no more
    assert "slack got 3 messages, webhook 3 with 3 distinct webhook-ids, digest 1" in output


def test_the_digest_route_gets_one_message_for_the_whole_batch(output: str) -> None:
    [lines] = [message.lines for message in shown(output) if message.route == "digest"]
    assert lines[0] == "text: Batch `episode-7-ja` settled: 2 completed, 1 failed"
    assert lines[1] == "┃ ⚠️ BATCH SETTLED: EPISODE-7-JA"
    assert any("*Results*: 2 completed, 1 failed" in line for line in lines)
    assert any(line.startswith("┃ • `") and line.endswith(FAILURE) for line in lines)
    assert sum(".mp4|" in line for line in lines) == 2


def test_the_compact_rendering_names_every_kind_of_block() -> None:
    payload = {
        "text": "fallback",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": "Title"}},
            {"type": "divider"},
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": "*Error*\n```boom```"},
                "fields": [{"type": "mrkdwn", "text": f"*F{n}*\nv{n}"} for n in range(3)],
            },
            {"type": "context", "elements": [{"type": "mrkdwn", "text": "a"}, {"text": "b"}]},
            {
                "type": "actions",
                "elements": [{"type": "button", "text": {"text": "Open"}, "url": "https://x"}],
            },
            {"type": "image", "image_url": "https://x/y.png", "alt_text": "y"},
        ],
    }
    assert slack_lines(Arrival("slack", {}, json.dumps(payload).encode())) == [
        "text: fallback",
        "┃ TITLE",
        "┃ " + "─" * 40,
        "┃ *Error*",
        "┃ boom",
        "┃ *F0*: v0    *F1*: v1",
        "┃ *F2*: v2",
        "┃ a · b",
        "┃ [Open] https://x",
        "┃ (image block)",
    ]


def test_a_demo_that_stalls_exits_1_saying_what_did_not_happen(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "CYCLE_TIMEOUT_S", 0.5)
    # An account whose key the simulator refuses: no poll cycle ever completes.
    monkeypatch.setattr(
        Simulator, "backfill", lambda self, count: self.revoked_keys.add("sim-demo-key")
    )
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.endswith("notifier demo: no poll cycle completed in time; see the warnings above.\n")
    assert "rejected the API key (HTTP 403: unauthorized)" in err


class SwallowingRedis:
    """A client whose call swallows the first cancellation it meets, as a redis-py call on
    Python 3.11 may when the cancellation lands as the command completes."""

    def __init__(self) -> None:
        self.swallowed = False

    async def get(self, key: str) -> None:
        try:
            await asyncio.sleep(0.3)  # longer than the demo's wait below: it lands here
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed = True


async def test_waiting_for_a_cycle_ends_even_when_a_redis_call_swallows_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(demo, "CYCLE_TIMEOUT_S", 0.1)
    cycles = demo._Cycles.__new__(demo._Cycles)
    cycles.client, cycles.key = SwallowingRedis(), "last-cycle"
    with pytest.raises(demo.DemoStalled, match="no poll cycle completed in time"):
        await asyncio.wait_for(cycles.next(), 5)


def test_ctrl_c_stops_the_demo_with_130_and_no_traceback() -> None:
    demo_process = subprocess.Popen(
        [sys.executable, "-u", "-m", "notifier", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert demo_process.stdout is not None
    for line in demo_process.stdout:  # Ctrl-C once the poller and the workers are running
        if "baseline:" in line:
            break
    demo_process.send_signal(signal.SIGINT)
    _, err = demo_process.communicate(timeout=10)
    assert demo_process.returncode == 130
    assert "Traceback" not in err
