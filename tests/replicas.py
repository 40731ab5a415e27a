"""`notifier run` as real processes, for the tests of the running service.

Each `Replica` is one `python -m notifier run` with its own HTTP port and its log in a
file (a pipe nobody reads would fill up and stall it). The test's own event loop keeps
serving the simulator and the receiver meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until `check()` holds; the seconds it took. Fails naming `what` after `timeout`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@dataclass
class Replica:
    """One `notifier run` process."""

    name: str
    env: dict[str, str]
    log: Path
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None

    async def start(self) -> Replica:
        """Start the process (again, after it exited: same port, log appended)."""
        env = {
            **os.environ,
            **self.env,
            "NOTIFIER_HTTP_HOST": "127.0.0.1",
            "NOTIFIER_HTTP_PORT": str(self.port),
        }
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "notifier", "run", env=env, stdout=out, stderr=out
            )
        return self

    @property
    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self.process is not None and self.process.returncode is None

    def send(self, signum: int) -> None:
        """Send a signal to the process."""
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind."""
        self.send(signal.SIGKILL)

    async def exited(self, timeout: float) -> int:
        """Wait for the process to exit; its exit code."""
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self) -> None:
        """Make sure the process is gone (a test's cleanup)."""
        if self.running:
            self.kill()
            await self.exited(10)

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def get(self, path: str) -> tuple[int, str]:
        """GET a path of its HTTP server: status and body; (0, why) if it does not answer."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get(url) as answer,
            ):
                return answer.status, await answer.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, repr(exc)

    async def ready(self, timeout: float = 20) -> None:
        """Wait until /readyz answers 200."""
        started = time.monotonic()
        while (answer := await self.get("/readyz"))[0] != 200:
            if not self.running:
                raise AssertionError(f"{self.name} exited:\n{self.output()[-3000:]}")
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{self.name} not ready within {timeout} s: {answer}")
            await asyncio.sleep(0.1)

    async def metrics(self) -> dict[tuple[str, Labels], float]:
        """The samples of /metrics, parsed by prometheus-client: (name, labels) -> value."""
        status, text = await self.get("/metrics")
        if status != 200:
            return {}
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async def metric(self, name: str, **labels: str) -> float | None:
        """One sample of /metrics, or None if absent (or the process does not answer)."""
        return (await self.metrics()).get((name, frozenset(labels.items())))
