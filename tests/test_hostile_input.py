"""Hostile but signed input, posted through the real WSGI app on SQLite and (with
NEWSBOT_TEST_DATABASE_URL) PostgreSQL: deep nesting, fields of shapes WeChat never sends, ids and
numbers that fit no column. Each is refused with a 4xx and its one request log line, or, for
WeChat's own reports, acknowledged and logged, and never a 500."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func
from sqlmodel import select

from bot.app import create_app
from storage.db import transaction
from storage.models import InboundMessage, MassJobReport, Subscriber
from tests.conftest import WeChatUser, client_for, parse_reply
from tests.test_safe_mode import SafeUser, safe_settings

READER = "o_reader_0001"


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The webhook's one-per-request log lines, as their structured fields."""
    return [dict(r.fields) for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "newsbot.webhook" and isinstance(getattr(r, "fields", None), dict)]


def count(engine: Engine, model: type[Any]) -> int:
    with transaction(engine) as s:
        return int(s.exec(select(func.count()).select_from(model)).one())


def text_xml(openid: str, content: str, *, msg_id: int = 424242) -> str:
    return (f"<xml><ToUserName><![CDATA[gh_test]]></ToUserName>"
            f"<FromUserName><![CDATA[{openid}]]></FromUserName>"
            f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content>{content}</Content><MsgId>{msg_id}</MsgId></xml>")


# --- 1. signed input that used to be a 500 ----------------------------------------------------

@pytest.mark.parametrize("levels", [20, 1000, 8000])
def test_deeply_nested_content_is_a_400_with_its_log_line(
        http: httpx.Client, engine: Engine, captured: pytest.LogCaptureFixture,
        levels: int) -> None:
    nested = "<a>" * levels + "本周" + "</a>" * levels
    resp = WeChatUser(http, READER).post_xml(text_xml(READER, nested))
    assert resp.status_code == 400
    [line] = request_lines(captured)
    assert (line["status"], line["outcome"]) == (400, "refused-400")
    assert count(engine, InboundMessage) == count(engine, Subscriber) == 0


@pytest.mark.parametrize("xml", [
    # A field WeChat sends as text, given elements instead (WeRoBot str()s them).
    text_xml(READER, "<b>本周</b>"),
    text_xml(READER, "<Content>本周</Content>"),
    ("<xml><ToUserName>gh_test</ToUserName><FromUserName>o_reader_0001</FromUserName>"
     "<CreateTime>1700000000</CreateTime><MsgType>event</MsgType>"
     "<Event><x>" * 300 + "CLICK" + "</x>" * 300 + "</Event></xml>"),
    ("<xml><ToUserName>gh_test</ToUserName><FromUserName>o_reader_0001</FromUserName>"
     "<CreateTime>1700000000</CreateTime><MsgType>event</MsgType><Event>CLICK</Event>"
     "<EventKey><k>LATEST</k></EventKey></xml>"),
    text_xml(READER, "本周").replace("<CreateTime>", "<CreateTime>١٧"),  # Arabic-Indic digits
])
def test_text_fields_holding_elements_are_refused(
        http: httpx.Client, engine: Engine, captured: pytest.LogCaptureFixture,
        xml: str) -> None:
    assert WeChatUser(http, READER).post_xml(xml).status_code == 400
    assert [line["status"] for line in request_lines(captured)] == [400]
    assert count(engine, InboundMessage) == 0


def test_nesting_inside_a_safe_mode_message_is_a_400(
        engine: Engine, captured: pytest.LogCaptureFixture) -> None:
    with client_for(create_app(safe_settings(), engine)) as c:
        user = SafeUser(c, READER)
        resp = user.post_encrypted(text_xml(READER, "<a>" * 1000 + "</a>" * 1000))
    assert resp.status_code == 400
    [line] = request_lines(captured)
    assert line["status"] == 400 and line["encrypted"] is True


@pytest.mark.parametrize("openid", [
    "o" * 65,                       # varchar(64) on PostgreSQL: a DataError, then a 500
    "o" * 300,
    "o_reader 0001",                # whitespace
    "o_reader\t0001",
    "o_读者_0001",                   # WeChat's openids are ASCII
])
def test_malformed_from_user_name_is_a_400(
        http: httpx.Client, engine: Engine, captured: pytest.LogCaptureFixture,
        openid: str) -> None:
    user = WeChatUser(http, openid)
    for xml in (user.text_xml("本周"), user.event_xml("subscribe"),
                user.text_xml("#topup o_x 5 gift")):
        assert user.post_xml(xml).status_code == 400
    assert [line["status"] for line in request_lines(captured)] == [400, 400, 400]
    assert count(engine, Subscriber) == count(engine, InboundMessage) == 0


def test_malformed_to_user_name_is_a_400(http: httpx.Client, engine: Engine) -> None:
    user = WeChatUser(http, READER)
    xml = user.text_xml("本周").replace("gh_test", "g" * 65)
    assert user.post_xml(xml).status_code == 400
    assert count(engine, Subscriber) == 0


@pytest.mark.usefixtures("sample")
def test_an_openid_of_64_characters_is_still_served(http: httpx.Client, engine: Engine) -> None:
    openid = "o" + "A1b2_-" * 10 + "xyz"
    assert len(openid) == 64
    reply = parse_reply(WeChatUser(http, openid).post_xml(
        WeChatUser(http, openid).text_xml("本周")).text)
    assert "第1期" in reply["content"]
    assert count(engine, Subscriber) == 1


# --- 6. integers that overflow their columns ------------------------------------------------------

def mass_report(msg_id: str, *, total: str = "3", sent: str = "3",
                status: str = "send success") -> str:
    return ("<xml><ToUserName><![CDATA[gh_test]]></ToUserName>"
            "<FromUserName><![CDATA[o_wechat_system]]></FromUserName>"
            "<CreateTime>1700000000</CreateTime><MsgType><![CDATA[event]]></MsgType>"
            f"<Event><![CDATA[MASSSENDJOBFINISH]]></Event><MsgID>{msg_id}</MsgID>"
            f"<Status><![CDATA[{status}]]></Status><TotalCount>{total}</TotalCount>"
            f"<FilterCount>3</FilterCount><SentCount>{sent}</SentCount>"
            "<ErrorCount>0</ErrorCount></xml>")


@pytest.mark.parametrize("msg_id, status", [
    ("12345678901234567890123", "send success"),   # 23 digits: beyond BIGINT
    ("9223372036854775808", "send success"),       # 2**63
    ("1000", "s" * 65),                           # beyond varchar(64)
])
def test_mass_report_that_fits_no_column_is_acknowledged_and_not_stored(
        http: httpx.Client, engine: Engine, captured: pytest.LogCaptureFixture,
        msg_id: str, status: str) -> None:
    resp = WeChatUser(http, "o_wechat_system").post_xml(mass_report(msg_id, status=status))
    assert resp.status_code == 200 and resp.text == "success"
    assert [line["outcome"] for line in request_lines(captured)] == ["ok"]
    assert any("MASSSENDJOBFINISH ignored" in r.getMessage() for r in captured.records)
    assert count(engine, MassJobReport) == 0


def test_mass_report_counts_that_overflow_are_stored_as_unknown(
        http: httpx.Client, engine: Engine, captured: pytest.LogCaptureFixture) -> None:
    big = str(2**63)
    resp = WeChatUser(http, "o_wechat_system").post_xml(
        mass_report(str(2**63 - 1), total=big, sent="2147483648"))
    assert resp.status_code == 200 and resp.text == "success"
    with transaction(engine) as s:
        [report] = s.exec(select(MassJobReport)).all()
    assert (report.msg_id, report.total_count, report.sent_count, report.filter_count) == (
        2**63 - 1, None, None, 3)
    assert any("SentCount, TotalCount not a count" in r.getMessage() for r in captured.records)
