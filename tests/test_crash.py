"""Crash points: `notifier once` killed just before its Nth Redis command, for every N.

Each N gets its own namespace (key prefix), its own requests in the simulator (its own
reference_id) and its own receiver paths, so the runs can overlap. For one N:

1. In-process `once` runs record a baseline of five processing requests, then deliver
   the completion of one of them; the second route answers that first attempt 500, so
   a retry waits in Redis (due at once).
2. Three more requests complete and one fails in the simulator: the transitions.
3. `python tests/crashing.py N` runs `notifier once` and dies (`os._exit`) just before
   its Nth Redis command: somewhere in the poll cycle (lease, begin, apply, finish,
   prune, release) or in the delivery pass (heartbeat, orphan search, trim, the due
   retry, new entries, resolving, backlog).
4. After the dead process's lease and heartbeat expire, `once` runs again in-process
   ("the restart") until it reports nothing left.

Then every transition reached both routes at least once, every copy of one transition
carried the same webhook-id (its event id) and the same signed body, no other id came,
and nothing is left in Redis: no retry, no pending or unread entry, no dead letter. A
third route digests the batch (`digest_wait = 0`): the five requests settle in the
crashing run, and their one digest arrives at least once, every copy with the same id
and body, whether the crash came before resolving, between resolving and delivery, or
during the delivery. N grows until the wrapper runs to the end without reaching its Nth
command.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from standardwebhooks.webhooks import Webhook

from notifier import delivery as delivery_module
from notifier import lease as lease_module
from notifier.config import Settings, env_name, load_settings
from notifier.digest import digest_id
from notifier.keys import Keys
from notifier.models import event_id
from notifier.once import EXIT_DONE, EXIT_LEFT, OnceReport, run_once
from notifier.simulator import Simulator
from notifier.store import connect_redis, load_script

from conftest import RedisServer
from receiver import Receiver
from samples import SIMULATOR_KEY

WRAPPER = Path(__file__).with_name("crashing.py")
CRASH_EXIT = 17  # the wrapper's exit code when it reached its crash point
MARK = "CRASHPOINT "
SECRETS = {
    "webhook": "whsec_" + base64.b64encode(b"crash-test-webhook-key").decode(),
    "mirror": "whsec_" + base64.b64encode(b"crash-test-mirror-key").decode(),
    "batches": "whsec_" + base64.b64encode(b"crash-test-batches-key").decode(),
}
PARALLEL = 5  # wrappers at once; each spends most of its time starting Python
MAX_N = 200  # a bound on the sweep, far above the commands of one run
PAST_TTLS_S = 0.6  # the dead process's heartbeat (0.3 s) and lease (0.5 s) are gone by then
RESTARTS = 4
# A `once` takes well under a second here; one that takes this long has hung.
HUNG_S = 20.0


class Hung(Exception):
    """A `once` did not return: a background loop outlived its cancellation."""


async def once(settings: Settings) -> OnceReport:
    """`run_once` in-process, failing instead of hanging."""
    try:
        return await asyncio.wait_for(run_once(settings), HUNG_S)
    except TimeoutError:
        raise Hung(f"an in-process `once` did not return within {HUNG_S:g} s") from None


@dataclass
class Rig:
    """The shared test servers: one Redis, one simulated account, one receiver."""

    redis_url: str
    api_url: str
    simulator: Simulator
    receiver: Receiver
    tmp_path: Path


@pytest.fixture(autouse=True)
def _short_timers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process runs use the wrapper's timers: heartbeats 0.3 s, leases 0.5 s."""
    monkeypatch.setattr(delivery_module, "HEARTBEAT_TTL_S", 0.3)
    monkeypatch.setattr(lease_module, "MIN_TTL_S", 0.5)


@pytest.fixture
def rig(
    redis_server: RedisServer,
    simulator: Simulator,
    api_url: str,
    webhook_receiver: Receiver,
    tmp_path: Path,
) -> Rig:
    """The servers of the sweep."""
    return Rig(redis_server.url, api_url, simulator, webhook_receiver, tmp_path)


@dataclass
class Run:
    """One crash point: what the wrapper did, what the restarts did, what came."""

    n: int
    facts: dict[str, Any] = field(default_factory=dict)  # the wrapper's CRASHPOINT line
    restarts: list[int] = field(default_factory=list)  # exit codes of the restarts
    duplicates: int = 0  # requests beyond the ones each transition needed
    problems: list[str] = field(default_factory=list)

    @property
    def crashed(self) -> bool:
        return self.facts.get("crashed") is not None

    @property
    def ended(self) -> bool:
        """The wrapper ran to the end: N was past its last command."""
        return self.facts.get("commands") is not None

    def line(self) -> str:
        if self.crashed:
            where = f"{self.facts['phase']:<8} {self.facts['command']}"
        elif self.ended:
            where = f"ran to the end: {self.facts['commands']} commands"
        else:
            where = "no report"
        return f"N={self.n:<3} {where:<40} restarts={self.restarts} duplicates={self.duplicates}"


def flags_of(rig: Rig, n: int) -> dict[str, str]:
    """The settings of run `n`, as command-line flags (names) and environment (values)."""
    config = rig.tmp_path / f"notifier-{n}.toml"
    config.write_text(
        "[[routes]]\n"
        'name = "mirror"\n'
        'type = "webhook"\n'
        f'url = "{rig.receiver.url(f"/mirror-{n}")}"\n'
        f'secret = "{SECRETS["mirror"]}"\n'
        "[[routes]]\n"
        'name = "batches"\n'
        'type = "webhook"\n'
        f'url = "{rig.receiver.url(f"/batches-{n}")}"\n'
        f'secret = "{SECRETS["batches"]}"\n'
        'digest = "reference_id"\n'
        "digest_wait = 0\n"
    )
    return {
        "config": str(config),
        "api_url": rig.api_url,
        "api_key": SIMULATOR_KEY,
        "redis_url": rig.redis_url,
        "key_prefix": f"crash-{n}",
        "reference_id": f"crash-{n}",
        "webhook_url": rig.receiver.url(f"/hook-{n}"),
        "webhook_secret": SECRETS["webhook"],
        "poll_interval": "0.1",
        "retry_base_delay": "0.01",
        "retry_max_delay": "0.05",
        "delivery_timeout": "2",
    }


async def run_wrapper(n: int, flags: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    """`python tests/crashing.py n`: its exit code, its CRASHPOINT facts and its stderr."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("NOTIFIER_")}
    env.update({env_name(name): value for name, value in flags.items()})
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(WRAPPER.parent.parent), env.get("PYTHONPATH")])
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRAPPER),
        str(n),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), HUNG_S)
    except TimeoutError:
        process.kill()
        _, stderr = await process.communicate()
        raise Hung(
            f"the wrapper did not exit within {HUNG_S:g} s:\n"
            f"{stderr.decode(errors='replace')[-3000:]}"
        ) from None
    text = stderr.decode(errors="replace")
    marks = [line for line in text.splitlines() if line.startswith(MARK)]
    facts = json.loads(marks[-1].removeprefix(MARK)) if marks else {}
    assert process.returncode is not None
    return process.returncode, facts, text


async def crash_and_restart(rig: Rig, n: int) -> Run:
    """Set up run `n`, crash the wrapper at its Nth command, restart, and check."""
    run = Run(n)
    try:
        await _crash_and_restart(rig, run)
    except Hung as exc:
        run.problems.append(str(exc))
    return run


async def _crash_and_restart(rig: Rig, run: Run) -> None:
    n = run.n
    flags = flags_of(rig, n)
    settings = load_settings(flags)
    simulator, receiver = rig.simulator, rig.receiver

    requests = simulator.create(5, reference_id=f"crash-{n}")
    for request in requests:
        simulator.start(request.id)
    baseline = await once(settings)
    assert baseline.cycle is not None, baseline.summary()
    assert baseline.cycle.baseline, baseline.summary()
    assert baseline.exit_code() == EXIT_DONE, baseline.summary()

    early, *late = requests
    simulator.complete(early.id)
    receiver.plan(f"/mirror-{n}", (500, "not now"))
    before = await once(settings)  # leaves the mirror's delivery as a due retry
    assert before.exit_code() == EXIT_LEFT, before.summary()
    assert before.backlog is not None, before.summary()
    assert before.backlog.retries == 1, before.summary()

    for request in late[:3]:
        simulator.complete(request.id)
    simulator.fail(late[3].id)

    code, run.facts, stderr = await run_wrapper(n, flags)
    if code == CRASH_EXIT:
        if not run.crashed or run.facts["crashed"] != n:
            run.problems.append(f"exit {code} without its crash report:\n{stderr[-3000:]}")
    elif code not in (EXIT_DONE, EXIT_LEFT) or run.crashed or not run.facts:
        run.problems.append(f"the wrapper exited {code}:\n{stderr[-3000:]}")

    report = None
    for _ in range(RESTARTS):
        await asyncio.sleep(PAST_TTLS_S)
        report = await once(settings)
        run.restarts.append(report.exit_code())
        if report.exit_code() == EXIT_DONE:
            break
    if report is None or report.exit_code() != EXIT_DONE:
        summary = report.summary() if report else "no restart"
        run.problems.append(f"work left after {RESTARTS} restarts:\n{summary}")

    expected = {event_id(r.id, r.status): r for r in requests}
    for route, path in (("webhook", f"/hook-{n}"), ("mirror", f"/mirror-{n}")):
        check_route(run, route, receiver.to(path), expected)
    run.duplicates -= 1  # the mirror's first attempt at `early` was answered 500 by plan
    check_digest(run, receiver.to(f"/batches-{n}"), [simulator.requests[r.id] for r in requests])
    await check_nothing_left(run, Keys(settings.key_prefix), rig.redis_url)


def check_route(run: Run, route: str, seen: list[Any], expected: dict[str, Any]) -> None:
    """Every transition came, each copy with its event id and one body, nothing else."""
    got = Counter(s.event_id for s in seen)
    missing = sorted(set(expected) - set(got))
    unknown = sorted(set(got) - set(expected))
    if missing:
        lost = [f"{expected[i].id} {expected[i].status} ({i})" for i in missing]
        run.problems.append(f"route {route}: lost {len(missing)} transitions: {lost}")
    if unknown:
        run.problems.append(f"route {route}: unknown webhook-ids {unknown}")
    for eid, request in expected.items():
        copies = [s for s in seen if s.event_id == eid]
        if len({s.body for s in copies}) > 1:
            run.problems.append(f"route {route}: {len(copies)} copies of {eid} differ in body")
        for copy in copies:
            payload = Webhook(SECRETS[route]).verify(copy.body, dict(copy.headers))
            data = payload["data"]
            if (data["id"], data["status"]) != (request.id, request.status):
                run.problems.append(f"route {route}: {eid} carried {data['id']} {data['status']}")
    run.duplicates += sum(count - 1 for count in got.values())


def check_digest(run: Run, seen: list[Any], requests: list[Any]) -> None:
    """The batch's one digest came, every copy with its id and one body; nothing else."""
    expected = digest_id(requests[0].reference_id, [request.id for request in requests])
    got = Counter(s.event_id for s in seen)
    if set(got) != {expected}:
        run.problems.append(f"route batches: webhook-ids {dict(got)}, expected {expected} once")
        return
    if len({s.body for s in seen}) > 1:
        run.problems.append(f"route batches: {len(seen)} copies of the digest differ in body")
    data = Webhook(SECRETS["batches"]).verify(seen[0].body, dict(seen[0].headers))["data"]
    if data["counts"] != {"completed": 4, "failed": 1}:
        run.problems.append(f"route batches: counts {data['counts']}")
    run.duplicates += got[expected] - 1


async def check_nothing_left(run: Run, keys: Keys, url: str) -> None:
    """No retry, pending or unread delivery and no dead letter is left in the namespace."""
    client = connect_redis(url)
    try:
        for route in ("webhook", "mirror", "batches"):
            if retries := await client.zcard(keys.retries(route)):
                run.problems.append(f"route {route}: {retries} retries left")
            if events := await client.hlen(keys.retry_events(route)):
                run.problems.append(f"route {route}: {events} retry events left")
        for group in await client.xinfo_groups(keys.outbox):
            if group["pending"] or group.get("lag"):
                run.problems.append(f"group {group['name']}: left {group}")
        if dead := await client.xlen(keys.dead_letters):
            run.problems.append(f"{dead} dead letters")
    finally:
        await client.aclose()


async def load_scripts(url: str) -> None:
    """Flush the server and load every script, so no run sends SCRIPT LOAD: the commands
    of one run are the same whichever run was first."""
    client: redis.asyncio.Redis = connect_redis(url)
    try:
        await client.flushall()
        for path in files("notifier").joinpath("scripts").iterdir():
            if path.name.endswith(".lua") and path.name != "common.lua":
                for common in (False, True):
                    script = load_script(client, path.name.removesuffix(".lua"), common=common)
                    await client.script_load(script.script)
    finally:
        await client.aclose()


async def sweep(rig: Rig) -> list[Run]:
    """Crash at N = 1, 2, 3, ... (a few at once) until a wrapper runs to the end."""
    slots = asyncio.Semaphore(PARALLEL)
    ended = asyncio.Event()  # a wrapper ran to the end: N went past its last command
    runs: list[Run] = []

    async def one(n: int) -> None:
        try:
            run = await crash_and_restart(rig, n)
        finally:
            slots.release()
        runs.append(run)
        if run.ended:
            ended.set()

    async with asyncio.TaskGroup() as tasks:
        for n in range(1, MAX_N + 1):
            await slots.acquire()
            if ended.is_set():
                slots.release()
                break
            tasks.create_task(one(n))
    return sorted(runs, key=lambda run: run.n)


@pytest.mark.timeout(180)
async def test_a_crash_before_any_redis_command_loses_no_transition(rig: Rig) -> None:
    started = time.monotonic()
    await load_scripts(rig.redis_url)

    runs = await sweep(rig)

    print(f"\ncrash sweep: {len(runs)} runs in {time.monotonic() - started:.1f} s")
    for run in runs:
        print(run.line())
    problems = [f"N={run.n}: {problem}" for run in runs for problem in run.problems]
    assert not problems, "\n".join(problems)

    # A run's command count differs by one or two with timing (the worker's heartbeat is
    # renewed on a timer while it delivers), so runs started beside the first one that
    # ended may still crash; below it, every N must have crashed.
    crashed = [run for run in runs if run.crashed]
    ends = [run.n for run in runs if run.ended]
    assert ends, "the sweep ends when N passes the last command"
    first_end = min(ends)
    below = [run.n for run in crashed if run.n < first_end]
    assert below == list(range(1, first_end)), "every N below the first run that ended"

    # The crash points cover applying a page, and taking, reading and resolving deliveries.
    def crashed_at(phase: str, *names: str) -> bool:
        return any(
            run.facts["phase"] == phase and any(name in run.facts["command"] for name in names)
            for run in crashed
        )

    assert crashed_at("cycle", "apply")
    assert crashed_at("cycle", "digest")
    assert crashed_at("delivery", "claim_retries")
    assert crashed_at("delivery", "XREADGROUP", "ack_and_read")
    assert crashed_at("delivery", "resolve", "XACK", "ack_and_read")
