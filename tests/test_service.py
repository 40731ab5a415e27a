"""`notifier run` in-process: the service's loops in the test's event loop, its HTTP server
(/healthz, /readyz, /metrics) queried over real HTTP on 127.0.0.1, the real redis-server,
the API simulator and a webhook receiver; graceful stop, and the start-up checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import fakeredis
import pytest
import redis.asyncio
from aiohttp import web

from notifier import poller as poller_module
from notifier import service as service_module
from notifier import worker as worker_module
from notifier.api import ApiClient, AuthError
from notifier.config import ConfigError, Settings, load_settings
from notifier.delivery import Delivery, sink_session
from notifier.keys import Keys
from notifier.metrics import Metrics
from notifier.models import event_id
from notifier.service import (
    Readiness,
    Service,
    Shutdown,
    _check_api_key,
    _check_redis,
    _serving,
)
from notifier.simulator import Fault, FaultKind, SimulatedRequest, Simulator
from notifier.store import connect_redis

from conftest import RedisServer, eventually, free_port
from receiver import Receiver
from replicas import Samples, parse_metrics, sample
from samples import SIMULATOR_KEY

# A key the simulator is switched to, so the notifier's own key is rejected.
ROTATED_KEY = "sk-ZZLEAK-rotated-key-9d2e"
POLL_INTERVAL = 0.2  # seconds: readiness allows 3 intervals, 0.6 s


@pytest.fixture(autouse=True)
def _no_key_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test here also checks that no log line holds an API key."""
    caplog.set_level(logging.DEBUG)
    yield
    for secret in (SIMULATOR_KEY, ROTATED_KEY):
        assert secret not in caplog.text


@pytest.fixture(autouse=True)
def _fast_poller_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed cycle (Redis down, key rejected) is tried again within a fraction of a second."""
    monkeypatch.setattr(poller_module, "TRANSIENT_BACKOFF", (0.05, 0.2))
    monkeypatch.setattr(poller_module, "AUTH_BACKOFF", (0.1, 0.2))


@dataclass
class Replica:
    """One `notifier run` process, in the test's event loop: `Service.run` and its server."""

    service: Service
    base_url: str
    http: aiohttp.ClientSession
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        """Start `Service.run(stop, cancel)` in the background."""
        self.task = asyncio.create_task(self.service.run(self.stop, self.cancel))
        return self.task

    async def get(self, path: str) -> tuple[int, str, str]:
        """Status, content type and body of `GET path` on the service's HTTP server."""
        async with self.http.get(self.base_url + path) as response:
            return response.status, response.content_type, await response.text()

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        """Status and JSON body of /readyz."""
        status, content_type, body = await self.get("/readyz")
        assert content_type == "application/json"
        return status, json.loads(body)

    async def wait_readyz(self, status: int, timeout: float = 5.0) -> dict[str, Any]:
        """Wait until /readyz answers `status`; its body then."""
        answers: list[tuple[int, dict[str, Any]]] = []

        async def answers_so() -> bool:
            answers.append(await self.readyz())
            return answers[-1][0] == status

        await eventually(
            answers_so, f"/readyz answering {status} (last: {answers[-1:]})", timeout=timeout
        )
        return answers[-1][1]

    async def metrics(self) -> Samples:
        """The samples of /metrics."""
        status, content_type, body = await self.get("/metrics")
        assert (status, content_type) == (200, "text/plain")
        return parse_metrics(body)

    async def halt(self) -> None:
        """Set stop and cancel, and wait (5 s at most) for `Service.run` to return."""
        self.stop.set()
        self.cancel.set()
        if self.task is None:
            return
        done, _ = await asyncio.wait({self.task}, timeout=5)
        if not done:
            self.task.cancel()
            raise AssertionError("Service.run did not return within 5 s of stop and cancel")
        self.task.result()


@dataclass
class Rig:
    """The real redis-server (flushed), the simulated account, a receiver, an HTTP client,
    and a key prefix of the test's own."""

    redis_server: RedisServer
    client: redis.asyncio.Redis
    simulator: Simulator
    api_url: str
    receiver: Receiver
    http: aiohttp.ClientSession
    prefix: str = field(default_factory=lambda: f"svc-{secrets.token_hex(4)}")

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def settings(self, **flags: Any) -> Settings:
        """A webhook route to /hook, Redis, the simulator, and the HTTP server on a free port."""
        return load_settings(
            {
                "api_url": self.api_url,
                "api_key": SIMULATOR_KEY,
                "redis_url": self.redis_server.url,
                "key_prefix": self.prefix,
                "webhook_url": self.receiver.url("/hook"),
                "poll_interval": POLL_INTERVAL,
                "delivery_timeout": 30,
                "http_host": "127.0.0.1",
                "http_port": free_port(),
                **flags,
            }
        )

    def processing(self) -> SimulatedRequest:
        """A request in processing: the baseline records it, and its completion is notified."""
        [request] = self.simulator.create()
        return self.simulator.start(request.id)

    @contextlib.asynccontextmanager
    async def replica(self, settings: Settings, *, run: bool = True) -> AsyncIterator[Replica]:
        """A replica wired as `run_service` wires it, serving HTTP; running unless `run` is
        False. On exit stop and cancel are set and `Service.run` must return."""
        client = connect_redis(self.redis_server.url)
        metrics = Metrics()
        try:
            async with ApiClient(settings, metrics) as api, sink_session() as session:
                delivery = Delivery(settings, client, session, metrics=metrics)
                service = Service(settings, client, api, delivery)
                async with _serving(service, settings):
                    replica = Replica(service, f"http://127.0.0.1:{settings.http_port}", self.http)
                    if run:
                        replica.start()
                    try:
                        yield replica
                    finally:
                        await replica.halt()
        finally:
            await client.aclose()


@pytest.fixture
async def rig(
    redis_server: RedisServer, simulator: Simulator, api_url: str, webhook_receiver: Receiver
) -> AsyncIterator[Rig]:
    client = connect_redis(redis_server.url)
    await client.flushall()
    try:
        async with aiohttp.ClientSession() as http:
            yield Rig(redis_server, client, simulator, api_url, webhook_receiver, http)
    finally:
        await client.aclose()


# Health and readiness.


async def test_healthz_answers_and_readyz_waits_for_the_first_poll_cycle(rig: Rig) -> None:
    rig.processing()
    rig.simulator.delay = 0.5  # the first cycle is still under way when /readyz is asked
    async with rig.replica(rig.settings()) as replica:
        assert await replica.get("/healthz") == (200, "application/json", '{"alive": true}')
        assert await replica.readyz() == (
            503,
            {"ready": False, "reason": "no poll cycle has completed yet"},
        )
        rig.simulator.delay = 0

        body = await replica.wait_readyz(200)

        assert body["ready"] is True
        assert body["reason"].startswith("last poll cycle completed ")
        assert (await replica.get("/healthz"))[0] == 200


async def test_readyz_names_redis_while_it_is_down_and_recovers_after(rig: Rig) -> None:
    async with rig.replica(rig.settings()) as replica:
        await replica.wait_readyz(200)
        rig.redis_server.stop()
        try:
            body = await replica.wait_readyz(503)
            assert body["ready"] is False
            assert body["reason"].startswith("Redis is unreachable")
            assert (await replica.get("/healthz"))[0] == 200  # alive all the same
            assert sample(await replica.metrics(), "notifier_redis_up") == 0
        finally:
            rig.redis_server.start()  # empty: the test server runs without persistence

        body = await replica.wait_readyz(200)  # a new baseline completed

        assert body["ready"] is True


async def test_readyz_gives_up_on_a_redis_that_never_answers_within_a_second(
    rig: Rig,
) -> None:
    release = asyncio.Event()

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()  # accepts the connection, never answers
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = rig.settings(redis_url=f"redis://127.0.0.1:{port}/0")
    client = connect_redis(settings.redis_url.get_secret_value())
    try:
        async with ApiClient(settings) as api, sink_session() as session:
            service = Service(settings, client, api, Delivery(settings, client, session))
            started = time.monotonic()
            readiness = await service.readiness()
    finally:
        await client.aclose()
        release.set()
        server.close()
        await server.wait_closed()

    assert time.monotonic() - started < 1.5
    assert readiness == Readiness(False, "Redis is unreachable (timed out)")


async def test_readyz_says_shutting_down_once_stop_is_set(rig: Rig) -> None:
    async with rig.replica(rig.settings()) as replica:
        await replica.wait_readyz(200)

        replica.stop.set()

        assert await replica.readyz() == (503, {"ready": False, "reason": "shutting down"})
        assert (await replica.get("/healthz"))[0] == 200


async def test_readyz_is_503_once_the_last_cycle_is_older_than_three_poll_intervals(
    rig: Rig,
) -> None:
    # Another replica holds the lease, and its last cycle completed 10 s ago.
    await rig.client.set(rig.keys.lease, "another-replica", px=60_000)
    await rig.client.set(rig.keys.last_cycle, round((time.time() - 10) * 1000))
    async with rig.replica(rig.settings()) as standby:
        status, body = await standby.readyz()

        assert status == 503
        assert body["ready"] is False
        assert body["reason"].startswith("no replica completed a poll cycle in the last 10.")
        assert "(at most 0.6 s: 3 poll or idle intervals)" in body["reason"]

        await rig.client.set(rig.keys.last_cycle, round(time.time() * 1000))  # it polls again
        assert (await standby.readyz())[0] == 200
        assert not standby.service.poller.lease.held
        assert rig.simulator.calls == 0  # a standby never polls


async def test_a_standby_replica_is_ready_while_the_leader_completes_cycles(rig: Rig) -> None:
    async with rig.replica(rig.settings()) as leader:
        await leader.wait_readyz(200)
        assert leader.service.poller.lease.held

        async with rig.replica(rig.settings()) as standby:
            await standby.wait_readyz(200)
            await asyncio.sleep(3 * POLL_INTERVAL)  # ready for longer than the window
            body = await standby.wait_readyz(200, timeout=0.1)

            assert body["ready"] is True
            assert not standby.service.poller.lease.held
            assert sample(await standby.metrics(), "notifier_poller_leader") == 0
            assert sample(await leader.metrics(), "notifier_poller_leader") == 1


async def test_a_standby_waits_quietly_while_no_cycle_created_the_consumer_groups(
    rig: Rig,
) -> None:
    async def xreadgroup_calls() -> int:
        stats = await rig.client.info("commandstats")
        return int(stats.get("cmdstat_xreadgroup", {}).get("calls", 0))

    await rig.client.set(rig.keys.lease, "another-replica", px=60_000)  # and no cycle yet
    before = await xreadgroup_calls()
    async with rig.replica(rig.settings()):
        await asyncio.sleep(1.0)
    reads = await xreadgroup_calls() - before

    assert reads <= 1.0 / worker_module.BLOCK_S + 4  # one blocking read per BLOCK_S


@pytest.mark.parametrize(
    ("reject", "status", "message"),
    [
        pytest.param(lambda sim: setattr(sim, "api_key", ROTATED_KEY), 401, "invalid token"),
        pytest.param(lambda sim: sim.revoked_keys.add(SIMULATOR_KEY), 403, "unauthorized"),
    ],
    ids=["key-changed", "key-revoked"],
)
async def test_readyz_quotes_the_api_while_it_rejects_the_key_and_recovers(
    rig: Rig, reject: Callable[[Simulator], None], status: int, message: str
) -> None:
    async with rig.replica(rig.settings()) as replica:
        await replica.wait_readyz(200)

        reject(rig.simulator)  # the key is rotated or revoked after start-up
        body = await replica.wait_readyz(503)

        assert body == {
            "ready": False,
            "reason": f"the Chamelaion API rejects the API key (HTTP {status}: {message}); "
            "check NOTIFIER_API_KEY",
        }
        assert replica.task is not None
        assert not replica.task.done()  # it keeps trying
        calls = rig.simulator.calls
        await eventually(lambda: rig.simulator.calls > calls + 1, "the poller trying again")
        assert (await replica.readyz())[0] == 503

        rig.simulator.api_key = SIMULATOR_KEY  # fixed
        rig.simulator.revoked_keys.clear()
        body = await replica.wait_readyz(200)

        assert body["ready"] is True


# Metrics.


async def test_metrics_count_a_delivered_transition_and_its_latency(rig: Rig) -> None:
    request = rig.processing()
    async with rig.replica(rig.settings()) as replica:
        await replica.wait_readyz(200)  # the baseline recorded the request
        rig.simulator.complete(request.id)
        await eventually(lambda: len(rig.receiver.to("/hook")) == 1, "the delivery")
        deliveries = ("notifier_deliveries_total", {"route": "webhook", "outcome": "delivered"})

        async def counted() -> bool:
            return sample(await replica.metrics(), deliveries[0], **deliveries[1]) == 1

        await eventually(counted, "the delivery counted in /metrics")

        status, content_type, body = await replica.get("/metrics")
        assert (status, content_type) == (200, "text/plain")
        samples = parse_metrics(body)
        assert sample(samples, deliveries[0], **deliveries[1]) == 1
        latency = "notifier_delivery_latency_seconds"
        assert sample(samples, f"{latency}_count", route="webhook") == 1
        assert 0 <= (sample(samples, f"{latency}_sum", route="webhook") or -1) < 5
        assert sample(samples, f"{latency}_bucket", route="webhook", le="+Inf") == 1
        assert sample(samples, "notifier_poller_leader") == 1
        assert sample(samples, "notifier_redis_up") == 1
        assert sample(samples, "notifier_transitions_total", status="completed") == 1
        assert (sample(samples, "notifier_poll_cycles_total", outcome="completed") or 0) >= 2
        assert rig.receiver.to("/hook")[0].event_id == event_id(request.id, "completed")


# Graceful stop.


async def test_a_stop_waits_for_a_stalled_send_until_cancel_then_hands_it_back(
    rig: Rig,
) -> None:
    request = rig.processing()
    rig.receiver.stall("/hook")  # the receiver never answers
    async with rig.replica(rig.settings()) as replica:
        assert replica.task is not None
        await replica.wait_readyz(200)
        rig.simulator.complete(request.id)
        await eventually(lambda: len(rig.receiver.to("/hook")) == 1, "the send in flight")

        replica.stop.set()
        done, _ = await asyncio.wait({replica.task}, timeout=1.0)

        assert not done, "Service.run returned with a send in flight and no cancel"
        assert await replica.readyz() == (503, {"ready": False, "reason": "shutting down"})

        replica.cancel.set()
        cancelled_at = time.monotonic()
        await asyncio.wait_for(replica.task, timeout=3)

        assert time.monotonic() - cancelled_at < 1.2
        tally = replica.service.delivery.tally
        assert (tally.handed_back, tally.delivered, tally.retried) == (1, 0, 0)
        consumer = replica.service.delivery.consumer

    keys = rig.keys
    [(entry_id, fields)] = await rig.client.xrange(keys.outbox)
    [(retry, due_ms)] = await rig.client.zrange(keys.retries("webhook"), 0, -1, withscores=True)
    assert retry == entry_id
    assert abs(due_ms - time.time() * 1000) < 2000  # due now
    payload = json.loads(await rig.client.hget(keys.retry_events("webhook"), entry_id) or "")
    assert payload == {**fields, "a": 0}  # the same event, no attempt counted
    assert (await rig.client.xpending(keys.outbox, "webhook"))["pending"] == 0
    assert not await rig.client.exists(keys.heartbeat(consumer))

    # The next process delivers it at once, once, with the same webhook-id.
    rig.receiver.always("/hook", 200)
    async with rig.replica(rig.settings()) as second:
        delivery = second.service.delivery
        await eventually(
            lambda: delivery.tally.delivered == 1, "the handed-back delivery", timeout=3.0
        )
        assert (await delivery.backlog()).total == 0
    expected = event_id(request.id, "completed")
    assert [seen.event_id for seen in rig.receiver.to("/hook")] == [expected, expected]
    assert delivery.tally.delivered == 1
    assert not await rig.client.exists(keys.retries("webhook"))


async def test_a_stop_lets_a_slow_send_finish_and_records_its_outcome(rig: Rig) -> None:
    async def slow_ok(_request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(status=204)

    request = rig.processing()
    rig.receiver.handle("/hook", slow_ok)
    async with rig.replica(rig.settings()) as replica:
        assert replica.task is not None
        await replica.wait_readyz(200)
        rig.simulator.complete(request.id)
        await eventually(lambda: len(rig.receiver.to("/hook")) == 1, "the send in flight")
        [seen] = rig.receiver.to("/hook")

        replica.stop.set()  # and cancel is never set
        stopped_at = time.monotonic()
        await asyncio.wait_for(replica.task, timeout=4)

        assert time.monotonic() - seen.at >= 0.95  # it waited for the answer
        assert time.monotonic() - stopped_at < 2.0
        tally = replica.service.delivery.tally
        assert (tally.delivered, tally.handed_back, tally.retried) == (1, 0, 0)

    keys = rig.keys
    assert (await rig.client.xpending(keys.outbox, "webhook"))["pending"] == 0  # acknowledged
    assert await rig.client.zcard(keys.retries("webhook")) == 0  # nothing handed back
    assert len(rig.receiver.to("/hook")) == 1


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The exit codes the service would have exited with (instead of exiting); the
    process's signal handlers are put back afterwards."""
    codes: list[int] = []
    monkeypatch.setattr(service_module, "_exit", codes.append)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield codes
    for signum, handler in previous.items():
        signal.signal(signum, handler)


async def test_signals_stop_then_cancel_then_exit_by_the_deadline_and_a_second_exits_now(
    monkeypatch: pytest.MonkeyPatch, exits: list[int]
) -> None:
    monkeypatch.setattr(service_module, "GRACE_S", 0.2)
    monkeypatch.setattr(service_module, "EXIT_BY_S", 0.4)
    shutdown = Shutdown()
    shutdown.install()
    os.kill(os.getpid(), signal.SIGTERM)
    await eventually(shutdown.stop.is_set, "stop after the first signal", timeout=1)
    assert not shutdown.cancel.is_set()  # sends in flight get their grace first
    await eventually(shutdown.cancel.is_set, "cancel after the grace", timeout=1)
    assert exits == []
    await eventually(lambda: exits == [0], "exit 0 at the deadline", timeout=1)

    os.kill(os.getpid(), signal.SIGINT)
    await eventually(lambda: len(exits) == 2, "the second signal", timeout=1)
    assert exits == [0, 128 + signal.SIGINT]


async def test_the_exit_deadline_holds_while_the_event_loop_is_stuck(
    monkeypatch: pytest.MonkeyPatch, exits: list[int]
) -> None:
    monkeypatch.setattr(service_module, "EXIT_BY_S", 0.3)
    Shutdown().install()
    os.kill(os.getpid(), signal.SIGTERM)
    stuck_until = time.monotonic() + 1.0
    while time.monotonic() < stuck_until and not exits:  # the loop never gets a turn
        pass
    assert exits == [0]  # the deadline thread ended the process meanwhile


# Start-up checks of run_service.


async def test_a_rejected_api_key_fails_the_start_up_check(rig: Rig) -> None:
    rig.simulator.api_key = ROTATED_KEY
    async with ApiClient(rig.settings()) as api:
        with pytest.raises(AuthError) as raised:
            await _check_api_key(api)

    assert (raised.value.status, raised.value.message) == (401, "invalid token")
    assert SIMULATOR_KEY not in str(raised.value)


async def test_an_api_failing_at_start_up_is_left_to_the_poller_to_report(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.simulator.inject(Fault(FaultKind.SERVER_ERROR))
    async with ApiClient(rig.settings()) as api:
        await _check_api_key(api)

    [record] = [r for r in caplog.records if r.name == "notifier.service"]
    assert record.levelno == logging.DEBUG  # the first poll cycle warns, once
    assert record.getMessage().startswith("the Chamelaion API failed at start-up (")
    assert "HTTP 500: internal error" in record.getMessage()


async def test_redis_refusing_the_credentials_of_the_url_is_a_config_error(rig: Rig) -> None:
    settings = rig.settings()  # its URL has no password
    admin = connect_redis(rig.redis_server.url)  # authenticated before the password is set
    client = connect_redis(rig.redis_server.url)
    try:
        await admin.config_set("requirepass", "pw-ZZLEAK")
        try:
            with pytest.raises(ConfigError) as raised:
                await _check_redis(client, settings)
        finally:
            await _reset_password(admin, rig.redis_server.url, "pw-ZZLEAK")
    finally:
        await admin.aclose()
        await client.aclose()

    message = str(raised.value)
    assert message.startswith("Redis refused the credentials of NOTIFIER_REDIS_URL (")
    assert "pw-ZZLEAK" not in message
    assert await rig.client.ping()  # the session's server is usable again


async def _reset_password(admin: redis.asyncio.Redis, url: str, password: str) -> None:
    """Turn the password off again, even if `admin`'s connection was lost meanwhile."""
    try:
        await admin.config_set("requirepass", "")
    except redis.RedisError:
        fallback = redis.asyncio.Redis.from_url(url, password=password)
        try:
            await fallback.config_set("requirepass", "")
        finally:
            await fallback.aclose()


async def test_an_unreachable_redis_at_start_up_is_waited_for(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = rig.settings(redis_url=url)
    client = connect_redis(url)
    try:
        await _check_redis(client, settings)  # returns: polling and delivery wait for it
    finally:
        await client.aclose()

    [record] = [r for r in caplog.records if r.name == "notifier.service"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("Redis is unreachable at start-up (")


async def test_a_redis_without_aof_is_warned_about(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    await _check_redis(rig.client, rig.settings())  # the test server runs appendonly no

    [record] = [r for r in caplog.records if r.name == "notifier.service"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("Redis runs without AOF persistence")


async def test_a_redis_that_evicts_keys_is_warned_about(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    await rig.client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        await _check_redis(rig.client, rig.settings())
    finally:
        await rig.client.config_set("maxmemory-policy", "noeviction")

    messages = [r.getMessage() for r in caplog.records if r.name == "notifier.service"]
    assert any(m.startswith("Redis evicts keys (maxmemory-policy allkeys-lru)") for m in messages)


async def test_the_embedded_store_passes_the_start_up_check_silently(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    settings = rig.settings(redis_url=None)
    client = fakeredis.FakeAsyncRedis(decode_responses=True)  # what open_redis gives then
    try:
        await _check_redis(client, settings)
    finally:
        await client.aclose()

    assert [r.getMessage() for r in caplog.records if r.name == "notifier.service"] == []


# The HTTP server.


@contextlib.asynccontextmanager
async def idle_service(settings: Settings) -> AsyncIterator[Service]:
    """A service that is never run, over the embedded store."""
    client = fakeredis.FakeAsyncRedis(decode_responses=True)
    metrics = Metrics()
    try:
        async with ApiClient(settings, metrics) as api, sink_session() as session:
            yield Service(settings, client, api, Delivery(settings, client, session))
    finally:
        await client.aclose()


async def test_the_server_listens_only_while_serving(rig: Rig) -> None:
    settings = rig.settings()
    url = f"http://127.0.0.1:{settings.http_port}/healthz"
    async with idle_service(settings) as service:
        async with _serving(service, settings), rig.http.get(url) as response:
            assert response.status == 200

        with pytest.raises(aiohttp.ClientConnectionError):
            await rig.http.get(url)


async def test_a_port_already_taken_is_a_config_error_naming_the_setting(rig: Rig) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = rig.settings(http_port=port)
        async with idle_service(settings) as service, contextlib.AsyncExitStack() as stack:
            with pytest.raises(ConfigError) as raised:
                await stack.enter_async_context(_serving(service, settings))

    message = str(raised.value)
    assert message.startswith(f"cannot listen on 127.0.0.1:{port} (NOTIFIER_HTTP_HOST, ")
    assert "NOTIFIER_HTTP_PORT" in message
    assert "0 to turn the HTTP server off" in message


async def test_port_0_starts_no_server(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = rig.settings(http_port=0)
    entered = False
    async with idle_service(settings) as service:

        def no_app() -> web.Application:
            raise AssertionError("an HTTP application was built with http_port 0")

        monkeypatch.setattr(service, "app", no_app)
        async with _serving(service, settings):
            entered = True

    assert entered
