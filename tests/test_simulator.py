"""The simulator answers `GET /v1/lipsync/requests` as the reference page shows, and fails on cue.

HTTP behaviour is checked over HTTP with a plain aiohttp session, so the notifier's own client
plays no part; the account's lifecycle is table logic and is checked directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from notifier.simulator import Fault, FaultKind, Order, SimulatedRequest, Simulator
from notifier.simulator import main as simulator_main

from samples import COMPLETED, QUEUED, SIMULATOR_KEY

KEY = {"x-api-key": SIMULATOR_KEY}
T0 = datetime(2026, 3, 30, 11, 0, 0, tzinfo=UTC)
Get = Callable[..., Awaitable[aiohttp.ClientResponse]]


@pytest.fixture
async def get(api_url: str) -> AsyncIterator[Get]:
    """GET the list endpoint (with the key unless `headers` says otherwise), body read."""
    async with aiohttp.ClientSession() as session:

        async def get(headers: dict[str, str] = KEY, **params: Any) -> aiohttp.ClientResponse:
            url = api_url + "/v1/lipsync/requests"
            async with session.get(url, headers=headers, params=params) as response:
                await response.read()
                return response

        yield get


async def body(get: Get, **params: Any) -> Any:
    return await (await get(**params)).json()


async def ids(get: Get, **params: Any) -> list[str]:
    return [item["id"] for item in (await body(get, **params))["data"]]


@dataclass
class Clock:
    """A clock the test moves by hand."""

    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


# The response.


async def test_a_listing_without_parameters_is_the_reference_example(
    simulator: Simulator, get: Get
) -> None:
    simulator.order = Order.OLDEST_FIRST  # the example lists its older request first
    for sample in (COMPLETED, QUEUED):
        fields = {
            k: datetime.fromisoformat(v) if k.endswith("_at") else v for k, v in sample.items()
        }
        simulator.add(SimulatedRequest(**fields))
    response = await get()
    assert (response.status, response.content_type) == (200, "application/json")
    assert await response.json() == {  # QUEUED has no optional field, not even as null
        "data": [COMPLETED, QUEUED],
        "pagination": {"limit": 20, "offset": 0, "total": 2},
    }


# Authentication.


@pytest.mark.parametrize(
    ("headers", "status", "error"),
    [
        ({}, 401, "missing authorization header"),
        ({"Authorization": "Basic x"}, 401, "invalid authorization format"),
        ({"x-api-key": ""}, 401, "missing token"),
        ({"Authorization": "Bearer "}, 401, "missing token"),
        ({"x-api-key": "sk-wrong"}, 401, "invalid token"),
        ({"Authorization": "Bearer sk-wrong"}, 401, "invalid token"),
        ({"x-api-key": "sk-revoked"}, 403, "unauthorized"),
    ],
)
async def test_each_authentication_failure_has_the_reference_status_and_error(
    simulator: Simulator, get: Get, headers: dict[str, str], status: int, error: str
) -> None:
    simulator.revoked_keys.add("sk-revoked")
    response = await get(headers=headers)
    assert response.status == status
    assert await response.json() == {"error": error}


async def test_a_key_that_is_not_utf8_is_an_invalid_token(api_url: str) -> None:
    host, port = api_url.removeprefix("http://").split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /api/v1/lipsync/requests HTTP/1.1\r\nHost: x\r\nx-api-key: \xff\xfe\r\n"
        b"Connection: close\r\n\r\n"
    )
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401")
    assert answer.endswith(b'{"error": "invalid token"}')


async def test_a_bearer_token_is_accepted_like_the_x_api_key_header(
    simulator: Simulator, get: Get
) -> None:
    simulator.create(2)
    bearer = await body(get, headers={"Authorization": f"Bearer {SIMULATOR_KEY}"})
    assert bearer == await body(get)
    assert bearer["pagination"]["total"] == 2


# Parameters.


async def test_a_capped_limit_returns_at_most_the_cap_and_says_so(
    simulator: Simulator, get: Get
) -> None:
    simulator.create(12)
    simulator.max_limit = 5
    for params, returned in [({"limit": 50}, 5), ({}, 5), ({"limit": 3}, 3)]:
        page = await body(get, **params)
        assert len(page["data"]) == returned
        assert page["pagination"] == {"limit": returned, "offset": 0, "total": 12}


async def test_offset_and_limit_page_through_the_listing(simulator: Simulator, get: Get) -> None:
    simulator.backfill(23)
    pages = [await ids(get, offset=offset, limit=5) for offset in range(0, 30, 5)]
    assert [len(page) for page in pages] == [5, 5, 5, 5, 3, 0]
    assert [i for page in pages for i in page] == await ids(get, limit=100)
    past_the_end = {"data": [], "pagination": {"limit": 20, "offset": 40, "total": 23}}
    assert await body(get, offset=40) == past_the_end


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=-1",
        "limit=x",
        "limit=1.5",
        "limit=5_0",
        "limit=+2",
        "offset=-1",
        "offset=x",
    ],
)
async def test_an_invalid_limit_or_offset_is_a_400_naming_it(get: Get, query: str) -> None:
    name, _, value = query.partition("=")
    response = await get(**{name: value})
    assert response.status == 400
    assert await response.json() == {"error": f"invalid {name}"}


async def test_reference_id_filters_exactly_and_the_total_counts_only_the_matches(
    simulator: Simulator, get: Get
) -> None:
    wanted = {request.id for request in simulator.create(3, reference_id="order-1")}
    simulator.create(2, reference_id="order-12")
    simulator.create(4)
    assert set(await ids(get, reference_id="order-1")) == wanted
    page = await body(get, reference_id="order-1", limit=2)
    assert (len(page["data"]), page["pagination"]["total"]) == (2, 3)
    assert (await body(get, reference_id="order"))["pagination"]["total"] == 0


# Orders.


def tied(simulator: Simulator) -> None:
    """Six requests created in each of three seconds: many equal created_at."""
    for second in range(3):
        simulator.create(6, created_at=T0 + timedelta(seconds=second))


def created(page: dict[str, Any]) -> list[str]:
    return [item["created_at"] for item in page["data"]]


async def test_newest_and_oldest_first_are_stable_and_reverse_each_other(
    simulator: Simulator, get: Get
) -> None:
    tied(simulator)
    newest = await body(get, limit=100)
    assert created(newest) == sorted(created(newest), reverse=True)
    assert await body(get, limit=100) == newest
    simulator.order = Order.OLDEST_FIRST
    oldest = await ids(get, limit=100)
    assert oldest == await ids(get, limit=100)
    assert oldest == [item["id"] for item in reversed(newest["data"])]


async def test_unstable_order_reshuffles_only_equal_created_at_in_each_response(
    simulator: Simulator, get: Get
) -> None:
    tied(simulator)
    offsets = range(0, 20, 4)  # pages that start and end inside runs of equal created_at
    stable = [await body(get, offset=offset, limit=4) for offset in offsets]
    simulator.order = Order.UNSTABLE
    listings = set()
    for _ in range(4):
        for offset, expected in zip(offsets, stable, strict=True):
            page = await body(get, offset=offset, limit=4)
            # The same size and the same created_at at each place: only ties move.
            assert page["pagination"] == expected["pagination"]
            assert created(page) == created(expected)
            assert len({item["id"] for item in page["data"]}) == len(page["data"])
        listing = await ids(get, limit=100)
        assert set(listing) == set(simulator.requests)
        listings.add(tuple(listing))
    assert len(listings) > 1


# The lifecycle.


def test_each_transition_sets_its_fields_a_few_seconds_after_the_previous_step() -> None:
    clock = Clock()
    simulator = Simulator(seed=1, clock=clock)
    done, failed = simulator.create(2)
    clock.now += timedelta(hours=1)
    for request in (done, failed):
        assert simulator.start(request.id).status == "processing"
        assert T0 < request.started_at <= T0 + timedelta(seconds=90)
    assert simulator.complete(done.id).status == "completed"
    assert done.started_at < done.finished_at <= done.started_at + timedelta(seconds=90)
    assert done.output_url == f"https://storage.chamelaion.com/output/{done.id[:8]}.mp4"
    assert simulator.fail(failed.id, "no face detected").status == "failed"
    assert failed.started_at < failed.finished_at
    assert failed.to_json()["error_message"] == "no face detected"
    assert "output_url" not in failed.to_json()


@pytest.mark.parametrize(
    "path",
    ["-> complete", "start -> start", "start complete -> fail", "fail -> complete"],
)
def test_a_transition_from_the_wrong_status_raises_and_changes_nothing(
    simulator: Simulator, path: str
) -> None:
    *steps, _, step = path.split()
    (request,) = simulator.create()
    for done in steps:
        getattr(simulator, done)(request.id)
    before = vars(request).copy()
    with pytest.raises(ValueError, match=request.id):
        getattr(simulator, step)(request.id)
    assert vars(request) == before


def test_timestamps_stay_in_order_and_never_pass_the_clock() -> None:
    clock = Clock()
    simulator = Simulator(seed=7, clock=clock)
    simulator.backfill(100)
    for _ in range(60):
        clock.now += timedelta(seconds=5)
        simulator.progress(fail_ratio=0.3)
        for request in simulator.requests.values():
            steps = [request.created_at, request.started_at, request.finished_at]
            present = [moment for moment in steps if moment is not None]
            assert present == sorted(present)
            assert present[-1] <= clock.now
            assert (request.finished_at is not None) == (request.status in ("completed", "failed"))
            assert (request.output_url is not None) == (request.status == "completed")
            assert (request.error_message is not None) == (request.status == "failed")


def test_backfill_spreads_a_mix_of_statuses_over_the_past_span() -> None:
    simulator = Simulator(seed=3, clock=Clock())
    simulator.backfill(200, span=timedelta(minutes=30))
    assert len(simulator.requests) == 200
    statuses = {request.status for request in simulator.requests.values()}
    assert statuses == {"queued", "processing", "completed", "failed"}
    for request in simulator.requests.values():
        assert T0 - timedelta(minutes=30) <= request.created_at <= T0


def test_progress_moves_requests_forward_and_never_back() -> None:
    rank = {"queued": 0, "processing": 1, "completed": 2, "failed": 2}
    simulator = Simulator(seed=5)
    simulator.create(30)
    seen: dict[str, int] = {}
    for _ in range(30):
        simulator.progress()
        for request in simulator.requests.values():
            assert rank[request.status] >= seen.get(request.id, 0)
            seen[request.id] = rank[request.status]
    assert len(seen) > 30  # new requests arrive too
    assert sum(rank == 2 for rank in seen.values()) > 15


# Faults: each spoils the next response after authentication, then all is normal again.


async def normal(get: Get) -> None:
    response = await get()
    assert response.status == 200
    assert "pagination" in await response.json()


@pytest.mark.parametrize("retry_after", ["7", None])
async def test_a_rate_limit_fault_is_one_429_with_its_retry_after(
    simulator: Simulator, get: Get, retry_after: str | None
) -> None:
    simulator.inject(Fault(FaultKind.RATE_LIMIT, retry_after=retry_after))
    response = await get()
    assert response.status == 429
    assert await response.json() == {"error": "rate limit exceeded"}
    assert response.headers.get("Retry-After") == retry_after
    await normal(get)


async def test_server_errors_spoil_as_many_authenticated_responses_as_injected(
    simulator: Simulator, get: Get
) -> None:
    simulator.inject(Fault(FaultKind.SERVER_ERROR), count=2)
    assert (await get(headers={})).status == 401
    for _ in range(2):
        response = await get()
        assert response.status == 500
        assert await response.json() == {"error": "internal error"}
    await normal(get)


async def test_a_bad_request_leaves_an_injected_fault_for_the_next_response(
    simulator: Simulator, get: Get
) -> None:
    simulator.inject(Fault(FaultKind.SERVER_ERROR))
    assert (await get(limit=0)).status == 400
    assert (await get()).status == 500


@pytest.mark.parametrize(
    ("kind", "content_type"),
    [(FaultKind.INVALID_JSON, "application/json"), (FaultKind.HTML, "text/html")],
)
async def test_an_invalid_json_or_html_fault_sends_one_unparseable_body(
    simulator: Simulator, get: Get, kind: FaultKind, content_type: str
) -> None:
    simulator.create(3)
    simulator.inject(Fault(kind))
    response = await get()
    assert (response.status, response.content_type) == (200, content_type)
    with pytest.raises(json.JSONDecodeError):
        json.loads(await response.text())
    await normal(get)


async def test_a_malformed_item_fault_changes_only_the_chosen_field_of_the_chosen_item(
    simulator: Simulator, get: Get
) -> None:
    simulator.create(3)
    intact = (await body(get))["data"]
    simulator.inject(Fault(FaultKind.MALFORMED_ITEM, index=1, field="status", value=None))
    assert (await body(get))["data"] == [intact[0], {**intact[1], "status": None}, intact[2]]
    assert (await body(get))["data"] == intact


async def test_a_latency_fault_delays_one_normal_response(simulator: Simulator, get: Get) -> None:
    simulator.inject(Fault(FaultKind.LATENCY, delay=0.3))
    started = time.monotonic()
    await normal(get)
    assert time.monotonic() - started >= 0.25
    assert not simulator.faults


# Instrumentation.


async def test_hooks_are_called_with_the_call_number_before_the_response(
    simulator: Simulator, get: Get
) -> None:
    numbers: list[int] = []
    simulator.hooks.append(numbers.append)
    simulator.hooks.append(lambda call: simulator.create() if call == 2 else None)
    totals = [(await body(get))["pagination"]["total"] for _ in range(3)]
    assert (numbers, totals, simulator.calls) == ([1, 2, 3], [0, 1, 1], 3)


async def test_the_delay_applies_to_every_response_and_concurrent_ones_are_counted(
    simulator: Simulator, get: Get
) -> None:
    simulator.delay = 0.2
    started = time.monotonic()
    responses = await asyncio.gather(*(get() for _ in range(3)))
    assert time.monotonic() - started >= 0.15
    assert [response.status for response in responses] == [200, 200, 200]
    assert (simulator.max_in_flight, simulator.in_flight) == (3, 0)


async def test_the_headers_of_the_last_call_are_recorded(simulator: Simulator, get: Get) -> None:
    await get(headers={**KEY, "X-Trace": "first"})
    assert simulator.last_headers["X-Trace"] == "first"
    await get(headers={"Authorization": "Bearer nope"})
    assert simulator.last_headers["Authorization"] == "Bearer nope"
    assert "X-Trace" not in simulator.last_headers


# Standalone.


async def start_standalone(*args: str) -> tuple[asyncio.subprocess.Process, str, str]:
    """Run `python -m notifier.simulator`; its URL and key, once it says it is ready."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "notifier.simulator", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=Path(__file__).parents[1],
        # Buffered as when piped to a log: the banner must still arrive without waiting.
        env={name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"},
    )
    lines = [""]
    try:
        while lines[-1] != "Press Ctrl-C to stop.":
            lines.append((await asyncio.wait_for(process.stdout.readline(), 15)).decode().strip())
            assert lines[-1], f"the simulator exited early: {lines}"
    except BaseException:
        process.kill()
        await process.wait()
        raise
    text = "\n".join(lines)
    return process, re.search(r"http://\S+/api", text)[0], re.search(r"key: (\S+)", text)[1]


async def stop(process: asyncio.subprocess.Process) -> int:
    """SIGTERM, then the exit code; a process still running after 5 s is killed (TimeoutError)."""
    process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), 5)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise


async def test_the_standalone_simulator_serves_a_moving_account_until_sigterm() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process, url, key = await start_standalone(
        *("--port", str(port), "--requests", "5", "--api-key", "k", "--tick", "0.05")
    )
    try:
        assert (url, key) == (f"http://127.0.0.1:{port}/api", "k")
        async with aiohttp.ClientSession(headers={"x-api-key": "k"}) as session:

            async def listing() -> dict[str, Any]:
                async with session.get(f"{url}/v1/lipsync/requests?limit=100") as response:
                    return await response.json()

            first = await listing()
            assert first["pagination"]["total"] >= 5
            deadline = time.monotonic() + 10
            while (latest := await listing()) == first and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert latest != first  # the ticks move requests on or add new ones
    finally:
        code = await stop(process)
    assert code == 0


@pytest.mark.parametrize("option", [("--tick", "-1"), ("--max-limit", "0"), ("--requests", "-3")])
def test_the_standalone_simulator_refuses_values_below_their_minimum(
    option: tuple[str, str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        simulator_main([*option])
    assert exited.value.code == 2


async def test_the_standalone_simulator_makes_up_a_sim_key_when_given_none() -> None:
    process, url, key = await start_standalone("--port", "0", "--requests", "1", "--tick", "0")
    try:
        assert key.startswith("sim_")
        assert len(key) > 16
        async with aiohttp.ClientSession() as session:
            for sent, status in [(key, 200), ("k", 401)]:
                headers = {"x-api-key": sent}
                async with session.get(f"{url}/v1/lipsync/requests", headers=headers) as response:
                    assert response.status == status
    finally:
        code = await stop(process)
    assert code == 0
