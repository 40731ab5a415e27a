"""`Retry-After` is read in both of its forms, and anything unreadable means "back off yourself"."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from notifier.backoff import parse_retry_after

NOW = datetime(2026, 3, 30, 11, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("Mon, 30 Mar 2026 11:01:30 GMT", 90.0),
        ("Monday, 30-Mar-26 11:00:10 GMT", 10.0),  # the obsolete RFC 850 form
        ("Mon, 30 Mar 2026 10:59:00 GMT", 0.0),  # a date in the past: go now
    ],
)
def test_seconds_and_http_dates_are_read(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize("value", [None, "", "  ", "-5", "soon", "nan", "inf", "Mon, 99 Foo"])
def test_an_absent_or_unreadable_value_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


def test_a_date_is_measured_from_the_current_time_by_default() -> None:
    assert parse_retry_after("Thu, 01 Jan 2099 00:00:00 GMT") > 365 * 24 * 3600
