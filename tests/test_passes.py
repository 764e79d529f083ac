"""Passes (会员卡, issue 8 §2): the offer, buying and extending with tokens in chat, what a pass
covers (the issue current when it starts and every issue published during it, nothing before),
兑换 and 全文 of a covered issue, the reader page, and the pass on the card and in 余额.
Chat through signed XML posted to the real WSGI app, the page through HTTP with a signed link;
storage directly where only time travel can reach a boundary."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import bottle
import httpx
import pytest
from sqlalchemy import Engine, func
from sqlmodel import select

from bot.app import create_app
from bot.settings import Settings
from bot.web.links import ReaderLinks
from bot.wechat.webhook import Webhook
from handlers import ROUTERS
from handlers.router import Context, Incoming, Router, reads_only
from storage import ledger, passes
from storage.db import transaction
from storage.errors import IdempotencyConflict, InsufficientBalance
from storage.issues import publish_issue
from storage.models import Entitlement, LedgerEntry, PassPeriod, utcnow
from tests.conftest import TOKEN, WeChatUser, client_for, parse_reply
from tests.test_webhook import add_issue, balance, topup

READER = "o_reader_0001"
HOW_TO_GET = "转账后在本对话留言，编辑部会为你充值。"
MONTH = {"id": "month", "name": "月卡", "days": 30, "price": 30}
YEAR = {"id": "year", "name": "年卡", "days": 365, "price": 300}
BEIJING = ZoneInfo("Asia/Shanghai")
DAY = timedelta(days=1)


def pass_settings(*offers: dict[str, Any], **sections: dict[str, Any]) -> Settings:
    data: dict[str, Any] = {
        "wechat": {"token": TOKEN},
        "reader": {"secret": "test-reader-secret-0123456789"},
        "server": {"public_url": "http://testserver"},
        "tokens": {"how_to_get": HOW_TO_GET},
        "passes": list(offers),
    }
    for name, table in sections.items():
        data.setdefault(name, {}).update(table)
    return Settings.model_validate(data)


@pytest.fixture
def settings() -> Settings:
    return pass_settings(MONTH, YEAR)


def publish_at(engine: Engine, number: int, at: datetime, *, price: int = 30) -> None:
    add_issue(engine, number, price=price, publish=False)
    with transaction(engine) as s:
        publish_issue(s, number=number, at=at)


def periods(engine: Engine, openid: str = READER) -> list[PassPeriod]:
    with transaction(engine) as s:
        found = passes.periods(s, openid=openid)
        s.expunge_all()
        return found


def entries(engine: Engine, kind: str | None = None) -> list[LedgerEntry]:
    with transaction(engine) as s:
        query = select(LedgerEntry).order_by(LedgerEntry.id)  # type: ignore[arg-type]
        if kind is not None:
            query = query.where(LedgerEntry.kind == kind)
        found = list(s.exec(query).all())
        s.expunge_all()
        return found


def local(moment: datetime) -> str:
    return f"{moment.astimezone(BEIJING):%Y-%m-%d %H:%M}（北京时间）"


def buy(engine: Engine, *, now: datetime, key: str, offer: dict[str, Any] = MONTH,
        openid: str = READER) -> passes.PassPurchase:
    with transaction(engine) as s:
        bought = passes.buy(s, openid=openid, pass_id=offer["id"], days=offer["days"],
                            price=offer["price"], key=key, now=now)
        s.expunge_all()
        return bought


# --- the offer --------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["会员卡", "月卡", "年卡", "PASSES", "开通", "开通会员"])
def test_the_offer_lists_each_pass_with_days_price_and_the_words_to_buy(
        user: WeChatUser, engine: Engine, word: str) -> None:
    topup(engine, READER, 12)
    content = user.send(word)["content"]
    assert "「开通 月卡」30 天内每期全文，30 豆" in content
    assert "「开通 年卡」365 天内每期全文，300 豆" in content
    assert "你的余额：12 豆" in content
    assert entries(engine, "pass") == []


def test_buying_alone_belongs_to_the_buying_conversation(user: WeChatUser) -> None:
    for word in ("购买", "买豆"):
        content = user.send(word)["content"]
        # The ways to get tokens (passes among them, handlers.selling), not the pass offer.
        assert HOW_TO_GET in content and "到账后回复「余额」查看" in content
        assert "🎫" not in content


# --- buying -----------------------------------------------------------------------------------


def test_buying_debits_the_price_grants_the_days_and_says_until_when(
        user: WeChatUser, engine: Engine) -> None:
    topup(engine, READER, 100)
    before = utcnow()
    content = user.send("开通 月卡")["content"]
    [period] = periods(engine)
    [debit] = entries(engine, "pass")
    assert (debit.amount, debit.pass_id, debit.balance_after) == (-30, "month", 70)
    assert (period.source, period.ledger_entry_id, period.pass_id) == ("purchase", debit.id,
                                                                      "month")
    assert before <= period.starts_at <= utcnow()
    assert period.ends_at == period.starts_at + 30 * DAY
    assert f"已开通月卡（30 天），有效至 {local(period.ends_at)}" in content
    assert "扣除 30 豆，余额 70 豆" in content
    assert balance(engine, READER) == 70


@pytest.mark.parametrize("command", ["购买 MONTH", "ｂｕｙ　ｍｏｎｔｈ", "续费 月卡", "买月卡",
                                     "开通 Month", "开通月卡会员卡"])
def test_every_buying_word_any_case_and_full_width(
        user: WeChatUser, engine: Engine, command: str) -> None:
    topup(engine, READER, 30)
    assert "余额 0 豆" in user.send(command)["content"]
    assert [p.pass_id for p in periods(engine)] == ["month"]


def test_buying_again_extends_from_the_end_of_the_running_pass(
        user: WeChatUser, engine: Engine) -> None:
    topup(engine, READER, 400)
    user.send("开通 月卡")
    again = user.send("续费 年卡")["content"]
    first, second = periods(engine)
    assert second.starts_at == first.ends_at and second.first_issue is None
    assert second.ends_at == first.ends_at + 365 * DAY
    assert f"年卡已续期 365 天，有效至 {local(second.ends_at)}" in again
    assert "扣除 300 豆，余额 70 豆" in again


def test_an_extension_starts_where_the_last_period_ends_in_storage(engine: Engine) -> None:
    topup(engine, READER, 90)
    start = utcnow() - 10 * DAY
    one = buy(engine, now=start, key="k1").period
    two = buy(engine, now=start + DAY, key="k2").period
    three = buy(engine, now=start + 2 * DAY, key="k3").period
    assert (two.starts_at, three.starts_at) == (one.ends_at, two.ends_at)
    with transaction(engine) as s:
        held = passes.status(s, openid=READER)
    assert held is not None and held.until == one.starts_at + 90 * DAY
    # A pass that has run out is not extended: the new one starts now.
    topup(engine, READER, 30, key="more")
    later = buy(engine, now=three.ends_at + DAY, key="k4").period
    assert later.starts_at == three.ends_at + DAY


def test_too_few_tokens_says_the_exact_shortfall_and_the_ways_and_writes_nothing(
        user: WeChatUser, engine: Engine) -> None:
    topup(engine, READER, 10)
    before = entries(engine)
    content = user.send("开通 月卡")["content"]
    assert "余额不足，未开通月卡：需要 30 豆，你的余额 10 豆，还差 20 豆。" in content
    assert HOW_TO_GET in content and "「开通 年卡」" in content
    assert "豆够了之后回复「开通 月卡」" in content
    assert entries(engine) == before and periods(engine) == []


def test_insufficient_balance_in_storage_writes_nothing_even_if_the_caller_commits(
        engine: Engine) -> None:
    topup(engine, READER, 29)
    with transaction(engine) as s, pytest.raises(InsufficientBalance) as refused:
        passes.buy(s, openid=READER, pass_id="month", days=30, price=30, key="poor")
    assert refused.value.shortfall == 1
    assert periods(engine) == [] and len(entries(engine)) == 1 and balance(engine, READER) == 29


def test_a_grant_that_fails_after_the_debit_takes_the_debit_back(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The debit and the period share one savepoint: a chat handler turns a refusal into a
    reply and commits, which must not keep a charge without its pass."""
    topup(engine, READER, 30)

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise IdempotencyConflict("k", "something else")

    monkeypatch.setattr(passes, "grant", failing)
    with transaction(engine) as s, pytest.raises(IdempotencyConflict):
        passes.buy(s, openid=READER, pass_id="month", days=30, price=30, key="k")
    assert balance(engine, READER) == 30 and entries(engine, "pass") == []
    with transaction(engine) as s:
        assert ledger.check(s) == []


def test_a_key_buys_once_and_a_retry_returns_the_first_purchase(engine: Engine) -> None:
    topup(engine, READER, 100)
    now = utcnow()
    first = buy(engine, now=now, key="same")
    again = buy(engine, now=now + DAY, key="same")
    assert again.replayed and not first.replayed
    assert (again.period.id, again.entry.id, again.balance) == (first.period.id, first.entry.id,
                                                                70)
    assert balance(engine, READER) == 70 and len(periods(engine)) == 1
    with pytest.raises(IdempotencyConflict):
        buy(engine, now=now, key="same", offer=YEAR)


def test_a_retried_delivery_buys_once_with_identical_replies(
        user: WeChatUser, engine: Engine) -> None:
    topup(engine, READER, 100)
    xml = user.text_xml("开通 月卡", msg_id=880001)
    replies = {parse_reply(user.post_xml(xml).text)["content"] for _ in range(3)}
    assert len(replies) == 1 and balance(engine, READER) == 70 and len(periods(engine)) == 1


def test_an_unknown_pass_lists_the_real_ones(user: WeChatUser, engine: Engine) -> None:
    topup(engine, READER, 100)
    content = user.send("开通 周卡")["content"]
    assert "没有名为「周卡」的会员卡" in content
    assert "「开通 月卡」" in content and "「开通 年卡」" in content
    assert periods(engine) == [] and balance(engine, READER) == 100


def test_without_passes_configured_no_reply_mentions_them(engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 10)
    with client_for(create_app(pass_settings(), engine)) as http:
        user = WeChatUser(http, READER)
        for command in ("会员卡", "开通 月卡", "买 月卡", "余额", "本周", "兑换 1", "全文 1",
                        "购买"):
            reply = user.send(command)
            assert "会员" not in reply.get("content", "") + reply.get("description", ""), \
                command
    assert periods(engine) == []


# --- what a pass covers -----------------------------------------------------------------------


@pytest.fixture
def timeline(engine: Engine) -> datetime:
    """Issues 1 and 2 before a 30-day pass starts (2 is current then), 3 during it, 4 exactly
    when it ends, 5 after it; the reader keeps 170 豆. Returns the pass's start."""
    start = utcnow() - 60 * DAY
    publish_at(engine, 1, start - 20 * DAY)
    publish_at(engine, 2, start - 10 * DAY)
    publish_at(engine, 3, start + 5 * DAY)
    publish_at(engine, 4, start + 30 * DAY)
    publish_at(engine, 5, start + 31 * DAY)
    topup(engine, READER, 200)
    buy(engine, now=start, key="timeline")
    return start


def covered(engine: Engine, number: int) -> bool:
    with transaction(engine) as s:
        return passes.covered(s, openid=READER, issue_number=number)


@pytest.mark.usefixtures("timeline")
def test_a_pass_covers_the_current_issue_and_those_published_during_it(engine: Engine) -> None:
    assert [n for n in range(1, 6) if covered(engine, n)] == [2, 3]
    assert periods(engine)[0].first_issue == 2
    with transaction(engine) as s:
        assert ledger.unlocked_issues(s, openid=READER) == {2, 3}


def test_an_issue_published_at_the_very_start_is_covered(engine: Engine) -> None:
    start = utcnow() - 5 * DAY
    publish_at(engine, 1, start - DAY)
    publish_at(engine, 2, start)
    topup(engine, READER, 30)
    buy(engine, now=start, key="edge")
    assert covered(engine, 2) and not covered(engine, 1)  # 2 is current at the start


@pytest.mark.usefixtures("timeline")
def test_redeem_of_a_covered_issue_never_charges_and_says_the_pass_covers_it(
        user: WeChatUser, engine: Engine) -> None:
    for n in (2, 3):
        reply = user.send(f"兑换 {n}")
        assert reply["type"] == "news" and f"/read/{n}?" in reply["url"]
        assert "你的会员卡包含本期，无需兑换，未扣豆。" in reply["description"]
    assert balance(engine, READER) == 170 and entries(engine, "redeem") == []
    for n in (1, 4, 5):  # outside the pass: charged as ever
        assert "扣除 30 豆" in user.send(f"兑换 {n}")["description"]
    assert balance(engine, READER) == 80 and len(entries(engine, "redeem")) == 3
    with transaction(engine) as s:
        assert s.exec(select(func.count()).select_from(Entitlement)).one() == 3
        assert ledger.check(s) == []


@pytest.mark.usefixtures("timeline")
def test_redeem_in_storage_returns_pass_for_a_covered_issue(engine: Engine) -> None:
    """The decision on both redeem paths (PostgreSQL's single statement, SQLite's savepoint):
    run this file with NEWSBOT_TEST_DATABASE_URL for the former."""
    with transaction(engine) as s:
        result = ledger.redeem(s, openid=READER, issue_number=3, price=30, key="r3")
        assert (result.status, result.entry, result.balance) == ("pass", None, 170)
        assert ledger.redeem(s, openid=READER, issue_number=1, price=30,
                             key="r1").status == "unlocked"
    assert balance(engine, READER) == 140


def spy_read_only(routers: tuple[Router, ...] = ROUTERS) -> tuple[list[bool], tuple[Router, ...]]:
    """A reads-only spy in front of ``routers``: what it records says on which path each
    message was answered (True alone: the read path, start to finish)."""
    seen: list[bool] = []
    spy = Router("spy")

    @spy.message()
    @reads_only
    def _spy(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> None:
        seen.append(ctx.read_only)
        return None

    return seen, (spy, *routers)


@pytest.mark.usefixtures("timeline")
def test_read_and_card_of_a_covered_issue_on_the_fast_path(
        settings: Settings, engine: Engine) -> None:
    seen, routers = spy_read_only()
    app = bottle.Bottle()
    Webhook(settings, engine, routers=routers).install(app)
    with client_for(app) as http:
        user = WeChatUser(http, READER)
        user.send("帮助")  # the new-issue notice, out of the way
        seen.clear()
        covered_reply = user.send("全文 3")
        uncovered = user.send("全文 1")
        card = user.send("第3期")["content"]
    assert seen == [True, True, True]  # all answered on the read path
    assert "本期在你的会员卡有效期内，已包含" in card
    assert covered_reply["type"] == "news" and "/read/3?" in covered_reply["url"]
    assert covered_reply["description"].startswith("你的会员卡包含本期。")
    assert uncovered["type"] == "text" and "尚未解锁" in uncovered["content"]


@pytest.mark.usefixtures("timeline")
def test_the_reader_page_opens_for_a_covered_issue_and_not_for_others(
        settings: Settings, http: httpx.Client) -> None:
    links = ReaderLinks(settings)
    for n in (2, 3):
        page = http.get(links.url(READER, n))
        assert page.status_code == 200
        assert f"第{n}期第19段的内容" in page.text and "免费试读到此结束" not in page.text
    for n in (1, 4):
        page = http.get(links.url(READER, n))
        assert page.status_code == 200
        assert f"第{n}期第19段的内容" not in page.text and "免费试读到此结束" in page.text
        assert f'<span class="cmd">兑换 {n}</span>' in page.text
    # Another reader's link to a covered issue opens nothing: the pass is the reader's.
    other = http.get(links.url("o_someone_else", 3))
    assert "第3期第19段的内容" not in other.text


# --- the card and 余额 --------------------------------------------------------------------------


def test_the_card_shows_the_pass_instead_of_the_price(
        user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 30)
    user.send("开通 月卡")
    [period] = periods(engine)
    card = user.send("本周")["content"]
    assert f"🎫 会员卡有效至 {local(period.ends_at)}，本期已包含" in card
    assert "价格" not in card and "兑换 1" not in card and "回复「全文 1」阅读全部内容" in card


def test_the_card_of_an_unaffordable_issue_offers_the_passes(
        user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 5)
    card = user.send("第1期")["content"]
    assert "还差 25 豆" in card and "「开通 月卡」30 天内每期全文，30 豆" in card


@pytest.mark.usefixtures("timeline")
def test_the_card_of_an_issue_from_a_pass_that_ran_out_still_says_it_is_included(
        user: WeChatUser) -> None:
    card = user.send("第3期")["content"]
    assert "本期在你的会员卡有效期内，已包含" in card and "价格" not in card
    assert "价格 30 豆" in user.send("第4期")["content"]


def test_balance_shows_the_running_pass_and_its_purchase(
        user: WeChatUser, engine: Engine) -> None:
    topup(engine, READER, 60)
    user.send("开通 月卡")
    user.send("开通 月卡")
    _, second = periods(engine)
    content = user.send("余额")["content"]
    assert f"🎫 会员卡：月卡，有效至 {local(second.ends_at)}" in content
    assert content.count("会员卡 -30 豆（月卡 30 天）") == 2


def test_the_end_date_follows_the_configured_time_zone(engine: Engine) -> None:
    topup(engine, READER, 30)
    berlin = pass_settings(MONTH, broadcast={"timezone": "Europe/Berlin"})
    with client_for(create_app(berlin, engine)) as http:
        content = WeChatUser(http, READER).send("开通 月卡")["content"]
    [period] = periods(engine)
    until = period.ends_at.astimezone(ZoneInfo("Europe/Berlin"))
    assert f"有效至 {until:%Y-%m-%d %H:%M}（Europe/Berlin）" in content
