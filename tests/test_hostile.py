"""Hostile input never stops `notifier run`: real processes against the simulator, which
answers every list call with a hostile body, and against hostile templates. The memory
cases run under an address-space limit (RLIMIT_AS), so a regression fails the test with
a MemoryError in the child instead of exhausting the machine; how much memory each case
takes is measured by `bench/hostile.py`, not here.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from notifier.simulator import Fault, FaultKind, Simulator

from conftest import eventually
from receiver import Receiver
from replicas import Replica
from samples import SIMULATOR_KEY

MiB = 1024 * 1024
# Well above what `notifier run` maps under these cases (bench/hostile.py), well below
# what the unbounded code took (23 GB for a total of 10^12).
MEMORY_LIMIT = 1024 * MiB


@dataclass
class Rig:
    """The simulator, a receiver, and the `notifier run` processes of one test."""

    simulator: Simulator
    receiver: Receiver
    env: dict[str, str]
    logs: Path
    replicas: list[Replica] = field(default_factory=list)

    async def run(self, memory_limit: int | None = None, **env: str) -> Replica:
        """A started `notifier run` (in-memory store), up once /healthz answers."""
        replica = Replica("run", {**self.env, **env}, self.logs / "run.log")
        replica.memory_limit = memory_limit
        self.replicas.append(replica)
        await replica.start()
        await eventually(lambda: _answers(replica, "/healthz"), "/healthz answers", timeout=20)
        return replica


async def _answers(replica: Replica, path: str) -> bool:
    assert replica.running, replica.output()[-3000:]
    return (await replica.get(path))[0] == 200


async def _cycles(replica: Replica, outcome: str) -> float:
    assert replica.running, replica.output()[-3000:]
    return await replica.metric("notifier_poll_cycles_total", outcome=outcome) or 0


async def _stops_in_time(replica: Replica) -> None:
    replica.send(signal.SIGTERM)
    assert await replica.exited(9) == 0, replica.output()[-3000:]


@pytest.fixture
async def rig(
    simulator: Simulator, api_url: str, webhook_receiver: Receiver, tmp_path: Path
) -> AsyncIterator[Rig]:
    simulator.backfill(40)
    rig = Rig(
        simulator,
        webhook_receiver,
        {
            "NOTIFIER_API_URL": api_url,
            "NOTIFIER_API_KEY": SIMULATOR_KEY,
            "NOTIFIER_WEBHOOK_URL": webhook_receiver.url("/hook"),
            "NOTIFIER_POLL_INTERVAL": "0.2",
        },
        tmp_path,
    )
    try:
        yield rig
    finally:
        for replica in rig.replicas:
            await replica.stop()


async def test_json_nested_too_deep_fails_cycles_quietly_and_never_the_process(rig: Rig) -> None:
    rig.simulator.always = Fault(FaultKind.DEEP_JSON, size=100_000)
    replica = await rig.run()
    await eventually(lambda: _cycles_at_least(replica, "failed", 3), "3 failed cycles", timeout=30)
    assert await _answers(replica, "/healthz")
    status, body = await replica.get("/readyz")
    assert (status, "no poll cycle has completed yet" in body) == (503, True)
    await _stops_in_time(replica)
    output = replica.output()
    assert output.count("is not JSON") == 1  # said once, however often it fails
    assert "recursion limit exceeded" in output
    assert "Traceback" not in output


async def test_a_total_of_10_to_the_12_is_an_incomplete_listing_in_bounded_memory(
    rig: Rig,
) -> None:
    rig.simulator.always = Fault(FaultKind.HUGE_TOTAL, size=10**12)
    replica = await rig.run(memory_limit=MEMORY_LIMIT)
    await eventually(lambda: _cycles_at_least(replica, "failed", 2), "2 failed cycles", timeout=30)
    await _stops_in_time(replica)
    output = replica.output()
    assert "the listing kept changing" in output
    assert "but a page reported 1000000000000" in output
    assert "MemoryError" not in output


async def test_pages_of_megabyte_items_are_read_smaller_and_applied_in_bounded_memory(
    rig: Rig,
) -> None:
    # 40 items of 1 MB: a 40 MB page, read again with smaller limits under 16 MiB.
    rig.simulator.always = Fault(FaultKind.BLOATED, size=1_000_000)
    replica = await rig.run(memory_limit=MEMORY_LIMIT, NOTIFIER_PAGE_SIZE="40")
    await eventually(lambda: _cycles_at_least(replica, "completed", 2), "2 cycles", timeout=60)
    await _stops_in_time(replica)
    output = replica.output()
    assert "baseline complete: 40 requests recorded" in output
    assert "is larger than 16777216 bytes (NOTIFIER_API_MAX_BYTES)" in output
    assert "MemoryError" not in output


@pytest.mark.parametrize("created_at", ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"])
async def test_an_item_with_an_impossible_created_at_is_skipped_and_cycles_go_on(
    rig: Rig, created_at: str
) -> None:
    (odd,) = rig.simulator.create()
    rig.simulator.always = Fault(
        FaultKind.MALFORMED_ITEM, index=0, field="created_at", value=created_at
    )
    replica = await rig.run()
    await eventually(lambda: _cycles_at_least(replica, "completed", 3), "3 cycles", timeout=30)
    assert await replica.metric("notifier_api_malformed_items_total") >= 3
    await _stops_in_time(replica)
    output = replica.output()
    assert output.count(f"(request {odd.id}): field 'created_at'") == 1  # warned once
    assert "Traceback" not in output


async def _cycles_at_least(replica: Replica, outcome: str, count: int) -> bool:
    return await _cycles(replica, outcome) >= count


async def test_run_refuses_to_start_with_a_template_that_does_not_render(
    rig: Rig, tmp_path: Path
) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "broken.json.j2").write_text(
        '{"id": {{ event.id | tojson }},\n{{ oops( }}'
    )
    config = tmp_path / "notifier.toml"
    config.write_text(
        '[[routes]]\nname = "ops"\ntype = "webhook"\n'
        f'url = "{rig.receiver.url("/ops")}"\ntemplate = "broken.json.j2"\n'
    )
    replica = Replica(
        "run",
        {
            **rig.env,
            "NOTIFIER_CONFIG": str(config),
            "NOTIFIER_TEMPLATES_DIR": str(tmp_path / "templates"),
        },
        tmp_path / "broken.log",
    )
    rig.replicas.append(replica)
    await replica.start()
    assert await replica.exited(20) == 2
    output = replica.output()
    assert output.startswith("notifier: route 'ops', template broken.json.j2, line 2")
    assert output.count("\n") == 1
    assert rig.receiver.seen == []


# A template that runs away on some data only (check and the start-up render pass it).
RUNAWAY = (
    '{% if request.reference_id == "evil" %}'
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% endif %}"
    '{"id": {{ event.id | tojson }}}'
)


async def test_a_runaway_render_dead_letters_its_event_and_blocks_nothing(
    rig: Rig, tmp_path: Path
) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "runaway.json.j2").write_text(RUNAWAY)
    config = tmp_path / "notifier.toml"
    config.write_text(
        '[[routes]]\nname = "slow"\ntype = "webhook"\n'
        f'url = "{rig.receiver.url("/slow")}"\ntemplate = "runaway.json.j2"\n'
    )
    (evil,) = rig.simulator.create(reference_id="evil")
    rig.simulator.start(evil.id)
    replica = await rig.run(NOTIFIER_CONFIG=str(config), NOTIFIER_TEMPLATES_DIR=str(templates))
    await eventually(lambda: _cycles_at_least(replica, "completed", 1), "the baseline")

    rig.simulator.complete(evil.id)
    # The webhook route delivers while the slow route's render runs away.
    await eventually(lambda: len(rig.receiver.to("/hook")) == 1, "the webhook delivery")
    started = asyncio.get_running_loop().time()
    assert await _answers(replica, "/healthz")  # the event loop is free
    assert asyncio.get_running_loop().time() - started < 0.5
    await eventually(
        lambda: "took longer than 2 s" in replica.output(), "the dead letter", timeout=15
    )
    output = replica.output()
    assert "route slow: event" in output
    assert "dead-lettered after 1 attempt: could not render: route 'slow'" in output
    assert rig.receiver.to("/slow") == []

    (again,) = rig.simulator.create(reference_id="evil")
    rig.simulator.fail(again.id)  # another runaway render, interrupted by SIGTERM
    await eventually(lambda: len(rig.receiver.to("/hook")) == 2, "the second event")
    await _stops_in_time(replica)
