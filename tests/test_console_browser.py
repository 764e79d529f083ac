"""The operators' console in a real browser (Debian's Chromium, driven by Playwright) at a
phone (375×812, WeChat's browser) and a desktop (1280×800), against the real app on a loopback
port whose webhook subscribers talk to and whose customer-service messages go to the fake
WeChat API: an operator opens the console from a link, and nobody else gets in — not a
non-operator, not with an expired or a used link, not with a form whose CSRF token is gone.

Skipped like tests/test_reader_browser.py when Playwright or Chromium is missing, unless
``NEWSBOT_REQUIRE_BROWSER=1``. Screenshots are always saved (``NEWSBOT_SCREENSHOT_DIR``, else
/tmp/newsbot-screenshots); the run's output says where."""

from __future__ import annotations

import importlib.util
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
from storage.models import ConsoleSession, OperatorAction
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

def test_an_operator_opens_the_console_from_a_link(tab: Tab) -> None:
    log_in(tab)
    tab.shot("dashboard")
    # The menu is reachable with a thumb on the phone, and every page of it opens.
    links = tab.page.locator("header nav a")
    assert links.count() >= 2
    for box in (links.nth(i).bounding_box() for i in range(links.count())):
        assert box is not None and box["height"] >= 30
    for href in [links.nth(i).get_attribute("href") for i in range(links.count())]:
        response = tab.goto(str(href))
        assert response is not None and response.status == 200, href
    tab.assert_clean()
    cookie, = (c for c in tab.page.context.cookies() if c["name"] == "newsbot_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"


def test_the_link_from_the_chat_opens_the_console(tab: Tab) -> None:
    link = tab.site.chat_link(OPERATOR)
    if link is None:
        pytest.skip("#console does not answer with a link yet (the dashboard branch)")
    assert link.startswith(tab.site.url + "/console/open?")
    log_in(tab, link)
    tab.shot("from-chat")
    tab.assert_clean()
    # A subscriber who is no operator gets no link for the same words.
    assert tab.site.chat_link(STRANGER) is None


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


def test_traffic_is_what_the_test_counted(site: ConsoleSite) -> None:
    """The test's own tally against the ledger and the event rows (before any stats code)."""
    tally = make_traffic(site, price=PRICE, import_issue=_publish_sample(site.engine))
    assert tally.tokens_outstanding == 400 - 2 * PRICE
    with read_only(site.engine) as s:
        balances = {o: ledger.get_balance(s, openid=o) for o in tally.credited}
    assert sum(balances.values()) == tally.tokens_outstanding


def test_stats_equal_what_the_test_sent(site: ConsoleSite, db_url: str,
                                        tmp_path: Path) -> None:
    if importlib.util.find_spec("storage.stats") is None:
        pytest.skip("newsbot stats is not on main yet (the stats branch)")
    tally = make_traffic(site, price=PRICE, import_issue=_publish_sample(site.engine))
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
    week, = got["weeks"][-1:]
    assert {k: week[k] for k in want["week"]} == want["week"]
    assert got["tokens_outstanding"] == want["tokens_outstanding"]
