"""Secrets: which values of the settings are secret, and blanking them in any text."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from notifier.config import Route, Settings, load_settings
from notifier.redact import (
    MIN_SECRET_LEN,
    REDACTED,
    Redactor,
    redis_url_secrets,
    route_secrets,
    secrets_of,
    url_secrets,
)

from samples import (
    API_KEY,
    NEW_SECRET,
    OLD_SECRET,
    OPS_HEADER,
    OPS_SECRET,
    OPS_URL,
    REDIS_PASSWORD,
    REDIS_URL,
    SLACK_PATH,
    SLACK_URL,
    WEBHOOK_URL,
    settings_full_of_secrets,
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings holding every kind of secret."""
    return settings_full_of_secrets(tmp_path)


# secrets_of.


def test_secrets_of_lists_every_secret_value_of_the_settings(settings: Settings) -> None:
    secrets = secrets_of(settings)
    for value in (
        API_KEY,
        REDIS_URL,
        REDIS_PASSWORD,
        SLACK_URL,
        SLACK_PATH,  # a Slack webhook's token lives in its path
        OLD_SECRET,
        NEW_SECRET,
        WEBHOOK_URL,
        OPS_URL,
        "/hooks/ZZLEAK-ops-path?token=ZZLEAK-query",
        OPS_SECRET,
        OPS_HEADER,
    ):
        assert value in secrets, value
    assert f"{OLD_SECRET} {NEW_SECRET}" not in secrets  # split: each may be logged alone


def test_secrets_of_settings_without_secrets_finds_nothing_to_blank() -> None:
    secrets = secrets_of(load_settings({"webhook_url": "http://127.0.0.1:9/h"}))
    assert [value for value in secrets if len(value) >= MIN_SECRET_LEN] == ["http://127.0.0.1:9/h"]


# Redactor.


def test_the_redactor_blanks_every_occurrence_of_each_secret() -> None:
    redact = Redactor(["first-secret-value", "second-secret-value"])
    text = "a first-secret-value b second-secret-value c first-secret-value"
    assert redact(text) == f"a {REDACTED} b {REDACTED} c {REDACTED}"


def test_the_redactor_blanks_a_url_whole_before_looking_for_its_path() -> None:
    # Given path first: the order of the settings must not leave the host showing.
    redact = Redactor([SLACK_PATH, SLACK_URL])
    assert redact(f"POST {SLACK_URL} failed") == f"POST {REDACTED} failed"
    assert redact(f"path {SLACK_PATH}") == f"path {REDACTED}"


def test_the_redactor_ignores_values_shorter_than_the_minimum_length() -> None:
    short, long_enough = "s" * (MIN_SECRET_LEN - 1), "L" * MIN_SECRET_LEN
    redact = Redactor([short, long_enough, ""])
    assert redact(f"{short} {long_enough}") == f"{short} {REDACTED}"


def test_the_redactor_leaves_text_without_secrets_unchanged() -> None:
    assert Redactor([API_KEY])("nothing to hide here") == "nothing to hide here"


# url_secrets and route_secrets.


def test_a_percent_encoded_password_is_blanked_as_written_and_decoded() -> None:
    secrets = redis_url_secrets("redis://user:p%40ssw0rd-ZZLEAK@redis.internal:6379/0")
    assert "p%40ssw0rd-ZZLEAK" in secrets
    assert "p@ssw0rd-ZZLEAK" in secrets


def test_a_password_given_as_a_query_parameter_is_a_secret() -> None:
    assert "hunter2-ZZLEAK" in redis_url_secrets("redis://redis.internal/0?password=hunter2-ZZLEAK")


def test_the_token_of_an_authorization_header_is_blanked_on_its_own_too() -> None:
    route = Route(
        name="ops",
        type="webhook",
        url=SecretStr("https://ops.example/hook"),
        headers={"Authorization": SecretStr("Bearer ZZLEAK-token-value")},
    )
    redact = Redactor(route_secrets(route))
    assert redact("token ZZLEAK-token-value refused") == f"token {REDACTED} refused"


# Parts of a URL: whatever a receiver may echo of its own address.


@pytest.mark.parametrize(
    ("echoed", "why"),
    [
        ("/hooks/T0ZZLEAK/ZZLEAKtoken1", "the path without the query"),
        ("ZZLEAKtoken1", "one path segment"),
        ("ZZLEAK query/value", "a query value, decoded"),
        ("ZZLEAK+query%2Fvalue", "a query value, as written"),
        ("ZZLEAKuser", "the user"),
        ("ZZLEAK pass", "the password, decoded"),
    ],
)
def test_every_long_part_of_a_route_url_is_blanked(echoed: str, why: str) -> None:
    url = (
        "https://ZZLEAKuser:ZZLEAK%20pass@hooks.example.com/hooks/T0ZZLEAK/ZZLEAKtoken1"
        "?team=ab&key=ZZLEAK+query%2Fvalue"
    )
    redact = Redactor(url_secrets(url))
    assert redact(f"404: no route for {echoed}") == f"404: no route for {REDACTED}", why


def test_short_parts_of_a_url_are_not_secrets_and_stay_readable() -> None:
    redact = Redactor(url_secrets("https://hooks.example.com/v1/hook?team=ab"))
    assert redact("the v1 hook of team ab at hooks.example.com") == (
        "the v1 hook of team ab at hooks.example.com"
    )
