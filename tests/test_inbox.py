"""The inbox in the chat (issue 10 §3): free text no command takes is stored once per delivery
and acknowledged, 人工 asks for a person, commands keep their words, non-text is asked for in
writing. Everything through the real WSGI app as signed XML."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, func
from sqlmodel import select

from bot.settings import Settings
from handlers import inbox as inbox_handler
from storage import events, mailbox
from storage.db import transaction
from storage.models import Event, InboxMessage, utcnow
from tests.conftest import WeChatUser, make_settings

READER = "o_reader_0001"


def stored(engine: Engine) -> list[InboxMessage]:
    with transaction(engine) as s:
        return list(s.exec(select(InboxMessage).order_by(InboxMessage.id)).all())


def inbox_events(engine: Engine) -> list[Event]:
    with transaction(engine) as s:
        return list(s.exec(select(Event).where(Event.kind == events.INBOX)).all())


def test_free_text_is_stored_and_acknowledged(user: WeChatUser, engine: Engine) -> None:
    reply = user.send("你们的第三期什么时候出？\n我等了好久")
    assert reply["content"] == inbox_handler.ACK
    assert "收到，编辑会尽快回复" in reply["content"] and "「帮助」" in reply["content"]
    [msg] = stored(engine)
    # As written (line break kept, not case-folded or collapsed), with the sender and time.
    assert (msg.openid, msg.kind) == (READER, "text")
    assert msg.text == "你们的第三期什么时候出？\n我等了好久"
    assert msg.read_at is None and msg.answered_at is None
    assert abs(msg.at - utcnow()) < timedelta(seconds=30)
    [event] = inbox_events(engine)
    assert (event.openid, event.detail) == (READER, "text")


def test_a_wechat_retry_stores_once(user: WeChatUser, engine: Engine) -> None:
    xml = user.text_xml("请问怎么开发票", msg_id=880001)
    first = user.post_xml(xml)
    again = user.post_xml(xml)  # WeChat's retry: same message, a fresh signature
    assert first.status_code == again.status_code == 200 and first.text == again.text
    assert [m.text for m in stored(engine)] == ["请问怎么开发票"]
    assert len(inbox_events(engine)) == 1


def test_the_delivery_key_is_the_guard(engine: Engine) -> None:
    """Below the webhook's claim: the same delivery key stores one message and one event."""
    now = utcnow()
    with transaction(engine) as s:
        assert mailbox.store(s, openid=READER, text="a", kind="text", key="wechat:o:1", at=now,
                             max_chars=100)
    with transaction(engine) as s:
        assert not mailbox.store(s, openid=READER, text="a", kind="text", key="wechat:o:1",
                                 at=now, max_chars=100)
        assert mailbox.store(s, openid=READER, text="b", kind="text", key="wechat:o:2", at=now,
                             max_chars=100)
    assert [m.text for m in stored(engine)] == ["a", "b"]
    assert len(inbox_events(engine)) == 2


class TestMaxChars:
    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(inbox={"max_chars": 10})

    def test_long_text_is_cut_to_max_chars(self, user: WeChatUser, engine: Engine) -> None:
        assert user.send("一二三四五六七八九十十一十二")["content"] == inbox_handler.ACK
        assert stored(engine)[0].text == "一二三四五六七八九十"


@pytest.mark.parametrize("command", ["人工", "转人工", "人工客服", "客服", "找编辑", "human",
                                     "人工！"])
def test_asking_for_a_person(user: WeChatUser, engine: Engine, command: str) -> None:
    content = user.send(command)["content"]
    assert content == inbox_handler.HUMAN and "编辑看到后会在这里回复你" in content
    [msg] = stored(engine)
    assert (msg.kind, msg.text) == ("human", command)
    assert inbox_events(engine)[0].detail == "human"


def test_asking_for_a_person_with_the_question(user: WeChatUser, engine: Engine) -> None:
    content = user.send("人工：我充值了 30 元，余额没变")["content"]
    assert content == inbox_handler.HUMAN_WITH_TEXT
    [msg] = stored(engine)
    assert (msg.kind, msg.text) == ("human", "我充值了 30 元，余额没变")


def test_commands_keep_their_words(user: WeChatUser, engine: Engine, sample: int) -> None:
    for command in ("本周", "余额", "帮助", "试读", "往期", "订阅", "充值"):
        reply = user.send(command)
        assert reply.get("content") != inbox_handler.ACK, command
    assert stored(engine) == []


def test_emoji_and_single_words_are_kept(user: WeChatUser, engine: Engine) -> None:
    for text in ("🌊🌊", "嗨", "asdf"):
        assert user.send(text)["content"] == inbox_handler.ACK
    assert [m.text for m in stored(engine)] == ["🌊🌊", "嗨", "asdf"]


def test_a_courtesy_is_kept_as_read(user: WeChatUser, engine: Engine) -> None:
    for text in ("谢谢！", "好的", "👍"):
        assert user.send(text)["content"] == inbox_handler.COURTESY_ACK
    assert all(m.read_at is not None for m in stored(engine)) and len(stored(engine)) == 3
    with transaction(engine) as s:
        assert mailbox.unread_count(s) == 0
        assert mailbox.claim_notice(s, now=utcnow(), every=timedelta(minutes=1)) is None


def test_a_command_with_a_foreign_number_gets_the_hint(user: WeChatUser, engine: Engine) -> None:
    for text in ("兑换 ٣", "①", "试读 ²"):
        assert "没太明白" in user.send(text)["content"], text
    assert stored(engine) == []


def test_operators_text_is_not_stored(operator: WeChatUser, engine: Engine) -> None:
    assert operator.send("测试一下留言")["content"] == inbox_handler.OPERATOR_NOTE
    assert operator.send("人工")["content"] == inbox_handler.OPERATOR_NOTE
    assert stored(engine) == []


def test_non_text_is_asked_for_in_writing(user: WeChatUser, engine: Engine) -> None:
    xml = (f"<xml><ToUserName><![CDATA[gh_test]]></ToUserName>"
           f"<FromUserName><![CDATA[{READER}]]></FromUserName>"
           f"<CreateTime>1700000000</CreateTime><MsgType><![CDATA[image]]></MsgType>"
           f"<PicUrl><![CDATA[http://example.invalid/a.jpg]]></PicUrl>"
           f"<MediaId><![CDATA[m1]]></MediaId><MsgId>5551</MsgId></xml>")
    resp = user.post_xml(xml)
    assert resp.status_code == 200 and "暂时只能收文字留言" in resp.text
    assert stored(engine) == []
    # Events stay as they were: a VIEW click gets no answer, nothing is stored.
    assert user.event("VIEW", "http://testserver/x") == {"type": "silent"}
    assert stored(engine) == []


def test_unread_count_and_mark_read(user: WeChatUser, engine: Engine) -> None:
    user.send("问题一")
    user.send("问题二")
    with transaction(engine) as s:
        assert mailbox.unread_count(s) == 2
        assert mailbox.mark_read(s, openid=READER, now=utcnow()) == 2
        assert mailbox.unread_count(s) == 0
        count = s.exec(select(func.count()).select_from(InboxMessage)).one()
    assert count == 2
