"""Batch digests: what `digest.lua` freezes into the outbox when a batch settles.

A digest's id and everything its body is rendered from are in its entry (`outbox.py`
reads and writes it), so every retry, restart, replica and replay sends the same
`webhook-id` and body.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from notifier.models import EVENT_NAMESPACE, LipsyncRequest, format_timestamp

DIGEST_TYPE = "lipsync.batch.settled"
# Fixed forever, like EVENT_NAMESPACE: it names every digest's webhook-id.
DIGEST_NAMESPACE = uuid.uuid5(EVENT_NAMESPACE, DIGEST_TYPE)
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
