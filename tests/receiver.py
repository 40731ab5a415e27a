"""A webhook receiver for tests: a real aiohttp server on 127.0.0.1.

It records every request (path, headers, body, arrival time) and answers each path from
a script of planned answers, then from that path's standing answer, then from the
receiver's default handler (200 "ok" unless told otherwise).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Seen:
    """One request as the receiver got it."""

    path: str
    headers: CIMultiDictProxy[str]
    body: bytes
    at: float  # time.monotonic() on arrival

    @property
    def event_id(self) -> str | None:
        """The `webhook-id` header."""
        return self.headers.get("webhook-id")

    def json(self) -> Any:
        """The body, parsed."""
        return json.loads(self.body)


class Receiver:
    """Records requests; answers each path from its planned answers, then 200."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self._plans: dict[str, deque[Handler]] = defaultdict(deque)
        self._always: dict[str, Handler] = {}
        self.handler: Handler = _canned(200, "ok")  # for paths without answers of their own
        self.release = asyncio.Event()  # stalling handlers wait for it (set at teardown)
        self.server: TestServer | None = None

    def url(self, path: str = "/hook") -> str:
        """The URL of `path` on this receiver."""
        assert self.server is not None
        return str(self.server.make_url(path))

    def plan(self, path: str, *answers: tuple[int, str] | tuple[int, str, dict[str, str]]) -> None:
        """Answer the next requests to `path` with these (status, body[, headers]), in order."""
        for answer in answers:
            self._plans[path].append(_canned(*answer))

    def reply(self, status: int, body: str = "", headers: dict[str, str] | None = None) -> None:
        """Answer every path without answers of its own with this status, body, headers."""
        self.handler = _canned(status, body, headers)

    def always(self, path: str, status: int, body: str = "") -> None:
        """Answer every request to `path` with this status once the plan is used up."""
        self._always[path] = _canned(status, body)

    def handle(self, path: str, handler: Handler) -> None:
        """Answer every request to `path` with `handler` once the plan is used up."""
        self._always[path] = handler

    def stall(self, path: str) -> None:
        """Never answer requests to `path` (until teardown)."""

        async def stall(_request: web.Request) -> web.Response:
            await self.release.wait()
            return web.Response(status=200)

        self._always[path] = stall

    def to(self, path: str) -> list[Seen]:
        """The requests `path` received, in order."""
        return [seen for seen in self.seen if seen.path == path]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.path, request.headers, body, time.monotonic()))
        plan = self._plans[request.path]
        handler = plan.popleft() if plan else self._always.get(request.path, self.handler)
        return await handler(request)

    @classmethod
    @asynccontextmanager
    async def serve(cls) -> AsyncIterator[Receiver]:
        """A running receiver, stopped (stalled requests released) on exit."""
        receiver = cls()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", receiver._handle)
        receiver.server = TestServer(app, host="127.0.0.1")
        await receiver.server.start_server()
        try:
            yield receiver
        finally:
            receiver.release.set()
            await receiver.server.close()


def _canned(status: int, body: str = "", headers: dict[str, str] | None = None) -> Handler:
    async def answer(_request: web.Request) -> web.Response:
        return web.Response(status=status, text=body or None, headers=headers)

    return answer
