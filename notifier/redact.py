"""Secret values, and blanking them in any text the notifier shows.

The rule is that no code shows a secret; this is the net under it. The log formatter
passes every line through a `Redactor` of all configured secrets, and a sink passes a
receiver's answer through one of its route's secrets before quoting any of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qs, unquote, urlsplit

from notifier.config import Route, Settings

REDACTED = "[redacted]"
# Shorter values are not searched for: blanking every "abc" would garble the text, and
# a secret that short is no secret.
MIN_SECRET_LEN = 8


class Redactor:
    """Blanks known secret values in a text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first: a URL is blanked whole before its path is looked for.
        self._secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET_LEN}, key=len)[::-1]

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


def url_secrets(url: str) -> list[str]:
    """A secret URL, its path and query (a Slack webhook's token is its path), and its
    password as written and decoded."""
    parts = urlsplit(url)
    values = [url, parts.path + (f"?{parts.query}" if parts.query else "")]
    for credential in (parts.password, *parse_qs(parts.query).get("password", [])):
        if credential:
            values += [credential, unquote(credential)]
    return values


def route_secrets(route: Route) -> list[str]:
    """The secrets of one route: its URL, signing secrets and header values (whole, and
    the token after a scheme such as `Bearer`)."""
    values = url_secrets(route.url.get_secret_value())
    if route.secret is not None:
        values += route.secret.get_secret_value().split()
    for header in route.headers.values():
        value = header.get_secret_value()
        values += [value, value.split()[-1] if value.split() else ""]
    return values


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value in the settings: API key, Redis URL and password, webhook
    secrets, and each route's secrets."""
    values: list[str] = []
    for secret in (settings.api_key, settings.webhook_secret, settings.slack_webhook_url):
        if secret is not None:
            values += secret.get_secret_value().split()
    if settings.redis_url is not None:
        values += url_secrets(settings.redis_url.get_secret_value())
    for route in settings.routes:
        values += route_secrets(route)
    return values
