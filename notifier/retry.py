"""When to try a failed delivery again, and when to give up.

The one classifier (`sinks.classify`) says whether an outcome is worth retrying;
`RetryPolicy` turns that into a decision: forget it, try again in so many seconds, or
dead-letter it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from notifier.backoff import full_jitter
from notifier.config import Settings
from notifier.logs import plural
from notifier.models import Delivered, Permanent, Retry, SendResult

# A Retry-After beyond a day is taken as a receiver's mistake rather than an instruction.
MAX_RETRY_AFTER_S = 86_400.0


@dataclass(frozen=True, slots=True)
class Done:
    """Delivered, or not meant for this route: forget it."""

    detail: str


@dataclass(frozen=True, slots=True)
class Later:
    """Try again in `delay_s`."""

    delay_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Dead-letter it."""

    reason: str


Decision = Done | Later | GiveUp


class RetryPolicy:
    """When to try a failed delivery again, and when to give up."""

    def __init__(self, settings: Settings, rng: random.Random | None = None) -> None:
        self.max_attempts = settings.retry_max_attempts
        self.base = settings.retry_base_delay
        self.cap = settings.retry_max_delay
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def decide(self, attempt: int, result: SendResult) -> Decision:
        """The decision after attempt number `attempt` (1 for the first) ended in `result`."""
        match result:
            case Delivered(status=status):
                return Done(f"delivered (HTTP {status})")
            case Permanent(reason=reason):
                return GiveUp(reason)
            case Retry(after=after, reason=reason):
                if attempt >= self.max_attempts:
                    return GiveUp(f"{reason} (gave up after {plural(attempt, 'attempt')})")
                delay = full_jitter(attempt - 1, self.base, self.cap, self._rng)
                if after is not None:
                    delay = max(delay, min(after, MAX_RETRY_AFTER_S))
                return Later(delay, reason)
