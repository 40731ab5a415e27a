"""Which pages a poll cycle reads: the new requests, every unfinished one wherever it is,
and a slice of the safety net.

The first cycle (the baseline), and any cycle that cannot trust what it knows, lists the
whole account; it learns the listing's order from `created_at`. A steady cycle then reads
much less, and still sees every transition of every request the notifier knows to be
unfinished, whatever its age:

- the head: the pages that can hold requests created since the last cycle (the start of
  a newest-first listing, the end of an oldest-first one), up to the newest request the
  last cycle saw;
- the pages that hold each known unfinished request, found from where the listing held
  it last (the unfinished index) moved by what was created since, and checked: a request
  not on its page is looked for by `created_at` (the listing is sorted by it), and one
  whose place a single page covers without it is gone (deleted); one that cannot be
  found within `LOCATE_ROUNDS` rounds makes the cycle list everything, the last resort;
- a few pages of the safety net, which walks the whole listing over
  `safety_net_period` seconds to catch what the rest cannot: a finished request that
  changes again, a request the listing order hid. It is read after everything else, so
  it never holds back a notification, and it never takes more than its share of the
  API's rate.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from notifier.api import ApiClient, Listing, ListResponse, Page
from notifier.store import Unfinished

NEWEST_FIRST, OLDEST_FIRST = "newest-first", "oldest-first"
# Rounds of looking for unfinished requests that were not where the listing held them;
# each round reads a page further in the direction created_at points to.
LOCATE_ROUNDS = 6
# Rounds of reading again the pages that share a run of equal created_at: in an order
# without a tie-breaker, requests of one run trade places between two reads. Reading
# stops once nothing is missing, or after FRUITLESS_ROUNDS in a row that found nothing.
TIE_ROUNDS = 12
FRUITLESS_ROUNDS = 3
# Pages of unfinished requests read (and applied) at a time: what a cycle holds at most.
LOCATE_BATCH = 32
# Share of the API's rate over a poll interval that the safety net may take.
NET_SHARE = 0.5


class WindowMismatch(Exception):
    """The listing did not hold what the sweep state predicts: list the whole account."""


@dataclass(frozen=True, slots=True)
class SweepState:
    """What the last cycle learned about the listing, kept in Redis between cycles."""

    epoch: str  # the epoch it belongs to: a new baseline forgets it
    order: str  # NEWEST_FIRST or OLDEST_FIRST
    total: int  # the listing's total at the end of the last cycle
    newest: int  # created_at (unix ms) of the newest request listed so far
    edge: frozenset[str]  # the ids created at `newest`
    cursor: int = 0  # the offset the safety net reads next
    credit: float = 0.0  # safety-net pages owed, earned by the time since the last cycle
    at_ms: int = 0  # when the state was written (unix ms): what earns the credit

    def fields(self) -> dict[str, str]:
        """The state as the fields of a Redis hash."""
        return {
            "epoch": self.epoch,
            "order": self.order,
            "total": str(self.total),
            "newest": str(self.newest),
            "edge": " ".join(sorted(self.edge)),
            "cursor": str(self.cursor),
            "credit": repr(self.credit),
            "at_ms": str(self.at_ms),
        }

    @classmethod
    def parse(cls, fields: Mapping[str, str], epoch: str) -> SweepState | None:
        """The stored state, or None if there is none usable for this epoch."""
        try:
            state = cls(
                epoch=fields["epoch"],
                order=fields["order"],
                total=int(fields["total"]),
                newest=int(fields["newest"]),
                edge=frozenset(fields["edge"].split()),
                cursor=int(fields["cursor"]),
                credit=float(fields["credit"]),
                at_ms=int(fields["at_ms"]),
            )
        except (KeyError, ValueError):
            return None
        usable = state.epoch == epoch and state.order in (NEWEST_FIRST, OLDEST_FIRST)
        return state if usable and math.isfinite(state.credit) else None


@dataclass(slots=True)
class Observed:
    """What a whole listing showed, page by page: its order and its newest requests. Only
    each page's ends are kept, so this costs little whatever the account's size."""

    # offset -> created_at of its first and last request, and where the page ends
    ends: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    descending: bool = True  # every page read so far is newest-first inside
    ascending: bool = True  # every page read so far is oldest-first inside
    newest: int = -1  # created_at (unix ms) of the newest request seen
    edge: set[str] = field(default_factory=set)  # the ids created at `newest`

    def add(self, response: ListResponse) -> None:
        """Note the requests of one list response."""
        requests = response.requests
        if not requests:
            return
        stamps = [request.created_ms for request in requests]
        self.descending = self.descending and all(a >= b for a, b in itertools.pairwise(stamps))
        self.ascending = self.ascending and all(a <= b for a, b in itertools.pairwise(stamps))
        self.ends[response.offset] = (stamps[0], stamps[-1], response.offset + response.returned)
        top = max(stamps)
        if top > self.newest:
            self.newest, self.edge = top, set()
        if top == self.newest:
            self.edge.update(
                r.id for r, stamp in zip(requests, stamps, strict=True) if stamp == top
            )

    def order(self) -> str | None:
        """The order the pages show, read by offset; None unless it is one of the two."""
        # Adjacent pages only: a page read again from elsewhere may overlap another.
        pairs = [
            (earlier_last, later_first)
            for (_, (_, earlier_last, end)), (offset, (later_first, _, _)) in itertools.pairwise(
                sorted(self.ends.items())
            )
            if offset >= end
        ]
        if self.descending and all(last >= first for last, first in pairs):
            return NEWEST_FIRST
        if self.ascending and all(last <= first for last, first in pairs):
            return OLDEST_FIRST
        return None


def learn(observed: Observed, epoch: str, total: int, now_ms: int) -> SweepState | None:
    """The state after a whole listing of `total` requests (its malformed items are not in
    `observed`), or None if it showed no usable order: then every cycle lists everything."""
    order = observed.order()
    if order is None or observed.newest < 0:
        return None
    return SweepState(epoch, order, total, observed.newest, frozenset(observed.edge), at_ms=now_ms)


@dataclass(slots=True)
class Steady:
    """What a steady cycle read before the safety net: the head and the located pages."""

    total: int  # the listing's total as the head saw it
    newest: int  # created_at (unix ms) of the newest request listed now
    edge: frozenset[str]  # the ids created at `newest`
    gone: list[str]  # unfinished requests whose place a page covered without them
    located: int  # unfinished requests found outside the head
    head_pages: int
    listed: set[str] = field(default_factory=set)  # every request read


# What `read_steady` hands each batch of pages it read to, as it reads them.
Apply = Callable[[list[ListResponse]], Awaitable[None]]


async def read_steady(
    api: ApiClient, state: SweepState, unfinished: Mapping[str, Unfinished], apply: Apply
) -> Steady:
    """Read the head and the pages of every known unfinished request, handing them to
    `apply` as they come (so no more than a batch is held at once); `WindowMismatch` if
    the listing does not hold them where its order says (an `ApiError` if a call fails)."""
    listing = api.listing()
    if state.order == NEWEST_FIRST:
        head = await _head_of_newest_first(api, listing, state)
    else:
        head = await _head_of_oldest_first(api, listing, state)
    total = head[0].total
    head = await _reread_ties(listing, state, head, total)
    check_order(head, state.order)
    await apply(head)
    newest, edge = _newest(head, state)
    steady = Steady(total, newest, edge, [], 0, len(head))
    steady.listed.update(request.id for response in head for request in response.requests)
    lost = {rid: entry for rid, entry in unfinished.items() if rid not in steady.listed}
    steady.gone = await _locate(listing, state, lost, steady, apply)
    steady.located = len(lost) - len(steady.gone)
    return steady


def _newest(responses: list[ListResponse], state: SweepState) -> tuple[int, frozenset[str]]:
    """The newest created_at among `responses` and what the state knew, and its ids."""
    newest, edge = state.newest, set(state.edge)
    for response in responses:
        for request in response.requests:
            created = request.created_ms
            if created > newest:
                newest, edge = created, {request.id}
            elif created == newest:
                edge.add(request.id)
    return newest, frozenset(edge)


def check_order(responses: Iterable[ListResponse], order: str) -> None:
    """`WindowMismatch` unless every page is sorted by created_at as the sweep learned."""
    for response in responses:
        stamps = [request.created_ms for request in response.requests]
        pairs = itertools.pairwise(stamps if order == NEWEST_FIRST else stamps[::-1])
        if any(newer < older for newer, older in pairs):
            raise WindowMismatch(f"the page at offset {response.offset} is not {order}")


async def _head_of_newest_first(
    api: ApiClient, listing: Listing, state: SweepState
) -> list[ListResponse]:
    """The first pages, up to the first request older than the newest one seen before."""
    first = await api.fetch_page(0, api.page_size)
    responses = [first]
    # What was created since the last cycle, in pages: read at once, then page by page.
    grown = max(0, first.total - state.total) + len(state.edge)
    more = range(first.returned, min(grown, first.total), api.page_size)
    responses += await listing.fetch(more) if first.returned else []
    while not _reaches_older(responses, state.newest):
        end = max(response.offset + response.returned for response in responses)
        if not responses[-1].returned or end >= first.total:
            break
        responses.append(await api.fetch_page(end, api.page_size))
    return responses


async def _head_of_oldest_first(
    api: ApiClient, listing: Listing, state: SweepState
) -> list[ListResponse]:
    """The last pages, from the first request older than the newest one seen before."""
    start = max(0, state.total - len(state.edge) - _margin(api.page_size))
    first = await api.fetch_page(start, api.page_size)
    # Deletions move the tail forward: start earlier until the first page begins with a
    # request the last cycle had seen whole.
    for attempt in range(LOCATE_ROUNDS + 1):
        if start == 0 or (first.requests and first.requests[0].created_ms < state.newest):
            break
        if attempt == LOCATE_ROUNDS:
            raise WindowMismatch("the end of the oldest-first listing moved further than expected")
        start = max(0, start - api.page_size)
        first = await api.fetch_page(start, api.page_size)
    rest = range(start + first.returned, first.total, api.page_size) if first.returned else ()
    return [first, *await listing.fetch(rest)]


def _reaches_older(responses: list[ListResponse], newest: int) -> bool:
    """Whether the pages read hold a request created before `newest` (past the head of a
    newest-first listing)."""
    return any(request.created_ms < newest for r in responses for request in r.requests)


async def _reread_ties(
    listing: Listing, state: SweepState, head: list[ListResponse], total: int
) -> list[ListResponse]:
    """Read again the head's pages that share a run of equal created_at while requests
    the total says were created are missing (an order without a tie-breaker)."""
    expected = max(0, total - state.total)
    fruitless = 0
    for _ in range(TIE_ROUNDS):
        found = _new_in(head, state)
        tied = _tied_pages(head)
        if found >= expected or not tied or fruitless == FRUITLESS_ROUNDS:
            break
        head += await listing.fetch(tied)
        fruitless = fruitless + 1 if _new_in(head, state) == found else 0
    return head


def _new_in(responses: Iterable[ListResponse], state: SweepState) -> int:
    """How many distinct requests of `responses` were created since the last cycle."""
    return len(
        {
            request.id
            for response in responses
            for request in response.requests
            if request.created_ms > state.newest
            or (request.created_ms == state.newest and request.id not in state.edge)
        }
    )


def _tied_pages(responses: list[ListResponse]) -> list[int]:
    """Offsets of the pages that hold a created_at some other page also holds."""
    pages_of: dict[int, set[int]] = defaultdict(set)
    for response in responses:
        for request in response.requests:
            pages_of[request.created_ms].add(response.offset)
    return sorted({offset for pages in pages_of.values() if len(pages) > 1 for offset in pages})


async def _locate(
    listing: Listing,
    state: SweepState,
    lost: dict[str, Unfinished],
    steady: Steady,
    apply: Apply,
) -> list[str]:
    """Read the pages of the unfinished requests in `lost`, a batch at a time into
    `apply`, until each is found or shown gone; the gone ones. `WindowMismatch` for any
    still lost after LOCATE_ROUNDS rounds."""
    page, total = listing.client.page_size, steady.total
    # Newest-first, what was created since moved every older request back by as much.
    shift = total - state.total if state.order == NEWEST_FIRST else 0
    probes = {
        rid: [min(max(0, (entry.offset or 0) + shift), max(0, total - 1))]
        for rid, entry in lost.items()
    }
    gone: list[str] = []
    for _ in range(LOCATE_ROUNDS):
        probes = {rid: offsets for rid, offsets in probes.items() if rid not in steady.listed}
        if not probes:
            return gone
        starts = _pages_for(sorted({o for offsets in probes.values() for o in offsets}), page)
        probed = _probed_by(probes, starts, page)
        for first in range(0, len(starts), LOCATE_BATCH):
            batch = starts[first : first + LOCATE_BATCH]
            fetched = await listing.fetch(batch)
            check_order(fetched, state.order)
            await apply(fetched)
            steady.listed.update(r.id for response in fetched for r in response.requests)
            for rid in dict.fromkeys(rid for start in batch for rid in probed[start]):
                if rid in steady.listed or rid not in probes:
                    continue
                place = _place(lost[rid].created_ms, fetched, state.order, total, page)
                if place is None:
                    gone.append(rid)
                    probes.pop(rid)
                else:
                    probes[rid] = place
    probes = {rid: offsets for rid, offsets in probes.items() if rid not in steady.listed}
    if probes:
        raise WindowMismatch(
            f"{len(probes)} unfinished requests were not found where the listing should "
            f"hold them within {LOCATE_ROUNDS} rounds"
        )
    return gone


def _probed_by(probes: dict[str, list[int]], starts: list[int], page: int) -> dict[int, list[str]]:
    """For each page start (ascending, from `_pages_for`), the requests it was read for."""
    probed: dict[int, list[str]] = {start: [] for start in starts}
    for rid, offsets in probes.items():
        for offset in offsets:
            start = starts[max(0, bisect.bisect_right(starts, offset) - 1)]
            probed[start].append(rid)
    return probed


def _pages_for(probes: list[int], page: int) -> list[int]:
    """The offsets of pages that cover each probe (ascending) with a margin either side."""
    margin = _margin(page)
    starts: list[int] = []
    for probe in probes:
        if starts and probe < starts[-1] + page - margin:
            continue
        starts.append(max(0, probe - margin))
    return starts


def _margin(page: int) -> int:
    """Items a page is read ahead of where a request is expected: room for drift."""
    return page // 10


def _place(
    created: int, fetched: list[ListResponse], order: str, total: int, page: int
) -> list[int] | None:
    """Where to look next for a request created at `created` that `fetched` lacks (the
    offsets it may be at); None when one page covers its place whole (a request before it
    and one after it, or the listing's ends) without it: the request is gone."""
    after, before = 0, total  # its place lies in [after, before)
    edges: list[int] = []  # pages its created_at runs past: look across their edges
    for response in fetched:
        sign = -1 if order == OLDEST_FIRST else 1  # compare as if newest-first
        stamps = [sign * request.created_ms for request in response.requests]
        mark, end = sign * created, response.offset + response.returned
        if not stamps:
            before = min(before, response.offset)  # the listing ends before this page
        elif stamps[-1] > mark:  # everything here comes before it
            if end >= response.total:
                return None  # and the listing ends here
            after = max(after, end)
        elif stamps[0] < mark:  # everything here comes after it
            if response.offset == 0:
                return None  # and the listing starts here
            before = min(before, response.offset)
        else:
            opens = response.offset > 0 and stamps[0] == mark
            closes = end < response.total and stamps[-1] == mark
            if not opens and not closes:
                return None
            edges += [response.offset - page + 2 * _margin(page)] if opens else []
            edges += [end] if closes else []
    if after >= before:
        raise WindowMismatch("the listing is not in the order the sweep learned")
    return [offset for offset in edges if after <= offset < before] or [after]


@dataclass(frozen=True, slots=True)
class NetSlice:
    """The safety-net pages one cycle reads, and the state they leave."""

    offsets: list[int]
    cursor: int
    credit: float


def net_slice(
    state: SweepState,
    total: int,
    page: int,
    *,
    now_ms: int,
    period_s: float,
    most: int,
) -> NetSlice:
    """The next safety-net pages: a whole pass over the listing earned over `period_s`
    seconds, at most `most` now (the rest stays owed)."""
    pages = max(1, math.ceil(total / page))
    earned = pages * max(0, now_ms - state.at_ms) / 1000 / period_s
    credit = min(state.credit + earned, float(pages))  # never more than a pass owed
    count = max(0, min(int(credit), most))
    cursor = state.cursor if state.cursor < total else 0
    offsets = []
    for _ in range(count):
        offsets.append(cursor)
        cursor = cursor + page if cursor + page < total else 0
    return NetSlice(offsets, cursor, credit - count)


def net_budget(rate: float, interval: float, spent: int) -> int:
    """How many pages the safety net may read this cycle: its share of what the API's
    rate allows over one poll interval, less the calls the cycle made already."""
    return max(0, math.floor(rate * interval * NET_SHARE) - spent)


def advance(state: SweepState, steady: Steady, net: NetSlice, now_ms: int) -> SweepState:
    """The state after a steady cycle that read `steady` and the safety-net `net`."""
    return SweepState(
        state.epoch,
        state.order,
        steady.total,
        steady.newest,
        steady.edge,
        net.cursor,
        net.credit,
        now_ms,
    )


def pages_of(responses: Iterable[ListResponse]) -> list[Page]:
    """The responses as pages to apply, each request once (the first read of it)."""
    seen: set[str] = set()
    pages = []
    for response in responses:
        requests, positions = [], []
        for request, position in zip(response.requests, response.positions, strict=True):
            if request.id not in seen:
                seen.add(request.id)
                requests.append(request)
                positions.append(position)
        if requests:
            pages.append(Page(response.offset, requests, positions))
    return pages
