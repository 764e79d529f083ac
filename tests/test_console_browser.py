"""The operators' console in a real browser (Debian's Chromium, driven by Playwright) at a
phone (375×812, WeChat's browser) and a desktop (1280×800), against the real app on a loopback
port whose webhook subscribers talk to and whose customer-service messages go to the fake
WeChat API. The test sends a small week of traffic and counts it itself; the operator sends
``#console``, opens the link from the reply and sees exactly those counts (``newsbot stats
--json`` gives them too), imports an issue by upload, tops up a subscriber and answers an inbox
message. Nobody else gets in: not a non-operator, not with an expired, edited or used link,
not with a form whose CSRF token is gone.

Skipped like tests/test_reader_browser.py when Playwright or Chromium is missing, unless
``NEWSBOT_REQUIRE_BROWSER=1``. Screenshots are always saved (``NEWSBOT_SCREENSHOT_DIR``, else
/tmp/newsbot-screenshots); the run's output says where."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import select
from typer.testing import CliRunner

from storage import ledger
from storage.db import read_only
from storage.issues import get_issue, list_issues
from storage.models import ConsoleSession, LedgerEntry, OperatorAction, Subscriber
from tests.conftest import OPERATOR, SAMPLE_ISSUE, import_issue
from tests.console_browser_support import (
    ConsoleSite,
    Shots,
    Tab,
    Tally,
    console_site,
    make_traffic,
    open_tab,
)
from tests.test_reader_browser import browser as browser  # the fixture, shared

SCREENSHOT_DIR = os.environ.get("NEWSBOT_SCREENSHOT_DIR")  # read at import, as the others do
STRANGER = "o_console_stranger_00001"
PRICE = 99  # issue 1 of the sample


@pytest.fixture(scope="module")
def shots(request: pytest.FixtureRequest) -> Iterator[Shots]:
    # Not pytest's tmp_path: it keeps only the last few runs of anyone on the machine.
    base = Path(SCREENSHOT_DIR or Path(tempfile.gettempdir()) / "newsbot-screenshots")
    made = Shots(base)
    yield made
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if made.saved and reporter is not None:
        reporter.write_line(f"\nconsole screenshots ({len(made.saved)}): {base}")


@pytest.fixture
def site(engine: Engine) -> Iterator[ConsoleSite]:
    with console_site(engine) as made:
        yield made


@pytest.fixture(params=["phone", "desktop"])
def tab(request: pytest.FixtureRequest, browser: Any, site: ConsoleSite,
        shots: Shots) -> Iterator[Tab]:
    with open_tab(browser, site, request.param, shots) as made:
        yield made


def _actions(engine: Engine) -> list[tuple[str, str, str]]:
    with read_only(engine) as s:
        rows = s.exec(select(OperatorAction).order_by(OperatorAction.id))  # type: ignore[arg-type]
        return [(a.operator, a.action, a.result) for a in rows]


def _sessions(engine: Engine) -> int:
    with read_only(engine) as s:
        return len(list(s.exec(select(ConsoleSession))))


def log_in(tab: Tab, link: str | None = None) -> None:
    """Open a one-time link (default: a fresh one for the operator) and land on the
    dashboard, logged in."""
    response = tab.goto(link or tab.site.link())
    assert response is not None and response.status == 200, response and response.status
    assert tab.page.url == tab.site.url + "/console/"
    assert tab.page.locator("h1").inner_text() == "概览"
    assert tab.page.locator("header .brand").inner_text() == "深潮周刊 后台"


# -- getting in ---------------------------------------------------------------------------------

def _refused(tab: Tab, link: str, heading: str, says: str, shot: str) -> None:
    response = tab.goto(link)
    assert response is not None and response.status == 403
    assert tab.page.locator("h1").inner_text() == heading
    assert says in tab.text()
    tab.shot(shot)


def test_links_that_do_not_open_the_console(tab: Tab, browser: Any, shots: Shots) -> None:
    site = tab.site
    _refused(tab, site.link(STRANGER), "无法登录", "不是本号的运营者", "non-operator")
    # Signed an hour ago: it was good for [console] link_minutes (15) only. The page says how
    # to get a new one.
    _refused(tab, site.link(now=time.time() - 3600), "链接已过期", "#console", "expired-link")
    _refused(tab, site.link().replace(f"u={OPERATOR}", f"u={OPERATOR}x"), "无法登录",
             "链接无效", "edited-link")
    assert tab.goto("/console/").status == 403 and "请先登录" in tab.text()
    assert _sessions(site.engine) == 0  # none of them started a session

    link = site.link()
    log_in(tab, link)
    # Forwarded to someone else (or opened a second time), the link no longer works.
    with open_tab(browser, site, tab.device, shots) as other:
        _refused(other, link, "链接已用过", "只能打开一次", "used-link")
        assert other.goto("/console/").status == 403
    assert _sessions(site.engine) == 1


# -- CSRF ---------------------------------------------------------------------------------------

def _submit_without_csrf(tab: Tab, form: str) -> Any:
    """Submit ``form`` (a selector) with its hidden CSRF input removed, as a forged form
    would arrive; the response to that POST."""
    tab.page.locator(f"{form} input[name=csrf]").evaluate("i => i.remove()")
    with tab.page.expect_response(lambda r: r.request.method == "POST") as posted:
        tab.page.locator(f"{form} [type=submit]").first.click()
    tab.page.wait_for_load_state()
    return posted.value


def test_a_post_without_the_csrf_token_is_refused(tab: Tab) -> None:
    log_in(tab)
    response = _submit_without_csrf(tab, "form.logout")
    assert response.status == 403
    assert tab.page.locator("h1").inner_text() == "操作被拒绝"
    assert "表单已失效" in tab.text()
    tab.shot("csrf-refused")
    # A POST with the session's cookie and a wrong token, or none (sent beside the page: its
    # CSP lets no script send one).
    for form in ({}, {"csrf": "forged"}):
        forged = tab.page.request.post(tab.site.url + "/console/logout", form=form,
                                       max_redirects=0)
        assert forged.status == 403 and "表单已失效" in forged.text()
    # Nothing was done: the session is still open, and the refusals are on the audit trail.
    assert tab.goto("/console/").status == 200
    assert _actions(tab.site.engine) == [(OPERATOR, "csrf:/console/logout", "refused")] * 3
    # The same form with its token logs out.
    with tab.page.expect_response(lambda r: r.request.method == "POST") as posted:
        tab.page.locator("form.logout [type=submit]").click()
    assert posted.value.status == 200 and "已退出" in tab.text()
    assert tab.goto("/console/").status == 403
    assert _actions(tab.site.engine)[-1] == (OPERATOR, "logout", "ok")


# -- the numbers ---------------------------------------------------------------------------------

def _publish_sample(engine: Engine) -> Any:
    return lambda: import_issue(engine, SAMPLE_ISSUE)


def _expected(tally: Tally) -> dict[str, Any]:
    """The parts of ``newsbot stats --json`` the test's own counts fix."""
    return {
        "issue": {"number": 1, "card_views": len(tally.card_viewers),
                  "excerpt_opens": len(tally.excerpt_readers), "unlocks": len(tally.unlocked),
                  "full_reads": len(tally.full_readers), "revenue_tokens": tally.revenue},
        "week": {"follows": len(tally.followed), "unfollows": len(tally.unfollowed),
                 "active_readers": len(tally.active), "new_payers": len(tally.unlocked),
                 "repeat_payers": 0},
        "tokens_outstanding": tally.tokens_outstanding,
    }


def test_stats_equal_what_the_test_sent(site: ConsoleSite, db_url: str,
                                        tmp_path: Path) -> None:
    tally = make_traffic(site, price=PRICE, import_issue=_publish_sample(site.engine))
    # The tally agrees with the ledger and the subscriber rows before any stats code is asked.
    assert tally.tokens_outstanding == 400 - 2 * PRICE
    with read_only(site.engine) as s:
        balances = {o: ledger.get_balance(s, openid=o) for o in tally.credited}
        rows = [(r.openid, r.subscribed) for r in s.exec(select(Subscriber))]
    assert sum(balances.values()) == tally.tokens_outstanding
    assert {openid for openid, _ in rows} == tally.seen
    assert {openid for openid, following in rows if following} == tally.following
    config = tmp_path / "config.toml"
    config.write_text(f'[wechat]\ntoken = "t"\n[database]\nurl = "{db_url}"\n'
                      '[reader]\nsecret = "s-0123456789abcdef"\n', encoding="utf-8")
    from bot.cli import app

    result = CliRunner().invoke(app, ["--config", str(config), "stats", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    want = _expected(tally)
    issue, = (i for i in got["issues"] if i["number"] == 1)
    assert {k: issue[k] for k in want["issue"]} == want["issue"]
    # Summed over the weeks, so a run across Monday midnight counts the same.
    weeks = [w for w in got["weeks"] if w["active_readers"]]
    week = {k: sum(w[k] for w in weeks) for k in want["week"]}
    if len(weeks) > 1:  # distinct per week: not additive
        week["active_readers"] = want["week"]["active_readers"]
    assert week == want["week"]
    assert got["tokens_outstanding"] == want["tokens_outstanding"]


def _nav_page(tab: Tab, label: str) -> None:
    """Open a console page from the menu."""
    with tab.page.expect_navigation():
        tab.page.locator("header nav a", has_text=label).first.click()
    assert tab.page.locator("h1").inner_text() == label


def _cards(tab: Tab) -> dict[str, str]:
    """The dashboard's totals: label → number as shown."""
    return {str(card.locator(".l").inner_text()): str(card.locator(".n").inner_text())
            for card in tab.page.locator("section.cards .card").all()}


def _table_row(tab: Tab, first_cell: str) -> dict[str, str]:
    """The row of the page's table whose first cell starts with ``first_cell``, by header."""
    table = tab.page.locator("table", has=tab.page.locator("td", has_text=first_cell)).first
    heads = [str(h) for h in table.locator("thead th").all_inner_texts()]
    for row in table.locator("tbody tr").all():
        cells = [str(c) for c in row.locator("td").all_inner_texts()]
        if cells and cells[0].startswith(first_cell):
            return dict(zip(heads, cells, strict=True))
    raise AssertionError(f"no row {first_cell!r} in {heads}")


def test_an_operator_opens_the_console_from_the_chat_and_sees_the_numbers(tab: Tab) -> None:
    """The week of traffic the test made, then ``#console`` in the chat, the link from the
    reply opened in the browser: the dashboard shows what the test counted."""
    site = tab.site
    tally = make_traffic(site, price=PRICE, import_issue=_publish_sample(site.engine))
    link = site.chat_link(OPERATOR)
    assert link is not None and link.startswith(site.url + "/console/open?")
    log_in(tab, link)
    tab.shot("dashboard")
    cookie, = (c for c in tab.page.context.cookies() if c["name"] == "newsbot_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    cards = _cards(tab)
    assert cards["关注者"] == str(len(tally.following))
    assert cards["订阅者（含已取关）"] == str(len(tally.seen))
    assert cards["未消费的豆"] == f"{tally.tokens_outstanding:,}"
    assert cards["近 12 周收入（豆）"] == f"{tally.revenue:,}"
    row = _table_row(tab, "第1期")
    assert {k: row[k] for k in ("看到卡片", "打开试读", "解锁", "读全文", "收入（豆）")} == {
        "看到卡片": str(len(tally.card_viewers)), "打开试读": str(len(tally.excerpt_readers)),
        "解锁": str(len(tally.unlocked)), "读全文": str(len(tally.full_readers)),
        "收入（豆）": str(tally.revenue)}
    # Charts are drawn by the server as SVG, titled for screen readers.
    assert tab.page.locator("svg title").count() >= 3
    tab.assert_clean()
    assert site.chat_link(STRANGER) is None  # the same words from a subscriber: no link
    # The menu is reachable with a thumb on the phone, and every page of it opens cleanly.
    links = tab.page.locator("header nav a")
    assert links.count() >= 2
    for box in (links.nth(i).bounding_box() for i in range(links.count())):
        assert box is not None and box["height"] >= 30
    for href in [links.nth(i).get_attribute("href") for i in range(links.count())]:
        response = tab.goto(str(href))
        assert response is not None and response.status == 200, href
    tab.assert_clean()


def test_an_operator_imports_an_issue(tab: Tab) -> None:
    site = tab.site
    log_in(tab)
    _nav_page(tab, "期刊")
    # A broken file is refused with what to fix, and nothing is imported.
    broken = {"name": "issue-009.md", "mimeType": "text/markdown",
              "buffer": "+++\nnumber = 9\nprice = 5\n+++\n\n正文。\n".encode()}
    tab.page.locator("input[name=file]").set_input_files(broken)
    with tab.page.expect_navigation():
        tab.page.get_by_role("button", name="上传并导入").click()
    error = tab.page.locator(".flash.error")
    assert "issue-009.md" in error.inner_text() and "标题" in error.inner_text()
    tab.shot("import-refused")
    with read_only(site.engine) as s:
        assert list_issues(s, default_free_percent=10, include_drafts=True) == []
    # The sample issue, uploaded as a file from the operator's machine.
    tab.page.locator("input[name=file]").set_input_files(str(SAMPLE_ISSUE))
    with tab.page.expect_navigation():
        tab.page.get_by_role("button", name="上传并导入").click()
    done = tab.page.locator(".flash.ok")
    assert "已导入" in done.inner_text(), tab.text()
    row = _table_row(tab, "#1")
    assert "AI客服的真实账本" in row["标题"] and row["价格"] == f"{PRICE} 豆"
    tab.shot("imported")
    with read_only(site.engine) as s:
        issue = get_issue(s, number=1, default_free_percent=10)
    assert issue.price == PRICE and issue.published_at is not None
    # Subscribers get it at once: 本周 shows its card.
    card = site.user("o_console_reader_00001").send("本周")
    assert "AI客服的真实账本" in card.get("title", "") + card.get("content", "")
    tab.assert_clean()


def test_an_operator_tops_up_a_subscriber(tab: Tab) -> None:
    site = tab.site
    reader = "o_console_topup_000001"
    site.user(reader).event("subscribe")
    log_in(tab)
    _nav_page(tab, "订阅者")
    tab.page.locator("input[name=q]").fill("topup")
    with tab.page.expect_navigation():
        tab.page.get_by_role("button", name="搜索").click()
    with tab.page.expect_navigation():
        tab.page.get_by_role("link", name=reader).click()
    tab.page.locator("form[action$='/topup'] input[name=amount]").fill("120")
    tab.page.locator("form[action$='/topup'] input[name=reason]").fill("线下转账")
    tab.shot("topup-form")
    # Without the CSRF token the form is refused and nothing is credited.
    response = _submit_without_csrf(tab, "form[action$='/topup']")
    assert response.status == 403 and "表单已失效" in tab.text()
    assert _balance(site.engine, reader) == 0
    tab.errors.clear()  # the browser logs the refusal's 403: expected here
    tab.page.go_back()
    tab.page.reload()
    tab.page.locator("form[action$='/topup'] input[name=amount]").fill("120")
    tab.page.locator("form[action$='/topup'] input[name=reason]").fill("线下转账")
    with tab.page.expect_navigation():
        tab.page.locator("form[action$='/topup'] [type=submit]").click()
    assert "已充值 +120 豆：余额 120 豆" in tab.page.locator(".flash.ok").inner_text()
    tab.shot("topped-up")
    assert _balance(site.engine, reader) == 120
    with read_only(site.engine) as s:
        entries = [(e.kind, e.amount, e.reason, e.operator)
                   for e in s.exec(select(LedgerEntry).where(LedgerEntry.openid == reader))]
    assert entries == [
        ("topup", 120, "线下转账", f"console:{OPERATOR}")]
    # The subscriber sees it in the chat.
    assert "120" in site.user(reader).send("余额")["content"]
    tab.assert_clean()


def test_an_operator_answers_an_inbox_message(tab: Tab) -> None:
    site = tab.site
    reader = "o_console_inbox_000001"
    question = "请问可以开发票吗？"
    assert "收到" in site.user(reader).send(question)["content"]  # stored, acknowledged
    log_in(tab)
    _nav_page(tab, "留言")
    assert question in tab.text() and "待回复" in tab.text()
    tab.shot("inbox")
    with tab.page.expect_navigation():
        tab.page.locator("table a", has_text=reader[-8:]).click()
    assert question in tab.text()
    answer = "可以的，请把抬头和税号发给我们。"
    tab.page.locator("textarea[name=text]").fill(answer)
    with tab.page.expect_navigation():
        tab.page.get_by_role("button", name="发送回复").click()
    assert "回复已发送" in tab.page.locator(".flash.ok").inner_text()
    assert answer in tab.text()  # stored beside the question
    tab.shot("inbox-answered")
    assert site.wechat.custom_messages == [(reader, answer)]
    tab.assert_clean()


def _balance(engine: Engine, openid: str) -> int:
    with read_only(engine) as s:
        return ledger.get_balance(s, openid=openid)
