"""Log lines on stderr: text for people, JSON lines for log pipelines, never a secret.

Lines about a request carry its ids as `extra` fields (see `about`): the text format has
them in the message already, the JSON format adds them as keys of their own. Every line
passes through a redactor that blanks the configured secrets, a net under the rule that
no code logs one in the first place.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from notifier.config import Settings
from notifier.redact import Redactor, secrets_of

# Extra fields a log line about a request or a delivery may carry, in JSON key order.
FIELDS = ("route", "event_id", "request_id", "reference_id", "status", "entry_id", "attempt")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Characters that would let a logged value start a line of its own, or move the cursor:
# C0 and C1 controls, DEL, and Unicode's line and paragraph separators.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Lines of a traceback start with this, so none can pass for a log line of its own.
TRACE_INDENT = "  | "


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`1 event`, `2 events`; `nouns` for a plural that is not `noun` + s."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def about(**fields: Any) -> dict[str, Any]:
    """The `extra` of a log line about a request: `log.info(..., extra=about(route=...))`."""
    return {name: value for name, value in fields.items() if value is not None}


def escape_controls(text: str) -> str:
    """`text` with every control character written as its escape (`\\n`, `\\x1b`)."""
    return CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, one line whatever the values hold, secrets blanked;
    a traceback follows on lines that start with `TRACE_INDENT`."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__(TEXT_FORMAT)
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        """The line, secrets blanked."""
        return self._redact(super().format(record))

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The message line, its values' control characters escaped (a request id with a
        newline in it cannot forge a line)."""
        escaped = copy.copy(record)
        escaped.message = escape_controls(record.message)
        return super().formatMessage(escaped)

    def formatException(self, ei: Any) -> str:
        """The traceback, each line marked as part of the line above."""
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        """The stack, each line marked as part of the line above."""
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join(TRACE_INDENT + escape_controls(line) for line in text.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request's fields, and
    the exception if any; secrets blanked."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        """The line as JSON, secrets blanked."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self._redact(record.getMessage()),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = self._redact(value) if isinstance(value, str) else value
        if record.exc_info:
            line["exception"] = self._redact(self.formatException(record.exc_info))
        if record.stack_info:
            line["stack"] = self._redact(self.formatStack(record.stack_info))
        return json.dumps(line, ensure_ascii=False)


def configure_logging(
    settings: Settings | None, *, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Send log lines to stderr in the configured format, with the settings' secrets
    blanked; stdout carries only a command's own output."""
    redact = Redactor(secrets_of(settings) if settings is not None else [])
    json_lines = settings is not None and settings.log_format == "json"
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if json_lines else TextFormatter(redact))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
