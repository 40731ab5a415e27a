"""Trouble with a dependency, said once when it starts and once when it ends.

A Redis outage reaches every loop of a process at once: the poller, each route's worker,
the heartbeat, the upkeep, the lease. They all report to one `OutageLog`, so the log says
that Redis is unreachable once and that it is back once, not a line per loop per retry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class OutageLog:
    """The state of one dependency as the loops of this process see it."""

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.since: float | None = None  # when the first failure of the outage happened
        self.failures = 0  # failed calls since then
        self._clock = clock

    @property
    def down(self) -> bool:
        """Whether the last call this process made failed."""
        return self.since is not None

    def failed(self, exc: BaseException) -> None:
        """A call failed: warn if it is the first failure since the dependency last worked."""
        self.failures += 1
        if self.since is None:
            self.since = self._clock()
            log.warning(
                "%s is unreachable (%s); every part of the notifier waits for it and "
                "carries on when it is back, losing nothing it had recorded",
                self.what,
                reason(exc),
            )
        else:
            log.debug("%s is still unreachable (%s)", self.what, reason(exc))

    def recovered(self) -> None:
        """A call worked: say so once if the dependency had been failing."""
        if self.since is None:
            return
        log.info(
            "%s is reachable again after %.1f s (%d failed %s)",
            self.what,
            self._clock() - self.since,
            self.failures,
            "call" if self.failures == 1 else "calls",
        )
        self.since, self.failures = None, 0


def reason(exc: BaseException) -> str:
    """What went wrong, in the words of the error rather than its class name."""
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    if isinstance(exc, TimeoutError | RedisError) and not text:
        text = "timed out" if isinstance(exc, TimeoutError) else "no answer"
    return text or type(exc).__name__
