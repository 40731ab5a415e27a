"""Background loops that stop when asked, never by cancellation.

On Python 3.11, redis-py sends each command through `asyncio.wait_for`, which can
swallow a cancellation that arrives as the command completes (fixed in 3.12): a loop
cancelled that way keeps running, and whoever awaits it waits forever. So a loop that
talks to Redis is told to stop with an event, and finishes the call it is in.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager


@asynccontextmanager
async def running(
    loop: Callable[[asyncio.Event], Awaitable[None]], *, wake: asyncio.Event | None = None
) -> AsyncIterator[None]:
    """Run `loop(stop)` in the background while the block runs; then set `stop` (and
    `wake`, an event the loop may be waiting on) and wait for the loop to return."""
    stop = asyncio.Event()
    task = asyncio.create_task(loop(stop))
    try:
        yield
    finally:
        stop.set()
        if wake is not None:
            wake.set()
        await task
