"""The store against a plain model of the contract, driven by random cycles (hypothesis).

A rule-based state machine uses `Store` the way the poller does (lease, begin, apply per
page, finish, prune) and, in between, restarts the process, abandons cycles, lets another
replica take the lease and makes Redis lose its data. After every step the outbox and the
stored state must be exactly what a plain model of the contract's "Semantics" says:

- Baseline: while the epoch is a baseline, a request without stored state is recorded
  silently (unless the begin that created the epoch asked to notify existing requests);
  a stored request entering a notify_on status it was never accounted for always fires.
- After the baseline, a request first seen in a notify_on status fires unless its
  created_at is at most the newest created_at the baseline saw minus 5 minutes; it is
  then recorded silently and counted as silenced.
- Each (request, status) fires at most once, whatever the order of pages; unknown
  statuses are stored and never fire. A pruned request listed again never fires again.
- Redis that lost its data: writes with the old epoch are refused and the next begin
  creates a new epoch, a baseline again.

Runs on fakeredis and on the real redis-server of `conftest.py`.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import count, islice
from typing import TypeVar

import fakeredis
import pytest
import redis.asyncio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from notifier.config import load_settings
from notifier.keys import Keys
from notifier.models import Event, LipsyncRequest
from notifier.outbox import read_entry
from notifier.store import (
    Applied,
    Epoch,
    EpochChanged,
    LeaseLost,
    Store,
    StoredState,
    connect_redis,
)

T = TypeVar("T")

# Prune sweeps buckets by the range; the ids live in the first few buckets, so a sweep of
# those is cheap (a full sweep of 4,096 buckets takes ~0.1 s on fakeredis).
BUCKET_SPAN = 8


def _ids_in_first_buckets(how_many: int) -> list[str]:
    keys = Keys("any")
    buckets = [keys.state(bucket) for bucket in range(BUCKET_SPAN)]
    candidates = (f"req-{n}" for n in count())
    return list(islice((name for name in candidates if keys.state_of(name) in buckets), how_many))


POOL = 6  # few ids, so that repeats, regressions and collisions in one page are common
IDS = _ids_in_first_buckets(POOL)  # two of them share a bucket
STATUSES = ["queued", "processing", "completed", "failed", "cancelled", "weird|status"]
FINISHED = frozenset({"completed", "failed"})
NOTIFY_ON_CHOICES = [
    ("completed", "failed"),
    ("completed", "failed", "processing"),
    ("completed",),
    ("queued", "failed"),
]
GRACE_MS = 5 * 60 * 1000  # the contract's 5 minutes
START = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)  # requests are created over the next 2 hours
START_S = int(START.timestamp())
# Minutes after START at which requests are created: a baseline's newest created_at
# minus 5 minutes is often another request's created_at exactly.
CREATED_MINUTES = (0, 5, 10, 55, 60, 65, 115, 120)
ERRORS = [None, "lip sync failed", 'ünïcödé "quoted" | piped \\ text']

SETTINGS = settings(max_examples=60, stateful_step_count=30, deadline=None)

# One listed item: pool index, status, minutes from created_at to finished_at (0: none),
# error message (of a failed request).
Item = tuple[int, str, int, str | None]
items = st.tuples(
    st.integers(0, POOL - 1),
    st.sampled_from(STATUSES),
    st.integers(0, 40),
    st.sampled_from(ERRORS),
)
pages = st.lists(items, max_size=4)


@dataclass
class Stored:
    """What the model keeps for one request."""

    status: str
    accounted: frozenset[str]  # notify_on statuses notified or recorded silently
    finished_s: int | None


@dataclass
class ModelEpoch:
    id: str
    baseline: bool
    existing: bool  # notify_existing of the begin that created it
    newest: int = 0  # newest created_at (ms) seen while in baseline
    horizon: int = 0  # first seen with created_at at or before this (ms): silenced


@dataclass
class Model:
    """The namespace as the contract describes it; starts over when Redis loses its data."""

    epoch: ModelEpoch | None = None
    state: dict[str, Stored] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    fired: set[tuple[str, str]] = field(default_factory=set)
    retired: dict[str, str] = field(default_factory=dict)  # pruned id -> its final status


def created_ms(request: LipsyncRequest) -> int:
    # The test builds whole-second timestamps only, so this is exact.
    return int(request.created_at.timestamp()) * 1000


def finished_s(request: LipsyncRequest) -> int | None:
    if request.status not in FINISHED:
        return None
    return int(max(request.created_at, request.finished_at or request.created_at).timestamp())


class StoreMachine(RuleBasedStateMachine):
    """One namespace on one backend: `url` of a real redis-server, or None for fakeredis."""

    def __init__(self, url: str | None) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.url = url
        self.server = fakeredis.FakeServer() if url is None else None
        self.client = self._connect()
        self.run(self.client.flushall())
        self.store: Store | None = None
        self.model = Model()
        self.now = START_S + 5 * 3600  # the store's clock (whole seconds)
        self.token = uuid.uuid4().hex
        self.cycle: Epoch | None = None  # the epoch of a begun, not yet finished cycle
        self.last_epoch: Epoch | None = None  # the epoch of the latest begin
        self.past_epochs: set[str] = set()
        self.created: list[datetime] = []
        self.notify_on: frozenset[str] = frozenset()

    # -- plumbing --------------------------------------------------------------------------

    def _connect(self) -> redis.asyncio.Redis:
        if self.url is None:
            return fakeredis.FakeAsyncRedis(server=self.server, decode_responses=True)
        return connect_redis(self.url)

    def run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(awaitable)

    def clock(self) -> float:
        return float(self.now)

    def teardown(self) -> None:
        try:
            self.run(self.client.aclose())
        finally:
            self.loop.close()

    def set_lease(self, token: str) -> None:
        assert self.store is not None
        self.run(self.client.set(self.store.keys.lease, token))

    def listed(self, page: list[Item]) -> list[LipsyncRequest]:
        """The requests of one page as the API lists them."""
        requests = []
        for index, status, finish_min, error in page:
            created = self.created[index]
            # A forgotten (pruned) request is finished: the API lists it as it finished.
            final = self.model.retired.get(IDS[index], status)
            requests.append(
                LipsyncRequest(
                    id=IDS[index],
                    status=final,
                    created_at=created,
                    reference_id=f"ref-{index}" if index % 2 else None,
                    finished_at=created + timedelta(minutes=finish_min)
                    if finish_min and final in {"completed", "failed", "cancelled"}
                    else None,
                    output_url=f"https://cdn.example/{IDS[index]}.mp4"
                    if final == "completed"
                    else None,
                    error_message=error if final == "failed" else None,
                )
            )
        return requests

    # -- the model -------------------------------------------------------------------------

    def model_apply(self, requests: list[LipsyncRequest]) -> Applied:
        model, epoch = self.model, self.model.epoch
        assert epoch is not None
        detected = self.now * 1000
        changed = events = silenced = first_seen = 0
        entered: dict[str, int] = {}
        for request in requests:
            created = created_ms(request)
            if epoch.baseline:
                epoch.newest = max(epoch.newest, created)
            stored = model.state.get(request.id)
            previous = stored.status if stored else None
            if previous == request.status:
                continue
            changed += 1
            first_seen += stored is None
            accounted = stored.accounted if stored else frozenset()
            emit = False
            if request.status in self.notify_on and request.status not in accounted:
                accounted |= {request.status}
                if stored is not None:
                    emit = True  # a stored request's new status always counts
                elif epoch.baseline:
                    emit = epoch.existing
                elif created <= epoch.horizon:
                    silenced += 1  # an old request the listing had missed
                else:
                    emit = True
            if emit:
                key = (request.id, request.status)
                assert key not in model.fired, f"the model would notify {key} twice"
                assert request.id not in model.retired, "the model would notify a pruned id"
                model.fired.add(key)
                model.events.append(Event(request, previous, detected))
                events += 1
            model.state[request.id] = Stored(request.status, accounted, finished_s(request))
            if stored is not None or not epoch.baseline:  # a baseline's first sightings aside
                entered[request.status] = entered.get(request.status, 0) + 1
        return Applied(
            changed=changed,
            events=events,
            silenced=silenced,
            first_seen=first_seen,
            entered=entered,
        )

    def model_prune(self, buckets: range, retention_s: int) -> int:
        assert self.store is not None
        epoch = self.model.epoch
        assert epoch is not None
        if epoch.baseline:
            return 0
        swept = {self.store.keys.state(bucket) for bucket in buckets}
        cutoff = math.floor(self.now - retention_s)
        gone = {
            request_id: stored
            for request_id, stored in self.model.state.items()
            if stored.finished_s is not None
            and stored.finished_s < cutoff
            and self.store.keys.state_of(request_id) in swept
        }
        for request_id, stored in gone.items():
            del self.model.state[request_id]
            self.model.retired[request_id] = stored.status
        if gone:
            # A forgotten request listed again is first seen with a created_at at or before
            # its finish time: raising the horizon to it keeps it from being notified again.
            latest = max(stored.finished_s or 0 for stored in gone.values())
            epoch.horizon = max(epoch.horizon, latest * 1000)
        return len(gone)

    # -- steps shared by rules -------------------------------------------------------------

    def do_begin(self, notify_existing: bool) -> None:
        assert self.store is not None
        epoch = self.run(self.store.begin(self.token, notify_existing))
        model = self.model
        if model.epoch is None:
            assert epoch.created, "an empty namespace must get a new epoch"
            assert epoch.baseline, "a new epoch starts as a baseline"
            assert epoch.id not in self.past_epochs, "a lost epoch must not come back"
            model.epoch = ModelEpoch(id=epoch.id, baseline=True, existing=notify_existing)
            self.past_epochs.add(epoch.id)
        else:
            assert not epoch.created
            assert epoch.id == model.epoch.id
            assert epoch.baseline == model.epoch.baseline
        groups = self.run(self.client.xinfo_groups(self.store.keys.outbox))
        assert [group["name"] for group in groups] == ["webhook"]
        self.cycle = self.last_epoch = epoch

    def do_apply(self, page: list[Item], seconds: int) -> None:
        assert self.store is not None
        assert self.cycle is not None
        self.now += seconds
        requests = self.listed(page)
        expected = self.model_apply(requests)
        assert self.run(self.store.apply(requests, self.cycle, self.token)) == expected

    def do_finish(self, seconds: int) -> None:
        assert self.store is not None
        assert self.cycle is not None
        epoch = self.model.epoch
        assert epoch is not None
        self.now += seconds
        was_baseline = self.run(self.store.finish(self.cycle, self.token))
        assert was_baseline == epoch.baseline
        if epoch.baseline:
            epoch.baseline = False
            epoch.horizon = max(epoch.horizon, epoch.newest - GRACE_MS)
        assert self.run(self.client.get(self.store.keys.last_cycle)) == str(self.now * 1000)
        self.cycle = None

    # -- rules -----------------------------------------------------------------------------

    @initialize(
        notify_on=st.sampled_from(NOTIFY_ON_CHOICES),
        minutes=st.lists(st.sampled_from(CREATED_MINUTES), min_size=POOL, max_size=POOL),
    )
    def configure(self, notify_on: tuple[str, ...], minutes: list[int]) -> None:
        self.settings = load_settings(
            {"webhook_url": "http://127.0.0.1:9/hook", "notify_on": ",".join(notify_on)}
        )
        self.notify_on = frozenset(notify_on)
        self.store = Store(self.client, self.settings, clock=self.clock)
        # Each id keeps its created_at.
        self.created = [START + timedelta(minutes=m) for m in minutes]
        self.set_lease(self.token)

    @precondition(lambda self: self.cycle is None)
    @rule(notify_existing=st.booleans())
    def begin(self, notify_existing: bool) -> None:
        """Start a cycle (`complete_cycle` also begins while one is open, abandoning it)."""
        self.do_begin(notify_existing)

    @precondition(lambda self: self.cycle is not None)
    @rule(page=pages, seconds=st.integers(0, 600))
    def apply(self, page: list[Item], seconds: int) -> None:
        self.do_apply(page, seconds)

    @precondition(lambda self: self.cycle is not None)
    @rule(seconds=st.integers(0, 600))
    def finish(self, seconds: int) -> None:
        self.do_finish(seconds)

    @rule(
        notify_existing=st.booleans(),
        listing=st.lists(pages, min_size=1, max_size=3),
        seconds=st.integers(0, 600),
    )
    def complete_cycle(
        self, notify_existing: bool, listing: list[list[Item]], seconds: int
    ) -> None:
        """A whole poll cycle: begin, every page, finish; a cycle still open is abandoned
        (as after a failed listing)."""
        self.do_begin(notify_existing)
        for page in listing:
            self.do_apply(page, seconds)
        self.do_finish(seconds)

    @precondition(lambda self: self.last_epoch is not None)
    @rule(
        start=st.integers(0, BUCKET_SPAN),
        width=st.integers(1, BUCKET_SPAN),
        retention_s=st.integers(0, 6 * 3600),
        seconds=st.integers(0, 3600),
    )
    def prune(self, start: int, width: int, retention_s: int, seconds: int) -> None:
        """Forget finished requests of some buckets, finished over `retention_s` ago."""
        assert self.store is not None
        assert self.last_epoch is not None
        self.now += seconds
        buckets = range(start, min(start + width, BUCKET_SPAN))
        expected = self.model_prune(buckets, retention_s)
        pruned = self.run(self.store.prune(self.last_epoch, self.token, buckets, retention_s))
        assert pruned == expected

    @rule(
        kind=st.sampled_from(["restart", "abandon", "foreign lease", "lose data"]),
        operation=st.sampled_from(["begin", "apply", "finish", "prune"]),
        page=pages,
        drop_scripts=st.booleans(),
    )
    def disrupt(self, kind: str, operation: str, page: list[Item], drop_scripts: bool) -> None:
        """Something goes wrong between two steps (one rule, so that cycles still progress)."""
        if kind in {"restart", "abandon"}:
            self.restart(abandon=kind == "abandon")
        elif kind == "foreign lease":
            self.foreign_lease(operation, page)
        else:
            self.lose_data(page, drop_scripts)

    def restart(self, abandon: bool) -> None:
        """A new process: a new client and Store; the state persists in Redis.

        With `abandon` the open cycle is lost with the old lease and a new token takes the
        lease over; otherwise the cycle goes on with the same epoch through the new Store.
        """
        self.run(self.client.aclose())
        self.client = self._connect()
        self.store = Store(self.client, self.settings, clock=self.clock)
        if abandon:
            self.token = uuid.uuid4().hex
            self.set_lease(self.token)
            self.cycle = None

    def foreign_lease(self, operation: str, page: list[Item]) -> None:
        """Another replica holds the lease: every write is refused and changes nothing."""
        store = self.store
        assert store is not None
        self.set_lease("another-replica")
        epoch = self.last_epoch or Epoch(id="none", baseline=True, created=False)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "begin": lambda: store.begin(self.token, True),
            "apply": lambda: store.apply(self.listed(page), epoch, self.token),
            "finish": lambda: store.finish(epoch, self.token),
            "prune": lambda: store.prune(epoch, self.token, range(BUCKET_SPAN), 0),
        }
        with pytest.raises(LeaseLost):
            self.run(calls[operation]())
        self.set_lease(self.token)

    def lose_data(self, page: list[Item], drop_scripts: bool) -> None:
        """Redis restarted without persistence: every key (maybe every script) is gone.

        Writes with the epoch of before are refused: first for the lost lease key, then,
        with the lease set again, for the lost epoch.
        """
        assert self.store is not None
        self.run(self.client.flushall())
        if drop_scripts:
            self.run(self.client.script_flush())
        stale = self.last_epoch
        if stale is not None:
            requests = self.listed(page)
            with pytest.raises(LeaseLost):
                self.run(self.store.apply(requests, stale, self.token))
            self.set_lease(self.token)
            with pytest.raises(EpochChanged):
                self.run(self.store.apply(requests, stale, self.token))
            with pytest.raises(EpochChanged):
                self.run(self.store.finish(stale, self.token))
            with pytest.raises(EpochChanged):
                self.run(self.store.prune(stale, self.token, range(BUCKET_SPAN), 0))
        self.set_lease(self.token)
        self.model = Model()
        self.cycle = self.last_epoch = None

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def outbox_holds_the_models_events(self) -> None:
        if self.store is None:
            return
        entries = self.run(self.client.xrange(self.store.keys.outbox))
        events = [read_entry(fields) for _, fields in entries]
        assert events == self.model.events
        assert len({(event.request.id, event.status) for event in events}) == len(events)

    @invariant()
    def stored_state_is_the_models(self) -> None:
        if self.store is None:
            return
        for request_id in IDS:
            stored = self.run(self.store.stored(request_id))
            expected = self.model.state.get(request_id)
            if expected is None:
                assert stored is None
            else:
                assert stored == StoredState(
                    status=expected.status,
                    accounted=expected.accounted,
                    finished_s=expected.finished_s,
                )


def test_ids_share_buckets() -> None:
    keys = Keys("any")
    assert len(IDS) == POOL
    assert len({keys.state_of(request_id) for request_id in IDS}) < POOL


@pytest.mark.parametrize("backend", ["fakeredis", "redis-server"])
def test_store_matches_the_contract_model(backend: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_server").url if backend == "redis-server" else None
    run_state_machine_as_test(lambda: StoreMachine(url), settings=SETTINGS)
