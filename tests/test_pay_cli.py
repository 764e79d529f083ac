"""`newsbot pay …` through the real CLI against the fake WeChat Pay: orders, show, sync, and
refunds that debit the tokens in the same transaction that records them, before WeChat Pay is
asked, and that never write anything when refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func
from sqlmodel import select
from typer.testing import CliRunner, Result

from bot.cli import app as cli_app
from bot.pay.client import PayClient
from bot.pay.fake import FakeWeChatPay
from storage import ledger, payments
from storage.db import transaction
from storage.models import LedgerEntry, PayOrder, PayRefund
from tests.conftest import TOKEN
from tests.pay_orders_support import PAYER, make_order
from tests.pay_support import eventually, identity, web
from tests.test_pay_sync import OLD


def _toml(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def write_config(tmp_path: Path, engine: Engine, api_base: str | None) -> Path:
    url = engine.url.render_as_string(hide_password=False)
    text = (f'[wechat]\ntoken = "{TOKEN}"\napp_id = "{identity().app_id}"\n'
            f'[reader]\nsecret = "test-reader-secret-0123"\n[database]\nurl = {_toml(url)}\n'
            '[broadcast]\nscheduler = false\n')
    if api_base is not None:
        table = identity().pay_table(tmp_path / "paykeys", api_base)
        packages = table.pop("packages")
        text += "[pay]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items())
        for package in packages:
            text += "[[pay.packages]]\n" + "".join(f"{k} = {_toml(v)}\n"
                                                   for k, v in package.items())
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def fake() -> Iterator[FakeWeChatPay]:
    with FakeWeChatPay(identity(), retry_scale=0.0001, refund_delay_s=0.05) as f:
        yield f


@pytest.fixture
def config(tmp_path: Path, engine: Engine, fake: FakeWeChatPay) -> Path:
    return write_config(tmp_path, engine, fake.base_url)


@pytest.fixture
def client(fake: FakeWeChatPay, config: Path) -> Iterator[PayClient]:
    from bot.settings import load_settings

    pay = load_settings(config).pay
    assert pay is not None
    with PayClient.from_settings(pay, http=web(), sleep=lambda s: None) as c:
        yield c


def cli(config: Path, *args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(cli_app, [*args, "--config", str(config)])


def paid_order(engine: Engine, client: PayClient, fake: FakeWeChatPay, config: Path,
               **kwargs: Any) -> PayOrder:
    """An order paid at the fake whose notification never came, credited by `pay sync`."""
    order = make_order(engine, created=False, age=OLD, **kwargs)
    prepay = client.submit_order(order.kind, order.request_json)
    with transaction(engine) as s:
        payments.mark_created(s, out_trade_no=order.out_trade_no, prepay_id=prepay)
    fake.misbehave_next("drop")
    fake.pay(order.out_trade_no, openid=order.openid)
    synced = cli(config, "pay", "sync")
    assert synced.exit_code == 0, synced.output
    assert f"{order.out_trade_no}: credited +99 豆" in synced.stdout
    return order


def balance(engine: Engine, openid: str = PAYER) -> int:
    with transaction(engine) as s:
        return ledger.get_balance(s, openid=openid)


def snapshot(engine: Engine) -> tuple[int, int, list[tuple[str, str, int]]]:
    """Everything a refund could write: entries, refunds, orders' state."""
    with transaction(engine) as s:
        entries = int(s.exec(select(func.count()).select_from(LedgerEntry)).one())
        refunds = int(s.exec(select(func.count()).select_from(PayRefund)).one())
        orders = [(o.out_trade_no, o.status, o.refunded_fen)
                  for o in payments.list_orders(s)]
    return entries, refunds, orders


def test_without_pay_every_command_exits_2(tmp_path: Path, engine: Engine) -> None:
    config = write_config(tmp_path, engine, None)
    for args in (["orders"], ["show", "NB1"], ["sync"], ["refund", "NB1", "--reason", "x"]):
        result = cli(config, "pay", *args)
        assert result.exit_code == 2, (args, result.output)
        assert "configure [pay]" in result.stderr


def test_orders_show_and_sync(engine: Engine, client: PayClient, fake: FakeWeChatPay,
                              config: Path) -> None:
    order = paid_order(engine, client, fake, config)
    waiting = make_order(engine, openid="o_other_0001")
    listed = cli(config, "pay", "orders", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {r["out_trade_no"]: r for r in json.loads(listed.stdout)}
    assert rows[order.out_trade_no]["status"] == "paid"
    assert rows[order.out_trade_no]["amount_yuan"] == "9.90"
    assert rows[waiting.out_trade_no]["status"] == "pending"
    only = cli(config, "pay", "orders", "--status", "paid")
    assert only.exit_code == 0 and order.out_trade_no in only.stdout
    assert waiting.out_trade_no not in only.stdout
    assert cli(config, "pay", "orders", "--status", "bogus").exit_code == 2
    shown = cli(config, "pay", "show", order.out_trade_no)
    assert shown.exit_code == 0, shown.output
    assert "paid, jsapi, 99 豆 for ¥9.90" in shown.stdout and "pay +99 豆" in shown.stdout
    assert cli(config, "pay", "show", "NBnothing").exit_code == 1


def test_a_full_refund_debits_first_then_follows_wechat(
        engine: Engine, client: PayClient, fake: FakeWeChatPay, config: Path) -> None:
    order = paid_order(engine, client, fake, config)
    fake.misbehave_next("drop")  # the REFUND.SUCCESS notification never comes
    result = cli(config, "pay", "refund", order.out_trade_no, "--reason", "test refund")
    assert result.exit_code == 0, result.output
    assert "processing" in result.stdout and "-99 豆" in result.stdout
    assert balance(engine) == 0
    no = f"{order.out_trade_no}R1"
    eventually(lambda: fake.refunds[no].status == "SUCCESS")
    assert cli(config, "pay", "sync").exit_code == 0
    with transaction(engine) as s:
        refund = payments.get_refund(s, out_refund_no=no)
        assert refund is not None and refund.status == "success" and refund.tokens == 99
        assert payments.require_order(s, out_trade_no=order.out_trade_no).status == "refunded"
        assert ledger.check(s) == []
    again = cli(config, "pay", "refund", order.out_trade_no, "--reason", "again")
    assert again.exit_code == 2 and "refunded in full already" in again.stderr


def test_partial_refunds_take_back_tokens_in_proportion(
        engine: Engine, client: PayClient, fake: FakeWeChatPay, config: Path) -> None:
    order = paid_order(engine, client, fake, config)
    first = cli(config, "pay", "refund", order.out_trade_no, "--amount", "500", "--reason", "a")
    assert first.exit_code == 0, first.output
    too_much = cli(config, "pay", "refund", order.out_trade_no, "--amount", "491",
                   "--reason", "b")
    assert too_much.exit_code == 2 and "nothing written" in too_much.stderr
    rest = cli(config, "pay", "refund", order.out_trade_no, "--reason", "c")
    assert rest.exit_code == 0, rest.output
    with transaction(engine) as s:
        tokens = [r.tokens for r in payments.list_refunds(s, out_trade_no=order.out_trade_no)]
        assert ledger.check(s) == []
    assert tokens == [50, 49] and balance(engine) == 0


def test_spent_tokens_refuse_the_refund_unless_forced(
        engine: Engine, client: PayClient, fake: FakeWeChatPay, config: Path) -> None:
    order = paid_order(engine, client, fake, config)
    with transaction(engine) as s:  # 50 of the 99 spent
        ledger.credit(s, openid=PAYER, amount=-50, kind="adjust", key="spend", reason="spent")
    before = snapshot(engine)
    refused = cli(config, "pay", "refund", order.out_trade_no, "--reason", "test")
    assert refused.exit_code == 2, refused.output
    assert "spent" in refused.stderr and "nothing written" in refused.stderr
    assert snapshot(engine) == before and fake.refunds == {}
    forced = cli(config, "pay", "refund", order.out_trade_no, "--reason", "test", "--force")
    assert forced.exit_code == 0, forced.output
    assert "-49 豆, forced" in forced.stdout
    assert balance(engine) == 0
    with transaction(engine) as s:
        assert ledger.check(s) == []


@pytest.mark.parametrize("args", [
    ["NBnothing", "--reason", "x"], ["{paid}", "--reason", " "],
    ["{paid}", "--reason", "x", "--amount", "0"], ["{paid}", "--reason", "x", "--amount", "991"],
    ["{pending}", "--reason", "x"]], ids=["unknown", "no-reason", "zero", "too-much", "unpaid"])
def test_refunds_refused_write_nothing(engine: Engine, client: PayClient,
                                       fake: FakeWeChatPay, config: Path,
                                       args: list[str]) -> None:
    paid = paid_order(engine, client, fake, config)
    pending = make_order(engine, openid="o_other_0001")
    before = snapshot(engine)
    filled = [a.format(paid=paid.out_trade_no, pending=pending.out_trade_no) for a in args]
    result = cli(config, "pay", "refund", *filled)
    assert result.exit_code == 2, result.output
    assert snapshot(engine) == before and fake.refunds == {}


def test_wechat_down_keeps_the_refund_for_sync_and_refuses_a_second(
        engine: Engine, client: PayClient, fake: FakeWeChatPay, config: Path) -> None:
    order = paid_order(engine, client, fake, config)
    fake.fail_next(status=503, times=3, path="/v3/refund/domestic/refunds")
    down = cli(config, "pay", "refund", order.out_trade_no, "--amount", "500", "--reason", "x")
    assert down.exit_code == 1, down.output
    assert "`newsbot pay sync` resends it" in down.stderr
    assert balance(engine) == 49  # debited before asking
    twice = cli(config, "pay", "refund", order.out_trade_no, "--amount", "490", "--reason", "y")
    assert twice.exit_code == 2 and "has not reached WeChat Pay yet" in twice.stderr
    synced = cli(config, "pay", "sync")
    assert synced.exit_code == 0, synced.output
    assert f"refund {order.out_trade_no}R1: processing" in synced.stdout
    assert list(fake.refunds) == [f"{order.out_trade_no}R1"]


def test_a_refund_wechat_refuses_gives_the_tokens_back(
        engine: Engine, client: PayClient, fake: FakeWeChatPay, config: Path) -> None:
    order = paid_order(engine, client, fake, config)
    fake.fail_next(status=403, code="NOT_ENOUGH", path="/v3/refund/domestic/refunds")
    refused = cli(config, "pay", "refund", order.out_trade_no, "--reason", "x")
    assert refused.exit_code == 1, refused.output
    assert "NOT_ENOUGH" in refused.stderr and "given back" in refused.stderr
    assert balance(engine) == 99
    with transaction(engine) as s:
        assert payments.require_order(s, out_trade_no=order.out_trade_no).status == "paid"
        assert ledger.check(s) == []


def test_revenue_shows_wechat_pay_in_tokens_and_yuan(
        engine: Engine, client: PayClient, fake: FakeWeChatPay, config: Path) -> None:
    order = paid_order(engine, client, fake, config)
    assert cli(config, "pay", "refund", order.out_trade_no, "--amount", "500",
               "--reason", "x").exit_code == 0
    report = cli(config, "revenue", "--json")
    assert report.exit_code == 0, report.output
    data = json.loads(report.stdout)
    assert (data["in"]["wechat_pay"], data["in"]["wechat_pay_refunds"]) == (99, -50)
    assert data["money"] == {"orders": 1, "paid_fen": 990, "refunds": 1, "refunded_fen": 500,
                             "net_fen": 490}
    assert data["outstanding"] == 49
    text = cli(config, "revenue")
    assert "WeChat Pay (1 orders, ¥9.90)" in text.stdout
    assert cli(config, "ledger", "check").exit_code == 0


@pytest.mark.parametrize(("corruption", "problem"), [
    ("UPDATE pay_order SET credit_entry_id = NULL", "is paid without its credit"),
    ("UPDATE pay_order SET credit_entry_id = NULL", "belongs to 0 orders"),
    ("UPDATE ledger_entry SET amount = 98 WHERE kind = 'pay'", "not its credit of +99"),
    ("UPDATE pay_order SET status = 'pending'", "is pending but was credited"),
], ids=["order-without-credit", "credit-without-order", "credit-of-another-amount",
        "credited-but-unpaid"])
def test_ledger_check_traces_every_wechat_pay_credit(
        engine: Engine, client: PayClient, fake: FakeWeChatPay, config: Path,
        corruption: str, problem: str) -> None:
    paid_order(engine, client, fake, config)
    assert cli(config, "ledger", "check").exit_code == 0
    with engine.begin() as conn:
        from sqlalchemy import text

        conn.execute(text(corruption))
        if "amount = 98" in corruption:  # keep the balance in step: only the trace breaks
            conn.execute(text("UPDATE subscriber SET balance = balance - 1"))
    check = cli(config, "ledger", "check")
    assert check.exit_code == 1 and problem in check.stderr, check.output
