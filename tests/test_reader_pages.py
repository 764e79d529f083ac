"""What a reader sees (issue 7): a short 试读 bubble whose link carries the whole free excerpt,
a reader page that names the publication and starts with the article, previous/next issues,
wide tables in their own scrolling box, real error pages, and the image policy (CSP hosts from
``[reader] image_hosts``, refused at import, never a broken picture). Through the real WSGI app
(signed XML for the chat), the real CLI for imports."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import Engine
from typer.testing import CliRunner

import bot.web.reader as reader_module
from bot.app import create_app
from bot.cli import app as cli_app
from bot.settings import Settings
from bot.web.links import ReaderLinks
from storage.content import parse_issue_text, plain_text
from storage.db import transaction
from storage.images import check_images, image_problems
from storage.issues import get_issue, publish_issue, upsert_issue
from tests.conftest import (
    SAMPLE_DRAFT,
    SAMPLE_ISSUE,
    TOKEN,
    WeChatUser,
    import_issue,
    make_settings,
)

PUBLICATION = "深潮周刊"
READER = "o_pages_reader_0001"
HOST = "img.example.com"


def squash(text: str) -> str:
    return "".join(text.split())


def article_text(page: str) -> str:
    """The visible text of the page's article, tags dropped."""
    m = re.search(r'<article class="[^"]*">(.*?)</article>', page, re.S)
    assert m is not None, page[:300]
    return unescape(re.sub(r"<[^>]+>", "", m[1]))


def issue_text(number: int, body: str, *, price: int = 30, free_percent: int = 30,
               title: str | None = None) -> str:
    return (
        f'+++\nnumber = {number}\ntitle = "{title or f"第{number}期的标题"}"\nprice = {price}\n'
        f'free_percent = {free_percent}\nsummary = "一句话摘要。"\n'
        '[[topics]]\ntitle = "话题"\nquestions = ["问题？"]\n+++\n\n' + body
    )


def store(engine: Engine, text: str, *, publish: bool = True) -> None:
    parsed = parse_issue_text(text, file="t.md", default_free_percent=10)
    with transaction(engine) as s:
        upsert_issue(s, parsed=parsed, default_free_percent=10)
        if publish:
            publish_issue(s, number=parsed.number)


@pytest.fixture
def settings() -> Settings:
    return make_settings(content={"publication": PUBLICATION})


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[httpx.Client]:
    with httpx.Client(transport=httpx.WSGITransport(app=create_app(settings, engine)),
                      base_url="http://testserver") as c:
        yield c


@pytest.fixture
def links(settings: Settings) -> ReaderLinks:
    return ReaderLinks(settings)


@pytest.fixture
def two_issues(engine: Engine) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    import_issue(engine, SAMPLE_DRAFT)  # published here: issue 2 is the neighbour of 1


# ------------------------------------------------------------------ 1. 试读: a taste + the page


def test_preview_bubble_is_a_short_taste_and_the_page_has_the_whole_excerpt(
    client: httpx.Client, engine: Engine, two_issues: None
) -> None:
    user = WeChatUser(client, READER)
    user.send("帮助")  # takes the one-time 新一期已发布 note (push mode off)
    content = user.send("试读 1")["content"]
    # About one phone screen: title, ~120 字, the link and what to do next (was ~2,000 bytes).
    assert len(content.encode()) <= 800, len(content.encode())
    head, taste, *_ = content.split("\n\n")
    assert head.startswith("📖 试读｜第1期")
    assert taste.endswith("…") and len(squash(taste.rstrip("…"))) <= 120
    with transaction(engine) as s:
        excerpt = plain_text(get_issue(s, number=1, default_free_percent=10).excerpt_md)
    assert squash(excerpt).startswith(squash(taste.rstrip("…")))
    assert "回复「兑换 1」" in content
    [link] = re.findall(r"http://testserver/read/1\?\S+", content)

    page = client.get(link).text
    shown = squash(article_text(page))
    assert shown == squash(excerpt)  # every 字 of the free excerpt, and nothing beyond it
    assert len(shown) >= 4 * len(squash(taste))


# ------------------------------------------------------------------ 2. the reader page


def test_page_names_the_publication_and_starts_with_the_article(
    client: httpx.Client, links: ReaderLinks, engine: Engine, two_issues: None
) -> None:
    page = client.get(links.url(READER, 1)).text
    with transaction(engine) as s:
        issue = get_issue(s, number=1, default_free_percent=10)
    minutes = math.ceil(issue.char_count / 400)
    assert f"<title>第1期｜{issue.title} · {PUBLICATION}</title>" in page
    assert f'<header class="masthead"><span class="pub">{PUBLICATION}</span>' in page
    meta = re.search(r'<p class="meta">(.*?)</p>', page)
    assert meta is not None
    assert re.sub(r"<[^>]+>", "|", meta[1]).strip("|").split("||") == [
        PUBLICATION, "2026年11月23日", f"全文约 {minutes} 分钟"]
    # The topics are one collapsed line after the summary, before the article.
    details = re.search(r"<details[^>]*>", page)
    assert details is not None and details[0] == '<details class="topics">'
    assert page.index('class="lede"') < page.index("<details") < page.index("<article")


def test_unlocked_page_shows_reading_time_of_the_full_text(
    client: httpx.Client, links: ReaderLinks, engine: Engine
) -> None:
    store(engine, issue_text(1, "字" * 1201 + "。", price=0))
    page = client.get(links.url(READER, 1)).text
    assert "<span>约 4 分钟</span>" in page and "本期免费阅读" in page


def test_wide_tables_scroll_inside_their_own_box(
    client: httpx.Client, links: ReaderLinks, engine: Engine
) -> None:
    table = ("| 项目 | 上线前 | 上线后 | 说明 |\n|---|---|---|---|\n"
             "| 人力 | 720万元 | 480万元 | 分流 |\n")
    store(engine, issue_text(1, table + "\n正文一段。", price=0))
    page = client.get(links.url(READER, 1)).text
    assert '<div class="table"><table>' in page and "</table></div>" in page
    rule = re.search(r"\.table \{([^}]*)\}", page)
    assert rule is not None and "overflow-x: auto" in rule[1]


def test_previous_and_next_issue_links_open_and_keep_the_expiry(
    client: httpx.Client, links: ReaderLinks, engine: Engine, two_issues: None
) -> None:
    store(engine, issue_text(3, "草稿正文。"), publish=False)  # a draft is nobody's neighbour
    url = links.url(READER, 1, now=time.time() - 3600)
    expires = parse_qs(urlsplit(url).query)["e"][0]
    first = client.get(url).text
    assert "已是第一期" in first and 'rel="prev"' not in first
    nxt = re.search(r'<a class="next" rel="next" href="([^"]+)">', first)
    assert nxt is not None
    href = unescape(nxt[1])
    assert href.startswith("/read/2?") and parse_qs(urlsplit(href).query)["e"] == [expires]
    second = client.get(href)
    assert second.status_code == 200
    assert "第 2 期" in second.text and "手机里的大模型" in second.text
    assert "已是最新一期" in second.text and 'rel="next"' not in second.text
    prev = re.search(r'<a class="prev" rel="prev" href="([^"]+)">', second.text)
    assert prev is not None and unescape(prev[1]).startswith("/read/1?")
    assert client.get(unescape(prev[1])).status_code == 200


@pytest.mark.parametrize(
    ("case", "status", "heading", "reply"),
    [
        ("expired", 403, "链接已过期", "全文 1"),
        ("bad signature", 403, "链接无效", "全文 1"),
        ("unknown issue", 404, "没有找到这一期", "往期"),
    ],
)
def test_error_pages_are_small_real_pages(
    client: httpx.Client, links: ReaderLinks, two_issues: None,
    case: str, status: int, heading: str, reply: str,
) -> None:
    url = {
        "expired": links.url(READER, 1, now=time.time() - 10**6),
        "bad signature": links.url(READER, 1).replace("s=", "s=AAAA"),
        "unknown issue": links.url(READER, 99),
    }[case]
    resp = client.get(url)
    assert resp.status_code == status
    page = resp.text
    assert f"<title>{heading} · {PUBLICATION}</title>" in page
    assert f'<span class="pub">{PUBLICATION}</span>' in page
    assert f"<h1>{heading}</h1>" in page
    assert f'<span class="cmd">{reply}</span>' in page  # what to send in the chat
    assert f"错误代码 {status}" in page and "<style>" in page


def test_server_error_page_names_the_publication(
    client: httpx.Client, links: ReaderLinks, two_issues: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(reader_module, "read_issue", broken)
    resp = client.get(links.url(READER, 1))
    assert resp.status_code == 500
    assert f"<title>页面暂时无法打开 · {PUBLICATION}</title>" in resp.text


def test_not_unlocked_page_says_how_to_unlock(
    client: httpx.Client, links: ReaderLinks, two_issues: None
) -> None:
    resp = client.get(links.url(READER, 2))
    assert resp.status_code == 200
    assert "免费试读到此结束" in resp.text and '<span class="cmd">兑换 2</span>' in resp.text


# ------------------------------------------------------------------ 3. images


def test_image_hosts_join_the_csp_and_nothing_else(engine: Engine) -> None:
    for hosts, img_src in (([], "img-src data:;"),
                           ([HOST, "cdn.example.org"],
                            f"img-src data: https://{HOST} https://cdn.example.org;")):
        settings = make_settings(reader={"image_hosts": hosts})
        with httpx.Client(transport=httpx.WSGITransport(app=create_app(settings, engine)),
                          base_url="http://testserver") as c:
            csp = c.get("/read/1").headers["content-security-policy"]
        assert f"; {img_src} " in csp and csp.startswith("default-src 'none'; ")


@pytest.mark.parametrize("bad", [f"https://{HOST}", f"{HOST}/images", "*.example.com",
                                 "IMG.example.com", f"{HOST}:8443", f"{HOST} 'unsafe-inline'"])
def test_image_hosts_must_be_bare_host_names(bad: str) -> None:
    with pytest.raises(ValidationError, match=r"image_hosts[\s\S]*is not a host name"):
        make_settings(reader={"image_hosts": [bad]})


@pytest.fixture
def cli(tmp_path: Path, db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Any:
    import os

    for name in list(os.environ):
        if name.startswith("NEWSBOT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)

    def run(*args: str, hosts: tuple[str, ...] = ()) -> Any:
        config = tmp_path / "config.toml"
        listed = ", ".join(f'"{h}"' for h in hosts)
        config.write_text(
            f'[wechat]\ntoken = "{TOKEN}"\n[database]\nurl = "{db_url}"\n'
            f'[reader]\nsecret = "pages-test-reader-secret-0123"\nimage_hosts = [{listed}]\n',
            encoding="utf-8")
        return CliRunner().invoke(cli_app, ["--config", str(config), *args])

    return run


IMAGES_BODY = (
    "第一段文字，免费。\n\n"
    f"![图表](http://{HOST}/a.png)\n\n"
    "![相对](charts/b.png)\n\n"
    "![别处](https://elsewhere.example.net/c.png)\n\n"
    f"![好的](https://{HOST}/ok.png)\n\n最后一段。"
)


def test_import_refuses_images_a_reader_page_cannot_show(cli: Any, tmp_path: Path) -> None:
    issue = tmp_path / "with-images.md"
    issue.write_text(issue_text(5, IMAGES_BODY), encoding="utf-8")
    result = cli("issue", "import", str(issue), hosts=(HOST,))
    assert result.exit_code != 0
    err = result.stderr
    assert f"{issue}: body: " in err and "[reader] image_hosts" in err
    assert f"http://{HOST}/a.png is not https" in err
    assert "charts/b.png is not an https:// URL" in err
    assert "https://elsewhere.example.net/c.png is on host elsewhere.example.net" in err
    assert f"https://{HOST}/ok.png" not in err
    listing = cli("issue", "list", "--json")
    assert listing.exit_code == 0 and listing.stdout.strip() == "[]"  # nothing stored


def test_import_takes_images_on_listed_hosts(cli: Any, tmp_path: Path) -> None:
    issue = tmp_path / "ok.md"
    issue.write_text(issue_text(6, f"正文。\n\n![好的](https://{HOST}/ok.png)\n\n再一段。"),
                     encoding="utf-8")
    refused = cli("issue", "import", str(issue))
    assert refused.exit_code != 0 and "(listed: none)" in refused.stderr
    result = cli("issue", "import", str(issue), hosts=(HOST,))
    assert result.exit_code == 0, result.output
    assert "created" in result.stdout


def test_image_check_functions_name_file_url_and_key() -> None:
    problems = image_problems(IMAGES_BODY, file="x.md", hosts=[HOST])
    assert len(problems) == 3
    assert all(str(p).startswith("x.md: body: image ") and "[reader] image_hosts" in str(p)
               for p in problems)
    assert image_problems("![](data:image/png;base64,iVBORw0KGgo=)", file="x.md", hosts=[]) == []
    check_images(f"![a](https://{HOST}/a.png)", file="x.md", hosts=[HOST])


def test_image_from_an_unlisted_host_shows_its_alt_text_not_a_broken_picture(
    engine: Engine,
) -> None:
    # Imported while the host was listed; the host has since been removed from the config.
    store(engine, issue_text(1, f"正文。\n\n![季度图表](https://{HOST}/q.png)\n\n尾段。",
                             price=0))
    for hosts, shows_img in (([HOST], True), ([], False)):
        settings = make_settings(reader={"image_hosts": hosts})
        with httpx.Client(transport=httpx.WSGITransport(app=create_app(settings, engine)),
                          base_url="http://testserver") as c:
            page = c.get(ReaderLinks(settings).url(READER, 1)).text
        assert (f'<img src="https://{HOST}/q.png" alt="季度图表" loading="lazy"' in page) \
            is shows_img
        assert ("［图片：季度图表］" in page) is not shows_img


def test_free_excerpt_leaves_a_trailing_image_out(
    client: httpx.Client, links: ReaderLinks, engine: Engine
) -> None:
    body = ("免费的第一段，写得稍长一些。\n\n" f"![锁定图](https://{HOST}/locked.png)\n\n"
            + "付费正文。" * 40)
    store(engine, issue_text(1, body, free_percent=20))
    page = client.get(links.url(READER, 1)).text
    assert "免费的第一段" in page and "locked.png" not in page and "锁定图" not in page
