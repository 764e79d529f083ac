"""What subscribers and operators read in the chat (issue 7 §2): strict digits, every suggested
command carrying its issue number, free issues reading as free, next steps that fit the reader,
operator replies naming the subscriber in Chinese, the new commands, the welcome, and the
digit rule shared by chat, CLI and reader URLs. Everything goes through the real WSGI app as
signed XML (or the real CLI / reader route)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes
from wsgiref.util import setup_testing_defaults

import httpx
import pytest
from sqlalchemy import Engine, func
from sqlmodel import select
from typer.testing import CliRunner

from bot.app import create_app
from bot.cli import app as cli_app
from bot.settings import Settings
from bot.web.links import ReaderLinks
from handlers.format import REPLY_LIMIT_BYTES
from handlers.numbers import chinese_number, issue_number, parse_int
from storage import ledger
from storage.content import parse_issue_text
from storage.db import transaction
from storage.issues import publish_issue, upsert_issue
from storage.models import Entitlement, LedgerEntry
from storage.subscribers import ensure_subscriber
from tests.conftest import TOKEN, WeChatUser, make_settings

READER = "o_reader_0001"
HOW_TO_GET = "转账后在本对话留言，编辑部会为你充值。"
PUBLICATION = "深潮周刊"


@pytest.fixture
def settings() -> Settings:
    return make_settings(
        content={"publication": PUBLICATION},
        tokens={"how_to_get": HOW_TO_GET},
        broadcast={"mode": "openids", "cron": "0 9 * * 5"},
    )


def add_issue(engine: Engine, number: int, *, price: int = 99, free_percent: int = 10,
              topics: list[tuple[str, list[str]]] | None = None, summary: str = "",
              publish: bool = True) -> None:
    body = "\n\n".join(f"第{i}段。" + "这是一段用来凑足篇幅的正文内容，" * 12 for i in range(20))
    topic_toml = "".join(
        f'[[topics]]\ntitle = "{title}"\nquestions = [{", ".join(repr(q) for q in qs)}]\n'
        for title, qs in (topics or [("话题", ["问题一？"])]))
    src = (f'+++\nnumber = {number}\ntitle = "测试第{number}期"\nprice = {price}\n'
           f'free_percent = {free_percent}\nsummary = "{summary}"\n{topic_toml}+++\n\n{body}\n')
    parsed = parse_issue_text(src, file=f"issue-{number}.md", default_free_percent=10)
    with transaction(engine) as s:
        upsert_issue(s, parsed=parsed, default_free_percent=10)
        if publish:
            publish_issue(s, number=number)


def topup(engine: Engine, openid: str, amount: int, key: str = "t") -> None:
    with transaction(engine) as s:
        ensure_subscriber(s, openid=openid)
        ledger.credit(s, openid=openid, amount=amount, kind="topup", key=f"test:{key}",
                      reason="test")


def balance(engine: Engine, openid: str = READER) -> int:
    with transaction(engine) as s:
        return ledger.get_balance(s, openid=openid)


def entry_count(engine: Engine) -> int:
    with transaction(engine) as s:
        return int(s.exec(select(func.count()).select_from(LedgerEntry)).one())


def unlocked(engine: Engine, openid: str = READER) -> set[int]:
    with transaction(engine) as s:
        return {int(n) for n in s.exec(select(Entitlement.issue_number)
                                       .where(Entitlement.openid == openid)).all()}


def text_of(reply: dict[str, str]) -> str:
    return reply.get("content") or f"{reply.get('title', '')}\n{reply.get('description', '')}"


# Suggested commands that leave out the issue number ("回复「兑换」").
BARE_COMMAND = re.compile(r"「(?:试读|兑换|全文|本周)」")


# ----------------------------------------------------------------- 1. strict digits


class TestStrictDigits:
    def test_foreign_digits_name_no_issue_and_charge_nothing(
            self, user: WeChatUser, engine: Engine) -> None:
        for n in (2, 3, 10):
            add_issue(engine, n)
        topup(engine, READER, 500)
        for command in ("兑换 ٣", "兑换 १०", "兑换 ²", "兑换 ①", "unlock ٣", "兑换 第٣期"):
            reply = user.send(command)
            assert reply["type"] == "text" and "没太明白" in reply["content"], (command, reply)
        for command in ("٣", "१०", "²", "①", "第٣期", "试读 ²", "全文 ①", "w②"):
            content = user.send(command)["content"]
            assert "没太明白" in content and "📰" not in content, (command, content)
        assert balance(engine) == 500 and unlocked(engine) == set()
        # What a Chinese keyboard types still works.
        assert user.send("兑换 ３")["type"] == "news"
        assert unlocked(engine) == {3} and balance(engine) == 401
        assert user.send("第１０期")["content"].startswith("📰 第10期｜")

    @pytest.mark.parametrize("amount", ["٣", "१०", "²", "①", "1_000", "+5", "５.０", "0x10"])
    def test_loose_operator_amounts_are_refused(
            self, operator: WeChatUser, user: WeChatUser, engine: Engine, amount: str) -> None:
        user.send("hi")
        for verb in ("#topup", "#adjust"):
            content = operator.send(f"{verb} {READER} {amount} 原因")["content"]
            assert "数量必须是整数" in content and "未执行" in content, content
        assert balance(engine) == 0 and entry_count(engine) == 0

    def test_full_width_and_minus_amounts_work(
            self, operator: WeChatUser, user: WeChatUser, engine: Engine) -> None:
        user.send("hi")
        assert "+50 豆" in operator.send(f"#topup {READER} ５０ 转账")["content"]
        assert "-8 豆" in operator.send(f"#adjust {READER} -8 更正")["content"]
        assert "-2 豆" in operator.send(f"#adjust {READER} －２ 更正")["content"]
        assert balance(engine) == 40

    @pytest.mark.parametrize("command", [
        f"#adjust {READER} -9223372036854775809 r",
        f"#adjust {READER} 9223372036854775808 r",
        f"#adjust {READER} -1000000000001 r",
        f"#topup {READER} 99999999999999999999999 r",
        f"#topup {READER} {'9' * 4000} r",
    ])
    def test_oversized_amounts_are_refused_politely(
            self, operator: WeChatUser, user: WeChatUser, engine: Engine, command: str) -> None:
        user.send("hi")
        content = operator.send(command)["content"]
        assert "数量过大" in content and "1,000,000,000,000" in content, content
        assert "系统繁忙" not in content
        assert balance(engine) == 0 and entry_count(engine) == 0

    def test_number_rules(self) -> None:
        assert [parse_int(t) for t in ("7", "０７", "123")] == [7, 7, 123]
        for loose in ("٣", "१०", "²", "①", "1_000", "+5", " 5", "5 ", "", "-5", "五"):
            assert parse_int(loose) is None, loose
        assert parse_int("-5", signed=True) == -5 and parse_int("+5", signed=True) is None
        cases = {"一": 1, "九": 9, "十": 10, "十二": 12, "二十": 20, "二十五": 25, "两": 2,
                 "九十九": 99, "一〇": 10, "二〇": 20, "二零": 20, "〇": 0, "零": 0}
        assert {k: chinese_number(k) for k in cases} == cases
        for bad in ("", "一二三", "十十", "百", "〇十", "二十零", "十两", "一两", "三十二十"):
            assert chinese_number(bad) is None, bad
        assert issue_number("１２") == 12 and issue_number("十二") == 12
        assert issue_number("٣") is None


def wsgi_get(app: Any, path: str, query: str) -> tuple[str, str]:
    """GET through the WSGI app with PATH_INFO as a server puts it (UTF-8 bytes read as
    latin-1, PEP 3333); httpx's WSGI transport would pass non-latin-1 text instead."""
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD="GET", QUERY_STRING=query,
                   PATH_INFO=unquote_to_bytes(path).decode("latin-1"))
    status: list[str] = []
    body = b"".join(app(environ, lambda s, h, e=None: status.append(s)))
    return status[0], body.decode("utf-8")


def test_reader_url_takes_ascii_and_full_width_digits_only(
        settings: Settings, engine: Engine) -> None:
    add_issue(engine, 6, price=0)
    with transaction(engine) as s:
        ensure_subscriber(s, openid=READER)
    app = create_app(settings, engine)
    query = ReaderLinks(settings).path(READER, 6).split("?", 1)[1]
    for path in ("/read/6", "/read/%EF%BC%96"):  # 6, ６
        status, page = wsgi_get(app, path, query)
        assert status.startswith("200") and "第19段" in page, path
    for path in ("/read/%D9%A6", "/read/%E0%A5%AC", "/read/%DB%B6"):  # ٦, ६, ۶
        status, page = wsgi_get(app, path, query)
        assert status.startswith("403") and "链接无效" in page, path
        assert "第1段" not in page


def test_cli_takes_the_same_digits(tmp_path: Path, db_url: str, engine: Engine) -> None:
    with transaction(engine) as s:
        ensure_subscriber(s, openid=READER)
    add_issue(engine, 3)
    config = tmp_path / "config.toml"
    config.write_text(f'[wechat]\ntoken = "{TOKEN}"\n[database]\nurl = "{db_url}"\n'
                      '[reader]\nsecret = "cli-test-reader-secret-0123456789"\n',
                      encoding="utf-8")
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(cli_app, ["--config", str(config), *args])
        return result.exit_code, result.output

    for amount in ("+5", "٣", "²", "1_000"):
        code, output = run("topup", READER, amount, "--reason", "x")
        assert code == 2 and "digits 0-9" in output, (amount, output)
    code, output = run("adjust", READER, "-9223372036854775809", "--reason", "x")
    assert code == 2 and "nothing written" in output
    assert balance(engine) == 0 and entry_count(engine) == 0
    assert run("topup", READER, "５", "--reason", "x")[0] == 0
    assert balance(engine) == 5
    for args in (("issue", "show", "٣"), ("issue", "show", "+3"), ("issue", "publish", "³"),
                 ("broadcast", "٣", "--dry-run"), ("user", "list", "--limit", "²")):
        code, output = run(*args)
        assert code == 2, (args, output)
    code, output = run("issue", "show", "３")
    assert code == 0 and "测试第3期" in output


# ----------------------------------------------------------------- 2. numbered commands


def test_every_command_about_an_issue_names_it(
        user: WeChatUser, engine: Engine, app_client: httpx.Client) -> None:
    add_issue(engine, 1)
    add_issue(engine, 2, price=0)
    add_issue(engine, 3, free_percent=0)
    newcomer = WeChatUser(app_client, "o_newcomer")
    replies = [newcomer.event("subscribe"), newcomer.event("SCAN", "qr1")]
    topup(engine, READER, 50)
    for number in (1, 2, 3):
        for command in (f"{number}", f"试读 {number}", f"兑换 {number}", f"全文 {number}"):
            replies.append(user.send(command))
    topup(engine, READER, 500, key="more")
    replies += [user.send("兑换 1"), user.send("试读 1"), user.send("1"), user.send("全文 1")]
    for reply in replies:
        assert not BARE_COMMAND.search(text_of(reply)), reply
        assert len(text_of(reply).encode()) <= REPLY_LIMIT_BYTES


def test_push_text_names_its_issue(tmp_path: Path, db_url: str, engine: Engine) -> None:
    add_issue(engine, 1)
    add_issue(engine, 2, price=0)
    config = tmp_path / "config.toml"
    config.write_text(f'[wechat]\ntoken = "{TOKEN}"\n[database]\nurl = "{db_url}"\n'
                      '[reader]\nsecret = "cli-test-reader-secret-0123456789"\n'
                      f'[content]\npublication = "{PUBLICATION}"\n', encoding="utf-8")
    runner = CliRunner()
    paid = runner.invoke(cli_app, ["--config", str(config), "broadcast", "1", "--dry-run"])
    assert paid.exit_code == 0, paid.output
    assert f"《{PUBLICATION}》新一期：第1期｜" in paid.output
    assert "回复「试读 1」" in paid.output and "回复「兑换 1」用 99 豆" in paid.output
    assert "回复「第1期」" in paid.output and not BARE_COMMAND.search(paid.output)
    free = runner.invoke(cli_app, ["--config", str(config), "broadcast", "2", "--dry-run"])
    assert free.exit_code == 0, free.output
    assert "本期免费：回复「全文 2」阅读全文" in free.output
    assert "试读" not in free.output and "兑换" not in free.output


def test_new_issue_note_names_the_issue(engine: Engine) -> None:
    settings = make_settings(broadcast={"mode": "off"})
    add_issue(engine, 1)
    with httpx.Client(transport=httpx.WSGITransport(app=create_app(settings, engine)),
                      base_url="http://testserver") as client:
        content = WeChatUser(client, READER).send("余额")["content"]
    assert content.startswith("🆕 新一期已发布：第1期｜测试第1期（回复「第1期」查看）")


# ----------------------------------------------------------------- 3. free issues


def test_free_issue_reads_as_free_everywhere(user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 2, price=0)
    card = user.send("第2期")["content"]
    assert "🎁 本期免费" in card
    assert re.search(r"阅读全文：http://testserver/read/2\?\S+", card)
    assert "试读" not in card and "%" not in card and "兑换" not in card
    preview = user.send("试读 2")["content"]
    assert "本期全部免费" in preview and "http://testserver/read/2?" in preview
    assert "没有免费试读" not in preview and "约 0 字" not in preview and "兑换" not in preview
    unlock = user.send("兑换 2")
    assert unlock["type"] == "news" and "本期免费，无需兑换，不扣豆" in unlock["description"]
    assert "/read/2?" in unlock["url"]
    assert entry_count(engine) == 0 and unlocked(engine) == set()
    page = user.http.get(unlock["url"].removeprefix("http://testserver"))
    assert page.status_code == 200 and "第19段" in page.text  # the whole text, no entitlement


# ----------------------------------------------------------------- 4. next steps


def test_next_steps_fit_the_reader(user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 2)
    topup(engine, READER, 50)
    poor_card = user.send("2")["content"]
    assert "价格 99 豆｜你的余额 50 豆（还差 49 豆）" in poor_card
    assert HOW_TO_GET in poor_card and "用 99 豆解锁" not in poor_card
    assert "豆够了之后回复「兑换 2」解锁全文" in poor_card and "回复「试读 2」" in poor_card
    poor_preview = user.send("试读 2")["content"]
    assert "还差 49 豆" in poor_preview and HOW_TO_GET in poor_preview
    assert "解锁全文：回复「兑换 2」" not in poor_preview
    poor_unlock = user.send("兑换 2")["content"]
    assert "余额不足，未扣费：第2期｜测试第2期 需要 99 豆" in poor_unlock
    assert HOW_TO_GET in poor_unlock and "回复「兑换 2」" in poor_unlock
    assert balance(engine) == 50
    topup(engine, READER, 50, key="more")
    rich_card = user.send("2")["content"]
    assert "回复「兑换 2」用 99 豆解锁全文" in rich_card and HOW_TO_GET not in rich_card
    assert "解锁全文：回复「兑换 2」（99 豆）" in user.send("试读 2")["content"]
    assert user.send("兑换 2")["type"] == "news"
    after_preview = user.send("试读 2")["content"]
    assert "你已解锁本期，可直接阅读全文" in after_preview and "兑换" not in after_preview
    assert "http://testserver/read/2?" in after_preview
    after_card = user.send("2")["content"]
    assert "✅ 你已解锁本期" in after_card and "回复「全文 2」阅读全部内容" in after_card
    assert "兑换" not in after_card and "试读" not in after_card


def test_paid_issue_without_excerpt_offers_no_preview(user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 4, free_percent=0)
    topup(engine, READER, 200)
    card = user.send("4")["content"]
    assert "试读" not in card and "回复「兑换 4」" in card
    preview = user.send("试读 4")["content"]
    assert "本期没有免费试读部分" in preview and "约 0 字" not in preview


# ----------------------------------------------------------------- 5. operator replies


def test_operator_replies_name_the_subscriber_in_chinese(
        operator: WeChatUser, user: WeChatUser, engine: Engine) -> None:
    user.send("hi")
    topup(engine, READER, 71)
    short = operator.send(f"#adjust {READER} -1000 更正")["content"]
    assert f"{READER} 的余额：71 豆" in short and "你的余额" not in short
    assert "余额不足" in short and "未执行" in short
    ok = operator.send(f"#topup {READER} 9 转账")["content"]
    assert f"{READER} 的当前余额 80 豆" in ok
    refusals = [operator.send(f"#topup {READER} 0 r")["content"],
                operator.send(f"#topup {READER} -5 r")["content"],
                operator.send(f"#adjust {READER} 0 r")["content"],
                operator.send(f"#topup {READER} 100001 r")["content"],
                operator.send(f"#adjust {READER} -1000000000001 r")["content"]]
    assert "充值数量必须是正整数" in refusals[1] and "超过单次上限 100000 豆" in refusals[3]
    for content in [short, *refusals]:
        words = content.replace(READER, "").replace("[tokens] max_topup", "")
        words = words.replace("#adjust", "").replace("#topup", "")
        assert not re.search(r"[A-Za-z]{3,}", words), content
    assert balance(engine) == 80


# ----------------------------------------------------------------- 6. new commands


def test_chinese_numerals_name_issues(user: WeChatUser, engine: Engine) -> None:
    for n in (2, 12, 20):
        add_issue(engine, n)
    for command, n in (("第二期", 2), ("第十二期", 12), ("第二十期", 20), ("第2期", 2),
                       ("第两期", 2), ("第 二十 期", 20), ("试读 第十二期", 12)):
        content = user.send(command)["content"]
        assert f"第{n}期｜测试第{n}期" in content, (command, content)
    assert "没有找到第99期" in user.send("第九十九期")["content"]
    topup(engine, READER, 500)
    odd = user.send("兑换 第一二三期")["content"]
    assert "没看懂期号「一二三」" in odd
    assert unlocked(engine) == set() and balance(engine) == 500


@pytest.mark.parametrize("command", ["充值", "怎么充值", "怎么充值？", "如何充值", "充值方式"])
def test_top_up_question(user: WeChatUser, engine: Engine, command: str) -> None:
    topup(engine, READER, 12)
    content = user.send(command)["content"]
    assert "你的余额：12 豆" in content and HOW_TO_GET in content


@pytest.mark.parametrize("command", ["人工", "转人工", "人工客服", "客服", "找编辑"])
def test_asking_for_a_person(user: WeChatUser, command: str) -> None:
    content = user.send(command)["content"]
    assert "编辑看到后会在这里回复你" in content


def test_subscribe_and_unsubscribe_questions(user: WeChatUser, engine: Engine) -> None:
    topup(engine, READER, 33)
    about = user.send("订阅")["content"]
    assert f"这就是订阅了《{PUBLICATION}》" in about and "新一期每周五 09:00 推送" in about
    assert "怎么订阅" not in about and user.send("怎么订阅？")["content"] == about
    leave = user.send("退订")["content"]
    assert "不再关注" in leave and "消息免打扰" in leave and "余额（33 豆）" in leave
    assert user.send("取消订阅")["content"] == leave


def test_scan_by_a_follower_shows_the_card(user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 1)
    user.send("hi")
    reply = user.event("SCAN", "campaign_42")
    assert reply["type"] == "text" and reply["content"].startswith("📰 第1期｜测试第1期")
    assert "没太明白" not in reply["content"]


def test_many_long_topics_show_what_fits(user: WeChatUser, engine: Engine) -> None:
    topics = [(f"第{i}个话题：" + "一个相当长的话题标题用来撑满卡片" * 3,
               ["这是一个很长的问题，" * 6 + "对吗？"] * 3) for i in range(1, 16)]
    add_issue(engine, 5, topics=topics, summary="摘要。" * 40)
    content = user.send("5")["content"]
    assert len(content.encode()) <= REPLY_LIMIT_BYTES
    shown = re.findall(r"^[一二三四五六七八九十]+、第(\d+)个话题", content, re.M)
    assert len(shown) >= 3 and shown == [str(i) for i in range(1, len(shown) + 1)]
    assert f"……还有 {15 - len(shown)} 个话题，回复「试读 5」查看" in content
    assert "价格 99 豆" in content and "回复「试读 5」免费读前 10%" in content


def test_overlong_summary_keeps_price_and_next_steps(user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 6, summary="很长的摘要。" * 400)
    content = user.send("6")["content"]
    assert len(content.encode()) <= REPLY_LIMIT_BYTES
    assert "价格 99 豆" in content and "回复「试读 6」" in content


# ----------------------------------------------------------------- 7. welcome


def test_welcome_uses_the_schedule_and_publication(user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 1)
    welcome = user.event("subscribe")["content"]
    assert welcome.startswith(f"欢迎订阅《{PUBLICATION}》！新一期每周五 09:00 推送到这里。")
    assert "每周一" not in welcome and "第1期｜测试第1期" in welcome


@pytest.fixture
def off_client(engine: Engine) -> Iterator[httpx.Client]:
    settings = make_settings(broadcast={"mode": "off", "cron": "30 7 * * 3"})
    with httpx.Client(transport=httpx.WSGITransport(app=create_app(settings, engine)),
                      base_url="http://testserver") as client:
        yield client


def test_welcome_in_off_mode_promises_no_push(off_client: httpx.Client) -> None:
    welcome = WeChatUser(off_client, "o_new").event("subscribe")["content"]
    assert welcome.startswith("欢迎订阅《会员通讯》！新一期每周三 07:30 发布。本号不主动推送")
    assert "推送到这里" not in welcome


def test_returning_follower_is_welcomed_back(user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 1)
    assert user.event("subscribe")["content"].startswith("欢迎订阅")
    topup(engine, READER, 120)
    user.send("兑换 1")
    assert user.event("unsubscribe") == {"type": "silent"}
    back = user.event("subscribe")["content"]
    assert back.startswith(f"欢迎回来！你在《{PUBLICATION}》的余额 21 豆和已解锁的各期都还在。")
    assert "欢迎订阅" not in back and "✅ 你已解锁本期" in back


# ----------------------------------------------------------------- 8. archive pages


def test_archive_past_the_last_page_says_so(user: WeChatUser, engine: Engine) -> None:
    for n in range(1, 24):
        add_issue(engine, n)
    late = user.send("往期 9")["content"]
    assert late.startswith("没有第 9 页，往期目录共 3 页，下面是第 3 页。")
    assert "第 3/3 页" in late and "第1期｜" in late and "回复「往期 2」看上一页" in late
    assert "没有第" not in user.send("往期 3")["content"]


# ----------------------------------------------------------------- help


def test_help_lists_the_new_commands(user: WeChatUser) -> None:
    content = user.send("帮助")["content"]
    for word in ("充值", "订阅 / 退订", "人工", "第三期"):
        assert word in content

