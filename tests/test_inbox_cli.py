"""`newsbot inbox` and `newsbot reply` against the fake WeChat API (issue 10 §3): replies go
out as customer-service messages inside the 48-hour window and are stored beside the question;
outside it, or when WeChat refuses (48001 unverified, 45015 window closed), nothing reaches the
subscriber, the command exits 1 saying why and the attempt is stored as refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine
from sqlmodel import select
from typer.testing import CliRunner, Result

from bot.cli import app
from bot.wechat.fake import FakeWeChat
from storage import events, mailbox, subscribers
from storage.db import transaction
from storage.models import InboundMessage, InboxMessage, InboxReply, utcnow
from tests.conftest import TOKEN, WeChatUser

READER = "o_reader_0001"
CUSTOM_SEND = "/cgi-bin/message/custom/send"
SHANGHAI = ZoneInfo("Asia/Shanghai")


@pytest.fixture
def fake() -> Iterator[FakeWeChat]:
    with FakeWeChat(app_id="wx_inbox", app_secret="inbox-secret", followers=[READER]) as f:
        yield f


@pytest.fixture
def config(tmp_path: Path, fake: FakeWeChat, db_url: str, engine: Engine) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""
[wechat]
token = "{TOKEN}"
app_id = "wx_inbox"
app_secret = "inbox-secret"
api_base = "{fake.base_url}"
[reader]
secret = "cli-reader-secret-0123456789"
[database]
url = "{db_url}"
[broadcast]
timezone = "Asia/Shanghai"
""", encoding="utf-8")
    return path


def newsbot(config: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["--config", str(config), *args])


def leave(engine: Engine, text: str, *, at: datetime, key: str | None = None) -> None:
    with transaction(engine) as s:
        subscribers.ensure_subscriber(s, openid=READER, at=at)
        mailbox.store(s, openid=READER, text=text, kind="text", key=key or f"k:{text}", at=at,
                      max_chars=2000)


def replies(engine: Engine) -> list[InboxReply]:
    with transaction(engine) as s:
        return list(s.exec(select(InboxReply).order_by(InboxReply.id)).all())


def messages(engine: Engine) -> list[InboxMessage]:
    with transaction(engine) as s:
        return list(s.exec(select(InboxMessage).order_by(InboxMessage.id)).all())


def test_a_message_from_the_chat_answered_from_the_cli(
        config: Path, fake: FakeWeChat, engine: Engine, user: WeChatUser) -> None:
    user.send("怎么开发票？")
    user.send("人工")
    listed = newsbot(config, "inbox", "--json")
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.stdout)
    assert data["unread"] == 2
    assert [(m["kind"], m["text"]) for m in data["messages"]] == [("human", "人工"),
                                                                   ("text", "怎么开发票？")]
    assert data["messages"][0]["at"].endswith("+08:00")  # [broadcast] timezone

    sent = newsbot(config, "reply", READER, "  你好，发票请在菜单「我的」里申请。 ",
                   "--operator", "editor-li")
    assert sent.exit_code == 0, sent.output
    assert "sent to o_reader_0001" in sent.stdout and "window closes" in sent.stdout
    assert fake.custom_messages == [(READER, "你好，发票请在菜单「我的」里申请。")]
    [reply] = replies(engine)
    assert (reply.status, reply.operator, reply.error) == ("sent", "editor-li", None)
    assert reply.message_id == messages(engine)[-1].id  # beside their latest question
    assert all(m.answered_at is not None and m.read_at is not None for m in messages(engine))

    unread = json.loads(newsbot(config, "inbox", "--unread", "--json").stdout)
    assert unread == {"unread": 0, "messages": []}
    thread = json.loads(newsbot(config, "inbox", "--json").stdout)["messages"][0]
    assert [r["text"] for r in thread["replies"]] == ["你好，发票请在菜单「我的」里申请。"]


def test_the_table(config: Path, engine: Engine) -> None:
    leave(engine, "第一条", at=datetime(2026, 11, 30, 1, 0, tzinfo=UTC))
    result = newsbot(config, "inbox")
    assert result.exit_code == 0, result.output
    assert "time (Asia/Shanghai)" in result.stdout and "2026-11-30 09:00" in result.stdout
    assert "第一条" in result.stdout and "o_reader_0001" in result.stdout
    assert "no" in result.stdout  # not answered
    assert newsbot(config, "inbox", "--unread", "--openid", "o_nobody").stdout.strip() == \
        "no unread messages"


def test_outside_the_window_nothing_is_sent(config: Path, fake: FakeWeChat,
                                            engine: Engine) -> None:
    asked = utcnow() - timedelta(hours=49)
    leave(engine, "还在吗", at=asked)
    result = newsbot(config, "reply", READER, "在的")
    assert result.exit_code == 1
    closed = (asked + timedelta(hours=48)).astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M")
    assert "outside WeChat's 48-hour window" in result.stderr
    assert f"it closed {closed} (Asia/Shanghai)" in result.stderr
    assert fake.custom_messages == []
    assert not [c for c in fake.calls if c.path == CUSTOM_SEND]
    [reply] = replies(engine)
    assert reply.status == "refused" and "48-hour window closed" in (reply.error or "")
    assert messages(engine)[0].answered_at is None


def test_later_activity_keeps_the_window_open(config: Path, fake: FakeWeChat,
                                              engine: Engine) -> None:
    now = utcnow()
    leave(engine, "旧问题", at=now - timedelta(hours=60))
    with transaction(engine) as s:  # they read this week's card an hour ago
        events.record(s, events.CARD, openid=READER, at=now - timedelta(hours=1), issue_number=1)
    assert newsbot(config, "reply", READER, "答复").exit_code == 0
    assert fake.custom_messages == [(READER, "答复")]


def test_a_delivery_keeps_the_window_open(config: Path, fake: FakeWeChat,
                                          engine: Engine) -> None:
    now = utcnow()
    leave(engine, "旧问题", at=now - timedelta(hours=60))
    with transaction(engine) as s:  # they asked for 余额 an hour ago (no event, no message)
        s.add(InboundMessage(dedupe_key="msg:o_reader_0001:1", openid=READER, status="done",
                             created_at=now - timedelta(hours=1)))
    assert newsbot(config, "reply", READER, "答复").exit_code == 0


def test_an_unfollowed_subscriber_is_not_sent_to(config: Path, fake: FakeWeChat,
                                                 engine: Engine) -> None:
    leave(engine, "再见", at=utcnow() - timedelta(minutes=5))
    with transaction(engine) as s:
        subscribers.set_subscribed(s, openid=READER, subscribed=False)
    result = newsbot(config, "reply", READER, "别走")
    assert result.exit_code == 1 and "unfollowed" in result.stderr
    assert fake.custom_messages == [] and replies(engine)[0].status == "refused"


@pytest.mark.parametrize(("errcode", "says"), [
    (48001, "48001 api unauthorized: only verified accounts can"),
    (45015, "45015: no message from them in 48 hours"),
])
def test_wechat_refusals(config: Path, fake: FakeWeChat, engine: Engine, errcode: int,
                         says: str) -> None:
    leave(engine, "你好", at=utcnow() - timedelta(minutes=5))
    fake.fail_next(errcode, path=CUSTOM_SEND)
    result = newsbot(config, "reply", READER, "你好呀", "--json")
    assert result.exit_code == 1
    assert says in result.stderr and "stored as refused" in result.stderr
    assert json.loads(result.stdout)["status"] == "refused"
    assert fake.custom_messages == []
    [reply] = replies(engine)
    assert reply.status == "refused" and reply.error is not None
    assert reply.error.startswith(str(errcode))
    assert messages(engine)[0].answered_at is None


@pytest.mark.parametrize(("openid", "text", "says"), [
    (READER, "   ", "the reply is empty"),
    (READER, "字" * 700, "WeChat takes at most 2048"),
    ("o_stranger", "你好", "no subscriber with openid 'o_stranger'"),
])
def test_bad_input_writes_nothing(config: Path, fake: FakeWeChat, engine: Engine, openid: str,
                                  text: str, says: str) -> None:
    leave(engine, "你好", at=utcnow())
    result = newsbot(config, "reply", openid, text)
    assert result.exit_code == 2 and says in result.stderr and "nothing written" in result.stderr
    assert replies(engine) == [] and fake.calls == []


def test_the_same_reply_twice_is_sent_once(config: Path, fake: FakeWeChat,
                                           engine: Engine) -> None:
    leave(engine, "你好", at=utcnow())
    assert newsbot(config, "reply", READER, "收到，已处理").exit_code == 0
    again = newsbot(config, "reply", READER, " 收到，已处理 ")  # a double submit
    assert again.exit_code == 2 and "not sent again" in again.stderr
    assert newsbot(config, "reply", READER, "还有一件事").exit_code == 0  # other text is fine
    assert [m for _, m in fake.custom_messages] == ["收到，已处理", "还有一件事"]
    assert [r.status for r in replies(engine)] == ["sent", "sent"]


def test_a_double_submit_at_once_sends_once(fake: FakeWeChat, engine: Engine,
                                            config: Path) -> None:
    """Two operators (or one form sent twice) at the same moment: the subscriber's row lock
    makes the second wait for the first's 'sending' row, then refuse."""
    import threading

    from bot.settings import load_settings
    from bot.wechat.api import WeChatClient
    from bot.wechat.reply import BadReply, send_reply

    leave(engine, "你好", at=utcnow())
    settings = load_settings(config)
    fake.delay_next(0.5, path=CUSTOM_SEND)
    results: list[str] = []

    def send() -> None:
        with WeChatClient(settings.wechat, engine) as client:
            try:
                results.append(send_reply(engine, client, openid=READER, text="好的",
                                          operator="a").why)
            except BadReply as exc:
                results.append(exc.code)

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["repeat", "sent"]
    assert fake.custom_messages == [(READER, "好的")]
