"""Secret values, and blanking them in any text the notifier shows.

The rule is that no code shows a secret; this is the net under it. The log formatter
passes every line through a `Redactor` of all configured secrets, and a sink passes a
receiver's answer through one of its route's secrets before quoting any of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote, unquote_plus, urlsplit

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
    """A secret URL and every part of it a receiver might echo: its path and query, each
    path segment and query value, its user and password, as written and decoded (a Slack
    webhook's token is its path; other services put theirs in the query). The redactor
    skips the parts too short to be secrets."""
    parts = urlsplit(url)
    values = [url, parts.path + (f"?{parts.query}" if parts.query else ""), parts.path, parts.query]
    pieces = [*parts.path.split("/"), parts.username, parts.password]
    pieces += [pair.partition("=")[2] for pair in parts.query.split("&")]
    for piece in pieces:
        if piece:
            values += [piece, unquote(piece), unquote_plus(piece)]
    return values


def redis_url_secrets(url: str) -> list[str]:
    """A Redis URL and its password, as written and decoded (in the user part or in a
    `password` query value); its user, host and database are not secrets."""
    parts = urlsplit(url)
    passwords = [parts.password] + [
        value
        for name, _, value in (pair.partition("=") for pair in parts.query.split("&"))
        if name == "password"
    ]
    values = [url]
    for password in passwords:
        if password:
            values += [password, unquote(password), unquote_plus(password)]
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
        values += redis_url_secrets(settings.redis_url.get_secret_value())
    for route in settings.routes:
        values += route_secrets(route)
    return values
