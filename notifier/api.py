"""Typed client of `GET {api_url}/v1/lipsync/requests`: complete listings and typed errors.

A listing is complete only when the distinct ids it saw reach the largest `total` any of
its pages reported; requests created while paging shift offsets, so the shifted range is
fetched again. Errors are typed so the poller, not this module, decides how long to wait.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from notifier import USER_AGENT
from notifier.backoff import parse_retry_after
from notifier.config import Settings, env_name
from notifier.logs import about
from notifier.metrics import Metrics
from notifier.models import LipsyncRequest
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


class ListingNotSettled(TransientApiError):
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
class ListResponse:
    """One list response: its valid requests, the keys of skipped items, and the total."""

    offset: int
    requests: list[LipsyncRequest]
    malformed: list[str]  # the id of each skipped item, or "#<position>" if it had none
    total: int

    @property
    def returned(self) -> int:
        """Items in the response, skipped ones included: the next offset advances by this."""
        return len(self.requests) + len(self.malformed)


@dataclass(frozen=True, slots=True)
class Page:
    """Requests of one list response that no earlier page of the same listing held."""

    offset: int
    requests: list[LipsyncRequest]


class ApiClient:
    """One keep-alive HTTP session to the API for the whole process.

    Use as `async with ApiClient(settings) as api:`; the key is sent as `x-api-key` and
    is kept out of every log line, repr and error message.
    """

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        """A client for the configured account; `ConfigError` if no API key is set."""
        api_key: SecretStr = settings.require("api_key", "the notifier calls the Chamelaion API")
        self.url = settings.api_url + LIST_PATH  # api_url has no trailing slash
        self.page_size = settings.page_size
        self.concurrency = settings.list_concurrency
        self.timeout = settings.api_timeout
        self.reference_id = settings.reference_id
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
        """One list call, within the rate limit; raises an `ApiError` subclass for anything
        but a usable page."""
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
                body = await answer.read()
        except TimeoutError:
            raise TransientApiError(
                f"the Chamelaion API did not answer within {self.timeout:g} s "
                f"({env_name('api_timeout')}) at offset {offset}",
                "timeout",
            ) from None
        except aiohttp.ClientError as exc:
            # `from None`: aiohttp's exceptions hold the request, and so the key.
            raise TransientApiError(
                f"could not reach the Chamelaion API: {type(exc).__name__}: {exc}", "unreachable"
            ) from None
        if key := self._api_key.get_secret_value():
            # Blank the key in case the API echoes it: error messages quote the body.
            body = body.replace(key.encode(), REDACTED.encode())
        return _read_answer(answer.status, answer.headers, body, offset)


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
        self._covered_end = 0  # the largest offset + items returned of any page
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
        first = await self._fetch(0)
        if 0 < first.returned < min(first.total, self.client.page_size):
            self._step = first.returned  # the server caps `limit`
        offsets = deque(range(first.returned, first.total, self._step))
        stage = WHOLE  # the first round lists everything
        for round_ in range(MAX_REFETCH_ROUNDS + 1):
            before = self.distinct
            async for response in self._fetch_all(offsets, first if round_ == 0 else None):
                if page := self._accept(response):
                    yield page
            if self.complete:
                return
            stage, offsets = self._next_round(stage, found_more=self.distinct > before)
        raise ListingNotSettled(
            f"the listing did not settle after {MAX_REFETCH_ROUNDS} rounds of re-fetching: "
            f"{self.distinct} distinct requests seen, but a page reported {self.total}; "
            "requests are changing faster than they can be listed"
        )

    def _next_round(self, stage: str, found_more: bool) -> tuple[str, deque[int]]:
        """What the next re-fetch round reads, and its offsets. Creations shift a listing
        at its head and its tail: those first. Then, in an order without a tie-breaker,
        requests with equal created_at trade places between two reads: the pages that meet
        inside such a run, while that finds more (after FRUITLESS_TIE_ROUNDS in a row that
        found nothing, the order is taken to be stable). Then a gap elsewhere: the whole
        range."""
        step = self._step
        if stage == TIED:
            self._fruitless_ties = 0 if found_more else self._fruitless_ties + 1
        if stage == WHOLE:
            missing = self.total - self.distinct
            head = range(0, missing, step)
            tail = range(max(0, self._covered_end - missing), self.total, step)
            return SHIFTED, deque(sorted({*head, *tail}))
        if self._fruitless_ties < FRUITLESS_TIE_ROUNDS and (tied := self._tied_offsets()):
            return TIED, deque(sorted(tied))
        return WHOLE, deque(range(0, self.total, step))

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
        return [response async for response in self._fetch_all(deque(offsets))]

    async def _fetch_all(
        self, offsets: deque[int], ready: ListResponse | None = None
    ) -> AsyncIterator[ListResponse]:
        """Fetch every offset, `concurrency` at a time, yielding responses as they arrive.

        A `ready` response is yielded once the first fetches are under way, so the
        consumer handles it while the next pages are in flight.
        """
        running: set[asyncio.Task[ListResponse]] = set()
        try:
            while offsets or running or ready:
                while offsets and len(running) < self.client.concurrency:
                    running.add(asyncio.ensure_future(self._fetch(offsets.popleft())))
                if ready is not None:
                    yield ready
                    ready = None
                    continue
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=_exception_first):
                    response = task.result()
                    end = response.offset + response.returned
                    if 0 < response.returned < self._step and end < response.total:
                        offsets.append(end)  # a short page: continue where it stopped
                    yield response
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _fetch(self, offset: int) -> ListResponse:
        response = await self.client.fetch_page(offset, self.client.page_size)
        self.total = max(self.total, response.total)
        self._covered_end = max(self._covered_end, response.offset + response.returned)
        if response.requests:
            first, last = response.requests[0], response.requests[-1]
            self._page_ends[offset] = (first.created_ms, last.created_ms, response.returned)
        return response

    def _accept(self, response: ListResponse) -> Page | None:
        if self._observe is not None:
            self._observe(response)
        fresh = [request for request in response.requests if request.id not in self.seen]
        self.seen.update(request.id for request in fresh)
        self.malformed.update(response.malformed)
        if len(fresh) < len(response.requests):  # duplicates within the page itself
            fresh = list({request.id: request for request in fresh}.values())
        return Page(response.offset, fresh) if fresh else None


def _exception_first(task: asyncio.Task[ListResponse]) -> bool:
    # A failed fetch is raised before other results are yielded, so every exception of
    # the batch is retrieved and none is reported as "never retrieved".
    return task.exception() is None


def _read_answer(status: int, headers: Mapping[str, str], body: bytes, offset: int) -> ListResponse:
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
        return _salvage(body, offset, headers.get("Content-Type", "no content-type"))
    return ListResponse(offset, page.data, [], page.pagination.total)


def _salvage(body: bytes, offset: int, content_type: str) -> ListResponse:
    """Keep the valid items of a page whose other items are malformed."""
    where = f"the Chamelaion API's list response at offset {offset}"
    try:
        document = json.loads(body)
    except ValueError:
        raise TransientApiError(
            f"{where} is not JSON ({content_type}): {_excerpt(body)}", "invalid_response"
        ) from None
    try:
        shell = _LoosePage.model_validate(document)
    except ValidationError as exc:
        raise TransientApiError(
            f"{where} has the wrong shape: {_first_error(exc)}", "invalid_response"
        ) from None
    requests, malformed = [], []
    for index, item in enumerate(shell.data):
        try:
            requests.append(LipsyncRequest.model_validate(item))
        except ValidationError as exc:
            request_id = item.get("id") if isinstance(item, dict) else None
            key = request_id if isinstance(request_id, str) and request_id else None
            log.warning(
                "skipped item %d of the list response at offset %d%s: %s",
                index,
                offset,
                f" (request {key})" if key else "",
                _first_error(exc),
                extra=about(request_id=key),
            )
            malformed.append(key or f"#{offset + index}")
    return ListResponse(offset, requests, malformed, shell.pagination.total)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"field {where!r}: {error['msg']}" if where else error["msg"]


def _api_message(body: bytes) -> str:
    """The API's own error message (`{"error": "invalid token"}`), or an excerpt of the body."""
    try:
        message = json.loads(body).get("error")
    except (ValueError, AttributeError):
        message = None
    return message if isinstance(message, str) and message else _excerpt(body)


def _excerpt(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", "replace").split())
    return (text[:EXCERPT] + "…" if len(text) > EXCERPT else text) or "empty body"
