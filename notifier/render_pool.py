"""Run template renders on daemon threads with a deadline, off the event loop.

Each render gets a thread of its own: an idle one when there is one, else a new one, so a
runaway render never delays another. A render that outlives its deadline is stopped by
raising an exception inside its thread; its thread then ends, and a thread that cannot be
stopped (stuck inside one long C call) ends on its own when that call returns.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import Callable
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Generic, TypeVar

T = TypeVar("T")

# Threads kept waiting for the next render; more are started when renders overlap.
IDLE_THREADS = 4


class DeadlineExceeded(Exception):
    """A job ran longer than its deadline and was stopped."""


class _Interrupted(BaseException):
    """Raised inside a job's thread to stop it: a BaseException, so that no `except
    Exception` on its way (ours or Jinja's) swallows it."""


def _raise_in_thread(thread_id: int, exception: type[BaseException] | None) -> int:
    """Make `thread_id` raise `exception` at its next bytecode (None withdraws one not yet
    raised); the number of threads reached."""
    # Python has no way to kill a thread: this C API asks the interpreter to raise an
    # exception in another thread the next time that thread runs Python code. A thread
    # inside one long C call (a huge regular expression, a big-number power) sees it only
    # when the call returns, which is why a stopped thread is replaced and not waited for.
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exception) if exception else None
    )


class Job(Generic[T]):
    """One call to run on a pool thread; `future` gets its result or exception."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self.future: Future[T] = Future()
        self._fn = fn
        self._lock = threading.Lock()
        self._thread: int | None = None  # set while `fn` runs: the only time to interrupt it
        self._interrupted = False

    def run(self) -> None:
        """Call the function on this thread, unless the job was stopped before it started."""
        with self._lock:
            if not self.future.set_running_or_notify_cancel():
                return
            self._thread = threading.get_ident()
        try:
            result = self._fn()
        except BaseException as exc:  # _Interrupted too: its waiter has been answered already
            self._leave()
            self.future.set_exception(exc)
        else:
            self._leave()
            self.future.set_result(result)

    def _leave(self) -> None:
        with self._lock:
            self._thread = None

    def stop(self) -> None:
        """Cancel the job if it has not started, interrupt its thread if it is running;
        nothing once it has finished."""
        with self._lock:
            if self.future.cancel() or self._thread is None or self._interrupted:
                return
            reached = _raise_in_thread(self._thread, _Interrupted)
            if reached > 1:  # never expected; the C API's documentation says to undo it
                _raise_in_thread(self._thread, None)
            self._interrupted = reached == 1

    def close(self) -> bool:
        """After the job, on its thread: withdraw an interruption not yet raised; True if
        the job was interrupted (the thread then ends)."""
        with self._lock:
            self._thread = None
            if self._interrupted:
                _raise_in_thread(threading.get_ident(), None)
            return self._interrupted


class RenderPool:
    """Daemon threads for jobs with a deadline: one thread per job in flight, at most
    IDLE_THREADS kept for the next ones."""

    def __init__(self, idle: int = IDLE_THREADS) -> None:
        self._keep = idle
        self._idle: list[SimpleQueue[Job[object]]] = []
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], T], timeout_s: float) -> T:
        """`fn()` on a pool thread; `DeadlineExceeded`, and `fn` stopped, past `timeout_s`."""
        job = self._submit(fn)
        try:
            return job.future.result(timeout_s)
        except TimeoutError:
            if job.future.done():  # the job's own TimeoutError, or it ended just now
                return job.future.result()
            raise DeadlineExceeded(f"longer than {timeout_s:g} s") from None
        finally:
            job.stop()

    async def run_async(self, fn: Callable[[], T], timeout_s: float) -> T:
        """`run` for a coroutine: the event loop keeps running while `fn` does; cancelling
        the caller stops `fn` too."""
        job = self._submit(fn)
        waiter = asyncio.wrap_future(job.future)
        try:
            await asyncio.wait((waiter,), timeout=timeout_s)
            if not waiter.done():
                raise DeadlineExceeded(f"longer than {timeout_s:g} s")
            return waiter.result()
        finally:
            waiter.cancel()  # a late outcome is dropped, not logged as never retrieved
            job.stop()

    def _submit(self, fn: Callable[[], T]) -> Job[T]:
        job = Job(fn)
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), name="render", daemon=True).start()
        inbox.put(job)  # type: ignore[arg-type]
        return job

    def _serve(self, inbox: SimpleQueue[Job[object]]) -> None:
        """A pool thread: run jobs until one is interrupted, or until enough threads idle."""
        job: Job[object] | None = None
        while True:
            try:
                if job is not None and (job.close() or not self._park(inbox)):
                    return
                job = inbox.get()
                job.run()
            except _Interrupted:
                # Raised just outside the job's own `try` (as it started or ended): the
                # next turn's close() sees the interruption and ends this thread.
                continue

    def _park(self, inbox: SimpleQueue[Job[object]]) -> bool:
        with self._lock:
            if len(self._idle) >= self._keep:
                return False
            self._idle.append(inbox)
            return True
