"""The whole subscriber conversation, posted as real signed WeChat XML through the real WSGI app."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import bottle
import httpx
import pytest
from sqlalchemy import Engine, func, text
from sqlmodel import select

from bot.app import create_app
from bot.settings import Settings
from bot.wechat.webhook import MAX_BODY_BYTES, Webhook, sign
from handlers import ROUTERS
from handlers.router import Context, Incoming, Router, Text
from storage import ledger, subscribers
from storage.content import parse_issue_text, plain_text
from storage.db import transaction
from storage.issues import publish_issue, upsert_issue
from storage.models import InboundMessage, LedgerEntry
from tests.conftest import OPERATOR, SAMPLE_ISSUE, TOKEN, WeChatUser, parse_reply

READER = "o_reader_0001"


def topup(engine: Engine, openid: str, amount: int, key: str | None = None) -> None:
    with transaction(engine) as s:
        subscribers.ensure_subscriber(s, openid=openid)
        ledger.credit(s, openid=openid, amount=amount, kind="topup",
                      key=key or f"test:{openid}:{amount}:{time.time_ns()}", reason="test")


def balance(engine: Engine, openid: str) -> int:
    with transaction(engine) as s:
        return ledger.get_balance(s, openid=openid)


def redeem_count(engine: Engine, openid: str) -> int:
    with transaction(engine) as s:
        return len([e for e in ledger.recent_entries(s, openid=openid, limit=1000)
                    if e.kind == "redeem"])


def inbound_count(engine: Engine) -> int:
    with transaction(engine) as s:
        return int(s.exec(select(func.count()).select_from(InboundMessage)).one())


def add_issue(engine: Engine, number: int, *, price: int = 30, title: str | None = None,
              body: str | None = None, free_percent: int = 10, publish: bool = True) -> None:
    body = body or "\n\n".join(f"第{number}期第{i}段的内容，写一些句子。还有第二句话。"
                               for i in range(20))
    src = (f'+++\nnumber = {number}\ntitle = "{title or f"测试第{number}期"}"\nprice = {price}\n'
           f"free_percent = {free_percent}\n"
           '[[topics]]\ntitle = "话题"\nquestions = ["问题一？"]\n+++\n\n' + body + "\n")
    parsed = parse_issue_text(src, file=f"issue-{number}.md", default_free_percent=10)
    with transaction(engine) as s:
        upsert_issue(s, parsed=parsed, default_free_percent=10)
        if publish:
            publish_issue(s, number=number)


# --- the conversation -----------------------------------------------------------------------

@pytest.mark.usefixtures("sample")
class TestConversation:
    def test_latest_card_has_topics_questions_price_balance_and_next_steps(
            self, user: WeChatUser, engine: Engine) -> None:
        topup(engine, READER, 40)
        for command in ("本周", "最新", "latest", "  LATEST ", "Latest"):
            reply = user.send(command)
            assert reply["type"] == "text"
            content = reply["content"]
            assert "第1期｜AI客服的真实账本" in content
            assert "引入AI客服之后，成本究竟省在了哪里？" in content  # a question
            assert "订阅疲劳之后，会员产品怎么活" in content  # a topic
            assert "价格 99 豆" in content and "余额 40 豆" in content
            assert "试读 1" in content and "兑换 1" in content

    def test_menu_click_latest(self, user: WeChatUser) -> None:
        reply = user.event("CLICK", "LATEST")
        assert "第1期｜" in reply["content"]

    @pytest.mark.parametrize("command", ["1", "第1期", "第 1 期", "W01", "w1", "week 1", "１",
                                         "第１期"])
    def test_issue_by_number(self, user: WeChatUser, command: str) -> None:
        reply = user.send(command)
        assert reply["content"].startswith("📰 第1期｜"), reply

    def test_unknown_issue_number_is_polite(self, user: WeChatUser) -> None:
        assert "没有找到第42期" in user.send("42")["content"]
        assert "没有找到第42期" in user.send("兑换 42")["content"]

    def test_draft_is_not_visible_to_subscribers(self, user: WeChatUser, engine: Engine) -> None:
        add_issue(engine, 2, publish=False)
        assert "没有找到第2期" in user.send("2")["content"]
        assert "没有找到第2期" in user.send("兑换 2")["content"]
        assert "第1期｜" in user.send("本周")["content"]

    def test_preview_is_the_excerpt_start_and_a_signed_link(self, user: WeChatUser) -> None:
        for command in ("试读", "preview", "试读 1", "试读１", "Preview 1"):
            reply = user.send(command)
            content = reply["content"]
            assert content.startswith("📖 试读｜第1期")
            links = re.findall(r"http://testserver/read/1\?\S+", content)
            assert len(links) == 1
            assert "够了之后回复「兑换 1」解锁全文" in content  # 0 豆: how to get tokens first

    def test_preview_never_contains_text_beyond_the_excerpt(
            self, user: WeChatUser, engine: Engine) -> None:
        with transaction(engine) as s:
            from storage.models import Issue
            issue = s.exec(select(Issue).where(Issue.number == 1)).one()
            excerpt_plain = re.sub(r"\s", "", plain_text(issue.excerpt_md))
            body_plain = re.sub(r"\s", "", plain_text(issue.body_md))
        content = user.send("试读")["content"]
        shown = content.split("\n\n", 1)[1].split("\n\n阅读完整试读")[0].rstrip("…")
        shown_flat = re.sub(r"\s", "", shown)
        assert shown_flat and excerpt_plain.startswith(shown_flat)
        # The locked part's first sentence is nowhere in the reply.
        locked_start = body_plain[len(excerpt_plain):][:30]
        assert locked_start not in re.sub(r"\s", "", content)

    def test_archive_lists_newest_first_with_unlock_marks(
            self, user: WeChatUser, engine: Engine) -> None:
        add_issue(engine, 2, price=0)
        add_issue(engine, 3)
        topup(engine, READER, 30)
        assert user.send("兑换 3")["type"] == "news"
        reply = user.send("往期")["content"]
        lines = reply.splitlines()
        assert lines[1].startswith("第3期") and "已解锁" in lines[1]
        assert lines[2].startswith("第2期") and "免费" in lines[2]
        assert lines[3].startswith("第1期") and "已解锁" not in lines[3]
        assert user.send("list")["content"] == reply

    def test_archive_pages(self, user: WeChatUser, engine: Engine) -> None:
        for n in range(2, 24):
            add_issue(engine, n)
        first = user.send("往期")["content"]
        assert "第 1/3 页" in first and "往期 2" in first and first.count("第") >= 10
        third = user.send("往期 3")["content"]
        assert "第 3/3 页" in third and "第1期｜" in third
        assert "第 3/3 页" in user.send("往期 99")["content"]

    def test_balance_shows_unit_and_last_five_entries(
            self, user: WeChatUser, engine: Engine) -> None:
        for i in range(7):
            topup(engine, READER, i + 1, key=f"t{i}")
        content = user.send("余额")["content"]
        assert "你的余额：28 豆" in content
        entries = [line for line in content.splitlines() if " 充值 " in line]
        assert len(entries) == 5
        assert "+7 豆" in entries[0]  # newest first

    def test_balance_uses_configured_unit(self, engine: Engine) -> None:
        settings = Settings.model_validate({
            "wechat": {"token": TOKEN}, "reader": {"secret": "x" * 20},
            "tokens": {"name": "金币"}})
        app = create_app(settings, engine)
        with httpx.Client(transport=httpx.WSGITransport(app=app),
                          base_url="http://t") as client:
            assert "0 金币" in WeChatUser(client, READER).send("balance")["content"]

    def test_unlock_insufficient_then_success_then_already(
            self, user: WeChatUser, engine: Engine) -> None:
        topup(engine, READER, 50)
        poor = user.send("兑换")["content"]
        assert "需要 99 豆" in poor and "余额 50 豆" in poor and "还差 49 豆" in poor
        assert "充值" in poor
        assert balance(engine, READER) == 50
        topup(engine, READER, 60)
        ok = user.send("unlock")
        assert ok["type"] == "news" and ok["count"] == "1"
        assert ok["url"].startswith("http://testserver/read/1?")
        assert "扣除 99 豆" in ok["description"] and "余额 11 豆" in ok["description"]
        again = user.send("兑换 1")
        assert again["type"] == "news" and "未重复扣费" in again["description"]
        assert balance(engine, READER) == 11
        assert redeem_count(engine, READER) == 1

    def test_read_locked_then_unlocked(self, user: WeChatUser, engine: Engine) -> None:
        locked = user.send("全文")
        assert locked["type"] == "text"
        assert "尚未解锁" in locked["content"] and "99 豆" in locked["content"]
        assert "http" not in locked["content"]
        topup(engine, READER, 99)
        assert user.send("read")["type"] == "text"  # still locked: reading does not charge
        assert balance(engine, READER) == 99
        user.send("兑换")
        unlocked = user.send("全文 1")
        assert unlocked["type"] == "news" and "/read/1?" in unlocked["url"]

    def test_free_issue_needs_no_tokens(self, user: WeChatUser, engine: Engine) -> None:
        add_issue(engine, 2, price=0)
        reply = user.send("兑换 2")
        assert reply["type"] == "news" and "免费" in reply["description"]
        assert user.send("全文 2")["type"] == "news"
        assert redeem_count(engine, READER) == 0

    @pytest.mark.parametrize("command", ["帮助", "help", "?", "？", "HELP"])
    def test_help(self, user: WeChatUser, command: str) -> None:
        content = user.send(command)["content"]
        for word in ("本周", "试读", "兑换", "全文", "往期", "余额"):
            assert word in content

    @pytest.mark.parametrize("kind", ["image", "voice", "location", "video", "link"])
    def test_other_message_types_get_a_hint(self, user: WeChatUser, kind: str) -> None:
        xml = (f"<xml><ToUserName><![CDATA[gh_test]]></ToUserName>"
               f"<FromUserName><![CDATA[{READER}]]></FromUserName>"
               f"<CreateTime>{int(time.time())}</CreateTime>"
               f"<MsgType><![CDATA[{kind}]]></MsgType><MediaId><![CDATA[m1]]></MediaId>"
               f"<Location_X>23.1</Location_X><Location_Y>113.3</Location_Y><Scale>20</Scale>"
               f"<Label><![CDATA[x]]></Label><MsgId>{time.time_ns()}</MsgId></xml>")
        reply = parse_reply(user.post_xml(xml).text)
        assert "帮助" in reply["content"]

    def test_unknown_text_gets_a_hint(self, user: WeChatUser) -> None:
        assert "帮助" in user.send("你好呀")["content"]

    def test_subscribe_welcome_and_unsubscribe_keeps_money(
            self, user: WeChatUser, engine: Engine) -> None:
        welcome = user.event("subscribe")["content"]
        assert welcome.startswith("欢迎订阅") and "第1期｜" in welcome
        topup(engine, READER, 120)
        user.send("兑换")
        assert user.event("unsubscribe") == {"type": "silent"}
        with transaction(engine) as s:
            sub = subscribers.get_subscriber(s, openid=READER)
            assert sub is not None and not sub.subscribed and sub.balance == 21
        user.event("subscribe")
        with transaction(engine) as s:
            sub = subscribers.get_subscriber(s, openid=READER)
            assert sub is not None and sub.subscribed and sub.balance == 21
            assert ledger.unlocked_issues(s, openid=READER) == {1}

    def test_subscribe_with_no_issue_yet(self, app_client: httpx.Client) -> None:
        # No `sample` fixture data for this user: still a welcome (the class fixture added
        # issue 1, so check the wording only).
        assert WeChatUser(app_client, "o_new").event("subscribe")["content"].startswith("欢迎")


def test_no_issue_published_yet(user: WeChatUser) -> None:
    assert "还没有发布" in user.send("本周")["content"]
    assert "还没有发布" in user.send("兑换")["content"]
    assert user.event("subscribe")["content"].startswith("欢迎订阅")


# --- operators --------------------------------------------------------------------------------

@pytest.mark.usefixtures("sample")
class TestOperators:
    def test_topup_adjust_and_user(self, operator: WeChatUser, user: WeChatUser,
                                   engine: Engine) -> None:
        user.send("hi")  # the reader exists once they have messaged the account
        ok = operator.send("#topup o_reader_0001 100 线下转账")["content"]
        assert "充值 +100 豆" in ok and "当前余额 100 豆" in ok
        assert "-30" in operator.send("#adjust o_reader_0001 -30 更正")["content"]
        info = operator.send("#user o_reader_0001")["content"]
        assert "余额：70 豆" in info and "已关注" in info
        with transaction(engine) as s:
            entries = ledger.recent_entries(s, openid=READER)
            assert [e.operator for e in entries] == [OPERATOR, OPERATOR]
            assert entries[1].reason == "线下转账"

    def test_operator_mistakes_are_refused_without_writing(
            self, operator: WeChatUser, user: WeChatUser, engine: Engine) -> None:
        user.send("hi")
        assert "整数" in operator.send("#topup o_reader_0001 abc 原因")["content"]
        assert "金额有误" in operator.send("#topup o_reader_0001 0 原因")["content"]
        assert "金额有误" in operator.send("#topup o_reader_0001 -5 原因")["content"]
        assert "max_topup" in operator.send("#topup o_reader_0001 100001 原因")["content"]
        assert "余额不足" in operator.send("#adjust o_reader_0001 -1 原因")["content"]
        assert "参数不全" in operator.send("#topup o_reader_0001 5")["content"]
        assert "找不到用户" in operator.send("#topup o_nobody 5 原因")["content"]
        assert "未知的运营指令" in operator.send("#refund x")["content"]
        assert balance(engine, READER) == 0
        with transaction(engine) as s:
            assert s.exec(select(func.count()).select_from(LedgerEntry)).one() == 0

    def test_non_operator_hash_commands_are_plain_text(
            self, user: WeChatUser, engine: Engine) -> None:
        reply = user.send("#topup o_reader_0001 100 hack")["content"]
        assert "帮助" in reply and "充值" not in reply
        assert balance(engine, READER) == 0

    def test_retried_operator_message_tops_up_once(
            self, operator: WeChatUser, user: WeChatUser, engine: Engine) -> None:
        user.send("hi")
        xml = operator.text_xml("#topup o_reader_0001 10 gift", msg_id=777)
        first = operator.post_xml(xml).text
        second = operator.post_xml(xml).text
        assert parse_reply(first)["content"] == parse_reply(second)["content"]
        assert balance(engine, READER) == 10


# --- protocol: signature, handshake, bad input -----------------------------------------------

def test_handshake_echoes_echostr(app_client: httpx.Client) -> None:
    ts, nonce = str(int(time.time())), "n1"
    resp = app_client.get("/wechat", params={"signature": sign(TOKEN, ts, nonce),
                                             "timestamp": ts, "nonce": nonce,
                                             "echostr": "12345abc"})
    assert resp.status_code == 200 and resp.text == "12345abc"
    bad = app_client.get("/wechat", params={"signature": "0" * 40, "timestamp": ts,
                                            "nonce": nonce, "echostr": "x"})
    assert bad.status_code == 403 and "x" not in bad.text


def test_signature_vector_from_the_platform_notes() -> None:
    assert sign("AAAAA", "1714036504", "1514711492").startswith("f464b24f")


@pytest.mark.parametrize("mangle", ["missing", "wrong", "other-token"])
def test_bad_signature_is_403_and_stores_nothing(
        user: WeChatUser, engine: Engine, app_client: httpx.Client, mangle: str) -> None:
    xml = user.text_xml("兑换")
    if mangle == "missing":
        resp = app_client.post("/wechat", content=xml.encode())
    elif mangle == "wrong":
        resp = user.post_xml(xml, signature="a" * 40)
    else:
        resp = WeChatUser(app_client, READER, token="not-our-token").post_xml(xml)
    assert resp.status_code == 403
    assert inbound_count(engine) == 0


def test_stale_timestamp_is_refused(user: WeChatUser, engine: Engine) -> None:
    resp = user.post_xml(user.text_xml("本周"), timestamp=int(time.time()) - 301)
    assert resp.status_code == 403
    resp = user.post_xml(user.text_xml("本周"), timestamp=int(time.time()) + 400)
    assert resp.status_code == 403
    assert inbound_count(engine) == 0


def test_oversized_body_is_413(user: WeChatUser, engine: Engine) -> None:
    resp = user.post_xml(user.text_xml("x" * (MAX_BODY_BYTES + 10)))
    assert resp.status_code == 413
    assert inbound_count(engine) == 0


@pytest.mark.parametrize("body", [
    "not xml at all",
    "<xml><FromUserName>unclosed",
    "<xml></xml>",
    "<xml><ToUserName>a</ToUserName><FromUserName>b</FromUserName><MsgType>text</MsgType></xml>",
    "<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaa'>]><xml>&a;</xml>",
    "",
])
def test_malformed_xml_is_400(user: WeChatUser, engine: Engine, body: str) -> None:
    resp = user.post_xml(body)
    assert resp.status_code == 400
    assert inbound_count(engine) == 0


def test_control_characters_are_400_not_500(user: WeChatUser) -> None:
    resp = user.post_xml(user.text_xml("hello\x01world"))
    assert resp.status_code == 400
    raw = user.http.post("/wechat", content=b"\xff\xfe<xml>", params={
        "signature": sign(TOKEN, "1", "n"), "timestamp": str(int(time.time())), "nonce": "n"})
    assert raw.status_code in (400, 403)


# --- replies ------------------------------------------------------------------------------------

def test_cdata_terminator_in_content_cannot_break_the_xml(
        user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 5, title="危险]]><b>标题")
    resp = user.post_xml(user.text_xml("5"))
    root = ElementTree.fromstring(resp.text)  # parses: the XML is intact
    assert "危险]]><b>标题" in (root.findtext("Content") or "")
    assert root.find("b") is None


def test_long_replies_fit_2048_bytes(user: WeChatUser, engine: Engine) -> None:
    questions = ", ".join(f'"{"很长的问题" * 20}{i}？"' for i in range(10))
    src = ("+++\nnumber = 9\ntitle = \"长\"\nprice = 1\n" + "".join(
        f'[[topics]]\ntitle = "话题{t}"\nquestions = [{questions}]\n' for t in range(5))
        + "+++\n\n" + "很长的第一段文字。" * 800 + "\n")
    with transaction(engine) as s:
        upsert_issue(s, parsed=parse_issue_text(src, file="x", default_free_percent=50),
                     default_free_percent=50)
        publish_issue(s, number=9)
    for command in ("9", "试读 9", "往期", "帮助", "本周"):
        resp = user.post_xml(user.text_xml(command))
        content = ElementTree.fromstring(resp.text).findtext("Content") or ""
        assert 0 < len(content.encode("utf-8")) <= 2048, command
    # The card keeps the price and how to unlock even when questions must go.
    card = user.send("9")["content"]
    assert "兑换 9" in card and "话题4" in card


# --- de-duplication ------------------------------------------------------------------------------

@pytest.mark.usefixtures("sample")
def test_same_msgid_three_times_one_debit_identical_replies(
        user: WeChatUser, engine: Engine) -> None:
    topup(engine, READER, 500)
    xml = user.text_xml("兑换", msg_id=4242)
    replies = [user.post_xml(xml).text for _ in range(3)]
    parsed = [parse_reply(r) for r in replies]
    assert parsed[0]["type"] == "news"
    assert parsed[0] == parsed[1] == parsed[2]
    assert balance(engine, READER) == 401
    assert redeem_count(engine, READER) == 1


@pytest.mark.usefixtures("sample")
def test_same_msgid_concurrently_from_threads(
        settings: Settings, engine: Engine) -> None:
    topup(engine, READER, 500)
    app = create_app(settings, engine)
    poster = WeChatUser(httpx.Client(transport=httpx.WSGITransport(app=app),
                                     base_url="http://t"), READER)
    xml = poster.text_xml("兑换", msg_id=9001)
    results: list[str] = []
    lock = threading.Lock()

    def deliver() -> None:
        with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as c:
            body = WeChatUser(c, READER).post_xml(xml).text
        with lock:
            results.append(body)

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parsed = [parse_reply(r) for r in results]
    assert len(parsed) == 8
    assert all(p == parsed[0] for p in parsed), parsed
    assert parsed[0]["type"] == "news"
    assert balance(engine, READER) == 401
    assert redeem_count(engine, READER) == 1


@pytest.fixture
def slow_app(settings: Settings, engine: Engine) -> Iterator[tuple[bottle.Bottle, list[str]]]:
    calls: list[str] = []
    slow = Router("slow")

    @slow.command(r"slow")
    def _slow(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Text:
        calls.append(msg.openid)
        time.sleep(0.6)
        return Text(f"done {len(calls)}")

    app = bottle.Bottle()
    Webhook(settings, engine, routers=(slow, *ROUTERS)).install(app)
    yield app, calls


def test_repeat_while_first_still_running_does_not_rerun(
        slow_app: tuple[bottle.Bottle, list[str]]) -> None:
    app, calls = slow_app
    xml = WeChatUser(httpx.Client(), READER).text_xml("slow", msg_id=31337)
    bodies: list[str] = []

    def deliver() -> None:
        with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as c:
            bodies.append(WeChatUser(c, READER).post_xml(xml).text)

    first = threading.Thread(target=deliver)
    first.start()
    time.sleep(0.2)  # the second delivery arrives while the first handler sleeps
    second = threading.Thread(target=deliver)
    second.start()
    first.join()
    second.join()
    assert calls == [READER]
    assert [parse_reply(b)["content"] for b in bodies] == ["done 1", "done 1"]


def test_events_are_deduplicated_by_user_and_createtime(
        user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 1, price=10)
    topup(engine, READER, 100)
    before = inbound_count(engine)
    xml = user.event_xml("CLICK", "UNLOCK", create_time=1_700_000_000)
    first = parse_reply(user.post_xml(xml).text)
    second = parse_reply(user.post_xml(xml).text)
    # The unlock button only asks (handlers.redeem.confirm_unlock): nothing is charged.
    assert first == second and "回复「兑换 1」" in first["content"]
    assert inbound_count(engine) == before + 1 and balance(engine, READER) == 100
    user.send("兑换 1")
    # A later click (new CreateTime) is a new event: already unlocked, the link, no charge.
    third = user.event("CLICK", "UNLOCK", create_time=1_700_000_001)
    assert third["type"] == "news" and "无需兑换" in third["description"]
    assert balance(engine, READER) == 90


# --- errors ---------------------------------------------------------------------------------------

def test_handler_error_is_logged_rolled_back_and_answered_politely(
        settings: Settings, engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    boom = Router("boom")

    @boom.command(r"boom")
    def _boom(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Text:
        subscribers.set_subscribed(ctx.session, openid="o_side_effect", subscribed=True)
        raise RuntimeError("kaboom")

    app = bottle.Bottle()
    Webhook(settings, engine, routers=(boom, *ROUTERS)).install(app)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as c:
        poster = WeChatUser(c, READER)
        with caplog.at_level(logging.ERROR, logger="newsbot.webhook"):
            xml = poster.text_xml("boom", msg_id=5150)
            reply = parse_reply(poster.post_xml(xml).text)
            again = parse_reply(poster.post_xml(xml).text)
    assert reply["content"] == "系统繁忙，请稍后再试" == again["content"]
    assert any("kaboom" in (r.exc_text or "") for r in caplog.records)
    with transaction(engine) as s:
        assert subscribers.get_subscriber(s, openid="o_side_effect") is None


# --- money under concurrency ----------------------------------------------------------------------

def test_balance_never_negative_under_concurrent_redemptions(
        settings: Settings, engine: Engine, tmp_path: Path) -> None:
    for n in range(1, 11):
        add_issue(engine, n, price=30)
    topup(engine, READER, 100)  # enough for three unlocks, not four
    app = create_app(settings, engine)
    errors: list[BaseException] = []

    def unlock(n: int) -> None:
        try:
            with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as c:
                WeChatUser(c, READER).send(f"兑换 {n}")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=unlock, args=(n,)) for n in range(1, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert balance(engine, READER) == 10
    assert redeem_count(engine, READER) == 3
    with transaction(engine) as s:
        assert ledger.check(s) == []
        assert len(ledger.unlocked_issues(s, openid=READER)) == 3
        assert s.execute(text("SELECT MIN(balance_after) FROM ledger_entry")).scalar() >= 0


def test_sample_issue_file_exists() -> None:
    assert SAMPLE_ISSUE.exists()
