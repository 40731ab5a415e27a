"""Send a rendered message to a Slack incoming webhook or a generic HTTP webhook.

Every outcome of a send, an HTTP answer or an exception, goes through `classify`, the
one place that decides Delivered, Retry or Permanent. Reasons quote the status and a
trimmed body, never a route's URL (a Slack webhook URL is a credential).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

import aiohttp

from notifier import USER_AGENT
from notifier.backoff import parse_retry_after
from notifier.bodies import read_at_most
from notifier.config import Route, decode_webhook_secrets
from notifier.models import Delivered, Permanent, Retry, SendResult
from notifier.redact import Redactor, route_secrets
from notifier.render import Message

# Bytes of an answer read at most: enough for any error message, bounded for a hostile one.
MAX_ANSWER_BYTES = 64 * 1024
REASON_BODY_CHARS = 300
# Slack's answers to an incoming-webhook POST that no retry can fix
# (https://api.slack.com/messaging/webhooks#handling_errors).
SLACK_PERMANENT_ERRORS = frozenset(
    {
        "invalid_payload",
        "no_text",
        "too_many_attachments",
        "channel_not_found",
        "channel_is_archived",
        "no_service",
        "no_team",
        "team_disabled",
        "invalid_token",
        "action_prohibited",
        "posting_to_general_channel_denied",
    }
)
SLACK_TRANSIENT_ERRORS = frozenset({"rollup_error"})
# Statuses below 500 that are worth retrying: a timeout on their side, and rate limiting.
RETRY_STATUSES = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class Answer:
    """What a receiver answered: status, headers, and the start of the body as text."""

    status: int
    headers: Mapping[str, str]
    body: str


def classify(
    outcome: Answer | BaseException, *, slack: bool = False, now: datetime | None = None
) -> SendResult:
    """The one retry decision: 2xx delivered; no answer, 408, 429, 5xx retry; others permanent."""
    if isinstance(outcome, BaseException):
        return Retry(after=None, reason=describe_failure(outcome))
    status, body = outcome.status, outcome.body.strip()
    if 200 <= status < 300:
        return Delivered(status)
    after = parse_retry_after(outcome.headers.get("retry-after"), now)
    if slack and (known := _slack_error(status, body, after)):
        return known
    if status in RETRY_STATUSES or status >= 500:
        return Retry(after=after, reason=f"HTTP {status}{_excerpt(body)}")
    if 300 <= status < 400:
        return Permanent(
            f"HTTP {status}: a redirect, which is not followed (signed bodies and Slack URLs "
            f"must not travel to another address); set the route's url to the final address"
        )
    return Permanent(f"HTTP {status}{_excerpt(body)}")


def _slack_error(status: int, body: str, after: float | None) -> SendResult | None:
    """Slack's own error names decide before the status does."""
    if body in SLACK_PERMANENT_ERRORS:
        return Permanent(f"Slack refused the message: HTTP {status} {body}")
    if body in SLACK_TRANSIENT_ERRORS:
        return Retry(after=after, reason=f"Slack: HTTP {status} {body}")
    return None


def describe_failure(exc: BaseException) -> str:
    """Why a send got no answer, without the URL (aiohttp's messages can hold it)."""
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the receiver"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"could not connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, aiohttp.ServerDisconnectedError | ConnectionResetError):
        return "the receiver closed the connection without answering"
    if isinstance(exc, OSError) and exc.strerror:
        return f"connection error: {exc.strerror}"
    return f"connection error: {type(exc).__name__}"


def _excerpt(body: str) -> str:
    text = " ".join(body.split())
    if not text:
        return ""
    return ": " + (text if len(text) <= REASON_BODY_CHARS else text[:REASON_BODY_CHARS] + "…")


def sign(keys: list[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks `webhook-signature` value: `v1,<base64 HMAC-SHA256>` per key."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


class Sink:
    """POSTs messages for one route and classifies each outcome."""

    def __init__(
        self,
        route: Route,
        session: aiohttp.ClientSession,
        timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.route = route
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._url = route.url.get_secret_value()
        self._keys = decode_webhook_secrets(route.secret.get_secret_value()) if route.secret else []
        # The settings refuse route headers named like ours, so none goes out twice.
        self._route_headers = {
            name: value.get_secret_value() for name, value in route.headers.items()
        }
        # What a receiver must not get us to quote: the URL, its path (a Slack URL's path
        # is the credential) and the route's header values (tokens, usually).
        self._redact = Redactor(route_secrets(route))

    async def send(self, message: Message) -> SendResult:
        """One attempt: POST the message, never following redirects; never raises for I/O."""
        try:
            async with self._session.post(
                self._url,
                data=message.body,
                headers=self.headers(message),
                allow_redirects=False,
                timeout=self._timeout,
            ) as response:
                raw = await read_at_most(response.content, MAX_ANSWER_BYTES)
                body = self._redact(raw.decode(errors="replace"))
                answer = Answer(response.status, response.headers, body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return classify(exc)  # its reason never quotes the exception's text
        return classify(answer, slack=self.route.type == "slack")

    def headers(self, message: Message) -> dict[str, str]:
        """The headers of one attempt; a webhook's timestamp and signature are fresh each time."""
        headers = {
            **self._route_headers,
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }
        if self.route.type == "webhook":
            timestamp = int(self._clock())
            headers["webhook-id"] = message.event_id
            headers["webhook-timestamp"] = str(timestamp)
            if self._keys:
                headers["webhook-signature"] = sign(
                    self._keys, message.event_id, timestamp, message.body
                )
        return headers
