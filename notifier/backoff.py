"""How long to wait before trying again: `Retry-After` of the API and of receivers, and jitter."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value (delay-seconds or an HTTP date).

    Returns None when the header is absent or unreadable, so the caller backs off on its
    own; a date in the past means zero.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        return _seconds_until(value, now or datetime.now(UTC))
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _seconds_until(http_date: str, now: datetime) -> float | None:
    try:
        moment = parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # RFC 9110 dates are GMT; "-0000" parses as naive
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - now).total_seconds())


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before try `attempt + 1`: uniform in [0, min(cap, base × 2^attempt)].

    Full jitter spreads the retries of many clients that failed together.
    """
    return rng.uniform(0, min(cap, base * 2 ** min(attempt, 64)))


async def sleep_unless(stop: asyncio.Event | None, seconds: float) -> None:
    """Sleep for `seconds`, or less if `stop` is set meanwhile."""
    if stop is None:
        await asyncio.sleep(max(0.0, seconds))
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
