"""Gifts (issue 8 §3) through the real WSGI app: a giver pays for an issue or a pass with their
own tokens and gets a single-use code; the first friend to send it gets the gift; a friend who
already owns the issue leaves the code unused; 余额 tells the giver what became of each gift;
and every refusal (free issue, unknown issue, codes off, too few tokens) has its own answer
with nothing written."""

from __future__ import annotations

import re

import httpx
import pytest
from sqlalchemy import Engine, func
from sqlmodel import select

from bot.app import create_app
from bot.settings import Settings
from storage import codes, gifts
from storage.db import transaction
from storage.errors import InsufficientBalance
from storage.models import CodeBatch, CodeFailure, Entitlement, LedgerEntry, PassPeriod
from tests.conftest import CODES_SECRET, WeChatUser, client_for, make_settings
from tests.test_chat_replies import add_issue, balance, topup

SECRET = CODES_SECRET.encode()
GIVER, FRIEND, THIRD = "o_giver_00001", "o_friend_0001", "o_third_00001"
CODE = re.compile(r"[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}")


@pytest.fixture
def settings() -> Settings:
    return make_settings(passes=[{"id": "month", "name": "月卡", "days": 30, "price": 300}])


@pytest.fixture
def people(http: httpx.Client, engine: Engine) -> tuple[WeChatUser, WeChatUser, WeChatUser]:
    add_issue(engine, 3, price=99)
    users = (WeChatUser(http, GIVER), WeChatUser(http, FRIEND), WeChatUser(http, THIRD))
    for u in users:
        u.send("hi")
    topup(engine, GIVER, 500)
    return users


def code_in(reply: dict[str, str]) -> str:
    found = CODE.search(reply["content"])
    assert found, reply
    return found.group(0)


def count(engine: Engine, model: type, **where: object) -> int:
    with transaction(engine) as s:
        stmt = select(func.count()).select_from(model)
        for k, v in where.items():
            stmt = stmt.where(getattr(model, k) == v)
        return int(s.exec(stmt).one())


def test_gift_of_an_issue_from_purchase_to_redemption(people, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    giver, friend, third = people
    bought = giver.send("赠送 3")
    code = code_in(bought)
    assert "扣除 99 豆，余额 401 豆" in bought["content"]
    assert "让朋友把这个码发给本公众号即可领取" in bought["content"]
    with transaction(engine) as s:
        entry = s.exec(select(LedgerEntry).where(LedgerEntry.kind == "gift")).one()
        b = s.exec(select(CodeBatch)).one()
        assert (entry.amount, entry.issue_number, entry.openid) == (-99, 3, GIVER)
        assert (b.giver, b.gift_entry_id, b.count, b.uses) == (GIVER, entry.id, 1, 1)
    status = giver.send("余额")["content"]
    assert "我送出的礼物" in status and f"第3期：未领取，礼品码 {code}" in status, status
    assert "赠送 -99 豆（第3期）" in status

    got = friend.send(code)
    assert got["type"] == "news" and "/read/3" in got["url"] and "兑换成功" in got["description"]
    assert balance(engine, FRIEND) == 0 and balance(engine, GIVER) == 401
    status = giver.send("余额")["content"]
    assert "第3期：已领取" in status and code not in status, status
    assert "已经被使用过" in third.send(code)["content"]
    with transaction(engine) as s:
        assert s.exec(select(Entitlement.openid)).all() == [FRIEND]


def test_a_friend_who_owns_the_issue_leaves_the_code_for_someone_else(
        people, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    giver, friend, third = people
    topup(engine, FRIEND, 99, key="friend")
    assert friend.send("兑换 3")["type"] == "news"
    code = code_in(giver.send("送 3"))
    owned = friend.send(code)["content"]
    assert "你已经可以阅读第3期全文" in owned and "仍可转送给朋友" in owned, owned
    assert count(engine, CodeFailure) == 0
    assert "未领取" in giver.send("余额")["content"]
    assert third.send(code)["type"] == "news"
    assert "已领取" in giver.send("余额")["content"]


def test_the_giver_cannot_redeem_their_own_gift(people, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    giver, friend, _ = people
    code = code_in(giver.send("gift 3"))
    own = giver.send(code)["content"]
    assert "这是你送出的礼品码" in own and "没有被使用" in own, own
    assert count(engine, CodeFailure) == 0 and count(engine, Entitlement) == 0
    assert friend.send(code)["type"] == "news"


def test_gift_of_a_pass(people, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    giver, friend, _ = people
    bought = giver.send("赠送 月卡")
    code = code_in(bought)
    assert "月卡（30 天），扣除 300 豆，余额 200 豆" in bought["content"], bought
    got = friend.send(code.lower())["content"]
    assert "月卡（30 天）已开通" in got, got
    with transaction(engine) as s:
        period = s.exec(select(PassPeriod)).one()
        assert (period.openid, period.source, period.pass_id) == (FRIEND, "gift", "month")
    assert "月卡：已领取" in giver.send("余额")["content"]
    # By id too, and 送 with the pass's name.
    assert CODE.search(giver.send("赠送 MONTH")["content"]) is None  # 200 < 300
    assert balance(engine, GIVER) == 200


@pytest.mark.parametrize("command", ["赠送 3", "赠送第3期", "送 3", "gift 3", "赠送 第三期",
                                     "送给朋友 3"])
def test_every_way_to_ask(people, engine: Engine, command: str) -> None:  # type: ignore[no-untyped-def]
    assert CODE.search(people[0].send(command)["content"]), command
    assert balance(engine, GIVER) == 401


def test_refusals_each_have_their_answer_and_write_nothing(people, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    giver, friend, _ = people
    add_issue(engine, 5, price=0)
    add_issue(engine, 6, publish=False)
    free = giver.send("赠送 5")["content"]
    assert "是免费的" in free and "「全文 5」" in free, free
    assert "没有找到第9期" in giver.send("赠送 9")["content"]
    assert "没有找到第6期" in giver.send("赠送 6")["content"]  # not published yet
    short = friend.send("赠送 3")["content"]
    assert "还差 99 豆" in short and "有兑换码？" in short and "「赠送 3」" in short, short
    short_pass = friend.send("赠送 月卡")["content"]
    assert "还差 300 豆" in short_pass and "会员卡" in short_pass, short_pass
    unknown = giver.send("赠送 年卡")["content"]
    assert "没有找到可赠送的「年卡」" in unknown and "「赠送 月卡」" in unknown, unknown
    assert "收到，编辑会尽快回复" in giver.send("送你一朵花")["content"]  # a message: the inbox
    assert count(engine, CodeBatch) == 0 and count(engine, LedgerEntry, kind="gift") == 0
    assert balance(engine, GIVER) == 500 and balance(engine, FRIEND) == 0


def test_codes_off_means_no_gifts(engine: Engine) -> None:
    add_issue(engine, 3)
    settings = make_settings()
    settings = settings.model_copy(update={"codes": settings.codes.model_copy(
        update={"secret": ""})})
    with client_for(create_app(settings, engine)) as http:
        giver = WeChatUser(http, GIVER)
        giver.send("hi")
        topup(engine, GIVER, 500)
        assert "暂时不能赠送" in giver.send("赠送 3")["content"]
    assert balance(engine, GIVER) == 500 and count(engine, CodeBatch) == 0


def test_a_retried_delivery_gets_the_same_code_and_pays_once(people, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    giver = people[0]
    xml = giver.text_xml("赠送 3", msg_id=777)
    first = giver.post_xml(xml).text
    assert all(giver.post_xml(xml).text == first for _ in range(3))
    assert balance(engine, GIVER) == 401 and count(engine, CodeBatch) == 1


def test_buy_gift_replays_by_key(people, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    """Guard: the gift's code comes from its key. A replay of the key returns the very same
    code instead of a second debit or a code that was never stored."""
    with transaction(engine) as s:
        one = gifts.buy_gift(s, giver=GIVER, secret=SECRET, key="k", issue_number=3,
                             issue_price=99)
    with transaction(engine) as s:
        two = gifts.buy_gift(s, giver=GIVER, secret=SECRET, key="k", issue_number=3,
                             issue_price=99)
        assert codes.find_code(s, secret=SECRET, code=codes.canonical(two.code) or "")
    assert (one.replayed, two.replayed) == (False, True) and one.code == two.code
    assert balance(engine, GIVER) == 401 and count(engine, CodeBatch) == 1


def test_too_few_tokens_writes_nothing(people, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InsufficientBalance) as err, transaction(engine) as s:
        gifts.buy_gift(s, giver=FRIEND, secret=SECRET, key="k2", pass_id="month",
                       pass_days=30, pass_price=300)
    assert err.value.shortfall == 300
    assert count(engine, CodeBatch) == 0 and count(engine, LedgerEntry, kind="gift") == 0


def test_a_rotated_secret_hides_the_old_code(people, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    """余额 shows a gift's code only if the current secret still makes it."""
    code = code_in(people[0].send("赠送 3"))
    with transaction(engine) as s:
        mine = gifts.given(s, giver=GIVER, secret=SECRET)
        other = gifts.given(s, giver=GIVER, secret=b"rotated-secret-0123456789")
    assert [g.code for g in mine] == [code] and [g.code for g in other] == [None]
