"""Cheap poll cycles on large accounts: list only the part of the listing that can change.

A full sweep lists the whole account. It also learns the listing's order from
`created_at` and where its *settled* part lies: the requests created before the oldest
unfinished one, which only a rare late change can touch (the next full sweep catches
that). An incremental sweep then fetches the rest, new and unfinished requests, plus the
settled part's edge as a check that the listing moved as predicted. When a check fails
(the order was not what it seemed, a request was deleted, requests arrived mid-cycle)
the cycle falls back to a full sweep at once; one also runs every `full_sweep_every`
cycles as a safety net.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from notifier.api import ApiClient, ListResponse
from notifier.models import LipsyncRequest
from notifier.store import FINISHED_STATUSES

NEWEST_FIRST, OLDEST_FIRST = "newest-first", "oldest-first"
# Rounds of reading again the pages that share a run of equal created_at. Requests of one
# run may trade places between two reads in an unstable order, so each read of its pages
# finds some of them; a run of 300 over pages of 100 misses each request in a round with
# odds of about (2/3)^3. Reading stops once nothing is missing, or after FRUITLESS_ROUNDS
# in a row found nothing new (in a stable order, reading again never finds anything).
TIE_ROUNDS = 12
FRUITLESS_ROUNDS = 3


class WindowMismatch(Exception):
    """The listing did not move as the sweep state predicted: a full sweep must run."""


@dataclass(frozen=True, slots=True)
class SweepState:
    """What the last cycle learned about the listing, kept in Redis between cycles."""

    epoch: str  # the epoch it belongs to: a new baseline forgets it
    order: str  # NEWEST_FIRST or OLDEST_FIRST
    total: int  # the listing's total at the end of the last cycle
    settled: int  # requests in the settled part
    edge: frozenset[str]  # ids of the settled part's newest requests (equal created_at)
    edge_created: int  # their created_at, unix ms
    since_full: int  # incremental cycles since the last full sweep

    def fields(self) -> dict[str, str]:
        """The state as the fields of a Redis hash."""
        return {
            "epoch": self.epoch,
            "order": self.order,
            "total": str(self.total),
            "settled": str(self.settled),
            "edge": " ".join(sorted(self.edge)),
            "edge_created": str(self.edge_created),
            "since_full": str(self.since_full),
        }

    @classmethod
    def parse(cls, fields: Mapping[str, str], epoch: str) -> SweepState | None:
        """The stored state, or None if there is none usable for this epoch."""
        try:
            state = cls(
                epoch=fields["epoch"],
                order=fields["order"],
                total=int(fields["total"]),
                settled=int(fields["settled"]),
                edge=frozenset(fields["edge"].split()),
                edge_created=int(fields["edge_created"]),
                since_full=int(fields["since_full"]),
            )
        except (KeyError, ValueError):
            return None
        usable = state.epoch == epoch and state.order in (NEWEST_FIRST, OLDEST_FIRST)
        return state if usable and state.settled > 0 and state.edge else None


@dataclass(slots=True)
class Observed:
    """What a cycle saw of the listing: enough to place the settled part afterwards."""

    created: dict[str, int] = field(default_factory=dict)  # id -> created_at unix ms
    unfinished: dict[str, int] = field(default_factory=dict)  # the same, unfinished ones
    pages: dict[int, list[int]] = field(default_factory=dict)  # offset -> created_at, last read

    def add(self, response: ListResponse) -> None:
        """Note the requests of one list response."""
        stamps = []
        for request in response.requests:
            created = request.created_ms
            stamps.append(created)
            self.created[request.id] = created
            if request.status not in FINISHED_STATUSES:
                self.unfinished[request.id] = created
            else:
                self.unfinished.pop(request.id, None)
        self.pages[response.offset] = stamps

    def order(self) -> str | None:
        """The order the pages show, read by offset; None unless it is one of the two."""
        at = {
            offset + index: stamp
            for offset, page in sorted(self.pages.items())
            for index, stamp in enumerate(page)
        }
        pairs = list(itertools.pairwise(stamp for _, stamp in sorted(at.items())))
        if all(newer >= older for newer, older in pairs):
            return NEWEST_FIRST
        if all(older <= newer for older, newer in pairs):
            return OLDEST_FIRST
        return None

    def live(self, stalled_before_ms: int) -> int:
        """Unfinished requests that are not stalled: while there are some, poll often."""
        return sum(created >= stalled_before_ms for created in self.unfinished.values())

    def cut(self, stalled_before_ms: int) -> int:
        """created_at from which requests may still change: the oldest unfinished one that
        is not stalled, or just past the newest request when none is unfinished."""
        live = [created for created in self.unfinished.values() if created >= stalled_before_ms]
        return min(live) if live else max(self.created.values(), default=0) + 1


def learn(observed: Observed, epoch: str, total: int, stalled_before_ms: int) -> SweepState | None:
    """The state after a full sweep, or None if it showed no usable order or no settled part."""
    order = observed.order()
    cut = observed.cut(stalled_before_ms)
    settled = [created for created in observed.created.values() if created < cut]
    if order is None or not settled or len(observed.created) != total:
        return None
    newest = max(settled)
    edge = frozenset(rid for rid, created in observed.created.items() if created == newest)
    return SweepState(epoch, order, total, len(settled), edge, newest, since_full=0)


def advance(state: SweepState, window: Observed, total: int, stalled_before_ms: int) -> SweepState:
    """The state after an incremental sweep over `window` (the unsettled part only)."""
    cut = window.cut(stalled_before_ms)
    joining = {rid: created for rid, created in window.created.items() if created < cut}
    settled, edge, edge_created = state.settled, state.edge, state.edge_created
    if joining:
        edge_created = max(joining.values())
        edge = frozenset(rid for rid, created in joining.items() if created == edge_created)
        settled += len(joining)
    return SweepState(
        state.epoch, state.order, total, settled, edge, edge_created, state.since_full + 1
    )


@dataclass(slots=True)
class Window:
    """The unsettled part of the listing, fetched and checked against the sweep state."""

    requests: list[LipsyncRequest]  # every request created after the settled part, once
    observed: Observed
    total: int


async def fetch_window(api: ApiClient, state: SweepState) -> Window:
    """Fetch the unsettled part of the listing and the settled part's edge; `WindowMismatch`
    if the listing did not move as `state` predicts (an `ApiError` if a call fails).

    The window is every request created after the edge, and the edge must be where the
    order puts it. Positions only decide what to fetch, so requests with equal created_at
    that trade places between two page reads cannot fool the checks.
    """
    size = len(state.edge)
    if state.order == NEWEST_FIRST:
        first = await api.fetch_page(0, api.page_size)
        start, expected = 0, first.total - state.settled
        end = expected + size
    else:
        start = state.settled - size
        first = await api.fetch_page(start, api.page_size)
        end, expected = first.total, first.total - state.settled
    if end - start > max(state.total, api.page_size):
        # A full listing costs no more then, and it bounds what a wild total can make it
        # fetch; a window over a claimed total would not.
        raise WindowMismatch(
            f"the window would hold {end - start} requests, more than the whole account "
            f"held last cycle ({state.total})"
        )
    step = first.returned if 0 < first.returned < first.limit else api.page_size
    listing = api.listing()
    responses = [first, *await listing.fetch(range(start + max(first.returned, 1), end, step))]
    window, edge = _split(responses, first.total, state.edge_created)
    fruitless = 0
    for _ in range(TIE_ROUNDS):
        tied = _tied_pages(responses)
        found_all = len(window) == expected and edge == state.edge
        if found_all or not tied or fruitless == FRUITLESS_ROUNDS:
            break
        responses += await listing.fetch(tied)
        found = len(window) + len(edge)
        window, edge = _split(responses, first.total, state.edge_created)
        fruitless = fruitless + 1 if len(window) + len(edge) == found else 0
    if len(window) != expected or edge != state.edge:
        raise WindowMismatch(
            f"{len(window)} requests newer than the settled part where {expected} were "
            f"expected, and {len(edge & state.edge)} of its {size} edge requests found"
        )
    requests = list(window.values())
    observed = Observed()
    observed.add(ListResponse(start, requests, [], first.total, first.limit))
    return Window(requests, observed, first.total)


def _split(
    responses: list[ListResponse], total: int, edge_created: int
) -> tuple[dict[str, LipsyncRequest], frozenset[str]]:
    """The requests created after the edge, and the ids created with it."""
    window: dict[str, LipsyncRequest] = {}
    edge: set[str] = set()
    for response in responses:
        if response.total != total:
            raise WindowMismatch(f"the total moved from {total} to {response.total} mid-cycle")
        for request in response.requests:
            created = request.created_ms
            if created > edge_created:
                window[request.id] = request
            elif created == edge_created:
                edge.add(request.id)
    return window, frozenset(edge)


def _tied_pages(responses: list[ListResponse]) -> list[int]:
    """Offsets of the pages that hold a created_at some other page also holds."""
    pages_of: dict[int, set[int]] = defaultdict(set)
    for response in responses:
        for request in response.requests:
            pages_of[request.created_ms].add(response.offset)
    return sorted({offset for pages in pages_of.values() if len(pages) > 1 for offset in pages})
