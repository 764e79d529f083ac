"""Logging setup shared by the server and the CLI: plain text for people, one JSON object per
line for log collectors. Only the formatted message is emitted, never the raw record's args or
extras, so whatever a call site deliberately left out (secrets, tokens) stays out."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"


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
        return json.dumps(data, ensure_ascii=False, default=str)


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
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(numeric)
