"""A ceiling on the API request rate: a token bucket shared by every page fetch.

The bucket refills at `NOTIFIER_API_RATE_LIMIT` calls a second (a burst of one second's
worth). After a 429 the rate halves; each call that succeeds then wins back a twentieth
of the configured rate, so a rate-limited notifier slows down at once and recovers over
a few dozen calls instead of hitting the limit again straight away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

# After a 429 the rate drops to this share of what it was, but never below the floor.
SLOW_DOWN = 0.5
FLOOR_SHARE = 1 / 16
# Each successful call gives back this share of the configured rate.
RECOVERY_SHARE = 1 / 20


class Throttle:
    """A token bucket whose rate backs off after a 429 and recovers gradually."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.limit = rate
        self.rate = rate
        self._clock, self._sleep = clock, sleep
        self._tokens = max(1.0, rate)
        self._refilled = clock()
        self._lock = asyncio.Lock()  # callers queue in order instead of racing for tokens

    async def take(self) -> None:
        """Wait until a call may be made under the current rate."""
        async with self._lock:
            self._refill()
            if self._tokens < 1:
                await self._sleep((1 - self._tokens) / self.rate)
                self._refill()
            self._tokens -= 1

    def slowed(self) -> None:
        """The API answered 429: halve the rate (down to a floor) and spend what is saved."""
        self.rate = max(self.rate * SLOW_DOWN, self.limit * FLOOR_SHARE)
        self._tokens = min(self._tokens, 0.0)

    def succeeded(self) -> None:
        """A call went through: win back a little of the configured rate."""
        self.rate = min(self.limit, self.rate + self.limit * RECOVERY_SHARE)

    def _refill(self) -> None:
        now = self._clock()
        burst = max(1.0, self.rate)
        self._tokens = min(burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
