"""Shared types: API items, events with stable ids and a compact outbox form, send results."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from importlib.resources import files

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from notifier.config import Settings
from notifier.models import (
    EVENT_NAMESPACE,
    FINISHED,
    STATUS_CODES,
    Delivered,
    Event,
    LipsyncRequest,
    MalformedEvent,
    Permanent,
    Retry,
    SendResult,
    decode_status,
    encode_status,
    event_id,
    format_timestamp,
)
from notifier.outbox import entry_of, read_entry

from samples import COMPLETED, DETECTED_MS, QUEUED


def test_a_reference_page_item_is_read_with_utc_timestamps() -> None:
    request = LipsyncRequest.model_validate(COMPLETED)
    assert request.created_at == datetime(2026, 3, 30, 11, 0, tzinfo=UTC)
    assert request.finished_at == datetime(2026, 3, 30, 11, 1, 9, tzinfo=UTC)
    assert request.error_message is None


def test_absent_optional_fields_are_none_and_unknown_fields_are_ignored() -> None:
    request = LipsyncRequest.model_validate({**QUEUED, "priority": 5, "model": {"v": 2}})
    assert (request.started_at, request.finished_at, request.output_url) == (None, None, None)
    assert not hasattr(request, "priority")


def test_unknown_statuses_are_kept_as_strings() -> None:
    assert LipsyncRequest.model_validate({**QUEUED, "status": "cancelled"}).status == "cancelled"


def test_timestamps_keep_their_instant_and_are_written_back_in_utc() -> None:
    request = LipsyncRequest.model_validate(
        {**QUEUED, "created_at": "2026-03-30T13:02:00.5+02:00", "started_at": "2026-03-30T11:03:00"}
    )
    assert request.created_at == datetime(2026, 3, 30, 11, 2, 0, 500000, tzinfo=UTC)
    assert request.started_at.tzinfo is UTC
    dumped = request.model_dump(mode="json")
    assert dumped["created_at"] == "2026-03-30T11:02:00.500000Z"
    assert dumped["started_at"] == "2026-03-30T11:03:00Z"


@pytest.mark.parametrize(
    "created_at", ["2026-03-30T11:02:00.5Z", "2026-03-30T13:02:00.5+02:00", "2026-03-30T11:02:00.5"]
)
def test_created_ms_is_the_same_instant_whatever_the_offset(created_at: str) -> None:
    request = LipsyncRequest.model_validate({**QUEUED, "created_at": created_at})
    assert request.created_ms == 1774868520500


def test_created_ms_is_not_a_field() -> None:
    request = LipsyncRequest.model_validate(QUEUED)
    assert request.created_ms > 0
    assert request == LipsyncRequest.model_validate(QUEUED)
    assert "created_ms" not in request.model_dump()
    assert "created_ms" not in request.snapshot()


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({**QUEUED, "id": ""}, "id"),
        ({**QUEUED, "id": 42}, "id"),
        ({k: v for k, v in QUEUED.items() if k != "status"}, "status"),
        ({**QUEUED, "created_at": "yesterday"}, "created_at"),
        ({**QUEUED, "finished_at": 3.5e20}, "finished_at"),
    ],
)
def test_a_malformed_item_names_the_bad_field(item: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        LipsyncRequest.model_validate(item)
    assert caught.value.errors()[0]["loc"] == (field,)


def test_the_snapshot_is_compact_json_without_absent_fields() -> None:
    snapshot = LipsyncRequest.model_validate(QUEUED).snapshot()
    assert json.loads(snapshot) == QUEUED
    assert " " not in snapshot


def test_event_id_is_uuid5_of_request_and_status() -> None:
    expected = uuid.uuid5(EVENT_NAMESPACE, f"{COMPLETED['id']}/completed")
    assert event_id(COMPLETED["id"], "completed") == str(expected)
    assert uuid.UUID(event_id("r", "failed")).version == 5
    assert event_id("r", "failed") != event_id("r", "completed")
    assert event_id("r", "failed") != event_id("r2", "failed")


def test_event_id_namespace_never_changes() -> None:
    # Receivers de-duplicate on webhook-id: a new namespace would resend everything.
    assert event_id("6f82a2d8-a6d4-4e8a-a0fa-e8b09823a2d8", "completed") == (
        "7b4cbf58-7344-5356-b2b5-85569a12e3fe"
    )


def make_event(previous: str | None = "processing") -> Event:
    return Event(LipsyncRequest.model_validate(COMPLETED), previous, DETECTED_MS)


def test_an_event_exposes_its_id_status_type_and_detection_time() -> None:
    event = make_event()
    assert event.id == event_id(COMPLETED["id"], "completed")
    assert event.status == "completed"
    assert event.type == "lipsync.request.completed"
    assert event.detected_at == datetime(2026, 3, 30, 11, 1, 10, 250000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("queued", "q"),
        ("processing", "p"),
        ("completed", "c"),
        ("failed", "f"),
        ("cancelled", "~cancelled"),
        ("q", "~q"),
        ("~odd|status", "~~odd|status"),
    ],
)
def test_known_statuses_are_stored_as_one_letter_and_others_whole(status: str, code: str) -> None:
    assert encode_status(status) == code
    assert decode_status(code) == status


def test_an_event_is_stored_as_three_short_fields() -> None:
    fields = entry_of(make_event())
    assert fields == {
        "r": LipsyncRequest.model_validate(COMPLETED).snapshot(),
        "p": "p",
        "t": str(DETECTED_MS),
    }
    assert entry_of(make_event(previous=None))["p"] == ""


optional_text = st.none() | st.text(min_size=1, max_size=40)
instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
requests = st.builds(
    LipsyncRequest,
    id=st.text(min_size=1, max_size=40),
    status=st.text(min_size=1, max_size=12),
    created_at=instants,
    reference_id=optional_text,
    started_at=st.none() | instants,
    finished_at=st.none() | instants,
    output_url=optional_text,
    error_message=st.none() | st.text(min_size=1, max_size=2000),
)


@given(
    request=requests,
    previous=st.none() | st.text(min_size=1, max_size=12),
    detected_ms=st.integers(min_value=0, max_value=2**45),
)
def test_events_survive_the_outbox_round_trip(
    request: LipsyncRequest, previous: str | None, detected_ms: int
) -> None:
    event = Event(request, previous, detected_ms)
    again = read_entry(entry_of(event))
    assert again == event
    assert again.id == event.id


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"r": "{not json", "p": "", "t": "1"},
        {"r": json.dumps({"id": "x"}), "p": "", "t": "1"},
        {"r": json.dumps(COMPLETED), "p": "", "t": "soon"},
        {"r": json.dumps(COMPLETED), "t": "1"},
    ],
)
def test_garbage_in_the_outbox_is_a_malformed_event(fields: dict[str, str]) -> None:
    with pytest.raises(MalformedEvent, match="outbox entry is not an event"):
        read_entry(fields)


def test_the_template_context_is_json_ready_with_nulls_for_absent_fields() -> None:
    context = make_event(previous=None).context()
    assert json.loads(json.dumps(context)) == context
    assert context["event"] == {
        "id": event_id(COMPLETED["id"], "completed"),
        "type": "lipsync.request.completed",
        "status": "completed",
        "previous_status": None,
        "detected_at": "2026-03-30T11:01:10Z",
    }
    assert context["request"] == {**COMPLETED, "error_message": None}


def test_format_timestamp_writes_utc_with_z() -> None:
    assert format_timestamp(datetime(2026, 3, 30, 11, 1, 10, tzinfo=UTC)) == "2026-03-30T11:01:10Z"


def describe(result: SendResult) -> str:
    match result:
        case Delivered(status=status):
            return f"delivered {status}"
        case Retry(after=after, reason=reason):
            return f"retry after {after}: {reason}"
        case Permanent(reason=reason):
            return f"permanent: {reason}"


def test_send_results_are_values_to_match_on() -> None:
    assert describe(Delivered(204)) == "delivered 204"
    assert describe(Retry(after=None, reason="HTTP 503")) == "retry after None: HTTP 503"
    assert (
        describe(Permanent("HTTP 400: invalid_payload")) == "permanent: HTTP 400: invalid_payload"
    )
    assert Retry(5.0, "HTTP 429") == Retry(5.0, "HTTP 429")
    with pytest.raises(AttributeError):
        Delivered(200).status = 201  # type: ignore[misc]


def test_apply_lua_counts_as_finished_the_codes_of_the_finished_statuses() -> None:
    text = files("notifier").joinpath("scripts", "apply.lua").read_text()
    (table,) = re.findall(r"local FINISHED = \{(.*?)\}", text)
    codes = {name.strip() for name, _ in (pair.split("=") for pair in table.split(","))}
    assert codes == {STATUS_CODES[status] for status in FINISHED}


def test_the_settings_know_the_statuses_of_the_one_vocabulary() -> None:
    assert Settings.model_fields["notify_on"].default == sorted(FINISHED)
