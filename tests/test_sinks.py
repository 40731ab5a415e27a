"""Sinks POST to a real HTTP server on 127.0.0.1 and turn every outcome into one decision.

Delivered, Retry or Permanent per the contract's "Retry" rules; Slack's own error names
decide on Slack routes; reasons quote the status and a trimmed body but never the route's
URL; webhook requests carry the Standard Webhooks headers, checked with the
`standardwebhooks` package as a receiver would.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from notifier import USER_AGENT
from notifier.config import Route, load_settings
from notifier.models import Delivered, Permanent, Retry, SendResult
from notifier.render import Message, Renderer, sample_event
from notifier.sinks import (
    SLACK_PERMANENT_ERRORS,
    SLACK_TRANSIENT_ERRORS,
    Answer,
    Sink,
    classify,
    sign,
)

from receiver import Handler, Receiver, Seen

SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"n" * 32).decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
UNRELATED_SECRET = "whsec_" + base64.b64encode(b"u" * 32).decode()
# The path of a Slack webhook URL is the credential: it must never reach a reason.
PRIVATE_PART = "XyZsEcReTtOkEn0123456789"
HOOK_PATH = f"/services/T0TEAM/B0HOOK/{PRIVATE_PART}"
MESSAGE = Message(event_id="315ce564-1b88-5e27-b307-8bd1577c2020", body=b'{"hello":"world"}')
NOW = datetime(2026, 3, 30, 11, 0, 0, tzinfo=UTC)
ERROR_BODY = '  {"error": "no such hook"}\n'


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A receiver on 127.0.0.1 that records requests and answers as told."""
    async with Receiver.serve() as receiver:
        yield receiver


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL whose port is bound but not listening: every connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}{HOOK_PATH}"


@pytest.fixture
async def resetting_url() -> AsyncIterator[str]:
    """A raw TCP server that reads the request and resets the connection (RST, no answer)."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}{HOOK_PATH}"
    server.close()
    await server.wait_closed()


def webhook_route(url: str, secret: str | None = SECRET, **headers: str) -> Route:
    return Route(
        name="ops",
        type="webhook",
        url=SecretStr(url),
        secret=SecretStr(secret) if secret else None,
        headers={name: SecretStr(value) for name, value in headers.items()},
    )


def slack_route(url: str, **headers: str) -> Route:
    return Route(
        name="slack",
        type="slack",
        url=SecretStr(url),
        headers={name: SecretStr(value) for name, value in headers.items()},
    )


async def send(
    route: Route,
    session: aiohttp.ClientSession,
    *,
    timeout: float = 5.0,
    clock: Callable[[], float] = time.time,
    message: Message = MESSAGE,
) -> SendResult:
    return await Sink(route, session, timeout, clock=clock).send(message)


# 1. The classifier, through a real server.


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, "delivered"),
        (201, "delivered"),
        (204, "delivered"),
        (301, "redirect"),
        (302, "redirect"),
        (307, "redirect"),
        (308, "redirect"),
        (400, "permanent"),
        (401, "permanent"),
        (403, "permanent"),
        (404, "permanent"),
        (410, "permanent"),
        (422, "permanent"),
        (408, "retry"),
        (429, "retry"),
        (500, "retry"),
        (502, "retry"),
        (503, "retry"),
        (504, "retry"),
    ],
)
async def test_each_status_is_classified(
    receiver: Receiver, session: aiohttp.ClientSession, status: int, expected: str
) -> None:
    if expected == "redirect":
        receiver.reply(status, headers={"Location": receiver.url("/redirected")})
    else:
        receiver.reply(status, "" if status == 204 else ERROR_BODY)
    result = await send(webhook_route(receiver.url(HOOK_PATH)), session)
    assert [seen.path for seen in receiver.seen] == [HOOK_PATH]  # sent once, never followed
    if expected == "delivered":
        assert result == Delivered(status)
    elif expected == "redirect":
        assert isinstance(result, Permanent)
        assert f"HTTP {status}" in result.reason
        assert "redirect" in result.reason
    elif expected == "permanent":
        assert result == Permanent(f'HTTP {status}: {{"error": "no such hook"}}')
    else:
        assert result == Retry(after=None, reason=f'HTTP {status}: {{"error": "no such hook"}}')


async def test_a_redirect_target_is_never_hit(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    async def redirect(request: web.Request) -> web.Response:
        if request.path == "/redirected":
            return web.Response(text="followed")
        raise web.HTTPTemporaryRedirect(location="/redirected")

    receiver.handler = redirect
    result = await send(webhook_route(receiver.url(HOOK_PATH)), session)
    assert isinstance(result, Permanent)
    assert "/redirected" not in [seen.path for seen in receiver.seen]
    assert len(receiver.seen) == 1


@pytest.mark.parametrize(
    ("status", "value", "after"),
    [(429, "7", 7.0), (503, "7", 7.0), (408, " 120 ", 120.0), (500, "0", 0.0), (502, "soon", None)],
)
async def test_retry_after_in_seconds_is_honoured(
    receiver: Receiver, session: aiohttp.ClientSession, status: int, value: str, after: float
) -> None:
    receiver.reply(status, "slow down", headers={"Retry-After": value})
    result = await send(webhook_route(receiver.url(HOOK_PATH)), session)
    assert result == Retry(after=after, reason=f"HTTP {status}: slow down")


async def test_retry_after_as_an_http_date_is_honoured(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    receiver.reply(503, headers={"Retry-After": when})
    result = await send(webhook_route(receiver.url(HOOK_PATH)), session)
    assert isinstance(result, Retry)
    assert result.after is not None
    assert 100 < result.after <= 121


@pytest.mark.parametrize(
    ("value", "after"),
    [
        ("Mon, 30 Mar 2026 11:02:00 GMT", 120.0),
        ("Mon, 30 Mar 2026 10:59:00 GMT", 0.0),  # already past: go now
        ("Monday, 30-Mar-26 11:00:10 GMT", 10.0),
    ],
)
def test_classify_reads_a_retry_after_date_against_now(value: str, after: float) -> None:
    answer = Answer(429, {"retry-after": value}, "rate limited")
    assert classify(answer, now=NOW) == Retry(after=after, reason="HTTP 429: rate limited")


def test_a_retry_after_on_a_permanent_answer_does_not_make_it_a_retry() -> None:
    assert classify(Answer(403, {"retry-after": "5"}, "no"), now=NOW) == Permanent("HTTP 403: no")


async def test_a_receiver_slower_than_the_timeout_is_retried(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    async def stall(_request: web.Request) -> web.Response:
        await receiver.release.wait()
        return web.Response()

    receiver.handler = stall
    started = time.monotonic()
    result = await send(webhook_route(receiver.url(HOOK_PATH)), session, timeout=0.2)
    assert time.monotonic() - started < 2
    assert isinstance(result, Retry)
    assert result.after is None
    assert "timed out" in result.reason


async def test_a_body_that_stalls_midway_hits_the_timeout(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=500)
        response.content_length = 10_000
        await response.prepare(request)
        await response.write(b"x" * 10)
        await receiver.release.wait()
        return response

    receiver.handler = trickle
    result = await send(webhook_route(receiver.url(HOOK_PATH)), session, timeout=0.2)
    assert isinstance(result, Retry)
    assert "timed out" in result.reason


async def test_a_connection_closed_by_the_handler_is_retried(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    async def hang_up(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        return web.Response()  # written to a closed connection: the client gets nothing

    receiver.handler = hang_up
    result = await send(webhook_route(receiver.url(HOOK_PATH)), session)
    assert isinstance(result, Retry)
    assert result.reason == "the receiver closed the connection without answering"


async def test_a_reset_connection_is_retried(
    resetting_url: str, session: aiohttp.ClientSession
) -> None:
    result = await send(webhook_route(resetting_url), session)
    assert isinstance(result, Retry)
    assert result.after is None
    assert result.reason in {
        "connection error: Connection reset by peer",
        "the receiver closed the connection without answering",
    }


async def test_a_refused_connection_is_retried(
    refused_url: str, session: aiohttp.ClientSession
) -> None:
    result = await send(webhook_route(refused_url), session)
    assert isinstance(result, Retry)
    assert result.after is None
    assert result.reason.startswith("could not connect")


@pytest.mark.parametrize(("status", "kind"), [(500, Retry), (400, Permanent)])
async def test_a_huge_error_body_is_trimmed_in_the_reason(
    receiver: Receiver, session: aiohttp.ClientSession, status: int, kind: type
) -> None:
    body = "Start of a huge error page. " + "e" * 1_000_000
    receiver.reply(status, body)
    result = await send(webhook_route(receiver.url(HOOK_PATH)), session)
    assert isinstance(result, kind)
    assert result.reason.startswith(f"HTTP {status}: Start of a huge error page. eeee")
    assert result.reason.endswith("…")
    assert len(result.reason) <= 320


async def test_a_huge_body_is_not_read_to_its_end(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    # 1 MB announced, 100 KB sent, then nothing: a send that read it all would time out.
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=502)
        response.content_length = 1_000_000
        await response.prepare(request)
        await response.write(b"Bad gateway " + b"g" * 100_000)
        await receiver.release.wait()
        return response

    receiver.handler = endless
    started = time.monotonic()
    result = await send(webhook_route(receiver.url(HOOK_PATH)), session, timeout=3)
    assert time.monotonic() - started < 2
    assert isinstance(result, Retry)
    assert result.reason.startswith("HTTP 502: Bad gateway ggg")
    assert len(result.reason) <= 320


# 2. Slack's error bodies.

SLACK_ERRORS = [
    (400, "invalid_payload"),
    (400, "no_text"),
    (400, "too_many_attachments"),
    (403, "action_prohibited"),
    (403, "team_disabled"),
    (403, "invalid_token"),
    (403, "posting_to_general_channel_denied"),
    (404, "channel_not_found"),
    (404, "no_service"),
    (404, "no_team"),
    (410, "channel_is_archived"),
]


def test_the_slack_table_covers_every_permanent_error() -> None:
    assert {name for _, name in SLACK_ERRORS} == SLACK_PERMANENT_ERRORS
    assert frozenset({"rollup_error"}) == SLACK_TRANSIENT_ERRORS


@pytest.mark.parametrize(("status", "name"), SLACK_ERRORS)
async def test_slack_permanent_errors_are_permanent(
    receiver: Receiver, session: aiohttp.ClientSession, status: int, name: str
) -> None:
    receiver.reply(status, name)
    result = await send(slack_route(receiver.url(HOOK_PATH)), session)
    assert isinstance(result, Permanent)
    assert f"HTTP {status}" in result.reason
    assert name in result.reason
    assert "Slack" in result.reason


@pytest.mark.parametrize(("status", "name"), SLACK_ERRORS)
async def test_slack_bodies_on_a_webhook_route_go_by_status(
    receiver: Receiver, session: aiohttp.ClientSession, status: int, name: str
) -> None:
    receiver.reply(status, name)
    assert await send(webhook_route(receiver.url(HOOK_PATH)), session) == Permanent(
        f"HTTP {status}: {name}"
    )
    # Only the status decides there: a Slack name on a 503 is still a 503.
    receiver.reply(503, name)
    assert await send(webhook_route(receiver.url(HOOK_PATH)), session) == Retry(
        after=None, reason=f"HTTP 503: {name}"
    )


async def test_slack_rollup_error_is_retried(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.reply(500, "rollup_error")
    result = await send(slack_route(receiver.url(HOOK_PATH)), session)
    assert isinstance(result, Retry)
    assert "rollup_error" in result.reason
    receiver.reply(500, "rollup_error")
    assert isinstance(await send(webhook_route(receiver.url(HOOK_PATH)), session), Retry)


async def test_slack_rollup_error_honours_retry_after(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    # The contract: 5xx are retried and Retry-After is honoured; a Slack body changes neither.
    receiver.reply(500, "rollup_error", headers={"Retry-After": "9"})
    result = await send(slack_route(receiver.url(HOOK_PATH)), session)
    assert isinstance(result, Retry)
    assert result.after == 9


async def test_slack_rate_limit_waits_for_retry_after(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.reply(429, "rate_limited", headers={"Retry-After": "3"})
    result = await send(slack_route(receiver.url(HOOK_PATH)), session)
    assert isinstance(result, Retry)
    assert result.after == 3


async def test_slack_ok_is_delivered(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    receiver.reply(200, "ok")
    assert await send(slack_route(receiver.url(HOOK_PATH)), session) == Delivered(200)


# 3. Reasons never hold the URL.


def echo_url(status: int, **headers: str) -> Handler:
    """A handler that answers with the full URL it was called on, as some error pages do."""

    async def echo(request: web.Request) -> web.Response:
        text = f'{{"error": "no hook at {request.url}", "path": "{request.url}"}}'
        return web.Response(status=status, text=text, headers=headers)

    return echo


def assert_no_url(reason: str, url: str) -> None:
    assert url not in reason
    assert PRIVATE_PART not in reason
    assert HOOK_PATH not in reason


@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
@pytest.mark.parametrize("route", [webhook_route, slack_route])
async def test_an_echoed_url_is_blanked_in_the_reason(
    receiver: Receiver,
    session: aiohttp.ClientSession,
    status: int,
    route: Callable[[str], Route],
) -> None:
    url = receiver.url(HOOK_PATH)
    receiver.handler = echo_url(status)
    result = await send(route(url), session)
    assert isinstance(result, Permanent | Retry)
    assert str(receiver.seen[0].path) == HOOK_PATH  # the receiver did see the full path
    assert_no_url(result.reason, url)
    assert "no hook at [redacted]" in result.reason


@pytest.mark.parametrize("status", [404, 500])
async def test_an_echoed_url_cut_by_the_excerpt_is_not_shown_either(
    receiver: Receiver, session: aiohttp.ClientSession, status: int
) -> None:
    # The echoed URL straddles the end of the excerpt: what is left of it must not show
    # the secret part of the path.
    url = receiver.url(HOOK_PATH)
    padding = "p" * (300 - len(url) + 4)  # the excerpt keeps all of the URL but 4 chars

    async def echo_late(_request: web.Request) -> web.Response:
        return web.Response(status=status, text=padding + url + " trailing words")

    receiver.handler = echo_late
    result = await send(slack_route(url), session)
    assert isinstance(result, Permanent | Retry)
    assert_no_url(result.reason, url)
    assert PRIVATE_PART[:12] not in result.reason


@pytest.mark.parametrize("kind", ["refused", "reset", "timeout"])
async def test_connection_errors_do_not_name_the_url(
    receiver: Receiver,
    session: aiohttp.ClientSession,
    refused_url: str,
    resetting_url: str,
    kind: str,
) -> None:
    async def stall(_request: web.Request) -> web.Response:
        await receiver.release.wait()
        return web.Response()

    receiver.handler = stall
    url = {"refused": refused_url, "reset": resetting_url, "timeout": receiver.url(HOOK_PATH)}[kind]
    for route in (webhook_route(url), slack_route(url)):
        result = await send(route, session, timeout=0.2)
        assert isinstance(result, Retry)
        assert_no_url(result.reason, url)


# 4. Webhook headers.


async def test_webhook_headers_follow_the_contract(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    route = webhook_route(receiver.url(HOOK_PATH), **{"X-Team": "dub"})
    result = await send(route, session, clock=lambda: 1_774_868_470.9)
    assert result == Delivered(200)
    (seen,) = receiver.seen
    assert seen.body == MESSAGE.body
    assert seen.headers.getall("Content-Type") == ["application/json"]
    assert seen.headers.getall("User-Agent") == [USER_AGENT]
    assert USER_AGENT.startswith("chamelaion-notifier/")
    assert seen.headers.getall("webhook-id") == [MESSAGE.event_id]
    assert seen.headers.getall("webhook-timestamp") == ["1774868470"]
    assert seen.headers.getall("webhook-signature") == [
        sign([b"k" * 24], MESSAGE.event_id, 1_774_868_470, MESSAGE.body)
    ]
    assert seen.headers.getall("X-Team") == ["dub"]


async def test_route_headers_go_out_once_beside_the_contract_headers(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    headers = {"X-Team": "dub"}
    for route in (
        webhook_route(receiver.url(HOOK_PATH), **headers),
        slack_route(receiver.url(HOOK_PATH), **headers),
    ):
        assert await send(route, session) == Delivered(200)
    assert len(receiver.seen) == 2
    for seen in receiver.seen:
        assert seen.headers.getall("Content-Type") == ["application/json"]
        # The contract fixes the user agent; the settings refuse a route's own.
        assert seen.headers.getall("User-Agent") == [USER_AGENT]
        assert seen.headers.getall("X-Team") == ["dub"]


@pytest.mark.parametrize("name", ["User-Agent", "content-type", "Webhook-Id"])
def test_a_route_cannot_set_a_header_the_sink_sets(name: str) -> None:
    with pytest.raises(ValueError, match="set by the notifier"):
        webhook_route("http://127.0.0.1:9/hook", **{name: "mine"})


async def test_slack_requests_carry_no_webhook_headers(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    assert await send(
        slack_route(receiver.url(HOOK_PATH)), session, clock=lambda: 1.0
    ) == Delivered(200)
    (seen,) = receiver.seen
    assert not [name for name in seen.headers if name.lower().startswith("webhook-")]
    assert seen.headers.getall("Content-Type") == ["application/json"]
    assert seen.headers.getall("User-Agent") == [USER_AGENT]
    assert seen.body == MESSAGE.body


async def test_a_webhook_without_a_secret_is_not_signed(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    await send(webhook_route(receiver.url(HOOK_PATH), secret=None), session, clock=lambda: 1234.5)
    (seen,) = receiver.seen
    assert seen.headers["webhook-id"] == MESSAGE.event_id
    assert seen.headers["webhook-timestamp"] == "1234"
    assert "webhook-signature" not in seen.headers


# 5. Signatures, verified by a peer implementation.


def verify(secret: str, seen: Seen) -> Any:
    return Webhook(secret).verify(seen.body, dict(seen.headers))


async def test_each_attempt_is_signed_at_its_own_time(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    settings = load_settings({"webhook_url": receiver.url(HOOK_PATH), "webhook_secret": SECRET})
    route = settings.routes[0]
    created = datetime.now(UTC) - timedelta(minutes=6)
    event = sample_event("completed", now=created)
    message = Renderer(settings).render(route, event)
    assert message.event_id == event.id

    attempt_time = created.timestamp()  # the first attempt, right when the event was seen
    sink = Sink(route, session, 5.0, clock=lambda: attempt_time)
    receiver.reply(503)
    assert isinstance(await sink.send(message), Retry)
    attempt_time = time.time()  # the retry, six minutes later: "now" for the receiver
    receiver.reply(200)
    assert await sink.send(message) == Delivered(200)

    first, retry = receiver.seen
    assert first.body == retry.body == message.body
    assert first.headers["webhook-id"] == retry.headers["webhook-id"] == event.id
    assert int(retry.headers["webhook-timestamp"]) - int(first.headers["webhook-timestamp"]) >= 359
    assert first.headers["webhook-signature"] != retry.headers["webhook-signature"]
    # The retry verifies now; the first attempt's signature was valid for its own time
    # but is too old to be accepted now, as a per-event timestamp would be on a retry.
    assert verify(SECRET, retry)["data"]["id"] == event.request.id
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET, first)
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    timestamp = int(first.headers["webhook-timestamp"])
    assert first.headers["webhook-signature"] == sign([key], event.id, timestamp, first.body)


async def test_a_rotated_secret_verifies_with_either_key(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    route = webhook_route(receiver.url(HOOK_PATH), secret=f"{NEW_SECRET} {OLD_SECRET}")
    assert await send(route, session) == Delivered(200)
    (seen,) = receiver.seen
    signatures = seen.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    assert all(signature.startswith("v1,") for signature in signatures)
    assert verify(NEW_SECRET, seen) == {"hello": "world"}
    assert verify(OLD_SECRET, seen) == {"hello": "world"}
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        verify(UNRELATED_SECRET, seen)


async def test_a_tampered_body_fails_verification(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    assert await send(webhook_route(receiver.url(HOOK_PATH)), session) == Delivered(200)
    (seen,) = receiver.seen
    verify(SECRET, seen)
    tampered = dataclasses.replace(seen, body=seen.body.replace(b"world", b"w0rld"))
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, tampered)


# 6. sign(), known answers.


def test_sign_matches_an_independent_hmac() -> None:
    key = b"0123456789abcdef0123456789abcdef"
    message_id, timestamp, body = "msg_2Lz", 1_774_868_470, b'{"type":"x","n":1}'
    signed = b"msg_2Lz.1774868470." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert sign([key], message_id, timestamp, body) == f"v1,{expected}"


def test_sign_with_two_keys_gives_two_signatures_in_key_order() -> None:
    keys = [b"new-key", b"old-key"]
    signed = b"id.1.{}"
    expected = [
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    ]
    assert sign(keys, "id", 1, b"{}") == " ".join(expected)


def test_sign_agrees_with_standardwebhooks() -> None:
    key = b"k" * 24
    when = datetime(2026, 3, 30, 11, 1, 10, tzinfo=UTC)
    peer = Webhook(key).sign("evt", when, '{"a":1}')
    assert sign([key], "evt", int(when.timestamp()), b'{"a":1}') == peer


async def test_an_echoed_header_token_is_blanked_in_the_reason(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    async def echo_header(request: web.Request) -> web.Response:
        return web.Response(status=401, text=f"bad token {request.headers['Authorization']}")

    receiver.handler = echo_header
    route = Route(
        name="ops",
        type="webhook",
        url=SecretStr(receiver.url(HOOK_PATH)),
        headers={"Authorization": SecretStr("Bearer ZZLEAK-header-token")},
    )
    result = await send(route, session)
    assert isinstance(result, Permanent)
    assert "ZZLEAK" not in result.reason
    assert result.reason == "HTTP 401: bad token [redacted]"
