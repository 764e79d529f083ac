"""The console's front door and first page: ``#console`` in the chat gives an operator a
one-time link that opens the dashboard; the dashboard shows the numbers and the charts drawn
by the server (bot.console.charts). Everything through the real WSGI app."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import httpx

from tests.conftest import WeChatUser

_LINK = re.compile(r"http://testserver(/console/open\?\S+)")


def _link_in(reply: dict[str, str]) -> str:
    found = _LINK.search(reply.get("content", ""))
    assert found, reply
    return found.group(1)


def test_console_in_the_chat_gives_an_operator_a_link_to_the_dashboard(
        operator: WeChatUser, app_client: httpx.Client) -> None:
    reply = operator.send("#console")
    assert reply["type"] == "text"
    text = reply["content"]
    assert "只能打开一次" in text and "15 分钟" in text and "10 小时" in text
    link = _link_in(reply)
    opened = app_client.get(link)
    assert opened.status_code == 303
    assert urlsplit(opened.headers["location"]).path == "/console/"
    page = app_client.get("/console/")
    assert page.status_code == 200 and "概览" in page.text and "关注者" in page.text
    assert app_client.get(link).status_code == 403  # a link opens once


def test_console_in_any_case_and_full_width(operator: WeChatUser) -> None:
    assert "/console/open?" in operator.send("＃ＣＯＮＳＯＬＥ")["content"]


def test_a_subscriber_sending_console_gets_what_any_unknown_text_gets(
        user: WeChatUser) -> None:
    user.event("subscribe")
    reply = user.send("#console")
    assert "/console/" not in reply.get("content", "")
    assert "后台" not in reply.get("content", "")
    assert reply == user.send("#nosuchthing")


def test_without_a_console_the_command_says_so() -> None:
    from datetime import UTC, datetime

    from handlers import admin
    from handlers.router import Context, Incoming, Text
    from tests.conftest import OPERATOR, make_settings

    ctx = Context(config=make_settings().chat_config(), make_link=lambda *a, **k: "",
                  key="k", now=datetime.now(UTC))
    msg = Incoming(openid=OPERATOR, msg_type="text", raw_text="#console")
    reply = admin.console(ctx, msg, None)
    assert isinstance(reply, Text) and "不可用" in reply.content
