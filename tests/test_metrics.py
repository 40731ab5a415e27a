"""Metrics: what the API client, the poller and the workers count, what Redis holds as gauges,
and that no label ever carries a URL or a secret."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from notifier import __version__
from notifier import poller as poller_module
from notifier.api import ApiClient, ApiError
from notifier.config import Settings, load_settings
from notifier.delivery import Delivery, sink_session
from notifier.dlq import dead_letter_fields
from notifier.keys import Keys
from notifier.logs import secrets_of
from notifier.metrics import Metrics
from notifier.models import LipsyncRequest
from notifier.queue import RouteQueue
from notifier.simulator import Fault, FaultKind, Simulator
from notifier.store import Store, connect_redis

from conftest import FakeClock, eventually
from polling import make_settings, poller_of, running
from receiver import Receiver
from samples import QUEUED, SIMULATOR_KEY

CLOSED_PORT_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
TOKEN = "token-of-this-poller"  # noqa: S105 - a lease token, not a secret
MARKER = "ZZLEAK"
# A signing secret whose text itself holds the marker (valid base64 after whsec_).
LEAKY_SECRET = f"whsec_{MARKER}{MARKER}{MARKER}000000"
SLACK_PATH = f"/services/T0TEAM/B0HOOK/{MARKER}-slack-token"
CYCLES = "notifier_poll_cycles_total"
TRANSITIONS = "notifier_transitions_total"
EVENTS = "notifier_events_queued_total"
DIGESTS = "notifier_digests_queued_total"


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed poll cycle is retried within tens of milliseconds."""
    monkeypatch.setattr(poller_module, "TRANSIENT_BACKOFF", (0.01, 0.05))


# Reading the exposition as Prometheus does.


def samples(metrics: Metrics) -> list[Sample]:
    """Every sample of the exposition, parsed as Prometheus would."""
    text = metrics.exposition().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The value of the one sample with exactly this name and these labels; None if absent."""
    found = [s.value for s in samples(metrics) if s.name == name and s.labels == labels]
    assert len(found) <= 1, found
    return found[0] if found else None


def labelled(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of `name`: sorted label pairs -> value."""
    return {tuple(sorted(s.labels.items())): s.value for s in samples(metrics) if s.name == name}


# The registry and the delivery counters.


def test_each_metrics_instance_counts_in_a_registry_of_its_own() -> None:
    first, second = Metrics(), Metrics()
    first.api_calls.labels("ok").inc()
    first.delivered("slack", "delivered", 1.0)
    assert first.registry is not second.registry
    assert value(first, "notifier_api_calls_total", outcome="ok") == 1
    assert value(second, "notifier_api_calls_total", outcome="ok") is None
    assert labelled(second, "notifier_deliveries_total") == {}


def test_the_build_info_names_the_version() -> None:
    assert value(Metrics(), "notifier_build_info", version=__version__) == 1


def test_a_dead_delivery_is_exported_as_dead_lettered() -> None:
    metrics = Metrics()
    metrics.delivered("webhook", "dead", None)
    metrics.delivered("webhook", "retried", None)
    assert labelled(metrics, "notifier_deliveries_total") == {
        (("outcome", "dead_lettered"), ("route", "webhook")): 1,
        (("outcome", "retried"), ("route", "webhook")): 1,
    }
    # Only successful deliveries have a latency.
    assert labelled(metrics, "notifier_delivery_latency_seconds_count") == {}


def test_latencies_are_observed_per_route() -> None:
    metrics = Metrics()
    metrics.delivered("slack", "delivered", 1.5)
    metrics.delivered("slack", "delivered", 0.2)
    metrics.delivered("ops", "delivered", 40.0)
    name = "notifier_delivery_latency_seconds"
    assert value(metrics, f"{name}_count", route="slack") == 2
    assert value(metrics, f"{name}_sum", route="slack") == pytest.approx(1.7)
    assert value(metrics, f"{name}_bucket", route="slack", le="0.25") == 1
    assert value(metrics, f"{name}_bucket", route="slack", le="1.0") == 1
    assert value(metrics, f"{name}_bucket", route="slack", le="2.0") == 2
    assert value(metrics, f"{name}_count", route="ops") == 1
    assert value(metrics, f"{name}_bucket", route="ops", le="30.0") == 0
    assert value(metrics, f"{name}_bucket", route="ops", le="60.0") == 1
    assert value(metrics, "notifier_deliveries_total", route="slack", outcome="delivered") == 2


def test_a_negative_latency_is_recorded_as_zero() -> None:
    metrics = Metrics()
    metrics.delivered("slack", "delivered", -3.0)  # the detecting replica's clock ran ahead
    name = "notifier_delivery_latency_seconds"
    assert value(metrics, f"{name}_count", route="slack") == 1
    assert value(metrics, f"{name}_sum", route="slack") == 0
    assert value(metrics, f"{name}_bucket", route="slack", le="0.1") == 1


# Gauges read from Redis.


def two_route_settings() -> Settings:
    return load_settings(
        {"webhook_url": "http://127.0.0.1:9/hook", "slack_webhook_url": "http://127.0.0.1:9/s"}
    )


def request(request_id: str, status: str) -> LipsyncRequest:
    return LipsyncRequest.model_validate({**QUEUED, "id": request_id, "status": status})


def backlog(metrics: Metrics) -> dict[tuple[str, str], float]:
    """notifier_delivery_backlog by (route, state)."""
    return {
        (s.labels["route"], s.labels["state"]): s.value
        for s in samples(metrics)
        if s.name == "notifier_delivery_backlog"
    }


def redis_gauges(metrics: Metrics) -> dict[str, object]:
    """Every gauge read from Redis but notifier_redis_up."""
    return {
        "backlog": backlog(metrics),
        **{
            name: value(metrics, name)
            for name in (
                "notifier_outbox_entries",
                "notifier_dead_letters",
                "notifier_tracked_requests",
                "notifier_last_cycle_timestamp_seconds",
            )
        },
    }


def queues_of(client: redis.asyncio.Redis, settings: Settings) -> list[RouteQueue]:
    keys = Keys(settings.key_prefix)
    return [RouteQueue(client, keys, route.name, "metrics-test") for route in settings.routes]


async def test_an_empty_redis_reads_as_zeros_and_up(redis_client: redis.asyncio.Redis) -> None:
    settings = two_route_settings()
    metrics = Metrics()
    await metrics.read_redis(Store(redis_client, settings), queues_of(redis_client, settings))
    assert value(metrics, "notifier_redis_up") == 1
    for name in ("notifier_outbox_entries", "notifier_dead_letters", "notifier_tracked_requests"):
        assert value(metrics, name) == 0, name
    assert value(metrics, "notifier_last_cycle_timestamp_seconds") == 0
    assert backlog(metrics) == {
        (route, state): 0
        for route in ("webhook", "slack")
        for state in ("retries", "pending", "unread")
    }


async def test_the_gauges_show_what_waits_in_redis_and_keep_it_while_redis_is_down(
    redis_client: redis.asyncio.Redis,
) -> None:
    settings = two_route_settings()
    clock = FakeClock().at(12.5)
    store = Store(redis_client, settings, clock)
    await redis_client.set(store.keys.lease, TOKEN)
    # A baseline of three requests, then a cycle in which two of them finish: two events.
    epoch = await store.begin(TOKEN, notify_existing=False)
    baseline = [request("a", "processing"), request("b", "processing"), request("c", "queued")]
    await store.apply(baseline, epoch, TOKEN)
    assert await store.finish(epoch, TOKEN)
    epoch = await store.begin(TOKEN, notify_existing=False)
    applied = await store.apply([request("a", "completed"), request("b", "failed")], epoch, TOKEN)
    assert applied.events == 2
    # The webhook route retries one event and dead-letters the other; the Slack route has
    # read one (pending) and not yet the other (unread).
    webhook, slack = (
        RouteQueue(redis_client, store.keys, name, "metrics-test", clock)
        for name in ("webhook", "slack")
    )
    retried, dead = await webhook.take_new(2)
    assert await webhook.resolve(retried, "retry", due_s=60, attempts=1)
    assert await webhook.resolve(dead, "dead", dead_letter=dead_letter_fields(dead, 3, "HTTP 500"))
    assert len(await slack.take_new(1)) == 1

    metrics = Metrics()
    await metrics.read_redis(store, [webhook, slack])

    assert value(metrics, "notifier_redis_up") == 1
    assert value(metrics, "notifier_outbox_entries") == 2
    assert value(metrics, "notifier_dead_letters") == 1
    assert value(metrics, "notifier_tracked_requests") == 3
    assert value(metrics, "notifier_last_cycle_timestamp_seconds") == FakeClock.START + 12.5
    assert backlog(metrics) == {
        ("webhook", "retries"): 1,
        ("webhook", "pending"): 0,
        ("webhook", "unread"): 0,
        ("slack", "retries"): 0,
        ("slack", "pending"): 1,
        ("slack", "unread"): 1,
    }

    before = redis_gauges(metrics)
    down = connect_redis(CLOSED_PORT_URL)
    try:
        await metrics.read_redis(Store(down, settings), queues_of(down, settings))
    finally:
        await down.aclose()
    assert value(metrics, "notifier_redis_up") == 0
    assert redis_gauges(metrics) == before


async def test_redis_coming_back_sets_redis_up_again(redis_client: redis.asyncio.Redis) -> None:
    settings = two_route_settings()
    metrics = Metrics()
    down = connect_redis(CLOSED_PORT_URL)
    try:
        await metrics.read_redis(Store(down, settings), queues_of(down, settings))
    finally:
        await down.aclose()
    assert value(metrics, "notifier_redis_up") == 0
    await metrics.read_redis(Store(redis_client, settings), queues_of(redis_client, settings))
    assert value(metrics, "notifier_redis_up") == 1


# API calls.


def api_settings(api_url: str, **flags: Any) -> Settings:
    return load_settings({"api_url": api_url, "api_key": SIMULATOR_KEY, **flags})


def api_calls(metrics: Metrics) -> dict[str, float]:
    """notifier_api_calls_total by outcome."""
    return {
        dict(pairs)["outcome"]: count
        for pairs, count in labelled(metrics, "notifier_api_calls_total").items()
    }


async def test_each_page_fetched_counts_one_ok_api_call(simulator: Simulator, api_url: str) -> None:
    simulator.create(7)
    metrics = Metrics()
    async with ApiClient(api_settings(api_url, page_size=3), metrics) as api:
        pages = [page async for page in api.listing()]
    assert sum(len(page.requests) for page in pages) == 7
    assert simulator.calls == 3
    assert api_calls(metrics) == {"ok": 3}


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        (Fault(FaultKind.SERVER_ERROR), "server_error"),
        (Fault(FaultKind.RATE_LIMIT, retry_after="5"), "rate_limited"),
        (Fault(FaultKind.INVALID_JSON), "invalid_response"),
        (Fault(FaultKind.HTML), "invalid_response"),
    ],
    ids=lambda param: param.kind.value if isinstance(param, Fault) else param,
)
async def test_a_failed_api_call_is_counted_under_its_outcome(
    simulator: Simulator, api_url: str, fault: Fault, outcome: str
) -> None:
    simulator.create(2)
    simulator.inject(fault)
    metrics = Metrics()
    async with ApiClient(api_settings(api_url), metrics) as api:
        with pytest.raises(ApiError) as raised:
            await api.fetch_page(0, 10)
        assert raised.value.outcome == outcome
        await api.fetch_page(0, 10)  # the fault is used up
    assert api_calls(metrics) == {outcome: 1, "ok": 1}


@pytest.mark.parametrize("status", [401, 403])
async def test_a_rejected_key_counts_as_unauthorized(
    simulator: Simulator, api_url: str, status: int
) -> None:
    key = "sk-revoked-key-123" if status == 403 else "sk-wrong-key-123"
    simulator.revoked_keys.add("sk-revoked-key-123")
    metrics = Metrics()
    async with ApiClient(api_settings(api_url, api_key=key), metrics) as api:
        with pytest.raises(ApiError, match=f"HTTP {status}"):
            await api.fetch_page(0, 10)
    assert api_calls(metrics) == {"unauthorized": 1}


async def test_an_unreachable_api_counts_as_unreachable() -> None:
    metrics = Metrics()
    async with ApiClient(api_settings("http://127.0.0.1:1/api"), metrics) as api:
        with pytest.raises(ApiError, match="could not reach"):
            await api.fetch_page(0, 10)
    assert api_calls(metrics) == {"unreachable": 1}


async def test_an_api_call_that_times_out_counts_as_timeout(
    simulator: Simulator, api_url: str
) -> None:
    simulator.inject(Fault(FaultKind.LATENCY, delay=0.3))
    metrics = Metrics()
    async with ApiClient(api_settings(api_url, api_timeout=0.1), metrics) as api:
        with pytest.raises(ApiError, match="did not answer"):
            await api.fetch_page(0, 10)
    assert api_calls(metrics) == {"timeout": 1}


# Poll cycles.


def completed_cycles(metrics: Metrics) -> float:
    return value(metrics, CYCLES, outcome="completed") or 0


async def test_completed_cycles_are_counted_and_timed_while_this_replica_leads(
    redis_client: redis.asyncio.Redis, simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(30)
    async with (
        poller_of(make_settings(api_url), redis_client, hold=False) as poller,
        running(poller),
    ):
        metrics = poller.metrics
        await eventually(lambda: completed_cycles(metrics) >= 2)
        assert value(metrics, "notifier_poller_leader") == 1
    cycles = completed_cycles(metrics)
    assert value(metrics, "notifier_poll_cycle_duration_seconds_count") == cycles
    assert value(metrics, "notifier_poll_cycle_duration_seconds_sum") > 0
    assert value(metrics, CYCLES, outcome="failed") is None
    assert value(metrics, "notifier_poller_leader") == 0  # the lease was given up
    assert api_calls(metrics)["ok"] == simulator.calls


async def test_a_baseline_counts_no_transitions_and_a_later_completion_counts_one(
    redis_client: redis.asyncio.Redis, simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(20)
    (request_,) = simulator.create()
    simulator.start(request_.id)
    async with (
        poller_of(make_settings(api_url), redis_client, hold=False) as poller,
        running(poller),
    ):
        metrics = poller.metrics
        await eventually(lambda: completed_cycles(metrics) >= 1)
        # The baseline saw every request for the first time: none of that is a transition.
        assert labelled(metrics, TRANSITIONS) == {}
        assert value(metrics, EVENTS) == 0

        simulator.complete(request_.id)
        await eventually(lambda: value(metrics, TRANSITIONS, status="completed") == 1)
        assert value(metrics, EVENTS) == 1
        assert await redis_client.xlen(poller.store.keys.outbox) == 1
    assert labelled(metrics, TRANSITIONS) == {(("status", "completed"),): 1}
    assert value(metrics, "notifier_requests_recorded_silently_total") == 0


async def test_a_settled_batch_counts_one_queued_digest(
    redis_client: redis.asyncio.Redis, simulator: Simulator, api_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "digest.toml"
    config.write_text(
        '[[routes]]\nname = "batches"\ntype = "webhook"\nurl = "http://127.0.0.1:9/b"\n'
        'digest = "reference_id"\ndigest_wait = 0\n'
    )
    requests = simulator.create(3, reference_id="batch-1")
    for request_ in requests:
        simulator.start(request_.id)
    settings = make_settings(api_url, config=str(config))
    async with poller_of(settings, redis_client, hold=False) as poller, running(poller):
        metrics = poller.metrics
        await eventually(lambda: completed_cycles(metrics) >= 1)
        assert value(metrics, DIGESTS) == 0
        for request_ in requests:
            simulator.complete(request_.id)
        await eventually(lambda: value(metrics, DIGESTS) == 1)
        cycles = completed_cycles(metrics)
        await eventually(lambda: completed_cycles(metrics) >= cycles + 2)
    assert value(metrics, DIGESTS) == 1
    assert value(metrics, EVENTS) == 3


async def test_failed_cycles_are_counted_as_failed_and_not_timed(
    redis_client: redis.asyncio.Redis, simulator: Simulator, api_url: str
) -> None:
    simulator.create(3)
    simulator.inject(Fault(FaultKind.SERVER_ERROR), count=2)
    async with (
        poller_of(make_settings(api_url), redis_client, hold=False) as poller,
        running(poller),
    ):
        metrics = poller.metrics
        await eventually(lambda: completed_cycles(metrics) >= 1)
    assert value(metrics, CYCLES, outcome="failed") == 2
    assert value(metrics, "notifier_poll_cycle_duration_seconds_count") == completed_cycles(metrics)
    assert api_calls(metrics)["server_error"] == 2


async def test_redis_losing_its_data_counts_one_rebaseline_and_no_transitions(
    redis_client: redis.asyncio.Redis, simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(10)
    async with (
        poller_of(make_settings(api_url), redis_client, hold=False) as poller,
        running(poller),
    ):
        metrics = poller.metrics
        await eventually(lambda: completed_cycles(metrics) >= 1)
        await redis_client.flushall()  # a restart without persistence
        await eventually(lambda: value(metrics, "notifier_rebaselines_total") == 1)
        done = completed_cycles(metrics)
        await eventually(lambda: completed_cycles(metrics) > done)  # the new baseline
    assert poller.rebaselines == 1
    assert value(metrics, "notifier_rebaselines_total") == 1
    assert labelled(metrics, TRANSITIONS) == {}


# No URL or secret in a label.


@dataclass
class Rig:
    client: redis.asyncio.Redis
    simulator: Simulator
    api_url: str
    receiver: Receiver
    tmp_path: Path


@pytest.fixture
def rig(
    redis_client: redis.asyncio.Redis,
    simulator: Simulator,
    api_url: str,
    webhook_receiver: Receiver,
    tmp_path: Path,
) -> Rig:
    return Rig(redis_client, simulator, api_url, webhook_receiver, tmp_path)


async def test_no_label_of_a_full_exposition_holds_a_url_or_a_secret(rig: Rig) -> None:
    config = rig.tmp_path / "notifier.toml"
    header = f"Bearer {MARKER}-header-value"
    config.write_text(
        f'[[routes]]\nname = "ops"\ntype = "webhook"\nurl = "{rig.receiver.url("/ops/" + MARKER)}"'
        f'\nheaders = {{ "Authorization" = "{header}" }}\n'
    )
    settings = load_settings(
        {
            "config": str(config),
            "api_url": rig.api_url,
            "api_key": SIMULATOR_KEY,
            "slack_webhook_url": rig.receiver.url(SLACK_PATH),
            "webhook_url": rig.receiver.url(f"/hook-{MARKER}"),
            "webhook_secret": LEAKY_SECRET,
            "retry_max_attempts": 1,
            "poll_interval": 0.1,
        }
    )
    rig.receiver.always(f"/hook-{MARKER}", 500, "down")  # one attempt: dead-lettered
    (request_,) = rig.simulator.create()
    rig.simulator.start(request_.id)
    metrics = Metrics()
    async with (
        poller_of(settings, rig.client, hold=False, metrics=metrics) as poller,
        running(poller),
    ):
        await eventually(lambda: completed_cycles(metrics) >= 1)
        rig.simulator.complete(request_.id)
        await eventually(lambda: value(metrics, TRANSITIONS, status="completed") == 1)
    async with sink_session() as session:
        delivery = Delivery(settings, rig.client, session, metrics=metrics)
        await delivery.deliver_due()
    await metrics.read_redis(poller.store, [worker.queue for worker in delivery.workers])

    assert labelled(metrics, "notifier_deliveries_total") == {
        (("outcome", "delivered"), ("route", "ops")): 1,
        (("outcome", "delivered"), ("route", "slack")): 1,
        (("outcome", "dead_lettered"), ("route", "webhook")): 1,
    }
    assert value(metrics, "notifier_dead_letters") == 1
    assert value(metrics, "notifier_delivery_latency_seconds_count", route="slack") == 1
    secrets = [s for s in secrets_of(settings) if len(s) >= 8]
    assert any(MARKER in secret for secret in secrets)
    assert LEAKY_SECRET in secrets
    label_values = {v for sample in samples(metrics) for v in sample.labels.values()}
    assert {"ops", "slack", "webhook"} <= label_values
    for label in label_values:
        assert MARKER not in label
        assert not any(secret in label for secret in secrets), label
    assert MARKER not in metrics.exposition().decode()
