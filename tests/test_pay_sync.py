"""The sync job against the fake WeChat Pay: orders whose notification never comes are
settled exactly once, unpaid ones are closed after their time_expire, a create call that
failed or timed out leaves nothing the job cannot settle, and open refunds are asked again."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from bot.jobs.pay_sync import sync_orders, sync_refunds
from bot.jobs.scheduler import PAY_SYNC_JOB_ID, WeeklyScheduler
from bot.pay.client import PayClient, PayTransientError
from bot.pay.fake import FakeWeChatPay
from bot.settings import Settings
from storage import ledger, payments
from storage.db import transaction
from storage.models import PayOrder, utcnow
from tests.conftest import make_settings
from tests.pay_orders_support import PAYER, make_order, pay_settings
from tests.pay_support import eventually, identity, web

OLD = timedelta(minutes=4)


@pytest.fixture
def fake() -> Iterator[FakeWeChatPay]:
    with FakeWeChatPay(identity(), retry_scale=0.0001, refund_delay_s=0.05) as f:
        yield f


@pytest.fixture
def settings(tmp_path: Path, fake: FakeWeChatPay) -> Settings:
    return pay_settings(tmp_path, api_base=fake.base_url)


@pytest.fixture
def client(settings: Settings) -> Iterator[PayClient]:
    assert settings.pay is not None
    with PayClient.from_settings(settings.pay, http=web(), sleep=lambda s: None) as c:
        yield c


def placed(engine: Engine, client: PayClient, *, age: timedelta = OLD,
           **kwargs: object) -> PayOrder:
    """An order recorded, sent to the fake and marked created, as the page does it."""
    order = make_order(engine, created=False, age=age, **kwargs)  # type: ignore[arg-type]
    prepay = client.submit_order(order.kind, order.request_json)
    with transaction(engine) as s:
        return payments.mark_created(s, out_trade_no=order.out_trade_no, prepay_id=prepay)


def status(engine: Engine, no: str) -> str:
    with transaction(engine) as s:
        return payments.require_order(s, out_trade_no=no).status


def balance(engine: Engine, openid: str = PAYER) -> int:
    with transaction(engine) as s:
        return ledger.get_balance(s, openid=openid)


def test_a_notification_that_never_comes_is_settled_by_the_job(
        engine: Engine, client: PayClient, fake: FakeWeChatPay) -> None:
    order = placed(engine, client)
    fake.misbehave_next("drop")
    fake.pay(order.out_trade_no, openid=PAYER)
    first = sync_orders(engine, client)
    assert [(s.out_trade_no, s.outcome) for s in first.orders] == [
        (order.out_trade_no, "credited")]
    again = sync_orders(engine, client, min_interval=timedelta(0))
    assert again.orders == []  # paid: nothing left to ask about
    assert balance(engine) == 99 and status(engine, order.out_trade_no) == "paid"
    with transaction(engine) as s:
        assert ledger.check(s) == []


def test_young_orders_wait_for_their_notification(engine: Engine, client: PayClient,
                                                  fake: FakeWeChatPay) -> None:
    order = placed(engine, client, age=timedelta(0))
    assert sync_orders(engine, client).orders == []
    now = sync_orders(engine, client, min_age=timedelta(0))  # `newsbot pay sync`
    assert [(s.outcome, s.detail) for s in now.orders] == [("pending", "not paid yet")]
    assert status(engine, order.out_trade_no) == "pending"


def test_an_order_past_its_time_expire_is_closed(engine: Engine, client: PayClient,
                                                 fake: FakeWeChatPay) -> None:
    order = placed(engine, client)
    report = sync_orders(engine, client, now=utcnow() + timedelta(minutes=31))
    assert [s.outcome for s in report.orders] == ["closed"]
    assert fake.orders[order.out_trade_no].state == "CLOSED"
    assert status(engine, order.out_trade_no) == "closed"
    assert balance(engine) == 0


def test_two_schedulers_ask_about_an_order_once(engine: Engine, client: PayClient,
                                                fake: FakeWeChatPay) -> None:
    placed(engine, client)
    at = utcnow()
    assert [s.outcome for s in sync_orders(engine, client, now=at).orders] == ["pending"]
    assert [s.outcome for s in sync_orders(engine, client, now=at).orders] == ["skipped"]
    queries = [c for c in fake.calls if c.method == "GET"]
    assert len(queries) == 1


def test_a_create_call_that_failed_after_reaching_wechat_is_still_settled(
        engine: Engine, settings: Settings, fake: FakeWeChatPay, client: PayClient) -> None:
    order = make_order(engine, created=False, age=OLD)
    fake.fail_next(status=500, after_processing=True, path="/v3/pay/transactions/jsapi")
    assert settings.pay is not None
    with PayClient.from_settings(settings.pay, http=web(), max_retries=0) as once, \
            pytest.raises(PayTransientError) as failed:
        once.submit_order(order.kind, order.request_json)
    assert failed.value.maybe_processed
    assert status(engine, order.out_trade_no) == "creating"  # the page leaves it so
    fake.misbehave_next("drop")
    fake.pay(order.out_trade_no, openid=PAYER)
    assert [s.outcome for s in sync_orders(engine, client).orders] == ["credited"]
    assert balance(engine) == 99


def test_a_create_call_that_timed_out_unpaid_becomes_pending(
        engine: Engine, fake: FakeWeChatPay, client: PayClient) -> None:
    order = make_order(engine, created=False, age=OLD)
    fake.fail_next(status=500, after_processing=True, path="/v3/pay/transactions/jsapi",
                   times=3)  # every attempt, retries included
    with pytest.raises(PayTransientError):
        client.submit_order(order.kind, order.request_json)
    report = sync_orders(engine, client)
    assert [s.outcome for s in report.orders] == ["pending"]
    assert status(engine, order.out_trade_no) == "pending"


def test_an_order_that_never_reached_wechat_is_closed(engine: Engine,
                                                      client: PayClient) -> None:
    order = make_order(engine, created=False, age=OLD)
    report = sync_orders(engine, client)
    assert [(s.outcome, s.detail) for s in report.orders] == [
        ("closed", "never created at WeChat Pay")]
    assert status(engine, order.out_trade_no) == "closed"


def test_wechat_down_leaves_the_order_for_the_next_run(engine: Engine, client: PayClient,
                                                       fake: FakeWeChatPay) -> None:
    order = placed(engine, client)
    fake.misbehave_next("drop")
    fake.pay(order.out_trade_no, openid=PAYER)
    fake.fail_next(status=503, times=3, path="/v3/pay/transactions/out-trade-no")
    assert [s.outcome for s in sync_orders(engine, client).orders] == ["error"]
    assert status(engine, order.out_trade_no) == "pending" and balance(engine) == 0
    later = sync_orders(engine, client, now=utcnow() + timedelta(minutes=1))
    assert [s.outcome for s in later.orders] == ["credited"]


def test_open_refunds_are_resent_and_followed(engine: Engine, client: PayClient,
                                              fake: FakeWeChatPay) -> None:
    order = placed(engine, client)
    fake.misbehave_next("drop")
    fake.pay(order.out_trade_no, openid=PAYER)
    sync_orders(engine, client)
    with transaction(engine) as s:
        refund = payments.request_refund(s, out_trade_no=order.out_trade_no, amount_fen=None,
                                         reason="test")
    assert balance(engine) == 0  # debited before WeChat was asked
    fake.misbehave_next("drop")  # the refund's notification never comes either
    assert sync_refunds(engine, client) == {refund.out_refund_no: "processing"}
    eventually(lambda: fake.refunds[refund.out_refund_no].status == "SUCCESS")
    assert sync_refunds(engine, client) == {refund.out_refund_no: "success"}
    assert sync_refunds(engine, client) == {}
    assert status(engine, order.out_trade_no) == "refunded"


def test_a_refused_refund_gives_the_tokens_back(engine: Engine, client: PayClient,
                                                fake: FakeWeChatPay) -> None:
    order = placed(engine, client)
    fake.misbehave_next("drop")
    fake.pay(order.out_trade_no, openid=PAYER)
    sync_orders(engine, client)
    with transaction(engine) as s:
        refund = payments.request_refund(s, out_trade_no=order.out_trade_no, amount_fen=500,
                                         reason="test")
    fake.fail_next(status=403, code="NOT_ENOUGH", path="/v3/refund/domestic/refunds")
    assert sync_refunds(engine, client) == {refund.out_refund_no: "refused"}
    assert balance(engine) == 99 and status(engine, order.out_trade_no) == "paid"
    with transaction(engine) as s:
        assert ledger.check(s) == []


def test_the_scheduler_runs_the_job_only_with_pay(settings: Settings, engine: Engine) -> None:
    with_pay = WeeklyScheduler(settings, engine, lambda: None)  # type: ignore[arg-type,return-value]
    without = WeeklyScheduler(make_settings(), engine, lambda: None)  # type: ignore[arg-type,return-value]
    assert with_pay.scheduler.get_job(PAY_SYNC_JOB_ID) is not None
    assert without.scheduler.get_job(PAY_SYNC_JOB_ID) is None
    with_pay.shutdown()
