"""bot.pay.client against the fake WeChat Pay running as its own process, over HTTP: what
the client signs, what it refuses to believe, and when it retries."""

from __future__ import annotations

import base64
import itertools
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.hashes import SHA256

from bot.pay.client import (
    PayApiError,
    PayClient,
    PayTransientError,
    PayUnverifiedResponse,
)
from bot.pay.keys import VerifyKeys, load_private_key, load_public_key
from bot.pay.signing import BadSignature, MissingSignature, UnknownSerial
from bot.settings import PaySettings
from tests.conftest import child_env, make_settings
from tests.pay_support import eventually, identity, web

NOTIFY = "https://bot.example.com/pay/notify"
# Placing an order again is safe only with the very same body, so time_expire is stored with
# the order (here: fixed) rather than computed on each attempt.
EXPIRE = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=30)
_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def fake_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``python -m bot.pay.fake`` as a child process: its base URL and its keys directory."""
    keys = tmp_path_factory.mktemp("fakepay")
    with (keys / "stderr.log").open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bot.pay.fake", "--port", "0", "--keys-dir", str(keys),
             "--retry-scale", "0.001", "--refund-delay", "0.1"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=child_env())
        try:
            assert proc.stdout is not None
            base = proc.stdout.readline().strip()
            assert base.startswith("http://127.0.0.1:"), (keys / "stderr.log").read_text()
            yield base, keys
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture(scope="module")
def pay_settings(fake_process: tuple[str, Path]) -> PaySettings:
    table = tomllib.loads((fake_process[1] / "pay.toml").read_text())["pay"]
    pay = make_settings(pay=table).pay
    assert pay is not None
    return pay


def make_client(pay: PaySettings, **kwargs: Any) -> PayClient:
    kwargs.setdefault("sleep", lambda s: None)
    kwargs.setdefault("http", web())
    return PayClient.from_settings(pay, **kwargs)


@pytest.fixture
def client(pay_settings: PaySettings) -> Iterator[PayClient]:
    with make_client(pay_settings) as c:
        yield c


def control(base: str, action: str, **kwargs: Any) -> dict[str, Any]:
    response = web().post(f"{base}/_fake/control", json={"action": action, **kwargs})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def new_no(prefix: str = "NB") -> str:
    return f"{prefix}{int(time.time())}{next(_numbers):06d}"


def place(client: PayClient, no: str, *, total: int = 990) -> str:
    return client.create_jsapi_order(
        out_trade_no=no, description="99 豆", total_fen=total, openid="o_reader_0001",
        notify_url=NOTIFY, time_expire=EXPIRE)


# -- orders ----------------------------------------------------------------------------------

def test_jsapi_order_and_its_signed_pay_parameters(client: PayClient,
                                                   pay_settings: PaySettings) -> None:
    prepay_id = place(client, new_no())
    params = client.jsapi_params(prepay_id)
    assert params["appId"] == pay_settings.app_id and params["package"] == f"prepay_id={prepay_id}"
    public = load_private_key(pay_settings.merchant_private_key_file).public_key()
    message = "".join(f"{params[k]}\n" for k in ("appId", "timeStamp", "nonceStr", "package"))
    public.verify(base64.b64decode(params["paySign"]), message.encode(), PKCS1v15(), SHA256())


def test_native_order_gets_a_code_url(client: PayClient) -> None:
    code_url = client.create_native_order(out_trade_no=new_no(), description="99 豆",
                                          total_fen=990, notify_url=NOTIFY,
                                          time_expire=datetime.now(UTC) + timedelta(minutes=5))
    assert code_url.startswith("weixin://")


def test_same_order_placed_again_gets_the_same_prepay_id(client: PayClient) -> None:
    no = new_no()
    assert place(client, no) == place(client, no)
    with pytest.raises(PayApiError) as caught:
        place(client, no, total=1990)
    assert caught.value.code == "INVALID_REQUEST" and caught.value.verified
    assert caught.value.request_id


def test_query_close_and_pay(client: PayClient, fake_process: tuple[str, Path]) -> None:
    base = fake_process[0]
    paid, closed = new_no(), new_no()
    place(client, paid)
    place(client, closed)
    assert client.query_order(paid).trade_state == "NOTPAY"
    control(base, "pay", out_trade_no=paid)
    order = client.query_order(paid)
    assert (order.trade_state, order.total_fen, order.currency) == ("SUCCESS", 990, "CNY")
    assert order.payer_openid == "o_reader_0001" and order.transaction_id
    client.close_order(closed)
    assert client.query_order(closed).trade_state == "CLOSED"
    with pytest.raises(PayApiError) as caught:
        client.close_order(paid)
    assert caught.value.code == "ORDERPAID"


def test_unknown_order_is_a_verified_404(client: PayClient) -> None:
    with pytest.raises(PayApiError) as caught:
        client.query_order("NB_never_placed")
    assert (caught.value.status, caught.value.code, caught.value.verified) == (
        404, "ORDER_NOT_EXIST", True)


# -- refunds ---------------------------------------------------------------------------------

def test_refund_processing_then_success_and_safe_to_repeat(
        client: PayClient, fake_process: tuple[str, Path]) -> None:
    no, refund_no = new_no(), new_no("RF")
    place(client, no)
    control(fake_process[0], "pay", out_trade_no=no)
    first = client.create_refund(out_trade_no=no, out_refund_no=refund_no, refund_fen=500,
                                 total_fen=990, reason="测试退款", notify_url=NOTIFY)
    again = client.create_refund(out_trade_no=no, out_refund_no=refund_no, refund_fen=500,
                                 total_fen=990, reason="测试退款", notify_url=NOTIFY)
    assert first.status == "PROCESSING" and again.refund_id == first.refund_id
    eventually(lambda: client.query_refund(refund_no).status == "SUCCESS")
    assert client.query_order(no).trade_state == "REFUND"
    with pytest.raises(PayApiError) as caught:
        client.create_refund(out_trade_no=no, out_refund_no=new_no("RF"), refund_fen=491,
                             total_fen=990, reason="多退")
    assert caught.value.code == "NOT_ENOUGH"


# -- what the client refuses to believe ------------------------------------------------------

@pytest.mark.parametrize(("how", "failure"), [("key", BadSignature), ("body", BadSignature)])
def test_forged_answer_is_refused(client: PayClient, fake_process: tuple[str, Path], how: str,
                                  failure: type[Exception]) -> None:
    # Guard: the client verifies every answer before reading it.
    no = new_no()
    place(client, no)
    control(fake_process[0], "forge_next", how=how, path="/v3/pay/transactions/out-trade-no")
    with pytest.raises(PayUnverifiedResponse) as caught:
        client.query_order(no)
    assert isinstance(caught.value.failure, failure)
    assert client.query_order(no).trade_state == "NOTPAY"  # the next answer is genuine


def test_forged_answer_to_an_order_leaves_an_order_the_job_can_settle(
        client: PayClient, fake_process: tuple[str, Path]) -> None:
    no = new_no()
    control(fake_process[0], "forge_next", path="/v3/pay/transactions/jsapi")
    with pytest.raises(PayUnverifiedResponse):
        place(client, no)
    assert client.query_order(no).trade_state == "NOTPAY"
    assert place(client, no)  # placing it again with the same number is safe


def test_unsigned_success_is_refused(pay_settings: PaySettings) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"prepay_id": "wx_forged"})

    mock = httpx.Client(transport=httpx.MockTransport(answer))
    forged = make_client(pay_settings, http=mock)
    with forged, pytest.raises(PayUnverifiedResponse) as caught:
        place(forged, new_no())
    assert isinstance(caught.value.failure, MissingSignature)


def test_client_holding_no_matching_key_trusts_nothing(pay_settings: PaySettings) -> None:
    stranger = VerifyKeys.of(pay_settings.apiv3_key.encode(),
                             {"PUB_KEY_ID_0000": identity().stranger_key.public_key()})
    with make_client(pay_settings) as c:
        c.keys = stranger
        with pytest.raises(PayUnverifiedResponse) as caught:
            place(c, new_no())
    assert isinstance(caught.value.failure, UnknownSerial)


def test_both_verification_modes_side_by_side(pay_settings: PaySettings,
                                              fake_process: tuple[str, Path]) -> None:
    base = fake_process[0]
    assert pay_settings.wechatpay_public_key_file and pay_settings.platform_certificates_dir
    public_only = VerifyKeys.of(pay_settings.apiv3_key.encode(), {
        pay_settings.wechatpay_public_key_id: load_public_key(
            pay_settings.wechatpay_public_key_file)})
    control(base, "set", sign_with="certificate")
    try:
        with make_client(pay_settings) as both:
            place(both, new_no())  # pay.toml lists both: the certificate serial is known
            both.keys = public_only
            with pytest.raises(PayUnverifiedResponse):
                place(both, new_no())
    finally:
        control(base, "set", sign_with="public_key")


def test_wrong_merchant_key_gets_an_unverified_401(pay_settings: PaySettings) -> None:
    with make_client(pay_settings) as c:
        c._private_key = identity().stranger_key
        with pytest.raises(PayApiError) as caught:
            place(c, new_no())
    assert (caught.value.status, caught.value.code, caught.value.verified) == (
        401, "SIGN_ERROR", False)


def test_clock_far_off_is_refused_by_wechat(pay_settings: PaySettings) -> None:
    late = make_client(pay_settings, clock=lambda: time.time() - 3600)
    with late, pytest.raises(PayApiError, match="SIGN_ERROR"):
        late.query_order("NB_any")


# -- retries -----------------------------------------------------------------------------------

def test_order_create_5xx_is_retried_with_the_same_out_trade_no(
        pay_settings: PaySettings, fake_process: tuple[str, Path]) -> None:
    base, sleeps = fake_process[0], []
    no = new_no()
    control(base, "fail_next", path="/v3/pay/transactions/jsapi")
    control(base, "fail_next", path="/v3/pay/transactions/jsapi", after_processing=True)
    with make_client(pay_settings, sleep=sleeps.append) as c:
        prepay_id = place(c, no)
        assert c.query_order(no).trade_state == "NOTPAY"
        assert place(c, no) == prepay_id
    assert len(sleeps) == 2 and all(0 < s <= 8 for s in sleeps)


def test_persistent_5xx_gives_up_as_transient(pay_settings: PaySettings,
                                              fake_process: tuple[str, Path]) -> None:
    control(fake_process[0], "fail_next", path="/v3/pay/transactions/jsapi", times=3,
            after_processing=True)
    with make_client(pay_settings, max_retries=2) as c:
        no = new_no()
        with pytest.raises(PayTransientError) as caught:
            place(c, no)
        assert caught.value.code == "SYSTEM_ERROR" and caught.value.maybe_processed
        assert c.query_order(no).trade_state == "NOTPAY"  # made; the job can settle it


def test_timeout_is_transient_and_the_same_order_can_be_placed_again(
        pay_settings: PaySettings, fake_process: tuple[str, Path]) -> None:
    control(fake_process[0], "delay_next", seconds=0.6, path="/v3/pay/transactions/jsapi")
    no = new_no()
    with make_client(pay_settings, read_timeout_s=0.2, max_retries=0) as c:
        with pytest.raises(PayTransientError) as caught:
            place(c, no)
        assert caught.value.code == "NETWORK" and caught.value.maybe_processed
        eventually(lambda: no in control(fake_process[0], "state")["orders"])
        first = place(c, no)
        assert place(c, no) == first


def test_client_errors_are_not_retried(pay_settings: PaySettings) -> None:
    sleeps: list[float] = []
    with make_client(pay_settings, sleep=sleeps.append) as c, pytest.raises(PayApiError):
        c.query_order("NB_not_there")
    assert sleeps == []
