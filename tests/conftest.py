"""Shared fixtures: every Redis test runs on fakeredis and on a real redis-server.

The real server is started by the fixture itself on a free port (never 6379) with
persistence off, once per session, and flushed before each test. It is skipped only
when the `redis-server` binary is missing and `CI` is unset; in CI it must run.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import fakeredis
import pytest
import redis
import redis.asyncio

from notifier.simulator import Simulator
from notifier.store import connect_redis

from receiver import Receiver
from samples import SIMULATOR_KEY

pytest_plugins = ["pytester"]

# Clients decode replies to str: the notifier stores text only (JSON, ids, statuses).
RedisFactory = Callable[[], redis.asyncio.Redis]


class FakeClock:
    """A clock the test moves by hand, in unix seconds as `time.time` gives them."""

    START = 1_700_000_000.0

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def at(self, offset: float) -> FakeClock:
        """Set the time to `offset` seconds after the start; returns itself."""
        self.now = self.START + offset
        return self

    def advance(self, seconds: float) -> None:
        """Move the time on by `seconds`."""
        self.now += seconds

    @property
    def ms(self) -> int:
        """Now in unix milliseconds, as retry scores and routes-seen keep it."""
        return round(self.now * 1000)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def eventually(
    probe: Callable[[], object], what: str = "the condition", *, timeout: float = 10.0
) -> float:
    """Wait until `probe()` (a value, or an awaitable of one) is true, looking every 20 ms;
    the seconds it took. Fails naming `what` after `timeout` seconds."""
    started = time.monotonic()
    while True:
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:g} s"
        await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no NOTIFIER_* or CHAMELAION_API_KEY from the developer's shell."""
    for name in list(os.environ):
        if name.startswith("NOTIFIER_") or name == "CHAMELAION_API_KEY":
            monkeypatch.delenv(name)


class RedisServer:
    """A redis-server process of the test session; tests may stop and restart it."""

    def __init__(self, binary: str, workdir: Path, password: str | None = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on the same port as before (a restart keeps the URL) and wait for PING."""
        self.process = subprocess.Popen(
            [
                self.binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
                *("--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")),
                *(("--requirepass", self.password) if self.password else ()),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited on port {self.port}:\n{log}")
            try:
                with redis.Redis(
                    port=self.port, password=self.password, socket_connect_timeout=0.2
                ) as client:
                    client.ping()
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} within 10 s")

    def stop(self) -> None:
        """Stop the server and wait for it; its data is gone (no persistence)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def redis_binary() -> str:
    """The redis-server binary; the test is skipped without it, unless CI is set."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed, and CI must run the real-Redis tests")
        pytest.skip("redis-server is not installed (install it to run the real-Redis tests)")
    return binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the whole session."""
    server = RedisServer(redis_binary(), tmp_path_factory.mktemp("redis-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_with_password(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server that requires a password (`url` carries the right one)."""
    server = RedisServer(
        redis_binary(), tmp_path_factory.mktemp("redis-auth"), password="ZZLEAK-right-pw"
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["fakeredis", "redis-server"])
async def redis_factory(request: pytest.FixtureRequest) -> AsyncIterator[RedisFactory]:
    """Makes clients of one empty Redis: fakeredis (with Lua) or the real server."""
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()

        def make() -> redis.asyncio.Redis:
            return fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    else:
        url = request.getfixturevalue("redis_server").url

        def make() -> redis.asyncio.Redis:
            return connect_redis(url)

    clients: list[redis.asyncio.Redis] = []

    def factory() -> redis.asyncio.Redis:
        clients.append(make())
        return clients[-1]

    await factory().flushall()
    yield factory
    for client in clients:
        await client.aclose()


@pytest.fixture
def redis_client(redis_factory: RedisFactory) -> redis.asyncio.Redis:
    """One client of an empty Redis, on both backends."""
    return redis_factory()


@pytest.fixture
def simulator() -> Simulator:
    """An empty simulated account (seeded: the same ids every run); shape it in the test."""
    return Simulator(api_key=SIMULATOR_KEY, seed=20261124)


@pytest.fixture
async def api_url(simulator: Simulator) -> AsyncIterator[str]:
    """The base URL (API_URL) of the simulator, served in-process on a free port."""
    async with simulator.serve() as url:
        yield url


@pytest.fixture
async def webhook_receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver on 127.0.0.1 that records requests and answers as planned."""
    async with Receiver.serve() as receiver:
        yield receiver
