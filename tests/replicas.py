"""`notifier run` as real processes, for the tests of the running service.

Each `Replica` is one `python -m notifier run` with its own HTTP port and its log in a
file (a pipe nobody reads would fill up and stall it). The test's own event loop keeps
serving the simulator and the receiver meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# `python -c LIMITED BYTES ARGS...`: the notifier with its address space capped (RLIMIT_AS)
# before it imports anything; set by the child itself, as preexec_fn is unsafe in a
# parent with threads.
LIMITED = (
    "import resource, sys; limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); "
    "from notifier.cli import main; sys.exit(main(sys.argv[2:]))"
)


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus exposition, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of one sample, or None if the exposition lacks it."""
    return samples.get((name, tuple(sorted(labels.items()))))


@dataclass
class Replica:
    """One `notifier run` process."""

    name: str
    env: dict[str, str]
    log: Path
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None
    # Bytes of address space the process may map (RLIMIT_AS): a test of memory bounds
    # fails with a MemoryError in the process instead of exhausting the machine.
    memory_limit: int | None = None

    async def start(self) -> Replica:
        """Start the process (again, after it exited: same port, log appended)."""
        env = {
            **os.environ,
            **self.env,
            "NOTIFIER_HTTP_HOST": "127.0.0.1",
            "NOTIFIER_HTTP_PORT": str(self.port),
        }
        command = [sys.executable, "-m", "notifier", "run"]
        if self.memory_limit:
            command[1:3] = ["-c", LIMITED, str(self.memory_limit)]
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *command, env=env, stdout=out, stderr=out
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

    async def metrics(self) -> Samples:
        """The samples of /metrics (none if the process does not answer)."""
        status, text = await self.get("/metrics")
        return parse_metrics(text) if status == 200 else {}

    async def metric(self, name: str, **labels: str) -> float | None:
        """One sample of /metrics, or None if absent (or the process does not answer)."""
        return sample(await self.metrics(), name, **labels)
