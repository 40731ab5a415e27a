"""The Chamelaion API simulator: the list endpoint of the reference page over an in-memory table.

`notifier demo` and the tests run it in-process on a free port; anyone can run it alone to
try the notifier without an account:

    python -m notifier.simulator --port 8000 --requests 50 [--api-key KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import secrets
import signal
import socket
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from aiohttp import web

from notifier.models import COMPLETED, FAILED, PROCESSING, QUEUED, format_timestamp

LIST_PATH = "/api/v1/lipsync/requests"
DEFAULT_LIMIT = 20  # what the API answers when `limit` is absent (the reference example)
ERROR_MESSAGES = (
    "no face detected in the input video",
    "audio track is shorter than 1 second",
    "input video could not be decoded",
)


class Order(StrEnum):
    """Listing orders: the API documents none, so the client must cope with each."""

    NEWEST_FIRST = "newest-first"
    OLDEST_FIRST = "oldest-first"
    # Newest first, but requests with equal created_at come in a new random order in every
    # response, as a database without a tie-breaker may return them.
    UNSTABLE = "unstable"
    # No relation to created_at: ordered by a hash of the id, so a new request lands
    # anywhere in the listing.
    RANDOM = "random"


class FaultKind(StrEnum):
    """What an injected fault makes the next response be."""

    RATE_LIMIT = "rate-limit"  # 429 rate limit exceeded, with Fault.retry_after if set
    SERVER_ERROR = "server-error"  # 500 internal error
    INVALID_JSON = "invalid-json"  # 200 with a truncated JSON body
    HTML = "html"  # 200 with an HTML error page, as a proxy in front of the API sends
    MALFORMED_ITEM = "malformed-item"  # item Fault.index gets Fault.value in Fault.field
    LATENCY = "latency"  # answer normally after Fault.delay seconds
    # Hostile answers, as a broken or malicious server (or a proxy) might send them.
    DEEP_JSON = "deep-json"  # 200 with `data` nested Fault.size arrays deep
    HUGE_TOTAL = "huge-total"  # the real page, but pagination.total is Fault.size
    BLOATED = "bloated"  # every item's error_message padded to Fault.size characters


@dataclass(frozen=True)
class Fault:
    """One injected fault; see `FaultKind` for what each field means."""

    kind: FaultKind
    retry_after: str | None = None
    delay: float = 0.0
    index: int = 0
    field: str = "created_at"
    value: Any = "not a timestamp"
    size: int = 100_000  # DEEP_JSON: nesting depth; HUGE_TOTAL: the total; BLOATED: chars


@dataclass
class SimulatedRequest:
    """One lip sync request of the simulated account."""

    id: str
    created_at: datetime
    status: str = QUEUED
    reference_id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    output_url: str | None = None
    error_message: str | None = None

    def to_json(self) -> dict[str, str]:
        """The item as the API lists it: optional fields are left out when empty."""
        item = {"id": self.id}
        if self.reference_id is not None:
            item["reference_id"] = self.reference_id
        item["status"] = self.status
        for name in ("created_at", "started_at", "finished_at"):
            if (value := getattr(self, name)) is not None:
                item[name] = format_timestamp(value)
        if self.output_url is not None:
            item["output_url"] = self.output_url
        if self.error_message is not None:
            item["error_message"] = self.error_message
        return item


def _now() -> datetime:
    # The API's timestamps have whole seconds, which makes equal created_at common.
    return datetime.now(UTC).replace(microsecond=0)


@dataclass
class Simulator:
    """An in-memory Chamelaion account served over HTTP by `app()` or `serve()`.

    Tests shape it directly: create requests, move them through their lifecycle, pick
    the listing order and the cap on `limit`, and inject faults into the next responses.
    """

    api_key: str = "sim-key"
    order: Order = Order.NEWEST_FIRST
    max_limit: int = 100
    delay: float = 0.0  # seconds added to every list response
    seed: int | None = None
    clock: Callable[[], datetime] = _now
    revoked_keys: set[str] = field(default_factory=set)  # answered 403 unauthorized
    always: Fault | None = None  # a fault of every response no injected fault takes
    # Called with the call number before each list response is made, e.g. to create
    # requests in the middle of a listing.
    hooks: list[Callable[[int], None]] = field(default_factory=list)
    calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    last_headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)  # noqa: S311 - simulated data, not secrets
        self.requests: dict[str, SimulatedRequest] = {}
        self.faults: deque[Fault] = deque()
        self._newest_first: list[SimulatedRequest] | None = None

    # The account.

    def create(
        self,
        count: int = 1,
        *,
        reference_id: str | None = None,
        created_at: datetime | None = None,
    ) -> list[SimulatedRequest]:
        """Create `count` queued requests (now, unless `created_at` is given)."""
        return [
            self.add(
                SimulatedRequest(
                    id=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
                    created_at=created_at or self.clock(),
                    reference_id=reference_id,
                )
            )
            for _ in range(count)
        ]

    def add(self, request: SimulatedRequest) -> SimulatedRequest:
        """File a request made elsewhere, such as an example of the reference page.

        A request's `created_at` is fixed once filed: the listing order is kept sorted.
        """
        self.requests[request.id] = request
        self._newest_first = None
        return request

    def delete(self, request_id: str) -> SimulatedRequest:
        """Remove a request from the account: the listing no longer holds it."""
        self._newest_first = None
        return self.requests.pop(request_id)

    def start(self, request_id: str) -> SimulatedRequest:
        """Move a queued request to processing."""
        request = self._expect(request_id, QUEUED)
        request.status, request.started_at = PROCESSING, self._after(request.created_at)
        return request

    def complete(self, request_id: str) -> SimulatedRequest:
        """Finish a processing request with an output video."""
        request = self._expect(request_id, PROCESSING)
        request.status, request.finished_at = COMPLETED, self._after(request.started_at)
        request.output_url = f"https://storage.chamelaion.com/output/{request.id[:8]}.mp4"
        return request

    def fail(self, request_id: str, message: str | None = None) -> SimulatedRequest:
        """Fail a queued or processing request with an error message."""
        request = self._expect(request_id, QUEUED, PROCESSING)
        request.status, request.finished_at = FAILED, self._after(request.started_at)
        request.error_message = message or self.rng.choice(ERROR_MESSAGES)
        return request

    def progress(self, fail_ratio: float = 0.1) -> None:
        """One tick of a busy account: some requests start, some finish, a new one may arrive."""
        for request in list(self.requests.values()):
            if request.status == QUEUED and self.rng.random() < 0.5:
                self.start(request.id)
            elif request.status == PROCESSING and self.rng.random() < 0.4:
                if self.rng.random() < fail_ratio:
                    self.fail(request.id)
                else:
                    self.complete(request.id)
        if self.rng.random() < 0.2:
            self.create(reference_id=self.rng.choice((None, "batch-demo")))

    def backfill(self, count: int, *, span: timedelta = timedelta(hours=1)) -> None:
        """Create `count` requests spread over the past `span`, most of them already finished."""
        now = self.clock()
        for _ in range(count):
            created_at = now - span * self.rng.random()
            (request,) = self.create(created_at=created_at.replace(microsecond=0))
            roll = self.rng.random()
            if roll < 0.8:
                self.start(request.id)
            if roll < 0.6:
                self.complete(request.id)
            elif roll < 0.65:
                self.fail(request.id)

    def history(
        self, finished: int, unfinished: int, *, span: timedelta = timedelta(days=1)
    ) -> None:
        """A large account at rest: `finished` requests over the past `span`, every one
        done, then a batch of `unfinished` new ones in progress."""
        self.backfill(finished, span=span)
        for request in self.requests.values():
            if request.status == QUEUED:
                self.start(request.id)
            if request.status == PROCESSING:
                self.complete(request.id)
        for request in self.create(unfinished, reference_id="batch"):
            self.start(request.id)

    def inject(self, fault: Fault, count: int = 1) -> None:
        """Make the next `count` list responses (after authentication) suffer `fault`."""
        self.faults.extend([fault] * count)

    def _expect(self, request_id: str, *statuses: str) -> SimulatedRequest:
        request = self.requests[request_id]
        if request.status not in statuses:
            raise ValueError(
                f"request {request_id} is {request.status}, not {' or '.join(statuses)}"
            )
        return request

    def _after(self, moment: datetime | None) -> datetime:
        # A few seconds after the previous step, never in the future of the clock.
        start = moment or self.clock()
        return min(start + timedelta(seconds=self.rng.randint(1, 90)), max(start, self.clock()))

    # The listing.

    def page(
        self, offset: int, limit: int, reference_id: str | None = None
    ) -> tuple[list[dict[str, str]], int]:
        """The items of one page in the configured order, and the total of the listing."""
        ordered = self._ordered()
        if reference_id is not None:
            ordered = [request for request in ordered if request.reference_id == reference_id]
        if self.order is Order.OLDEST_FIRST:
            ordered = ordered[::-1]
        elif self.order is Order.RANDOM:
            ordered = sorted(
                ordered, key=lambda request: hashlib.sha256(request.id.encode()).digest()
            )
        window = ordered[offset : offset + limit]
        if self.order is Order.UNSTABLE and window:
            window = self._shuffle_ties(ordered, offset, len(window))
        return [request.to_json() for request in window], len(ordered)

    def _ordered(self) -> list[SimulatedRequest]:
        if self._newest_first is None:
            # Creation order breaks ties, so the stable orders really are stable.
            self._newest_first = sorted(
                self.requests.values(), key=lambda request: request.created_at, reverse=True
            )
        return self._newest_first

    def _shuffle_ties(
        self, ordered: list[SimulatedRequest], offset: int, size: int
    ) -> list[SimulatedRequest]:
        start, end = offset, offset + size
        while start > 0 and ordered[start - 1].created_at == ordered[offset].created_at:
            start -= 1
        while end < len(ordered) and ordered[end].created_at == ordered[end - 1].created_at:
            end += 1
        runs: dict[datetime, list[SimulatedRequest]] = {}
        for request in ordered[start:end]:
            runs.setdefault(request.created_at, []).append(request)
        for run in runs.values():
            self.rng.shuffle(run)
        shuffled = [request for run in runs.values() for request in run]
        return shuffled[offset - start : offset - start + size]

    # HTTP.

    def app(self) -> web.Application:
        """The aiohttp application serving `GET /api/v1/lipsync/requests`."""
        app = web.Application()
        app.router.add_get(LIST_PATH, self._handle_list)
        return app

    @contextlib.asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve on `host:port` (0 = a free port) and yield the base URL to use as API_URL."""
        async with serve_app(self.app(), host, port) as origin:
            yield f"{origin}/api"

    async def _handle_list(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        for hook in self.hooks:
            hook(self.calls)
        self.last_headers = dict(request.headers)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if denied := self._authenticate(request.headers):
            return _error(*denied)
        try:
            offset = _int_param(request, "offset", 0, minimum=0)
            limit = min(_int_param(request, "limit", DEFAULT_LIMIT, minimum=1), self.max_limit)
        except ValueError as exc:
            return _error(400, str(exc))
        fault = self.faults.popleft() if self.faults else self.always
        if fault and fault.kind is FaultKind.LATENCY:
            await asyncio.sleep(fault.delay)
        if fault and (broken := _broken(fault)):
            return broken
        items, total = self.page(offset, limit, request.query.get("reference_id"))
        if fault:
            total = _spoil(fault, items, total)
        body = json.dumps(
            {"data": items, "pagination": {"limit": limit, "offset": offset, "total": total}}
        )
        if fault and fault.kind is FaultKind.INVALID_JSON:
            body = body[: len(body) // 2]
        return web.Response(text=body, content_type="application/json")

    def _authenticate(self, headers: Any) -> tuple[int, str] | None:
        key = headers.get("x-api-key")
        if key is None:
            authorization = headers.get("authorization")
            if authorization is None:
                return 401, "missing authorization header"
            scheme, _, key = authorization.partition(" ")
            if scheme.lower() != "bearer":
                return 401, "invalid authorization format"
        key = key.strip()
        if not key:
            return 401, "missing token"
        if key in self.revoked_keys:
            return 403, "unauthorized"
        # surrogateescape: a key that is not UTF-8 is simply a wrong key.
        if not hmac.compare_digest(key.encode(errors="surrogateescape"), self.api_key.encode()):
            return 401, "invalid token"
        return None


_HTML_PAGE = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"


def _broken(fault: Fault) -> web.Response | None:
    """The answer of a fault that replaces the page altogether, if it is one."""
    match fault.kind:
        case FaultKind.RATE_LIMIT:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return _error(429, "rate limit exceeded", headers)
        case FaultKind.SERVER_ERROR:
            return _error(500, "internal error")
        case FaultKind.HTML:
            return web.Response(status=200, text=_HTML_PAGE, content_type="text/html")
        case FaultKind.DEEP_JSON:
            nested = "[" * fault.size + "]" * fault.size
            body = '{"data": ' + nested + ', "pagination": {"total": 1}}'
            return web.Response(text=body, content_type="application/json")
    return None


def _spoil(fault: Fault, items: list[dict[str, str]], total: int) -> int:
    """Apply a fault that changes the page's items in place; returns the total to report."""
    match fault.kind:
        case FaultKind.MALFORMED_ITEM if fault.index < len(items):
            items[fault.index][fault.field] = fault.value
        case FaultKind.HUGE_TOTAL:
            return fault.size
        case FaultKind.BLOATED:
            for item in items:
                item["error_message"] = (item.get("error_message") or "").ljust(fault.size, "x")
    return total


@contextlib.asynccontextmanager
async def serve_app(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve `app` on `host:port` (0 = a free port) while the block runs; yields its origin."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.create_server((host, port))
    try:
        await web.SockSite(runner, sock).start()
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()
        sock.close()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _int_param(request: web.Request, name: str, default: int, *, minimum: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    # Plain ASCII digits only: int() would also take "5_0", "+2" and other scripts' digits.
    if not (raw.isascii() and raw.isdigit()) or int(raw) < minimum:
        raise ValueError(f"invalid {name}")
    return int(raw)


# Standalone.


def _at_least(minimum: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = type(minimum)(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m notifier.simulator",
        description="Serve a simulated Chamelaion account whose requests finish over time.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0 = any)")
    parser.add_argument(
        "--requests", type=_at_least(0), default=50, help="requests already in the account"
    )
    parser.add_argument("--api-key", help="the key the simulator accepts (default: a random one)")
    parser.add_argument("--order", type=Order, choices=list(Order), default=Order.NEWEST_FIRST)
    parser.add_argument(
        "--max-limit", type=_at_least(1), default=100, help="cap on the limit parameter"
    )
    parser.add_argument(
        "--tick", type=_at_least(0.0), default=1.0, help="seconds between steps (0 = frozen)"
    )
    parser.add_argument("--seed", type=int, help="random seed, for a reproducible account")
    parser.add_argument(
        "--fault",
        type=FaultKind,
        choices=list(FaultKind),
        help="a fault every response suffers (for trying how a client copes)",
    )
    parser.add_argument(
        "--fault-size", type=_at_least(0), default=Fault.size, help="its size (see FaultKind)"
    )
    parser.add_argument("--fault-index", type=_at_least(0), default=0, help="its item")
    parser.add_argument("--fault-field", default=Fault.field, help="its field")
    parser.add_argument("--fault-value", default=Fault.value, help="its value")
    return parser.parse_args(argv)


async def _serve_forever(args: argparse.Namespace) -> None:
    simulator = Simulator(
        api_key=args.api_key or f"sim_{secrets.token_urlsafe(16)}",
        order=args.order,
        max_limit=args.max_limit,
        seed=args.seed,
        always=Fault(
            args.fault,
            index=args.fault_index,
            field=args.fault_field,
            value=args.fault_value,
            size=args.fault_size,
        )
        if args.fault
        else None,
    )
    simulator.backfill(args.requests)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with simulator.serve(args.host, args.port) as url:
        print(f"Chamelaion API simulator: {url} ({args.requests} requests, {args.order})")
        print(f"Accepted API key: {simulator.api_key}")
        print(f"Try: NOTIFIER_API_URL={url} NOTIFIER_API_KEY={simulator.api_key} notifier check")
        print("Press Ctrl-C to stop.", flush=True)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.tick or None)
            if args.tick:
                simulator.progress()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGINT or SIGTERM."""
    asyncio.run(_serve_forever(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
