"""What the benchmarks share: a redis-server of their own, the simulator in a process of its
own, child processes and their settings, sample events.

The benchmarks run as scripts (`python bench/NAME.py`), so this module is imported by
its bare name.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis

import notifier
from notifier.models import Event, LipsyncRequest


def free_port() -> int:
    """A free TCP port on 127.0.0.1, never the system Redis's 6379."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port != 6379:
            return port


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate a child process, killing it if it does not exit within 10 s."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until(process: subprocess.Popen[bytes], ready: Callable[[], bool], what: str) -> None:
    """Return once `ready()` holds; raise if the process exits or 10 s pass first."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer within 10 s")


def redis_answers(port: int) -> bool:
    """Whether a Redis on 127.0.0.1:`port` answers PING."""
    try:
        with redis.Redis(port=port, socket_connect_timeout=0.2) as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False


@contextmanager
def redis_server() -> Iterator[int]:
    """A redis-server with persistence off in a temporary directory; yields its port."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed; install it to run this benchmark")
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as workdir:
        port = free_port()
        process = subprocess.Popen(
            [
                binary,
                *("--port", str(port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
                *("--dir", workdir, "--logfile", str(Path(workdir) / "redis.log")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(process, lambda: redis_answers(port), "redis-server")
            yield port
        finally:
            stop(process)


@dataclass(frozen=True)
class SimulatorProcess:
    """A simulator running in a process of its own."""

    url: str  # the API base URL, NOTIFIER_API_URL
    pid: int


@contextmanager
def simulator_process(
    requests: int,
    key: str,
    *,
    seed: int = 1,
    max_limit: int | None = None,
    options: Sequence[str] = (),
) -> Iterator[SimulatorProcess]:
    """`python -m notifier.simulator` in its own process, frozen (`--tick 0`), with `requests`
    backfilled requests (newest first, the default order) and more `options` (a fault)."""
    limit = ("--max-limit", str(max_limit), *options) if max_limit is not None else options
    process = subprocess.Popen(
        [
            sys.executable,
            *("-m", "notifier.simulator", "--port", "0", "--tick", "0", "--seed", str(seed)),
            *("--requests", str(requests), "--api-key", key, *limit),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        for line in process.stdout or ():
            if match := re.search(rb"(http://\S+/api)", line):
                url = match.group(1).decode()
                break
        else:
            raise RuntimeError("the simulator exited before printing its URL")
        yield SimulatorProcess(url, process.pid)
    finally:
        stop(process)


# Other processes of the machine using more than this share of a core while a benchmark
# measures make its figures suspect (the benchmark's own process and the kernel land here).
BACKGROUND_WARNING = 0.15


def machine_cpu_seconds() -> float:
    """CPU seconds every process of the machine has used so far, on all cores (Linux)."""
    ticks = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    busy = sum(int(ticks[index]) for index in (0, 1, 2, 5, 6, 7))  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a running process has used so far (Linux: /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def notifier_command(*args: str) -> list[str]:
    """The `notifier` console script of this interpreter's environment, with `args`."""
    script = shutil.which("notifier", path=str(Path(sys.executable).parent))
    return [script, *args] if script else [sys.executable, "-m", "notifier", *args]


def notifier_source() -> str:
    """The directory the notifier under test is imported from, here and in the children
    (PYTHONPATH may point at another checkout, e.g. an export of an earlier commit)."""
    return str(Path(notifier.__file__).parent)


def notifier_env(**settings: str) -> dict[str, str]:
    """The environment of a notifier child: this one's without any NOTIFIER_ or CHAMELAION_
    variable, plus `settings` as NOTIFIER_<NAME> (`api_url=...` -> NOTIFIER_API_URL)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("NOTIFIER_", "CHAMELAION_"))
    }
    env.update({f"NOTIFIER_{name.upper()}": value for name, value in settings.items()})
    return env


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> str:
    """A Markdown table: the first `left` columns left-aligned, the others (figures) right."""
    align = [*["---"] * left, *["---:"] * (len(headers) - left)]
    lines = [headers, align, *([str(cell) for cell in row] for row in rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def events(count: int, status: str) -> list[Event]:
    """`count` distinct events of requests entering `status`, as the poller queues them."""
    created = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    return [
        Event(
            LipsyncRequest(
                id=f"6f82a2d8-a6d4-4e8a-a0fa-{n:012d}",
                status=status,
                reference_id=f"order-{n // 300}-japanese-dub",
                created_at=created,
                started_at=created + timedelta(seconds=4),
                finished_at=created + timedelta(seconds=65 + n % 50),
                output_url=f"https://storage.chamelaion.com/output/{n}.mp4"
                if status == "completed"
                else None,
                error_message="Face tracking lost in frames 120-480; " * 5
                if status == "failed"
                else None,
            ),
            previous_status="processing",
            detected_ms=1_790_000_000_000 + n,
        )
        for n in range(count)
    ]
