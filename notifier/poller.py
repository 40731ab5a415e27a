"""Poll cycles: list the account, apply each page to the store, and keep at it.

One replica polls at a time (the lease). A cycle counts only when its listing was
complete, and each page is applied atomically, so a cycle that fails half-way leaves
nothing a later cycle would not redo: every failure is handled by waiting and starting
the cycle again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import redis.asyncio
from redis.exceptions import RedisError

from notifier.api import (
    ApiClient,
    AuthError,
    ListResponse,
    Page,
    RateLimited,
    TransientApiError,
    UnexpectedResponse,
)
from notifier.backoff import full_jitter, sleep_unless
from notifier.config import Settings
from notifier.keys import STATE_BUCKETS
from notifier.lease import Lease, lease_ttl
from notifier.logs import about, plural
from notifier.outages import OutageLog, reason
from notifier.store import Applied, Epoch, EpochChanged, LeaseLost, Store, StoreRefused
from notifier.sweep import (
    Apply,
    NetSlice,
    Observed,
    Steady,
    SweepState,
    WindowMismatch,
    advance,
    check_order,
    learn,
    net_budget,
    net_slice,
    pages_of,
    read_steady,
)
from notifier.tasks import running, unless_stopped

log = logging.getLogger(__name__)

# (base, cap) in seconds of the full-jitter backoff after a failed cycle. A rejected key
# or an unexpected answer needs a person, so retrying it often only adds noise.
TRANSIENT_BACKOFF = (1.0, 60.0)
AUTH_BACKOFF = (30.0, 270.0)  # on top of the base: 30 s to 5 min
# A Retry-After longer than this is taken as a mistake of the API, not an instruction.
MAX_RATE_LIMIT_WAIT = 600.0
# Each cycle prunes this many state buckets: all of them every 64 cycles, little work each.
PRUNE_BUCKETS_PER_CYCLE = 64
SECONDS_PER_DAY = 86_400
# Apply calls in flight at once: Redis runs one page's script while the notifier reads
# and packs the next. Pages of a listing hold no request twice, so their order is free.
APPLY_IN_FLIGHT = 2
# Cycle failures of the outside world: a poller recovers by waiting and polling again, and
# their messages say what happened (any other exception is a bug of ours).
RECOVERABLE = (TransientApiError, RateLimited, AuthError, UnexpectedResponse, StoreRefused)


@dataclass(slots=True)
class CycleResult:
    """What one complete cycle saw and did."""

    baseline: bool  # the cycle recorded the namespace's first complete listing
    listed: int = 0  # distinct requests in the listing
    changed: int = 0  # requests first seen or with a new status
    events: int = 0  # events appended to the outbox
    silenced: int = 0  # old requests first seen finished after the baseline, not notified
    pruned: int = 0  # finished requests forgotten after the retention
    unfinished: int = 0  # requests known unfinished after the cycle
    first_seen: int = 0  # requests that had no stored state
    entered: dict[str, int] = field(default_factory=dict)  # status -> requests entering it
    digests: int = 0  # batch digests appended to the outbox
    waiting_batches: int = 0  # batches about to settle, or owing a held-back digest

    def add(self, applied: Applied) -> None:
        """Count one applied page."""
        self.changed += applied.changed
        self.events += applied.events
        self.silenced += applied.silenced
        self.first_seen += applied.first_seen
        for status, count in applied.entered.items():
            self.entered[status] = self.entered.get(status, 0) + count


class Poller:
    """Runs poll cycles for one namespace while this replica holds the lease."""

    def __init__(
        self,
        settings: Settings,
        client: redis.asyncio.Redis,
        api: ApiClient,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        redis_outage: OutageLog | None = None,
    ) -> None:
        self.settings = settings
        self.api = api
        self.metrics = api.metrics
        self.store = Store(client, settings, clock)
        self._clock = clock
        # Redis trouble is said once for the whole process (see outages.py); the poller's
        # own failures once per reason, and once when cycles complete again.
        self.redis_outage = redis_outage or OutageLog("Redis")
        self.lease = Lease(
            client, self.store.keys, lease_ttl(settings.poll_interval), self.redis_outage
        )
        self.rebaselines = 0  # times this process saw Redis lose its data
        self.last_error: str | None = None  # why the last cycle failed; None after a success
        self._said: str | None = None
        self._failures = 0
        self.rejected: AuthError | None = None  # the API rejects the key since the last success
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._epoch_id: str | None = None
        self._prune_next = 0

    async def cycle(self) -> CycleResult:
        """One complete cycle under the lease; started again at once if the epoch changed."""
        try:
            return await self._cycle()
        except EpochChanged:
            return await self._cycle()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set: hold the lease or stand by, and back off on failure."""
        failures = 0
        while not stop.is_set():
            try:
                held = await self.lease.acquire()
                standby = 0.0 if held else await self._standby_wait()
            except Exception as exc:  # Redis, or a bug of ours: neither may end polling
                await sleep_unless(stop, self._failed(exc, failures))
                failures += 1
                continue
            self.redis_outage.recovered()
            failures = 0
            if not held:
                await sleep_unless(stop, standby)
                continue
            self.metrics.leader.set(1)
            try:
                async with running(self.lease.keep_renewed):
                    await self._poll_while_held(stop)
            finally:
                self.metrics.leader.set(0)
                with contextlib.suppress(RedisError, OSError):
                    await self.lease.release()

    async def _cycle(self) -> CycleResult:
        token = self.lease.token
        # After this process saw Redis lose its data, NOTIFY_EXISTING must not notify
        # the whole account again: it applies to the namespace's very first baseline only.
        existing = self.settings.notify_existing and self._epoch_id is None
        epoch = await self.store.begin(token, notify_existing=existing)
        self._note_epoch(epoch)
        result = CycleResult(baseline=epoch.baseline)
        state = None if epoch.baseline else SweepState.parse(await self.store.sweep(), epoch.id)
        learned = None if state is None else await self._steady(state, epoch, result)
        if learned is None:
            learned = await self._full(epoch, result)
        result.unfinished = await self.store.unfinished_count()
        if self.settings.digest_routes:
            # After every unfinished request was looked at, so each batch's count is true.
            settled = await self.store.settle_batches(epoch, token)
            result.digests, result.waiting_batches = settled.digests, settled.waiting
        await self.store.finish(epoch, token, learned.fields() if learned else None)
        if not epoch.baseline:
            result.pruned = await self._prune(epoch)
        _log_cycle(result)
        return result

    async def _full(self, epoch: Epoch, result: CycleResult) -> SweepState | None:
        """List the whole account; returns what it showed of the listing, if usable. A known
        unfinished request the whole listing lacks is no longer looked for."""
        observed = Observed()
        listing = self.api.listing(observed.add)
        async with contextlib.aclosing(aiter(listing)) as pages:
            await self._apply(pages, epoch, result)
        result.listed = listing.distinct
        if not epoch.created:  # a new namespace's index holds only what this listing saw
            unfinished = await self.store.unfinished()
            await self._forget(epoch, [rid for rid in unfinished if rid not in listing.seen])
        self.metrics.sweeps.labels("full").inc()
        return learn(observed, epoch.id, listing.total, self._now_ms())

    async def _steady(
        self, state: SweepState, epoch: Epoch, result: CycleResult
    ) -> SweepState | None:
        """Read the head, every known unfinished request's page and a slice of the safety
        net (see sweep.py); None if the listing did not hold what the state predicts (what
        was applied stays applied: each page is a true picture of its requests)."""
        calls = 0

        async def apply(responses: list[ListResponse]) -> None:
            nonlocal calls
            calls += len(responses)
            await self._apply(_each(pages_of(responses)), epoch, result)

        try:
            steady = await read_steady(self.api, state, await self.store.unfinished(), apply)
            await self._forget(epoch, steady.gone)
            # Last, so that it never holds back what the cycle read for detection.
            net = await self._safety_net(state, steady, calls, apply)
        except WindowMismatch as exc:
            log.info("steady cycle rejected (%s); listing the whole account", exc)
            self.metrics.sweeps.labels("rejected").inc()
            return None
        log.debug(
            "steady cycle: %d head pages, %d unfinished requests found elsewhere, %d gone, "
            "%d safety-net pages",
            steady.head_pages,
            steady.located,
            len(steady.gone),
            len(net.offsets),
        )
        self.metrics.sweeps.labels("incremental").inc()
        result.listed = len(steady.listed)
        return advance(state, steady, net, self._now_ms())

    async def _safety_net(
        self,
        state: SweepState,
        steady: Steady,
        calls: int,
        apply: Apply,
    ) -> NetSlice:
        """Read the safety net's pages for this cycle, within its share of the API's rate;
        `WindowMismatch` if one is out of the learned order."""
        net = net_slice(
            state,
            steady.total,
            self.api.page_size,
            now_ms=self._now_ms(),
            period_s=self.settings.safety_net_period,
            most=net_budget(self.api.throttle.rate, self.settings.poll_interval, calls),
        )
        read = await self.api.listing().fetch(net.offsets)
        check_order(read, state.order)
        await apply(read)
        steady.listed.update(request.id for response in read for request in response.requests)
        self.metrics.safety_net_pages.inc(len(net.offsets))
        return net

    async def _forget(self, epoch: Epoch, gone: list[str]) -> None:
        """Stop looking for unfinished requests the listing no longer holds, saying so."""
        if not gone:
            return
        await self.store.forget_unfinished(epoch, self.lease.token, gone)
        self.metrics.gone.inc(len(gone))
        for request_id in gone:
            log.warning(
                "request %s was unfinished, and the listing no longer holds it (deleted?); "
                "it is no longer looked for",
                request_id,
                extra=about(request_id=request_id),
            )

    async def _apply(self, pages: AsyncIterator[Page], epoch: Epoch, result: CycleResult) -> None:
        """Apply every page as it comes, APPLY_IN_FLIGHT calls at a time, into `result`;
        raises the first failure, of the listing or of a call, once the others are done."""
        running: set[asyncio.Task[Applied]] = set()
        token = self.lease.token
        try:
            async for page in pages:
                apply = self.store.apply(page.requests, epoch, token, page.positions)
                running.add(asyncio.ensure_future(apply))
                await _collect(running, result, keep=APPLY_IN_FLIGHT - 1)
            await _collect(running, result, keep=0)
        finally:
            # Calls in flight run to their end, as a cycle that fails half-way keeps every
            # page it applied (and a call cut off mid-reply would cost its connection).
            await asyncio.gather(*running, return_exceptions=True)

    def _now_ms(self) -> int:
        return round(self._clock() * 1000)

    async def _poll_while_held(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set() and self.lease.held:
            started = time.monotonic()
            try:
                # Stopping interrupts a cycle: each page was applied atomically or not at all.
                result = await unless_stopped(self.cycle(), stop)
            except LeaseLost:
                await self.lease.say_who_holds_it()
                return
            except Exception as exc:  # any failure, a bug of ours too, is one failed cycle
                self.metrics.cycles.labels("failed").inc()
                delay = self._failed(exc, failures)
                failures += 1
            else:
                if result is None:
                    return
                failures, self.last_error, self.rejected = 0, None, None
                self._succeeded()
                self._count(result, time.monotonic() - started)
                delay = self.interval(result) - (time.monotonic() - started)
            await sleep_unless(stop, delay)

    def interval(self, result: CycleResult) -> float:
        """Seconds from one cycle's start to the next: the poll interval while requests are
        unfinished, events were queued or batches wait to settle, else the (longer) idle
        interval."""
        busy = result.unfinished or result.events or result.waiting_batches or result.baseline
        idle = self.settings.idle_interval
        return self.settings.poll_interval if busy or idle is None else idle

    def _count(self, result: CycleResult, seconds: float) -> None:
        metrics = self.metrics
        metrics.cycles.labels("completed").inc()
        metrics.cycle_seconds.observe(seconds)
        metrics.events.inc(result.events)
        metrics.digests.inc(result.digests)
        metrics.silenced.inc(result.silenced)
        for status, count in result.entered.items():
            metrics.transitions.labels(status).inc(count)

    def _failed(self, exc: Exception, failures: int) -> float:
        """Record why a cycle failed, say it once, and return how long to wait."""
        self.last_error = describe(exc)
        if isinstance(exc, RedisError | OSError):
            self.redis_outage.failed(exc)
            return full_jitter(failures, *TRANSIENT_BACKOFF, self._rng)
        if isinstance(exc, AuthError):
            self.rejected = exc
        delay = self._delay(exc, failures)
        self._say(exc, delay)
        return delay

    def _delay(self, exc: Exception, failures: int) -> float:
        """How long to wait after a failed cycle: Retry-After, or backoff by kind."""
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            return min(exc.retry_after, MAX_RATE_LIMIT_WAIT)
        if isinstance(exc, AuthError | UnexpectedResponse):
            return AUTH_BACKOFF[0] + full_jitter(failures, *AUTH_BACKOFF, self._rng)
        return full_jitter(failures, *TRANSIENT_BACKOFF, self._rng)

    def _say(self, exc: Exception, delay: float) -> None:
        """Log a failed cycle: the first of each reason loudly, repeats only at debug."""
        self._failures += 1
        message = self.last_error or ""
        needs_a_person = isinstance(exc, AuthError | UnexpectedResponse)
        level = logging.ERROR if needs_a_person else logging.WARNING
        bug = not isinstance(exc, RECOVERABLE)  # its traceback helps whoever fixes it
        if message == self._said:
            level, bug = logging.DEBUG, False
        self._said = message
        log.log(
            level, "poll cycle failed: %s; trying again in %.1f s", message, delay, exc_info=bug
        )

    def _succeeded(self) -> None:
        """A cycle completed: say so if cycles had been failing."""
        self.redis_outage.recovered()
        if self._said is not None:
            log.info("poll cycles complete again after %s", plural(self._failures, "failure"))
        self._said, self._failures = None, 0

    async def _standby_wait(self) -> float:
        # Try again the moment the holder's lease would expire: takeover within one TTL.
        return await self.lease.seconds_until_free() + 0.01

    def _note_epoch(self, epoch: Epoch) -> None:
        if self._epoch_id is not None and epoch.id != self._epoch_id:
            self.rebaselines += 1
            self.metrics.rebaselines.inc()
            log.warning(
                "Redis lost its data: the epoch of namespace %r is gone or replaced "
                "(a restart without persistence?). Starting a new baseline that records "
                "requests silently; deliveries queued in the lost data are lost. "
                "Run Redis with persistence (appendonly yes).",
                self.settings.key_prefix,
            )
        elif epoch.created:
            log.info(
                "namespace %r has no state yet: the first complete cycle is a baseline",
                self.settings.key_prefix,
            )
        self._epoch_id = epoch.id

    async def _prune(self, epoch: Epoch) -> int:
        start = self._prune_next
        buckets = range(start, min(start + PRUNE_BUCKETS_PER_CYCLE, STATE_BUCKETS))
        self._prune_next = buckets.stop % STATE_BUCKETS
        retention_s = self.settings.retention_days * SECONDS_PER_DAY
        pruned = await self.store.prune(epoch, self.lease.token, buckets, retention_s)
        if self.settings.digest_routes:
            await self.store.prune_batches(epoch, self.lease.token, retention_s)
        return pruned


async def _collect(running: set[asyncio.Task[Applied]], result: CycleResult, keep: int) -> None:
    """Wait until at most `keep` apply calls are running, counting the finished ones."""
    while len(running) > keep:
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        running -= done
        # Every exception is retrieved, so none is reported as "never retrieved".
        if errors := [error for task in done if (error := task.exception()) is not None]:
            raise errors[0]
        for task in done:
            result.add(task.result())


async def _each(pages: list[Page]) -> AsyncIterator[Page]:
    for page in pages:
        yield page


def describe(exc: BaseException) -> str:
    """Why a cycle failed, as a person reads it: the error's words, not its class."""
    if isinstance(exc, RECOVERABLE):
        return str(exc)
    if isinstance(exc, RedisError | OSError):
        return f"Redis is unreachable ({reason(exc)})"
    return f"internal error ({type(exc).__name__}: {exc}); please report this bug"


def _log_cycle(result: CycleResult) -> None:
    if result.baseline:
        log.info(
            "baseline complete: %s recorded, %d notified",
            plural(result.listed, "request"),
            result.events,
        )
    elif result.events or result.silenced or result.digests:
        log.info(
            "poll cycle: %s, %d changed, %s queued, %s not notified, %s queued",
            plural(result.listed, "request"),
            result.changed,
            plural(result.events, "event"),
            plural(result.silenced, "old request"),
            plural(result.digests, "batch digest"),
        )
    else:
        log.debug("poll cycle: %s, %d changed", plural(result.listed, "request"), result.changed)
