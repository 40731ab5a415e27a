"""Delivery end to end: events queued by real poll cycles against the simulator, sent by
the workers to a real receiver on 127.0.0.1, with retries and dead letters in Redis."""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from standardwebhooks.webhooks import Webhook

from notifier import delivery as delivery_module
from notifier import lease as lease_module
from notifier import worker as worker_module
from notifier.api import ApiClient
from notifier.config import Settings, load_settings
from notifier.delivery import Delivery, sink_session
from notifier.dlq import DeadLetters
from notifier.keys import Keys
from notifier.models import event_id
from notifier.poller import Poller
from notifier.queue import RouteQueue
from notifier.simulator import Simulator
from notifier.store import connect_redis

from conftest import RedisServer
from receiver import Receiver, Seen
from samples import SIMULATOR_KEY

SECRET = "whsec_" + base64.b64encode(b"ZZLEAK-delivery-signing-key").decode()
# A Slack webhook URL's path is its credential.
SLACK_PATH = "/services/T0TEAM/B0HOOK/ZZLEAK-slack-token"


@pytest.fixture(autouse=True)
def _no_secret_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test here also checks that no log line holds a secret or a Slack URL's path."""
    caplog.set_level(logging.DEBUG)
    yield
    for secret in (SECRET, "ZZLEAK", SIMULATOR_KEY):
        assert secret not in caplog.text


@pytest.fixture(autouse=True)
def _fast_timers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heartbeats last 0.3 s, upkeep runs every 50 ms, blocking reads last 50 ms."""
    monkeypatch.setattr(delivery_module, "HEARTBEAT_TTL_S", 0.3)
    monkeypatch.setattr(delivery_module, "MAINTENANCE_S", 0.05)
    monkeypatch.setattr(worker_module, "BLOCK_S", 0.05)
    monkeypatch.setattr(worker_module, "RETRY_CHECK_S", 0.01)
    monkeypatch.setattr(lease_module, "MIN_TTL_S", 0.5)


@dataclass
class Rig:
    """Everything a delivery test needs: Redis, the simulated account, a receiver."""

    client: redis.asyncio.Redis
    simulator: Simulator
    api_url: str
    receiver: Receiver
    session: aiohttp.ClientSession
    tmp_path: Path

    def settings(self, **flags: Any) -> Settings:
        """A signed webhook route `webhook` to /hook; more routes from `routes` (TOML)."""
        config = self.tmp_path / "notifier.toml"
        config.write_text(flags.pop("routes", ""))
        return load_settings(
            {
                "config": str(config),
                "api_url": self.api_url,
                "api_key": SIMULATOR_KEY,
                "webhook_url": self.receiver.url("/hook"),
                "webhook_secret": SECRET,
                "retry_base_delay": "0.01",
                "retry_max_delay": "0.05",
                "delivery_timeout": "2",
                "poll_interval": "0.1",
                **{name: str(value) for name, value in flags.items()},
            }
        )

    async def transitions(
        self, settings: Settings, *, completed: int = 0, failed: int = 0
    ) -> list[str]:
        """Record a baseline of processing requests, then finish them and queue their
        events with a second cycle; returns the expected event ids, in request order."""
        requests = self.simulator.create(completed + failed, reference_id="batch-7")
        for request in requests:
            self.simulator.start(request.id)
        async with ApiClient(settings) as api:
            poller = Poller(settings, self.client, api)
            assert await poller.lease.acquire()
            await poller.cycle()
            for request in requests[:completed]:
                self.simulator.complete(request.id)
            for request in requests[completed:]:
                self.simulator.fail(request.id)
            result = await poller.cycle()
            await poller.lease.release()
        assert result.events == completed + failed
        return [event_id(request.id, request.status) for request in requests]

    def delivery(self, settings: Settings, **kwargs: Any) -> Delivery:
        """Delivery workers of this process for `settings`."""
        return Delivery(settings, self.client, self.session, **kwargs)


@pytest.fixture
async def rig(
    redis_client: redis.asyncio.Redis,
    simulator: Simulator,
    api_url: str,
    webhook_receiver: Receiver,
    tmp_path: Path,
) -> AsyncIterator[Rig]:
    async with sink_session() as session:
        yield Rig(redis_client, simulator, api_url, webhook_receiver, session, tmp_path)


@pytest.fixture
async def real_rig(
    redis_server: RedisServer,
    simulator: Simulator,
    api_url: str,
    webhook_receiver: Receiver,
    tmp_path: Path,
) -> AsyncIterator[Rig]:
    """A rig on the real redis-server only, which a test may stop and start."""
    client = connect_redis(redis_server.url)
    await client.flushall()
    async with sink_session() as session:
        yield Rig(client, simulator, api_url, webhook_receiver, session, tmp_path)
    await client.aclose()


async def run_until(delivery: Delivery, done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Run the delivery workers until `done()` holds, then stop them."""
    stop = asyncio.Event()
    task = asyncio.create_task(delivery.run(stop))
    deadline = time.monotonic() + timeout
    try:
        while not done():
            assert time.monotonic() < deadline, "the deliveries did not happen in time"
            assert not task.done(), task
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


def verify(seen: Seen, secret: str = SECRET) -> dict[str, Any]:
    """Verify a webhook request as a Standard Webhooks receiver would; its payload."""
    return Webhook(secret).verify(seen.body, dict(seen.headers))


async def test_each_transition_is_delivered_once_signed_with_its_event_id(rig: Rig) -> None:
    settings = rig.settings()
    expected = await rig.transitions(settings, completed=5, failed=2)

    delivery = rig.delivery(settings)
    tally = await delivery.deliver_due()

    ids = [seen.event_id for seen in rig.receiver.seen]
    assert sorted(ids) == sorted(expected)
    payloads = [verify(seen) for seen in rig.receiver.seen]
    assert {payload["data"]["status"] for payload in payloads} == {"completed", "failed"}
    assert (tally.delivered, tally.retried, tally.dead) == (7, 0, 0)
    assert (await delivery.backlog()).total == 0


async def test_a_receiver_failing_three_times_gets_four_attempts_with_one_id(rig: Rig) -> None:
    settings = rig.settings()
    [expected] = await rig.transitions(settings, completed=1)
    rig.receiver.plan("/hook", (500, "oops"), (500, "oops"), (500, "oops"))

    delivery = rig.delivery(settings)
    await run_until(delivery, lambda: delivery.tally.delivered == 1)

    attempts = rig.receiver.to("/hook")
    assert len(attempts) == 4
    assert {seen.event_id for seen in attempts} == {expected}
    assert all(verify(seen) for seen in attempts)  # each attempt signed afresh, all valid
    assert len({seen.body for seen in attempts}) == 1
    assert (delivery.tally.retried, delivery.tally.delivered) == (3, 1)
    assert (await delivery.backlog()).total == 0


# Retry timing: the receiver's Retry-After, and jittered exponential backoff.


async def test_a_retry_after_is_honoured_even_beyond_the_backoff(real_rig: Rig) -> None:
    rig = real_rig  # timing tests: one backend is enough
    settings = rig.settings()  # backoff of 10 to 50 ms
    await rig.transitions(settings, completed=1)
    rig.receiver.plan("/hook", (429, "slow down", {"retry-after": "1"}))

    delivery = rig.delivery(settings)
    await run_until(delivery, lambda: delivery.tally.delivered == 1)

    first, second = rig.receiver.to("/hook")
    assert second.at - first.at >= 1.0


# Dead letters.


async def test_retries_end_in_a_dead_letter_with_the_last_status_and_body(rig: Rig) -> None:
    settings = rig.settings(retry_max_attempts=3)
    [expected] = await rig.transitions(settings, failed=1)
    rig.receiver.always("/hook", 503, "maintenance until 5pm")

    delivery = rig.delivery(settings)
    await run_until(delivery, lambda: delivery.tally.dead == 1)

    assert len(rig.receiver.to("/hook")) == 3
    [letter] = [d async for d in DeadLetters(rig.client, Keys(settings.key_prefix)).all()]
    assert letter.as_json()["event_id"] == expected
    assert letter.attempts == 3
    assert letter.error == "HTTP 503: maintenance until 5pm (gave up after 3 attempts)"
    assert (await delivery.backlog()).total == 0


async def test_a_permanent_refusal_is_replayed_once_fixed_with_the_same_id(rig: Rig) -> None:
    settings = rig.settings()
    [expected] = await rig.transitions(settings, completed=1)
    rig.receiver.plan("/hook", (400, "unknown field"))
    dead_letters = DeadLetters(rig.client, Keys(settings.key_prefix))

    first = await rig.delivery(settings).deliver_due()
    assert (first.dead, len(rig.receiver.seen)) == (1, 1)
    [letter] = [d async for d in dead_letters.all()]
    assert letter.error == "HTTP 400: unknown field"

    replayed = await dead_letters.replay(None, ["webhook"])  # the receiver is fixed now
    assert [d.id for d in replayed.replayed] == [letter.id]
    second = await rig.delivery(settings).deliver_due()

    assert second.delivered == 1
    assert [seen.event_id for seen in rig.receiver.seen] == [expected, expected]
    assert rig.receiver.seen[0].body == rig.receiver.seen[1].body
    assert [d async for d in dead_letters.all()] == []


async def test_a_template_failing_on_an_event_dead_letters_it(rig: Rig) -> None:
    templates = rig.tmp_path / "templates"
    (templates / "webhook").mkdir(parents=True)
    (templates / "webhook" / "default.json.j2").write_text(
        '{"error": {{ request.error_message.upper() | tojson }}}'
    )
    settings = rig.settings(templates_dir=templates)
    await rig.transitions(settings, completed=1, failed=1)

    tally = await rig.delivery(settings).deliver_due()

    assert (tally.delivered, tally.dead) == (1, 1)
    [letter] = [d async for d in DeadLetters(rig.client, Keys(settings.key_prefix)).all()]
    assert letter.error.startswith("could not render: route 'webhook', template webhook/")
    assert letter.as_json()["status"] == "completed"


async def test_an_outbox_entry_that_is_not_an_event_is_dead_lettered(rig: Rig) -> None:
    settings = rig.settings()
    await rig.transitions(settings, completed=1)
    await rig.client.xadd(Keys(settings.key_prefix).outbox, {"r": "{not json", "t": "x"})

    tally = await rig.delivery(settings).deliver_due()

    assert (tally.delivered, tally.dead) == (1, 1)
    [letter] = [d async for d in DeadLetters(rig.client, Keys(settings.key_prefix)).all()]
    assert letter.error.startswith("outbox entry is not an event")
    assert letter.as_json()["request_id"] is None


async def test_a_receiver_slower_than_the_timeout_is_tried_again_with_the_same_id(
    rig: Rig,
) -> None:
    calls = 0

    async def slow_first(_request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(1.0)
        return web.Response(status=204)

    settings = rig.settings(delivery_timeout="0.2")
    [expected] = await rig.transitions(settings, completed=1)
    rig.receiver.handle("/hook", slow_first)

    delivery = rig.delivery(settings)
    await run_until(delivery, lambda: delivery.tally.delivered == 1)

    assert [seen.event_id for seen in rig.receiver.seen] == [expected, expected]
    assert (delivery.tally.retried, delivery.tally.delivered) == (1, 1)


async def test_an_outcome_redis_failed_to_record_is_recorded_later_and_not_sent_again(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = rig.settings()
    expected = await rig.transitions(settings, completed=4)
    resolve_and_take = RouteQueue.resolve_and_take
    failed = []

    async def failing_once(queue: RouteQueue, resolutions: Any, *args: Any) -> Any:
        if resolutions and not failed:
            failed.append(len(resolutions))
            raise RedisConnectionError("connection reset by peer")
        return await resolve_and_take(queue, resolutions, *args)

    monkeypatch.setattr(RouteQueue, "resolve_and_take", failing_once)
    delivery = rig.delivery(settings)
    await run_until(delivery, lambda: delivery.tally.delivered == 4)

    assert failed  # the failure happened, with outcomes in hand
    assert sorted(seen.event_id for seen in rig.receiver.seen) == sorted(expected)
    assert (await delivery.backlog()).total == 0


# Routes: filters, concurrency, and one route never holding up another.

TWO_ROUTES = """
[[routes]]
name = "fast"
type = "webhook"
url = "{fast}"
statuses = ["failed"]

[[routes]]
name = "slow"
type = "webhook"
url = "{slow}"
max_concurrency = 2
"""


async def test_a_route_gets_only_the_statuses_it_asked_for(rig: Rig) -> None:
    routes = TWO_ROUTES.format(fast=rig.receiver.url("/fast"), slow=rig.receiver.url("/slow"))
    settings = rig.settings(routes=routes)
    await rig.transitions(settings, completed=3, failed=2)

    tally = await rig.delivery(settings).deliver_due()

    assert {seen.json()["data"]["status"] for seen in rig.receiver.to("/fast")} == {"failed"}
    assert len(rig.receiver.to("/fast")) == 2
    assert len(rig.receiver.to("/slow")) == len(rig.receiver.to("/hook")) == 5
    assert tally.by_route["fast"] == {"delivered": 2, "skipped": 3}


async def test_a_hanging_endpoint_holds_only_its_own_route(rig: Rig) -> None:
    routes = TWO_ROUTES.format(fast=rig.receiver.url("/fast"), slow=rig.receiver.url("/slow"))
    settings = rig.settings(routes=routes, delivery_timeout=30)
    rig.receiver.stall("/slow")
    await rig.transitions(settings, completed=2, failed=6)
    delivery = rig.delivery(settings)
    slow = RouteQueue(rig.client, Keys(settings.key_prefix), "slow", "observer")

    def fast_done() -> bool:
        return delivery.tally.by_route.get("fast", {}).get("delivered") == 6

    started = time.monotonic()
    stop = asyncio.Event()
    task = asyncio.create_task(delivery.run(stop))
    while not fast_done() or len(rig.receiver.to("/hook")) < 8:
        assert time.monotonic() - started < 2.0, "the fast routes waited for the slow one"
        await asyncio.sleep(0.01)

    assert len(rig.receiver.to("/slow")) == 2  # its max_concurrency, and no more read
    backlog = await slow.backlog()
    assert (backlog.pending, backlog.unread) == (2, 6)  # two in flight, the rest untouched
    rig.receiver.release.set()  # the endpoint answers at last: everything drains
    while delivery.tally.by_route.get("slow", {}).get("delivered") != 8:
        assert time.monotonic() - started < 10.0
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_sends_in_flight_never_exceed_max_concurrency(rig: Rig) -> None:
    in_flight, most = 0, 0

    async def slow_ok(_request: web.Request) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return web.Response(status=204)

    settings = rig.settings()
    rig.receiver.handle("/hook", slow_ok)
    await rig.transitions(settings, completed=20)

    tally = await rig.delivery(settings).deliver_due()

    assert tally.delivered == 20
    assert most == 4  # the default max_concurrency, reached and never passed


# Slack pacing.


async def test_slack_messages_to_one_url_go_one_per_second(real_rig: Rig) -> None:
    rig = real_rig  # timing tests: one backend is enough
    settings = rig.settings(slack_webhook_url=rig.receiver.url(SLACK_PATH))
    await rig.transitions(settings, completed=3)

    await rig.delivery(settings).deliver_due()

    arrivals = [seen.at for seen in rig.receiver.to(SLACK_PATH)]
    assert len(arrivals) == 3
    assert all(later - earlier >= 0.95 for earlier, later in itertools.pairwise(arrivals))


async def test_a_slack_retry_after_holds_the_url_for_every_message(real_rig: Rig) -> None:
    rig = real_rig  # timing tests: one backend is enough
    settings = rig.settings(slack_webhook_url=rig.receiver.url(SLACK_PATH))
    await rig.transitions(settings, completed=2)
    rig.receiver.plan(SLACK_PATH, (429, "rate limited", {"retry-after": "2"}))

    delivery = rig.delivery(settings)
    await run_until(
        delivery, lambda: delivery.tally.by_route.get("slack", {}).get("delivered") == 2
    )

    first, *rest = rig.receiver.to(SLACK_PATH)
    assert len(rest) == 2
    assert all(seen.at - first.at >= 1.95 for seen in rest)


async def test_a_pass_schedules_slack_messages_held_longer_than_it_waits(real_rig: Rig) -> None:
    # `once` from cron: a 429 holding the URL for a minute must not keep it running.
    rig = real_rig
    settings = rig.settings(slack_webhook_url=rig.receiver.url(SLACK_PATH))
    await rig.transitions(settings, completed=2)
    rig.receiver.plan(SLACK_PATH, (429, "rate limited", {"retry-after": "60"}))
    delivery = rig.delivery(settings)

    started = time.monotonic()
    tally = await delivery.deliver_due()

    assert time.monotonic() - started < 2
    assert tally.by_route["slack"] == {"retried": 1}
    assert (await delivery.backlog()).retries == 2  # the other one waits for the slot too


async def test_a_pass_does_not_wait_for_the_slack_slot_after_its_last_message(
    real_rig: Rig,
) -> None:
    rig = real_rig
    settings = rig.settings(slack_webhook_url=rig.receiver.url(SLACK_PATH))
    await rig.transitions(settings, completed=1)

    started = time.monotonic()
    tally = await rig.delivery(settings).deliver_due()

    assert tally.by_route["slack"] == {"delivered": 1}
    assert time.monotonic() - started < 0.8  # not the 1 s pacing interval on top


# Workers that die, and Redis that fails.


async def test_a_dead_workers_deliveries_are_taken_over_with_their_ids(rig: Rig) -> None:
    settings = rig.settings()
    expected = await rig.transitions(settings, completed=3)
    dead = RouteQueue(rig.client, Keys(settings.key_prefix), "webhook", "dead-worker")
    assert len(await dead.take_new(10)) == 3  # read, then the process died: no heartbeat

    delivery = rig.delivery(settings)
    started = time.monotonic()
    await run_until(delivery, lambda: delivery.tally.delivered == 3)

    assert time.monotonic() - started < 1.0  # no idle timeout: the heartbeat was missing
    assert sorted(seen.event_id for seen in rig.receiver.seen) == sorted(expected)
    assert (await delivery.backlog()).total == 0


async def test_a_live_workers_deliveries_are_left_alone(rig: Rig) -> None:
    settings = rig.settings()
    await rig.transitions(settings, completed=2)
    keys = Keys(settings.key_prefix)
    busy = RouteQueue(rig.client, keys, "webhook", "busy-worker")
    await rig.client.set(keys.heartbeat("busy-worker"), "1", px=60_000)
    assert len(await busy.take_new(10)) == 2

    tally = await rig.delivery(settings).deliver_due()

    assert tally.delivered == 0
    assert rig.receiver.seen == []
    assert (await busy.backlog()).pending == 2


async def test_a_redis_outage_is_waited_out_and_delivery_resumes(
    real_rig: Rig, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    rig = real_rig
    settings = rig.settings(slack_webhook_url=rig.receiver.url(SLACK_PATH))
    await rig.transitions(settings, completed=1)
    delivery = rig.delivery(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(delivery.run(stop))
    try:
        while delivery.tally.delivered < 2:
            await asyncio.sleep(0.01)
        redis_server.stop()
        await asyncio.sleep(1.2)  # past the Slack slot, which the worker then asks Redis for
        assert not task.done()
    finally:
        redis_server.start()  # empty: the test server runs without persistence

    await rig.transitions(settings, completed=1)  # a new baseline, then one transition
    deadline = time.monotonic() + 15
    while delivery.tally.delivered < 4:
        assert time.monotonic() < deadline, "delivery did not resume after the outage"
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert len(rig.receiver.to("/hook")) == len(rig.receiver.to(SLACK_PATH)) == 2
    # Both workers, the heartbeat and the upkeep failed many times: said once, and once back.
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert sum("Redis is unreachable" in line for line in said) == 1
    assert sum("Redis is reachable again" in line for line in said) == 1


class _BuggyRenderer:
    """A renderer with a bug of ours in it: every render raises KeyError."""

    def render(self, *_args: object) -> None:
        raise KeyError("a bug")

    async def render_async(self, *_args: object) -> None:
        raise KeyError("a bug")


async def test_a_bug_while_delivering_is_an_attempt_and_ends_in_the_dead_letters(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    settings = rig.settings(retry_max_attempts=2)
    await rig.transitions(settings, completed=1)
    delivery = rig.delivery(settings)
    for worker in delivery.workers:
        worker._renderer = _BuggyRenderer()  # type: ignore[assignment]
    for _ in range(5):  # a pass per retry, and more: the bug must not retry forever
        await delivery.deliver_due()
        await asyncio.sleep(0.06)  # past the longest backoff (retry_max_delay 0.05 s)
    assert (delivery.tally.retried, delivery.tally.dead) == (1, 1)
    (letter,) = [letter async for letter in DeadLetters(rig.client, Keys("notifier")).all()]
    assert letter.attempts == 2
    assert letter.error.startswith("internal error (KeyError: 'a bug')")
    assert rig.receiver.to("/hook") == []
    assert "Traceback" in caplog.text  # a bug is logged with its trace, for whoever fixes it
