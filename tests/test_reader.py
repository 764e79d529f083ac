"""The reader pages: signed links, entitlement, escaping and the headers on every answer."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.etree import ElementTree

import bottle
import httpx
import pytest
from sqlalchemy import Engine

import bot.web.reader as reader_module
from bot.settings import Settings
from bot.web.links import ReaderLinks
from bot.web.reader import install, mask_openid
from storage import ledger
from storage.content import parse_issue_text
from storage.db import create_schema, make_engine, transaction
from storage.issues import publish_issue, upsert_issue
from storage.subscribers import ensure_subscriber

SECRET = "test-secret-0123456789"
OLD_SECRET = "old-secret-9876543210"
ALICE = "oAlice0123456789abcdefghWXYZ"  # has unlocked issue 1
BOB = "oBob5555555555555555555mnPQRS"  # has tokens but unlocked nothing
ALICE_MASKED = "oAli****WXYZ"

MARKER = "锁定内容标记XYZ"
LOCKED_SENTENCE = "付费部分的第二句话，免费读者绝对不应看到"
FREE_SENTENCE = "这是免费试读的第一段"
FREE_ISSUE_MARKER = "免费期全文标记FREE"

PAID_ISSUE = f"""+++
number = 1
title = "测试期：账本与<b>标题</b>"
summary = "一份用于测试的周刊。"
price = 99
free_percent = 30

[[topics]]
title = "第一个话题"
questions = ["问题甲是什么？", "问题乙怎么办？"]

[[topics]]
title = "第二个话题"
questions = ["问题丙为何重要？"]
+++

{FREE_SENTENCE}，介绍本期内容。原始标记 <script>alert("x")</script> 应当被转义。

{MARKER} 只出现在付费部分，这里开始的内容需要解锁才能阅读，我们把它写得足够长。

## 深入分析

{LOCKED_SENTENCE}。这一段继续展开，给出更多的细节、数字和方法，确保全文的字数足够多，
让第一段只占到全文的三成以内。我们再补充几句：成本、收益与取舍需要一笔一笔算清楚，
而这些正是付费读者才能看到的部分，也是本期真正的价值所在。最后一句用来凑足篇幅。
"""

FREE_ISSUE = f"""+++
number = 2
title = "免费的一期"
price = 0
free_percent = 10

[[topics]]
title = "免费话题"
questions = ["谁都能读吗？"]
+++

第一段是开放内容，任何人都能看到，这一段写得稍微长一点。

第二段同样开放，{FREE_ISSUE_MARKER} 出现在这里，因为本期价格为零。
"""

DRAFT_ISSUE = """+++
number = 3
title = "还没发布的草稿"
price = 10

[[topics]]
title = "草稿话题"
questions = ["草稿能被读到吗？"]
+++

草稿正文不应被任何人读到。
"""

NO_EXCERPT_ISSUE = """+++
number = 4
title = "没有试读的一期"
price = 50
free_percent = 0

[[topics]]
title = "全部付费"
questions = ["没有试读会怎样？"]
+++

这一期全部是付费内容，免费读者一个字也看不到。
"""


def make_settings(**reader: Any) -> Settings:
    return Settings.model_validate(
        {
            "reader": {"secret": SECRET, **reader},
            "server": {"public_url": "http://testserver"},
        }
    )


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
def links(settings: Settings) -> ReaderLinks:
    return ReaderLinks(settings)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    create_schema(eng)
    with transaction(eng) as s:
        for text, name in (
            (PAID_ISSUE, "paid"),
            (FREE_ISSUE, "free"),
            (DRAFT_ISSUE, "draft"),
            (NO_EXCERPT_ISSUE, "no-excerpt"),
        ):
            parsed = parse_issue_text(text, file=f"{name}.md", default_free_percent=10)
            assert upsert_issue(s, parsed=parsed, default_free_percent=10) == "created"
        for number in (1, 2, 4):
            publish_issue(s, number=number)
    with transaction(eng) as s:
        for openid in (ALICE, BOB):
            ensure_subscriber(s, openid=openid)
            ledger.credit(
                s,
                openid=openid,
                amount=500,
                kind="topup",
                key=f"topup-{openid}",
                reason="test top-up",
            )
    with transaction(eng) as s:
        result = ledger.redeem(s, openid=ALICE, issue_number=1, price=99, key="redeem-alice-1")
        assert result.status == "unlocked"
    yield eng
    eng.dispose()


def make_client(settings: Settings, engine: Engine) -> httpx.Client:
    app = bottle.Bottle()
    install(app, settings=settings, engine=engine)
    return httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://testserver")


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[httpx.Client]:
    with make_client(settings, engine) as c:
        yield c


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def assert_reader_response(resp: httpx.Response, status: int) -> str:
    """Status, the headers every reader answer carries, and a friendly HTML page."""
    assert resp.status_code == status, resp.text[:500]
    h = resp.headers
    assert h["content-type"] == "text/html; charset=utf-8"
    cache = h["cache-control"]
    assert "no-store" in cache and "private" in cache
    assert h["referrer-policy"] == "no-referrer"
    assert h["x-content-type-options"] == "nosniff"
    assert h["x-frame-options"] == "DENY"
    csp = h["content-security-policy"]
    assert csp.startswith("default-src 'none'; style-src 'unsafe-inline'; img-src data:")
    page = resp.text
    assert page.startswith("<!DOCTYPE html>")
    assert '<meta name="viewport"' in page
    assert "Traceback" not in page and "Exception" not in page
    return page


# ------------------------------------------------------------------ valid links


def test_entitled_reader_sees_full_text(client: httpx.Client, links: ReaderLinks) -> None:
    url = links.url(ALICE, 1)
    assert url.startswith("http://testserver/read/1?")
    page = assert_reader_response(client.get(url), 200)
    assert MARKER in page
    assert LOCKED_SENTENCE in page
    assert FREE_SENTENCE in page
    assert "免费试读到此结束" not in page
    assert "你已解锁本期" in page
    # title (escaped), number, topics and their questions at the top
    assert "测试期：账本与&lt;b&gt;标题&lt;/b&gt;" in page
    assert "<b>标题</b>" not in page
    assert "第 1 期" in page
    assert "<details" in page and "第一个话题" in page and "问题丙为何重要？" in page
    assert page.index("第一个话题") < page.index(FREE_SENTENCE)


def test_non_entitled_reader_sees_only_excerpt(client: httpx.Client, links: ReaderLinks) -> None:
    page = assert_reader_response(client.get(links.url(BOB, 1)), 200)
    assert FREE_SENTENCE in page
    assert MARKER not in page
    assert LOCKED_SENTENCE not in page
    assert "深入分析" not in page  # the locked heading
    assert "成本、收益与取舍" not in page
    # the unlock footer: price in the unit, how to unlock, and the balance command
    assert "免费试读到此结束" in page
    assert "99 豆" in page
    assert '<span class="cmd">兑换 1</span>' in page and "解锁后刷新本页" in page
    assert "余额" in page


def test_link_turns_into_full_text_after_unlocking(
    client: httpx.Client, links: ReaderLinks, engine: Engine
) -> None:
    url = links.url(BOB, 1)
    assert MARKER not in client.get(url).text
    with transaction(engine) as s:
        ledger.redeem(s, openid=BOB, issue_number=1, price=99, key="redeem-bob-1")
    assert MARKER in assert_reader_response(client.get(url), 200)


def test_free_issue_is_readable_by_anyone(client: httpx.Client, links: ReaderLinks) -> None:
    for openid in (ALICE, BOB, "oSomebodyWhoNeverPaidAnything"):
        page = assert_reader_response(client.get(links.url(openid, 2)), 200)
        assert FREE_ISSUE_MARKER in page
        assert "本期免费阅读" in page
        assert "免费试读到此结束" not in page


def test_issue_without_free_part_says_so(client: httpx.Client, links: ReaderLinks) -> None:
    page = assert_reader_response(client.get(links.url(BOB, 4)), 200)
    assert "本期没有免费试读部分" in page
    assert "免费读者一个字也看不到" not in page
    assert '<span class="cmd">兑换 4</span>' in page and "50 豆" in page


def test_raw_html_in_markdown_is_escaped(client: httpx.Client, links: ReaderLinks) -> None:
    for openid in (ALICE, BOB):
        page = client.get(links.url(openid, 1)).text
        assert "&lt;script&gt;" in page
        assert "<script" not in page.lower()


def test_watermark_masks_the_openid(client: httpx.Client, links: ReaderLinks) -> None:
    assert mask_openid(ALICE) == ALICE_MASKED
    page = client.get(links.url(ALICE, 1)).text
    layer = re.search(r'<div class="wm" aria-hidden="true" style="([^"]*)"></div>', page)
    assert layer is not None
    tile = re.fullmatch(r"background-image:url\('data:image/svg\+xml,([^'\s]*)'\)", layer[1])
    assert tile is not None
    svg = unquote(tile[1])
    assert svg.startswith("<svg ") and f">{ALICE_MASKED}</text>" in svg
    assert ALICE_MASKED in layer[1]  # legible in the source too
    assert "pointer-events: none" in page
    assert ALICE not in svg
    # The page never spells the openid out; only its signed links to the neighbouring issues
    # carry it, as the page's own address does.
    assert ALICE not in re.sub(r'href="/read/[0-9]+\?[^"]*"', "", page)
    # Without a valid link there is nobody to mark.
    assert 'class="wm"' not in client.get("/read/1").text


def test_watermark_escapes_odd_openids(engine: Engine, settings: Settings) -> None:
    odd = "o<'\"&>)x(;}{</style><script>x1234"
    with make_client(settings, engine) as c:
        page = assert_reader_response(c.get(ReaderLinks(settings).url(odd, 2)), 200)
    assert "<script" not in page and "</style><" not in page
    layer = re.search(r'<div class="wm" aria-hidden="true" style="([^"]*)"></div>', page)
    assert layer is not None
    tile = re.fullmatch(r"background-image:url\('data:image/svg\+xml,([^'\s()]*)'\)", layer[1])
    assert tile is not None
    svg = ElementTree.fromstring(unquote(tile[1]))  # well-formed: the id could not break out
    texts = [el.text for el in svg.iter() if el.tag.endswith("text")]
    assert texts == [mask_openid(odd)] == ["o<'\"****1234"]


def test_mask_openid_never_reveals_short_ids_whole() -> None:
    for openid in ("a", "abc", "abcd", "abcdefgh", "abcdefghijkl"):
        masked = mask_openid(openid)
        assert "****" in masked
        assert openid not in masked


def test_page_makes_no_external_requests(client: httpx.Client, links: ReaderLinks) -> None:
    for url in (links.url(ALICE, 1), links.url(BOB, 1), "/read/1?u=x&e=1&s=bad"):
        page = client.get(url).text
        assert "<script" not in page.lower()
        for tag in re.findall(
            r"<(?:link|script|img|iframe|source|video|audio)\b[^>]*>", page, re.I
        ):
            assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", tag, re.I)
        assert not re.search(r"url\(\s*[\"']?\s*(?:https?:)?//", page, re.I)
        assert "@import" not in page
        assert "@media (prefers-color-scheme: dark)" in page


# ------------------------------------------------------------------ refused links


def test_tampered_links_are_refused(client: httpx.Client, links: ReaderLinks) -> None:
    good = query_of(links.url(ALICE, 1))
    bob_sig = query_of(links.url(BOB, 1))["s"]
    flipped = good["s"][:-1] + ("A" if good["s"][-1] != "A" else "B")
    cases: dict[str, tuple[str, dict[str, str]]] = {
        "tampered signature": ("/read/1", {**good, "s": flipped}),
        "another user's openid": ("/read/1", {**good, "u": BOB}),
        "another user's signature": ("/read/1", {**good, "s": bob_sig}),
        "another issue": ("/read/2", good),
        "another paid issue": ("/read/4", good),
        "extended expiry": ("/read/1", {**good, "e": str(int(good["e"]) + 3600)}),
        "missing u": ("/read/1", {k: v for k, v in good.items() if k != "u"}),
        "missing e": ("/read/1", {k: v for k, v in good.items() if k != "e"}),
        "missing s": ("/read/1", {k: v for k, v in good.items() if k != "s"}),
        "no query": ("/read/1", {}),
        "non-integer expiry": ("/read/1", {**good, "e": "soon"}),
        "signed expiry with a plus": ("/read/1", {**good, "e": "+" + good["e"]}),
        "empty signature": ("/read/1", {**good, "s": ""}),
        "non-ASCII signature": ("/read/1", {**good, "s": "签名" * 20}),
        "overlong openid": ("/read/1", {**good, "u": "o" * 5000}),
        "huge issue number": ("/read/99999999999999999999999", good),
        "negative issue number": ("/read/-1", good),
    }
    for name, (path, params) in cases.items():
        resp = client.get(path, params=params)
        page = assert_reader_response(resp, 403)
        assert "链接无效" in page, name
        assert MARKER not in page and FREE_SENTENCE not in page, name


def test_repeated_parameters_are_refused(client: httpx.Client, links: ReaderLinks) -> None:
    url = links.url(ALICE, 1)
    page = assert_reader_response(client.get(url + "&u=" + BOB), 403)
    assert MARKER not in page
    page = assert_reader_response(client.get(url + "&u=" + ALICE), 403)
    assert MARKER not in page


def test_expired_link_says_so(client: httpx.Client, settings: Settings) -> None:
    ttl = settings.reader.link_ttl_hours * 3600
    url = ReaderLinks(settings).url(ALICE, 1, now=time.time() - ttl - 60)
    page = assert_reader_response(client.get(url), 403)
    assert "过期" in page
    assert '<span class="cmd">全文 1</span>' in page and "「试读 1」" in page
    assert MARKER not in page and FREE_SENTENCE not in page


def test_previous_secret_still_verifies(engine: Engine) -> None:
    rotated = make_settings(previous_secrets=[OLD_SECRET])
    old_links = ReaderLinks(make_settings(secret=OLD_SECRET))
    stranger = ReaderLinks(make_settings(secret="never-configured-secret-000"))
    with make_client(rotated, engine) as c:
        assert MARKER in assert_reader_response(c.get(old_links.url(ALICE, 1)), 200)
        assert MARKER in assert_reader_response(c.get(ReaderLinks(rotated).url(ALICE, 1)), 200)
        assert_reader_response(c.get(stranger.url(ALICE, 1)), 403)
    # Without previous_secrets, the old link no longer opens.
    with make_client(make_settings(), engine) as c:
        assert_reader_response(c.get(old_links.url(ALICE, 1)), 403)


# ------------------------------------------------------------------ missing issues and errors


def test_unknown_issue_is_404(client: httpx.Client, links: ReaderLinks) -> None:
    page = assert_reader_response(client.get(links.url(ALICE, 77)), 404)
    assert "没有找到" in page and "第 77 期" in page


def test_draft_issue_is_404_even_with_valid_signature(
    client: httpx.Client, links: ReaderLinks
) -> None:
    page = assert_reader_response(client.get(links.url(ALICE, 3)), 404)
    assert "草稿正文" not in page and "还没发布的草稿" not in page


def test_out_of_range_issue_number_with_valid_signature_is_404(
    client: httpx.Client, links: ReaderLinks
) -> None:
    assert_reader_response(client.get(links.url(ALICE, 10**20)), 404)
    assert_reader_response(client.get(links.url(ALICE, 0)), 404)


def test_other_reader_paths_are_friendly_404(client: httpx.Client) -> None:
    for path in ("/read", "/read/", "/read/abc", "/read/1/extra", "/read/1.5"):
        page = assert_reader_response(client.get(path), 404)
        assert "没有找到" in page, path


def test_unexpected_error_is_friendly_500_and_logged(
    client: httpx.Client,
    links: ReaderLinks,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database fell over")

    monkeypatch.setattr(reader_module, "read_issue", broken)
    with caplog.at_level(logging.ERROR, logger="bot.web.reader"):
        page = assert_reader_response(client.get(links.url(ALICE, 1)), 500)
    assert "database fell over" not in page
    assert "稍后" in page
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and errors[0].exc_info is not None
