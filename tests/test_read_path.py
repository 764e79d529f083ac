"""The webhook's read path: commands whose handlers only read are answered from a read-only
transaction and stored with a single INSERT. These tests pin what that must not change (the
replies, retries, the once-only new-issue note) and what it must guarantee (a write cannot
slip through it, a changed issue is never served stale). Real signed XML through the WSGI app."""

from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any

import bottle
import httpx
import pytest
from sqlalchemy import Engine, text

from bot.app import create_app
from bot.settings import Settings
from bot.wechat.webhook import Webhook
from handlers import ROUTERS
from handlers.router import Context, Incoming, Router, Text, reads_only
from storage import subscribers
from storage.db import transaction
from tests.conftest import WeChatUser, make_settings, parse_reply
from tests.test_webhook import READER, add_issue, topup


def row_counts(engine: Engine) -> dict[str, int]:
    with transaction(engine) as s:
        return {table: int(s.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
                for table in ("inbound_message", "subscriber", "issue_notice", "ledger_entry")}


def client(settings: Settings, engine: Engine) -> httpx.Client:
    return httpx.Client(transport=httpx.WSGITransport(app=create_app(settings, engine)),
                        base_url="http://t")


def test_a_known_readers_card_stores_its_reply_and_retries_get_the_first_reply(
        engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 40)
    with client(make_settings(), engine) as http:
        user = WeChatUser(http, READER)
        user.send("帮助")  # the first message after publication also records the 新一期 notice
        xml = user.text_xml("本周", msg_id=777001)
        before = row_counts(engine)
        first = parse_reply(user.post_xml(xml).text)
        assert "40 豆" in first["content"]
        assert row_counts(engine) == {**before, "inbound_message": before["inbound_message"] + 1}
        with transaction(engine) as s:
            status, stored = s.execute(text(
                "SELECT status, reply_json FROM inbound_message WHERE dedupe_key = :k"),
                {"k": f"msg:{READER}:777001"}).one()
        assert status == "done" and json.loads(stored)["content"] == first["content"]
        # The balance changes before WeChat retries: the retry still gets the first answer,
        # and stores nothing.
        topup(engine, READER, 60)
        before = row_counts(engine)
        assert parse_reply(user.post_xml(xml).text) == first
        assert row_counts(engine) == before
        assert "100 豆" in user.send("本周")["content"]


def test_an_unknown_readers_first_message_creates_the_subscriber(engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    with client(make_settings(), engine) as http:
        reply = WeChatUser(http, "o_brand_new").send("本周")
    assert "测试第1期" in reply["content"] and "0 豆" in reply["content"]
    with transaction(engine) as s:
        assert subscribers.get_subscriber(s, openid="o_brand_new") is not None


def test_a_write_in_a_reads_only_handler_is_refused_then_done_once_on_the_write_path(
        settings: Settings, engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """A handler wrongly marked @reads_only: the read-only transaction refuses its write (it
    would otherwise be rolled back unseen), and the message is answered on the write path."""
    calls: list[str] = []
    liar = Router("liar")

    @liar.command(r"join")
    @reads_only
    def _join(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Text:
        calls.append("read" if ctx.read_only else "write")
        subscribers.set_subscribed(ctx.session, openid="o_side_effect", subscribed=True)
        return Text("joined")

    topup(engine, READER, 1)  # a known reader, so the read path is tried
    app = bottle.Bottle()
    Webhook(settings, engine, routers=(liar, *ROUTERS)).install(app)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http, \
            caplog.at_level(logging.WARNING, logger="newsbot.webhook"):
        reply = WeChatUser(http, READER).send("join")
    assert reply["content"] == "joined"
    assert calls == ["read", "write"]
    assert any("read path failed" in r.getMessage() for r in caplog.records)
    with transaction(engine) as s:
        assert subscribers.get_subscriber(s, openid="o_side_effect") is not None


def test_commands_that_write_never_run_on_the_read_path(
        settings: Settings, engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 100)
    seen: list[bool] = []
    spy = Router("spy")

    @spy.command(r"兑换.*")
    def _spy(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> None:
        seen.append(ctx.read_only)
        return None  # fall through to the real handler

    app = bottle.Bottle()
    Webhook(settings, engine, routers=(spy, *ROUTERS)).install(app)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        reply = WeChatUser(http, READER).send("兑换")
    assert reply["type"] == "news"
    assert seen == [False]  # the unmarked spy stopped the read path before it ran


def test_new_issue_note_once_when_one_readers_messages_race(engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 5)
    settings = make_settings(broadcast={"mode": "off"})
    app = create_app(settings, engine)
    start = threading.Barrier(8)
    replies: list[str] = []
    lock = threading.Lock()

    def ask(i: int) -> None:
        with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
            user = WeChatUser(http, READER)
            xml = user.text_xml("余额", msg_id=880000 + i)
            start.wait(timeout=10)
            body = parse_reply(user.post_xml(xml).text)["content"]
        with lock:
            replies.append(body)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(replies) == 8
    noted = [r for r in replies if r.startswith("🆕 新一期已发布")]
    assert len(noted) == 1, replies
    assert all("你的余额：5 豆" in r for r in replies)


def test_a_changed_or_newly_published_issue_is_never_served_stale(engine: Engine) -> None:
    add_issue(engine, 1, price=30, title="第一期旧标题")
    topup(engine, READER, 1)
    with client(make_settings(), engine) as http:
        user = WeChatUser(http, READER)
        assert "第一期旧标题" in user.send("本周")["content"]
        add_issue(engine, 1, price=30, title="第一期新标题")  # re-import, same number
        assert "第一期新标题" in user.send("本周")["content"]
        add_issue(engine, 2, price=30, title="第二期", publish=False)  # a draft: not current
        assert "第一期新标题" in user.send("本周")["content"]
        add_issue(engine, 2, price=30, title="第二期")  # published
        assert "第二期" in user.send("本周")["content"]


def test_answers_survive_postgresql_dropping_every_connection(
        engine: Engine, pg_admin: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """A server restart or failover: the pooled connections (readers and writers) are dead.
    The next messages still get their answers, and the fast path recovers."""
    add_issue(engine, 1, price=30)
    topup(engine, READER, 40)
    with client(make_settings(), engine) as http:
        user = WeChatUser(http, READER)
        for _ in range(3):  # both pools now hold connections
            assert "40 豆" in user.send("本周")["content"]
        with pg_admin.connect() as conn:
            killed = conn.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = :app"), {"app": engine.url.query["application_name"]}
            ).scalar_one()
        assert killed >= 2
        with caplog.at_level(logging.WARNING, logger="newsbot.webhook"):
            replies = [user.send("本周")["content"] for _ in range(4)]
    assert all("40 豆" in r for r in replies), replies
    fell_back = [r for r in caplog.records if "read path failed" in r.getMessage()]
    assert len(fell_back) <= 1  # the pool was renewed after the first failure


def test_messages_for_writing_handlers_skip_the_fast_reads(
        settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """兑换 and the like are known from routing alone to need the write path: no reads are
    spent on the fast path first."""
    add_issue(engine, 1, price=30)
    topup(engine, READER, 100)
    webhook = Webhook(settings, engine)
    readings: list[str] = []
    real_reading = webhook.fast.reading

    def counted() -> Any:
        readings.append("read")
        return real_reading()

    monkeypatch.setattr(webhook.fast, "reading", counted)
    app = bottle.Bottle()
    webhook.install(app)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        user = WeChatUser(http, READER)
        assert user.send("兑换")["type"] == "news"
        assert readings == []
        assert "已解锁" in user.send("本周")["content"]
        assert readings == ["read"]
