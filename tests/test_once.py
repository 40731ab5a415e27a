"""`notifier once`, `dlq list` and `dlq replay` as cron and a person run them: real
processes against the simulator, a receiver on 127.0.0.1 and a real redis-server.

`once` exits 0 when everything was sent, 3 when retries are left or this run
dead-lettered something, 1 when the cycle failed, and 2 for a rejected API key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import pytest
from standardwebhooks.webhooks import Webhook

from notifier.models import event_id
from notifier.simulator import Fault, FaultKind, SimulatedRequest, Simulator

from conftest import RedisServer
from receiver import Receiver
from samples import SIMULATOR_KEY

SECRET = "whsec_" + base64.b64encode(b"ZZLEAK-once-signing-key").decode()
EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_LEFT = 0, 1, 2, 3


@dataclass(frozen=True)
class Ran:
    """A finished `notifier` process."""

    code: int
    stdout: str
    stderr: str

    def assert_no_secret(self) -> None:
        for secret in (SIMULATOR_KEY, SECRET, "ZZLEAK"):
            assert secret not in self.stdout + self.stderr


@dataclass
class Cron:
    """Runs `notifier` commands as separate processes while this loop serves the
    simulator and the receiver."""

    env: dict[str, str]
    simulator: Simulator
    receiver: Receiver

    async def run(self, *args: str, **env: str) -> Ran:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "notifier",
            *args,
            env={**os.environ, **self.env, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        ran = Ran(process.returncode, stdout.decode(), stderr.decode())
        ran.assert_no_secret()
        return ran

    def finish(self, requests: list[SimulatedRequest], status: str = "completed") -> list[str]:
        """Finish processing requests in the simulator; their expected event ids."""
        for request in requests:
            (self.simulator.complete if status == "completed" else self.simulator.fail)(request.id)
        return [event_id(request.id, status) for request in requests]

    async def baseline(self, count: int) -> list[SimulatedRequest]:
        """`count` processing requests, recorded silently by a first `once`."""
        requests = self.simulator.create(count, reference_id="episode-12")
        for request in requests:
            self.simulator.start(request.id)
        ran = await self.run("once")
        assert ran.code == EXIT_DONE, ran.stderr
        assert "baseline" in ran.stdout
        return requests


@pytest.fixture
async def cron(
    redis_server: RedisServer, simulator: Simulator, api_url: str, webhook_receiver: Receiver
) -> Cron:
    await _flush(redis_server)
    return Cron(
        {
            "NOTIFIER_API_URL": api_url,
            "NOTIFIER_API_KEY": SIMULATOR_KEY,
            "NOTIFIER_REDIS_URL": redis_server.url,
            "NOTIFIER_WEBHOOK_URL": webhook_receiver.url("/hook"),
            "NOTIFIER_WEBHOOK_SECRET": SECRET,
            "NOTIFIER_RETRY_BASE_DELAY": "30",  # a retry is never due within the test
            "NOTIFIER_POLL_INTERVAL": "1",
        },
        simulator,
        webhook_receiver,
    )


async def _flush(redis_server: RedisServer) -> None:
    from notifier.store import connect_redis  # noqa: PLC0415

    client = connect_redis(redis_server.url)
    await client.flushall()
    await client.aclose()


async def test_once_delivers_what_changed_and_exits_0(cron: Cron) -> None:
    requests = await cron.baseline(3)
    expected = cron.finish(requests[:2])

    ran = await cron.run("once")

    assert ran.code == EXIT_DONE, ran.stderr
    assert sorted(seen.event_id for seen in cron.receiver.seen) == sorted(expected)
    for seen in cron.receiver.seen:
        Webhook(SECRET).verify(seen.body, dict(seen.headers))
    assert "2 delivered" in ran.stdout
    assert "left: 0 retries, 0 pending, 0 unread" in ran.stdout


async def test_once_exits_3_while_retries_are_scheduled(cron: Cron) -> None:
    requests = await cron.baseline(1)
    cron.finish(requests)
    cron.receiver.plan("/hook", (503, "busy"))

    ran = await cron.run("once")

    assert ran.code == EXIT_LEFT, ran.stderr
    assert "1 scheduled for retry" in ran.stdout
    assert "left: 1 retry, 0 pending" in ran.stdout  # said in the singular
    assert ran.stdout.startswith("cycle: 1 request listed, 1 event queued\n")


async def test_once_exits_3_only_for_dead_letters_of_its_own_run(cron: Cron) -> None:
    requests = await cron.baseline(1)
    [expected] = cron.finish(requests, "failed")
    cron.receiver.plan("/hook", (400, "no such channel"))

    first = await cron.run("once")
    second = await cron.run("once")  # nothing new: the old dead letter does not count

    assert (first.code, second.code) == (EXIT_LEFT, EXIT_DONE)
    assert "1 dead-lettered" in first.stdout
    listed = await cron.run("dlq", "list")
    assert listed.code == 0
    [line] = [json.loads(text) for text in listed.stdout.splitlines()]
    assert set(line) >= {"id", "route", "request_id", "status", "attempts", "error", "time"}
    assert (line["route"], line["request_id"], line["status"]) == (
        "webhook",
        requests[0].id,
        "failed",
    )
    assert (line["attempts"], line["error"]) == (1, "HTTP 400: no such channel")
    assert line["event_id"] == expected


async def test_a_replayed_dead_letter_is_delivered_by_the_next_once_with_its_id(
    cron: Cron,
) -> None:
    requests = await cron.baseline(1)
    [expected] = cron.finish(requests)
    cron.receiver.plan("/hook", (400, "bad"))
    assert (await cron.run("once")).code == EXIT_LEFT
    [line] = [json.loads(text) for text in (await cron.run("dlq", "list")).stdout.splitlines()]

    replayed = await cron.run("dlq", "replay", line["id"])
    assert replayed.code == 0, replayed.stderr
    assert replayed.stdout == f"replayed {line['id']} to route webhook\n"
    assert (await cron.run("dlq", "list")).stdout == ""
    delivered = await cron.run("once")

    assert delivered.code == EXIT_DONE, delivered.stderr
    assert [seen.event_id for seen in cron.receiver.seen] == [expected, expected]
    assert cron.receiver.seen[0].body == cron.receiver.seen[1].body


async def test_replaying_an_unknown_id_exits_2_naming_it(cron: Cron) -> None:
    ran = await cron.run("dlq", "replay", "1-0")
    assert ran.code == EXIT_USAGE
    assert "no dead letter with id 1-0" in ran.stderr
    assert "Traceback" not in ran.stderr


async def test_once_exits_1_when_the_api_fails_and_still_delivers_what_is_due(
    cron: Cron,
) -> None:
    requests = await cron.baseline(1)
    cron.finish(requests)
    cron.receiver.plan("/hook", (503, "busy"))
    assert (await cron.run("once")).code == EXIT_LEFT  # queued, then a retry scheduled
    cron.simulator.inject(Fault(FaultKind.SERVER_ERROR), count=100)

    ran = await cron.run("once", NOTIFIER_RETRY_BASE_DELAY="0.01")  # nothing is due yet

    assert ran.code == EXIT_FAILED
    assert "failed: poll cycle" in ran.stdout


async def test_once_exits_2_quoting_the_api_when_the_key_is_rejected(cron: Cron) -> None:
    cron.simulator.revoked_keys.add(SIMULATOR_KEY)

    ran = await cron.run("once")

    assert ran.code == EXIT_USAGE
    assert ran.stdout == ""
    assert "rejected the API key" in ran.stderr
    assert "(HTTP 403: unauthorized)" in ran.stderr  # the API's own words
    assert "NOTIFIER_API_KEY" in ran.stderr
    # The key is checked first, so the message is all there is: one paragraph.
    assert ran.stderr.startswith("notifier: the Chamelaion API rejected")
    assert ran.stderr.count("\n") == 1
    assert "Traceback" not in ran.stderr


async def test_once_without_a_route_exits_2(cron: Cron) -> None:
    ran = await cron.run("once", NOTIFIER_WEBHOOK_URL="", NOTIFIER_WEBHOOK_SECRET="")
    assert ran.code == EXIT_USAGE
    assert "no route is configured" in ran.stderr


async def test_once_from_cron_sees_each_step_of_a_day_old_request_in_the_next_run(
    cron: Cron,
) -> None:
    # A request that sat in the queue overnight, far from the head of the listing.
    cron.simulator.backfill(500)
    (old,) = cron.simulator.create(created_at=cron.simulator.clock() - timedelta(days=1))
    assert (await cron.run("once")).code == EXIT_DONE  # the baseline

    cron.simulator.start(old.id)
    ran = await cron.run("once")
    assert ran.code == EXIT_DONE, ran.stderr
    assert cron.receiver.seen == []  # processing is not notified, but it is recorded

    (expected,) = cron.finish([old])
    ran = await cron.run("once")
    assert ran.code == EXIT_DONE, ran.stderr
    (seen,) = cron.receiver.seen
    assert seen.event_id == expected
    assert seen.json()["data"]["previous_status"] == "processing"
