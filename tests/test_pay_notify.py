"""POST /pay/notify through the real WSGI app: a notification credits exactly once, and
nothing that is not WeChat's word about one of our own orders credits anything."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func
from sqlmodel import select

from bot.app import PAY_NOTIFY, create_app
from bot.pay.client import PayClient
from bot.pay.fake import FakeWeChatPay
from bot.pay.notify import PayNotify
from bot.settings import Settings
from bot.wechat.fake import FakeWeChat
from storage import ledger, payments
from storage.db import transaction
from storage.models import LedgerEntry, PayOrder
from tests.conftest import client_for, make_settings
from tests.pay_orders_support import (
    PAYER,
    loopback_server,
    make_order,
    notification,
    pay_settings,
    refund_resource,
    transaction_resource,
)
from tests.pay_support import eventually, identity, web


@pytest.fixture
def wechat() -> Iterator[FakeWeChat]:
    with FakeWeChat(app_id=identity().app_id,
                    followers=[PAYER, *(f"o_payer_{i:04d}" for i in range(8))]) as fake:
        yield fake


@pytest.fixture
def settings(tmp_path: Path, wechat: FakeWeChat) -> Settings:
    return pay_settings(tmp_path, wechat_api=wechat.base_url)


@pytest.fixture
def app(settings: Settings, engine: Engine) -> Iterator[Any]:
    app = create_app(settings, engine)
    yield app
    endpoint(app).drain()  # before the fake WeChat stops


@pytest.fixture
def http(app: Any) -> Iterator[httpx.Client]:
    with client_for(app) as c:
        yield c


def post(http: httpx.Client, headers: dict[str, str], body: bytes) -> httpx.Response:
    return http.post("/pay/notify", content=body, headers=headers)


def endpoint(app: Any) -> PayNotify:
    found = app.config[PAY_NOTIFY]
    assert isinstance(found, PayNotify)
    return found


def balance(engine: Engine, openid: str = PAYER) -> int:
    with transaction(engine) as s:
        return ledger.get_balance(s, openid=openid)


def pay_entries(engine: Engine) -> int:
    with transaction(engine) as s:
        return int(s.exec(select(func.count()).select_from(LedgerEntry)
                          .where(LedgerEntry.kind == "pay")).one())


def order_status(engine: Engine, no: str) -> str:
    with transaction(engine) as s:
        order = payments.get_order(s, out_trade_no=no)
        assert order is not None
        return order.status


def test_a_notification_credits_once_and_a_replay_changes_nothing(
        http: httpx.Client, app: Any, engine: Engine, wechat: FakeWeChat) -> None:
    order = make_order(engine)
    headers, body = notification(transaction_resource(order))
    first = post(http, headers, body)
    assert (first.status_code, first.content) == (204, b"")
    again = post(http, headers, body)  # the very same delivery, replayed
    assert (again.status_code, again.content) == (204, b"")
    endpoint(app).drain()
    assert balance(engine) == 99 and pay_entries(engine) == 1
    with transaction(engine) as s:
        paid = payments.get_order(s, out_trade_no=order.out_trade_no)
        assert paid is not None and paid.status == "paid" and paid.paid_at is not None
        assert paid.credit_entry_id is not None and paid.payer_openid == PAYER
        assert ledger.check(s) == []
    assert wechat.custom_messages == [
        (PAYER, "充值成功 +99 豆（¥9.90），当前余额 99 豆。")]


def _refused(http: httpx.Client, engine: Engine, order: PayOrder, headers: dict[str, str],
             body: bytes, status: int, why: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="newsbot.pay"):
        resp = post(http, headers, body)
    assert resp.status_code == status, resp.text
    answer = resp.json()
    assert answer["code"] == "FAIL" and why in answer["message"]
    lines = [r.getMessage() for r in caplog.records if r.name == "newsbot.pay"]
    assert len(lines) == 1 and why in lines[0], lines
    assert balance(engine, order.openid) == 0 and pay_entries(engine) == 0
    assert order_status(engine, order.out_trade_no) == "pending"


def test_forged_signature(http: httpx.Client, engine: Engine,
                          caplog: pytest.LogCaptureFixture) -> None:
    order = make_order(engine)
    headers, body = notification(transaction_resource(order), key=identity().stranger_key)
    _refused(http, engine, order, headers, body, 401, "signature does not match", caplog)


def test_forged_body_under_a_real_signature(http: httpx.Client, engine: Engine,
                                            caplog: pytest.LogCaptureFixture) -> None:
    order = make_order(engine)
    headers, _ = notification(transaction_resource(order, amount={"total": 1,
                                                                 "currency": "CNY"}))
    _, other_body = notification(transaction_resource(order))
    _refused(http, engine, order, headers, other_body, 401, "signature does not match", caplog)


def test_stale_timestamp(http: httpx.Client, engine: Engine,
                         caplog: pytest.LogCaptureFixture) -> None:
    import time

    order = make_order(engine)
    headers, body = notification(transaction_resource(order), timestamp=time.time() - 301)
    _refused(http, engine, order, headers, body, 401, "in the past", caplog)


def test_truncated_body(http: httpx.Client, engine: Engine,
                        caplog: pytest.LogCaptureFixture) -> None:
    order = make_order(engine)
    headers, body = notification(transaction_resource(order))
    _refused(http, engine, order, headers, body[:-40], 401, "signature does not match", caplog)


def test_signtest_probe(http: httpx.Client, engine: Engine,
                        caplog: pytest.LogCaptureFixture) -> None:
    order = make_order(engine)
    headers, body = notification(transaction_resource(order))
    headers["Wechatpay-Signature"] = "WECHATPAY/SIGNTEST/" + headers["Wechatpay-Signature"]
    _refused(http, engine, order, headers, body, 401, "SIGNTEST", caplog)


def test_unknown_serial(http: httpx.Client, engine: Engine,
                        caplog: pytest.LogCaptureFixture) -> None:
    order = make_order(engine)
    headers, body = notification(transaction_resource(order), key=identity().stranger_key,
                                 serial="PUB_KEY_ID_0000UNKNOWN")
    _refused(http, engine, order, headers, body, 401, "unknown Wechatpay-Serial", caplog)


def test_wrong_apiv3_key(http: httpx.Client, engine: Engine,
                         caplog: pytest.LogCaptureFixture) -> None:
    order = make_order(engine)
    headers, body = notification(transaction_resource(order), apiv3_key=b"k" * 32)
    _refused(http, engine, order, headers, body, 400, "does not decrypt", caplog)


@pytest.mark.parametrize(("change", "status", "why"), [
    ({"amount": {"total": 1, "payer_total": 1, "currency": "CNY"}}, 400, "amount 1 fen"),
    ({"amount": {"total": 990, "currency": "USD"}}, 400, "currency"),
    ({"mchid": "1900000999"}, 400, "mchid"),
    ({"mchid": "1900000999", "out_trade_no": "NB20990101000000FFFFFFFFFFFF"}, 400,
     "mchid '1900000999' is not ours"),  # refused before the order is even looked up
    ({"appid": "wx_someone_else"}, 400, "appid"),
    ({"payer": {"openid": "o_someone_else"}}, 400, "payer"),
    ({"out_trade_no": "NB20990101000000FFFFFFFFFFFF"}, 404, "no order"),
    ({"trade_state": "NOTPAY"}, 400, "trade_state"),
], ids=["amount", "currency", "merchant", "merchant-first", "appid", "payer", "unknown-order",
        "not-paid"])
def test_signed_but_not_our_order(http: httpx.Client, engine: Engine,
                                  caplog: pytest.LogCaptureFixture, change: dict[str, Any],
                                  status: int, why: str) -> None:
    order = make_order(engine)
    headers, body = notification(transaction_resource(order, **change))
    _refused(http, engine, order, headers, body, status, why, caplog)


def test_buy_and_unlock_in_one_step(http: httpx.Client, app: Any, engine: Engine,
                                    sample: int, wechat: FakeWeChat) -> None:
    order = make_order(engine, issue_number=sample, package=("p99", 99, 990))
    assert post(http, *notification(transaction_resource(order))).status_code == 204
    endpoint(app).drain()
    with transaction(engine) as s:
        assert ledger.get_balance(s, openid=PAYER) == 0  # 99 in, 99 for issue 1
        assert ledger.has_entitlement(s, openid=PAYER, issue_number=sample)
        paid = payments.get_order(s, out_trade_no=order.out_trade_no)
        assert paid is not None and paid.unlock_entry_id is not None
        assert ledger.check(s) == []
    assert wechat.custom_messages[-1][1].endswith("第1期已为你解锁，回复「全文 1」即可阅读。")


def test_unlock_short_keeps_the_credit(http: httpx.Client, app: Any, engine: Engine,
                                       sample: int, wechat: FakeWeChat) -> None:
    order = make_order(engine, issue_number=sample, package=("p10", 10, 100))
    assert post(http, *notification(transaction_resource(order))).status_code == 204
    endpoint(app).drain()
    with transaction(engine) as s:
        assert ledger.get_balance(s, openid=PAYER) == 10
        assert not ledger.has_entitlement(s, openid=PAYER, issue_number=sample)
        assert ledger.check(s) == []
    assert "余额不足以解锁第1期" in wechat.custom_messages[-1][1]


def test_already_unlocked_keeps_the_credit(http: httpx.Client, engine: Engine,
                                           sample: int) -> None:
    first = make_order(engine, issue_number=sample)
    second = make_order(engine, issue_number=sample)
    assert post(http, *notification(transaction_resource(first))).status_code == 204
    assert post(http, *notification(transaction_resource(second))).status_code == 204
    with transaction(engine) as s:
        assert ledger.get_balance(s, openid=PAYER) == 99
        again = payments.get_order(s, out_trade_no=second.out_trade_no)
        assert again is not None and again.unlock_note == "already"
        assert ledger.check(s) == []


def test_a_late_duplicate_after_a_refund_changes_nothing(http: httpx.Client,
                                                         engine: Engine) -> None:
    order = make_order(engine)
    headers, body = notification(transaction_resource(order))
    assert post(http, headers, body).status_code == 204
    with transaction(engine) as s:
        payments.request_refund(s, out_trade_no=order.out_trade_no, amount_fen=None,
                                reason="test")
    assert post(http, *notification(transaction_resource(order))).status_code == 204
    assert order_status(engine, order.out_trade_no) == "refunded"
    assert balance(engine) == 0 and pay_entries(engine) == 1


def test_a_failed_message_never_undoes_the_credit(http: httpx.Client, app: Any,
                                                  engine: Engine, wechat: FakeWeChat,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    wechat.fail_next(45015, times=10, path="/cgi-bin/message/custom/send")
    order = make_order(engine)
    with caplog.at_level(logging.WARNING, logger="newsbot.pay"):
        assert post(http, *notification(transaction_resource(order))).status_code == 204
        endpoint(app).drain()
    assert balance(engine) == 99 and wechat.custom_messages == []
    assert any("客服消息" in r.getMessage() and "the credit stands" in r.getMessage()
               for r in caplog.records)


def test_refund_notifications_are_recorded(http: httpx.Client, engine: Engine) -> None:
    order = make_order(engine)
    assert post(http, *notification(transaction_resource(order))).status_code == 204
    with transaction(engine) as s:
        paid = payments.require_order(s, out_trade_no=order.out_trade_no)
        one = payments.request_refund(s, out_trade_no=order.out_trade_no, amount_fen=500,
                                      reason="partial")
        payments.note_refund(s, out_refund_no=one.out_refund_no, status="PROCESSING")
        two = payments.request_refund(s, out_trade_no=order.out_trade_no, amount_fen=None,
                                      reason="rest")
    assert (one.tokens, two.tokens) == (50, 49)
    ok = notification(refund_resource(paid, one.out_refund_no, 500, "SUCCESS"),
                      event_type="REFUND.SUCCESS")
    odd = notification(refund_resource(paid, two.out_refund_no, 490, "ABNORMAL"),
                       event_type="REFUND.ABNORMAL")
    wrong = notification(refund_resource(paid, two.out_refund_no, 1, "SUCCESS"),
                         event_type="REFUND.SUCCESS")
    assert post(http, *ok).status_code == 204
    assert post(http, *ok).status_code == 204  # a duplicate
    assert post(http, *odd).status_code == 204
    assert post(http, *wrong).status_code == 400
    with transaction(engine) as s:
        refunds = {r.out_refund_no: r for r in payments.list_refunds(
            s, out_trade_no=order.out_trade_no)}
        assert refunds[one.out_refund_no].status == "success"
        assert refunds[one.out_refund_no].refund_id is not None
        assert refunds[two.out_refund_no].status == "abnormal"
        assert ledger.get_balance(s, openid=PAYER) == 0
        assert ledger.check(s) == []


def test_a_closed_refund_gives_the_tokens_back(http: httpx.Client, engine: Engine) -> None:
    order = make_order(engine)
    assert post(http, *notification(transaction_resource(order))).status_code == 204
    with transaction(engine) as s:
        paid = payments.require_order(s, out_trade_no=order.out_trade_no)
        refund = payments.request_refund(s, out_trade_no=order.out_trade_no, amount_fen=None,
                                         reason="test")
    closed = notification(refund_resource(paid, refund.out_refund_no, 990, "CLOSED"),
                          event_type="REFUND.CLOSED")
    assert post(http, *closed).status_code == 204
    assert post(http, *closed).status_code == 204  # a duplicate gives back nothing more
    assert balance(engine) == 99 and order_status(engine, order.out_trade_no) == "paid"
    with transaction(engine) as s:
        assert payments.require_order(s, out_trade_no=order.out_trade_no).refunded_fen == 0
        assert ledger.check(s) == []


def test_two_identical_notifications_at_the_same_moment(http: httpx.Client, engine: Engine,
                                                        app: Any) -> None:
    orders = [make_order(engine, openid=f"o_payer_{i:04d}") for i in range(8)]
    deliveries = [notification(transaction_resource(o)) for o in orders]
    statuses: list[int] = []
    barrier = threading.Barrier(len(deliveries) * 2)

    def send(headers: dict[str, str], body: bytes) -> None:
        with client_for(app) as own:
            barrier.wait()
            statuses.append(post(own, headers, body).status_code)

    threads = [threading.Thread(target=send, args=d) for d in deliveries for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [204] * len(threads)
    assert pay_entries(engine) == len(orders)
    with transaction(engine) as s:
        assert ledger.check(s) == []


def test_without_pay_there_is_no_notify_endpoint(engine: Engine) -> None:
    with client_for(create_app(make_settings(), engine)) as c:
        assert c.post("/pay/notify", content=b"{}").status_code == 404


def test_end_to_end_with_the_fake(tmp_path: Path, engine: Engine, wechat: FakeWeChat) -> None:
    """The fake WeChat Pay takes the order, 'pays' it and posts its notifications over HTTP
    three times (two at once), after a SIGNTEST probe and a copy under an unknown serial."""
    with loopback_server() as server, FakeWeChatPay(identity(), notify_copies=3,
                                                    simultaneous=True,
                                                    retry_scale=0.001) as fake:
        settings = pay_settings(tmp_path, api_base=fake.base_url, public_url=server.url,
                                wechat_api=wechat.base_url)
        app = create_app(settings, engine)
        server.serve(app)
        order = make_order(engine, created=False, notify_url=server.url + "/pay/notify")
        assert settings.pay is not None
        with PayClient.from_settings(settings.pay, http=web()) as client:
            prepay = client.submit_order(order.kind, order.request_json)
        with transaction(engine) as s:
            payments.mark_created(s, out_trade_no=order.out_trade_no, prepay_id=prepay)
        fake.misbehave_next("signtest")
        fake.pay(order.out_trade_no, openid=PAYER)
        assert fake.wait_idle(10)
        endpoint(app).drain()
        kinds = sorted((d.kind, d.status) for d in fake.deliveries)
        assert kinds == [("notification", 204)] * 3 + [("signtest", 401)]
    assert balance(engine) == 99 and pay_entries(engine) == 1
    eventually(lambda: len(wechat.custom_messages) == 1)
    assert json.loads(order.request_json)["out_trade_no"] == order.out_trade_no
