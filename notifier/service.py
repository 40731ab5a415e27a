"""`notifier run`: the poller, the delivery workers and the HTTP server in one process.

Every replica runs the same: one of them polls (the lease), all of them deliver. On
SIGTERM or SIGINT polling stops at once, sends in flight get `GRACE_S` to finish, the
rest are cancelled and handed back (due now), and the process is gone by `EXIT_BY_S`.
A second signal exits at once: what was recorded is in Redis, and what this process
held is taken over when its heartbeat lapses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from notifier.api import ApiClient
from notifier.config import ConfigError, Settings, env_name
from notifier.delivery import Delivery, sink_session
from notifier.logs import plural
from notifier.outages import reason
from notifier.poller import Poller
from notifier.store import REDIS_REFUSED, credentials_refused, open_redis

log = logging.getLogger(__name__)

# SIGTERM: sends in flight may finish for this long; the process exits by the second
# figure whatever happens (the contract says 9 s; the margin covers interpreter exit).
GRACE_S = 7.0
EXIT_BY_S = 8.5
# /readyz waits this long for Redis; a probe's own timeout is usually 1 s.
REDIS_PING_TIMEOUT_S = 0.8
# Ready while some replica completed a poll cycle within this many poll intervals.
READY_INTERVALS = 3
# `notifier healthcheck` waits this long for /healthz (Docker's own timeout is 5 s).
HEALTH_PROBE_TIMEOUT_S = 4.0
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - names, not a bind


@dataclass(frozen=True, slots=True)
class Readiness:
    """The answer of /readyz."""

    ready: bool
    reason: str

    def as_json(self) -> dict[str, object]:
        """The JSON body of /readyz."""
        return {"ready": self.ready, "reason": self.reason}


class Service:
    """One replica: poll while it holds the lease, deliver always, answer health checks."""

    def __init__(
        self,
        settings: Settings,
        client: redis.asyncio.Redis,
        api: ApiClient,
        delivery: Delivery,
    ) -> None:
        self.settings = settings
        self.redis = client
        self.metrics = api.metrics
        # One outage log for the process: Redis trouble is said once, not once per loop.
        self.poller = Poller(settings, client, api, redis_outage=delivery.redis_outage)
        self.delivery = delivery
        self._stop: asyncio.Event | None = None  # set by run(): stopping means not ready

    async def run(self, stop: asyncio.Event, cancel: asyncio.Event) -> None:
        """Poll and deliver until `stop` is set; sends in flight then finish, or are handed
        back once `cancel` is set."""
        self._stop = stop
        tasks = [
            asyncio.create_task(self.poller.run(stop)),
            asyncio.create_task(self.delivery.run(stop, cancel)),
        ]
        try:
            await asyncio.gather(*tasks)
        except Exception:
            # A bug in one loop: stop the other (by its events, see tasks.py) and report it.
            stop.set()
            cancel.set()
            await asyncio.wait(tasks, timeout=GRACE_S)
            raise

    async def readiness(self) -> Readiness:
        """Ready when Redis answers and some replica completed a cycle within three poll
        intervals (standby replicas too); else why not."""
        if self._stop is not None and self._stop.is_set():
            return Readiness(False, "shutting down")
        try:
            async with asyncio.timeout(REDIS_PING_TIMEOUT_S):
                await self.redis.ping()
                last_ms = await self.redis.get(self.poller.store.keys.last_cycle)
        except (RedisError, OSError, TimeoutError) as exc:
            return Readiness(False, f"Redis is unreachable ({reason(exc)})")
        if (rejected := self.poller.rejected) is not None:
            return Readiness(
                False,
                f"the Chamelaion API rejects the API key (HTTP {rejected.status}: "
                f"{rejected.message}); check {env_name('api_key')}",
            )
        if last_ms is None:
            return Readiness(False, "no poll cycle has completed yet")
        age = time.time() - int(last_ms) / 1000
        # An idle poller waits the idle interval: that is not staleness.
        longest = max(self.settings.poll_interval, self.settings.idle_interval or 0)
        most = READY_INTERVALS * longest
        if age > most:
            return Readiness(
                False,
                f"no replica completed a poll cycle in the last {age:.1f} s "
                f"(at most {most:g} s: {READY_INTERVALS} poll or idle intervals); see the "
                f"leader's log",
            )
        return Readiness(True, f"last poll cycle completed {age:.1f} s ago")

    def app(self) -> web.Application:
        """The HTTP application: /healthz, /readyz and /metrics."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def _readyz(self, request: web.Request) -> web.Response:
        readiness = await self.readiness()
        return web.json_response(readiness.as_json(), status=200 if readiness.ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        queues = [worker.queue for worker in self.delivery.workers]
        await self.metrics.read_redis(self.poller.store, queues)
        return web.Response(
            body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


class Shutdown:
    """The signals of a running service: the first stops it gracefully, a second one
    exits at once."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()  # stop polling and reading
        self.cancel = asyncio.Event()  # cancel the sends still in flight, hand them back
        self._signalled_once = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on.

        Python-level handlers, not the loop's: they run in the main thread at the next
        bytecode even while the event loop is busy, so the exit deadline is armed whatever
        the loop is doing; the graceful part is then handed to the loop.
        """
        self._loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._signalled)

    def _signalled(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self._signalled_once:
            log.warning(
                "%s again: exiting now; deliveries this process held are taken over by "
                "another replica or the next start (same webhook-id)",
                name,
            )
            _exit(128 + signum)
            return
        self._signalled_once = True
        # A thread, so a stuck event loop cannot keep the process past the deadline.
        deadline = threading.Timer(EXIT_BY_S, _late_exit)
        deadline.daemon = True
        deadline.start()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop_gracefully, name)

    def _stop_gracefully(self, name: str) -> None:
        log.info(
            "%s: polling stopped; sends in flight have %g s to finish, then are handed back",
            name,
            GRACE_S,
        )
        self.stop.set()
        asyncio.get_running_loop().call_later(GRACE_S, self.cancel.set)


def _late_exit() -> None:
    log.error(
        "shutdown did not finish within %g s; exiting anyway: deliveries still pending "
        "are taken over by another replica or the next start (same webhook-id)",
        EXIT_BY_S,
    )
    _exit(0)


def _exit(code: int) -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(code)


def probe_health(settings: Settings, timeout: float = HEALTH_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Ask /healthz of the service running on this host with these settings (the port from
    flag, environment or TOML file alike); whether it answered 2xx, and what to say."""
    if settings.http_port == 0:
        return True, f"the HTTP server is off ({env_name('http_port')}=0): nothing to probe"
    # A wildcard address listens on loopback too; a specific one only on itself.
    host = settings.http_host if settings.http_host not in WILDCARD_HOSTS else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{settings.http_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return True, f"healthy: {url} answered HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        return False, f"unhealthy: {url} answered HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"unhealthy: no answer from {url} ({reason})"


async def run_service(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; `AuthError` if the API rejects the key at start-up,
    `ConfigError` if Redis rejects its credentials or the HTTP port is taken."""
    shutdown = Shutdown()
    shutdown.install()
    async with ApiClient(settings) as api:
        await _check_api_key(api)  # first: a rejected key is the only thing said
        client = open_redis(settings)
        try:
            await _run(settings, client, api, shutdown)
        finally:
            await client.aclose()
    log.info("notifier stopped")
    return 0


async def _run(
    settings: Settings, client: redis.asyncio.Redis, api: ApiClient, shutdown: Shutdown
) -> None:
    """Check Redis, then poll, deliver and serve HTTP until the shutdown is complete."""
    async with sink_session() as session:
        await _check_redis(client, settings)
        delivery = Delivery(settings, client, session, metrics=api.metrics)
        service = Service(settings, client, api, delivery)
        async with _serving(service, settings):
            log.info(
                "notifier running: %s, polling every %g s, consumer %s",
                plural(len(settings.routes), "route"),
                settings.poll_interval,
                delivery.consumer,
            )
            await service.run(shutdown.stop, shutdown.cancel)


async def _check_api_key(api: ApiClient) -> None:
    """A rejected key is a configuration error at start-up; an API that is down is not
    (the first poll cycle, a moment later, says so: once is enough)."""
    if (failure := await api.check_key()) is not None:
        log.debug("the Chamelaion API failed at start-up (%s); polling keeps trying", failure)


async def _check_redis(client: redis.asyncio.Redis, settings: Settings) -> None:
    """Rejected credentials are a configuration error; a Redis that is down is waited for.
    Warn about settings that lose notifications: no AOF, or an eviction policy."""
    if settings.redis_url is None:
        return  # the in-memory store: open_redis warned already
    try:
        await client.ping()
        persistence = await client.info("persistence")
        memory = await client.info("memory")
    except REDIS_REFUSED as exc:
        raise credentials_refused(exc) from None
    except (RedisError, OSError) as exc:
        log.warning("Redis is unreachable at start-up (%s); waiting for it", reason(exc))
        return
    if not int(persistence.get("aof_enabled", 0)):
        log.warning(
            "Redis runs without AOF persistence: a restart loses queued deliveries "
            "(run it with appendonly yes)"
        )
    policy = memory.get("maxmemory_policy", "noeviction")
    if policy != "noeviction":
        log.warning(
            "Redis evicts keys (maxmemory-policy %s): it may drop queued deliveries and "
            "state; use noeviction",
            policy,
        )


@contextlib.asynccontextmanager
async def _serving(service: Service, settings: Settings) -> AsyncIterator[None]:
    """Serve /healthz, /readyz and /metrics while the block runs (unless the port is 0)."""
    if settings.http_port == 0:
        yield
        return
    runner = web.AppRunner(service.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {settings.http_host}:{settings.http_port} "
                f"({env_name('http_host')}, {env_name('http_port')}): {exc.strerror or exc}; "
                f"choose a free port, or 0 to turn the HTTP server off."
            ) from None
        log.info(
            "serving /healthz, /readyz and /metrics on %s:%d",
            settings.http_host,
            settings.http_port,
        )
        yield
    finally:
        await runner.cleanup()
