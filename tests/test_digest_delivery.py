"""Batch digests end to end: real `once` runs against the simulator and a real Redis send
one digest per settled batch to the digest routes of a real receiver on 127.0.0.1, while
the other routes still get one message per request."""

from __future__ import annotations

import asyncio
import base64
import random
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio
from slack_sdk.models.blocks import Block
from standardwebhooks.webhooks import Webhook

from notifier import delivery as delivery_module
from notifier import lease as lease_module
from notifier.config import Settings, load_settings
from notifier.digest import digest_id
from notifier.dlq import DeadLetters
from notifier.keys import Keys
from notifier.once import EXIT_DONE, run_once
from notifier.render import slack_problems
from notifier.simulator import Simulator
from notifier.store import connect_redis

from conftest import RedisServer
from receiver import Receiver, Seen
from samples import SIMULATOR_KEY

SECRET = "whsec_" + base64.b64encode(b"digest-delivery-signing-key").decode()
SLACK_PATH = "/services/T0TEAM/B0HOOK/digest-channel"
BATCH = "order-12345-japanese-dub"


@pytest.fixture(autouse=True)
def _fast_timers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery_module, "HEARTBEAT_TTL_S", 0.3)
    monkeypatch.setattr(lease_module, "MIN_TTL_S", 0.5)


@pytest.fixture
async def settings(
    tmp_path: Path, api_url: str, webhook_receiver: Receiver, redis_server: RedisServer
) -> Settings:
    """Three routes: `batches` (webhook digests), `channel` (Slack digests, failures also
    one by one) and `all` (one message per request)."""
    client: redis.asyncio.Redis = connect_redis(redis_server.url)
    await client.flushall()
    await client.aclose()
    config = tmp_path / "notifier.toml"
    config.write_text(
        f"""
[[routes]]
name = "batches"
type = "webhook"
url = "{webhook_receiver.url("/batches")}"
secret = "{SECRET}"
digest = "reference_id"
digest_wait = 0

[[routes]]
name = "channel"
type = "slack"
url = "{webhook_receiver.url(SLACK_PATH)}"
digest = "reference_id"
digest_wait = 0
digest_statuses = ["failed"]

[[routes]]
name = "all"
type = "webhook"
url = "{webhook_receiver.url("/all")}"
"""
    )
    return load_settings(
        {
            "config": str(config),
            "api_url": api_url,
            "api_key": SIMULATOR_KEY,
            "redis_url": redis_server.url,
            "retry_base_delay": "0.01",
            "retry_max_delay": "0.05",
            "poll_interval": "0.1",
        }
    )


async def once_until_done(settings: Settings) -> None:
    """`once` until nothing is left to send (Slack's pacing may schedule a message)."""
    for _ in range(10):
        report = await run_once(settings)
        if report.exit_code() == EXIT_DONE:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"work left after 10 runs:\n{report.summary()}")


def by_type(seen: list[Seen]) -> Counter[str]:
    return Counter(s.json()["type"] for s in seen)


async def test_a_batch_of_200_gives_one_digest_per_digest_route_and_200_messages_elsewhere(
    settings: Settings, simulator: Simulator, webhook_receiver: Receiver
) -> None:
    requests = simulator.create(200, reference_id=BATCH)
    alone = simulator.create(2)  # no reference_id: one by one on every route
    for request in [*requests, *alone]:
        simulator.start(request.id)
    await once_until_done(settings)  # the baseline
    order = random.Random(5).sample([r.id for r in requests], 200)
    failed = set(order[40:43])
    for start in range(0, 200, 50):
        for request_id in order[start : start + 50]:
            if request_id in failed:
                simulator.fail(request_id, f"face <lost> & found in {request_id} " + "x" * 500)
            else:
                simulator.complete(request_id)
        if start == 50:
            for request in alone:
                simulator.complete(request.id)
        await once_until_done(settings)
    await once_until_done(settings)

    everything = webhook_receiver.to("/all")
    assert len({s.event_id for s in everything}) == len(everything) == 202

    batches = webhook_receiver.to("/batches")
    assert by_type(batches) == {"lipsync.batch.settled": 1, "lipsync.request.completed": 2}
    [digest] = [s for s in batches if s.json()["type"] == "lipsync.batch.settled"]
    body = Webhook(SECRET).verify(digest.body, dict(digest.headers))
    data = body["data"]
    assert data["reference_id"] == BATCH
    assert data["counts"] == {"completed": 197, "failed": 3}
    assert len(data["requests"]) == 200
    assert {r["id"] for r in data["requests"] if r["status"] == "failed"} == failed
    assert all(
        r["error_message"].startswith("face <lost> &")
        for r in data["requests"]
        if r["status"] == "failed"
    )
    assert digest.event_id == digest_id(BATCH, [r.id for r in requests])
    assert data["created_at"] <= min(r["created_at"] for r in data["requests"])
    assert data["finished_at"] == max(r["finished_at"] for r in data["requests"])

    channel = webhook_receiver.to(SLACK_PATH)
    texts = [s.json()["text"] for s in channel]
    assert sum("settled" in text for text in texts) == 1
    assert sum("failed" in text and "settled" not in text for text in texts) == 3
    assert sum("completed" in text and "settled" not in text for text in texts) == 2
    [message] = [s.json() for s in channel if "settled" in s.json()["text"]]
    assert "197 completed, 3 failed" in message["text"]
    assert slack_problems(message) == []
    for block in message["blocks"]:
        Block.parse(block).validate_json()
    shown = "\n".join(b["text"]["text"] for b in message["blocks"] if "text" in b)
    for request_id in failed:
        assert request_id in shown
    assert "face &lt;lost&gt; &amp; found" in shown


async def test_a_dead_lettered_digest_is_listed_and_replayed_with_its_id_and_body(
    settings: Settings, simulator: Simulator, webhook_receiver: Receiver
) -> None:
    webhook_receiver.plan("/batches", (410, "gone"))
    requests = simulator.create(3, reference_id=BATCH)
    for request in requests:
        simulator.start(request.id)
    await once_until_done(settings)
    for request in requests:
        simulator.complete(request.id)
    report = await run_once(settings)
    assert report.tally.dead == 1, report.summary()

    client: redis.asyncio.Redis = connect_redis(settings.redis_url.get_secret_value())
    try:
        dead_letters = DeadLetters(client, Keys(settings.key_prefix))
        [letter] = [letter async for letter in dead_letters.all()]
        line = letter.as_json()
        expected_id = digest_id(BATCH, [r.id for r in requests])
        assert (line["route"], line["type"], line["event_id"]) == (
            "batches",
            "lipsync.batch.settled",
            expected_id,
        )
        assert (line["reference_id"], line["request_id"], line["status"]) == (
            BATCH,
            None,
            "settled",
        )
        replayed = await dead_letters.replay([letter.id], [r.name for r in settings.routes])
        assert [d.id for d in replayed.replayed] == [letter.id]
    finally:
        await client.aclose()
    await once_until_done(settings)

    first, second = webhook_receiver.to("/batches")
    assert first.event_id == second.event_id == expected_id
    assert first.body == second.body
