"""The pay page in a real browser (Debian's Chromium, driven by Playwright) against the real
app on a loopback port and the fake WeChat Pay running as a process: a phone (390×844) and a
desktop (1280×800) pick a package, see the Native QR code, "pay" through the fake's own page
or control API, and the page says 到账 only once the notification has credited the order.
Inside WeChat (a MicroMessenger user agent, WeixinJSBridge stubbed) the JSAPI sheet's "ok"
alone is not believed.

Skipped like tests/test_reader_browser.py when Playwright or Chromium is missing, unless
``NEWSBOT_REQUIRE_BROWSER=1``; ``NEWSBOT_SCREENSHOT_DIR`` keeps the screenshots."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.conftest import SAMPLE_ISSUE, import_issue
from tests.pay_page_support import (
    READER,
    FakePayProcess,
    Site,
    balance,
    fake_pay_process,
    fund_readers,
    orders,
    pay_site,
)
from tests.pay_support import eventually
from tests.test_reader_browser import PHONE, _shot
from tests.test_reader_browser import browser as browser  # the fixture, shared

DESKTOP: dict[str, Any] = {"viewport": {"width": 1280, "height": 800}, "locale": "zh-CN"}
WECHAT_UA = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
             "(KHTML, like Gecko) Mobile/15E148 MicroMessenger/8.0.49(0x18003129) "
             "NetType/WIFI Language/zh_CN")
# WeChat injects WeixinJSBridge into its own browser; here a stub keeps the sheet's argument
# and callback for the test to answer as the sheet would.
BRIDGE = """
window.WeixinJSBridge = {
  invoke: function (name, args, done) {
    window.__sheet = {name: name, args: args};
    window.__answer = done;
  }
};
"""


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakePayProcess]:
    with fake_pay_process(tmp_path_factory.mktemp("fakepay")) as process:
        yield process


@pytest.fixture
def site(engine: Engine, fake: FakePayProcess) -> Iterator[Site]:
    import_issue(engine, SAMPLE_ISSUE)
    fund_readers(engine)
    with pay_site(engine, fake) as made:
        yield made


def _open(browser: Any, site: Site, options: dict[str, Any], path: str,
          *, init_script: str | None = None) -> tuple[Any, Any, list[str], list[str]]:
    """A new context at ``path``: (context, page, request URLs, console errors)."""
    context = browser.new_context(**options)
    if init_script:
        context.add_init_script(init_script)
    page = context.new_page()
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(site.url + path)
    return context, page, requests, errors


def _until(page: Any, expression: str, timeout: float = 10.0) -> None:
    # Page.wait_for_function evaluates strings with eval, which the page's CSP forbids.
    eventually(lambda: bool(page.evaluate(expression)), timeout=timeout)


def _status(page: Any) -> str:
    return str(page.locator("#status").inner_text())


def test_phone_pays_the_difference_and_reads_the_issue(browser: Any, site: Site) -> None:
    context, page, requests, errors = _open(browser, site, PHONE, site.page_path(issue=1))
    try:
        offer = page.locator("button.pkg.main")
        assert offer.is_visible() and "补差价并解锁第 1 期" in offer.inner_text()
        assert offer.bounding_box()["height"] >= 44  # a thumb's target
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        _shot(page, "pay-phone-offer")
        offer.click()
        qr = page.locator("img#qr")
        qr.wait_for(state="visible")
        box = qr.bounding_box()
        assert box["width"] >= 200 and box["x"] >= 0 and box["x"] + box["width"] <= 390
        assert "扫一扫" in _status(page) and "¥9.90" in _status(page)
        _shot(page, "pay-phone-qr")
        (order,) = orders(site.engine)
        assert order.issue_number == 1 and order.status == "pending"
        # The fake's own page "pays" it, opened from the demo link under the QR code.
        with context.expect_page() as opened:
            page.get_by_text("在假微信支付页面付款").click()
        wechat = opened.value
        wechat.wait_for_load_state()
        assert order.out_trade_no in wechat.content()
        wechat.get_by_role("button", name="确认支付").click()
        wechat.get_by_text("支付成功").first.wait_for()
        wechat.close()
        page.get_by_text("到账 +99 豆").wait_for(timeout=15_000)
        assert "已解锁第 1 期" in _status(page)
        assert page.locator("#balance").inner_text() == "20"  # 20 + 99 - 99
        _shot(page, "pay-phone-paid")
        page.get_by_text("阅读第 1 期全文").click()
        page.wait_for_load_state()
        assert "你已解锁本期" in page.content()
        assert not errors, errors  # no CSP violation, no script error
        ours = [u for u in requests if u.startswith(site.url + "/")]
        assert ours == requests, [u for u in requests if u not in ours]  # nothing from outside
    finally:
        context.close()


def test_desktop_tops_up_with_the_qr_code(browser: Any, site: Site) -> None:
    context, page, requests, errors = _open(browser, site, DESKTOP, site.page_path())
    try:
        assert page.locator("button.pkg.main").count() == 0  # no issue, no offer
        _shot(page, "pay-desktop")
        page.locator('button.pkg[data-package="p10"]').click()
        page.locator("img#qr").wait_for(state="visible")
        _shot(page, "pay-desktop-qr")
        (order,) = orders(site.engine)
        assert (order.kind, order.tokens, order.issue_number) == ("native", 10, None)
        time.sleep(2)  # the page keeps asking; nothing is paid yet
        assert "到账 +" not in _status(page)
        site.fake.pay(order.out_trade_no)
        page.get_by_text("到账 +10 豆").wait_for(timeout=15_000)
        assert page.locator("#balance").inner_text() == "30"
        assert balance(site.engine) == 30
        _shot(page, "pay-desktop-paid")
        assert not errors, errors
        assert all(u.startswith(site.url + "/") for u in requests), requests
    finally:
        context.close()


def test_in_wechat_the_sheets_ok_is_not_taken_for_payment(browser: Any, site: Site) -> None:
    context, page, _, errors = _open(browser, site, {**PHONE, "user_agent": WECHAT_UA},
                                     site.page_path(), init_script=BRIDGE)
    try:
        page.locator('button.pkg[data-package="p99"]').click()
        _until(page, "window.__sheet !== undefined")
        sheet = page.evaluate("window.__sheet")
        assert sheet["name"] == "getBrandWCPayRequest"
        assert sheet["args"]["signType"] == "RSA" and sheet["args"]["package"].startswith(
            "prepay_id=")
        (order,) = orders(site.engine)
        assert order.kind == "jsapi"
        # The sheet says ok, but WeChat has not been paid: the page waits for the bot.
        page.evaluate("window.__answer({err_msg: 'get_brand_wcpay_request:ok'})")
        page.get_by_text("正在确认到账").wait_for()
        time.sleep(2)
        assert "到账 +" not in _status(page) and balance(site.engine) == 20
        _shot(page, "pay-wechat-confirming")
        site.fake.pay(order.out_trade_no, READER)
        page.get_by_text("到账 +99 豆").wait_for(timeout=15_000)
        assert not errors, errors
    finally:
        context.close()


def test_in_someone_elses_wechat_the_page_says_whose_link_it_is(browser: Any,
                                                                site: Site) -> None:
    context, page, _, _ = _open(browser, site, {**PHONE, "user_agent": WECHAT_UA},
                                site.page_path(), init_script=BRIDGE)
    try:
        page.locator('button.pkg[data-package="p10"]').click()
        _until(page, "window.__answer !== undefined")
        page.evaluate("window.__answer({err_msg: 'get_brand_wcpay_request:fail',"
                      " err_desc: '下单账号与支付账号不一致'})")
        page.get_by_text("请在本人的微信中打开此链接").first.wait_for()
        _shot(page, "pay-wechat-other-payer")
        assert page.locator('button.pkg[data-package="p10"]').is_enabled()  # may try again
    finally:
        context.close()


def test_a_tampered_link_shows_the_refusal_page(browser: Any, site: Site) -> None:
    path = site.page_path().replace(f"u={READER}", "u=o_somebody_else")
    context, page, _, _ = _open(browser, site, PHONE, path)
    try:
        assert "链接无效" in page.content()
        _shot(page, "pay-phone-invalid")
    finally:
        context.close()
