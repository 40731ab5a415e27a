"""`Retry-After` is read in both of its forms, anything unreadable means "back off yourself",
and backoff spreads retries with full jitter under a cap."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from notifier.backoff import full_jitter, parse_retry_after

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


class _Extreme(random.Random):
    """Randomness that always picks the top of the range (or the bottom, with `low`)."""

    def __init__(self, low: bool = False) -> None:
        super().__init__(0)
        self.low = low

    def uniform(self, a: float, b: float) -> float:
        return a if self.low else b


@pytest.mark.parametrize(
    ("attempt", "longest"), [(0, 1.0), (1, 2.0), (3, 8.0), (6, 60.0), (10_000, 60.0)]
)
def test_full_jitter_doubles_from_the_base_up_to_the_cap(attempt: int, longest: float) -> None:
    assert full_jitter(attempt, base=1, cap=60, rng=_Extreme()) == longest
    assert full_jitter(attempt, base=1, cap=60, rng=_Extreme(low=True)) == 0


def test_full_jitter_spreads_waits_over_the_whole_range() -> None:
    rng = random.Random(7)
    waits = [full_jitter(4, base=0.5, cap=60, rng=rng) for _ in range(1_000)]
    assert all(0 <= wait <= 8 for wait in waits)
    assert min(waits) < 1
    assert max(waits) > 7
