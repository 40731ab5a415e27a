"""Reading HTTP bodies without trusting their size: at most so many bytes, whatever the
peer sends or claims in its headers."""

from __future__ import annotations

import aiohttp


async def read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to `limit` bytes, decompressed (one `read` may return only the first
    chunk, so this reads until the limit or the end)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit and (chunk := await content.read(limit - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
