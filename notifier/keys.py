"""Every Redis key the notifier uses, named in one place.

All keys start with `{prefix}`: the braces make the prefix a Redis Cluster hash tag,
so every key of one deployment lives in one slot and a Lua script may touch any of
them. Two deployments with different prefixes share a Redis without meeting.
Nothing outside this module builds a key string.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from functools import cached_property

# Request state is spread over this many small hashes instead of a key per request:
# small hashes stay listpack-encoded, which costs a fraction of a key's overhead.
STATE_BUCKETS = 4096


@dataclass(frozen=True)
class Keys:
    """The key names of one deployment, all under the hash tag `{prefix}`."""

    prefix: str

    def _key(self, *parts: str | int) -> str:
        return ":".join([f"{{{self.prefix}}}", *map(str, parts)])

    @cached_property
    def epoch(self) -> str:
        """Identity of the current baseline; gone or changed means Redis lost its data."""
        return self._key("epoch")

    @cached_property
    def lease(self) -> str:
        """Token of the one replica allowed to poll and apply pages."""
        return self._key("lease")

    @cached_property
    def last_cycle(self) -> str:
        """When some replica last completed a poll cycle (readiness)."""
        return self._key("last-cycle")

    @cached_property
    def sweep(self) -> str:
        """Hash of what the last cycle learned of the listing: its order, total, newest
        request and where the safety net reads next."""
        return self._key("sweep")

    @cached_property
    def unfinished(self) -> str:
        """Hash of every request last seen unfinished -> its created_at (unix ms) and where
        the listing held it: what each cycle looks at, whatever its age."""
        return self._key("unfinished")

    @cached_property
    def outbox(self) -> str:
        """Stream of events waiting for delivery, one consumer group per route."""
        return self._key("outbox")

    @cached_property
    def dead_letters(self) -> str:
        """Stream of deliveries that gave up, for `notifier dlq`."""
        return self._key("dead-letters")

    @cached_property
    def routes_seen(self) -> str:
        """Hash of route name -> when a worker of some replica last served it (unix ms)."""
        return self._key("routes-seen")

    @cached_property
    def batches(self) -> str:
        """Sorted set of every tracked batch (reference_id), scored by its last change (unix
        ms): the oldest are forgotten after the retention."""
        return self._key("batches")

    @cached_property
    def open_batches(self) -> str:
        """Sorted set of the batches that may owe a digest, scored by their last change."""
        return self._key("open-batches")

    def batch(self, reference_id: str) -> str:
        """Hash of one batch: unfinished members, last change, first created_at, result
        sequence, and per digest route the last result digested and when."""
        return self._key("batch", reference_id)

    def batch_results(self, reference_id: str) -> str:
        """Hash of one batch's results not yet in every route's digest: request id ->
        sequence number, previous status and snapshot."""
        return self._key("batch-results", reference_id)

    def retries(self, route: str) -> str:
        """Sorted set of one route's deliveries to try again (outbox entry ids), scored by
        when they are due (unix ms)."""
        return self._key("retries", route)

    def retry_events(self, route: str) -> str:
        """Hash of one route's retry entry id -> the event and its attempts so far."""
        return self._key("retry-events", route)

    def retry_claims(self, route: str) -> str:
        """Hash of one route's retries being sent now -> the consumer sending each."""
        return self._key("retry-claims", route)

    def state(self, bucket: int) -> str:
        """One bucket hash of request state (request id -> stored status)."""
        if not 0 <= bucket < STATE_BUCKETS:
            raise ValueError(f"state bucket {bucket} is outside 0..{STATE_BUCKETS - 1}")
        return self._key("state", bucket)

    def state_of(self, request_id: str) -> str:
        """The bucket hash that holds this request's state."""
        return self._states[zlib.crc32(request_id.encode()) % STATE_BUCKETS]

    @cached_property
    def _states(self) -> list[str]:
        # Named once: a large listing asks for a bucket per request.
        return [self.state(bucket) for bucket in range(STATE_BUCKETS)]

    def heartbeat(self, consumer: str) -> str:
        """Expiring proof that a delivery worker is alive; its pending work is safe."""
        return self._key("heartbeat", consumer)

    def slack_slot(self, url: str) -> str:
        """Pacing slot of one Slack webhook URL, named by a digest so the URL never shows."""
        digest = hashlib.sha256(url.encode()).hexdigest()[:32]
        return self._key("slack-slot", digest)
