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
from collections.abc import Mapping
from dataclasses import dataclass, field

from notifier.api import ApiClient, ListResponse
from notifier.models import LipsyncRequest
from notifier.store import FINISHED_STATUSES

NEWEST_FIRST, OLDEST_FIRST = "newest-first", "oldest-first"
# Rounds of extra pages read across boundaries inside runs of equal created_at.
OVERLAP_ROUNDS = 3


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
            created = _unix_ms(request)
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
    step = first.returned if 0 < first.returned < api.page_size else api.page_size
    listing = api.listing()
    responses = [first, *await listing.fetch(range(start + max(first.returned, 1), end, step))]
    for round_ in range(OVERLAP_ROUNDS + 1):
        window, edge = _split(responses, first.total, state.edge_created)
        if len(window) == expected and edge == state.edge:
            break
        if round_ == OVERLAP_ROUNDS:
            raise WindowMismatch(
                f"{len(window)} requests newer than the settled part where {expected} were "
                f"expected, and {len(edge & state.edge)} of its {size} edge requests found"
            )
        # Requests with equal created_at may trade places across a page boundary between
        # two reads: read a page straddling each such boundary, and look again.
        responses += await listing.fetch(_straddling(responses, step))
    requests = list(window.values())
    observed = Observed()
    observed.add(ListResponse(start, requests, [], first.total))
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
            created = _unix_ms(request)
            if created > edge_created:
                window[request.id] = request
            elif created == edge_created:
                edge.add(request.id)
    return window, frozenset(edge)


def _straddling(responses: list[ListResponse], step: int) -> list[int]:
    """Offsets of pages centred on each boundary between two pages read whose neighbours
    have equal created_at."""
    pages = {response.offset: response.requests for response in responses}
    offsets = []
    for offset, requests in pages.items():
        following = pages.get(offset + len(requests))
        if requests and following and _unix_ms(requests[-1]) == _unix_ms(following[0]):
            offsets.append(max(0, offset + len(requests) - step // 2))
    return offsets


def _unix_ms(request: LipsyncRequest) -> int:
    return int(request.created_at.timestamp() * 1000)
