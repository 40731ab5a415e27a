"""The data that flows through the notifier: API requests, events, and send results.

Data flows one way: the API yields `LipsyncRequest`s, the store turns status changes
into `Event`s in the outbox, and a sink answers each send with a `SendResult`.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, model_validator

# Fixed forever: changing it would change every webhook-id, and receivers that
# de-duplicate on webhook-id would see old events as new.
EVENT_NAMESPACE = uuid.UUID("9d8d0f70-7a4b-4c13-bc4b-7fd2470ff927")

# The statuses the API documents, in the order a request goes through them: the one
# vocabulary of the notifier (settings, the store, the simulator, samples).
QUEUED, PROCESSING, COMPLETED, FAILED = "queued", "processing", "completed", "failed"
STATUSES = (QUEUED, PROCESSING, COMPLETED, FAILED)
# A request in one of these no longer changes (apply.lua's FINISHED holds their codes).
FINISHED = frozenset({COMPLETED, FAILED})
# Request state is kept for every request of an account, so a known status is stored as
# one letter; any other status is kept whole behind "~" (the API may add statuses).
STATUS_CODES = {QUEUED: "q", PROCESSING: "p", COMPLETED: "c", FAILED: "f"}
_STATUS_NAMES = {code: status for status, code in STATUS_CODES.items()}
UNKNOWN_STATUS_MARK = "~"


def encode_status(status: str) -> str:
    """The short form of a status, as the store and the outbox keep it."""
    return STATUS_CODES.get(status) or UNKNOWN_STATUS_MARK + status


def decode_status(code: str) -> str:
    """The status of a short form written by `encode_status`."""
    return _STATUS_NAMES.get(code) or code.removeprefix(UNKNOWN_STATUS_MARK)


def format_timestamp(value: datetime) -> str:
    """Format a datetime as ISO 8601 in UTC with a `Z` suffix, as the API writes them."""
    return value.astimezone(UTC).isoformat().removesuffix("+00:00") + "Z"


# Written as UTC with a `Z`. Values keep the offset they were listed with (an aware
# datetime is the same instant whatever its offset); only naive ones are made UTC.
UtcDateTime = Annotated[datetime, PlainSerializer(format_timestamp, return_type=str)]
TIMESTAMP_FIELDS = ("created_at", "started_at", "finished_at")


class LipsyncRequest(BaseModel):
    """One item of `GET /v1/lipsync/requests`.

    Unknown fields are ignored, unknown statuses are kept as they are, and absent
    optional fields are `None`.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1)
    status: str = Field(min_length=1)
    created_at: UtcDateTime
    reference_id: str | None = None
    started_at: UtcDateTime | None = None
    finished_at: UtcDateTime | None = None
    output_url: str | None = None
    error_message: str | None = None

    @model_validator(mode="after")
    def _naive_as_utc(self) -> LipsyncRequest:
        # The API documents UTC, so a timestamp without an offset is taken to be UTC. One
        # check per request, not a validator per field: those were half the cost of
        # validating a page.
        for name in TIMESTAMP_FIELDS:
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                object.__setattr__(self, name, value.replace(tzinfo=UTC))
        return self

    @cached_property
    def created_ms(self) -> int:
        """`created_at` in unix milliseconds, as the store and the sweep compare it (cached:
        a `model_copy` with another created_at would keep the old value)."""
        return math.floor(self.created_at.timestamp() * 1000)

    def snapshot(self) -> str:
        """Compact JSON of this request (absent fields left out), as stored in an event."""
        return self.model_dump_json(exclude_none=True)


class MalformedEvent(ValueError):
    """An outbox entry that cannot be read back as an event; it can only be dead-lettered."""


def event_id(request_id: str, status: str) -> str:
    """The stable id of a (request, status) transition: UUIDv5 of `"{request_id}/{status}"`."""
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{request_id}/{status}"))


@dataclass(frozen=True, slots=True)
class Event:
    """A request's entry into a `notify_on` status, as queued in the outbox.

    The id and everything a body is rendered from are fixed when the event is
    created, so every retry, replica and replay sends the same id and body.
    """

    request: LipsyncRequest
    previous_status: str | None
    detected_ms: int  # unix milliseconds, when the poller saw the transition
    id: str = field(init=False, repr=False, compare=False)  # the `webhook-id`

    def __post_init__(self) -> None:
        # Computed once: every attempt, log line and dead letter asks for it.
        object.__setattr__(self, "id", event_id(self.request.id, self.request.status))

    @property
    def status(self) -> str:
        """The status the request entered."""
        return self.request.status

    @property
    def reference_id(self) -> str | None:
        """The request's reference_id: the batch it belongs to, if any."""
        return self.request.reference_id

    @property
    def type(self) -> str:
        """The event type of the webhook body, e.g. `lipsync.request.completed`."""
        return f"lipsync.request.{self.status}"

    @property
    def detected_at(self) -> datetime:
        """When the transition was detected."""
        return datetime.fromtimestamp(self.detected_ms / 1000, tz=UTC)

    def log_fields(self) -> tuple[str, dict[str, Any]]:
        """How a log line names this event, and its extra fields."""
        request = self.request
        subject = (
            f"event {self.id} (request {request.id}, reference_id "
            f"{request.reference_id or '-'}, {self.status})"
        )
        return subject, {
            "event_id": self.id,
            "request_id": request.id,
            "reference_id": request.reference_id,
            "status": self.status,
        }

    def context(self) -> dict[str, Any]:
        """The variables a template sees: `event` and `request`, JSON-ready values only."""
        return {
            "event": {
                "id": self.id,
                "type": self.type,
                "status": self.status,
                "previous_status": self.previous_status,
                "detected_at": format_timestamp(self.detected_at.replace(microsecond=0)),
            },
            "request": self.request.model_dump(mode="json"),
        }


@dataclass(frozen=True, slots=True)
class Delivered:
    """The receiver accepted the message (any 2xx)."""

    status: int | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """Worth trying again: no earlier than `after` seconds if the receiver said so."""

    after: float | None
    reason: str


@dataclass(frozen=True, slots=True)
class Permanent:
    """Trying again cannot help (3xx, most 4xx, a rejected payload): dead-letter it."""

    reason: str


SendResult = Delivered | Retry | Permanent
