"""`notifier check` and `notifier send-test`: try a configuration before trusting it.

`check` renders every route's template for each of its statuses (and a large sample
digest on a digest route), pings Redis and calls the API once; `send-test` delivers a
sample to real receivers. Neither prints a secret: routes are named, never shown by URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError

from notifier.api import ApiClient, ApiError, AuthError
from notifier.config import Route, Settings, env_name
from notifier.models import Delivered, Permanent, Retry, SendResult
from notifier.outages import reason
from notifier.outbox import OutboxItem
from notifier.render import Renderer, RenderError, sample_digest, sample_event
from notifier.sinks import Sink
from notifier.store import connect_redis

# Exit codes of `check`: every check passed; a service could not be reached (try again
# later); the configuration itself is wrong (a template, a route, the API key).
CHECK_PASSED, CHECK_UNREACHABLE, CHECK_MISCONFIGURED = 0, 1, 2
# The sample digest `check` renders for a digest route.
CHECK_DIGEST_SIZE, CHECK_DIGEST_FAILED = 1000, 100


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the `check` table."""

    subject: str  # what was checked: "route slack", "redis", "api"
    detail: str  # which part of it: a template and status, a setting
    passed: bool
    result: str
    misconfigured: bool = False  # failing needs a configuration change, not a retry


async def run_check(settings: Settings) -> list[Finding]:
    """Every finding of `check`, in the order of the table."""
    # Redis and the API are asked at once: an unreachable one costs its timeout only once.
    services = await asyncio.gather(check_redis(settings), check_api(settings))
    return [*check_routes(settings), *services]


def check_routes(settings: Settings) -> list[Finding]:
    """Render each route's template with sample data for each status the route receives."""
    if not settings.routes:
        return [
            Finding(
                "routes",
                "-",
                passed=False,
                result=f"no route is configured: set {env_name('slack_webhook_url')} or "
                f"{env_name('webhook_url')}, or add [[routes]] to the TOML file",
                misconfigured=True,
            )
        ]
    renderer = Renderer(settings)
    findings = []
    for route in settings.routes:
        samples: list[tuple[str, OutboxItem]] = [
            (status, sample_event(status)) for status in route.statuses or settings.notify_on
        ]
        if route.digest is not None:
            # As large as batches get: a template must stay within Slack's limits for it.
            digest = sample_digest(route, CHECK_DIGEST_SIZE, failed=CHECK_DIGEST_FAILED)
            samples.append((f"digest of {CHECK_DIGEST_SIZE}", digest))
        for label, sample in samples:
            name = renderer.template_for(route, sample.status)
            subject, detail = f"route {route.name}", f"{name} ({label})"
            try:
                message = renderer.render(route, sample)
            except RenderError as exc:
                findings.append(Finding(subject, detail, False, str(exc), misconfigured=True))
            else:
                findings.append(Finding(subject, detail, True, f"renders {len(message.body)} B"))
    return findings


async def check_redis(settings: Settings) -> Finding:
    """Ask the configured Redis for its version; without one, say state is kept in memory."""
    setting = env_name("redis_url")
    if settings.redis_url is None:
        return Finding("redis", setting, True, "not set: in-memory store, state is lost on restart")
    client = connect_redis(settings.redis_url.get_secret_value())
    try:
        info = await client.info("server")
    except (AuthenticationError, AuthorizationError) as exc:
        return Finding("redis", setting, False, f"refused the credentials of the URL: {exc}", True)
    except (RedisError, OSError) as exc:
        # redis-py's messages name the host and port, never the password of the URL.
        return Finding("redis", setting, False, f"unreachable ({reason(exc)})")
    finally:
        await client.aclose()
    return Finding("redis", setting, True, f"reachable (Redis {info.get('redis_version', '?')})")


async def check_api(settings: Settings) -> Finding:
    """Call the list endpoint once with `limit=1`: the URL answers and the key is accepted."""
    detail = settings.api_url
    try:
        async with ApiClient(settings) as api:
            page = await api.fetch_page(0, 1)
    except AuthError as exc:
        return Finding("api", detail, False, str(exc), misconfigured=True)
    except ApiError as exc:
        return Finding("api", detail, False, str(exc))
    return Finding("api", detail, True, f"key accepted, {page.total} requests in the account")


def check_exit_code(findings: Sequence[Finding]) -> int:
    """0 when everything passed, 2 when the configuration is wrong, else 1."""
    failed = [finding for finding in findings if not finding.passed]
    if any(finding.misconfigured for finding in failed):
        return CHECK_MISCONFIGURED
    return CHECK_UNREACHABLE if failed else CHECK_PASSED


def format_table(rows: Sequence[tuple[str, str, str]], header: tuple[str, str, str]) -> str:
    """Rows as an aligned plain-text table; the last column is never padded."""
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(2)]
    return "\n".join(
        f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}" for row in [header, *rows]
    )


def findings_table(findings: Sequence[Finding]) -> str:
    """The `check` table: what, which part, and `ok` or `FAIL` with the reason."""
    rows = [(f.subject, f.detail, ("ok: " if f.passed else "FAIL: ") + f.result) for f in findings]
    return format_table(rows, ("CHECK", "PART", "RESULT"))


@dataclass(frozen=True, slots=True)
class SendTest:
    """What `send-test` did for one route."""

    route: Route
    delivered: bool
    outcome: str

    def line(self) -> str:
        """The line `send-test` prints for this route."""
        return f"route {self.route.name} ({self.route.type}): {self.outcome}"


async def send_tests(
    settings: Settings, routes: Sequence[Route], status: str, *, digest: bool = False
) -> list[SendTest]:
    """Deliver one sample notification of `status` (with `digest`, a sample batch digest)
    to each route at once; one route never stops another."""
    renderer = Renderer(settings)

    def sample(route: Route) -> OutboxItem:
        if digest:
            return sample_digest(route, unique=True)
        return sample_event(status, unique=True)

    async with aiohttp.ClientSession() as session:
        return list(
            await asyncio.gather(
                *(_send_one(renderer, session, settings, route, sample(route)) for route in routes)
            )
        )


async def _send_one(
    renderer: Renderer,
    session: aiohttp.ClientSession,
    settings: Settings,
    route: Route,
    sample: OutboxItem,
) -> SendTest:
    try:
        message = await renderer.render_async(route, sample)
    except RenderError as exc:
        return SendTest(route, delivered=False, outcome=f"not sent: {exc}")
    result = await Sink(route, session, settings.delivery_timeout).send(message)
    return SendTest(route, isinstance(result, Delivered), describe_result(result))


def describe_result(result: SendResult) -> str:
    """A send result as `send-test` and the logs say it."""
    match result:
        case Delivered(status=status):
            return f"delivered (HTTP {status})"
        case Retry(after=None, reason=reason):
            return f"failed, would be retried: {reason}"
        case Retry(after=after, reason=reason):
            return f"failed, would be retried: {reason}, receiver asks to wait {after:g} s"
        case Permanent(reason=reason):
            return f"failed permanently, would be dead-lettered: {reason}"
