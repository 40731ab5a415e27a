"""What the benchmarks share: a redis-server of their own, child processes, sample events.

The benchmarks run as scripts (`python bench/NAME.py`), so this module is imported by
its bare name.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis

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
