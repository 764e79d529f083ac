"""The purchase page over HTTP: ``GET /pay/``, ``POST /pay/orders`` and the polling of
``GET /pay/orders/<no>``, through the real WSGI app on a loopback port, against the fake
WeChat Pay running as a process of its own (its notifications reach the real /pay/notify).
Every refusal is checked for what it leaves in the database: nothing, or an order the settle
job can finish."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
import tomllib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.hashes import SHA256
from sqlalchemy import Engine

from bot.app import create_app
from bot.jobs.pay_sync import sync_orders
from bot.pay import page as pay_page
from bot.pay.client import PayClient
from bot.pay.keys import load_private_key
from bot.web import policy
from bot.web.links import PayLinks, ReaderLinks
from storage.content import parse_issue_text
from storage.db import read_only, transaction
from storage.issues import publish_issue, upsert_issue
from storage.payments import require_order
from tests.conftest import (
    SAMPLE_DRAFT,
    SAMPLE_ISSUE,
    WeChatUser,
    child_env,
    client_for,
    free_port,
    import_issue,
    make_settings,
)
from tests.pay_page_support import (
    OTHER,
    READER,
    FakePayProcess,
    Site,
    balance,
    fake_pay_process,
    fund_readers,
    order_count,
    orders,
    pay_site,
)
from tests.pay_support import eventually
from tests.test_e2e import kill_group, newsbot, wait_healthy

PRICEY = 5  # an issue dearer than the largest package can cover


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakePayProcess]:
    with fake_pay_process(tmp_path_factory.mktemp("fakepay")) as process:
        yield process


@pytest.fixture
def site(engine: Engine, fake: FakePayProcess) -> Iterator[Site]:
    import_issue(engine, SAMPLE_ISSUE)  # issue 1, 99 tokens
    import_issue(engine, SAMPLE_DRAFT, publish=False)  # issue 2, a draft
    pricey = parse_issue_text(
        f'+++\nnumber = {PRICEY}\ntitle = "贵的一期"\nprice = 1000\n[[topics]]\n'
        'title = "贵"\nquestions = ["为什么这么贵？"]\n+++\n\n正文。\n',
        file="pricey.md", default_free_percent=10)
    with transaction(engine) as s:
        upsert_issue(s, parsed=pricey, default_free_percent=10)
        publish_issue(s, number=PRICEY)
    fund_readers(engine)
    with pay_site(engine, fake) as made:
        yield made


def create(site: Site, *, openid: str = READER, **body: Any) -> httpx.Response:
    payload = {**site.link_fields(openid), "package": "p99", "kind": "native", **body}
    return site.http.post("/pay/orders", json=payload)


def poll(site: Site, no: str, openid: str = READER) -> httpx.Response:
    return site.http.get(f"/pay/orders/{no}", params=site.link_fields(openid))


def refused(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert re.search(r"[\u4e00-\u9fff]", body["message"]), body  # said in Chinese
    return body


# -- the page ------------------------------------------------------------------------------

def test_the_page_lists_the_packages_and_the_balance(site: Site) -> None:
    response = site.http.get(site.page_path())
    assert response.status_code == 200
    text = response.text
    for label, price in (("10 豆", "¥1.00"), ("99 豆", "¥9.90"), ("300 豆（超值）", "¥28.00")):
        assert label in text and price in text
    assert '<b id="balance">20</b>' in text
    assert READER not in text.replace(f'data-u="{READER}"', "")  # only masked elsewhere
    csp = response.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "connect-src 'self'" in csp
    assert "default-src 'none'" in csp
    # Nothing outside this site: no src or href to another origin, no external script.
    assert not re.search(r'(?:src|href)="(?:https?:)?//', text)
    assert 'data-kind="native"' in text  # not inside WeChat


def test_inside_wechat_the_page_pays_with_the_jsapi_sheet(site: Site) -> None:
    ua = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Mobile/15E148 MicroMessenger/8.0.49(0x18003129) NetType/WIFI")
    response = site.http.get(site.page_path(), headers={"User-Agent": ua})
    assert 'data-kind="jsapi"' in response.text


def test_pay_without_slash_redirects_into_the_pay_directory(site: Site) -> None:
    # WeChat opens the JSAPI sheet only from pages under public_url + /pay/.
    query = urlsplit(site.page_path()).query
    response = site.http.get(f"/pay?{query}")
    assert response.status_code == 302
    assert response.headers["location"] == f"/pay/?{query}"


def test_a_shortfall_is_offered_as_one_step_with_the_smallest_covering_package(
        site: Site) -> None:
    text = site.http.get(site.page_path(issue=1)).text
    offer = text[text.index('<section class="offer">'):text.index("</section>")]
    assert "补差价并解锁第 1 期" in offer
    assert "还差 79 豆" in offer
    assert 'data-package="p99" data-issue="1"' in offer  # 99 covers 79; 10 does not; 300 costs more
    assert "解锁后余额 20 豆" in offer


def test_a_shortfall_no_package_covers_says_so(site: Site) -> None:
    text = site.http.get(site.page_path(issue=PRICEY)).text
    assert "差额超过最大的套餐" in text and '<section class="offer">' not in text
    assert "「兑换 5」" in text


def test_an_owned_issue_is_not_sold_again(site: Site) -> None:
    text = site.http.get(site.page_path(OTHER, issue=1)).text
    assert "你已可以阅读第 1 期全文" in text and '<section class="offer">' not in text
    assert "/read/1?" in text


def test_an_unknown_or_draft_issue_shows_only_the_packages(site: Site) -> None:
    for number in (2, 77):
        text = site.http.get(site.page_path(issue=number)).text
        assert "没有找到这一期" in text and '<section class="offer">' not in text
        assert 'data-package="p10"' in text


def _with(path: str, **changes: str) -> str:
    parts = urlsplit(path)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return parts.path + "?" + "&".join(f"{k}={v}" for k, v in query.items())


@pytest.mark.parametrize("change", [
    {"u": OTHER},  # someone else's account under this signature
    {"e": str(int(time.time()) + 10**6)},  # a longer life
    {"s": "A" * 43},
    {"s": "短"},  # not even base64
    {"e": "+1"},
])
def test_a_tampered_link_is_a_clear_4xx_page(site: Site, change: dict[str, str]) -> None:
    response = site.http.get(_with(site.page_path(), **change))
    assert response.status_code == 403
    assert "链接无效" in response.text and "充值" in response.text
    assert "data-package" not in response.text


def test_an_expired_link_says_so(site: Site) -> None:
    path = site.links.path_until(READER, int(time.time()) - 5)
    response = site.http.get(path)
    assert response.status_code == 403 and "链接已过期" in response.text


def test_a_reader_link_signature_does_not_open_the_pay_page(site: Site) -> None:
    reader = urlsplit(site.reader_links.path(READER, 1)).query
    response = site.http.get(f"/pay/?{reader}")
    assert response.status_code == 403


def test_a_link_without_fields_is_refused(site: Site) -> None:
    assert site.http.get("/pay/").status_code == 403
    assert site.http.get("/pay/?u=x&u=y&e=1&s=" + "A" * 43).status_code == 403


def test_without_pay_there_is_no_page_and_no_endpoint(engine: Engine) -> None:
    with client_for(create_app(make_settings(), engine)) as http:
        assert http.get("/pay/").status_code == 404
        assert http.get("/pay").status_code == 404
        assert http.post("/pay/orders", json={}).status_code == 404
        assert http.get("/pay/orders/NB0000000001").status_code == 404


# -- the pay link in replies ---------------------------------------------------------------

def test_replies_carry_the_pay_link_only_with_pay(engine: Engine, site: Site) -> None:
    with client_for(create_app(site.settings, engine)) as http:
        user = WeChatUser(http, READER)
        topup = user.send("充值")["content"]
        short = user.send("兑换 1")["content"]
    link = re.search(r"http://127\.0\.0\.1:\d+/pay/\?\S+", topup)
    assert link is not None and "issue=" not in link.group(0)
    assert "微信支付" in topup
    unlock = re.search(r"http://127\.0\.0\.1:\d+/pay/\?\S+", short)
    assert unlock is not None and "issue=1" in unlock.group(0) and "第 1 期" in short
    # The link in the reply opens the reader's own page.
    page = site.http.get(unlock.group(0).removeprefix(site.url))
    assert page.status_code == 200 and "补差价并解锁第 1 期" in page.text
    with client_for(create_app(make_settings(), engine)) as http:
        user = WeChatUser(http, READER)
        for text in (user.send("充值")["content"], user.send("兑换 1")["content"]):
            assert "/pay" not in text and "支付" not in text


# -- POST /pay/orders: refusals ------------------------------------------------------------

def _nothing_made(site: Site, before: dict[str, str]) -> None:
    assert order_count(site.engine) == 0
    assert site.fake.orders() == before  # WeChat was not called


def test_bad_json_is_a_400(site: Site) -> None:
    before = site.fake.orders()
    for raw in (b"{", b"[]", b'"x"', "不是 JSON".encode()):
        response = site.http.post("/pay/orders", content=raw,
                                  headers={"Content-Type": "application/json"})
        refused(response, 400, "BAD_REQUEST")
    refused(site.http.post("/pay/orders", content=b"{" + b" " * 5000 + b"}"), 413, "TOO_LARGE")
    _nothing_made(site, before)


@pytest.mark.parametrize("change", [
    {"u": OTHER}, {"s": "A" * 43}, {"e": int(time.time()) + 10**6}, {"s": None},
    {"u": ["x"]}, {"e": True},
])
def test_a_tampered_link_cannot_order(site: Site, change: dict[str, Any]) -> None:
    before = site.fake.orders()
    refused(create(site, **change), 403, "LINK_INVALID")
    _nothing_made(site, before)


def test_an_expired_link_cannot_order(site: Site) -> None:
    before = site.fake.orders()
    fields = {"u": READER, "e": int(time.time()) - 1}
    fields["s"] = parse_qs(urlsplit(site.links.path_until(READER, fields["e"])).query)["s"][0]
    refused(create(site, **fields), 403, "LINK_EXPIRED")
    _nothing_made(site, before)


@pytest.mark.parametrize("package", ["p11", "", None, 99, ["p99"]])
def test_an_unknown_package_is_refused(site: Site, package: Any) -> None:
    before = site.fake.orders()
    refused(create(site, package=package), 400, "UNKNOWN_PACKAGE")
    _nothing_made(site, before)


def test_a_bad_kind_is_refused(site: Site) -> None:
    refused(create(site, kind="app"), 400, "BAD_REQUEST")
    assert order_count(site.engine) == 0


@pytest.mark.parametrize("issue", [2, 77, 0, -1, "1", 1.0, True])
def test_only_a_published_issue_can_be_bought(site: Site, issue: Any) -> None:
    refused(create(site, issue=issue), 404, "UNKNOWN_ISSUE")
    assert order_count(site.engine) == 0


def test_an_owned_issue_cannot_be_bought_again(site: Site) -> None:
    refused(create(site, openid=OTHER, issue=1), 409, "ALREADY_OWNED")
    assert order_count(site.engine) == 0


def test_a_package_that_cannot_unlock_the_issue_is_refused(site: Site) -> None:
    refused(create(site, issue=1, package="p10"), 400, "PACKAGE_TOO_SMALL")  # 20 + 10 < 99
    assert order_count(site.engine) == 0


# -- POST /pay/orders: made ----------------------------------------------------------------

def test_a_native_order_answers_a_code_url_and_its_qr(site: Site) -> None:
    response = create(site)
    assert response.status_code == 200, response.text
    made = response.json()
    assert made["code_url"].startswith("weixin://wxpay/bizpayurl?pr=")
    assert made["qr"].startswith("data:image/svg+xml")
    assert "<svg" in unquote(made["qr"])
    assert made["demo_pay_url"] == f"{site.fake.base_url}/pay/{made['out_trade_no']}"
    (order,) = orders(site.engine)
    assert (order.status, order.kind, order.tokens, order.amount_fen, order.code_url) == (
        "pending", "native", 99, 990, made["code_url"])
    assert json.loads(order.request_json)["notify_url"] == f"{site.url}/pay/notify"
    assert site.fake.orders()[made["out_trade_no"]] == "NOTPAY"


def test_a_jsapi_order_answers_the_signed_sheet_arguments(site: Site) -> None:
    response = create(site, kind="jsapi", issue=1)
    assert response.status_code == 200, response.text
    made = response.json()
    sheet = made["jsapi"]
    (order,) = orders(site.engine)
    assert sheet["package"] == f"prepay_id={order.prepay_id}"
    assert sheet["appId"] == site.settings.pay.app_id  # type: ignore[union-attr]
    assert sheet["signType"] == "RSA"
    assert abs(int(sheet["timeStamp"]) - time.time()) < 60
    message = "".join(f"{sheet[k]}\n" for k in ("appId", "timeStamp", "nonceStr", "package"))
    merchant = load_private_key(Path(site.fake.table["merchant_private_key_file"]))
    merchant.public_key().verify(base64.b64decode(sheet["paySign"]), message.encode(),
                                 PKCS1v15(), SHA256())
    body = json.loads(order.request_json)
    assert body["payer"] == {"openid": READER} and order.issue_number == 1
    assert "解锁第1期" in body["description"]


def test_a_native_order_paid_through_the_fake_is_credited_and_polled(site: Site) -> None:
    made = create(site).json()
    no = made["out_trade_no"]
    assert poll(site, no).json()["status"] == "pending"
    site.fake.pay(no)
    eventually(lambda: poll(site, no).json()["status"] == "paid", timeout=10)
    state = poll(site, no).json()
    assert (state["tokens"], state["balance"], state["issue"], state["unlocked"]) == (
        99, 119, None, False)
    assert balance(site.engine) == 119


def test_buy_and_unlock_through_the_fake_unlocks_and_links_the_issue(site: Site) -> None:
    no = create(site, kind="jsapi", issue=1).json()["out_trade_no"]
    site.fake.pay(no, READER)
    eventually(lambda: poll(site, no).json()["status"] == "paid", timeout=10)
    state = poll(site, no).json()
    assert state["unlocked"] is True and state["balance"] == 20  # 20 + 99 - 99
    read = site.http.get(state["read_url"])
    assert read.status_code == 200 and "你已解锁本期" in read.text


def test_the_fake_refuses_another_payer_for_a_jsapi_order(site: Site) -> None:
    no = create(site, kind="jsapi").json()["out_trade_no"]
    response = site.fake.http.post(f"{site.fake.base_url}/pay/{no}", data={"openid": OTHER})
    assert "下单账号与支付账号不一致" in response.text
    assert poll(site, no).json()["status"] == "pending" and balance(site.engine) == 20


# -- WeChat Pay failing while the order is created -----------------------------------------

def _sync(site: Site) -> list[tuple[str, str]]:
    """One run of the settle job (bot.jobs.pay_sync), whatever the orders' age."""
    assert site.settings.pay is not None
    with PayClient.from_settings(site.settings.pay) as client:
        report = sync_orders(site.engine, client, min_age=timedelta(0),
                             min_interval=timedelta(0))
    return [(s.out_trade_no, s.outcome) for s in report.orders]


def test_a_wechat_5xx_leaves_an_order_the_settle_job_can_finish(site: Site) -> None:
    site.fake.control("fail_next", status=500, code="SYSTEM_ERROR", times=3)
    body = refused(create(site), 503, "PAY_UNAVAILABLE")
    assert "稍后再试" in body["message"]
    (order,) = orders(site.engine)
    # Maybe processed: still "creating", with the exact body a query or a retry needs.
    assert order.status == "creating" and order.code_url is None
    assert json.loads(order.request_json)["out_trade_no"] == order.out_trade_no
    assert order.out_trade_no not in site.fake.orders()
    # The job asks WeChat, which never made it: closed, nothing credited.
    assert _sync(site) == [(order.out_trade_no, "closed")]
    (order,) = orders(site.engine)
    assert order.status == "closed" and balance(site.engine) == 20


def test_a_5xx_after_wechat_made_the_order_is_settled_by_the_job(site: Site) -> None:
    site.fake.control("fail_next", status=500, code="SYSTEM_ERROR", times=3,
                      after_processing=True)
    refused(create(site), 503, "PAY_UNAVAILABLE")
    (order,) = orders(site.engine)
    assert order.status == "creating"
    assert site.fake.orders()[order.out_trade_no] == "NOTPAY"  # WeChat knows it; we can ask
    assert _sync(site) == [(order.out_trade_no, "pending")]
    # Paid anyway (say the payer had the code), and its notification never comes.
    site.fake.control("misbehave_next", kinds=["drop"])
    site.fake.pay(order.out_trade_no)
    assert _sync(site) == [(order.out_trade_no, "credited")]
    assert poll(site, order.out_trade_no).json()["status"] == "paid"
    assert balance(site.engine) == 119


def test_a_definite_refusal_marks_the_order_failed(site: Site) -> None:
    site.fake.control("fail_next", status=400, code="PARAM_ERROR")
    refused(create(site), 502, "PAY_REFUSED")
    (order,) = orders(site.engine)
    assert order.status == "failed" and "PARAM_ERROR" in (order.error or "")


def test_wechat_unreachable_marks_the_order_failed(engine: Engine, site: Site,
                                                   fake: FakePayProcess) -> None:
    with pay_site(engine, fake, api_base="http://127.0.0.1:9") as down:
        refused(create(down), 503, "PAY_UNAVAILABLE")
    (order,) = orders(engine)
    assert order.status == "failed"  # refused connection: WeChat never saw it


def test_a_timeout_leaves_the_order_creating(engine: Engine, site: Site) -> None:
    pay = site.settings.pay
    assert pay is not None
    client = PayClient.from_settings(pay, read_timeout_s=0.3, max_retries=1,
                                     sleep=lambda s: None)
    app = policy.App()
    pay_page.install(app, settings=site.settings, engine=engine, client=client)
    site.fake.control("delay_next", seconds=1.0, times=2)
    with client, client_for(app) as http:
        response = http.post("/pay/orders", json={**site.link_fields(), "package": "p99",
                                                  "kind": "native"})
    refused(response, 503, "PAY_UNAVAILABLE")
    (order,) = orders(engine)
    assert order.status == "creating"  # a read timeout may come after WeChat made it


def test_orders_in_a_burst_are_capped(site: Site) -> None:
    for _ in range(pay_page.ORDER_BURST):
        assert create(site).status_code == 200
    refused(create(site), 429, "TOO_MANY_ORDERS")
    assert order_count(site.engine) == pay_page.ORDER_BURST


# -- polling -------------------------------------------------------------------------------

def test_only_the_owner_can_poll_an_order(site: Site) -> None:
    no = create(site).json()["out_trade_no"]
    assert poll(site, no).status_code == 200
    refused(poll(site, no, OTHER), 404, "UNKNOWN_ORDER")  # a good link, but not the owner's
    fields = {**site.link_fields(), "u": OTHER}
    refused(site.http.get(f"/pay/orders/{no}", params=fields), 403, "LINK_INVALID")
    refused(site.http.get(f"/pay/orders/{no}"), 403, "LINK_INVALID")
    refused(poll(site, "NB00000000000000000000000000"), 404, "UNKNOWN_ORDER")
    refused(poll(site, "订单"), 404, "UNKNOWN_ORDER")


def test_the_poll_never_reports_more_than_the_order(site: Site) -> None:
    no = create(site).json()["out_trade_no"]
    state = poll(site, no).json()
    assert set(state) == {"out_trade_no", "status", "tokens", "price", "issue", "unlocked"}
    with read_only(site.engine) as s:
        assert require_order(s, out_trade_no=no).openid == READER


def test_pay_links_sign_the_openid_and_expiry_only(site: Site) -> None:
    links = PayLinks(site.settings)
    a = parse_qs(urlsplit(links.path_until(READER, 2_000_000_000, 1)).query)
    b = parse_qs(urlsplit(links.path_until(READER, 2_000_000_000)).query)
    assert a["s"] == b["s"] and a["issue"] == ["1"] and "issue" not in b
    reader = parse_qs(urlsplit(ReaderLinks(site.settings).path_until(READER, 1,
                                                                     2_000_000_000)).query)
    assert reader["s"] != a["s"]


# -- newsbot demo --------------------------------------------------------------------------

def test_the_demo_pays_through_its_fake_wechat_pay(tmp_path: Path) -> None:
    port, workdir, log = free_port(), tmp_path / "demo", tmp_path / "demo.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            newsbot("demo", "--no-chat", "--port", str(port), "--dir", str(workdir)),
            cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(proc, base, log)
        config = tomllib.loads((workdir / "config.toml").read_text(encoding="utf-8"))
        assert config["pay"]["api_base"].startswith("http://127.0.0.1:")
        with httpx.Client(base_url=base, timeout=10.0) as http:
            reply = WeChatUser(http, "o_demo_reader", token=config["wechat"]["token"]).send(
                "充值")["content"]
            link = re.search(rf"{re.escape(base)}(/pay/\?\S+)", reply)
            assert link is not None, reply
            fields = dict(httpx.URL(link.group(1)).params)
            assert http.get(link.group(1)).status_code == 200
            made = http.post("/pay/orders", json={**fields, "package": "p30",
                                                  "kind": "native"}).json()
            # What the newcomer clicks under the QR code: the fake's own page, then 确认支付.
            assert "确认支付" in http.get(made["demo_pay_url"]).text
            http.post(made["demo_pay_url"], data={"openid": ""})
            state = f"/pay/orders/{made['out_trade_no']}"
            eventually(lambda: http.get(state, params=fields).json()["status"] == "paid",
                       timeout=15)
            assert http.get(state, params=fields).json()["balance"] == 150  # 120 + 30
    finally:
        kill_group(proc)
