"""Background loops that stop when asked, never by cancellation.

On Python 3.11, redis-py sends each command through `asyncio.wait_for`, which can
swallow a cancellation that arrives as the command completes (fixed in 3.12): a loop
cancelled that way keeps running, and whoever awaits it waits forever. So a loop that
talks to Redis is told to stop with an event, and finishes the call it is in.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

T = TypeVar("T")

# How long a cancelled piece of work gets to notice; on 3.11 a Redis call may swallow the
# cancellation, and the work then runs on to its next await (where a stop is checked).
CANCEL_WAIT_S = 1.0


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


async def unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """The result of `work`, or None if `stop` was set first (then `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    # Retrieve whatever it ends with, even if that is after we stop waiting for it.
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
    return None
