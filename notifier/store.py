"""Request state in Redis, and the outbox events its changes produce.

Each page of a listing is applied by one Lua call that diffs, stores and appends events
together, so no crash can separate a state change from its event. Every write first
checks that the caller holds the lease and the epoch its cycle began with.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from notifier.config import ConfigError, Settings, env_name
from notifier.keys import STATE_BUCKETS, Keys
from notifier.models import FINISHED, LipsyncRequest, decode_status, encode_status

log = logging.getLogger(__name__)

# A request first seen finished after the baseline is notified unless it was created
# this long before the newest request the baseline saw: such a request was not created
# after the baseline, the listing had missed it.
BASELINE_GRACE_MS = 5 * 60 * 1000
# apply.lua's answer when events need snapshots the call did not carry.
NEED_SNAPSHOTS = "SNAPSHOTS"
# Batches per digest.lua call, and forgotten per cycle once older than the retention.
SETTLE_BATCHES_PER_CALL = 100
PRUNE_BATCHES_PER_CALL = 100
# A Redis call that takes longer fails the cycle rather than stalling it.
REDIS_TIMEOUT = 5.0


class StoreRefused(Exception):
    """The store refused a write that no longer applies; start the cycle again."""


class LeaseLost(StoreRefused):
    """Another poller holds the lease now; this one must stop writing."""


class EpochChanged(StoreRefused):
    """The epoch is gone or replaced (Redis lost its data): the cycle restarts as a baseline."""


class GroupMissing(StoreRefused):
    """A configured route has no consumer group, so an event for it would be lost."""


_REFUSALS: dict[str, type[StoreRefused]] = {
    "LEASE_LOST": LeaseLost,
    "EPOCH_CHANGED": EpochChanged,
    "NOGROUP": GroupMissing,
}


@dataclass(frozen=True, slots=True)
class Epoch:
    """The epoch a cycle began with; `baseline` while its first complete cycle is pending."""

    id: str
    baseline: bool
    created: bool  # this call created it: the namespace was empty


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying one page did."""

    changed: int  # requests first seen or with a new status
    events: int  # events appended to the outbox
    silenced: int  # first seen finished after the baseline, but older than it: not notified
    first_seen: int = 0  # requests that had no stored state
    entered: dict[str, int] = field(default_factory=dict)  # status -> requests entering it


@dataclass(slots=True)
class Settled:
    """What settling batches did."""

    digests: int = 0  # digests appended to the outbox
    waiting: int = 0  # batches that changed within digest_wait, or owe a held-back digest


@dataclass(frozen=True, slots=True)
class Unfinished:
    """A request last seen unfinished: when it was created and where the listing held it."""

    created_ms: int
    offset: int | None  # None: applied without a place (not from a listing)

    @classmethod
    def parse(cls, value: str) -> Unfinished:
        """Read an entry of the unfinished index ("<created ms> <offset or nothing>")."""
        created, _, offset = value.partition(" ")
        return cls(int(created), int(offset) if offset else None)


@dataclass(frozen=True, slots=True)
class StoredState:
    """The state kept for one request."""

    status: str
    accounted: frozenset[str]  # notify_on statuses already notified or recorded silently
    finished_s: int | None


def load_script(client: redis.asyncio.Redis, name: str, *, common: bool = False) -> AsyncScript:
    """A Lua script of `notifier/scripts`, run by SHA and loaded again after NOSCRIPT.

    With `common`, the helpers of `common.lua` (the lease and epoch guard) come first.
    """
    scripts = files("notifier").joinpath("scripts")
    text = scripts.joinpath(f"{name}.lua").read_text()
    if common:
        text = scripts.joinpath("common.lua").read_text() + text
    return client.register_script(text)


def open_redis(settings: Settings) -> redis.asyncio.Redis:
    """A client of the configured Redis, or of an in-process store when none is configured."""
    if settings.redis_url is None:
        log.warning(
            "%s is not set: using an in-memory store, so state is not kept across restarts "
            "and every start begins with a silent baseline",
            env_name("redis_url"),
        )
        return memory_store()
    return connect_redis(settings.redis_url.get_secret_value())


# Redis answers that mean the URL's credentials are wrong: a configuration error, not an
# outage to wait out.
REDIS_REFUSED = (AuthenticationError, AuthorizationError)


def credentials_refused(exc: BaseException) -> ConfigError:
    """The configuration error of a Redis that refuses the credentials of the URL."""
    return ConfigError(
        f"Redis refused the credentials of {env_name('redis_url')} ({exc}); check the user "
        f"name and password in the URL."
    )


def memory_store() -> redis.asyncio.Redis:
    """An in-process store (fakeredis) that runs the same Lua scripts as Redis."""
    import fakeredis  # noqa: PLC0415 - only the embedded store needs it

    return fakeredis.FakeAsyncRedis(decode_responses=True)


def connect_redis(url: str) -> redis.asyncio.Redis:
    """A client of the Redis at `url`, with the timeouts and retry every caller needs.

    After a Redis restart every pooled connection is dead; one immediate retry on a fresh
    connection spares a failed cycle per stale connection. Retrying is safe because every
    write is a script that applies a change at most once.
    """
    return redis.asyncio.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )


class Store:
    """Request state of one namespace, read and written only through its Lua scripts."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = client
        self.keys = Keys(settings.key_prefix)
        self.routes = [route.name for route in settings.routes]
        self._notify_on = "".join(encode_status(status) for status in settings.notify_on)
        self._clock = clock
        self._scripts = {
            name: load_script(client, name, common=True)
            for name in ("begin", "apply", "finish", "prune", "digest", "prune_batches", "forget")
        }
        # Batches are tracked only for digest routes: without one, they would cost memory
        # and time for nothing.
        self._digest_routes = settings.digest_routes

    async def begin(self, token: str, notify_existing: bool) -> Epoch:
        """The epoch for a new cycle, created with the routes' groups if missing."""
        keys = [self.keys.epoch, self.keys.lease, self.keys.outbox]
        args = [token, uuid.uuid4().hex, int(notify_existing), *self.routes]
        epoch_id, phase, created = await self._run("begin", keys, args)
        return Epoch(id=epoch_id, baseline=phase == "baseline", created=bool(created))

    async def apply(
        self,
        requests: Sequence[LipsyncRequest],
        epoch: Epoch,
        token: str,
        positions: Sequence[int] | None = None,
    ) -> Applied:
        """Diff one page against the stored state and queue its events, in one atomic call;
        `positions` (each request's offset in the listing) keep the unfinished index's
        places up to date."""
        keys = [
            self.keys.epoch,
            self.keys.lease,
            self.keys.outbox,
            self.keys.batches,
            self.keys.open_batches,
            self.keys.unfinished,
        ]
        args: list[Any] = [
            token,
            epoch.id,
            self._notify_on,
            round(self._clock() * 1000),
            len(self.routes),
            *self.routes,
        ]
        packed: list[str] = []
        bucket_index: dict[str, int] = {}
        places = positions if positions is not None else [""] * len(requests)
        for request, place in zip(requests, places, strict=True):
            bucket = self.keys.state_of(request.id)
            index = bucket_index.setdefault(bucket, len(keys) + 1)
            if index == len(keys) + 1:
                keys.append(bucket)
            code = encode_status(request.status)
            packed.append(
                f"{index} {request.created_ms} {_finished_s(request)} {place} "
                f"{len(request.id.encode())} {len(code.encode())} {request.id}{code}"
            )
        args.append("".join(packed))
        args.append(self._memberships(requests, keys) if self._digest_routes else "")
        # Snapshots go only with the requests the script asks for: most queue no event.
        reply = await self._run("apply", keys, args)
        while reply[0] == NEED_SNAPSHOTS:
            for position in reply[1:]:
                args += [position, requests[position].snapshot()]
            reply = await self._run("apply", keys, args)
        changed, events, silenced, first_seen, *entered = reply
        return Applied(
            changed=changed,
            events=events,
            silenced=silenced,
            first_seen=first_seen,
            entered={
                decode_status(code): int(count)
                for code, count in zip(entered[::2], entered[1::2], strict=True)
            },
        )

    def _memberships(self, requests: Sequence[LipsyncRequest], keys: list[str]) -> str:
        """The page's batch members for apply.lua, their batches' keys appended to `keys`."""
        batch_index: dict[str, int] = {}
        packed = []
        for position, request in enumerate(requests):
            if (ref := request.reference_id) is None:
                continue
            if (index := batch_index.get(ref)) is None:
                index = batch_index[ref] = len(keys) + 1
                keys += [self.keys.batch(ref), self.keys.batch_results(ref)]
            packed.append(f"{position} {index} {len(ref.encode())} {ref}")
        return "".join(packed)

    async def finish(
        self, epoch: Epoch, token: str, sweep: Mapping[str, str] | None = None
    ) -> bool:
        """Mark the cycle complete (a baseline becomes live) and keep what it learned of the
        listing (`sweep`, replacing the last); True if it was the baseline."""
        keys = [self.keys.epoch, self.keys.lease, self.keys.last_cycle, self.keys.sweep]
        args = [token, epoch.id, round(self._clock() * 1000), BASELINE_GRACE_MS]
        for name, value in (sweep or {}).items():
            args += [name, value]
        return bool(await self._run("finish", keys, args))

    async def sweep(self) -> dict[str, str]:
        """What the last complete cycle learned of the listing (see `sweep.py`)."""
        return await self.redis.hgetall(self.keys.sweep)

    async def prune(self, epoch: Epoch, token: str, buckets: range, retention_s: float) -> int:
        """Forget requests of these buckets that finished more than `retention_s` ago."""
        keys = [self.keys.epoch, self.keys.lease, *map(self.keys.state, buckets)]
        cutoff = math.floor(self._clock() - retention_s)
        return await self._run("prune", keys, [token, epoch.id, cutoff])

    async def settle_batches(self, epoch: Epoch, token: str) -> Settled:
        """Queue the digest of every batch that settled for a digest route; close the
        batches that owe none."""
        routes = self._digest_routes
        now = round(self._clock() * 1000)
        # A batch changed within the shortest digest_wait cannot settle for any route.
        quiet_since = now - min(round(route.digest_wait * 1000) for route in routes)
        refs = await self.redis.zrangebyscore(self.keys.open_batches, "-inf", quiet_since)
        settled = Settled()
        route_args: list[Any] = []
        for route in routes:
            route_args += [
                route.name,
                round(route.digest_wait * 1000),
                round(route.digest_interval * 1000),
            ]
        for start in range(0, len(refs), SETTLE_BATCHES_PER_CALL):
            keys = [self.keys.epoch, self.keys.lease, self.keys.outbox, self.keys.open_batches]
            args = [token, epoch.id, now, len(routes), *route_args]
            for ref in refs[start : start + SETTLE_BATCHES_PER_CALL]:
                keys += [self.keys.batch(ref), self.keys.batch_results(ref)]
                args += [ref, "".join("1" if route.digests(ref) else "0" for route in routes)]
            queued, owing = await self._run("digest", keys, args)
            settled.digests += queued
            settled.waiting += owing
        # Batches that changed too lately to settle: the next cycles must come soon.
        settled.waiting += await self.redis.zcount(
            self.keys.open_batches, f"({quiet_since}", "+inf"
        )
        return settled

    async def prune_batches(self, epoch: Epoch, token: str, retention_s: float) -> int:
        """Forget batches in which nothing changed for `retention_s`, a few per call."""
        cutoff = round((self._clock() - retention_s) * 1000)
        refs = await self.redis.zrangebyscore(
            self.keys.batches, "-inf", cutoff, start=0, num=PRUNE_BATCHES_PER_CALL
        )
        if not refs:
            return 0
        keys = [self.keys.epoch, self.keys.lease, self.keys.batches, self.keys.open_batches]
        for ref in refs:
            keys += [self.keys.batch(ref), self.keys.batch_results(ref)]
        return await self._run("prune_batches", keys, [token, epoch.id, cutoff, *refs])

    async def unfinished(self) -> dict[str, Unfinished]:
        """Every request last seen unfinished: its created_at and where it was listed."""
        index = await self.redis.hgetall(self.keys.unfinished)
        return {request_id: Unfinished.parse(value) for request_id, value in index.items()}

    async def unfinished_count(self) -> int:
        """How many requests were last seen unfinished."""
        return await self.redis.hlen(self.keys.unfinished)

    async def forget_unfinished(self, epoch: Epoch, token: str, request_ids: Sequence[str]) -> None:
        """Stop looking for requests the listing no longer holds (their state stays)."""
        if request_ids:
            keys = [self.keys.epoch, self.keys.lease, self.keys.unfinished]
            await self._run("forget", keys, [token, epoch.id, *request_ids])

    async def stored(self, request_id: str) -> StoredState | None:
        """The state kept for one request, or None if it has none."""
        value = await self.redis.hget(self.keys.state_of(request_id), request_id)
        if value is None:
            return None
        accounted, finished, code = value.split("|", 2)
        return StoredState(
            status=decode_status(code),
            accounted=frozenset(map(decode_status, accounted)),
            finished_s=int(finished) if finished else None,
        )

    async def tracked(self) -> int:
        """How many requests have stored state."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket in range(STATE_BUCKETS):
                pipe.hlen(self.keys.state(bucket))
            return sum(await pipe.execute())

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._scripts[name](keys=keys, args=args)
        except ResponseError as exc:
            refusal = _REFUSALS.get(str(exc).split(" ", 1)[0])
            if refusal is None:
                raise
            raise refusal(str(exc).split(" ", 1)[1]) from None


def _finished_s(request: LipsyncRequest) -> int | str:
    """When a finished request finished, rounded up: its created_at is never later."""
    if request.status not in FINISHED:
        return ""
    # created_at to the millisecond, which the sweep has already worked out.
    created = request.created_ms / 1000
    finished = request.finished_at
    return math.ceil(created if finished is None else max(created, finished.timestamp()))
