"""Background loops stop when told to, even if a cancellation would have been lost."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from notifier.tasks import running


async def test_a_loop_that_would_swallow_a_cancellation_still_stops() -> None:
    beats = 0

    async def stubborn(stop: asyncio.Event) -> None:
        nonlocal beats
        while not stop.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # as redis-py on 3.11 may
                await asyncio.sleep(0.01)
            beats += 1

    async with running(stubborn):
        await asyncio.sleep(0.05)
    # Leaving the block returned: the loop ended by its event, and is not running on.
    seen = beats
    await asyncio.sleep(0.03)
    assert beats == seen > 0


async def test_a_loop_waiting_on_its_wake_event_is_woken_to_stop() -> None:
    wake = asyncio.Event()
    stopped = []

    async def waiter(stop: asyncio.Event) -> None:
        while True:
            await wake.wait()
            wake.clear()
            if stop.is_set():
                stopped.append(True)
                return

    async with running(waiter, wake=wake):
        await asyncio.sleep(0)
    assert stopped == [True]


async def test_an_error_of_the_loop_reaches_the_caller() -> None:
    async def broken(_stop: asyncio.Event) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        async with running(broken):
            await asyncio.sleep(0)
