"""Typed client of `GET {api_url}/v1/lipsync/requests`: complete listings and typed errors.

A listing is complete only when the distinct ids it saw reach the largest `total` any of
its pages reported; requests created while paging shift offsets, so the shifted range is
fetched again. Errors are typed so the poller, not this module, decides how long to wait.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from notifier import USER_AGENT
from notifier.backoff import parse_retry_after
from notifier.bodies import read_at_most
from notifier.config import Settings, env_name
from notifier.logs import about
from notifier.metrics import Metrics
from notifier.models import TIMESTAMP_FIELDS, LipsyncRequest
from notifier.outages import reason
from notifier.redact import REDACTED
from notifier.throttle import Throttle

log = logging.getLogger(__name__)

LIST_PATH = "/v1/lipsync/requests"
CONNECT_TIMEOUT = 10.0  # seconds; an unreachable API fails fast even with a long total timeout
MAX_REFETCH_ROUNDS = 12  # re-fetch rounds before giving up
# What a re-fetch round reads (see Listing._next_round).
SHIFTED, TIED, WHOLE = "head and tail", "pages inside runs of equal created_at", "everything"
FRUITLESS_TIE_ROUNDS = 2
EXCERPT = 200  # characters of an unexpected body quoted in an error
# Timestamps outside these bounds mark an item as malformed: before 1970 breaks unix
# arithmetic, and a far-future created_at seen by the baseline would silence every later
# request. The one comparison with the local clock allows for skew.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
FUTURE_SLACK = timedelta(hours=24)
# Skipped items warned about once per process (the same item is listed every cycle);
# the memory of them is forgotten when it reaches this size.
WARNED_ITEMS = 10_000


class ApiError(Exception):
    """A call to the Chamelaion API failed; the subclass says whether waiting helps."""

    outcome = "failed"  # the label of the call in the notifier_api_calls metric


class AuthError(ApiError):
    """401/403: the API rejected the key. `message` is the API's own words ("invalid token")."""

    outcome = "unauthorized"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the Chamelaion API rejected the API key (HTTP {status}: {message})")
        self.status = status
        self.message = message


class RateLimited(ApiError):
    """429: wait `retry_after` seconds (None: the API gave no usable Retry-After)."""

    outcome = "rate_limited"

    def __init__(self, retry_after: float | None) -> None:
        advice = f"retry after {retry_after:g} s" if retry_after is not None else "back off"
        super().__init__(f"the Chamelaion API is rate limiting (HTTP 429); {advice}")
        self.retry_after = retry_after


class TransientApiError(ApiError):
    """5xx, timeout, connection error or an unreadable body: back off and retry the cycle."""

    def __init__(self, message: str, outcome: str = "server_error") -> None:
        super().__init__(message)
        self.outcome = outcome


class ResponseTooLarge(TransientApiError):
    """A list response over `api_max_bytes`: read again with a smaller `limit`."""

    def __init__(self, offset: int, limit: int, max_bytes: int) -> None:
        super().__init__(
            f"the Chamelaion API's list response at offset {offset} with limit {limit} is "
            f"larger than {max_bytes} bytes ({env_name('api_max_bytes')})",
            "too_large",
        )


class ListingKeptChanging(TransientApiError):
    """Requests appeared or vanished faster than the listing could catch up with them."""


class UnexpectedResponse(ApiError):
    """A 3xx or another 4xx: the API URL or a parameter is wrong, and retrying will not help."""

    outcome = "unexpected_status"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(
            f"the Chamelaion API answered HTTP {status} ({message}); check "
            f"{env_name('api_url')} and {env_name('reference_id')} (redirects are not followed)"
        )
        self.status = status


class _Pagination(BaseModel):
    model_config = ConfigDict(extra="ignore")
    total: int = Field(ge=0)


class _Page(BaseModel):
    """A list response whose items all validate: the fast path."""

    model_config = ConfigDict(extra="ignore")
    data: list[LipsyncRequest]
    pagination: _Pagination


class _LoosePage(BaseModel):
    """A list response of the right shape whose items are checked one by one."""

    model_config = ConfigDict(extra="ignore")
    data: list[Any]
    pagination: _Pagination


@dataclass(frozen=True, slots=True)
class Skipped:
    """A malformed item of a list response, left out: where it was and why."""

    index: int  # its position among the response's items
    key: str  # its id, or "#<offset + index>" if it had none
    reason: str  # the field and what is wrong with it

    @property
    def request_id(self) -> str | None:
        """The item's id, if it had a usable one."""
        return None if self.key.startswith("#") else self.key


@dataclass(frozen=True, slots=True)
class ListResponse:
    """One list response: its valid requests, its skipped items, the total, and the limit
    it was asked with."""

    offset: int
    requests: list[LipsyncRequest]
    skipped: list[Skipped]
    total: int
    limit: int
    size: int = 0  # bytes of the body

    @property
    def malformed(self) -> list[str]:
        """The keys of the skipped items."""
        return [item.key for item in self.skipped]

    @property
    def returned(self) -> int:
        """Items in the response, skipped ones included: the next offset advances by this."""
        return len(self.requests) + len(self.skipped)

    @property
    def positions(self) -> list[int]:
        """Where each request stands in the listing (its offset), skipped items aside."""
        if not self.skipped:
            return list(range(self.offset, self.offset + len(self.requests)))
        taken = {item.index for item in self.skipped}
        return [self.offset + i for i in range(self.returned) if i not in taken]


@dataclass(frozen=True, slots=True)
class Page:
    """Requests of one list response that no earlier page of the same listing held, and
    where each stands in the listing."""

    offset: int
    requests: list[LipsyncRequest]
    positions: list[int]


class ApiClient:
    """One keep-alive HTTP session to the API for the whole process.

    Use as `async with ApiClient(settings) as api:`; the key is sent as `x-api-key` and
    is kept out of every log line, repr and error message.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """A client for the configured account; `ConfigError` if no API key is set."""
        api_key: SecretStr = settings.require("api_key", "the notifier calls the Chamelaion API")
        self.url = settings.api_url + LIST_PATH  # api_url has no trailing slash
        self.page_size = settings.page_size
        self.concurrency = settings.list_concurrency
        self.timeout = settings.api_timeout
        self.max_bytes = settings.api_max_bytes
        self.reference_id = settings.reference_id
        self._clock = clock
        self._warned: set[tuple[str, str]] = set()
        # The largest limit whose responses fit in max_bytes lately: after a page of large
        # items, later calls start there instead of reading too much again each time.
        self._fitting = self.page_size
        self._api_key = api_key
        self._session: aiohttp.ClientSession | None = None
        self.metrics = metrics or Metrics()
        self.throttle = Throttle(settings.api_rate_limit)

    async def __aenter__(self) -> ApiClient:
        self._session = aiohttp.ClientSession(
            headers={
                "x-api-key": self._api_key.get_secret_value(),
                "user-agent": USER_AGENT,
                "accept": "application/json",
            },
            timeout=aiohttp.ClientTimeout(
                total=self.timeout, connect=min(self.timeout, CONNECT_TIMEOUT)
            ),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def listing(self, observe: Callable[[ListResponse], None] | None = None) -> Listing:
        """A new complete listing of the account: `async for page in api.listing()`;
        `observe` sees every list response as it arrives."""
        return Listing(self, observe)

    async def check_key(self) -> ApiError | None:
        """One call with limit=1: raises `AuthError` if the API rejects the key, returns
        any other failure (poll cycles retry those), None if the call worked."""
        try:
            await self.fetch_page(0, 1)
        except AuthError:
            raise
        except ApiError as exc:
            return exc
        return None

    async def fetch_page(self, offset: int, limit: int) -> ListResponse:
        """The page at `offset`, within the rate limit: asked with `limit`, and again with
        half of it while the response is over `api_max_bytes` (down to 1, so large but real
        items still get through); raises an `ApiError` subclass for anything but a usable
        page."""
        limit = min(limit, self._fitting)
        while True:
            try:
                response = await self._call(offset, limit)
            except ResponseTooLarge as exc:
                if limit == 1:
                    raise
                log.info("%s; reading it again with limit %d", exc, max(1, limit // 2))
                limit = self._fitting = max(1, limit // 2)
                continue
            if limit == self._fitting and response.size * 4 < self.max_bytes:
                # Large items pass: try twice as many again, up to the page size.
                self._fitting = min(2 * limit, self.page_size)
            self._report(response)
            return response

    async def _call(self, offset: int, limit: int) -> ListResponse:
        """One list call, counted in the metrics by outcome."""
        await self.throttle.take()
        try:
            response = await self._get(offset, limit)
        except ApiError as exc:
            self.metrics.api_calls.labels(exc.outcome).inc()
            if isinstance(exc, RateLimited):
                self.throttle.slowed()
            raise
        self.metrics.api_calls.labels("ok").inc()
        self.throttle.succeeded()
        return response

    async def _get(self, offset: int, limit: int) -> ListResponse:
        if self._session is None:
            raise RuntimeError("use the ApiClient inside `async with`")
        params = {"limit": str(limit), "offset": str(offset)}
        if self.reference_id is not None:
            params["reference_id"] = self.reference_id
        try:
            async with self._session.get(self.url, params=params, allow_redirects=False) as answer:
                # Never more than max_bytes in memory, whatever the headers claim.
                body = await read_at_most(answer.content, self.max_bytes + 1)
        except TimeoutError:
            raise TransientApiError(
                f"the Chamelaion API did not answer within {self.timeout:g} s "
                f"({env_name('api_timeout')}) at offset {offset}",
                "timeout",
            ) from None
        except aiohttp.ClientError as exc:
            # `from None`: aiohttp's exceptions hold the request, and so the key.
            raise TransientApiError(
                f"could not reach the Chamelaion API ({reason(exc)})", "unreachable"
            ) from None
        if key := self._api_key.get_secret_value():
            # Blank the key in case the API echoes it: error messages quote the body.
            body = body.replace(key.encode(), REDACTED.encode())
        if len(body) > self.max_bytes:
            raise ResponseTooLarge(offset, limit, self.max_bytes)
        latest = datetime.fromtimestamp(self._clock(), UTC) + FUTURE_SLACK
        return _read_answer(
            answer.status, answer.headers, body, offset=offset, limit=limit, latest=latest
        )

    def _report(self, response: ListResponse) -> None:
        """Count the skipped items of a response, and warn about each once per process."""
        if not response.skipped:
            return
        self.metrics.malformed_items.inc(len(response.skipped))
        for item in response.skipped:
            if (item.key, item.reason) in self._warned:
                continue
            if len(self._warned) >= WARNED_ITEMS:
                self._warned.clear()
            self._warned.add((item.key, item.reason))
            log.warning(
                "skipped item %d of the list response at offset %d (%s): %s",
                item.index,
                response.offset,
                f"request {item.key}" if item.request_id else "no usable id",
                item.reason,
                extra=about(request_id=item.request_id),
            )


class Listing:
    """One complete listing, fetched page by page: `async for page in listing`.

    Page 1 gives the total; the remaining pages are fetched `concurrency` at a time and
    yielded as they arrive, each holding only requests not seen before in this listing.
    The iteration ends when the listing is complete, or raises an `ApiError`.
    """

    def __init__(
        self, client: ApiClient, observe: Callable[[ListResponse], None] | None = None
    ) -> None:
        self.client = client
        self._observe = observe
        self.seen: set[str] = set()
        self.malformed: set[str] = set()
        self.total = 0  # the largest total any page reported
        self._step = client.page_size  # items the server really returns per page
        self._covered_end = 0  # the largest offset + items returned of any non-empty page
        # offset -> (first created_at, last created_at in unix ms, items returned)
        self._page_ends: dict[int, tuple[int, int, int]] = {}
        self._fruitless_ties = 0  # rounds of tied pages in a row that found nothing new

    @property
    def distinct(self) -> int:
        """Distinct requests seen so far, skipped malformed ones included."""
        return len(self.seen) + len(self.malformed - self.seen)

    @property
    def complete(self) -> bool:
        """Whether the distinct requests seen reach the largest total any page reported."""
        return self.distinct >= self.total

    def __aiter__(self) -> AsyncIterator[Page]:
        return self._pages()

    async def _pages(self) -> AsyncIterator[Page]:
        first = await self._fetch(0, self.client.page_size)
        if 0 < first.returned < min(first.total, first.limit):
            self._step = first.returned  # the server caps `limit`
        offsets: Iterable[int] = range(first.returned, first.total, self._step)
        stage = WHOLE  # the first round lists everything
        for round_ in range(MAX_REFETCH_ROUNDS + 1):
            before = self.distinct
            reachable = self._reachable(offsets)
            async for response in self._fetch_all(reachable, first if round_ == 0 else None):
                if page := self._accept(response):
                    yield page
            if self.complete:
                return
            stage, offsets = self._next_round(stage, found_more=self.distinct > before)
        raise ListingKeptChanging(
            f"the listing kept changing through {MAX_REFETCH_ROUNDS} rounds of re-fetching: "
            f"{self.distinct} distinct requests seen, but a page reported {self.total}; "
            "requests are changing faster than they can be listed"
        )

    def _reachable(self, offsets: Iterable[int]) -> Iterator[int]:
        """Ascending `offsets` while they lie below the total and at most `concurrency` + 1
        pages past the furthest page that held anything. A total is a claim, not a size:
        10^12 must not become 10^10 offsets in memory or calls, only an inconsistent
        listing."""
        ahead = (self.client.concurrency + 1) * self._step
        return itertools.takewhile(
            lambda offset: offset < self.total and offset <= self._covered_end + ahead, offsets
        )

    def _next_round(self, stage: str, found_more: bool) -> tuple[str, Iterable[int]]:
        """What the next re-fetch round reads, and its offsets, ascending. Creations shift
        a listing at its head and its tail: those first. Then, in an order without a
        tie-breaker, requests with equal created_at trade places between two reads: the
        pages that meet inside such a run, while that finds more (after
        FRUITLESS_TIE_ROUNDS in a row that found nothing, the order is taken to be stable).
        Then a gap elsewhere: the whole range."""
        step = self._step
        if stage == TIED:
            self._fruitless_ties = 0 if found_more else self._fruitless_ties + 1
        if stage == WHOLE:
            missing = self.total - self.distinct
            head = range(0, missing, step)
            tail = range(max(0, self._covered_end - missing), self.total, step)
            return SHIFTED, _ascending_once(head, tail)
        if self._fruitless_ties < FRUITLESS_TIE_ROUNDS and (tied := self._tied_offsets()):
            return TIED, sorted(tied)
        return WHOLE, range(0, self.total, step)

    def _tied_offsets(self) -> set[int]:
        """Offsets of adjacent pages that meet inside a run of equal created_at."""
        tied: set[int] = set()
        for offset, (_, last, returned) in self._page_ends.items():
            following = self._page_ends.get(offset + returned)
            if following is not None and following[0] == last:
                tied.update((offset, offset + returned))
        return tied

    async def fetch(self, offsets: Iterable[int]) -> list[ListResponse]:
        """The responses at these offsets (and after any short page among them), fetched
        `concurrency` at a time, outside the complete-listing logic."""
        return [response async for response in self._fetch_all(offsets)]

    async def _fetch_all(
        self, offsets: Iterable[int], ready: ListResponse | None = None
    ) -> AsyncIterator[ListResponse]:
        """Fetch every offset, `concurrency` at a time, yielding responses as they arrive.

        Offsets are taken from the iterable only as fetches start. A page that returns
        fewer items than the step it stands for (the server caps `limit`, or the body was
        too large and the page was read again smaller) is continued where it stopped, for
        the rest of its step. A `ready` response is yielded once the first fetches are
        under way, so the consumer handles it while the next pages are in flight.
        """
        main = iter(offsets)
        rest: deque[tuple[int, int, int]] = deque()  # (offset, items still due, limit)
        running: dict[asyncio.Task[ListResponse], int] = {}  # task -> items it stands for
        try:
            while True:
                while len(running) < self.client.concurrency:
                    if rest:
                        offset, due, limit = rest.popleft()
                    elif (offset := next(main, None)) is not None:
                        due, limit = self._step, self.client.page_size
                    else:
                        break
                    running[asyncio.ensure_future(self._fetch(offset, limit))] = due
                if ready is not None:
                    yield ready
                    ready = None
                    continue
                if not running:
                    return
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=_exception_first):
                    due = running.pop(task)
                    response = task.result()
                    end, left = response.offset + response.returned, due - response.returned
                    if response.returned and left > 0 and end < response.total:
                        rest.append((end, left, min(response.limit, self.client.page_size)))
                    yield response
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _fetch(self, offset: int, limit: int) -> ListResponse:
        response = await self.client.fetch_page(offset, limit)
        self.total = max(self.total, response.total)
        if response.returned:  # an empty page shows where the listing ends, not how far
            self._covered_end = max(self._covered_end, response.offset + response.returned)
        if response.requests:
            first, last = response.requests[0], response.requests[-1]
            self._page_ends[offset] = (first.created_ms, last.created_ms, response.returned)
        return response

    def _accept(self, response: ListResponse) -> Page | None:
        if self._observe is not None:
            self._observe(response)
        fresh: dict[str, tuple[LipsyncRequest, int]] = {}
        for request, position in zip(response.requests, response.positions, strict=True):
            if request.id not in self.seen:
                fresh.setdefault(request.id, (request, position))  # a page may repeat an id
        self.seen.update(fresh)
        self.malformed.update(response.malformed)
        if not fresh:
            return None
        requests, positions = zip(*fresh.values(), strict=True)
        return Page(response.offset, list(requests), list(positions))


def _ascending_once(*ranges: range) -> Iterator[int]:
    """The values of ascending ranges, merged in ascending order without repeats, lazily."""
    last = None
    for value in heapq.merge(*ranges):
        if value != last:
            last = value
            yield value


def _exception_first(task: asyncio.Task[ListResponse]) -> bool:
    # A failed fetch is raised before other results are yielded, so every exception of
    # the batch is retrieved and none is reported as "never retrieved".
    return task.exception() is None


def _read_answer(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    offset: int,
    limit: int,
    latest: datetime,
) -> ListResponse:
    """The list response of an answer, or the `ApiError` it amounts to; items with a
    timestamp before 1970 or after `latest` are skipped like malformed ones."""
    if status in (401, 403):
        raise AuthError(status, _api_message(body))
    if status == 429:
        raise RateLimited(parse_retry_after(headers.get("Retry-After")))
    if status >= 500:
        raise TransientApiError(f"the Chamelaion API failed (HTTP {status}: {_api_message(body)})")
    if not 200 <= status < 300:
        raise UnexpectedResponse(status, _api_message(body))
    try:
        page = _Page.model_validate_json(body)
    except ValidationError:
        requests, skipped, total = _salvage(body, offset, headers.get("Content-Type"))
    else:
        requests, skipped, total = page.data, [], page.pagination.total
    if not _plausible(requests, latest):
        requests, skipped = _screen(requests, skipped, latest)
    return ListResponse(offset, requests, skipped, total, limit, len(body))


def _salvage(
    body: bytes, offset: int, content_type: str | None
) -> tuple[list[LipsyncRequest], list[Skipped], int]:
    """The valid items of a page whose other items are malformed, the others skipped."""
    where = f"the Chamelaion API's list response at offset {offset}"
    try:
        # pydantic's parser, not json.loads: it refuses nesting beyond a fixed depth with a
        # ValueError, where json.loads recurses until RecursionError.
        document = pydantic_core.from_json(body)
    except ValueError as exc:
        raise TransientApiError(
            f"{where} is not JSON ({content_type or 'no content-type'}: {exc}): {_excerpt(body)}",
            "invalid_response",
        ) from None
    try:
        shell = _LoosePage.model_validate(document)
    except ValidationError as exc:
        raise TransientApiError(
            f"{where} has the wrong shape: {_first_error(exc)}", "invalid_response"
        ) from None
    requests, skipped = [], []
    for index, item in enumerate(shell.data):
        try:
            requests.append(LipsyncRequest.model_validate(item))
        except ValidationError as exc:
            request_id = item.get("id") if isinstance(item, dict) else None
            key = request_id if isinstance(request_id, str) and request_id else None
            skipped.append(Skipped(index, key or f"#{offset + index}", _first_error(exc)))
    return requests, skipped, shell.pagination.total


def _screen(
    requests: list[LipsyncRequest], skipped: list[Skipped], latest: datetime
) -> tuple[list[LipsyncRequest], list[Skipped]]:
    """Move the requests with an implausible timestamp to the skipped items."""
    taken = {item.index for item in skipped}
    indices = [i for i in range(len(requests) + len(skipped)) if i not in taken]
    kept, skipped = [], list(skipped)
    for index, request in zip(indices, requests, strict=True):
        if reason := _implausible(request, latest):
            skipped.append(Skipped(index, request.id, reason))
        else:
            kept.append(request)
    return kept, skipped


def _plausible(requests: list[LipsyncRequest], latest: datetime) -> bool:
    """Whether every timestamp of `requests` lies between 1970 and `latest` (the fast check
    of a whole page; `_implausible` says which one does not)."""
    for request in requests:
        for value in (request.created_at, request.started_at, request.finished_at):
            if value is not None and not EARLIEST <= value <= latest:
                return False
    return True


def _implausible(request: LipsyncRequest, latest: datetime) -> str | None:
    """Why a timestamp of `request` cannot be true (before 1970, after `latest`), if one is."""
    for name in TIMESTAMP_FIELDS:
        value: datetime | None = getattr(request, name)
        if value is None:
            continue
        if value < EARLIEST:
            return f"field {name!r}: {value.isoformat()} is before 1970"
        if value > latest:
            return f"field {name!r}: {value.isoformat()} is more than 24 h ahead of this clock"
    return None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"field {where!r}: {error['msg']}" if where else error["msg"]


def _api_message(body: bytes) -> str:
    """The API's own error message (`{"error": "invalid token"}`), or an excerpt of the body."""
    try:
        message = pydantic_core.from_json(body).get("error")
    except (ValueError, AttributeError):
        message = None
    return message if isinstance(message, str) and message else _excerpt(body)


def _excerpt(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", "replace").split())
    return (text[:EXCERPT] + "…" if len(text) > EXCERPT else text) or "empty body"
