"""The reader pages in a real browser: Debian's Chromium driven by Playwright at a phone's
viewport (390×844 CSS px, 3× pixels, mobile), against the real WSGI app on a loopback port.

Skipped when Playwright or Chromium is missing, unless ``NEWSBOT_REQUIRE_BROWSER=1`` (as in
.ci/run), which turns the skip into a failure. ``NEWSBOT_SCREENSHOT_DIR`` keeps the phone-size
screenshots for a person to look at."""

from __future__ import annotations

import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from sqlalchemy import Engine

from bot.app import create_app
from bot.web.links import ReaderLinks
from storage import ledger
from storage.content import parse_issue_text
from storage.db import transaction
from storage.issues import publish_issue, upsert_issue
from storage.subscribers import ensure_subscriber
from tests.conftest import SAMPLE_DRAFT, SAMPLE_ISSUE, free_port, import_issue, make_settings

# Read at import: some test modules clear NEWSBOT_* from the environment.
REQUIRE_BROWSER = os.environ.get("NEWSBOT_REQUIRE_BROWSER") == "1"
SCREENSHOT_DIR = os.environ.get("NEWSBOT_SCREENSHOT_DIR")
CHROMIUM = os.environ.get("NEWSBOT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

PHONE: dict[str, Any] = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 3,
                         "is_mobile": True, "has_touch": True, "locale": "zh-CN"}
PUBLICATION = "深潮周刊"
PAID = "o_browser_paid_000001"  # has unlocked issue 1
FREE = "o_browser_free_000002"
HOST = "img.example.com"


def _missing(why: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"NEWSBOT_REQUIRE_BROWSER=1 but {why}")
    pytest.skip(why)


def _png(width: int, height: int) -> bytes:
    """A small grey PNG, so a routed image request gets a real picture."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + b"\x99" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                            0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's idle keep-alive connection must not hold a test up


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def site(engine: Engine) -> Iterator[tuple[str, ReaderLinks]]:
    """The real app on a loopback port with both sample issues published, issue 3 carrying a
    picture from the listed image host, and a reader who unlocked issue 1."""
    import_issue(engine, SAMPLE_ISSUE)
    import_issue(engine, SAMPLE_DRAFT)
    picture = parse_issue_text(
        '+++\nnumber = 3\ntitle = "带图的一期"\nprice = 0\n[[topics]]\ntitle = "图"\n'
        'questions = ["图能显示吗？"]\n+++\n\n图前的一段文字。\n\n'
        f'![示意图](https://{HOST}/chart.png)\n\n图后的一段文字。\n',
        file="picture.md", default_free_percent=10)
    with transaction(engine) as s:
        upsert_issue(s, parsed=picture, default_free_percent=10)
        publish_issue(s, number=3)
        ensure_subscriber(s, openid=PAID)
        ledger.credit(s, openid=PAID, amount=200, kind="topup", key="browser-topup",
                      reason="browser test")
    with transaction(engine) as s:
        ledger.redeem(s, openid=PAID, issue_number=1, price=99, key="browser-redeem")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = make_settings(server={"public_url": base}, content={"publication": PUBLICATION},
                             reader={"image_hosts": [HOST]})
    server = make_server("127.0.0.1", port, create_app(settings, engine),
                         server_class=_Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base, ReaderLinks(settings)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def phone(browser: Any, site: tuple[str, ReaderLinks]) -> Iterator[tuple[Any, list[str]]]:
    """A phone-sized page that records every request it makes and answers image requests to
    any https host itself (there is no network here), so only the CSP can stop a picture."""
    context = browser.new_context(**PHONE)
    requests: list[str] = []
    context.on("request", lambda r: requests.append(r.url))
    context.route("https://**/*.png", lambda route: route.fulfill(
        status=200, content_type="image/png", body=_png(120, 60)))
    page = context.new_page()
    yield page, requests
    context.close()


def _shot(page: Any, name: str) -> None:
    if SCREENSHOT_DIR:
        Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOT_DIR) / f"{name}.png"))


def _page_width(page: Any) -> int:
    return int(page.evaluate("document.documentElement.scrollWidth"))


def test_first_screen_shows_the_article_and_tables_scroll_inside(
    phone: tuple[Any, list[str]], site: tuple[str, ReaderLinks]
) -> None:
    page, requests = phone
    base, links = site
    resp = page.goto(links.url(PAID, 1))
    assert resp is not None and resp.status == 200
    _shot(page, "reader-unlocked")
    assert page.title() == f"第1期｜AI客服的真实账本，与订阅经济的退潮 · {PUBLICATION}"
    # Some paragraph of the article starts on the first phone screen.
    tops = page.eval_on_selector_all("article p",
                                     "ps => ps.map(p => p.getBoundingClientRect().top)")
    assert tops and min(tops) < 844, tops[:3]
    style = page.eval_on_selector(
        "article p", "p => [getComputedStyle(p).fontSize, getComputedStyle(p).lineHeight]")
    assert style == ["17px", "29.75px"]  # 17px at 1.75
    assert page.eval_on_selector("details.topics", "d => d.open") is False
    # The 4-column table scrolls in its own box; the page itself never gets wider.
    assert _page_width(page) <= 390
    box = page.eval_on_selector(".table", "t => [t.scrollWidth, t.clientWidth]")
    assert box[0] > box[1] and box[1] <= 390, box
    page.eval_on_selector(".table", "t => t.scrollIntoView()")
    _shot(page, "reader-table")
    page.eval_on_selector(".table", "t => { t.scrollLeft = 1000; }")
    assert page.eval_on_selector(".table", "t => t.scrollLeft") > 0
    assert _page_width(page) <= 390
    assert all(u.startswith(base + "/") for u in requests), requests  # nothing from outside


def test_previous_and_next_links_work(
    phone: tuple[Any, list[str]], site: tuple[str, ReaderLinks]
) -> None:
    page, _ = phone
    _, links = site
    page.goto(links.url(FREE, 1))
    assert page.locator(".pager .prev.none").inner_text() == "已是第一期"
    with page.expect_navigation():
        page.click("a[rel=next]")
    assert "/read/2?" in page.url
    assert page.locator("h1").inner_text() == "手机里的大模型、县城咖啡与老车间"
    assert page.locator(".unlock .cmd").inner_text() == "兑换 2"
    page.locator(".pager").scroll_into_view_if_needed()
    _shot(page, "reader-excerpt-end")
    with page.expect_navigation():
        page.click("a[rel=prev]")
    assert "/read/1?" in page.url and "免费试读" in page.locator(".status").inner_text()


def test_images_load_from_listed_hosts_only(
    phone: tuple[Any, list[str]], site: tuple[str, ReaderLinks]
) -> None:
    page, requests = phone
    base, links = site
    page.goto(links.url(FREE, 3))
    page.wait_for_load_state("load")
    img = page.locator("article img")
    _shot(page, "reader-image")
    assert img.get_attribute("alt") == "示意图"
    assert img.evaluate("i => i.complete && i.naturalWidth") == 120  # allowed by the CSP
    # A picture from any other host would be answered too, but the page's CSP refuses it.
    other = page.evaluate("""() => new Promise(done => {
        let violated = "";
        document.addEventListener("securitypolicyviolation",
                                  e => { violated = e.effectiveDirective; });
        const i = new Image();
        i.onload = () => done("loaded");
        i.onerror = () => setTimeout(() => done("blocked by " + violated), 50);
        i.src = "https://elsewhere.example.net/x.png";
        document.body.appendChild(i);
    })""")
    assert other == "blocked by img-src"
    assert requests[0].startswith(f"{base}/read/3?") and f"https://{HOST}/chart.png" in requests


@pytest.mark.parametrize(
    ("case", "status", "heading", "reply"),
    [("expired", 403, "链接已过期", "全文 1"), ("invalid", 403, "链接无效", "全文 1"),
     ("unknown", 404, "没有找到这一期", "往期")],
)
def test_error_pages_render(
    phone: tuple[Any, list[str]], site: tuple[str, ReaderLinks],
    case: str, status: int, heading: str, reply: str,
) -> None:
    page, _ = phone
    _, links = site
    url = {"expired": links.url(FREE, 1, now=time.time() - 10**6),
           "invalid": links.url(FREE, 1).replace("s=", "s=AAAA"),
           "unknown": links.url(FREE, 42)}[case]
    resp = page.goto(url)
    assert resp is not None and resp.status == status
    _shot(page, f"error-{case}")
    assert page.title() == f"{heading} · {PUBLICATION}"
    assert page.locator("h1").inner_text() == heading
    assert page.locator(".masthead .pub").inner_text() == PUBLICATION
    bubble = page.locator(".reply .cmd")
    assert bubble.inner_text() == reply and bubble.is_visible()
    assert bubble.bounding_box()["y"] < 844
    assert _page_width(page) <= 390


def test_dark_mode_follows_the_phone(browser: Any, site: tuple[str, ReaderLinks]) -> None:
    _, links = site
    context = browser.new_context(**PHONE, color_scheme="dark")
    try:
        page = context.new_page()
        page.goto(links.url(PAID, 1))
        _shot(page, "reader-dark")
        bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert bg == "rgb(25, 25, 25)"
    finally:
        context.close()
