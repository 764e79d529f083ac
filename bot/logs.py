"""Logging setup shared by the server and the CLI: plain text for people, one JSON object per
line for log collectors. Only the formatted message is emitted, never the raw record's args or
extras, so whatever a call site deliberately left out (secrets, tokens) stays out. Messages carry
values from outside (openids, EventKeys, paths, WeChat's error texts): line breaks and other
control characters in them are escaped here, in one place, so no input can forge a line."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"

# C0 and C1 controls, DEL, the Unicode line and paragraph separators, and the bidirectional
# overrides that can make a line display as something else.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# What json.dumps(ensure_ascii=False) leaves raw although some readers break lines on it.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100
                                else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """``text`` on one line: control characters as visible escapes (``\\n``, ``\\x1b``…)."""
    return _UNSAFE.sub(_escape_char, text)


class TextFormatter(logging.Formatter):
    """The text format, one line per record: the message has its control characters escaped,
    and an attached traceback is indented under it so that none of its lines (whose exception
    texts may quote input) can pass for a record of its own."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        safe = logging.makeLogRecord(record.__dict__)
        safe.message = escape_controls(record.message)
        out = self.formatMessage(safe)
        # Not cached in record.exc_text: other handlers (test capture) format it their way.
        if record.exc_info:
            out += "\n" + _indent(self.formatException(record.exc_info))
        elif record.exc_text:
            out += "\n" + _indent(record.exc_text)
        if record.stack_info:
            out += "\n" + _indent(self.formatStack(record.stack_info))
        return out


def _indent(text: str) -> str:
    return "\n".join("    " + escape_controls(line) for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg"}`` plus ``exc`` when a traceback is attached."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        # Structured fields a call site passes on purpose (extra={"fields": {...}}); nothing
        # else from the record, so what a call site leaves out (secrets) stays out.
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                data.setdefault(str(key), value)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exc"] = record.exc_text
        # json.dumps escapes \n and the other C0 controls inside strings; the rest get \u
        # escapes too (only strings can hold them, so the object stays valid JSON).
        return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}",
                                json.dumps(data, ensure_ascii=False, default=str))


class _NewsbotHandler(logging.StreamHandler[TextIO]):
    """Our handler (a second setup replaces it instead of stacking). Without an explicit
    stream it writes to whatever ``sys.stderr`` is at the time of the record, so a replaced
    stderr (test runners, daemonising) never leaves it writing to a closed file."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._fixed = stream
        super().__init__(stream)

    @property
    def stream(self) -> TextIO:
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value: TextIO | None) -> None:
        self._fixed = value


def setup_logging(level: str | int = "INFO", fmt: LogFormat = "text",
                  stream: TextIO | None = None) -> None:
    """Send every logger's records to stderr (or ``stream``) in the chosen format."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _NewsbotHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _NewsbotHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(numeric)
