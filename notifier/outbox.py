"""The outbox wire format: how events and digests travel through the outbox stream, the
retry set and the dead letters, and how they are read back.

Field names are one letter because the outbox holds an entry per pending event. The Lua
scripts write the same names (`apply.lua` an event's, `digest.lua` a digest's, the
queue scripts a retry's attempts): `tests/test_outbox.py` checks that they do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from pydantic import ValidationError

from notifier.digest import Digest, Member
from notifier.models import Event, LipsyncRequest, MalformedEvent, decode_status, encode_status

# An event: the request's snapshot, the status it had before, when it was detected.
FIELD_REQUEST = "r"
FIELD_PREVIOUS_STATUS = "p"
FIELD_DETECTED_MS = "t"
# A digest: the route it is for (which marks the entry as a digest), the batch, its
# members packed in one string, the batch's first created_at; and `t`.
FIELD_ROUTE = "d"
FIELD_BATCH = "b"
FIELD_MEMBERS = "m"
FIELD_CREATED_MS = "c"
# A retry: the entry's fields and the attempts made so far.
FIELD_ATTEMPTS = "a"
FIELD_NAMES = {
    "FIELD_REQUEST": FIELD_REQUEST,
    "FIELD_PREVIOUS_STATUS": FIELD_PREVIOUS_STATUS,
    "FIELD_DETECTED_MS": FIELD_DETECTED_MS,
    "FIELD_ROUTE": FIELD_ROUTE,
    "FIELD_BATCH": FIELD_BATCH,
    "FIELD_MEMBERS": FIELD_MEMBERS,
    "FIELD_CREATED_MS": FIELD_CREATED_MS,
    "FIELD_ATTEMPTS": FIELD_ATTEMPTS,
}

Fields = dict[str, str]
OutboxItem = Event | Digest


def entry_of(item: OutboxItem) -> Fields:
    """The outbox entry of an event or a digest, as the Lua scripts write it."""
    if isinstance(item, Digest):
        return {
            FIELD_ROUTE: item.route,
            FIELD_BATCH: item.reference_id,
            FIELD_MEMBERS: pack_members(item.members),
            FIELD_CREATED_MS: "" if item.created_ms is None else str(item.created_ms),
            FIELD_DETECTED_MS: str(item.detected_ms),
        }
    previous = item.previous_status
    return {
        FIELD_REQUEST: item.request.snapshot(),
        FIELD_PREVIOUS_STATUS: encode_status(previous) if previous else "",
        FIELD_DETECTED_MS: str(item.detected_ms),
    }


def read_entry(fields: Mapping[str, str]) -> OutboxItem:
    """An outbox entry as the event or digest it holds; `MalformedEvent` if neither."""
    if FIELD_ROUTE in fields:
        return _read_digest(fields)
    try:
        request = LipsyncRequest.model_validate_json(fields[FIELD_REQUEST])
        detected_ms = int(fields[FIELD_DETECTED_MS])
        previous = decode_status(fields[FIELD_PREVIOUS_STATUS]) or None
    except (KeyError, ValueError, ValidationError) as exc:
        raise MalformedEvent(f"outbox entry is not an event: {exc.__class__.__name__}") from exc
    return Event(request=request, previous_status=previous, detected_ms=detected_ms)


def _read_digest(fields: Mapping[str, str]) -> Digest:
    try:
        created = fields[FIELD_CREATED_MS]
        return Digest(
            route=fields[FIELD_ROUTE],
            reference_id=fields[FIELD_BATCH],
            members=tuple(unpack_members(fields[FIELD_MEMBERS])),
            created_ms=int(created) if created else None,
            detected_ms=int(fields[FIELD_DETECTED_MS]),
        )
    except (KeyError, ValueError, ValidationError) as exc:
        raise MalformedEvent(f"outbox entry is not a digest: {exc.__class__.__name__}") from exc


def pack_members(members: Sequence[Member]) -> str:
    """A digest's members in one string, as digest.lua packs them: per member
    "<bytes> <bytes> " then the previous status code and the snapshot (lengths in bytes,
    as Lua counts them)."""
    parts = []
    for member in members:
        previous = encode_status(member.previous_status) if member.previous_status else ""
        snapshot = member.request.snapshot()
        parts.append(f"{_bytes(previous)} {_bytes(snapshot)} {previous}{snapshot}")
    return "".join(parts)


def unpack_members(packed: str) -> list[Member]:
    """The members `pack_members` (or digest.lua) packed; ValueError if cut short."""
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


def _bytes(text: str) -> int:
    return len(text.encode())


def retry_payload(fields: Mapping[str, str], attempts: int) -> str:
    """A retry's entry and its attempts so far, as the retry set keeps them."""
    return json.dumps({**fields, FIELD_ATTEMPTS: attempts}, separators=(",", ":"))


def read_retry_payload(payload: str) -> tuple[Fields, int]:
    """The entry and the attempts of a retry payload."""
    data = json.loads(payload)
    attempts = int(data.pop(FIELD_ATTEMPTS, 0))
    return {name: str(value) for name, value in data.items()}, attempts
