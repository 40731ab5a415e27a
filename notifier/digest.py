"""Batch digests: the outbox entry `digest.lua` freezes when a batch settles, read back.

Per-request events and digests share the outbox; `read_entry` tells them apart. A
digest's id and everything its body is rendered from are in the entry, so every retry,
restart, replica and replay sends the same `webhook-id` and body.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from notifier.models import (
    EVENT_NAMESPACE,
    FIELD_DETECTED_MS,
    Event,
    LipsyncRequest,
    MalformedEvent,
    decode_status,
    encode_status,
    format_timestamp,
)

DIGEST_TYPE = "lipsync.batch.settled"
# Fixed forever, like EVENT_NAMESPACE: it names every digest's webhook-id.
DIGEST_NAMESPACE = uuid.uuid5(EVENT_NAMESPACE, DIGEST_TYPE)
# Field names of a digest's outbox entry, as digest.lua writes them. The route field
# marks the entry as a digest: only that route sends it.
FIELD_ROUTE = "d"
FIELD_BATCH = "b"
FIELD_MEMBERS = "m"
FIELD_CREATED_MS = "c"
# The fields of a member's per-request body after id, status and previous_status.
PER_REQUEST_FIELDS = (
    "reference_id",
    "created_at",
    "started_at",
    "finished_at",
    "output_url",
    "error_message",
)


def digest_id(reference_id: str, request_ids: Sequence[str]) -> str:
    """The stable id of a digest: UUIDv5 of the reference_id and the sorted request ids."""
    return str(uuid.uuid5(DIGEST_NAMESPACE, "\n".join([reference_id, *sorted(request_ids)])))


@dataclass(frozen=True, slots=True)
class Member:
    """One request of a digest, as it was when its result was recorded."""

    request: LipsyncRequest
    previous_status: str | None

    def data(self) -> dict[str, Any]:
        """The request as the `data` of its per-request webhook body."""
        request = self.request.model_dump(mode="json")
        return {
            "id": request["id"],
            "status": request["status"],
            "previous_status": self.previous_status,
            **{name: request[name] for name in PER_REQUEST_FIELDS},
        }


@dataclass(frozen=True, slots=True)
class Digest:
    """The results of one batch for one route: the first digest, or a follow-up of only
    the results that came after the last one."""

    route: str
    reference_id: str
    members: tuple[Member, ...]  # sorted by request id
    created_ms: int | None  # the batch's first created_at, unix ms
    detected_ms: int  # when the batch settled
    id: str = field(init=False, repr=False, compare=False)  # the `webhook-id`

    def __post_init__(self) -> None:
        ids = [member.request.id for member in self.members]
        object.__setattr__(self, "id", digest_id(self.reference_id, ids))

    type = DIGEST_TYPE
    status = "settled"  # what logs and dead letters call a digest's state

    def counts(self) -> dict[str, int]:
        """How many results ended in each status, statuses in alphabetical order."""
        counted = Counter(member.request.status for member in self.members)
        return dict(sorted(counted.items()))

    def created_at(self) -> datetime | None:
        """The batch's first created_at."""
        if self.created_ms is not None:
            return datetime.fromtimestamp(self.created_ms / 1000, tz=UTC)
        return min((member.request.created_at for member in self.members), default=None)

    def finished_at(self) -> datetime | None:
        """The last finished_at of the results."""
        finished = [m.request.finished_at for m in self.members if m.request.finished_at]
        return max(finished, default=None)

    def to_fields(self) -> dict[str, str]:
        """The outbox entry of this digest, as digest.lua writes it."""
        parts = []
        for member in self.members:
            previous = encode_status(member.previous_status) if member.previous_status else ""
            snapshot = member.request.snapshot()
            parts.append(f"{_bytes(previous)} {_bytes(snapshot)} {previous}{snapshot}")
        return {
            FIELD_ROUTE: self.route,
            FIELD_BATCH: self.reference_id,
            FIELD_MEMBERS: "".join(parts),
            FIELD_CREATED_MS: "" if self.created_ms is None else str(self.created_ms),
            FIELD_DETECTED_MS: str(self.detected_ms),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> Digest:
        """Read a digest's outbox entry back; `MalformedEvent` if it is not one."""
        try:
            members = tuple(_members(fields[FIELD_MEMBERS]))
            created = fields[FIELD_CREATED_MS]
            return cls(
                route=fields[FIELD_ROUTE],
                reference_id=fields[FIELD_BATCH],
                members=members,
                created_ms=int(created) if created else None,
                detected_ms=int(fields[FIELD_DETECTED_MS]),
            )
        except (KeyError, ValueError, ValidationError) as exc:
            raise MalformedEvent(f"outbox entry is not a digest: {exc.__class__.__name__}") from exc

    def context(self) -> dict[str, Any]:
        """The variables a digest template sees: `digest` and `requests`, JSON-ready."""
        requests = [member.data() for member in self.members]
        created, finished = self.created_at(), self.finished_at()
        return {
            "digest": {
                "id": self.id,
                "type": self.type,
                "reference_id": self.reference_id,
                "size": len(requests),
                "counts": self.counts(),
                "created_at": format_timestamp(created) if created else None,
                "finished_at": format_timestamp(finished) if finished else None,
                "detected_at": format_timestamp(
                    datetime.fromtimestamp(self.detected_ms // 1000, tz=UTC)
                ),
            },
            "requests": requests,
        }

    def log_fields(self) -> tuple[str, dict[str, Any]]:
        """How a log line names this digest, and its extra fields."""
        subject = (
            f"digest {self.id} (reference_id {self.reference_id}, {len(self.members)} requests)"
        )
        return subject, {"event_id": self.id, "reference_id": self.reference_id}


def _bytes(text: str) -> int:
    return len(text.encode())


def _members(packed: str) -> list[Member]:
    """The members of a digest entry: "<bytes> <bytes> " then the previous status code and
    the snapshot, one after another (lengths in bytes, as Lua counts them)."""
    data, at, members = packed.encode(), 0, []
    while at < len(data):
        head_end = data.index(b" ", data.index(b" ", at) + 1)
        previous_bytes, snapshot_bytes = map(int, data[at:head_end].split(b" "))
        start = head_end + 1
        previous = data[start : start + previous_bytes].decode()
        snapshot = data[start + previous_bytes : start + previous_bytes + snapshot_bytes]
        if len(snapshot) != snapshot_bytes:
            raise ValueError("a digest member is cut short")
        request = LipsyncRequest.model_validate_json(snapshot)
        members.append(Member(request, decode_status(previous) or None))
        at = start + previous_bytes + snapshot_bytes
    return members


OutboxItem = Event | Digest


def read_entry(fields: Mapping[str, str]) -> OutboxItem:
    """An outbox entry as the event or digest it holds; `MalformedEvent` if neither."""
    if FIELD_ROUTE in fields:
        return Digest.from_fields(fields)
    return Event.from_fields(fields)
