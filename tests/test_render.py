"""Rendering: the bundled templates, the filters, template lookup, caching and errors.

The contract ("Generic webhook request" and "Slack message" in the design) says what a
body must be; these tests hold the renderer to it with hostile field values, and check
that a broken template fails with a message naming the route, the file and the line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from slack_sdk.models.blocks import Block

from notifier.config import Route, Settings, load_settings
from notifier.digest import Digest, Member
from notifier.models import Event, LipsyncRequest
from notifier.render import (
    Renderer,
    RenderError,
    clip,
    duration,
    mrkdwn,
    readable_time,
    sections,
    slack_link,
    slack_problems,
)

from samples import COMPLETED, DETECTED_MS

SLACK_URL = "https://hooks.slack.com/services/T0/B0/XYZ"
WEBHOOK_URL = "http://127.0.0.1:9/hook"
STATUSES = ("queued", "processing", "completed", "failed")

# Everything that could break JSON, inject Slack markup or overflow a block.
HOSTILE = (
    'quote " backslash \\ newline \n tab \t <!channel> <!here> <@U123> '
    "<script>alert(1)</script> & &amp; &lt; </ > emoji 🎬 👩‍👩‍👧 "
)
HOSTILE_ID = 'id"},{"injected": true} <!channel> & \\ \n 🎬'
LONG_ERROR = (HOSTILE * 200)[:10_000]
LONG_REFERENCE = ("ref " + HOSTILE * 200)[:10_000]
HOSTILE_PREVIOUS = '<!here> "unknown-status" & \\'
HOSTILE_HTTP_URL = 'https://storage.example.com/o.mp4?a=<!channel>&b="q"&c=\\'
LONG_HTTP_URL = "https://storage.example.com/" + "a" * 5_000
OUTPUT_URLS = {
    "hostile-https": HOSTILE_HTTP_URL,
    "5kB-https": LONG_HTTP_URL,
    "javascript": "javascript:alert(1)",
    "javascript-hostile": 'javascript:alert("<!channel>&")',
    "none": None,
}
ENTITY = re.compile(r"&(amp|lt|gt);")
ROUTE_TOML = '[[routes]]\nname = "ops"\ntype = "{type}"\nurl = "{url}"\ntemplate = "{template}"\n'


def make_settings(**flags: Any) -> Settings:
    return load_settings(
        {
            "slack_webhook_url": SLACK_URL,
            "webhook_url": WEBHOOK_URL,
            "notify_on": ",".join(STATUSES),
            **flags,
        }
    )


def route_named(settings: Settings, name: str) -> Route:
    return next(route for route in settings.routes if route.name == name)


def custom_route(tmp_path: Path, template: str, *, kind: str = "webhook") -> tuple[Renderer, Route]:
    """A renderer over tmp_path and a TOML route `ops` rendering `template`."""
    url = SLACK_URL if kind == "slack" else "http://127.0.0.1:9/x"
    config = tmp_path / "n.toml"
    config.write_text(ROUTE_TOML.format(type=kind, url=url, template=template))
    settings = make_settings(config=str(config), templates_dir=str(tmp_path))
    return Renderer(settings), route_named(settings, "ops")


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def hostile_event(status: str, output_url: str | None = HOSTILE_HTTP_URL) -> Event:
    request = LipsyncRequest(
        id=HOSTILE_ID,
        status=status,
        reference_id=LONG_REFERENCE,
        created_at="2026-03-30T11:00:00Z",
        started_at=None if status == "queued" else "2026-03-30T11:00:04Z",
        finished_at="2026-03-30T11:01:09Z" if status in {"completed", "failed"} else None,
        output_url=output_url,
        error_message=LONG_ERROR,
    )
    return Event(request, previous_status=HOSTILE_PREVIOUS, detected_ms=DETECTED_MS)


def sample(status: str, previous: str | None = "processing", **fields: Any) -> Event:
    request = LipsyncRequest.model_validate({**COMPLETED, "status": status, **fields})
    return Event(request, previous_status=previous, detected_ms=DETECTED_MS)


def render_slack(event: Event) -> dict[str, Any]:
    settings = make_settings()
    message = Renderer(settings).render(route_named(settings, "slack"), event)
    return json.loads(message.body)


def mrkdwn_texts(payload: dict[str, Any]) -> list[str]:
    """The top-level text and every mrkdwn text object of a Slack payload."""
    found = [payload["text"]]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("type") == "mrkdwn":
                found.append(node["text"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(payload["blocks"])
    return found


def buttons(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        element
        for block in payload["blocks"]
        if block["type"] == "actions"
        for element in block["elements"]
        if element["type"] == "button"
    ]


def error_section(payload: dict[str, Any]) -> str:
    sections = [
        block["text"]["text"]
        for block in payload["blocks"]
        if block["type"] == "section" and "text" in block
    ]
    (text,) = [text for text in sections if text.startswith("*Error*")]
    return text


SLACK_CASES = [
    pytest.param(status, url, id=f"{status}-{name}")
    for status in STATUSES
    for name, url in OUTPUT_URLS.items()
]


# 1. The bundled templates with hostile values.


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("route_name", ["slack", "webhook"])
@pytest.mark.parametrize("output_url", OUTPUT_URLS.values(), ids=OUTPUT_URLS.keys())
def test_every_bundled_template_renders_hostile_values_as_valid_json(
    route_name: str, status: str, output_url: str | None
) -> None:
    settings = make_settings()
    message = Renderer(settings).render(
        route_named(settings, route_name), hostile_event(status, output_url)
    )
    assert isinstance(json.loads(message.body.decode("utf-8")), dict)


@pytest.mark.parametrize("status", STATUSES)
def test_bundled_webhook_template_carries_hostile_values_unchanged(status: str) -> None:
    settings = make_settings()
    event = hostile_event(status)
    body = json.loads(Renderer(settings).render(route_named(settings, "webhook"), event).body)
    assert body["data"] == {
        "id": HOSTILE_ID,
        "status": status,
        "previous_status": HOSTILE_PREVIOUS,
        "reference_id": LONG_REFERENCE,
        "created_at": "2026-03-30T11:00:00Z",
        "started_at": event.request.model_dump(mode="json")["started_at"],
        "finished_at": event.request.model_dump(mode="json")["finished_at"],
        "output_url": HOSTILE_HTTP_URL,
        "error_message": LONG_ERROR,
    }


@pytest.mark.parametrize(("status", "output_url"), SLACK_CASES)
def test_bundled_slack_blocks_pass_block_kit_validation(
    status: str, output_url: str | None
) -> None:
    for block in render_slack(hostile_event(status, output_url))["blocks"]:
        parsed = Block.parse(block)
        assert parsed is not None, f"not a Block Kit block: {block['type']}"
        parsed.validate_json()
        parsed.to_dict()  # validates the nested elements too (button text and url)


@pytest.mark.parametrize(("status", "output_url"), SLACK_CASES)
def test_bundled_slack_messages_have_at_most_50_blocks(status: str, output_url: str | None) -> None:
    assert 1 <= len(render_slack(hostile_event(status, output_url))["blocks"]) <= 50


@pytest.mark.parametrize("status", STATUSES)
def test_bundled_slack_messages_have_a_non_empty_fallback_text(status: str) -> None:
    text = render_slack(hostile_event(status))["text"]
    assert isinstance(text, str)
    assert text.strip()


@pytest.mark.parametrize(("status", "output_url"), SLACK_CASES)
def test_bundled_slack_mrkdwn_never_carries_raw_markup_from_user_values(
    status: str, output_url: str | None
) -> None:
    for text in mrkdwn_texts(render_slack(hostile_event(status, output_url))):
        assert "<" not in text
        assert ">" not in text
        assert "&" not in ENTITY.sub("", text), "an & that is not an entity"


@pytest.mark.parametrize("status", STATUSES)
def test_bundled_slack_fallback_text_shows_user_values_escaped(status: str) -> None:
    text = render_slack(hostile_event(status))["text"]
    assert "&lt;!channel&gt;" in text
    assert "<!channel>" not in text


@pytest.mark.parametrize(("status", "output_url"), SLACK_CASES)
def test_bundled_slack_texts_stay_within_slack_length_limits(
    status: str, output_url: str | None
) -> None:
    for block in render_slack(hostile_event(status, output_url))["blocks"]:
        if block["type"] == "header":
            assert block["text"]["type"] == "plain_text"
            assert len(block["text"]["text"]) <= 150
        if block["type"] == "section" and "text" in block:
            assert len(block["text"]["text"]) <= 3000
        for field in block.get("fields", []):
            assert len(field["text"]) <= 2000
        assert len(block.get("fields", [])) <= 10


def test_failed_slack_message_shows_the_whole_error_message_escaped() -> None:
    error = 'Face lost at 00:12 <!channel> & "x" \\ \n 🎬'
    payload = render_slack(sample("failed", error_message=error, output_url=None))
    assert error_section(payload) == "*Error*\n```" + mrkdwn(error) + "```"


def test_failed_slack_message_clips_a_long_error_message_with_an_ellipsis() -> None:
    text = error_section(render_slack(hostile_event("failed")))
    shown = text.removeprefix("*Error*\n```").removesuffix("```")
    assert shown.endswith("…")
    assert mrkdwn(LONG_ERROR).startswith(shown.removesuffix("…"))
    assert len(shown) >= 2500, "the error is clipped far below Slack's section limit"


@pytest.mark.parametrize(
    "output_url",
    [HOSTILE_HTTP_URL, "http://example.com/o.mp4", "https://x.example/" + "a" * 2982],
    ids=["hostile-https", "http", "exactly-3000"],
)
def test_completed_slack_button_links_the_raw_output_url(output_url: str) -> None:
    assert len(output_url) <= 3000
    payload = render_slack(hostile_event("completed", output_url))
    assert [button["url"] for button in buttons(payload)] == [output_url]


@pytest.mark.parametrize(
    "output_url",
    [
        "javascript:alert(1)",
        'javascript:alert("<!channel>&")',
        "ftp://example.com/o.mp4",
        "https://x.example/" + "a" * 2983,
        LONG_HTTP_URL,
    ],
    ids=["javascript", "javascript-hostile", "ftp", "3001-chars", "5kB"],
)
def test_completed_slack_message_has_no_button_for_a_non_http_or_too_long_url(
    output_url: str,
) -> None:
    payload = render_slack(hostile_event("completed", output_url))
    assert buttons(payload) == []
    assert '"url"' not in json.dumps(payload)


def test_completed_slack_message_shows_a_non_http_output_url_as_escaped_text() -> None:
    payload = render_slack(hostile_event("completed", 'javascript:alert("<!channel>&")'))
    assert any(
        'javascript:alert("&lt;!channel&gt;&amp;")' in text for text in mrkdwn_texts(payload)
    )


# 2. The filters.


def test_mrkdwn_escapes_exactly_ampersand_and_angle_brackets() -> None:
    assert mrkdwn('<!channel> & "q" \' \\ * _ ` ~ > 🎬') == (
        '&lt;!channel&gt; &amp; "q" \' \\ * _ ` ~ &gt; 🎬'
    )


def test_mrkdwn_of_none_is_empty_and_of_a_number_is_its_text() -> None:
    assert mrkdwn(None) == ""
    assert mrkdwn(42) == "42"


def test_mrkdwn_leaves_text_within_the_limit_unclipped() -> None:
    assert mrkdwn("a&b", 7) == "a&amp;b"


MARKUP_TEXT = st.text(alphabet=st.sampled_from("&<>&<>ab;🎬 …"), max_size=60)
LIMITS = st.integers(min_value=1, max_value=80)


@settings(max_examples=200, deadline=None)
@given(text=MARKUP_TEXT, limit=LIMITS)
def test_mrkdwn_clips_to_the_limit_without_splitting_an_entity(text: str, limit: int) -> None:
    full = mrkdwn(text)
    clipped = mrkdwn(text, limit)
    assert len(clipped) <= limit
    if len(full) <= limit:
        assert clipped == full
    else:
        assert clipped.endswith("…")
        kept = clipped.removesuffix("…")
        assert full.startswith(kept)
        assert "&" not in ENTITY.sub("", kept), f"partial entity in {kept!r}"


@settings(max_examples=200, deadline=None)
@given(text=MARKUP_TEXT, limit=LIMITS)
def test_mrkdwn_clipping_drops_at_most_a_partial_entity(text: str, limit: int) -> None:
    clipped = mrkdwn(text, limit)
    # "&amp;" is the longest entity: at most 4 of its characters are dropped.
    assert len(clipped) >= min(len(mrkdwn(text)), limit - 4)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60), limit=LIMITS)
def test_clip_keeps_at_most_limit_characters_ending_in_an_ellipsis(text: str, limit: int) -> None:
    clipped = clip(text, limit)
    assert len(clipped) <= limit
    if len(text) <= limit:
        assert clipped == text
    else:
        assert clipped.endswith("…")
        assert len(clipped) == limit
        assert text.startswith(clipped.removesuffix("…"))


def test_clip_of_none_is_empty() -> None:
    assert clip(None, 10) == ""


@pytest.mark.parametrize(
    ("started_at", "finished_at", "expected"),
    [
        ("2026-03-30T11:00:00Z", "2026-03-30T11:00:00Z", "0s"),
        ("2026-03-30T11:00:00Z", "2026-03-30T11:00:05Z", "5s"),
        ("2026-03-30T11:00:04Z", "2026-03-30T11:01:09Z", "1m 5s"),
        ("2026-03-30T11:00:00Z", "2026-03-30T11:02:30Z", "2m 30s"),
        ("2026-03-30T11:00:00Z", "2026-03-30T12:00:05Z", "1h 0m 5s"),
        ("2026-03-30T11:00:00Z", "2026-03-31T13:04:05Z", "26h 4m 5s"),
        ("2026-03-30T11:00:00+02:00", "2026-03-30T09:00:30Z", "30s"),
    ],
)
def test_duration_formats_hours_minutes_and_seconds(
    started_at: str, finished_at: str, expected: str
) -> None:
    assert duration({"started_at": started_at, "finished_at": finished_at}) == expected


@pytest.mark.parametrize(
    "request_times",
    [
        {},
        {"started_at": "2026-03-30T11:00:00Z"},
        {"finished_at": "2026-03-30T11:00:00Z"},
        {"started_at": None, "finished_at": "2026-03-30T11:00:00Z"},
        {"started_at": "2026-03-30T11:00:05Z", "finished_at": "2026-03-30T11:00:00Z"},
        {"started_at": "not a time", "finished_at": "2026-03-30T11:00:00Z"},
    ],
    ids=["neither", "no-finish", "no-start", "start-none", "finished-before-started", "garbage"],
)
def test_duration_is_a_dash_when_unknown(request_times: dict[str, Any]) -> None:
    assert duration(request_times) == "-"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-03-30T11:01:09Z", "2026-03-30 11:01:09 UTC"),
        ("2026-03-30T13:01:09+02:00", "2026-03-30 11:01:09 UTC"),
        ("2026-03-30T11:01:09", "2026-03-30 11:01:09 UTC"),
        (None, ""),
        ("", ""),
        ("yesterday", ""),
    ],
)
def test_readable_time_shows_utc_seconds(value: str | None, expected: str) -> None:
    assert readable_time(value) == expected


# 3. The webhook body is the contract's.


def render_webhook(event: Event) -> bytes:
    settings = make_settings()
    return Renderer(settings).render(route_named(settings, "webhook"), event).body


def test_webhook_body_of_a_completed_request_is_the_contract_body() -> None:
    body = json.loads(render_webhook(sample("completed", previous="processing")))
    assert body == {
        "type": "lipsync.request.completed",
        "timestamp": "2026-03-30T11:01:10Z",
        "data": {**COMPLETED, "previous_status": "processing", "error_message": None},
    }


def test_webhook_body_of_a_failed_request_first_seen_has_null_previous_status() -> None:
    failed = {
        **COMPLETED,
        "status": "failed",
        "output_url": None,
        "error_message": "the face could not be tracked",
    }
    event = sample("failed", previous=None, output_url=None, error_message=failed["error_message"])
    assert json.loads(render_webhook(event)) == {
        "type": "lipsync.request.failed",
        "timestamp": "2026-03-30T11:01:10Z",
        "data": {**failed, "previous_status": None},
    }


def test_webhook_body_has_null_for_absent_api_fields() -> None:
    request = LipsyncRequest(id="r1", status="queued", created_at="2026-03-30T11:00:00Z")
    data = json.loads(render_webhook(Event(request, None, DETECTED_MS)))["data"]
    assert data == {
        "id": "r1",
        "status": "queued",
        "previous_status": None,
        "reference_id": None,
        "created_at": "2026-03-30T11:00:00Z",
        "started_at": None,
        "finished_at": None,
        "output_url": None,
        "error_message": None,
    }


def test_webhook_timestamp_is_the_detection_time() -> None:
    event = Event(sample("completed").request, "processing", detected_ms=1_800_000_000_000)
    assert json.loads(render_webhook(event))["timestamp"] == "2027-01-15T08:00:00Z"


@pytest.mark.parametrize("route_name", ["slack", "webhook"])
def test_the_same_event_renders_to_identical_bytes(route_name: str) -> None:
    settings = make_settings()
    event = hostile_event("completed")
    first = Renderer(settings).render(route_named(settings, route_name), event)
    renderer = Renderer(settings)
    again = [renderer.render(route_named(settings, route_name), event) for _ in range(2)]
    assert {message.body for message in again} == {first.body}
    assert first.event_id == event.id


# 4. Templates are compiled once.


def test_a_template_edited_on_disk_after_its_first_render_is_not_reloaded(
    tmp_path: Path,
) -> None:
    template = write(tmp_path, "webhook/default.json.j2", '{"version": 1}')
    settings = make_settings(templates_dir=str(tmp_path))
    renderer, route = Renderer(settings), route_named(settings, "webhook")
    assert json.loads(renderer.render(route, sample("completed")).body) == {"version": 1}
    template.write_text('{"version": 2}', encoding="utf-8")
    assert json.loads(renderer.render(route, sample("failed")).body) == {"version": 1}
    assert json.loads(Renderer(settings).render(route, sample("failed")).body) == {"version": 2}


def test_a_template_and_its_imports_are_loaded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    original = jinja2.FileSystemLoader.get_source

    def counting(self: jinja2.FileSystemLoader, environment: Any, template: str) -> Any:
        loaded.append(template)
        return original(self, environment, template)

    monkeypatch.setattr(jinja2.FileSystemLoader, "get_source", counting)
    settings = make_settings()
    renderer, route = Renderer(settings), route_named(settings, "slack")
    for event in [sample("completed"), hostile_event("completed"), sample("completed")]:
        renderer.render(route, event)
    assert sorted(loaded) == ["slack/_blocks.j2", "slack/completed.json.j2"]


# 5. Where templates are found.


def test_the_templates_dir_overrides_a_bundled_template(tmp_path: Path) -> None:
    write(tmp_path, "slack/completed.json.j2", '{"text": "mine {{ request.status }}"}')
    settings = make_settings(templates_dir=str(tmp_path))
    message = Renderer(settings).render(route_named(settings, "slack"), sample("completed"))
    assert json.loads(message.body) == {"text": "mine completed"}


def test_a_template_missing_from_the_templates_dir_falls_back_to_the_bundle(
    tmp_path: Path,
) -> None:
    write(tmp_path, "slack/completed.json.j2", '{"text": "mine"}')
    settings = make_settings(templates_dir=str(tmp_path))
    message = Renderer(settings).render(route_named(settings, "slack"), sample("failed"))
    payload = json.loads(message.body)
    assert payload["blocks"][0]["text"]["text"] == "❌ Lip sync failed"


def test_a_status_template_in_the_templates_dir_replaces_the_slack_default(
    tmp_path: Path,
) -> None:
    write(tmp_path, "slack/queued.json.j2", '{"text": "queued, mine"}')
    settings = make_settings(templates_dir=str(tmp_path))
    renderer, route = Renderer(settings), route_named(settings, "slack")
    assert json.loads(renderer.render(route, sample("queued")).body) == {"text": "queued, mine"}
    processing = json.loads(renderer.render(route, sample("processing")).body)
    assert processing["blocks"][0]["text"]["text"] == "Lip sync request processing"


def test_a_route_renders_its_own_template(tmp_path: Path) -> None:
    write(tmp_path, "mine.json.j2", '{"mine": {{ event.type | tojson }}}')
    renderer, route = custom_route(tmp_path, "mine.json.j2")
    assert json.loads(renderer.render(route, sample("completed")).body) == {
        "mine": "lipsync.request.completed"
    }


def test_status_in_a_route_template_name_is_replaced_by_the_status(tmp_path: Path) -> None:
    for status in ("completed", "failed"):
        write(tmp_path, f"custom/{status}.json.j2", f'{{"file": "{status}"}}')
    renderer, route = custom_route(tmp_path, "custom/{status}.json.j2")
    assert json.loads(renderer.render(route, sample("completed")).body) == {"file": "completed"}
    assert json.loads(renderer.render(route, sample("failed")).body) == {"file": "failed"}


# 6. Broken templates.


def render_error(tmp_path: Path, text: str, *, kind: str = "webhook") -> str:
    write(tmp_path, "mine.json.j2", text)
    renderer, route = custom_route(tmp_path, "mine.json.j2", kind=kind)
    with pytest.raises(RenderError) as caught:
        renderer.render(route, sample("completed"))
    return str(caught.value)


def test_a_syntax_error_names_the_route_the_file_and_the_line(tmp_path: Path) -> None:
    message = render_error(tmp_path, '{\n"a": 1\n{% if %}\n}\n')
    assert "'ops'" in message
    assert "mine.json.j2" in message
    assert "line 3" in message


def test_an_undefined_variable_names_the_route_the_file_and_the_line(tmp_path: Path) -> None:
    message = render_error(tmp_path, '{\n"a": {{ request.nope }}\n}\n')
    assert "'ops'" in message
    assert "mine.json.j2" in message
    assert "line 2" in message
    assert "nope" in message


def test_an_error_in_an_imported_template_names_the_file_it_is_in(tmp_path: Path) -> None:
    write(tmp_path, "macros.j2", "{% macro x() -%}\n1\n\n\n{{ request.nope }}\n{%- endmacro %}\n")
    message = render_error(
        tmp_path, '{% import "macros.j2" as m with context %}\n{"a": {{ m.x() }}}\n'
    )
    assert "line 5" in message
    assert "macros.j2" in message, f"line 5 of macros.j2 reported as: {message}"


def test_a_syntax_error_in_an_imported_template_names_the_file_it_is_in(tmp_path: Path) -> None:
    write(tmp_path, "macros.j2", "{% macro x() %}\n\n{% if %}\n{% endmacro %}\n")
    message = render_error(tmp_path, '{% import "macros.j2" as m %}\n{"a": {{ m.x() }}}\n')
    assert "mine.json.j2 (in macros.j2), line 3" in message


def test_an_imported_template_that_is_missing_is_named(tmp_path: Path) -> None:
    message = render_error(tmp_path, '{% import "absent.j2" as m %}\n{"a": {{ m.x() }}}\n')
    assert "template absent.j2 not found" in message


def test_output_that_is_not_json_is_reported_as_not_valid_json(tmp_path: Path) -> None:
    message = render_error(tmp_path, '{"id": {{ request.id }}}')
    assert "'ops'" in message
    assert "mine.json.j2" in message
    assert "not valid JSON" in message


def test_a_missing_template_is_reported_as_not_found(tmp_path: Path) -> None:
    renderer, route = custom_route(tmp_path, "absent.json.j2")
    with pytest.raises(RenderError, match=r"'ops'.*absent\.json\.j2 not found"):
        renderer.render(route, sample("completed"))


def test_a_status_template_missing_for_one_status_is_reported_as_not_found(
    tmp_path: Path,
) -> None:
    write(tmp_path, "custom/completed.json.j2", "{}")
    renderer, route = custom_route(tmp_path, "custom/{status}.json.j2")
    renderer.render(route, sample("completed"))
    with pytest.raises(RenderError, match=r"custom/failed\.json\.j2 not found"):
        renderer.render(route, sample("failed"))


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        (
            '{"text": "t", "blocks": [{"type": "header", "text": '
            '{"type": "plain_text", "text": "{{ "h" * 151 }}"}}]}',
            "header text is 151 characters",
        ),
        (
            '{"text": "t", "blocks": [{% for _ in range(51) %}{"type": "divider"}'
            "{% if not loop.last %},{% endif %}{% endfor %}]}",
            "51 blocks",
        ),
        ('{"text": "", "blocks": []}', "'text'"),
        ('{"blocks": [{"type": "divider"}]}', "'text'"),
    ],
    ids=["long-header", "51-blocks", "empty-text", "no-text"],
)
def test_a_slack_payload_slack_would_reject_is_a_render_error(
    tmp_path: Path, template: str, problem: str
) -> None:
    message = render_error(tmp_path, template, kind="slack")
    assert "'ops'" in message
    assert "mine.json.j2" in message
    assert problem in message


def test_a_webhook_route_accepts_any_json_object(tmp_path: Path) -> None:
    write(tmp_path, "mine.json.j2", '{"text": ""}')
    renderer, route = custom_route(tmp_path, "mine.json.j2")
    assert json.loads(renderer.render(route, sample("completed")).body) == {"text": ""}


@pytest.mark.parametrize(
    "expression",
    [
        "request.__class__.__mro__",
        "''.__class__.__subclasses__()",
        "request.items.__self__",
        "cycler.__init__.__globals__",
    ],
)
def test_the_sandbox_blocks_unsafe_attribute_access(tmp_path: Path, expression: str) -> None:
    message = render_error(tmp_path, f'{{"x": {{{{ ({expression}) | string | tojson }}}}}}')
    assert "'ops'" in message
    assert "unsafe" in message


# 7. slack_problems on hand-made payloads.

VALID_SLACK = {
    "text": "fallback",
    "blocks": [
        {"type": "header", "text": {"type": "plain_text", "text": "h" * 150}},
        {"type": "section", "text": {"type": "mrkdwn", "text": "s" * 3000}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": "f" * 2000}] * 10},
        *[{"type": "divider"}] * 47,
    ],
}


def test_slack_problems_accepts_a_payload_at_every_limit() -> None:
    assert len(VALID_SLACK["blocks"]) == 50
    assert slack_problems(VALID_SLACK) == []


@pytest.mark.parametrize("payload", [[], "text", None, 3], ids=["list", "str", "null", "int"])
def test_slack_problems_rejects_a_payload_that_is_not_an_object(payload: object) -> None:
    assert slack_problems(payload) == ["the message must be a JSON object"]


@pytest.mark.parametrize("text", [None, "", " \n\t ", 5], ids=["missing", "empty", "space", "int"])
def test_slack_problems_requires_a_non_empty_text(text: object) -> None:
    payload = {"blocks": []} if text is None else {"text": text, "blocks": []}
    (problem,) = slack_problems(payload)
    assert "'text'" in problem


def test_slack_problems_rejects_51_blocks() -> None:
    payload = {"text": "t", "blocks": [{"type": "divider"}] * 51}
    assert slack_problems(payload) == ["51 blocks, Slack's limit is 50"]


def test_slack_problems_rejects_11_fields() -> None:
    fields = [{"type": "mrkdwn", "text": "f"}] * 11
    payload = {"text": "t", "blocks": [{"type": "section", "fields": fields}]}
    assert slack_problems(payload) == ["block 1: 11 fields, Slack's limit is 10"]


def test_slack_problems_rejects_a_2001_character_field() -> None:
    fields = [{"type": "mrkdwn", "text": "f" * 2001}]
    payload = {"text": "t", "blocks": [{"type": "divider"}, {"type": "section", "fields": fields}]}
    assert slack_problems(payload) == ["block 2: a field is 2001 characters, Slack's limit is 2000"]


def test_slack_problems_rejects_a_151_character_header() -> None:
    block = {"type": "header", "text": {"type": "plain_text", "text": "h" * 151}}
    assert slack_problems({"text": "t", "blocks": [block]}) == [
        "block 1: header text is 151 characters, Slack's limit is 150"
    ]


def test_slack_problems_rejects_a_3001_character_section() -> None:
    block = {"type": "section", "text": {"type": "mrkdwn", "text": "s" * 3001}}
    assert slack_problems({"text": "t", "blocks": [block]}) == [
        "block 1: section text is 3001 characters, Slack's limit is 3000"
    ]


def test_slack_problems_reports_every_problem_at_once() -> None:
    payload = {"text": " ", "blocks": [{"type": "divider"}] * 50 + ["not a block"]}
    assert slack_problems(payload) == [
        "'text' (the notification fallback) must be a non-empty string",
        "51 blocks, Slack's limit is 50",
        "block 51: must be an object",
    ]


# 5. Batch digests.


def hostile_digest(size: int, output_url: str | None = HOSTILE_HTTP_URL) -> Digest:
    """A digest of `size` requests with hostile values; every seventh one failed with a
    10 kB error message."""
    members = []
    for index in range(size):
        event = hostile_event("failed" if index % 7 == 0 else "completed", output_url)
        request = event.request.model_copy(update={"id": f"{HOSTILE_ID} {index:04}"})
        members.append(Member(request, previous_status=HOSTILE_PREVIOUS))
    return Digest("ops", LONG_REFERENCE, tuple(members), 1_774_868_400_000, DETECTED_MS)


def render_digest(digest: Digest, route_name: str = "slack") -> dict[str, Any]:
    """The body of `digest` for the route `slack` or `webhook`: the bundled digest
    templates (a route renders its digests so whether or not `digest` is set)."""
    settings = make_settings()
    return json.loads(Renderer(settings).render(route_named(settings, route_name), digest).body)


def plain_digest(completed: int, failed: int = 0) -> Digest:
    members = [
        Member(
            LipsyncRequest.model_validate(
                {
                    **COMPLETED,
                    "id": f"req-{index:04}",
                    "status": "failed" if index < failed else "completed",
                    "output_url": None if index < failed else f"https://o.example/{index}.mp4",
                    "error_message": f"error {index}" if index < failed else None,
                }
            ),
            "processing",
        )
        for index in range(completed + failed)
    ]
    return Digest("ops", "batch-1", tuple(members), None, DETECTED_MS)


@pytest.mark.parametrize("size", [1, 7, 200, 1000])
def test_a_slack_digest_of_any_size_with_hostile_values_passes_block_kit(size: int) -> None:
    payload = render_digest(hostile_digest(size))
    assert slack_problems(payload) == []
    assert len(payload["blocks"]) <= 50
    for block in payload["blocks"]:
        parsed = Block.parse(block)
        assert parsed is not None, f"not a Block Kit block: {block['type']}"
        parsed.validate_json()
        parsed.to_dict()
        if "text" in block and block["type"] == "section":
            assert len(block["text"]["text"]) <= 3000
    for text in mrkdwn_texts(payload):
        assert "<" not in text
        assert ">" not in text
        assert "&" not in ENTITY.sub("", text), "an & that is not an entity"


def test_a_slack_digest_of_1000_lists_the_failures_that_fit_and_counts_the_rest() -> None:
    payload = render_digest(hostile_digest(1000))
    failures = [
        b["text"]["text"]
        for b in payload["blocks"]
        if b["type"] == "section" and "text" in b and not b["text"]["text"].startswith("*Out")
    ]
    assert failures[0].startswith("*Failed*\n• `")
    listed = sum(text.count("• `") for text in failures)
    more = int(re.search(r"…and (\d+) more$", failures[-1]).group(1))
    assert listed + more == 143, "every failure is listed or counted"
    assert payload["text"].endswith("settled: 857 completed, 143 failed")


def test_a_slack_digest_links_up_to_10_outputs_and_counts_the_rest() -> None:
    payload = render_digest(plain_digest(completed=25, failed=2))
    texts = [b["text"]["text"] for b in payload["blocks"] if b["type"] == "section" and "text" in b]
    [outputs] = [text for text in texts if text.startswith("*Outputs*")]
    assert outputs.count("<https://o.example/") == 10
    assert outputs.endswith("…and 15 more")
    assert payload["blocks"][0]["text"]["text"].startswith("⚠️ Batch settled")


def test_a_slack_digest_without_failures_has_no_failure_section() -> None:
    payload = render_digest(plain_digest(completed=3))
    assert payload["blocks"][0]["text"]["text"] == "✅ Batch settled: batch-1"
    assert "*Failed*" not in json.dumps(payload)
    assert payload["text"] == "Batch `batch-1` settled: 3 completed"


def test_the_webhook_digest_body_is_the_contract_body() -> None:
    digest = plain_digest(completed=2, failed=1)
    body = render_digest(digest, "webhook")
    assert body == {
        "type": "lipsync.batch.settled",
        "timestamp": digest.context()["digest"]["detected_at"],
        "data": {
            "reference_id": "batch-1",
            "counts": {"completed": 2, "failed": 1},
            "created_at": COMPLETED["created_at"],
            "finished_at": COMPLETED["finished_at"],
            "requests": [member.data() for member in digest.members],
        },
    }
    assert body["data"]["requests"][0] == {
        "id": "req-0000",
        "status": "failed",
        "previous_status": "processing",
        **{
            name: COMPLETED.get(name)
            for name in ("reference_id", "created_at", "started_at", "finished_at")
        },
        "output_url": None,
        "error_message": "error 0",
    }


def test_a_route_renders_digests_with_its_digest_template(tmp_path: Path) -> None:
    write(tmp_path, "mine/batch.json.j2", '{"batch": {{ digest.reference_id | tojson }}}')
    config = tmp_path / "n.toml"
    config.write_text(
        f'[[routes]]\nname = "ops"\ntype = "webhook"\nurl = "{WEBHOOK_URL}"\n'
        'digest = "reference_id"\ndigest_template = "mine/batch.json.j2"\n'
    )
    settings = make_settings(config=str(config), templates_dir=str(tmp_path))
    route = route_named(settings, "ops")
    renderer = Renderer(settings)
    assert renderer.template_for(route, "settled") == "mine/batch.json.j2"
    assert renderer.render(route, plain_digest(1)).body == b'{"batch":"batch-1"}'
    assert renderer.template_for(route, "completed") == "webhook/default.json.j2"


def test_sections_pack_lines_within_the_limit_and_count_what_does_not_fit() -> None:
    lines = [f"line {n:02}" for n in range(30)]  # 7 characters each
    packed = sections(lines, limit=23, most=3)
    assert packed == [
        "line 00\nline 01\nline 02",
        "line 03\nline 04\nline 05",
        "line 06\n…and 23 more",
    ]
    assert all(len(text) <= 23 for text in packed)
    assert sections(lines[:2], limit=23, most=3) == ["line 00\nline 01"]
    assert sections(lines[:2], limit=30, most=1, total=12) == ["line 00\nline 01\n…and 10 more"]
    assert sections([], limit=23) == []


def test_sections_clip_a_long_line_without_splitting_an_entity() -> None:
    [text] = sections(["a" * 8 + "&amp;" + "b" * 20], limit=12, most=1)
    assert text == "aaaaaaaa…"


def test_slack_link_links_a_plain_url_and_shows_any_other_as_text() -> None:
    assert slack_link("https://o.example/a.mp4?x=1&y=2", "a & b") == (
        "<https://o.example/a.mp4?x=1&amp;y=2|a &amp; b>"
    )
    assert slack_link(HOSTILE_HTTP_URL, "out") == "out"
    assert slack_link("ftp://o.example/a", "out") == "out"
    assert slack_link(None, "<b>") == "&lt;b&gt;"
    assert slack_link(LONG_HTTP_URL, "out") == "out"
