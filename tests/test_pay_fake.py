"""The loopback fake WeChat Pay: our signatures checked, answers signed, the order state
machine, the page that pays, and notifications with WeChat's retries and misbehaviour."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from bot.pay.client import PayApiError, PayClient
from bot.pay.fake import FakeWeChatPay
from bot.pay.signing import (
    SignTestProbe,
    UnknownSerial,
    authorization,
    new_nonce,
    verify_signed,
)
from tests.pay_support import (
    NotifyReceiver,
    eventually,
    identity,
    notify_receiver,
    verify_keys,
    web,
)

SCALE = 0.001  # WeChat's 15 s first retry becomes 15 ms


@pytest.fixture
def fake() -> Iterator[FakeWeChatPay]:
    with FakeWeChatPay(identity(), retry_scale=SCALE, refund_delay_s=0.05) as server:
        yield server


@pytest.fixture
def client(fake: FakeWeChatPay) -> Iterator[PayClient]:
    ident = identity()
    with PayClient(mch_id=ident.mch_id, app_id=ident.app_id,
                   merchant_serial_no=ident.merchant_serial_no, private_key=ident.merchant_key,
                   keys=verify_keys(), api_base=fake.base_url, http=web(),
                   sleep=lambda s: None) as c:
        yield c


@pytest.fixture
def receiver() -> Iterator[NotifyReceiver]:
    with notify_receiver(verify_keys()) as r:
        yield r


def place(client: PayClient, notify_url: str, no: str = "NB0000000001", *, total: int = 990,
          openid: str = "o_reader_0001") -> str:
    return client.create_jsapi_order(
        out_trade_no=no, description="99 豆", total_fen=total, openid=openid,
        notify_url=notify_url, time_expire=datetime.now(UTC) + timedelta(minutes=30))


def raw_call(fake: FakeWeChatPay, method: str, path: str, body: bytes = b"", *,
             sign_body: bytes | None = None, timestamp: int | None = None) -> httpx.Response:
    ident = identity()
    header = authorization(mch_id=ident.mch_id, serial_no=ident.merchant_serial_no,
                           private_key=ident.merchant_key, method=method, path=path,
                           body=body if sign_body is None else sign_body,
                           timestamp=str(timestamp or int(time.time())), nonce=new_nonce())
    return web().request(method, fake.base_url + path, content=body,
                         headers={"Authorization": header, "Content-Type": "application/json"})


# -- our signature, as WeChat checks it -----------------------------------------------------

def test_a_correctly_signed_request_is_answered_and_signed(fake: FakeWeChatPay) -> None:
    response = raw_call(fake, "GET", "/v3/pay/transactions/out-trade-no/NB404?mchid=1900000001")
    assert response.status_code == 404 and response.json()["code"] == "ORDER_NOT_EXIST"
    assert response.headers["Request-ID"]
    verify_signed(response.headers, response.content, verify_keys(), now=time.time())


@pytest.mark.parametrize("how", ["body", "timestamp", "no header", "other key"])
def test_a_badly_signed_request_gets_an_unsigned_401(fake: FakeWeChatPay, how: str) -> None:
    path, body = "/v3/pay/transactions/out-trade-no/NB1/close", b'{"mchid":"1900000001"}'
    if how == "body":  # Guard: the fake verifies the signature over the body sent.
        response = raw_call(fake, "POST", path, body, sign_body=b'{"mchid":"1"}')
    elif how == "timestamp":  # Guard: the fake's 5-minute window on our timestamp.
        response = raw_call(fake, "POST", path, body, timestamp=int(time.time()) - 600)
    elif how == "no header":
        response = web().post(fake.base_url + path, content=body)
    else:
        header = authorization(mch_id="1900000001", serial_no=identity().merchant_serial_no,
                               private_key=identity().stranger_key, method="POST", path=path,
                               body=body, timestamp=str(int(time.time())), nonce="N")
        response = web().post(fake.base_url + path, content=body,
                              headers={"Authorization": header})
    assert response.status_code == 401 and response.json()["code"] == "SIGN_ERROR"
    assert "Wechatpay-Signature" not in response.headers


# -- orders ----------------------------------------------------------------------------------

def test_order_state_machine_notpay_success_refund(fake: FakeWeChatPay, client: PayClient,
                                                   receiver: NotifyReceiver) -> None:
    place(client, receiver.url)
    assert client.query_order("NB0000000001").trade_state == "NOTPAY"
    fake.pay("NB0000000001")
    paid = client.query_order("NB0000000001")
    assert paid.trade_state == "SUCCESS" and paid.transaction_id and paid.total_fen == 990
    assert paid.payer_openid == "o_reader_0001"
    refund = client.create_refund(out_trade_no="NB0000000001", out_refund_no="RF0000000001",
                                  refund_fen=990, total_fen=990, reason="测试")
    assert refund.status == "PROCESSING"
    eventually(lambda: client.query_refund("RF0000000001").status == "SUCCESS")
    assert client.query_order("NB0000000001").trade_state == "REFUND"
    posts = receiver.wait_for(2)
    events = [p.notification.event_type for p in posts if p.notification]
    assert events == ["TRANSACTION.SUCCESS", "REFUND.SUCCESS"]
    refund_note = posts[1].notification
    assert refund_note is not None and refund_note.resource["refund_status"] == "SUCCESS"
    assert refund_note.resource["amount"]["refund"] == 990


def test_closed_order_cannot_be_paid(fake: FakeWeChatPay, client: PayClient) -> None:
    place(client, "https://bot.example.com/pay/notify")
    client.close_order("NB0000000001")
    client.close_order("NB0000000001")  # again: harmless
    assert client.query_order("NB0000000001").trade_state == "CLOSED"
    with pytest.raises(Exception, match="订单状态不可支付"):
        fake.pay("NB0000000001")


def test_the_page_pays_an_order_only_for_its_payer(fake: FakeWeChatPay, client: PayClient,
                                                   receiver: NotifyReceiver) -> None:
    place(client, receiver.url)
    page = web().get(fake.pay_page_url("NB0000000001"))
    assert page.status_code == 200 and "¥9.90" in page.text and "o_reader_0001" in page.text
    other = web().post(fake.pay_page_url("NB0000000001"), data={"openid": "o_someone_else"})
    assert other.status_code == 400 and "下单账号与支付账号不一致" in other.text
    assert fake.orders["NB0000000001"].state == "NOTPAY"
    paid = web().post(fake.pay_page_url("NB0000000001"), data={"openid": "o_reader_0001"})
    assert paid.status_code == 200 and "支付成功" in paid.text
    assert receiver.wait_for(1)[0].status == 204
    assert "NB0000000001" in web().get(fake.base_url + "/").text


def test_native_orders_get_a_code_url(fake: FakeWeChatPay, client: PayClient) -> None:
    url = client.create_native_order(out_trade_no="NB0000000002", description="99 豆",
                                     total_fen=990, notify_url="https://bot.example.com/n",
                                     time_expire=datetime.now(UTC) + timedelta(minutes=5))
    assert url.startswith("weixin://wxpay/bizpayurl?pr=")


@pytest.mark.parametrize(("notify_url", "message"), [
    ("http://bot.example.com/pay/notify", "https"),
    ("https://bot.example.com/pay/notify?x=1", "不带参数")])
def test_notify_url_must_be_https_without_a_query(fake: FakeWeChatPay, client: PayClient,
                                                  notify_url: str, message: str) -> None:
    with pytest.raises(PayApiError, match=message) as caught:
        place(client, notify_url)
    assert caught.value.code == "PARAM_ERROR" and caught.value.verified


# -- notifications ----------------------------------------------------------------------------

def test_notification_is_retried_on_wechats_schedule_until_a_2xx(fake: FakeWeChatPay,
                                                                 client: PayClient) -> None:
    with notify_receiver(verify_keys(), statuses=[500, 500, 500, 204]) as receiver:
        place(client, receiver.url)
        fake.pay("NB0000000001")
        posts = receiver.wait_for(4)
        assert fake.wait_idle()
    assert [p.status for p in posts] == [500, 500, 500, 204]
    ids = {p.notification.id for p in posts if p.notification}
    assert len(ids) == 1  # the same notification every time
    gaps = [b.time - a.time for a, b in itertools.pairwise(posts)]
    # At least 15 s, 15 s, 30 s compressed by SCALE (a loaded machine only adds).
    assert all(gap >= want * SCALE * 0.9 for gap, want in zip(gaps, (15, 15, 30), strict=True))
    assert [d.attempt for d in fake.deliveries] == [0, 1, 2, 3]


def test_duplicates_two_at_the_same_moment(fake: FakeWeChatPay, client: PayClient,
                                           receiver: NotifyReceiver) -> None:
    fake.notify_copies, fake.simultaneous = 3, True
    place(client, receiver.url)
    fake.pay("NB0000000001")
    posts = receiver.wait_for(3)
    assert fake.wait_idle()
    assert len({p.notification.id for p in posts if p.notification}) == 1
    first, second = sorted(p.time for p in posts)[:2]
    assert second - first < 0.02


@pytest.mark.parametrize(("kind", "refusal"), [("signtest", SignTestProbe),
                                               ("unknown_serial", UnknownSerial)])
def test_a_probe_goes_first_and_must_be_refused(fake: FakeWeChatPay, client: PayClient,
                                                receiver: NotifyReceiver, kind: str,
                                                refusal: type[Exception]) -> None:
    fake.misbehave_next(kind)  # type: ignore[arg-type]
    place(client, receiver.url)
    fake.pay("NB0000000001")
    posts = receiver.wait_for(2)
    assert fake.wait_idle()
    probes = [p for p in posts if p.refusal is not None]
    assert len(probes) == 1 and isinstance(probes[0].refusal, refusal)
    assert probes[0].status == 401
    assert [p.status for p in posts if p.notification] == [204]
    assert {d.kind for d in fake.deliveries} == {kind, "notification"}


def test_a_dropped_notification_never_comes_but_the_order_is_paid(
        fake: FakeWeChatPay, client: PayClient, receiver: NotifyReceiver) -> None:
    fake.misbehave_next("drop")
    place(client, receiver.url)
    fake.pay("NB0000000001")
    assert fake.wait_idle()
    time.sleep(0.05)
    assert receiver.received == [] and fake.deliveries == []
    assert client.query_order("NB0000000001").trade_state == "SUCCESS"


def test_certificate_mode_signs_with_the_certificate_serial(fake: FakeWeChatPay,
                                                            client: PayClient,
                                                            receiver: NotifyReceiver) -> None:
    fake.sign_with = "certificate"
    place(client, receiver.url)  # the answer verifies with the certificate
    fake.pay("NB0000000001")
    post = receiver.wait_for(1)[0]
    assert post.notification is not None
    assert post.notification.serial == identity().certificate_serial


def test_refund_that_ends_abnormal_is_notified_as_such(fake: FakeWeChatPay, client: PayClient,
                                                       receiver: NotifyReceiver) -> None:
    fake.refund_outcome = "ABNORMAL"
    place(client, receiver.url)
    fake.pay("NB0000000001")
    client.create_refund(out_trade_no="NB0000000001", out_refund_no="RF0000000001",
                         refund_fen=100, total_fen=990, reason="测试")
    posts = receiver.wait_for(2)
    assert posts[1].notification is not None
    assert posts[1].notification.event_type == "REFUND.ABNORMAL"
    assert client.query_order("NB0000000001").trade_state == "SUCCESS"


def test_control_api_flips_switches(fake: FakeWeChatPay, client: PayClient,
                                    receiver: NotifyReceiver) -> None:
    place(client, receiver.url)
    control = fake.base_url + "/_fake/control"
    assert web().post(control, json={"action": "pay", "out_trade_no": "NB0000000001"}
                      ).json()["orders"] == {"NB0000000001": "SUCCESS"}
    assert web().post(control, json={"action": "wait_idle"}).json()["idle"] is True
    bad = web().post(control, content=json.dumps({"action": "explode"}))
    assert bad.status_code == 400
