"""No input reaches a log line unescaped: a newline (or CR, U+2028, NEL…) in a signed EventKey
or a request path forges no line, in the text format (escaped, tracebacks indented under their
record) and in JSON (one object per line, whatever splits lines)."""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any

import pytest
from sqlalchemy import Engine

from bot.logs import setup_logging
from bot.settings import Settings
from bot.web import policy, reader
from bot.wechat.webhook import Webhook
from handlers import ROUTERS
from handlers.router import Context, Incoming, Router, Text
from tests.conftest import WeChatUser, client_for
from tests.test_hostile_input import READER

FORGED = "\nwebhook id=forged outcome=ok"


# --- 4. log lines input cannot forge ----------------------------------------------------------

def _capture_logs(fmt: str) -> tuple[io.StringIO, Any]:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    stream = io.StringIO()
    setup_logging("INFO", fmt, stream=stream)  # type: ignore[arg-type]

    def restore() -> None:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])

    return stream, restore


RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +\[\d+\] ")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_newline_in_a_signed_event_key_forges_no_log_line(
        settings: Settings, engine: Engine, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Any, rest: str = "") -> str:
        raise RuntimeError("reader broke")

    monkeypatch.setattr(reader._ReaderApp, "not_a_path", broken)
    boom = Router("boom")

    @boom.event("click")
    def _boom(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Text:
        raise RuntimeError(f"cannot handle {msg.event_key}")  # the key reaches the traceback

    app = policy.App()
    Webhook(settings, engine, routers=(boom, *ROUTERS)).install(app)
    reader.install(app, settings=settings, engine=engine)
    stream, restore = _capture_logs(fmt)
    try:
        with client_for(app) as c:
            resp = WeChatUser(c, READER).post_xml(
                WeChatUser(c, READER).event_xml("CLICK", "MENU" + FORGED + "\u2028x\x85y"))
            # …and a request path, which reaches the app's error line (a carriage return
            # overwrites the line on a terminal; Bottle matches no route with a newline).
            c.get("/read/x%0Dwebhook%20id=forged%20outcome=ok%09")
    finally:
        restore()
    assert resp.status_code == 200
    lines = stream.getvalue().split("\n")[:-1]
    assert not any(line.startswith("webhook") for line in lines)
    if fmt == "json":
        records = [json.loads(line) for line in lines]  # every line is one whole record
        assert len(records) == len(stream.getvalue().splitlines())  # no U+2028 / U+0085 breaks
        forged = [r for r in records if "forged" in json.dumps(r, ensure_ascii=False)]
        msgs = [str(r["msg"]) for r in forged if r["logger"] != "httpx"]
        assert len(msgs) == 2 and "\nwebhook id=forged" in msgs[0]
        assert "/read/x\rwebhook id=forged" in msgs[1]
    else:
        starts = [line for line in lines if RECORD_START.match(line)]
        # Every other line is an indented traceback line of the record above it.
        assert all(RECORD_START.match(line) or line.startswith("    ") for line in lines)
        assert len(stream.getvalue().splitlines()) == len(lines)
        forged = [line for line in starts if "forged" in line and " httpx: " not in line]
        assert len(forged) == 2  # the handler's failure and the reader's (path in it)
        assert "key=evt:o_reader_0001:" in forged[0] and "\\u2028x\\x85y" in forged[0]
        assert "on GET /read/x\\rwebhook id=forged outcome=ok\\t" in forged[1]
        webhook_lines = [line for line in starts if "newsbot.webhook: webhook id=" in line]
        assert len(webhook_lines) == 1 and "outcome=error" in webhook_lines[0]


