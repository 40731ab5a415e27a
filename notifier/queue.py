"""The delivery queue in Redis: the outbox read through one consumer group per route,
each route's retry set, and the dead letters.

A delivery waits in exactly one place: pending on a consumer of its route's group, or
in the route's retry set. It leaves that place only in one atomic step (`resolve.lua`)
that also puts it where it goes next, so a crash at any instant leaves it somewhere a
live worker will find it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.asyncio
from redis.exceptions import ResponseError

from notifier.keys import Keys
from notifier.logs import plural
from notifier.outbox import Fields, read_retry_payload, retry_payload
from notifier.store import load_script

log = logging.getLogger(__name__)

# Dead letters kept at most (approximately); the oldest go first. A route that refuses
# everything for weeks must not fill Redis.
MAX_DEAD_LETTERS = 100_000
# A route some replica served this recently still needs its outbox entries, even if this
# replica's configuration (an older or newer deployment) lacks it.
ROUTE_SEEN_WINDOW_S = 600
# The group and retries of a route no replica has served for this long are deleted.
REMOVED_ROUTE_GRACE_S = 7 * 86_400
# A store that answers an empty blocking read at once is asked again this often instead.
EMULATED_BLOCK_STEP_S = 0.05

Source = Literal["outbox", "retry"]
Action = Literal["done", "retry", "dead"]


@dataclass(frozen=True, slots=True)
class Work:
    """One delivery to attempt: an outbox entry for one route, new or a due retry."""

    route: str
    entry_id: str  # outbox stream id: the delivery's identity in the retry set too
    fields: Fields  # the outbox entry as written by the store (r, p, t)
    attempts: int  # attempts already made
    source: Source


@dataclass(frozen=True, slots=True)
class Resolution:
    """What to do with a delivery once attempted: forget it, retry it, dead-letter it."""

    work: Work
    action: Action
    due_s: float = 0.0  # retry: from now
    attempts: int = 0  # retry: attempts made so far
    dead_letter: Mapping[str, str] = field(default_factory=dict)  # dead: its fields


@dataclass(frozen=True, slots=True)
class Backlog:
    """What a route still has to do."""

    retries: int  # scheduled, due or not
    pending: int  # read by some consumer and not resolved
    unread: int  # in the outbox, not yet read by the route's group

    @property
    def total(self) -> int:
        """Everything still to be sent."""
        return self.retries + self.pending + self.unread


def _from_payload(route: str, entry_id: str, payload: str) -> Work:
    fields, attempts = read_retry_payload(payload)
    return Work(route, entry_id, fields, attempts, "retry")


class RouteQueue:
    """The deliveries of one route, as seen by one consumer (one process)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: Keys,
        route: str,
        consumer: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.route = route
        self.consumer = consumer
        self._clock = clock
        self._retries = keys.retries(route)
        self._events = keys.retry_events(route)
        self._claims = keys.retry_claims(route)
        self._resolve = load_script(client, "resolve")
        self._claim_retries = load_script(client, "claim_retries")
        self._claim_orphans = load_script(client, "claim_orphans")
        self._release_claims = load_script(client, "release_claims")
        self._drop_consumer = load_script(client, "drop_consumer")
        self._ack_read_script = load_script(client, "ack_and_read")
        self._resolve_keys = [
            keys.outbox,
            self._retries,
            self._events,
            self._claims,
            keys.dead_letters,
        ]
        self.orphaned: list[str] = []  # consumers found dead with entries of this route

    async def take_retries(
        self, count: int, visibility_s: float, *, until: int | None = None
    ) -> list[Work]:
        """Claim up to `count` retries due by `until` (unix ms, default now); unresolved,
        they come back by themselves after `visibility_s`."""
        now = self.now()
        reply = await self._claim_retries(
            keys=[self._retries, self._events, self._claims],
            args=[
                now if until is None else until,
                now + round(visibility_s * 1000),
                count,
                self.consumer,
            ],
        )
        return [
            _from_payload(self.route, entry, payload)
            for entry, payload in zip(reply[::2], reply[1::2], strict=True)
        ]

    async def take_new(self, count: int, block_s: float = 0) -> list[Work]:
        """Read up to `count` entries no consumer of the route has read, waiting `block_s`."""
        _, taken = await self.resolve_and_take([], count, block_s)
        return taken

    async def take_orphans(self, count: int) -> list[Work]:
        """Take over up to `count` entries pending on consumers found dead by `find_orphans`."""
        taken: list[Work] = []
        while self.orphaned and len(taken) < count:
            dead = self.orphaned[0]
            reply = await self._claim_orphans(
                keys=[self.keys.outbox, self.keys.heartbeat(dead)],
                args=[self.route, dead, self.consumer, count - len(taken)],
            )
            entries = [self._new(entry_id, fields) for entry_id, fields in _entries(reply)]
            if len(entries) < count - len(taken):
                self.orphaned.pop(0)  # nothing more there (or it came back to life)
            if entries:
                log.info(
                    "route %s: took over %s of stopped worker %s",
                    self.route,
                    plural(len(entries), "delivery", "deliveries"),
                    dead,
                )
            taken += entries
        return taken

    async def reclaim_idle(self, count: int, min_idle_s: float) -> list[Work]:
        """The backstop: take entries pending anywhere for longer than `min_idle_s`."""
        try:
            reply = await self.redis.xautoclaim(
                self.keys.outbox,
                self.route,
                self.consumer,
                min_idle_time=round(min_idle_s * 1000),
                start_id="0-0",
                count=count,
            )
        except ResponseError as exc:
            if await self._no_group(exc):
                return []
            raise
        return [self._new(entry_id, fields) for entry_id, fields in reply[1] if fields]

    async def find_orphans(self) -> None:
        """Find consumers of this route without a heartbeat: note those holding entries, make
        their claimed retries due now, and drop those holding nothing."""
        try:
            consumers = await self.redis.xinfo_consumers(self.keys.outbox, self.route)
        except ResponseError as exc:
            if not await self._no_group(exc):
                raise
            consumers = []
        claimants = set((await self.redis.hgetall(self._claims)).values())
        names = sorted(({c["name"] for c in consumers} | claimants) - {self.consumer})
        alive = await self._alive(names)
        dead = [name for name in names if not alive[name]]
        pending = {c["name"]: c["pending"] for c in consumers}
        self.orphaned = [name for name in dead if pending.get(name, 0) > 0]
        now = self.now()
        for name in dead:
            heartbeat = self.keys.heartbeat(name)
            if name in claimants:
                await self._release_claims(
                    keys=[self._retries, self._claims, heartbeat], args=[name, now]
                )
            if pending.get(name) == 0:
                await self._drop_consumer(
                    keys=[self.keys.outbox, heartbeat], args=[self.route, name]
                )

    async def resolve(
        self,
        work: Work,
        action: Action,
        *,
        due_s: float = 0.0,
        attempts: int = 0,
        dead_letter: Mapping[str, str] | None = None,
    ) -> bool:
        """Take `work` off where it waits and forget it, schedule it `due_s` from now with
        `attempts` made, or dead-letter it; False if another worker resolved it first."""
        [resolved] = await self.resolve_all(
            [Resolution(work, action, due_s, attempts, dead_letter or {})]
        )
        return resolved

    async def resolve_all(self, resolutions: Sequence[Resolution]) -> list[bool]:
        """Resolve several deliveries in one round trip, each in its own atomic step."""
        resolved, _ = await self.resolve_and_take(resolutions, 0)
        return resolved

    async def resolve_and_take(
        self, resolutions: Sequence[Resolution], count: int, block_s: float = 0
    ) -> tuple[list[bool], list[Work]]:
        """Resolve deliveries, then read up to `count` new entries (waiting up to `block_s`
        if there is nothing to resolve); whether each was resolved, and the new entries.

        Delivered outbox entries are acknowledged in the same round trip as the read.
        """
        acks = [s.work.entry_id for s in resolutions if _is_plain_ack(s)]
        resolved = {
            id(s): bool(await self._resolve(keys=self._resolve_keys, args=self._args(s)))
            for s in resolutions
            if not _is_plain_ack(s)
        }
        if block_s > 0 and not acks:  # a script cannot block: only an idle reader waits
            acked, read = [], await self._read_blocking(count, block_s)
        elif acks or count:
            acked, read = await self._ack_and_read(self.keys.outbox, acks, count)
        else:
            acked, read = [], []
        replies = iter(acked)
        flags = [resolved[id(s)] if id(s) in resolved else bool(next(replies)) for s in resolutions]
        return flags, [self._new(entry_id, fields) for entry_id, fields in read]

    async def _ack_and_read(
        self, outbox: str, acks: list[str], count: int
    ) -> tuple[list[int], list[tuple[str, Fields]]]:
        try:
            acked, reply = await self._ack_read_script(
                keys=[outbox], args=[self.route, self.consumer, count, *acks]
            )
        except ResponseError as exc:
            if await self._no_group(exc):
                return [0] * len(acks), []  # no poll cycle has created the group yet
            raise
        # Redis answers [[stream, entries]], or nil when there is nothing new; fakeredis's
        # Lua answers [stream, entries], or an empty list.
        if reply and isinstance(reply[0], str):
            reply = [reply]
        return acked, [entry for _, entries in reply or [] for entry in _entries(entries)]

    async def _read_blocking(self, count: int, block_s: float) -> list[tuple[str, Fields]]:
        deadline = time.monotonic() + block_s
        while True:
            try:
                reply = await self.redis.xreadgroup(
                    self.route,
                    self.consumer,
                    {self.keys.outbox: ">"},
                    count=count,
                    block=max(1, round((deadline - time.monotonic()) * 1000)),
                )
            except ResponseError as exc:
                if await self._no_group(exc):
                    # Nothing to block on until a poll cycle creates the group: wait as a
                    # blocking read would, instead of asking again at once.
                    await asyncio.sleep(block_s)
                    return []
                raise
            left = deadline - time.monotonic()
            if reply or left <= 0:
                return [(entry_id, fields) for _, entries in reply for entry_id, fields in entries]
            # Redis answers an empty blocking read only at its deadline, but the in-memory
            # store (fakeredis 2.40) answers one with COUNT at once: poll, never spin.
            await asyncio.sleep(min(EMULATED_BLOCK_STEP_S, left))

    def _args(self, resolution: Resolution) -> list[Any]:
        work, action = resolution.work, resolution.action
        args: list[Any] = [self.route, work.entry_id, work.source, action, 0, "", MAX_DEAD_LETTERS]
        if action == "retry":
            args[4] = self.now() + round(resolution.due_s * 1000)
            args[5] = retry_payload(work.fields, resolution.attempts)
        elif action == "dead":
            for name, value in resolution.dead_letter.items():
                args += [name, value]
        return args

    async def hand_back(self, work: Work) -> bool:
        """Give `work` back, due now with its attempts unchanged (it was not attempted)."""
        return await self.resolve(work, "retry", attempts=work.attempts)

    async def backlog(self) -> Backlog:
        """How many deliveries of this route are scheduled, pending and unread."""
        retries = await self.redis.zcard(self._retries)
        try:
            groups = await self.redis.xinfo_groups(self.keys.outbox)
        except ResponseError:
            groups = []
        group = next((g for g in groups if g["name"] == self.route), None)
        if group is None:
            return Backlog(retries, 0, 0)
        unread = group.get("lag")
        if unread is None:
            # Redis cannot tell the lag of a group created at the end of a stream that has
            # grown since (or is older than 7.0): count what follows its last read.
            after = "(" + group["last-delivered-id"]
            unread = len(await self.redis.xrange(self.keys.outbox, after, "+", count=1000))
        return Backlog(retries, int(group["pending"]), int(unread))

    async def _no_group(self, exc: ResponseError) -> bool:
        """Whether `exc` says the outbox or this route's group does not exist (yet)."""
        message = str(exc)
        if message.startswith("NOGROUP") or "no such key" in message:
            return True
        return not await self.redis.exists(self.keys.outbox)

    async def _alive(self, consumers: Sequence[str]) -> dict[str, bool]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in consumers:
                pipe.exists(self.keys.heartbeat(name))
            found = await pipe.execute()
        return {name: bool(exists) for name, exists in zip(consumers, found, strict=True)}

    def _new(self, entry_id: str, fields: Mapping[str, str]) -> Work:
        return Work(self.route, entry_id, dict(fields), 0, "outbox")

    def now(self) -> int:
        """The queue's clock in unix ms, as retry scores use it."""
        return round(self._clock() * 1000)


def _is_plain_ack(resolution: Resolution) -> bool:
    """A delivered outbox entry: resolving it is only acknowledging it."""
    return resolution.action == "done" and resolution.work.source == "outbox"


def _entries(reply: Any) -> list[tuple[str, Fields]]:
    """Stream entries as a Lua script returns them: [id, [field, value, ...]], nil if gone."""
    entries = []
    for item in reply or []:
        if not item or not item[1]:
            continue  # an entry trimmed from the outbox: nothing is left to send
        flat = item[1]
        entries.append((item[0], dict(zip(flat[::2], flat[1::2], strict=True))))
    return entries


class Outbox:
    """The outbox as a whole: which routes are served, and trimming what none needs."""

    def __init__(
        self, client: redis.asyncio.Redis, keys: Keys, clock: Callable[[], float] = time.time
    ) -> None:
        self.redis = client
        self.keys = keys
        self._clock = clock

    async def mark_served(self, routes: Sequence[str]) -> None:
        """Record that this replica serves `routes` now."""
        if routes:
            now = self._now_ms()
            await self.redis.hset(self.keys.routes_seen, mapping=dict.fromkeys(routes, now))

    async def trim(self, routes: Sequence[str]) -> int:
        """Delete outbox entries older than any served route still needs, and the groups of
        routes no replica served for 7 days; returns the entries deleted."""
        try:
            groups = await self.redis.xinfo_groups(self.keys.outbox)
        except ResponseError:
            return 0  # no outbox yet
        seen = await self.redis.hgetall(self.keys.routes_seen)
        now = self._now_ms()
        needed = []
        for group in groups:
            name = group["name"]
            last = int(seen[name]) if name in seen else None
            if last is None:
                # A group no worker has served yet: start counting its absence from now.
                await self.redis.hset(self.keys.routes_seen, name, now)
            elif name not in routes and now - last > REMOVED_ROUTE_GRACE_S * 1000:
                await self._forget(name)
                continue
            if last is None or name in routes or now - last < ROUTE_SEEN_WINDOW_S * 1000:
                needed.append(group)
        if not needed:
            return 0
        oldest = min([await self._oldest_needed(group) for group in needed], key=_id_order)
        return await self.redis.xtrim(self.keys.outbox, minid=oldest, approximate=False)

    async def _oldest_needed(self, group: Mapping[str, Any]) -> str:
        """The oldest entry a group still needs: its oldest pending entry, else the last
        one it read (everything after that is unread)."""
        summary = await self.redis.xpending(self.keys.outbox, group["name"])
        return summary["min"] if summary["pending"] else group["last-delivered-id"]

    async def _forget(self, route: str) -> None:
        retries = await self.redis.zcard(self.keys.retries(route))
        await self.redis.xgroup_destroy(self.keys.outbox, route)
        await self.redis.delete(
            self.keys.retries(route), self.keys.retry_events(route), self.keys.retry_claims(route)
        )
        await self.redis.hdel(self.keys.routes_seen, route)
        log.warning(
            "route %s has not been served by any replica for %d days: deleted its consumer "
            "group and %d scheduled retries (its dead letters are kept)",
            route,
            REMOVED_ROUTE_GRACE_S // 86_400,
            retries,
        )

    def _now_ms(self) -> int:
        return round(self._clock() * 1000)


def _id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
