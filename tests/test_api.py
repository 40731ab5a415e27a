"""The API client lists every request exactly once and turns every failure into a typed error.

Everything here talks HTTP to the simulator (or to a server with a canned answer) on
127.0.0.1; the key must never show up in a log line or an exception.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from notifier import USER_AGENT
from notifier.api import (
    MAX_REFETCH_ROUNDS,
    ApiClient,
    ApiError,
    AuthError,
    ListingKeptChanging,
    RateLimited,
    TransientApiError,
    UnexpectedResponse,
)
from notifier.config import ConfigError, load_settings
from notifier.simulator import Fault, FaultKind, Order, Simulator

from samples import AUTH_ERROR_MESSAGES, SIMULATOR_KEY


@pytest.fixture(autouse=True)
def _key_never_logged(caplog: pytest.LogCaptureFixture) -> AsyncIterator[None]:
    """Every test of this module also checks that no log line, at any level, holds the key."""
    caplog.set_level(logging.DEBUG)
    yield
    assert SIMULATOR_KEY not in caplog.text


def assert_key_absent(error: BaseException) -> None:
    """The key is in neither the message, the repr nor the printed traceback of an error."""
    printed = "".join(traceback.format_exception(error))
    for text in (str(error), repr(error), printed):
        assert SIMULATOR_KEY not in text


def client(api_url: str, key: str = SIMULATOR_KEY, **settings: Any) -> ApiClient:
    """A client configured as `notifier` would be, with these settings (by field name)."""
    return ApiClient(load_settings({"api_url": api_url, "api_key": key, **settings}))


async def list_ids(api: ApiClient) -> Counter[str]:
    """Every id the listing yields, counted: a correct listing counts each one once."""
    ids: Counter[str] = Counter()
    async for page in api.listing():
        ids.update(request.id for request in page.requests)
    return ids


async def raised(api_url: str, **options: Any) -> ApiError:
    """The error a listing raises, checked to be free of the key."""
    async with client(api_url, **options) as api:
        with pytest.raises(ApiError) as caught:
            await list_ids(api)
    assert_key_absent(caught.value)
    return caught.value


# Listing.


async def test_the_key_and_the_user_agent_are_sent(simulator: Simulator, api_url: str) -> None:
    simulator.create(3)
    async with client(api_url) as api:
        assert len(await list_ids(api)) == 3
    assert simulator.last_headers["x-api-key"] == SIMULATOR_KEY
    assert simulator.last_headers["User-Agent"] == USER_AGENT


async def test_an_empty_account_is_one_call_and_no_pages(
    simulator: Simulator, api_url: str
) -> None:
    async with client(api_url) as api:
        assert await list_ids(api) == Counter()
    assert simulator.calls == 1


async def test_offsets_follow_the_items_returned_when_the_server_caps_the_limit(
    simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(1000)
    simulator.max_limit = 37
    async with client(api_url, page_size=100) as api:
        ids = await list_ids(api)
    assert set(ids) == set(simulator.requests)
    assert max(ids.values()) == 1
    assert simulator.calls == math.ceil(1000 / 37)


async def test_the_reference_id_filter_is_passed_to_the_api(
    simulator: Simulator, api_url: str
) -> None:
    wanted = simulator.create(3, reference_id="order-12345-japanese-dub")
    simulator.create(5, reference_id="another-batch")
    async with client(api_url, reference_id="order-12345-japanese-dub") as api:
        assert set(await list_ids(api)) == {request.id for request in wanted}


async def test_pages_after_the_first_are_fetched_concurrently_within_the_bound(
    simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(200)
    simulator.delay = 0.05
    async with client(api_url, page_size=10, list_concurrency=3) as api:
        assert len(await list_ids(api)) == 200
    assert simulator.max_in_flight == 3


async def test_pages_are_yielded_as_they_arrive(simulator: Simulator, api_url: str) -> None:
    simulator.backfill(100)
    simulator.delay = 0.02
    calls_at_each_page = []
    async with client(api_url, page_size=10, list_concurrency=2) as api:
        async for _page in api.listing():
            await asyncio.sleep(0.05)  # the consumer handles the page (a Redis call)
            calls_at_each_page.append(simulator.calls)
    # Page 1 alone gives the total; while it is handled, the next two are in flight.
    assert calls_at_each_page[0] == 3
    assert calls_at_each_page[1] < 10  # the second page came before the last was asked for


@pytest.mark.parametrize("order", list(Order))
@pytest.mark.parametrize("concurrency", [1, 4])
async def test_every_id_exactly_once_when_requests_are_created_mid_listing(
    simulator: Simulator, api_url: str, order: Order, concurrency: int
) -> None:
    simulator.backfill(1000)
    simulator.order, simulator.max_limit = order, 40

    def create_some(call: int) -> None:
        if call in (2, 5, 9, 17):
            simulator.create(7)

    simulator.hooks.append(create_some)
    async with client(api_url, page_size=100, list_concurrency=concurrency) as api:
        ids = await list_ids(api)
    assert len(simulator.requests) == 1028
    assert set(ids) == set(simulator.requests)
    assert max(ids.values()) == 1


@settings(max_examples=40, deadline=None)
@given(
    existing=st.integers(0, 250),
    cap=st.integers(1, 60),
    page_size=st.integers(1, 120),
    order=st.sampled_from(Order),
    concurrency=st.integers(1, 5),
    # {call number: requests created just before that call is answered}
    creations=st.dictionaries(st.integers(2, 12), st.integers(1, 15), max_size=3),
    seed=st.integers(0, 2**32),
)
def test_any_listing_yields_every_id_exactly_once(
    *,
    existing: int,
    cap: int,
    page_size: int,
    order: Order,
    concurrency: int,
    creations: dict[int, int],
    seed: int,
) -> None:
    simulator = Simulator(api_key=SIMULATOR_KEY, order=order, max_limit=cap, seed=seed)
    simulator.backfill(existing)
    simulator.hooks.append(lambda call: simulator.create(creations.get(call, 0)))

    async def listing() -> Counter[str]:
        async with (
            simulator.serve() as url,
            client(url, page_size=page_size, list_concurrency=concurrency) as api,
        ):
            return await list_ids(api)

    ids = asyncio.run(listing())
    assert set(ids) == set(simulator.requests)
    assert max(ids.values(), default=1) == 1


async def test_equal_created_at_in_an_unstable_order_still_gives_every_id_once(
    simulator: Simulator, api_url: str
) -> None:
    for second in range(12):  # a batch of 300, submitted 25 a second
        simulator.create(25, created_at=datetime(2026, 3, 30, 11, 0, second, tzinfo=UTC))
    simulator.order, simulator.max_limit = Order.UNSTABLE, 40
    async with client(api_url) as api:
        ids = await list_ids(api)
    assert set(ids) == set(simulator.requests)
    assert max(ids.values()) == 1


async def test_a_run_of_equal_created_at_longer_than_a_page_is_read_again() -> None:
    # 300 requests of one second span 3 of 34 pages, reshuffled in every response: each
    # read finds only some of them. Reading again the pages inside that run finds the
    # rest; whole passes took 138-243 calls, and 2 listings in 30 never came whole.
    calls = []
    for seed in range(10):
        simulator = Simulator(api_key=SIMULATOR_KEY, seed=seed)
        simulator.history(3_000, 0)
        simulator.create(300, created_at=datetime(2026, 3, 30, 11, 0, 0, tzinfo=UTC))
        simulator.order = Order.UNSTABLE
        async with simulator.serve() as api_url, client(api_url, page_size=100) as api:
            ids = await list_ids(api)
        assert set(ids) == set(simulator.requests)
        assert max(ids.values()) == 1
        calls.append(simulator.calls)
    assert statistics.median(calls) <= 80, calls


async def test_a_stable_order_with_ties_is_not_read_again_for_them() -> None:
    # Ten requests a second, so most page boundaries fall inside a second; requests
    # created while listing shift the head, and that is all the re-fetch rounds read.
    simulator = Simulator(api_key=SIMULATOR_KEY, seed=1)
    start = datetime(2026, 3, 30, 11, 0, 0, tzinfo=UTC)
    for second in range(300):
        simulator.create(10, created_at=start + timedelta(seconds=second))
    simulator.hooks.append(lambda call: simulator.create(3) if call in (3, 9, 15) else None)
    async with simulator.serve() as api_url, client(api_url, page_size=100) as api:
        ids = await list_ids(api)
    assert set(ids) == set(simulator.requests)
    assert simulator.calls <= 34  # 31 pages, then the head again


async def test_a_listing_that_keeps_changing_raises_a_typed_error(
    simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(100)
    simulator.hooks.append(lambda _call: simulator.create(3))
    error = await raised(api_url, page_size=10)
    assert isinstance(error, ListingKeptChanging)
    assert isinstance(error, TransientApiError)  # the poller retries the cycle
    assert "kept changing through" in str(error)
    # Bounded: at most one pass over the (growing) listing per round, not a loop.
    assert simulator.calls <= (MAX_REFETCH_ROUNDS + 1) * math.ceil(len(simulator.requests) / 10)


async def test_a_failure_mid_listing_raises_and_leaves_no_fetch_running(
    simulator: Simulator, api_url: str
) -> None:
    simulator.backfill(200)
    simulator.delay = 0.02
    simulator.hooks.append(
        lambda call: simulator.inject(Fault(FaultKind.SERVER_ERROR)) if call == 3 else None
    )
    error = await raised(api_url, page_size=10)
    assert isinstance(error, TransientApiError)
    fetches = [t for t in asyncio.all_tasks() if "Listing._fetch" in repr(t.get_coro())]
    assert fetches == []


def test_the_client_takes_its_values_from_the_settings(api_url: str) -> None:
    api = client(api_url + "/", page_size=7, list_concurrency=2, api_timeout=3)
    assert (api.url, api.page_size, api.concurrency, api.timeout) == (
        api_url + "/v1/lipsync/requests",
        7,
        2,
        3,
    )
    assert SIMULATOR_KEY not in repr(api)
    assert SIMULATOR_KEY not in str(vars(api))


def test_a_client_without_a_key_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="NOTIFIER_API_KEY"):
        ApiClient(load_settings())


# Malformed items.


async def test_a_malformed_item_is_skipped_with_a_warning_and_the_rest_kept(
    simulator: Simulator, api_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    simulator.create(5)
    bad = simulator.page(0, 20)[0][2]["id"]
    simulator.inject(Fault(FaultKind.MALFORMED_ITEM, index=2, field="created_at"))
    async with client(api_url) as api:
        ids = await list_ids(api)
    assert set(ids) == set(simulator.requests) - {bad}
    assert simulator.calls == 1  # the skipped item counts towards the total
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "item 2" in warning.getMessage()
    assert "'created_at'" in warning.getMessage()
    assert bad in warning.getMessage()


async def test_an_item_without_a_usable_id_is_skipped_too(
    simulator: Simulator, api_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    simulator.create(3)
    simulator.inject(Fault(FaultKind.MALFORMED_ITEM, index=0, field="id", value=None))
    async with client(api_url) as api:
        assert len(await list_ids(api)) == 2
    assert "field 'id'" in caplog.text


# Errors from the simulator.


@pytest.mark.parametrize(
    ("key", "status", "message"),
    [
        ("wrong-key", 401, "invalid token"),
        ("", 401, "missing token"),
        ("revoked", 403, "unauthorized"),
    ],
)
async def test_a_rejected_key_is_an_auth_error_with_the_api_message(
    simulator: Simulator, api_url: str, key: str, status: int, message: str
) -> None:
    simulator.revoked_keys.add("revoked")
    error = await raised(api_url, key=key)
    assert isinstance(error, AuthError)
    assert (error.status, error.message) == (status, message)
    assert message in str(error)


async def test_rate_limiting_with_retry_after_in_seconds(
    simulator: Simulator, api_url: str
) -> None:
    simulator.inject(Fault(FaultKind.RATE_LIMIT, retry_after="7"))
    error = await raised(api_url)
    assert isinstance(error, RateLimited)
    assert error.retry_after == 7


async def test_rate_limiting_with_retry_after_as_an_http_date(
    simulator: Simulator, api_url: str
) -> None:
    when = datetime.now(UTC) + timedelta(seconds=120)
    simulator.inject(Fault(FaultKind.RATE_LIMIT, retry_after=format_datetime(when, usegmt=True)))
    error = await raised(api_url)
    assert isinstance(error, RateLimited)
    assert 110 < error.retry_after <= 120


async def test_rate_limiting_without_retry_after(simulator: Simulator, api_url: str) -> None:
    simulator.inject(Fault(FaultKind.RATE_LIMIT))
    error = await raised(api_url)
    assert isinstance(error, RateLimited)
    assert error.retry_after is None


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        (FaultKind.SERVER_ERROR, "HTTP 500: internal error"),
        (FaultKind.INVALID_JSON, "is not JSON (application/json"),
        (FaultKind.HTML, "is not JSON (text/html"),
    ],
)
async def test_server_errors_and_unreadable_bodies_are_transient(
    simulator: Simulator, api_url: str, kind: FaultKind, words: str
) -> None:
    simulator.create(3)
    simulator.inject(Fault(kind))
    error = await raised(api_url)
    assert type(error) is TransientApiError
    assert words in str(error)


async def test_a_slow_answer_hits_the_timeout(simulator: Simulator, api_url: str) -> None:
    simulator.inject(Fault(FaultKind.LATENCY, delay=2))
    error = await raised(api_url, api_timeout=0.3)
    assert type(error) is TransientApiError
    assert "did not answer within 0.3 s" in str(error)


async def test_an_unreachable_api_is_transient() -> None:
    server = TestServer(web.Application(), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("/api"))
    await server.close()  # nothing listens on the port any more
    error = await raised(url)
    assert type(error) is TransientApiError
    assert "could not reach" in str(error)


# Errors from a server with a canned answer.


@pytest.fixture
async def canned() -> AsyncIterator[Callable[..., str]]:
    """Serves one fixed answer to every request; call it with the answer, get the API URL."""
    servers: list[TestServer] = []

    async def start(status: int, body: str, **headers: str) -> str:
        async def answer(_request: web.Request) -> web.Response:
            return web.Response(status=status, text=body, headers=headers)

        app = web.Application()
        app.router.add_get("/api/v1/lipsync/requests", answer)
        servers.append(TestServer(app, host="127.0.0.1"))
        await servers[-1].start_server()
        return str(servers[-1].make_url("/api"))

    yield start
    for server in servers:
        await server.close()


@pytest.mark.parametrize("message", AUTH_ERROR_MESSAGES)
async def test_every_auth_message_of_the_reference_reaches_the_error(
    canned: Callable[..., Any], message: str
) -> None:
    error = await raised(await canned(401, f'{{"error": "{message}"}}'))
    assert isinstance(error, AuthError)
    assert error.message == message


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, f'{{"error": "bad key {SIMULATOR_KEY}"}}'),
        (500, f'{{"error": "bad key {SIMULATOR_KEY}"}}'),
        (200, f"<p>bad key {SIMULATOR_KEY}</p>"),
    ],
)
async def test_a_key_the_api_echoes_is_blanked_in_the_error(
    canned: Callable[..., Any], status: int, body: str
) -> None:
    error = await raised(await canned(status, body))
    assert "bad key [redacted]" in str(error)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"data": {}, "pagination": {"total": 0}}', "'data'"),
        ('{"data": [], "pagination": {}}', "'pagination.total'"),
        ('{"data": [], "pagination": {"total": -1}}', "'pagination.total'"),
        ("[]", "Input should be a valid dictionary"),
    ],
)
async def test_a_body_of_the_wrong_shape_is_transient_and_named(
    canned: Callable[..., Any], body: str, field: str
) -> None:
    error = await raised(await canned(200, body, **{"Content-Type": "application/json"}))
    assert type(error) is TransientApiError
    assert "wrong shape" in str(error)
    assert field in str(error)


async def test_a_total_the_pages_never_deliver_ends_as_a_listing_that_kept_changing(
    canned: Callable[..., Any],
) -> None:
    url = await canned(200, '{"data": [], "pagination": {"total": 3}}')
    error = await raised(url)
    assert isinstance(error, ListingKeptChanging)
    assert "0 distinct requests seen, but a page reported 3" in str(error)


@pytest.mark.parametrize("status", [301, 302, 400, 404])
async def test_redirects_and_other_client_errors_are_not_retried_or_followed(
    canned: Callable[..., Any], status: int
) -> None:
    url = await canned(status, '{"error": "not found"}', Location="http://127.0.0.1:9/elsewhere")
    error = await raised(url)
    assert isinstance(error, UnexpectedResponse)
    assert error.status == status
    assert "NOTIFIER_API_URL" in str(error)


async def test_a_gateway_error_page_is_quoted_trimmed(canned: Callable[..., Any]) -> None:
    error = await raised(await canned(502, "<html>" + "bad gateway " * 100 + "</html>"))
    assert type(error) is TransientApiError
    assert "HTTP 502: <html>bad gateway" in str(error)
    assert len(str(error)) < 400


# Hostile answers: never a crash, never memory sized by the server's claims.


async def test_json_nested_too_deep_to_parse_is_a_transient_error(
    simulator: Simulator, api_url: str
) -> None:
    simulator.create(3)
    simulator.inject(Fault(FaultKind.DEEP_JSON, size=100_000))
    error = await raised(api_url)
    assert type(error) is TransientApiError
    assert error.outcome == "invalid_response"
    assert "is not JSON" in str(error)
    assert "recursion limit" in str(error)


async def test_an_error_body_nested_too_deep_is_quoted_not_parsed(
    canned: Callable[..., Any],
) -> None:
    depth = 100_000
    error = await raised(await canned(503, '{"error": ' + "[" * depth + "]" * depth + "}"))
    assert type(error) is TransientApiError
    assert "HTTP 503" in str(error)


async def test_a_wild_total_costs_a_few_rounds_of_the_real_pages_not_its_size(
    simulator: Simulator, api_url: str
) -> None:
    simulator.create(30)
    simulator.always = Fault(FaultKind.HUGE_TOTAL, size=10**12)
    error = await raised(api_url, page_size=10, list_concurrency=4)
    assert isinstance(error, ListingKeptChanging)
    assert "a page reported 1000000000000" in str(error)
    # Each round reads the 3 real pages and at most concurrency + 2 empty ones past them.
    assert simulator.calls <= (MAX_REFETCH_ROUNDS + 1) * (3 + 4 + 2)


async def test_a_page_over_the_byte_limit_is_read_again_smaller_until_it_fits(
    simulator: Simulator, api_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    simulator.create(10)
    asked: list[int] = []
    simulator.always = Fault(FaultKind.BLOATED, size=3000)  # ~3 KB an item

    async with client(api_url, page_size=10, api_max_bytes=8 * 1024) as api:
        original = api.fetch_page

        async def spy(offset: int, limit: int) -> Any:
            response = await original(offset, limit)
            asked.append(response.limit)
            return response

        api.fetch_page = spy  # type: ignore[method-assign]
        ids = await list_ids(api)
    assert set(ids) == set(simulator.requests)
    assert max(ids.values()) == 1
    assert set(asked) == {2}  # 10 items are ~30 KB, 5 ~15 KB, 2 fit in 8 KiB
    assert "larger than 8192 bytes (NOTIFIER_API_MAX_BYTES)" in caplog.text


async def test_an_item_over_the_byte_limit_alone_fails_the_listing_as_too_large(
    simulator: Simulator, api_url: str
) -> None:
    simulator.create(2)
    simulator.always = Fault(FaultKind.BLOATED, size=20_000)
    error = await raised(api_url, api_max_bytes=8 * 1024)
    assert isinstance(error, TransientApiError)
    assert error.outcome == "too_large"
    assert "with limit 1 is larger than 8192 bytes" in str(error)


async def test_a_content_length_claim_does_not_size_the_read(
    canned: Callable[..., Any],
) -> None:
    # aiohttp's server sets the real length; a body over the limit is refused by its size.
    body = '{"data": [], "pagination": {"total": 0}, "pad": "' + "x" * 20_000 + '"}'
    error = await raised(await canned(200, body), api_max_bytes=8 * 1024)
    assert error.outcome == "too_large"


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("created_at", "0001-01-01T00:00:00Z", "before 1970"),
        ("created_at", "1969-12-31T23:59:59Z", "before 1970"),
        ("created_at", "9999-12-31T23:59:59Z", "more than 24 h ahead"),
        ("started_at", "0001-01-01T00:00:00+05:00", "before 1970"),
        ("created_at", "9999-12-31T23:59:59-05:00", "more than 24 h ahead"),
        ("finished_at", "2200-01-01T00:00:00Z", "more than 24 h ahead"),
    ],
)
async def test_an_item_with_an_implausible_timestamp_is_skipped_and_counted(
    simulator: Simulator,
    api_url: str,
    caplog: pytest.LogCaptureFixture,
    *,
    field: str,
    value: str,
    why: str,
) -> None:
    simulator.create(4)
    bad = simulator.page(0, 20)[0][1]["id"]
    simulator.always = Fault(FaultKind.MALFORMED_ITEM, index=1, field=field, value=value)
    async with client(api_url) as api:
        first = await list_ids(api)
        again = await list_ids(api)  # listed again: counted again, warned about once
        skipped = api.metrics.malformed_items._value.get()
    assert set(first) == set(again) == set(simulator.requests) - {bad}
    assert skipped == 2
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert bad in warning.getMessage()
    assert f"field {field!r}" in warning.getMessage()
    assert why in warning.getMessage()


async def test_a_timestamp_a_little_ahead_of_this_clock_is_kept(
    simulator: Simulator, api_url: str
) -> None:
    simulator.create(2)
    ahead = datetime.now(UTC) + timedelta(hours=23)
    simulator.always = Fault(FaultKind.MALFORMED_ITEM, field="created_at", value=ahead.isoformat())
    async with client(api_url) as api:
        assert len(await list_ids(api)) == 2


async def test_after_a_page_too_large_later_calls_start_small_and_grow_back(
    simulator: Simulator, api_url: str
) -> None:
    simulator.create(40)
    simulator.always = Fault(FaultKind.BLOATED, size=3000)  # ~3 KB an item
    async with client(api_url, page_size=20, api_max_bytes=8 * 1024) as api:
        too_large = api.metrics.api_calls.labels("too_large")
        await list_ids(api)
        refused = too_large._value.get()
        assert refused > 0
        await list_ids(api)  # the second listing starts at the limit that fitted
        assert too_large._value.get() == refused
        simulator.always = None  # small items again: the limit doubles back to the page size
        limits = []
        for _ in range(5):
            limits.append((await api.fetch_page(0, 20)).limit)
    assert limits == [2, 4, 8, 16, 20]
