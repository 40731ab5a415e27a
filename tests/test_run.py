"""`notifier run` as operators run it: real processes, signals and SIGKILL, several replicas
on one real redis-server, the simulator and a receiver on 127.0.0.1.

The contract: SIGTERM stops polling at once, lets sends in flight finish for up to 7 s,
hands the rest back (due now) and exits 0 by 9 s; a second signal exits at once; nothing
seen is ever lost, even to SIGKILL; replicas share the work without duplicates and take
over polling within one lease TTL; a Redis that lost its data means a new baseline.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from notifier.lease import MIN_TTL_S
from notifier.models import event_id
from notifier.simulator import SimulatedRequest, Simulator
from notifier.store import connect_redis

from conftest import RedisServer, eventually
from receiver import Receiver
from replicas import Replica
from samples import SIMULATOR_KEY

HOOK = "/hook"
GRACE_S, EXIT_BY_S = 7.0, 9.0


@dataclass
class Rig:
    """The simulator, the receiver and the `notifier run` processes of one test."""

    simulator: Simulator
    receiver: Receiver
    env: dict[str, str]
    logs: Path
    replicas: list[Replica] = field(default_factory=list)

    def replica(self, name: str, **env: str) -> Replica:
        """A `notifier run` process, not started yet."""
        replica = Replica(name, {**self.env, **env}, self.logs / f"{name}.log")
        self.replicas.append(replica)
        return replica

    def processing(self, count: int) -> list[SimulatedRequest]:
        """`count` requests in processing (a baseline will record them silently)."""
        requests = self.simulator.create(count, reference_id="episode-7")
        for request in requests:
            self.simulator.start(request.id)
        return requests

    def finish(self, requests: list[SimulatedRequest], status: str = "completed") -> list[str]:
        """Finish requests in the simulator; the event ids their notifications carry."""
        for request in requests:
            (self.simulator.complete if status == "completed" else self.simulator.fail)(request.id)
        return [event_id(request.id, status) for request in requests]

    def delivered(self) -> Counter[str]:
        """How many times the receiver got each event id."""
        return Counter(seen.event_id for seen in self.receiver.to(HOOK) if seen.event_id)


@pytest.fixture
async def rig(
    redis_server: RedisServer,
    simulator: Simulator,
    api_url: str,
    webhook_receiver: Receiver,
    tmp_path: Path,
) -> AsyncIterator[Rig]:
    client = connect_redis(redis_server.url)
    await client.flushall()
    await client.aclose()
    rig = Rig(
        simulator,
        webhook_receiver,
        {
            "NOTIFIER_API_URL": api_url,
            "NOTIFIER_API_KEY": SIMULATOR_KEY,
            "NOTIFIER_REDIS_URL": redis_server.url,
            "NOTIFIER_WEBHOOK_URL": webhook_receiver.url(HOOK),
            "NOTIFIER_POLL_INTERVAL": "0.5",
            "NOTIFIER_RETRY_BASE_DELAY": "0.5",
            "NOTIFIER_RETRY_MAX_DELAY": "2",
        },
        tmp_path,
    )
    try:
        yield rig
    finally:
        for replica in rig.replicas:
            await replica.stop()


async def _slow(_request: web.Request) -> web.Response:
    await asyncio.sleep(3)
    return web.Response(text="ok")


async def _signal_and_time_exit(replica: Replica, timeout: float = 15) -> tuple[int, float]:
    """SIGTERM the replica; its exit code and how long it took to exit."""
    signalled = time.monotonic()
    replica.send(signal.SIGTERM)
    code = await replica.exited(timeout)
    took = time.monotonic() - signalled
    print(f"\n{replica.name} exited with {code} {took:.2f} s after SIGTERM")
    return code, took


async def test_sigterm_lets_sends_in_flight_finish_and_exits_0_in_time(rig: Rig) -> None:
    requests = rig.processing(12)
    replica = await rig.replica("a").start()
    await replica.ready()
    rig.receiver.handle(HOOK, _slow)  # every send takes 3 s
    expected = rig.finish(requests)
    await eventually(lambda: len(rig.receiver.seen) >= 4, "four sends in flight", timeout=10)

    in_flight = len(rig.receiver.seen)
    code, took = await _signal_and_time_exit(replica)

    assert code == 0, replica.output()[-3000:]
    assert 2.5 < took < 4.5  # the 3 s sends were waited for, and no more were started
    assert len(rig.receiver.seen) == in_flight
    assert "handed back at shutdown" not in replica.output()
    rig.receiver.always(HOOK, 200, "ok")
    await replica.start()
    await eventually(lambda: set(rig.delivered()) == set(expected), "all 12 delivered", timeout=20)
    # The sends that finished during the grace were recorded: none was sent twice.
    assert max(rig.delivered().values()) == 1


async def test_sends_still_in_flight_after_7_s_are_handed_back_due_now(rig: Rig) -> None:
    requests = rig.processing(3)
    replica = await rig.replica("a", NOTIFIER_LOG_FORMAT="json").start()
    await replica.ready()
    rig.receiver.stall(HOOK)
    expected = rig.finish(requests)
    await eventually(lambda: len(rig.receiver.seen) == 3, "three sends in flight", timeout=10)

    code, took = await _signal_and_time_exit(replica)

    assert code == 0
    assert GRACE_S <= took < EXIT_BY_S
    lines = [json.loads(line) for line in replica.output().splitlines()]
    handed_back = {
        line["event_id"] for line in lines if "handed back at shutdown" in line["message"]
    }
    assert handed_back == set(expected)
    rig.receiver.always(HOOK, 200, "ok")
    restarted = time.monotonic()
    await replica.start()
    await eventually(lambda: len(rig.receiver.seen) == 6, "the three sent again", timeout=10)
    assert time.monotonic() - restarted < 5  # due now: not after a backoff

    def delivered_at_attempt_1() -> set[str]:
        lines = [json.loads(line) for line in replica.output().splitlines()]
        return {line["event_id"] for line in lines if line["message"].endswith("attempt 1")}

    # Attempts unchanged: the second send is still attempt 1 (logged once recorded).
    await eventually(lambda: delivered_at_attempt_1() == set(expected), "attempt 1", timeout=5)


async def test_a_second_signal_exits_at_once_and_loses_nothing(rig: Rig) -> None:
    requests = rig.processing(2)
    replica = await rig.replica("a").start()
    await replica.ready()
    rig.receiver.stall(HOOK)
    expected = rig.finish(requests)
    await eventually(lambda: len(rig.receiver.seen) == 2, "two sends in flight", timeout=10)
    replica.send(signal.SIGTERM)
    await asyncio.sleep(0.5)

    code, took = await _signal_and_time_exit(replica)

    assert code == 128 + signal.SIGTERM
    assert took < 1.5
    rig.receiver.always(HOOK, 200, "ok")
    await replica.start()
    # Taken over once the dead process's heartbeat lapses (5 s).
    await eventually(lambda: len(rig.receiver.seen) == 4, "both sent again", timeout=15)
    assert set(rig.delivered()) == set(expected)


async def _slower(_request: web.Request) -> web.Response:
    await asyncio.sleep(0.05)  # 80 deliveries a second at 4 in flight: kills land mid-way
    return web.Response(text="ok")


async def _kill_and_restart(replica: Replica, rig: Rig, kills: list[str]) -> None:
    leader = await replica.metric("notifier_poller_leader") == 1
    kills.append(f"{'leader' if leader else 'standby'} after {len(rig.receiver.seen)}")
    replica.kill()
    await replica.exited(10)
    await replica.start()


async def test_sigkill_five_times_during_200_transitions_loses_none(rig: Rig) -> None:
    rng = random.Random(20261124)
    requests = rig.processing(200)
    replica = await rig.replica("a", NOTIFIER_LOG_FORMAT="json").start()
    await replica.ready()
    rig.receiver.handle(HOOK, _slower)
    order = rng.sample(requests, len(requests))
    failing = set(rng.sample(range(200), 20))
    expected = [
        *rig.finish([r for i, r in enumerate(order[:100]) if i not in failing]),
        *rig.finish([r for i, r in enumerate(order[:100]) if i in failing], "failed"),
    ]
    kills: list[str] = []
    for _ in range(2):  # while the first 100 are being delivered
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        await _kill_and_restart(replica, rig, kills)
    expected += rig.finish(order[100:])
    for _ in range(3):  # once a restarted process polls again (the lease lasts 10 s)
        while await replica.metric("notifier_poller_leader") != 1:
            await asyncio.sleep(0.1)
        await asyncio.sleep(rng.uniform(0.0, 1.0))
        await _kill_and_restart(replica, rig, kills)

    await eventually(lambda: set(rig.delivered()) == set(expected), "all 200 delivered", timeout=60)
    counts = rig.delivered()
    duplicates = {event: count for event, count in counts.items() if count > 1}
    print(
        f"\nkills: {'; '.join(kills)}\n{len(rig.receiver.seen)} deliveries of 200 "
        f"transitions: {len(duplicates)} events arrived more than once "
        f"({sum(duplicates.values()) - len(duplicates)} extra deliveries)"
    )
    bodies: dict[str, set[bytes]] = {}
    for seen in rig.receiver.to(HOOK):
        bodies.setdefault(seen.event_id or "", set()).add(seen.body)
    assert all(len(variants) == 1 for variants in bodies.values())  # same id, same body
    assert len(counts) == 200


async def _leaders(replicas: list[Replica]) -> list[Replica]:
    return [r for r in replicas if r.running and await r.metric("notifier_poller_leader") == 1]


async def test_three_replicas_share_300_transitions_and_take_over_polling(rig: Rig) -> None:
    requests = rig.processing(320)
    replicas = [await rig.replica(name).start() for name in ("a", "b", "c")]
    for replica in replicas:
        await replica.ready()
    expected = []
    for wave in range(3):
        expected += rig.finish(requests[wave * 100 : (wave + 1) * 100])
        await asyncio.sleep(0.5)

    await eventually(lambda: set(rig.delivered()) == set(expected), "300 delivered", timeout=30)
    await asyncio.sleep(1)  # a duplicate would arrive meanwhile

    assert len(rig.receiver.seen) == 300  # none lost, none twice
    shares = [
        await r.metric("notifier_deliveries_total", route="webhook", outcome="delivered") or 0
        for r in replicas
    ]
    print(f"\ndeliveries per replica: {shares}")
    assert sum(shares) == 300
    assert sum(share > 0 for share in shares) >= 2  # all deliver, not only the poller
    [leader] = await _leaders(replicas)
    leader.kill()
    killed = time.monotonic()
    more = rig.finish(requests[300:])
    while not (leaders := await _leaders(replicas)):
        assert time.monotonic() - killed < MIN_TTL_S + 2, "no replica took over polling"
        await asyncio.sleep(0.1)
    took = time.monotonic() - killed
    print(f"replica {leaders[0].name} took over polling {took:.1f} s after the kill")
    assert took <= MIN_TTL_S + 1  # one lease TTL (10 s at this poll interval), plus a cycle
    await eventually(lambda: set(more) <= set(rig.delivered()), "20 more delivered", timeout=15)


async def test_redis_restarting_empty_means_a_new_silent_baseline(
    rig: Rig, redis_server: RedisServer
) -> None:
    requests = rig.processing(8)
    replica = await rig.replica("a").start()
    await replica.ready()
    first = rig.finish(requests[:3])
    await eventually(
        lambda: set(rig.delivered()) == set(first), "first three delivered", timeout=10
    )

    redis_server.stop()
    try:
        started = time.monotonic()
        while (answer := await replica.get("/readyz"))[0] != 503:
            assert time.monotonic() - started < 5, answer
            await asyncio.sleep(0.1)
        assert "Redis" in json.loads(answer[1])["reason"]
        rig.finish(requests[3:5])  # seen only by the new baseline: recorded silently
        await asyncio.sleep(2)
    finally:
        redis_server.start()
    await replica.ready(30)
    later = rig.finish(requests[5:])
    await eventually(lambda: set(later) <= set(rig.delivered()), "later ones delivered", timeout=15)

    assert set(rig.delivered()) == {*first, *later}  # nothing notified twice, no flood
    assert max(rig.delivered().values()) == 1
    output = replica.output()
    assert output.count("Redis lost its data") == 1
    assert "NOGROUP" not in output
    assert await replica.metric("notifier_rebaselines_total") == 1
    noisy = [line for line in output.splitlines() if " WARNING " in line or " ERROR " in line]
    assert len(noisy) < 40, "\n".join(noisy)


async def test_a_key_the_api_rejects_at_start_up_exits_2_with_its_message(rig: Rig) -> None:
    replica = await rig.replica("a", NOTIFIER_API_KEY="sk-wrong-key-ZZ").start()

    code = await replica.exited(15)

    output = replica.output()
    assert code == 2
    assert output.startswith("notifier: the Chamelaion API rejected the API key")
    assert output.count("\n") == 1  # one paragraph, and no log line before it
    assert "invalid token" in output
    assert "NOTIFIER_API_KEY" in output
    assert "Traceback" not in output
    assert "sk-wrong-key-ZZ" not in output
