"""Batch digests: when a `reference_id` batch settles, what its digest holds, and that a
batch is digested once, with follow-ups of only new results.

The settle rules run in real poll cycles against the simulator, on fakeredis and on a
real redis-server, with a clock the test moves (the poller's clock times changes and
settling; the API's timestamps are not used for either).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from notifier.digest import Digest, Member, digest_id
from notifier.models import Event, LipsyncRequest, MalformedEvent
from notifier.outbox import entry_of, read_entry
from notifier.poller import CycleResult, Poller
from notifier.simulator import Simulator
from notifier.store import GroupMissing, LeaseLost

from polling import digests, make_settings, outbox, poller_of

BATCH = "order-12345-japanese-dub"


@dataclass
class Clock:
    """The poller's clock, moved by the test. It starts at the real time, as the simulator
    stamps requests with it: detection times and batch settling read it."""

    start: float = field(default_factory=time.time)
    now: float = 0.0

    def __post_init__(self) -> None:
        self.now = self.start

    def __call__(self) -> float:
        return self.now


def digest_routes(tmp_path: Path, *routes: str) -> str:
    """A config file of webhook digest routes, each given as its extra TOML lines."""
    tables = [
        f'[[routes]]\nname = "digest-{index}"\ntype = "webhook"\n'
        f'url = "http://127.0.0.1:9/digest-{index}"\ndigest = "reference_id"\n{options}\n'
        for index, options in enumerate(routes)
    ]
    path = tmp_path / "digests.toml"
    path.write_text("\n".join(tables))
    return str(path)


@pytest.fixture
async def rigs(
    tmp_path: Path, api_url: str, redis_client: redis.asyncio.Redis
) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    """Makes the test's poller: one digest route per argument (its extra TOML lines) and
    the `webhook` route, on a clock the test moves."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(*routes: str) -> Rig:
            settings = make_settings(api_url, config=digest_routes(tmp_path, *routes))
            clock = Clock()
            poller = await stack.enter_async_context(poller_of(settings, redis_client, clock=clock))
            return Rig(poller, clock)

        yield make


@pytest.fixture
async def rig(rigs: Callable[..., Awaitable[Rig]]) -> Rig:
    """A poller with one digest route of `digest_wait = 30`."""
    return await rigs("digest_wait = 30")


@dataclass
class Rig:
    poller: Poller
    clock: Clock

    async def at(self, seconds: float) -> CycleResult:
        """One cycle `seconds` after the start."""
        self.clock.now = self.clock.start + seconds
        return await self.poller.cycle()


def finish(
    simulator: Simulator, ids: list[str], failed: frozenset[str] | set[str] = frozenset()
) -> None:
    """Complete `ids` in the simulator, failing those in `failed`."""
    for request_id in ids:
        if request_id in failed:
            simulator.fail(request_id, f"no face found in {request_id[:8]} & <b>")
        else:
            simulator.complete(request_id)


def started_batch(simulator: Simulator, count: int, reference_id: str | None = BATCH) -> list[str]:
    """`count` new requests of the batch `reference_id`, processing; their ids."""
    requests = simulator.create(count, reference_id=reference_id)
    for request in requests:
        simulator.start(request.id)
    return [request.id for request in requests]


async def test_a_batch_finishing_in_random_order_gives_one_digest_with_its_counts_and_failures(
    rig: Rig, simulator: Simulator
) -> None:
    await rig.at(0)  # the baseline: an empty account
    ids = started_batch(simulator, 200)
    order = random.Random(11).sample(ids, len(ids))
    failed = set(order[17:20])
    await rig.at(1)
    for wave, start in enumerate(range(0, 200, 50)):
        finish(simulator, order[start : start + 50], failed)
        result = await rig.at(10 + 10 * wave)
        assert result.digests == 0, "not while members are unfinished, nor within the wait"
    assert (await rig.at(69)).digests == 0, "29 s after the last change: still waiting"
    assert (await rig.at(70)).digests == 1
    for later in (71, 400, 1000):
        assert (await rig.at(later)).digests == 0

    [digest] = await digests(rig.poller)
    assert digest.route == "digest-0"
    assert digest.reference_id == BATCH
    assert digest.counts() == {"completed": 197, "failed": 3}
    assert [m.request.id for m in digest.members] == sorted(ids)
    assert {m.request.id for m in digest.members if m.request.status == "failed"} == failed
    assert all(m.previous_status == "processing" for m in digest.members)
    assert digest.id == digest_id(BATCH, ids)
    # Per-request events are queued as before: other routes send each one.
    assert len(await outbox(rig.poller)) == 200


async def test_a_batch_submitted_in_two_waves_10_s_apart_gives_one_digest(
    rig: Rig, simulator: Simulator
) -> None:
    await rig.at(0)
    first = started_batch(simulator, 5)
    finish(simulator, first)
    await rig.at(5)  # the first wave is finished: settled, were it not for the wait
    second = started_batch(simulator, 5)
    for seconds in (10, 15):
        assert (await rig.at(seconds)).digests == 0
    finish(simulator, second)
    for seconds in (20, 30, 40, 49):
        assert (await rig.at(seconds)).digests == 0
    assert (await rig.at(50)).digests == 1
    [digest] = await digests(rig.poller)
    assert {m.request.id for m in digest.members} == {*first, *second}


async def test_a_late_member_gets_one_follow_up_of_only_its_result_after_digest_interval(
    rigs: Callable[..., Awaitable[Rig]], simulator: Simulator
) -> None:
    rig = await rigs("digest_wait = 30\ndigest_interval = 300")
    await rig.at(0)
    ids = started_batch(simulator, 3)
    finish(simulator, ids)
    await rig.at(1)
    assert (await rig.at(31)).digests == 1  # the digest, at 31 s
    late = started_batch(simulator, 2)
    await rig.at(40)
    finish(simulator, late[:1])
    await rig.at(50)
    for seconds in (100, 200, 330):
        assert (await rig.at(seconds)).digests == 0, "a member is unfinished"
    finish(simulator, late[1:])
    assert (await rig.at(331)).digests == 0, "not within digest_wait of the last change"
    assert (await rig.at(362)).digests == 1
    for seconds in (400, 700, 2000):
        assert (await rig.at(seconds)).digests == 0

    first, follow_up = await digests(rig.poller)
    assert {m.request.id for m in first.members} == set(ids)
    assert {m.request.id for m in follow_up.members} == set(late)
    assert follow_up.counts() == {"completed": 2}
    assert follow_up.id != first.id
    assert follow_up.created_at() == first.created_at(), "the batch's first created_at"


async def test_follow_ups_come_at_most_once_per_digest_interval(
    rigs: Callable[..., Awaitable[Rig]], simulator: Simulator
) -> None:
    rig = await rigs("digest_wait = 10\ndigest_interval = 300")
    await rig.at(0)
    finish(simulator, started_batch(simulator, 2))
    await rig.at(1)
    assert (await rig.at(11)).digests == 1
    sent = [11]
    for seconds in range(40, 1000, 20):
        if seconds % 100 == 0:  # a late member every 100 s
            finish(simulator, started_batch(simulator, 1))
        if (await rig.at(seconds)).digests:
            sent.append(seconds)
    assert len(sent) == 4
    assert all(b - a >= 300 for a, b in itertools.pairwise(sent))
    results = [m.request.id for d in await digests(rig.poller) for m in d.members]
    assert len(results) == len(set(results)) == 2 + 9, "every result once"


async def test_an_unfinished_member_holds_the_digest_back(rig: Rig, simulator: Simulator) -> None:
    await rig.at(0)
    ids = started_batch(simulator, 4)
    finish(simulator, ids[:3])
    for seconds in (1, 100, 1000):
        assert (await rig.at(seconds)).digests == 0
    finish(simulator, ids[3:], failed={ids[3]})
    await rig.at(1001)
    assert (await rig.at(1031)).digests == 1
    [digest] = await digests(rig.poller)
    assert digest.counts() == {"completed": 3, "failed": 1}


async def test_a_batch_finished_before_the_baseline_gets_no_digest(
    tmp_path: Path, api_url: str, redis_client: redis.asyncio.Redis, simulator: Simulator
) -> None:
    finish(simulator, started_batch(simulator, 5))
    half = started_batch(simulator, 4, reference_id="half-done")
    finish(simulator, half[:2])
    settings = make_settings(api_url, config=digest_routes(tmp_path, "digest_wait = 30"))
    clock = Clock()
    async with poller_of(settings, redis_client, clock=clock) as poller:
        rig = Rig(poller, clock)
        assert (await rig.at(0)).baseline
        finish(simulator, half[2:])
        for seconds in (10, 100, 1000):
            await rig.at(seconds)
        [digest] = await digests(poller)
    # Results the baseline recorded silently are not reported; the rest of the batch is.
    assert digest.reference_id == "half-done"
    assert {m.request.id for m in digest.members} == set(half[2:])


async def test_a_route_digests_only_the_batches_its_reference_id_glob_matches(
    rigs: Callable[..., Awaitable[Rig]], simulator: Simulator
) -> None:
    rig = await rigs('digest_wait = 0\nreference_id = "order-*"')
    await rig.at(0)
    finish(simulator, started_batch(simulator, 2, reference_id="order-7"))
    finish(simulator, started_batch(simulator, 2, reference_id="misc-7"))
    finish(simulator, started_batch(simulator, 1, reference_id=None))
    await rig.at(1)
    [digest] = await digests(rig.poller)
    assert digest.reference_id == "order-7"
    keys, redis_ = rig.poller.store.keys, rig.poller.store.redis
    assert set(await redis_.zrange(keys.batches, 0, -1)) == {"order-7", "misc-7"}
    assert await redis_.zcard(keys.open_batches) == 0, "neither batch owes a digest"
    assert not await redis_.exists(keys.batch_results("order-7"), keys.batch_results("misc-7"))


async def test_each_digest_route_settles_by_its_own_wait_and_gets_the_same_digest(
    rigs: Callable[..., Awaitable[Rig]], simulator: Simulator
) -> None:
    rig = await rigs("digest_wait = 10", "digest_wait = 60")
    await rig.at(0)
    finish(simulator, started_batch(simulator, 3))
    await rig.at(1)
    assert (await rig.at(11)).digests == 1
    assert (await rig.at(30)).digests == 0
    result = await rig.at(61)
    assert (result.digests, result.waiting_batches) == (1, 0)
    fast, slow = await digests(rig.poller)
    assert (fast.route, slow.route) == ("digest-0", "digest-1")
    assert fast.id == slow.id
    assert fast.members == slow.members


async def test_without_a_digest_route_no_batch_is_kept(
    api_url: str, redis_client: redis.asyncio.Redis, simulator: Simulator
) -> None:
    async with poller_of(make_settings(api_url), redis_client) as poller:
        await poller.cycle()
        finish(simulator, started_batch(simulator, 3))
        result = await poller.cycle()
    assert result.events == 3
    assert (result.digests, result.waiting_batches) == (0, 0)
    assert not await redis_client.keys("*batch*")


async def test_batches_unchanged_for_the_retention_are_forgotten(
    rigs: Callable[..., Awaitable[Rig]], simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await rigs("digest_wait = 0")
    await rig.at(0)
    finish(simulator, started_batch(simulator, 2))
    await rig.at(1)
    keys, redis_ = rig.poller.store.keys, rig.poller.store.redis
    assert await redis_.exists(keys.batch(BATCH))
    await rig.at(29 * 86_400)
    assert await redis_.exists(keys.batch(BATCH)), "kept within the 30 days"
    await rig.at(31 * 86_400)
    assert not await redis_.exists(keys.batch(BATCH))
    assert await redis_.zcard(keys.batches) == 0


async def test_settling_is_refused_to_a_poller_without_the_lease(
    rig: Rig, simulator: Simulator
) -> None:
    await rig.at(0)
    finish(simulator, started_batch(simulator, 2))
    await rig.at(1)
    rig.clock.now += 60
    epoch = await rig.poller.store.begin(rig.poller.lease.token, notify_existing=False)
    with pytest.raises(LeaseLost):
        await rig.poller.store.settle_batches(epoch, "not-the-lease-token")
    assert await digests(rig.poller) == []
    assert (await rig.poller.store.settle_batches(epoch, rig.poller.lease.token)).digests == 1


async def test_a_route_without_its_consumer_group_gets_no_digest_it_could_never_read(
    rig: Rig, simulator: Simulator
) -> None:
    await rig.at(0)
    finish(simulator, started_batch(simulator, 2))
    await rig.at(1)
    store = rig.poller.store
    await store.redis.xgroup_destroy(store.keys.outbox, "digest-0")
    rig.clock.now += 60
    epoch = await store.begin(rig.poller.lease.token, notify_existing=False)  # makes it again
    await store.redis.xgroup_destroy(store.keys.outbox, "digest-0")
    with pytest.raises(GroupMissing, match="route digest-0 has no consumer group"):
        await store.settle_batches(epoch, rig.poller.lease.token)
    assert await digests(rig.poller) == []
    assert (await rig.at(70)).digests == 1, "the next cycle makes the group and settles"


async def test_a_cycle_whose_settle_call_fails_queues_the_digest_once_on_the_next(
    rig: Rig, simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.at(0)
    finish(simulator, started_batch(simulator, 2))
    await rig.at(1)
    store = rig.poller.store
    run = store._run

    async def redis_drops_the_settle_call(name: str, *args: Any) -> Any:
        if name == "digest":
            raise RedisConnectionError("Connection closed by server.")
        return await run(name, *args)

    monkeypatch.setattr(store, "_run", redis_drops_the_settle_call)
    with pytest.raises(RedisConnectionError):
        await rig.at(40)
    monkeypatch.setattr(store, "_run", run)
    assert (await rig.at(41)).digests == 1
    assert (await rig.at(42)).digests == 0
    assert len(await digests(rig.poller)) == 1


# The outbox entry.


def member(request_id: str, status: str = "completed", **fields: Any) -> Member:
    request = LipsyncRequest.model_validate(
        {
            "id": request_id,
            "status": status,
            "reference_id": "ref ✓",
            "created_at": "2026-03-30T11:00:00Z",
            "finished_at": "2026-03-30T11:05:00Z",
            **fields,
        }
    )
    return Member(request, previous_status="processing")


def sample_digest(*members: Member) -> Digest:
    return Digest(
        "ops", "ref ✓", members, created_ms=1_774_868_400_000, detected_ms=1_774_868_700_123
    )


def test_a_digest_entry_reads_back_as_written() -> None:
    digest = sample_digest(
        member("a-ü", error_message='line 1\nline "2" \\ {}'),
        Member(member("b").request, previous_status="unknown status with spaces"),
        Member(member("c", "failed").request, previous_status=None),
    )
    assert read_entry(entry_of(digest)) == digest


def test_the_digest_id_depends_on_the_batch_and_its_members_not_their_order() -> None:
    assert digest_id("ref", ["b", "a"]) == digest_id("ref", ["a", "b"])
    assert digest_id("ref", ["a", "b"]) != digest_id("ref", ["a"])
    assert digest_id("ref", ["a"]) != digest_id("other", ["a"])
    assert sample_digest(member("x"), member("y")).id == digest_id("ref ✓", ["y", "x"])


@pytest.mark.parametrize(
    "fields",
    [
        {"d": "ops", "b": "ref", "c": "", "t": "1"},  # no members
        {"d": "ops", "b": "ref", "m": "3 9 abc{}", "c": "", "t": "1"},  # cut short
        {"d": "ops", "b": "ref", "m": "0 2 {}", "c": "", "t": "1"},  # not a request
        {"d": "ops", "b": "ref", "m": "", "c": "x", "t": "1"},
    ],
)
def test_an_entry_that_is_not_a_digest_is_malformed(fields: dict[str, str]) -> None:
    with pytest.raises(MalformedEvent, match="not a digest"):
        read_entry(fields)


def test_a_per_request_event_entry_reads_back_as_an_event() -> None:
    event = Event(member("a").request, previous_status="processing", detected_ms=5)
    assert read_entry(entry_of(event)) == event


def test_the_digest_context_has_counts_times_and_each_request_as_in_its_own_body() -> None:
    digest = sample_digest(
        member("a", output_url="https://o/a.mp4"),
        member("b", "failed", error_message="no face", finished_at="2026-03-30T11:07:00Z"),
    )
    context = digest.context()
    assert context["digest"] == {
        "id": digest.id,
        "type": "lipsync.batch.settled",
        "reference_id": "ref ✓",
        "size": 2,
        "counts": {"completed": 1, "failed": 1},
        "created_at": "2026-03-30T11:00:00Z",
        "finished_at": "2026-03-30T11:07:00Z",
        "detected_at": "2026-03-30T11:05:00Z",
    }
    assert context["requests"][1] == {
        "id": "b",
        "status": "failed",
        "previous_status": "processing",
        "reference_id": "ref ✓",
        "created_at": "2026-03-30T11:00:00Z",
        "started_at": None,
        "finished_at": "2026-03-30T11:07:00Z",
        "output_url": None,
        "error_message": "no face",
    }


async def test_the_poller_keeps_its_poll_interval_while_a_batch_waits_to_settle(
    tmp_path: Path, api_url: str, redis_client: redis.asyncio.Redis, simulator: Simulator
) -> None:
    config = digest_routes(tmp_path, "digest_wait = 30")
    settings = make_settings(api_url, config=config, idle_interval=300)
    clock = Clock()
    async with poller_of(settings, redis_client, clock=clock) as poller:
        rig = Rig(poller, clock)
        await rig.at(0)
        finish(simulator, started_batch(simulator, 3))
        await rig.at(1)
        waiting = await rig.at(20)  # nothing unfinished, no event: only the batch is waiting
        assert (waiting.unfinished, waiting.events, waiting.waiting_batches) == (0, 0, 1)
        assert poller.interval(waiting) == settings.poll_interval
        settled = await rig.at(31)
        assert settled.digests == 1
        assert poller.interval(await rig.at(40)) == 300
