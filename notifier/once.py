"""`notifier once`: one complete poll cycle, then one delivery pass over everything due.

Meant for cron: the exit code says whether anything is left to do (see `OnceReport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from notifier.api import ApiClient, ApiError, AuthError
from notifier.config import Settings
from notifier.delivery import Delivery, Tally, sink_session
from notifier.logs import plural
from notifier.poller import CycleResult, Poller, describe
from notifier.queue import Backlog
from notifier.store import REDIS_REFUSED, StoreRefused, open_redis
from notifier.tasks import running

log = logging.getLogger(__name__)

EXIT_DONE, EXIT_FAILED, EXIT_LEFT = 0, 1, 3


class LeaseBusy(Exception):
    """Another notifier holds the polling lease of the namespace."""


@dataclass
class OnceReport:
    """What one `once` run did, and what it left."""

    cycle: CycleResult | None = None
    failures: list[str] = field(default_factory=list)  # the cycle or the pass failed: why
    tally: Tally = field(default_factory=Tally)
    backlog: Backlog | None = None

    def exit_code(self) -> int:
        """1 if the cycle or the pass failed; 3 if work is left or this run dead-lettered
        something; else 0."""
        if self.failures:
            return EXIT_FAILED
        if self.tally.dead or self.backlog is None or self.backlog.total:
            return EXIT_LEFT
        return EXIT_DONE

    def summary(self) -> str:
        """Two lines for the person or cron job that ran it."""
        if self.cycle is None:
            cycle = "cycle: failed"
        else:
            kind = "baseline, " if self.cycle.baseline else ""
            listed, events = self.cycle.listed, self.cycle.events
            cycle = f"cycle: {kind}{plural(listed, 'request')} listed, "
            cycle += f"{plural(events, 'event')} queued"
            if self.cycle.digests or self.cycle.waiting_batches:
                cycle += (
                    f", {plural(self.cycle.digests, 'batch digest')} queued, "
                    f"{plural(self.cycle.waiting_batches, 'batch', 'batches')} waiting to settle"
                )
        t = self.tally
        delivery = (
            f"delivery: {t.delivered} delivered, {t.retried} scheduled for retry, "
            f"{t.dead} dead-lettered, {t.skipped} not for their route"
        )
        if self.backlog is not None:
            b = self.backlog
            retries = plural(b.retries, "retry", "retries")
            delivery += f"; left: {retries}, {b.pending} pending, {b.unread} unread"
        return "\n".join([cycle, delivery, *(f"failed: {why}" for why in self.failures)])


async def run_once(settings: Settings) -> OnceReport:
    """Poll once and deliver what is due; `AuthError` if the API rejects the key."""
    report = OnceReport()
    client = open_redis(settings)
    try:
        async with ApiClient(settings) as api, sink_session() as session:
            await api.check_key()  # first: a rejected key is the only thing said
            try:
                report.cycle = await _cycle(Poller(settings, client, api))
            except (AuthError, *REDIS_REFUSED):
                raise  # configuration errors: exit 2
            except (ApiError, StoreRefused, LeaseBusy, RedisError, OSError) as exc:
                why = str(exc) if isinstance(exc, LeaseBusy) else describe(exc)
                report.failures.append(f"poll cycle: {why}")
            await _deliver(Delivery(settings, client, session), report)
    finally:
        await client.aclose()
    return report


async def _cycle(poller: Poller) -> CycleResult:
    lease = poller.lease
    if not await lease.acquire():
        # A `once` killed a moment ago still holds it until it expires: wait that long.
        wait = await lease.seconds_until_free()
        log.info("another notifier holds the polling lease; waiting %.1f s for it", wait)
        await asyncio.sleep(wait + 0.05)
        if not await lease.acquire():
            raise LeaseBusy(
                f"another notifier is polling namespace {poller.settings.key_prefix!r}; "
                f"`once` is not needed while `notifier run` is running"
            )
    try:
        async with running(lease.keep_renewed):
            return await poller.cycle()
    finally:
        with contextlib.suppress(RedisError, OSError):
            await lease.release()


async def _deliver(delivery: Delivery, report: OnceReport) -> None:
    try:
        report.tally = await delivery.deliver_due()
        report.backlog = await delivery.backlog()
    except (RedisError, OSError) as exc:
        report.tally = delivery.tally
        report.failures.append(f"delivery pass: {describe(exc)}")
