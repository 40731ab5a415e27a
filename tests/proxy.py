"""A TCP proxy in front of a real server that a test can cut and restore: an outage of
Redis (or anything on TCP) that keeps the server's data, as a network failure does.

While cut, open connections are dropped and new ones are closed as soon as accepted, so
clients see the errors a vanished server gives them, whatever client library they use.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

CHUNK = 64 * 1024


class CutProxy:
    """Forwards 127.0.0.1:`port` to `target_port` until `cut()`, and again after `restore()`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.is_cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    def url(self, db: int = 0) -> str:
        """A redis:// URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    @classmethod
    @contextlib.asynccontextmanager
    async def serve(cls, target_port: int) -> AsyncIterator[CutProxy]:
        """A proxy listening on a free port for the duration of the block."""
        proxy = cls(target_port)
        proxy._server = await asyncio.start_server(proxy._accept, "127.0.0.1", 0)
        proxy.port = proxy._server.sockets[0].getsockname()[1]
        try:
            yield proxy
        finally:
            proxy.cut()
            proxy._server.close()
            await proxy._server.wait_closed()

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until `restore()`."""
        self.is_cut = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        """Forward new connections again."""
        self.is_cut = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, upstream_writer}
        await asyncio.gather(
            _pipe(reader, upstream_writer), _pipe(upstream_reader, writer), return_exceptions=True
        )
        for end in (writer, upstream_writer):
            self._writers.discard(end)
            end.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until either end closes."""
    try:
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            await writer.drain()
    finally:
        writer.transport.abort()
