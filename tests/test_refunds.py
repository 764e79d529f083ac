"""Refunds (issue 8 §4): `newsbot refund OPENID ISSUE` and `newsbot refund OPENID --pass ID`
through the real CLI, the storage functions where time must be moved, and the chat afterwards
(a refunded issue can be bought again; a refunded pass no longer covers the days given back).
Every refusal exits 2 and writes nothing; a repeated key (given or default) refunds once."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func
from sqlmodel import select

from bot.settings import Settings
from storage import ledger, passes, refunds
from storage.db import transaction
from storage.errors import IdempotencyConflict
from storage.models import Entitlement, LedgerEntry, PassPeriod, utcnow
from storage.refunds import NothingToRefund
from tests.conftest import WeChatUser
from tests.test_pass_cli import cli, pass_config
from tests.test_passes import MONTH, buy, pass_settings, periods, publish_at
from tests.test_webhook import READER, add_issue, balance, topup

DAY = timedelta(days=1)


@pytest.fixture
def settings() -> Settings:
    return pass_settings(MONTH)


@pytest.fixture
def config(tmp_path: Path, engine: Engine) -> Path:
    return pass_config(tmp_path, engine)


@pytest.fixture
def user(http: httpx.Client) -> WeChatUser:
    return WeChatUser(http, READER)


def snapshot(engine: Engine) -> tuple[object, ...]:
    """Everything a refund may touch: entries, unlocks, periods."""
    with transaction(engine) as s:
        entries = [(e.id, e.amount, e.kind) for e in s.exec(select(LedgerEntry)).all()]
        unlocks = int(s.exec(select(func.count()).select_from(Entitlement)).one())
        cuts = [(p.id, p.cut_at, p.refund_entry_id) for p in s.exec(select(PassPeriod)).all()]
    return entries, unlocks, cuts


def refunded(engine: Engine) -> list[LedgerEntry]:
    with transaction(engine) as s:
        return list(s.exec(select(LedgerEntry).where(LedgerEntry.kind == "refund")
                           .order_by(LedgerEntry.id)).all())  # type: ignore[arg-type]


def unlocked(engine: Engine, number: int) -> bool:
    with transaction(engine) as s:
        return ledger.has_entitlement(s, openid=READER, issue_number=number)


def books_balance(engine: Engine) -> list[ledger.Mismatch]:
    with transaction(engine) as s:
        return ledger.check(s)


# --- an issue ---------------------------------------------------------------------------------


@pytest.fixture
def bought_issue(engine: Engine, user: WeChatUser) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 50)
    assert "扣除 30 豆" in user.send("兑换 1")["description"]


@pytest.mark.usefixtures("bought_issue")
def test_an_issue_refund_gives_the_tokens_back_and_withdraws_the_unlock(
        config: Path, engine: Engine, user: WeChatUser) -> None:
    done = cli(config, "refund", READER, "1", "--reason", "wrong issue")
    assert done.exit_code == 0, done.output
    assert "refunded issue 1" in done.stdout and "+30 豆, balance now 50 豆" in done.stdout
    [entry] = refunded(engine)
    with transaction(engine) as s:
        [charge] = s.exec(select(LedgerEntry).where(LedgerEntry.kind == "redeem")).all()
    assert (entry.amount, entry.issue_number, entry.refers_to, entry.operator,
            entry.reason) == (30, 1, charge.id, "cli", "wrong issue")
    assert charge.amount == -30  # the old entry is untouched
    assert not unlocked(engine, 1) and balance(engine, READER) == 50
    # The page and 全文 are closed again; buying again charges again and unlocks again.
    assert "尚未解锁" in user.send("全文 1")["content"]
    assert "扣除 30 豆" in user.send("兑换 1")["description"]
    assert unlocked(engine, 1) and balance(engine, READER) == 20


@pytest.mark.usefixtures("bought_issue")
def test_running_the_same_refund_twice_refunds_once(config: Path, engine: Engine) -> None:
    first = cli(config, "refund", READER, "1", "--reason", "r")
    again = cli(config, "refund", READER, "1", "--reason", "r")
    assert first.exit_code == 0 and again.exit_code == 0, again.output
    assert "already refunded" in again.stdout and "nothing new written" in again.stdout
    assert len(refunded(engine)) == 1 and balance(engine, READER) == 50


@pytest.mark.usefixtures("bought_issue")
def test_a_refund_of_an_unlock_bought_again_is_a_new_refund(
        config: Path, engine: Engine, user: WeChatUser) -> None:
    assert cli(config, "refund", READER, "1", "--reason", "r").exit_code == 0
    user.send("兑换 1")
    done = cli(config, "refund", READER, "1", "--reason", "r")
    assert done.exit_code == 0 and "refunded issue 1" in done.stdout, done.output
    assert len(refunded(engine)) == 2 and balance(engine, READER) == 50
    assert not unlocked(engine, 1)


@pytest.mark.usefixtures("bought_issue")
def test_a_given_key_refunds_once_and_refuses_another_target(
        config: Path, engine: Engine) -> None:
    first = cli(config, "refund", READER, "1", "--reason", "r", "--key", "ticket-4")
    printed = re.search(r"key: (\S+)", first.stdout)
    assert first.exit_code == 0 and printed is not None and printed.group(1) == "cli:ticket-4"
    for key in ("ticket-4", "cli:ticket-4"):
        again = cli(config, "refund", READER, "1", "--reason", "r", "--key", key)
        assert again.exit_code == 0 and "already refunded" in again.stdout
    other = cli(config, "refund", READER, "--pass", "month", "--reason", "r", "--key",
                "ticket-4")
    assert other.exit_code == 2 and "nothing written" in other.output
    assert len(refunded(engine)) == 1


@pytest.mark.usefixtures("bought_issue")
def test_already_refunded_under_another_key_is_refused(config: Path, engine: Engine) -> None:
    assert cli(config, "refund", READER, "1", "--reason", "r", "--key", "a").exit_code == 0
    before = snapshot(engine)
    done = cli(config, "refund", READER, "1", "--reason", "r", "--key", "b")
    assert done.exit_code == 2 and "already_refunded" in done.output, done.output
    assert snapshot(engine) == before


def test_issue_refusals_exit_2_and_write_nothing(config: Path, engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    add_issue(engine, 2, price=30)
    topup(engine, READER, 30)
    with transaction(engine) as s:  # issue 2 unlocked without tokens, as a code does it
        s.add(Entitlement(openid=READER, issue_number=2, code_redemption_id=1))
    cases = [
        (("refund", READER, "1", "--reason", "r"), "no_unlock"),
        (("refund", READER, "2", "--reason", "r"), "not_paid"),
        (("refund", "o_nobody", "1", "--reason", "r"), "no subscriber"),
        (("refund", READER, "1", "--reason", " "), "--reason"),
        (("refund", READER, "--reason", "r"), "either ISSUE or --pass"),
        (("refund", READER, "1", "--pass", "month", "--reason", "r"), "either ISSUE or --pass"),
        (("refund", READER, "x", "--reason", "r"), "not a whole number"),
    ]
    before = snapshot(engine)
    for args, message in cases:
        done = cli(config, *args)
        assert done.exit_code == 2 and message in done.output, (args, done.output)
    assert snapshot(engine) == before


def test_an_issue_read_under_a_pass_is_refused_as_pass_only(
        config: Path, engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 30)
    buy(engine, now=utcnow(), key="p")
    before = snapshot(engine)
    done = cli(config, "refund", READER, "1", "--reason", "r")
    assert done.exit_code == 2 and "pass_only" in done.output and "--pass" in done.output
    assert snapshot(engine) == before


def test_refund_issue_in_storage_is_one_step(engine: Engine) -> None:
    """The refund entry and the withdrawn unlock land together: if the delete fails, the
    credit is rolled back with it even though the caller commits."""
    add_issue(engine, 1, price=30)
    topup(engine, READER, 30)
    with transaction(engine) as s:
        ledger.redeem(s, openid=READER, issue_number=1, price=30, key="r")
    with transaction(engine) as s:
        real_delete = s.delete

        def broken(obj: object) -> None:
            raise RuntimeError("disk full")

        s.delete = broken  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            refunds.refund_issue(s, openid=READER, issue_number=1, reason="r", key="k")
        s.delete = real_delete  # type: ignore[method-assign]
    assert refunded(engine) == [] and balance(engine, READER) == 0 and unlocked(engine, 1)


# --- a pass -----------------------------------------------------------------------------------


def test_a_pass_refund_gives_back_the_unused_whole_days_and_cuts_the_period(
        engine: Engine) -> None:
    topup(engine, READER, 30)
    start = utcnow() - 10 * DAY - timedelta(hours=5)
    period = buy(engine, now=start, key="p").period
    now = utcnow()
    with transaction(engine) as s:
        result = refunds.refund_pass(s, openid=READER, pass_id="month", reason="moving",
                                     key="k", now=now)
    # 30 days bought 10 days 5 hours ago: 19 whole days unused (the 20th has begun).
    [entry] = result.entries
    assert (result.tokens, entry.amount, entry.refers_to, entry.pass_id) == (
        19, 19, period.ledger_entry_id, "month")
    [cut] = periods(engine)
    assert cut.cut_at == period.ends_at - 19 * DAY and cut.refund_entry_id == entry.id
    assert cut.ends_at == period.ends_at  # the period itself is kept as it was bought
    assert balance(engine, READER) == 19 and books_balance(engine) == []
    with transaction(engine) as s:
        held = passes.status(s, openid=READER, now=now)
    assert held is not None and held.until == cut.cut_at  # the begun day stays the reader's


def unused_days_formula_cases() -> list[tuple[int, int, float, int, int]]:
    # price, days, days used, expected unused, expected tokens
    return [(30, 30, 0.5, 29, 29), (300, 365, 100.2, 264, 216), (7, 7, 0, 7, 7),
            (10, 30, 29.5, 0, 0)]


@pytest.mark.parametrize("price, days, used, unused, tokens", unused_days_formula_cases())
def test_the_refund_is_price_times_unused_whole_days_over_days(
        engine: Engine, price: int, days: int, used: float, unused: int, tokens: int) -> None:
    topup(engine, READER, price)
    now = utcnow()
    offer = {"id": "p", "name": "卡", "days": days, "price": price}
    period = buy(engine, now=now - used * DAY, key="p", offer=offer).period
    assert refunds.unused_days(period, now) == unused
    with transaction(engine) as s:
        if tokens == 0:
            with pytest.raises(NothingToRefund) as refused:
                refunds.refund_pass(s, openid=READER, pass_id="p", reason="r", key="k", now=now)
            assert refused.value.reason == "used_up"
        else:
            assert refunds.refund_pass(s, openid=READER, pass_id="p", reason="r", key="k",
                                       now=now).tokens == tokens


def test_a_pass_refund_refunds_each_bought_period_and_a_later_one_whole(
        config: Path, engine: Engine) -> None:
    topup(engine, READER, 60)
    now = utcnow()
    first = buy(engine, now=now - 2 * DAY - timedelta(hours=1), key="a").period
    second = buy(engine, now=now, key="b").period  # starts where the first ends
    done = cli(config, "refund", READER, "--pass", "month", "--reason", "r")
    assert done.exit_code == 0, done.output
    assert "refunded pass month" in done.stdout and "+57 豆" in done.stdout
    one, two = periods(engine)
    assert one.cut_at == first.ends_at - 27 * DAY and two.cut_at == second.starts_at
    assert [e.amount for e in refunded(engine)] == [27, 30]
    assert [e.refers_to for e in refunded(engine)] == [first.ledger_entry_id,
                                                        second.ledger_entry_id]
    with transaction(engine) as s:
        held = passes.status(s, openid=READER)
    assert held is not None and held.until == one.cut_at
    assert balance(engine, READER) == 57 and books_balance(engine) == []


def test_a_pass_refund_cuts_later_issues_and_keeps_the_used_days(
        config: Path, engine: Engine) -> None:
    """Bought 10 days ago: issue 1 (current then) and issue 2 (published on day 3) stay
    readable; an issue published after the cut is not covered."""
    start = utcnow() - 10 * DAY
    publish_at(engine, 1, start - DAY)
    publish_at(engine, 2, start + 3 * DAY)
    topup(engine, READER, 60)
    buy(engine, now=start, key="p")
    assert cli(config, "refund", READER, "--pass", "month", "--reason", "r").exit_code == 0
    [period] = periods(engine)
    assert period.cut_at is not None
    # An issue published after the cut: no longer covered (it would have been before).
    publish_at(engine, 3, period.cut_at)
    with transaction(engine) as s:
        assert passes.covered(s, openid=READER, issue_number=1)
        assert passes.covered(s, openid=READER, issue_number=2)
        assert not passes.covered(s, openid=READER, issue_number=3)
        assert ledger.redeem(s, openid=READER, issue_number=3, price=30,
                             key="r3").status == "unlocked"
    # 60 - 30 for the pass + 19 days back - 30 for issue 3
    assert balance(engine, READER) == 19 and books_balance(engine) == []


def test_a_pass_refund_twice_refunds_once_and_buying_again_works(
        config: Path, engine: Engine, user: WeChatUser) -> None:
    topup(engine, READER, 30)
    buy(engine, now=utcnow(), key="p")
    assert cli(config, "refund", READER, "--pass", "month", "--reason", "r").exit_code == 0
    again = cli(config, "refund", READER, "--pass", "month", "--reason", "r")
    assert again.exit_code == 0 and "already refunded" in again.stdout, again.output
    assert [e.amount for e in refunded(engine)] == [29] and balance(engine, READER) == 29
    # Bought again after the refund: it starts at the cut, and is itself refundable.
    topup(engine, READER, 1, key="top")
    # The begun day stays the reader's, so the new pass follows it.
    assert "月卡已续期 30 天" in user.send("开通 月卡")["content"]
    [old, new] = periods(engine)
    assert new.starts_at == old.cut_at
    assert cli(config, "refund", READER, "--pass", "month", "--reason", "r").exit_code == 0
    assert len(refunded(engine)) == 2 and books_balance(engine) == []


def test_a_pass_refund_is_all_periods_or_none(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    topup(engine, READER, 60)
    buy(engine, now=utcnow(), key="a")
    buy(engine, now=utcnow(), key="b")
    real_post = ledger.post
    calls: list[int] = []

    def second_fails(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("connection lost")
        return real_post(*args, **kwargs)

    monkeypatch.setattr(ledger, "post", second_fails)
    before = snapshot(engine)
    with transaction(engine) as s, pytest.raises(RuntimeError):
        refunds.refund_pass(s, openid=READER, pass_id="month", reason="r", key="k")
    assert len(calls) == 2 and snapshot(engine) == before and balance(engine, READER) == 0


def test_pass_refusals_exit_2_and_write_nothing(config: Path, engine: Engine) -> None:
    topup(engine, READER, 100)
    with transaction(engine) as s:  # a week pass bought long ago and used up
        passes.buy(s, openid=READER, pass_id="week", days=7, price=7, key="w",
                   now=utcnow() - 40 * DAY)
    with transaction(engine) as s:  # a month from a code: nothing paid
        passes.grant(s, openid=READER, pass_id="month", days=30, source="code", key="c")
    cases = [
        (("refund", READER, "--pass", "month", "--reason", "r"), "not_paid"),
        (("refund", READER, "--pass", "week", "--reason", "r"), "used_up"),
        (("refund", READER, "--pass", "year", "--reason", "r"), "no_pass"),
        (("refund", "o_nobody", "--pass", "month", "--reason", "r"), "no subscriber"),
        (("refund", READER, "--pass", "month", "--reason", "r", "--key", "k" * 120),
         "too long"),
    ]
    before = snapshot(engine)
    for args, message in cases:
        done = cli(config, *args)
        assert done.exit_code == 2 and message in done.output, (args, done.output)
    assert snapshot(engine) == before


def test_a_refunded_pass_refused_again_under_a_new_key(engine: Engine) -> None:
    topup(engine, READER, 30)
    buy(engine, now=utcnow(), key="p")
    with transaction(engine) as s:
        refunds.refund_pass(s, openid=READER, pass_id="month", reason="r", key="k1")
    with transaction(engine) as s, pytest.raises(NothingToRefund) as refused:
        refunds.refund_pass(s, openid=READER, pass_id="month", reason="r", key="k2")
    assert refused.value.reason == "already_refunded"
    with transaction(engine) as s, pytest.raises(IdempotencyConflict):
        refunds.refund_issue(s, openid=READER, issue_number=1, reason="r", key="k1")


def test_a_period_is_refunded_once_even_when_asked_about_an_earlier_moment(
        engine: Engine) -> None:
    topup(engine, READER, 30)
    buy(engine, now=utcnow() - 2 * DAY, key="p")
    now = utcnow()
    with transaction(engine) as s:
        assert refunds.refund_pass(s, openid=READER, pass_id="month", reason="r", key="k1",
                                   now=now).tokens == 27
    with transaction(engine) as s, pytest.raises(NothingToRefund) as refused:
        refunds.refund_pass(s, openid=READER, pass_id="month", reason="r", key="k2",
                            now=now - DAY)
    assert refused.value.reason == "already_refunded" and balance(engine, READER) == 27


def test_an_unlock_pointing_at_a_credit_is_never_refunded(engine: Engine) -> None:
    """A refund pays back a redeem charge only: an unlock whose entry is a top-up (a damaged
    row) must not turn into a debit of that top-up."""
    add_issue(engine, 1, price=30)
    topup(engine, READER, 40)
    with transaction(engine) as s:
        [credit] = s.exec(select(LedgerEntry)).all()
        s.add(Entitlement(openid=READER, issue_number=1, ledger_entry_id=credit.id))
    with transaction(engine) as s, pytest.raises(NothingToRefund) as refused:
        refunds.refund_issue(s, openid=READER, issue_number=1, reason="r", key="k")
    assert refused.value.reason == "not_paid" and balance(engine, READER) == 40


def test_a_period_pointing_at_another_charge_is_never_refunded(engine: Engine) -> None:
    """Only the pass debit a period was bought with is paid back, never, say, an unlock's
    charge a damaged row points at (that would refund the issue without withdrawing it)."""
    add_issue(engine, 1, price=30)
    topup(engine, READER, 30)
    with transaction(engine) as s:
        charge = ledger.redeem(s, openid=READER, issue_number=1, price=30, key="r").entry
        assert charge is not None
        passes.grant(s, openid=READER, pass_id="month", days=30, source="purchase", key="p",
                     ledger_entry_id=charge.id)
    with transaction(engine) as s, pytest.raises(NothingToRefund):
        refunds.refund_pass(s, openid=READER, pass_id="month", reason="r", key="k")
    assert balance(engine, READER) == 0


def test_refund_json(config: Path, engine: Engine) -> None:
    topup(engine, READER, 30)
    buy(engine, now=utcnow(), key="p")
    data = json.loads(cli(config, "refund", READER, "--pass", "month", "--reason", "r",
                          "--json").stdout)
    assert data["tokens"] == 29 and data["balance"] == 29 and not data["replayed"]
    assert data["entries"][0]["pass_id"] == "month"


# --- the books --------------------------------------------------------------------------------


@pytest.mark.usefixtures("bought_issue")
def test_ledger_check_stays_clean_after_an_issue_refund(config: Path) -> None:
    assert cli(config, "refund", READER, "1", "--reason", "r").exit_code == 0
    done = cli(config, "ledger", "check")
    assert done.exit_code == 0, done.output
