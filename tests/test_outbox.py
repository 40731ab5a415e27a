"""The outbox wire format: what `outbox.py` writes and reads is what the Lua scripts write,
and every kind of entry reads back as it was written."""

from __future__ import annotations

import json
import re
from importlib.resources import files

import pytest

from notifier.models import Event, LipsyncRequest
from notifier.outbox import (
    FIELD_ATTEMPTS,
    FIELD_BATCH,
    FIELD_CREATED_MS,
    FIELD_DETECTED_MS,
    FIELD_MEMBERS,
    FIELD_NAMES,
    FIELD_PREVIOUS_STATUS,
    FIELD_REQUEST,
    FIELD_ROUTE,
    entry_of,
    read_entry,
    read_retry_payload,
    retry_payload,
)

from samples import COMPLETED, DETECTED_MS


def xadd_fields(script: str) -> list[str]:
    """The field names a script's XADD to the outbox writes, in order."""
    text = files("notifier").joinpath("scripts", script).read_text()
    (call,) = re.findall(r"XADD', KEYS\[3\], '\*',(.*?)\)\n", text, re.S)
    return re.findall(r"'(\w+)',", call + ",")


def test_apply_lua_writes_an_event_with_the_field_names_of_outbox_py() -> None:
    assert xadd_fields("apply.lua") == [FIELD_REQUEST, FIELD_PREVIOUS_STATUS, FIELD_DETECTED_MS]


def test_digest_lua_writes_a_digest_with_the_field_names_of_outbox_py() -> None:
    assert xadd_fields("digest.lua") == [
        FIELD_ROUTE,
        FIELD_BATCH,
        FIELD_MEMBERS,
        FIELD_CREATED_MS,
        FIELD_DETECTED_MS,
    ]


def test_every_field_name_is_one_letter_and_names_one_thing() -> None:
    names = list(FIELD_NAMES.values())
    assert all(len(name) == 1 for name in names)
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("previous", [None, "processing"])
def test_an_event_reads_back_as_written(previous: str | None) -> None:
    request = LipsyncRequest.model_validate(COMPLETED)
    event = Event(request, previous_status=previous, detected_ms=DETECTED_MS)
    assert read_entry(entry_of(event)) == event


def test_a_retry_payload_carries_the_entry_and_its_attempts() -> None:
    entry = {FIELD_REQUEST: "{}", FIELD_PREVIOUS_STATUS: "p", FIELD_DETECTED_MS: "1"}
    payload = retry_payload(entry, 3)
    assert json.loads(payload)[FIELD_ATTEMPTS] == 3
    assert read_retry_payload(payload) == (entry, 3)
