"""storage.payments on its own: orders, the request body kept for retries, and settling
exactly once (the endpoint and the job are tested through the app in test_pay_*.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from storage import ledger, payments
from storage.db import transaction
from storage.subscribers import ensure_subscriber

OPENID = "o_payer_0001"
PACKAGE = ("p99", 99, 990)


@dataclass(frozen=True)
class Tx:
    out_trade_no: str
    trade_state: str = "SUCCESS"
    appid: str = "wx_app"
    mchid: str = "1900000001"
    transaction_id: str | None = "4200000001"
    total_fen: int | None = 990
    currency: str | None = "CNY"
    payer_openid: str | None = OPENID


def _order(engine: Engine, *, kind: str = "jsapi", issue: int | None = None) -> str:
    with transaction(engine) as s:
        ensure_subscriber(s, openid=OPENID)
        order = payments.new_order(s, openid=OPENID, package=PACKAGE, kind=kind,
                                   issue_number=issue, app_id="wx_app", mch_id="1900000001",
                                   notify_url="https://example.com/pay/notify",
                                   ttl=timedelta(minutes=30), description="99 豆")
        return order.out_trade_no


def test_new_order_keeps_the_exact_body(engine: Engine) -> None:
    no = _order(engine)
    with transaction(engine) as s:
        order = payments.get_order(s, out_trade_no=no)
        assert order is not None and order.status == "creating"
        assert len(no) <= 32 and no.startswith("NB")
        body = json.loads(order.request_json)
        assert list(body) == ["appid", "mchid", "description", "out_trade_no", "notify_url",
                              "time_expire", "amount", "payer"]
        assert body["amount"] == {"total": 990, "currency": "CNY"}
        assert body["payer"] == {"openid": OPENID}
        assert body["time_expire"].endswith("+08:00")
        assert payments.dump_body(body) == order.request_json
        payments.mark_created(s, out_trade_no=no, prepay_id="wx_prepay_1")
    with transaction(engine) as s:
        order = payments.get_order(s, out_trade_no=no)
        assert order is not None and (order.status, order.prepay_id) == ("pending", "wx_prepay_1")
        assert payments.order_state_for(s, out_trade_no=no, openid="o_someone_else") is None
        assert payments.order_state_for(s, out_trade_no=no, openid=OPENID) is not None


def test_settle_credits_once(engine: Engine) -> None:
    no = _order(engine)
    with transaction(engine) as s:
        first = payments.settle(s, out_trade_no=no, transaction=Tx(no))
    with transaction(engine) as s:
        again = payments.settle(s, out_trade_no=no, transaction=Tx(no))
        assert ledger.get_balance(s, openid=OPENID) == 99
        assert ledger.check(s) == []
    assert (first.outcome, first.tokens, first.balance) == ("credited", 99, 99)
    assert again.outcome == "already" and again.order.status == "paid"
    assert first.order.credit_entry_id is not None


@pytest.mark.parametrize("change", [
    {"total_fen": 1}, {"currency": "USD"}, {"mchid": "1900000002"}, {"appid": "wx_other"},
    {"payer_openid": "o_other"}, {"out_trade_no": "NBsomethingelse"}])
def test_settle_refuses_what_is_not_our_order(engine: Engine, change: dict[str, Any]) -> None:
    no = _order(engine)
    with transaction(engine) as s, pytest.raises(payments.PaymentMismatch):
        payments.settle(s, out_trade_no=no, transaction=replace(Tx(no), **change))
    with transaction(engine) as s:
        assert ledger.get_balance(s, openid=OPENID) == 0
        order = payments.get_order(s, out_trade_no=no)
        assert order is not None and order.status == "creating"


def test_native_order_credits_whoever_scanned(engine: Engine) -> None:
    no = _order(engine, kind="native")
    with transaction(engine) as s:
        done = payments.settle(s, out_trade_no=no,
                               transaction=replace(Tx(no), payer_openid="o_scanner"))
        assert done.credited and ledger.get_balance(s, openid=OPENID) == 99


def test_unknown_and_unpaid(engine: Engine) -> None:
    no = _order(engine)
    with transaction(engine) as s:
        with pytest.raises(payments.UnknownOrder):
            payments.settle(s, out_trade_no="NBnope", transaction=Tx("NBnope"))
        unpaid = payments.settle(s, out_trade_no=no,
                                 transaction=replace(Tx(no), trade_state="NOTPAY",
                                                     total_fen=None))
        assert unpaid.outcome == "not_paid" and ledger.get_balance(s, openid=OPENID) == 0


def test_a_payer_without_a_subscriber_row_is_still_credited(engine: Engine) -> None:
    with transaction(engine) as s:
        order = payments.new_order(s, openid="o_new_payer", package=PACKAGE, kind="native",
                                   app_id="wx_app", mch_id="1900000001",
                                   notify_url="https://example.com/pay/notify",
                                   ttl=timedelta(minutes=30))
    with transaction(engine) as s:
        done = payments.settle(s, out_trade_no=order.out_trade_no,
                               transaction=Tx(order.out_trade_no))
    with transaction(engine) as s:
        assert done.credited and ledger.get_balance(s, openid="o_new_payer") == 99
        stored = payments.require_order(s, out_trade_no=order.out_trade_no)
        assert stored.credit_entry_id == done.order.credit_entry_id is not None
        assert ledger.check(s) == []
