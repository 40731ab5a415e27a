"""The retry policy: full-jitter exponential backoff under a cap, never before the
receiver's Retry-After, and a dead letter after the last attempt or a permanent answer."""

from __future__ import annotations

import random

import pytest

from notifier.config import load_settings
from notifier.models import Delivered, Permanent, Retry
from notifier.retry import MAX_RETRY_AFTER_S, Done, GiveUp, Later, RetryPolicy


class Highest(random.Random):
    """A random source that always draws the top of the range: the longest jitter."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Lowest(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


RETRY = Retry(after=None, reason="HTTP 503")


@pytest.mark.parametrize(
    ("attempt", "longest"),
    [(1, 2.0), (2, 4.0), (3, 8.0), (6, 64.0), (9, 512.0), (10, 600.0), (30, 600.0)],
)
def test_backoff_doubles_per_attempt_up_to_the_cap(attempt: int, longest: float) -> None:
    settings = load_settings({"retry_max_attempts": "50"})  # base 2 s, cap 600 s
    assert RetryPolicy(settings, Highest()).decide(attempt, RETRY) == Later(longest, "HTTP 503")
    assert RetryPolicy(settings, Lowest()).decide(attempt, RETRY) == Later(0.0, "HTTP 503")


def test_jitter_spreads_retries_within_the_bounds() -> None:
    policy = RetryPolicy(load_settings({}), random.Random(7))
    delays = [policy.decide(3, RETRY).delay_s for _ in range(2000)]  # type: ignore[union-attr]
    assert 0 <= min(delays) < 0.5
    assert 7.5 < max(delays) <= 8.0
    assert 3.5 < sum(delays) / len(delays) < 4.5


@pytest.mark.parametrize(("after", "expected"), [(30.0, 30.0), (1e9, MAX_RETRY_AFTER_S)])
def test_a_retry_after_is_a_floor_capped_at_a_day(after: float, expected: float) -> None:
    policy = RetryPolicy(load_settings({}), Highest())
    assert policy.decide(1, Retry(after=after, reason="HTTP 429")) == Later(expected, "HTTP 429")
    assert policy.decide(1, Retry(after=0.5, reason="HTTP 429")) == Later(2.0, "HTTP 429")


def test_the_last_attempt_gives_up_with_the_last_reason() -> None:
    policy = RetryPolicy(load_settings({"retry_max_attempts": "3"}), Highest())
    assert isinstance(policy.decide(2, RETRY), Later)
    assert policy.decide(3, RETRY) == GiveUp("HTTP 503 (gave up after 3 attempts)")
    assert policy.decide(1, Permanent("HTTP 400: bad")) == GiveUp("HTTP 400: bad")
    assert policy.decide(1, Delivered(204)) == Done("delivered (HTTP 204)")


def test_a_single_attempt_is_said_in_the_singular() -> None:
    policy = RetryPolicy(load_settings({"retry_max_attempts": "1"}), Highest())
    assert policy.decide(1, RETRY) == GiveUp("HTTP 503 (gave up after 1 attempt)")
