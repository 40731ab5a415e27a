"""Log lines: text or JSON lines, a request's ids as JSON keys, and never a configured secret."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from notifier.config import Settings
from notifier.logs import about, configure_logging
from notifier.redact import REDACTED

from samples import (
    API_KEY,
    NEW_SECRET,
    OPS_HEADER,
    OPS_URL,
    REDIS_PASSWORD,
    SLACK_PATH,
    SLACK_URL,
    settings_full_of_secrets,
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings holding every kind of secret."""
    return settings_full_of_secrets(tmp_path)


@contextlib.contextmanager
def restored_root_logger() -> Iterator[None]:
    """Put the root logger's handlers and level back as they were (pytest's own included),
    closing any handler added meanwhile."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """configure_logging replaces the root logger's handlers; later tests need caplog's."""
    with restored_root_logger():
        yield


def configured(settings: Settings | None, log_format: str = "text") -> io.StringIO:
    """Configure logging for `settings` in `log_format`; returns the stream lines go to."""
    if settings is not None:
        settings = settings.model_copy(update={"log_format": log_format})
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    return stream


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# about.


def test_about_drops_fields_that_are_none() -> None:
    assert about(route="slack", event_id=None, request_id="r-1", status=None, attempt=0) == {
        "route": "slack",
        "request_id": "r-1",
        "attempt": 0,
    }


# configure_logging: text.


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_message_holding_secrets_is_logged_with_them_redacted(
    settings: Settings, log_format: str
) -> None:
    stream = configured(settings, log_format)
    logging.getLogger("notifier.test").warning(
        "key %s, slack %s, secret %s, redis password %s",
        API_KEY,
        SLACK_URL,
        NEW_SECRET,
        REDIS_PASSWORD,
    )
    output = stream.getvalue()
    assert "ZZLEAK" not in output
    assert output.count(REDACTED) == 4
    assert "key [redacted], slack [redacted], secret [redacted], redis password [redacted]" in (
        output
    )


def test_a_text_line_has_time_level_logger_and_message(settings: Settings) -> None:
    stream = configured(settings)
    logging.getLogger("notifier.poller").info("poll cycle: %d requests", 3)
    [line] = stream.getvalue().splitlines()
    assert line.endswith(" INFO notifier.poller: poll cycle: 3 requests")
    assert line[:4].isdigit()  # the time comes first


@pytest.mark.parametrize(
    "value",
    [
        "abc\n2026-12-04 16:00:00,000 ERROR notifier.worker: forged",
        "abc\r2026-12-04 16:00:00,000 ERROR notifier.worker: forged",
        "abc\u20282026-12-04 16:00:00,000 ERROR notifier.worker: forged",
        "abc\x1b[2K\x1b[1Gforged",
    ],
)
def test_no_logged_value_can_forge_a_text_line(settings: Settings, value: str) -> None:
    stream = configured(settings)
    logging.getLogger("notifier.worker").warning("request %s delivered", value)
    (line,) = stream.getvalue().split("\n")[:-1]
    escaped = value.encode("unicode_escape").decode()  # ASCII but for the controls
    assert line.endswith(f" WARNING notifier.worker: request {escaped} delivered")
    assert not any(char in line for char in "\r\x1b\u2028")


def test_a_traceback_follows_its_line_and_cannot_pass_for_a_line_of_its_own(
    settings: Settings,
) -> None:
    stream = configured(settings)
    try:
        raise KeyError("a\n2026-12-04 16:00:00,000 INFO notifier: forged")
    except KeyError:
        logging.getLogger("notifier.worker").exception("delivery failed")
    first, *trace = stream.getvalue().splitlines()
    assert first.endswith(" ERROR notifier.worker: delivery failed")
    assert trace[0] == "  | Traceback (most recent call last):"
    assert all(line.startswith("  | ") for line in trace)
    assert trace[-1].endswith("KeyError: 'a\\n2026-12-04 16:00:00,000 INFO notifier: forged'")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_traceback_holding_a_secret_is_redacted(settings: Settings, log_format: str) -> None:
    stream = configured(settings, log_format)
    try:
        raise RuntimeError(f"could not POST to {SLACK_URL} with {OPS_HEADER}")
    except RuntimeError:
        logging.getLogger("notifier.worker").exception("delivery crashed")
    output = stream.getvalue()
    assert "RuntimeError: could not POST to [redacted] with [redacted]" in output.replace(
        "\\n", "\n"
    )
    assert "Traceback" in output
    assert "ZZLEAK" not in output


def test_without_settings_lines_are_text_and_nothing_is_blanked() -> None:
    stream = configured(None)
    logging.getLogger("notifier.cli").warning("key %s", API_KEY)
    assert stream.getvalue().endswith(f"WARNING notifier.cli: key {API_KEY}\n")


def test_lines_below_the_configured_level_are_dropped(settings: Settings) -> None:
    stream = io.StringIO()
    configure_logging(settings, level=logging.WARNING, stream=stream)
    log = logging.getLogger("notifier.test")
    log.info("not shown")
    log.warning("shown")
    assert "not shown" not in stream.getvalue()
    assert "shown" in stream.getvalue()


def test_configuring_again_replaces_the_handler_instead_of_adding_one(
    settings: Settings,
) -> None:
    first = configured(settings)
    second = configured(settings, "json")
    logging.getLogger("notifier.test").warning("once")
    assert first.getvalue() == ""
    assert [line["message"] for line in json_lines(second)] == ["once"]


# configure_logging: JSON lines.


def test_a_json_line_has_time_level_logger_and_message(settings: Settings) -> None:
    stream = configured(settings, "json")
    before = datetime.now(UTC).replace(microsecond=0)
    logging.getLogger("notifier.poller").warning("cycle failed: %s", "HTTP 500")
    [line] = json_lines(stream)
    assert line.keys() == {"time", "level", "logger", "message"}
    assert (line["level"], line["logger"], line["message"]) == (
        "warning",
        "notifier.poller",
        "cycle failed: HTTP 500",
    )
    logged_at = datetime.fromisoformat(str(line["time"]))
    assert logged_at.utcoffset() is not None
    assert before <= logged_at <= datetime.now(UTC)


def test_a_json_line_carries_the_request_fields_as_keys(settings: Settings) -> None:
    stream = configured(settings, "json")
    logging.getLogger("notifier.worker").info(
        "delivered",
        extra=about(
            route="slack",
            event_id="e-1",
            request_id="r-1",
            reference_id="batch-7",
            status="completed",
            entry_id=None,
            attempt=2,
        ),
    )
    [line] = json_lines(stream)
    assert {key: line[key] for key in line if key not in ("time", "level", "logger")} == {
        "message": "delivered",
        "route": "slack",
        "event_id": "e-1",
        "request_id": "r-1",
        "reference_id": "batch-7",
        "status": "completed",
        "attempt": 2,
    }
    assert "entry_id" not in line  # about() dropped the None


def test_a_secret_in_a_json_field_is_redacted(settings: Settings) -> None:
    stream = configured(settings, "json")
    logging.getLogger("notifier.api").warning(
        "skipped", extra=about(reference_id=f"ref-{API_KEY}", request_id=SLACK_PATH)
    )
    [line] = json_lines(stream)
    assert (line["reference_id"], line["request_id"]) == (f"ref-{REDACTED}", REDACTED)


def test_a_json_line_with_a_traceback_stays_one_parsable_line(settings: Settings) -> None:
    stream = configured(settings, "json")
    log = logging.getLogger("notifier.worker")
    try:
        raise ValueError(f"bad answer from {OPS_URL}")
    except ValueError:
        log.exception("send failed", extra=about(route="ops"))
    log.info("next")
    first, second = json_lines(stream)
    assert first["message"] == "send failed"
    assert first["route"] == "ops"
    assert str(first["exception"]).startswith("Traceback (most recent call last):")
    assert str(first["exception"]).endswith(f"ValueError: bad answer from {REDACTED}")
    assert second["message"] == "next"
    assert "exception" not in second


def test_non_ascii_text_survives_a_json_line(settings: Settings) -> None:
    stream = configured(settings, "json")
    logging.getLogger("notifier.test").info("Überprüfung ✓ %s", "完成")
    [line] = json_lines(stream)
    assert line["message"] == "Überprüfung ✓ 完成"


# The suite's logging.


def test_restoring_the_root_logger_gives_caplog_its_lines_back(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    stream = io.StringIO()
    with restored_root_logger():
        configure_logging(settings, level=logging.ERROR, stream=stream)
        logging.getLogger("notifier.test").error("while configured")
    caplog.set_level(logging.INFO)
    logging.getLogger("notifier.test").info("after restoring")
    assert [record.getMessage() for record in caplog.records] == ["after restoring"]
    assert "while configured" in stream.getvalue()
    assert "after restoring" not in stream.getvalue()
