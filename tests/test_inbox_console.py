"""The console's 留言 pages (issue 10 §3) through the real WSGI app: conversations with unread
first, a conversation with the replies beside the questions, a reply sent through the same
path as `newsbot reply` (to the fake WeChat API), the 48-hour window's refusal shown politely,
CSRF and the audit trail."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import select

from bot.app import create_app
from bot.settings import Settings
from bot.wechat.fake import FakeWeChat
from storage import mailbox, subscribers
from storage.db import transaction
from storage.models import InboxMessage, InboxReply, OperatorAction, utcnow
from tests.conftest import OPERATOR, TOKEN, WeChatUser, client_for, make_settings
from tests.console_support import csrf_of, login

READER = "o_reader_0001"
OTHER = "o_reader_0002"


@pytest.fixture
def fake() -> Iterator[FakeWeChat]:
    with FakeWeChat(app_id="wx_c", app_secret="c-secret", followers=[READER, OTHER]) as f:
        yield f


@pytest.fixture
def settings(fake: FakeWeChat) -> Settings:
    return make_settings(wechat={"token": TOKEN, "app_id": "wx_c", "app_secret": "c-secret",
                                 "api_base": fake.base_url})


@pytest.fixture
def console(settings: Settings, engine: Engine) -> Iterator[httpx.Client]:
    with client_for(create_app(settings, engine)) as client:
        yield client


def flash(resp: httpx.Response) -> str:
    assert resp.status_code == 303, resp.text
    return parse_qs(urlsplit(resp.headers["location"]).query)["m"][0]


def test_an_operator_reads_and_answers(console: httpx.Client, settings: Settings,
                                       engine: Engine, fake: FakeWeChat,
                                       user: WeChatUser) -> None:
    WeChatUser(user.http, OTHER).send("旧的问题")
    user.send("我的兑换码提示已用过")
    user.send("人工")
    with transaction(engine) as s:
        mailbox.mark_read(s, openid=OTHER, now=utcnow())
    login(console, settings, OPERATOR)

    listing = console.get("/console/inbox")
    assert listing.status_code == 200 and "未读 <strong>2</strong> 条" in listing.text
    assert listing.text.index(READER[-8:]) < listing.text.index(OTHER[-8:])  # unread first
    assert "<span class=badge>人工</span>" in listing.text and "留言</a>" in listing.text

    page = console.get(f"/console/inbox/{READER}")
    assert page.status_code == 200
    assert "我的兑换码提示已用过" in page.text and "请求人工" in page.text
    assert "可以回复" in page.text and 'name="csrf"' in page.text
    csrf = csrf_of(page.text)

    sent = console.post(f"/console/inbox/{READER}/reply",
                        data={"csrf": csrf, "text": "已帮你查看，码已恢复。",
                              "next": f"/console/inbox/{READER}"})
    assert flash(sent) == "回复已发送。"
    assert fake.custom_messages == [(READER, "已帮你查看，码已恢复。")]
    with transaction(engine) as s:
        [reply] = s.exec(select(InboxReply)).all()
        msgs = s.exec(select(InboxMessage).where(InboxMessage.openid == READER)).all()
        audit = s.exec(select(OperatorAction)).all()
    assert (reply.status, reply.operator) == ("sent", OPERATOR)
    assert all(m.answered_at is not None and m.read_at is not None for m in msgs)
    assert [(a.action, a.target, a.result) for a in audit] == [("inbox.reply", READER, "ok")]

    after = console.get(sent.headers["location"])
    assert "回复已发送。" in after.text and "已帮你查看，码已恢复。" in after.text
    assert "已发送" in after.text
    listing = console.get("/console/inbox").text
    assert "未读 <strong>0</strong> 条" in listing


def test_outside_the_window_the_form_is_gone_and_a_post_is_refused(
        console: httpx.Client, settings: Settings, engine: Engine, fake: FakeWeChat) -> None:
    asked = utcnow() - timedelta(hours=50)
    with transaction(engine) as s:
        subscribers.ensure_subscriber(s, openid=READER, at=asked)
        mailbox.store(s, openid=READER, text="在吗", kind="text", key="k1", at=asked,
                      max_chars=100)
    csrf = login(console, settings, OPERATOR)
    page = console.get(f"/console/inbox/{READER}").text
    assert "超过 48 小时没有互动" in page and "<textarea" not in page
    refused = console.post(f"/console/inbox/{READER}/reply",
                           data={"csrf": csrf, "text": "在的",
                                 "next": f"/console/inbox/{READER}"})
    message = flash(refused)
    assert message.startswith("没有发送：已超过微信的 48 小时客服消息窗口")
    assert "等对方再发消息后即可回复" in message
    assert refused.headers["location"].startswith(f"/console/inbox/{READER}?")
    assert fake.custom_messages == []
    with transaction(engine) as s:
        [reply] = s.exec(select(InboxReply)).all()
        [action] = s.exec(select(OperatorAction)).all()
    assert reply.status == "refused" and action.result == "refused"


def test_wechat_refusing_is_explained(console: httpx.Client, settings: Settings,
                                      engine: Engine, fake: FakeWeChat,
                                      user: WeChatUser) -> None:
    user.send("你好")
    csrf = login(console, settings, OPERATOR)
    fake.fail_next(48001, path="/cgi-bin/message/custom/send")
    refused = console.post(f"/console/inbox/{READER}/reply", data={"csrf": csrf, "text": "hi"})
    assert "48001" in flash(refused) and "微信认证" in flash(refused)


def test_a_reply_needs_the_csrf_token_and_text(console: httpx.Client, settings: Settings,
                                               engine: Engine, fake: FakeWeChat,
                                               user: WeChatUser) -> None:
    user.send("你好")
    csrf = login(console, settings, OPERATOR)
    forged = console.post(f"/console/inbox/{READER}/reply", data={"text": "hi"})
    assert forged.status_code == 403
    empty = console.post(f"/console/inbox/{READER}/reply", data={"csrf": csrf, "text": "  "})
    assert flash(empty) == "回复是空的，没有发送。"
    too_long = console.post(f"/console/inbox/{READER}/reply",
                            data={"csrf": csrf, "text": "字" * 700})
    assert flash(too_long).startswith("回复太长")
    assert fake.custom_messages == []
    with transaction(engine) as s:
        assert s.exec(select(InboxReply)).all() == []


def test_mark_read(console: httpx.Client, settings: Settings, engine: Engine,
                   user: WeChatUser) -> None:
    user.send("问题一")
    csrf = login(console, settings, OPERATOR)
    assert "标为已读" in console.get(f"/console/inbox/{READER}").text
    done = console.post(f"/console/inbox/{READER}/read", data={"csrf": csrf})
    assert flash(done) == "已将 1 条留言标为已读。"
    with transaction(engine) as s:
        assert mailbox.unread_count(s) == 0


def test_a_non_operator_sees_nothing(console: httpx.Client, user: WeChatUser) -> None:
    user.send("私密问题")
    page = console.get(f"/console/inbox/{READER}")
    assert page.status_code == 403 and "私密问题" not in page.text
