"""One route's delivery worker: read deliveries, render, send, and resolve the outcomes.

A worker reads a delivery only when it can send it now: fewer than `max_concurrency` of
the route's sends are in flight and, for Slack, the URL's pacing slot is free. Each
outcome goes through the one classifier (`sinks.classify`) and `RetryPolicy`, and is
resolved in Redis in one atomic step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from notifier.backoff import full_jitter, sleep_unless
from notifier.config import Route
from notifier.digest import Digest
from notifier.dlq import dead_letter_fields
from notifier.logs import about, plural
from notifier.metrics import Metrics
from notifier.models import MalformedEvent, Retry
from notifier.outages import OutageLog, reason
from notifier.outbox import OutboxItem, read_entry
from notifier.pacing import SlackSlot
from notifier.queue import Resolution, RouteQueue, Work
from notifier.render import Renderer, RenderError
from notifier.retry import MAX_RETRY_AFTER_S, Decision, Done, GiveUp, Later, RetryPolicy
from notifier.sinks import Sink
from notifier.tasks import CANCEL_WAIT_S, running, unless_stopped

log = logging.getLogger(__name__)

# How often the idle-time backstop (XAUTOCLAIM) runs, and its floor.
BACKSTOP_EVERY_S = 10.0
MIN_BACKSTOP_IDLE_S = 30.0
# A blocking read of new entries waits at most this long, so retries that fall due and
# orphans are seen soon after.
BLOCK_S = 0.5
RETRY_CHECK_S = 0.25
# After reading a Slack delivery, a worker waits this long at most for the URL's slot
# (another replica may have taken it meanwhile); longer, and it schedules the delivery.
SLACK_HOLD_S = 1.5
# Backoff of a worker whose Redis calls fail, and of resolving one outcome.
REDIS_BACKOFF = (0.5, 30.0)
RESOLVE_TRIES = 4
# Outcomes waiting to be recorded, per send slot, before a route stops reading more:
# bounds memory while Redis is slow.
UNRESOLVED_PER_SLOT = 4
# The resolver lets an awake reader take outcomes along with its next read first.
RESOLVE_DELAY_S = 0.001


@dataclass
class Tally:
    """Outcomes resolved by this process since it started."""

    delivered: int = 0
    retried: int = 0
    dead: int = 0
    skipped: int = 0  # events the route does not take (statuses, reference_id)
    handed_back: int = 0  # cancelled at shutdown and made due now, attempts unchanged
    by_route: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, route: str, outcome: str) -> None:
        """Count one resolved outcome of `route`."""
        setattr(self, outcome, getattr(self, outcome) + 1)
        per_route = self.by_route.setdefault(route, {})
        per_route[outcome] = per_route.get(outcome, 0) + 1


def backstop_idle_s(delivery_timeout: float) -> float:
    """Idle time after which a pending delivery is taken from a consumer that still beats."""
    return max(3 * delivery_timeout, MIN_BACKSTOP_IDLE_S)


@dataclass(frozen=True, slots=True)
class Attempted:
    """A delivery attempted (or found not to be for its route), waiting to be resolved."""

    work: Work
    event: OutboxItem | None  # None: the outbox entry was neither an event nor a digest
    decision: Decision
    attempt: int
    skipped: bool = False
    handed_back: bool = False

    def resolution(self) -> Resolution:
        """What to record in Redis for this outcome."""
        match self.decision:
            case Done():
                return Resolution(self.work, "done")
            case Later(delay_s=delay):
                return Resolution(self.work, "retry", due_s=delay, attempts=self.attempt)
            case GiveUp(reason=reason):
                letter = dead_letter_fields(self.work, self.attempt, reason)
                return Resolution(self.work, "dead", dead_letter=letter)


class RouteWorker:
    """Sends one route's deliveries, at most `max_concurrency` at a time.

    A reader takes deliveries while fewer than `max_concurrency` are being sent, one task
    sends each, and a resolver records the outcomes that piled up meanwhile in one round
    trip. Recording is off the sending path: a slot frees when its send ends, and under
    load the resolver records several outcomes per round trip.
    """

    def __init__(
        self,
        route: Route,
        queue: RouteQueue,
        *,
        renderer: Renderer,
        sink: Sink,
        policy: RetryPolicy,
        tally: Tally,
        slot: SlackSlot | None,
        delivery_timeout: float,
        rng: random.Random,
        metrics: Metrics,
        redis_outage: OutageLog,
    ) -> None:
        self.route = route
        self.queue = queue
        self._renderer = renderer
        self._sink = sink
        self._policy = policy
        self._tally = tally
        self._slot = slot
        self._visibility_s = backstop_idle_s(delivery_timeout)
        self._rng = rng
        self._metrics = metrics
        self._redis_outage = redis_outage
        self._sending = 0  # deliveries read and not yet attempted
        self._unresolved = 0  # attempted, outcome not yet recorded in Redis
        self._attempted: list[Attempted] = []  # outcomes waiting for the resolver
        self._to_settle = asyncio.Event()
        self._freed = asyncio.Event()
        self._next_backstop = 0.0  # the backstop runs once at start, then periodically
        self._tasks: set[asyncio.Task[None]] = set()  # held: the loop keeps weak references

    async def run(self, stop: asyncio.Event, cancel: asyncio.Event | None = None) -> None:
        """Deliver until `stop` is set, then wait for the sends in flight; if `cancel` is
        set meanwhile, cancel them and hand their deliveries back, due now."""
        failures, next_retry_check = 0, 0.0
        async with running(self._resolve_forever, wake=self._to_settle):
            while not stop.is_set():
                await self._room(stop)
                if stop.is_set():
                    break  # nothing more is read once stopping
                check_retries = time.monotonic() >= next_retry_check
                try:
                    if await self._wait_for_slot(stop):
                        continue
                    taken = await self._take(BLOCK_S, check_retries=check_retries)
                    await self._start_all(taken)
                except Exception as exc:  # Redis, or a bug of ours: neither may end delivery
                    self._failed(exc)
                    await sleep_unless(stop, full_jitter(failures, *REDIS_BACKOFF, self._rng))
                    failures += 1
                    continue
                self._redis_outage.recovered()
                failures = 0
                if check_retries and not any(work.source == "retry" for work in taken):
                    next_retry_check = time.monotonic() + RETRY_CHECK_S
            if cancel is not None:
                await unless_stopped(self._all_sent(), cancel)
                await self._cancel_sends()
            await self._idle()

    def _failed(self, exc: Exception) -> None:
        """Report a failed read: Redis trouble once for the process, a bug with its trace."""
        if isinstance(exc, RedisError | OSError):
            self._redis_outage.failed(exc)
        else:
            log.exception("route %s: reading deliveries failed; trying again", self.route.name)

    async def drain(self) -> None:
        """Deliver everything due now (retries due, orphans, unread entries), then return."""
        until, check_retries = self.queue.now(), True
        async with running(self._resolve_forever, wake=self._to_settle):
            while True:
                await self._room()
                # No wait for the Slack slot before reading: a message read while it is
                # held long is scheduled for then (see _take_slot), so a pass never sits
                # out a Retry-After, nor waits for the slot once nothing is left.
                count = self._count()
                taken = await self._take(0, check_retries=check_retries, retries_until=until)
                if not taken:
                    break
                # Fewer retries than asked for: none is left due by `until`.
                check_retries = sum(work.source == "retry" for work in taken) == count
                await self._start_all(taken)
            await self._idle()

    def _count(self) -> int:
        """How many deliveries to read now: one at a time for Slack (paced), else the room."""
        return 1 if self._slot else self.route.max_concurrency - self._sending

    async def _room(self, stop: asyncio.Event | None = None) -> None:
        """Wait for a free send slot, and for Redis to keep up with recording outcomes;
        or until `stop` is set."""
        if not self._full():
            return
        if stop is None:
            await self._until_room()
        else:
            await unless_stopped(self._until_room(), stop)
        # Sends that end together free their slots together: one read takes them all.
        await asyncio.sleep(0)

    def _full(self) -> bool:
        most = self.route.max_concurrency
        return self._sending >= most or self._unresolved >= UNRESOLVED_PER_SLOT * most

    async def _until_room(self) -> None:
        while self._full():
            self._freed.clear()
            await self._freed.wait()

    async def _all_sent(self) -> None:
        while self._sending:
            self._freed.clear()
            await self._freed.wait()

    async def _cancel_sends(self) -> None:
        """Cancel the sends in flight; each hands its delivery back to the resolver."""
        sends = list(self._tasks)
        for task in sends:
            task.cancel()
        if sends:
            await asyncio.wait(sends, timeout=CANCEL_WAIT_S)

    async def _idle(self) -> None:
        """Wait until every delivery read is sent and its outcome recorded."""
        while self._sending or self._unresolved:
            self._freed.clear()
            await self._freed.wait()

    async def _wait_for_slot(self, stop: asyncio.Event) -> bool:
        """For Slack, wait until the URL's slot is free before reading; True if it waited."""
        if self._slot is None or (wait := await self._slot.free_in()) <= 0:
            return False
        await sleep_unless(stop, wait)
        return True

    async def _take(
        self, block_s: float, *, check_retries: bool, retries_until: int | None = None
    ) -> list[Work]:
        """Up to as many deliveries as can be sent now: due retries first, then those of
        stopped workers, then (rarely) long-idle ones, then new entries."""
        count = self._count()
        queue, taken = self.queue, []
        if check_retries:
            taken += await queue.take_retries(count, self._visibility_s, until=retries_until)
        if len(taken) < count and queue.orphaned:
            taken += await queue.take_orphans(count - len(taken))
        if len(taken) < count and time.monotonic() >= self._next_backstop:
            self._next_backstop = time.monotonic() + BACKSTOP_EVERY_S
            taken += await queue.reclaim_idle(count - len(taken), self._visibility_s)
        if len(taken) < count:
            # Outcomes waiting to be recorded go in the same round trip as the read.
            batch, self._attempted = self._attempted, []
            try:
                resolved, new = await queue.resolve_and_take(
                    [item.resolution() for item in batch],
                    count - len(taken),
                    0 if taken or batch else block_s,
                )
            except BaseException:
                self._attempted[:0] = batch  # the resolver records them, or the next read
                self._to_settle.set()
                raise
            self._resolved(batch, resolved)
            taken += new
        return taken

    async def _start_all(self, taken: list[Work]) -> None:
        """Start a send for each delivery this route takes; resolve the others at once,
        before any Slack slot is taken for them."""
        for work in taken:
            attempt = work.attempts + 1
            try:
                item = read_entry(work.fields)
            except MalformedEvent as exc:
                self._record(Attempted(work, None, GiveUp(str(exc)), attempt))
                continue
            if not self._takes(item):
                skip = Done("not for this route")
                self._record(Attempted(work, item, skip, attempt, skipped=True))
                continue
            if self._slot is not None and not await self._take_slot(self._slot, work):
                continue
            self._sending += 1
            self._tasks.add(task := asyncio.create_task(self._deliver(work, item)))
            task.add_done_callback(self._tasks.discard)

    async def _take_slot(self, slot: SlackSlot, work: Work) -> bool:
        """Take the Slack slot for `work`, or schedule `work` for when it is free."""
        while (wait := await slot.take()) > 0:
            if wait > SLACK_HOLD_S:
                await self.queue.resolve(work, "retry", due_s=wait, attempts=work.attempts)
                return False
            await asyncio.sleep(wait)
        return True

    async def _deliver(self, work: Work, item: OutboxItem) -> None:
        """Attempt one delivery and hand its outcome to the resolver; never raises."""
        attempt = work.attempts + 1
        try:
            outcome = await self._attempt(work, item, attempt)
        except asyncio.CancelledError:
            # Shutting down: the receiver may or may not have it; send it again (same id).
            reason = "handed back at shutdown"
            outcome = Attempted(work, item, Later(0.0, reason), work.attempts, handed_back=True)
        except Exception as exc:  # a bug of ours: an attempt like any other, so it ends
            # in the dead letters after retry_max_attempts instead of looping forever.
            log.exception("route %s: delivery of entry %s failed", self.route.name, work.entry_id)
            failure = Retry(None, f"internal error ({type(exc).__name__}: {exc})")
            outcome = Attempted(work, item, self._policy.decide(attempt, failure), attempt)
        self._sending -= 1
        self._record(outcome)

    def _record(self, outcome: Attempted) -> None:
        """Hand an outcome to the resolver (or to the reader's next round trip)."""
        self._attempted.append(outcome)
        self._unresolved += 1
        self._freed.set()
        self._to_settle.set()

    async def _attempt(self, work: Work, item: OutboxItem, attempt: int) -> Attempted:
        try:
            # Off the event loop, with a deadline: a template is user code.
            message = await self._renderer.render_async(self.route, item)
        except RenderError as exc:
            return Attempted(work, item, GiveUp(f"could not render: {exc}"), attempt)
        result = await self._sink.send(message)
        if self._slot is not None and isinstance(result, Retry) and result.after:
            with contextlib.suppress(RedisError, OSError):
                await self._slot.defer(min(result.after, MAX_RETRY_AFTER_S))
        return Attempted(work, item, self._policy.decide(attempt, result), attempt)

    def _takes(self, item: OutboxItem) -> bool:
        """Whether this route sends `item`: a digest made for it, or an event it accepts
        (on a digest route, batch members only in `digest_statuses`)."""
        if isinstance(item, Digest):
            return item.route == self.route.name
        return self.route.accepts(item.status, item.request.reference_id)

    async def _resolve_forever(self, stop: asyncio.Event) -> None:
        """Record outcomes the reader has not taken along with its next read (it is
        waiting for a Slack slot, for new entries, or for Redis to catch up)."""
        while True:
            await self._to_settle.wait()
            self._to_settle.clear()
            if stop.is_set():
                return
            await asyncio.sleep(RESOLVE_DELAY_S)  # the reader, if it is awake, goes first
            batch, self._attempted = self._attempted, []
            if batch:
                await self._resolve(batch)

    async def _resolve(self, batch: list[Attempted]) -> None:
        """Record a batch of outcomes, trying a few times."""
        for failures in range(RESOLVE_TRIES):
            try:
                resolved = await self.queue.resolve_all([item.resolution() for item in batch])
                break
            except (RedisError, OSError) as exc:
                if failures == RESOLVE_TRIES - 1:
                    self._unrecorded(batch, exc)
                    return
                await asyncio.sleep(full_jitter(failures, *REDIS_BACKOFF, self._rng))
        self._resolved(batch, resolved)

    def _unrecorded(self, batch: list[Attempted], exc: Exception) -> None:
        """Redis refused the outcomes: the deliveries stay pending here, and the backstop
        sends them again (same webhook-id)."""
        self._unresolved -= len(batch)
        self._freed.set()
        log.error(
            "route %s: could not record the outcome of %s (%s); they will be "
            "sent again later with the same webhook-id",
            self.route.name,
            plural(len(batch), "delivery", "deliveries"),
            reason(exc),
        )

    def _resolved(self, batch: list[Attempted], resolved: list[bool]) -> None:
        """Count and log outcomes once recorded."""
        if not batch:
            return
        self._unresolved -= len(batch)
        self._freed.set()
        for item, recorded in zip(batch, resolved, strict=True):
            if not recorded:
                log.info(
                    "route %s: entry %s was resolved by another worker",
                    self.route.name,
                    item.work.entry_id,
                )
            elif item.skipped or item.handed_back:
                outcome = "skipped" if item.skipped else "handed_back"
                self._tally.count(self.route.name, outcome)
                self._metrics.delivered(self.route.name, outcome, None)
                if item.handed_back:
                    _log_outcome(self.route, item)
            else:
                outcome = _outcome(item.decision)
                self._tally.count(self.route.name, outcome)
                self._metrics.delivered(self.route.name, outcome, self._latency(item))
                _log_outcome(self.route, item)

    def _latency(self, item: Attempted) -> float | None:
        """Seconds from detection to this successful delivery."""
        if item.event is None or not isinstance(item.decision, Done):
            return None
        return (self.queue.now() - item.event.detected_ms) / 1000


LOG_LEVELS = {Done: logging.INFO, Later: logging.WARNING, GiveUp: logging.ERROR}


def _outcome(decision: Decision) -> str:
    return {Done: "delivered", Later: "retried", GiveUp: "dead"}[type(decision)]


def _log_outcome(route: Route, item: Attempted) -> None:
    """One line per delivery outcome, naming the event, the request and its reference."""
    level = logging.INFO if item.handed_back else LOG_LEVELS[type(item.decision)]
    if not log.isEnabledFor(level):
        return
    event = item.event
    if event is None:
        subject, extra = f"outbox entry {item.work.entry_id}", about(entry_id=item.work.entry_id)
    else:
        subject, fields = event.log_fields()
        extra = about(**fields, entry_id=item.work.entry_id)
    extra |= about(route=route.name, attempt=item.attempt)
    match item.decision:
        case Later(reason=reason) if item.handed_back:
            log.info("route %s: %s %s, due now", route.name, subject, reason, extra=extra)
        case Done(detail=detail):
            log.info(
                "route %s: %s %s, attempt %d",
                route.name,
                subject,
                detail,
                item.attempt,
                extra=extra,
            )
        case Later(delay_s=delay, reason=reason):
            log.warning(
                "route %s: %s failed (%s), attempt %d; trying again in %.1f s",
                route.name,
                subject,
                reason,
                item.attempt,
                delay,
                extra=extra,
            )
        case GiveUp(reason=reason):
            log.error(
                "route %s: %s dead-lettered after %s: %s (see notifier dlq list)",
                route.name,
                subject,
                plural(item.attempt, "attempt"),
                reason,
                extra=extra,
            )
