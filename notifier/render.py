"""Turn an event into the body a route sends, through the route's Jinja2 template.

Templates run in a sandbox with `StrictUndefined`, so a typo fails loudly instead of
sending an empty field. Values reach JSON only through `tojson` and Slack mrkdwn only
through the `mrkdwn` filter, so no field value can break the JSON or inject markup.
Each template is compiled once per process. A template is user code: it renders on a pool
thread with a deadline (`render_pool`), in a sandbox that bounds what it can make
(`render_guard`).
"""

from __future__ import annotations

import json
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    Undefined,
)

from notifier.config import Route, Settings
from notifier.digest import Digest, Member
from notifier.models import (
    COMPLETED,
    FAILED,
    FINISHED,
    PROCESSING,
    QUEUED,
    Event,
    LipsyncRequest,
)
from notifier.outbox import OutboxItem
from notifier.render_guard import BoundedEnvironment, render_bounded
from notifier.render_pool import DeadlineExceeded, RenderPool

ELLIPSIS = "…"
# A render that takes longer fails (the design: "Hostile input never stops the notifier").
RENDER_TIMEOUT_S = 2.0
# Slack's limits for the parts of a message (https://api.slack.com/reference/block-kit).
SLACK_MAX_BLOCKS = 50
SLACK_HEADER_CHARS = 150
SLACK_SECTION_CHARS = 3000
SLACK_FIELD_CHARS = 2000
SLACK_MAX_FIELDS = 10
SLACK_BUTTON_URL_CHARS = 3000


class RenderError(Exception):
    """A route's template could not produce a valid body; says the route, file and line."""


@dataclass(frozen=True, slots=True)
class Message:
    """A rendered body, ready for a sink: the event's id and the exact bytes to send."""

    event_id: str
    body: bytes


def tojson(value: object) -> str:
    """`value` as JSON; an undefined name fails with its own name, not a serialisation error."""
    return json.dumps(value, ensure_ascii=False, default=_not_json)


def _not_json(value: object) -> object:
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()  # raises UndefinedError naming the missing name
    raise TypeError(f"a {type(value).__name__} cannot be written as JSON")


def mrkdwn(value: object, limit: int | None = None) -> str:
    """Escape `&`, `<`, `>` for Slack mrkdwn; with `limit`, clip the escaped text to it.

    Clipping happens after escaping and never splits an entity such as `&amp;`.
    """
    text = "" if value is None else str(value)
    # "&" first, so that the entities made for "<" and ">" are not escaped again.
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return escaped if limit is None else _clip_escaped(escaped, limit)


def _clip_escaped(escaped: str, limit: int) -> str:
    """Escaped mrkdwn clipped to `limit` characters without splitting an entity."""
    if len(escaped) <= limit:
        return escaped
    cut = escaped[: max(0, limit - len(ELLIPSIS))]
    if (amp := cut.rfind("&")) != -1 and ";" not in cut[amp:]:
        cut = cut[:amp]
    return cut + ELLIPSIS


def sections(
    lines: list[str],
    limit: int = SLACK_SECTION_CHARS,
    most: int = 5,
    more: str = "…and {n} more",
    total: int | None = None,
) -> list[str]:
    """Escaped mrkdwn lines packed into at most `most` texts of at most `limit` characters;
    when they do not all fit, the last text ends with `more` (`{n}`: the lines left out,
    of `total` when the lines are the first of more)."""

    def tail(count: int) -> str:
        # Not str.format: `more` comes from a template, and outside the sandbox format
        # would read any attribute (`{n.__class__}`) and pad to any width.
        return more.replace("{n}", str(count))

    groups: list[list[str]] = []
    for line in (_clip_escaped(line, limit) for line in lines):
        if groups and len("\n".join([*groups[-1], line])) <= limit:
            groups[-1].append(line)
        elif len(groups) < most:
            groups.append([line])
        else:
            break
    left = (len(lines) if total is None else total) - sum(map(len, groups))
    if left and groups:
        last = groups[-1]
        while last and len("\n".join([*last, tail(left)])) > limit:
            last.pop()
            left += 1
        last.append(tail(left))
    return ["\n".join(group) for group in groups]


def slack_link(url: object, label: object) -> str:
    """A mrkdwn link `<url|label>`, or the escaped label alone when the URL is not a plain
    http(s) URL that a link can carry."""
    text = mrkdwn(label, 200)
    if (
        not isinstance(url, str)
        or not url.startswith(("https://", "http://"))
        or any(char in url for char in "<>| \n")
        or len(url) > SLACK_BUTTON_URL_CHARS
    ):
        return text
    return f"<{url.replace('&', '&amp;')}|{text}>"


def clip(value: object, limit: int) -> str:
    """`value` as text of at most `limit` characters, ending with an ellipsis if cut."""
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[: max(0, limit - len(ELLIPSIS))] + ELLIPSIS


def readable_time(value: str | None) -> str:
    """An API timestamp as `2026-03-30 11:01:09 UTC`; an empty string for none."""
    moment = _parse_time(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


def duration(request: dict[str, Any]) -> str:
    """How long processing took, `started_at` to `finished_at`, as `1h 2m 5s`; `-` if unknown."""
    return elapsed(request.get("started_at"), request.get("finished_at"))


def elapsed(start: object, end: object) -> str:
    """The time from one API timestamp to another as `1h 2m 5s`; `-` if either is unknown."""
    started, finished = _parse_time(start), _parse_time(end)
    if started is None or finished is None or finished < started:
        return "-"
    seconds = round((finished - started).total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(hours or minutes)
    return " ".join([*parts, f"{seconds}s"])


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def template_name(route: Route, status: str, exists: Callable[[str], bool]) -> str:
    """The template a route renders for `status` (`settled`: a batch digest).

    A route's own `template` may contain `{status}`. The bundled Slack templates are
    `slack/<status>.json.j2`, with `slack/default.json.j2` for statuses without one. A
    digest renders the route's `digest_template`, else the bundled `<type>/digest.json.j2`.
    """
    if status == Digest.status:
        return route.digest_template or f"{route.type}/digest.json.j2"
    if route.template is not None:
        return route.template.replace("{status}", status)
    if route.type == "webhook":
        return "webhook/default.json.j2"
    specific = f"slack/{status}.json.j2"
    return specific if exists(specific) else "slack/default.json.j2"


class Renderer:
    """Renders events for routes with the templates of `NOTIFIER_TEMPLATES_DIR` and the bundle;
    a render longer than `timeout_s` fails."""

    def __init__(self, settings: Settings, *, timeout_s: float = RENDER_TIMEOUT_S) -> None:
        self._dirs = settings.template_dirs()
        self._timeout_s = timeout_s
        self._pool = RenderPool()  # its threads start with the first render
        # Without a templates directory every template is one of ours, whose work grows only
        # with the data: an event's renders in a few hundred µs on the caller's thread, as
        # the hop to a pool thread would cost as much again. User templates, and digests
        # (whose work grows with the batch), go to the pool and its deadline.
        self._inline_events = settings.templates_dir is None
        self._env = BoundedEnvironment(
            filters={
                "tojson": tojson,
                "mrkdwn": mrkdwn,
                "clip": clip,
                "readable_time": readable_time,
                "duration": duration,
                "elapsed": elapsed,
                "sections": sections,
                "slack_link": slack_link,
            },
            loader=FileSystemLoader(self._dirs),
            undefined=StrictUndefined,
            autoescape=False,
            auto_reload=False,  # compiled once: a running service does not re-read files
            keep_trailing_newline=False,
        )
        self._compiled: dict[str, Template] = {}
        self._names: dict[tuple[str, str], str] = {}

    def render(self, route: Route, item: OutboxItem) -> Message:
        """The body of an event or digest for `route`; `RenderError` naming the route, file
        and line, or saying that the render took too long."""
        name = self.template_for(route, item.status)
        if self._inline(item):
            return self._render(route, item, name)
        try:
            return self._pool.run(partial(self._render, route, item, name), self._timeout_s)
        except DeadlineExceeded:
            raise self._overrun(route, name) from None

    async def render_async(self, route: Route, item: OutboxItem) -> Message:
        """`render` for the event loop, which keeps running while the template renders."""
        name = self.template_for(route, item.status)
        if self._inline(item):
            return self._render(route, item, name)
        try:
            return await self._pool.run_async(
                partial(self._render, route, item, name), self._timeout_s
            )
        except DeadlineExceeded:
            raise self._overrun(route, name) from None

    def _inline(self, item: OutboxItem) -> bool:
        """Whether `item` renders on the caller's thread: an event, with our templates only."""
        return self._inline_events and not isinstance(item, Digest)

    def _overrun(self, route: Route, name: str) -> RenderError:
        return RenderError(
            f"route {route.name!r}, template {name}: "
            f"the render took longer than {self._timeout_s:g} s and was stopped"
        )

    def _render(self, route: Route, item: OutboxItem, name: str) -> Message:
        """`render`'s work, on a pool thread (or inline, see `_inline`)."""
        template = self._template(route, name)
        where = f"route {route.name!r}, template {name}"
        try:
            text = render_bounded(template, item.context())
        except Exception as exc:  # a template is user code: any of its failures is theirs
            raise RenderError(f"{where}{self._origin(exc, name)}: {_first_line(exc)}") from None
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RenderError(
                f"{where}: the output is not valid JSON ({exc.msg} at line {exc.lineno}, "
                f"column {exc.colno} of the rendered text)"
            ) from None
        if route.type == "slack" and (problems := slack_problems(payload)):
            raise RenderError(f"{where}: not a message Slack accepts: {'; '.join(problems)}")
        # Compact and stable: the same event always gives the same bytes.
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        return Message(event_id=item.id, body=body.encode())

    def _origin(self, exc: BaseException, name: str) -> str:
        """`, line N` of the innermost template frame of a render error, naming its file
        when that is another template (an imported macro file)."""
        # Jinja rewrites tracebacks so that template code shows as frames of its file.
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            for directory in self._dirs:
                path = Path(frame.filename)
                if path.is_relative_to(directory):
                    inner = path.relative_to(directory).as_posix()
                    where = "" if inner == name else f" (in {inner})"
                    return f"{where}, line {frame.lineno}"
        return ""

    def template_for(self, route: Route, status: str) -> str:
        """The template `route` renders for `status`, looked up once per process."""
        key = (route.name, status)
        if (name := self._names.get(key)) is None:
            name = self._names[key] = template_name(route, status, self._exists)
        return name

    def _exists(self, name: str) -> bool:
        return any((directory / name).is_file() for directory in self._dirs)

    def _template(self, route: Route, name: str) -> Template:
        if (template := self._compiled.get(name)) is None:
            try:
                template = self._env.get_template(name)
            except TemplateSyntaxError as exc:
                inner = "" if exc.name in (None, name) else f" (in {exc.name})"
                raise RenderError(
                    f"route {route.name!r}, template {name}{inner}, line {exc.lineno}: "
                    f"{exc.message}"
                ) from None
            except TemplateNotFound:
                searched = ", ".join(str(directory) for directory in self._dirs)
                raise RenderError(
                    f"route {route.name!r}: template {name} not found; searched {searched}"
                ) from None
            except Exception as exc:  # e.g. RecursionError: brackets nested thousands deep
                raise RenderError(
                    f"route {route.name!r}, template {name}: {_first_line(exc)}"
                ) from None
            self._compiled[name] = template
        return template


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, TemplateNotFound):
        return f"template {exc.name} not found"
    message = str(exc).splitlines()[0] if str(exc) else ""
    return message if isinstance(exc, TemplateError) else f"{type(exc).__name__}: {message}"


def slack_problems(payload: object) -> list[str]:
    """What keeps a Slack payload from being accepted: fallback text, block count, lengths."""
    if not isinstance(payload, dict):
        return ["the message must be a JSON object"]
    problems = []
    text = payload.get("text")
    if not isinstance(text, str) or not text.strip():
        problems.append("'text' (the notification fallback) must be a non-empty string")
    blocks = payload.get("blocks", [])
    if not isinstance(blocks, list):
        return [*problems, "'blocks' must be a list"]
    if len(blocks) > SLACK_MAX_BLOCKS:
        problems.append(f"{len(blocks)} blocks, Slack's limit is {SLACK_MAX_BLOCKS}")
    for index, block in enumerate(blocks):
        problems.extend(f"block {index + 1}: {problem}" for problem in _block_problems(block))
    return problems


def _block_problems(block: object) -> list[str]:
    if not isinstance(block, dict):
        return ["must be an object"]
    limits = {"header": SLACK_HEADER_CHARS, "section": SLACK_SECTION_CHARS}
    problems = []
    text = block.get("text")
    if isinstance(text, dict) and block.get("type") in limits:
        problems += _too_long(f"{block['type']} text", text.get("text"), limits[block["type"]])
    fields = block.get("fields") or []
    if isinstance(fields, list):
        if len(fields) > SLACK_MAX_FIELDS:
            problems.append(f"{len(fields)} fields, Slack's limit is {SLACK_MAX_FIELDS}")
        for field in fields:
            if isinstance(field, dict):
                problems += _too_long("a field", field.get("text"), SLACK_FIELD_CHARS)
    return problems


def _too_long(what: str, text: object, limit: int) -> list[str]:
    if isinstance(text, str) and len(text) > limit:
        return [f"{what} is {len(text)} characters, Slack's limit is {limit}"]
    return []


def sample_event(status: str, *, now: datetime | None = None, unique: bool = False) -> Event:
    """A realistic event for `check`, `send-test` and the demo.

    With `unique`, the request id is new each time, so a receiver that de-duplicates on
    `webhook-id` does not drop a second test.
    """
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    request_id = str(uuid.uuid4()) if unique else "00000000-0000-4000-8000-000000000000"
    finished = status in FINISHED
    request = LipsyncRequest(
        id=request_id,
        status=status,
        reference_id="notifier-sample",
        created_at=now - timedelta(minutes=3),
        started_at=now - timedelta(minutes=2, seconds=30) if status != QUEUED else None,
        finished_at=now if finished else None,
        output_url="https://storage.example.com/output/sample.mp4" if status == COMPLETED else None,
        error_message="Sample error: the face could not be tracked in the input video"
        if status == FAILED
        else None,
    )
    previous = {QUEUED: None, PROCESSING: QUEUED}.get(status, PROCESSING)
    return Event(request, previous_status=previous, detected_ms=int(now.timestamp() * 1000))


def sample_digest(
    route: Route,
    size: int = 12,
    *,
    failed: int = 2,
    now: datetime | None = None,
    unique: bool = False,
) -> Digest:
    """A realistic digest of a batch of `size` for `route`, `failed` of them failed, for
    `check` and `send-test --digest` (`unique`: new request ids each time)."""
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    members = []
    for index in range(size):
        status = FAILED if index < failed else COMPLETED
        event = sample_event(status, now=now - timedelta(seconds=size - index), unique=unique)
        request_id = event.request.id if unique else str(uuid.UUID(int=index + 1, version=4))
        request = event.request.model_copy(update={"id": request_id})
        members.append(Member(request, event.previous_status))
    members.sort(key=lambda member: member.request.id)
    created = now - timedelta(minutes=3, seconds=size)
    return Digest(
        route=route.name,
        reference_id="notifier-sample",
        members=tuple(members),
        created_ms=int(created.timestamp() * 1000),
        detected_ms=int(now.timestamp() * 1000),
    )
