"""Background loops stop when told to, even if a cancellation would have been lost."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from notifier.tasks import running, unless_stopped


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


async def test_unless_stopped_returns_the_result_of_work_that_finishes_first() -> None:
    async def work() -> str:
        return "done"

    assert await unless_stopped(work(), asyncio.Event()) == "done"


async def test_unless_stopped_cancels_the_work_once_stop_is_set() -> None:
    stop, cancelled = asyncio.Event(), asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    asyncio.get_running_loop().call_later(0.05, stop.set)
    assert await asyncio.wait_for(unless_stopped(forever(), stop), 2) is None
    assert cancelled.is_set()


async def test_unless_stopped_raises_what_the_work_raised() -> None:
    async def failing() -> None:
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        await unless_stopped(failing(), asyncio.Event())
