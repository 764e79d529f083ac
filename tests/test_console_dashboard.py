"""The console's front door and first page: ``#console`` in the chat gives an operator a
one-time link that opens the dashboard; the dashboard shows the numbers and the charts drawn
by the server (bot.console.charts). Everything through the real WSGI app."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit
from xml.etree import ElementTree

import httpx
import pytest
from sqlalchemy import Engine

from bot.console import charts
from bot.settings import Settings
from storage import events, ledger, mailbox, subscribers
from storage.db import transaction
from tests.conftest import OPERATOR, WeChatUser
from tests.console_support import login

_LINK = re.compile(r"http://testserver(/console/open\?\S+)")


def _link_in(reply: dict[str, str]) -> str:
    found = _LINK.search(reply.get("content", ""))
    assert found, reply
    return found.group(1)


def test_console_in_the_chat_gives_an_operator_a_link_to_the_dashboard(
        operator: WeChatUser, app_client: httpx.Client) -> None:
    reply = operator.send("#console")
    assert reply["type"] == "text"
    text = reply["content"]
    assert "只能打开一次" in text and "15 分钟" in text and "10 小时" in text
    link = _link_in(reply)
    opened = app_client.get(link)
    assert opened.status_code == 303
    assert urlsplit(opened.headers["location"]).path == "/console/"
    page = app_client.get("/console/")
    assert page.status_code == 200 and "概览" in page.text and "关注者" in page.text
    assert app_client.get(link).status_code == 403  # a link opens once


def test_console_in_any_case_and_full_width(operator: WeChatUser) -> None:
    assert "/console/open?" in operator.send("＃ＣＯＮＳＯＬＥ")["content"]


def test_a_subscriber_sending_console_gets_what_any_unknown_text_gets(
        user: WeChatUser) -> None:
    user.event("subscribe")
    reply = user.send("#console")
    assert "/console/" not in reply.get("content", "")
    assert "后台" not in reply.get("content", "")
    assert reply == user.send("#nosuchthing")


def test_without_a_console_the_command_says_so() -> None:
    from datetime import UTC, datetime

    from handlers import admin
    from handlers.router import Context, Incoming, Text
    from tests.conftest import OPERATOR, make_settings

    ctx = Context(config=make_settings().chat_config(), make_link=lambda *a, **k: "",
                  key="k", now=datetime.now(UTC))
    msg = Incoming(openid=OPERATOR, msg_type="text", raw_text="#console")
    reply = admin.console(ctx, msg, None)
    assert isinstance(reply, Text) and "不可用" in reply.content



def _seed(engine: Engine, sample: int) -> None:
    """Three readers see issue ``sample``'s card, two open the excerpt, one pays 5 to unlock;
    one of the three unfollows. Plus a reader of an old issue outside the 12 weeks."""
    now = datetime.now(UTC)
    with transaction(engine) as s:
        for i in range(3):
            openid = f"o_dash_{i:04d}"
            subscribers.ensure_subscriber(s, openid=openid, at=now)
            events.record(s, events.CARD, openid=openid, issue_number=sample, at=now)
            events.record(s, events.CARD, openid=openid, issue_number=sample, at=now)  # again
        for i in range(2):
            events.record(s, events.EXCERPT, openid=f"o_dash_{i:04d}", issue_number=sample,
                          at=now)
        events.record(s, events.UNLOCK, openid="o_dash_0000", issue_number=sample,
                      detail="tokens", amount=5, at=now)
        events.record(s, events.UNFOLLOW, openid="o_dash_0002", at=now)
        events.record(s, events.CARD, openid="o_old", issue_number=sample,
                      at=now - timedelta(weeks=20))
        ledger.credit(s, openid="o_dash_0001", amount=42, kind="topup", key="t:dash",
                      reason="test", operator=OPERATOR, max_topup=1000)


def test_the_dashboard_shows_the_numbers_and_charts(
        operator: WeChatUser, app_client: httpx.Client, settings: Settings, engine: Engine,
        sample: int) -> None:
    operator.event("subscribe")
    _seed(engine, sample)
    login(app_client, settings, OPERATOR)
    page = app_client.get("/console/")
    assert page.status_code == 200
    html = page.text
    cards = {label: n for n, label in re.findall(
        r'<span class="n">([^<]+)</span><span class="l">([^<]+)</span>', html)}
    cards.pop("未读留言", None)  # once storage.mailbox is merged (its own test below)
    assert cards == {"关注者": "4", "订阅者（含已取关）": "4", "未消费的豆": "42",
                     "近 12 周收入（豆）": "5"}  # 3 readers + the operator
    figures = {m: _svg(html[html.index(f'<figure class="chart" id="{m}"'):])
               for m in ("funnel", "revenue", "follows")}
    funnel = [t for _, t in _bars(figures["funnel"])]
    # Each issue's whole life: the three readers, the old reader and the operator, whose follow
    # greeting showed the card.
    assert [t.split(" · ")[1] for t in funnel[:3]] == ["看到卡片：5", "打开试读：2", "解锁：1"]
    assert any(t.endswith("收入：5 豆") for _, t in _bars(figures["revenue"]))
    follows = [t for _, t in _bars(figures["follows"])]
    assert any(t.endswith("关注：1") for t in follows)  # the operator's own follow
    assert any(t.endswith("取消关注：1") for t in follows)
    assert len(_bars(figures["revenue"])) == 12  # one bar a week, empty weeks too
    row = re.search(rf"<tr><td>第{sample}期[^<]*</td>(.*?)</tr>", html)
    assert row, html
    assert re.findall(r'<td class="num">([^<]+)</td>', row.group(1)) == [
        "5", "2", "1", "0", "5", "20.0%"]

    four = app_client.get("/console/?weeks=4")
    assert four.status_code == 200 and "近 4 周" in four.text
    assert len(_bars(_svg(four.text[four.text.index('id="revenue"'):]))) == 4
    assert app_client.get("/console/?weeks=zzz").status_code == 200  # the default, no error
    year = app_client.get("/console/?weeks=52").text
    year_row = re.search(rf"<tr><td>第{sample}期[^<]*</td>(.*?)</tr>", year)
    assert year_row and re.findall(r'<td class="num">([^<]+)</td>', year_row.group(1))[0] == "5"


def test_an_empty_dashboard_is_polite(app_client: httpx.Client, settings: Settings) -> None:
    login(app_client, settings, OPERATOR)
    html = app_client.get("/console/").text
    assert html.count(charts.EMPTY) >= 3 and "Traceback" not in html


def test_the_dashboard_needs_a_session(app_client: httpx.Client) -> None:
    refused = app_client.get("/console/")
    assert refused.status_code == 403 and "<svg" not in refused.text

# --- charts (bot.console.charts) -----------------------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"
TWO = (charts.Series("关注", charts.GREEN), charts.Series("取消关注", charts.GREY))


def _svg(figure: str) -> ElementTree.Element:
    start, end = figure.index("<svg"), figure.index("</svg>") + len("</svg>")
    return ElementTree.fromstring(figure[start:end])


def _bars(root: ElementTree.Element) -> list[tuple[float, str]]:
    """(width, title) of each bar."""
    return [(float(r.get("width", "0")), r.findtext(f"{SVG}title") or "")
            for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]


def test_a_chart_is_svg_with_a_title_a_description_and_proportional_bars() -> None:
    rows = [charts.Row("2026-W47", (40, 10)), charts.Row("2026-W48", (20, 0))]
    figure = charts.bar_chart(chart_id="follows", title="每周关注", desc="关注与取消关注",
                              series=TWO, rows=rows)
    root = _svg(figure)
    assert root.get("role") == "img" and root.get("aria-labelledby") == "follows-t follows-d"
    assert root.findtext(f"{SVG}title") == "每周关注"
    assert root.findtext(f"{SVG}desc") == "关注与取消关注"
    bars = _bars(root)
    assert [t for _, t in bars] == ["2026-W47 · 关注：40", "2026-W47 · 取消关注：10",
                                    "2026-W48 · 关注：20", "2026-W48 · 取消关注：0"]
    widths = [w for w, _ in bars]
    assert widths[0] > 0 and widths[3] == 0
    assert widths[1] == pytest.approx(widths[0] / 4, abs=0.1)
    assert widths[2] == pytest.approx(widths[0] / 2, abs=0.1)
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert {"2026-W47", "40", "10", "20", "0", "关注", "取消关注"} <= set(texts)
    assert "<script" not in figure and "href" not in figure
    assert "http" not in figure.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_numbers_are_grouped_and_the_unit_is_in_each_bar_title() -> None:
    figure = charts.bar_chart(chart_id="r", title="每周收入", desc="d",
                              series=[charts.Series("收入", charts.GREEN)],
                              rows=[charts.Row("W1", (1234567,))], unit="豆")
    root = _svg(figure)
    assert "1,234,567" in [t.text for t in root.iter(f"{SVG}text")]
    assert _bars(root)[0][1] == "W1 · 收入：1,234,567 豆"
    assert root.find(f"{SVG}g[@class='legend']") is None  # one series: no legend


def test_labels_and_titles_are_escaped() -> None:
    hostile = '<script>alert("x")</script> & ]]>'
    figure = charts.bar_chart(chart_id="x", title=hostile, desc=hostile,
                              series=[charts.Series(hostile, charts.BLUE)],
                              rows=[charts.Row(hostile, (3,))])
    assert "<script>" not in figure
    root = _svg(figure)  # still well-formed XML
    assert root.findtext(f"{SVG}title") == hostile
    assert _bars(root)[0][1] == f"{hostile} · {hostile}：3"


def test_long_labels_are_cut_to_fit_but_kept_whole_in_the_title() -> None:
    long = "一个非常非常非常非常长的期刊标题用来测试"
    root = _svg(charts.bar_chart(chart_id="l", title="t", desc="d",
                                 series=[charts.Series("s", charts.BLUE)],
                                 rows=[charts.Row(long, (5,))]))
    label = next(t.text or "" for t in root.iter(f"{SVG}text") if t.get("class") == "label")
    assert label.endswith("…") and charts.text_width(label) <= charts.WIDTH * 0.35
    assert _bars(root)[0][1].startswith(long)


@pytest.mark.parametrize("rows", [[], [charts.Row("W1", (0, 0))]])
def test_no_data_says_so_politely(rows: list[charts.Row]) -> None:
    figure = charts.bar_chart(chart_id="e", title="每周关注", desc="d", series=TWO, rows=rows)
    root = _svg(figure)
    assert charts.EMPTY in [t.text for t in root.iter(f"{SVG}text")]
    assert _bars(root) == []
    assert charts.EMPTY in (root.findtext(f"{SVG}desc") or "")


def test_the_period_starts_on_a_monday_in_the_broadcast_timezone() -> None:
    from zoneinfo import ZoneInfo

    from bot.console.pages.home import weeks_asked, window_start

    zone = ZoneInfo("Asia/Shanghai")
    # Sunday 2026-11-29 17:00 UTC is Monday 2026-11-30 01:00 in Shanghai.
    start = window_start(datetime(2026, 11, 29, 17, 0, tzinfo=UTC), zone, 1)
    assert start == datetime(2026, 11, 30, 0, 0, tzinfo=zone)
    assert window_start(datetime(2026, 11, 29, 17, 0, tzinfo=UTC), zone, 12) == \
        datetime(2026, 9, 14, 0, 0, tzinfo=zone)
    assert [weeks_asked(x) for x in ("4", "104", "105", "0", "-1", "١٢", "", "x")] == \
        [4, 104, 12, 12, 12, 12, 12, 12]


def test_slow_figures_are_kept_and_refreshed_in_the_background(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.console.pages import home
    from storage.stats import Stats

    calls: list[int] = []

    def compute(since: datetime, zone: str, now: datetime) -> Stats:
        calls.append(1)
        time.sleep(delay)
        return Stats(issues=[], weeks=[], scenes=[], tokens_outstanding=len(calls),
                     subscribers=0, followers=0)

    now = datetime.now(UTC)
    delay = 0.0  # fast: computed afresh every time
    figures = home.Figures(compute)
    assert [figures.get(now, "UTC", now)[0].tokens_outstanding for _ in range(3)] == [1, 2, 3]

    delay = home.SLOW_S + 0.02  # slow: the kept figures, refreshed behind the page
    figures = home.Figures(compute)
    first, at = figures.get(now, "UTC", now)
    assert first.tokens_outstanding == 4 and at is None
    again, at = figures.get(now, "UTC", now)
    assert again is first and at == now and len(calls) == 4  # not yet due for a refresh
    monkeypatch.setattr(home, "REFRESH_S", 0.0)
    stale, _ = figures.get(now, "UTC", now)
    assert stale is first
    figures.wait()
    assert figures.get(now, "UTC", now)[0].tokens_outstanding == 5
    figures.wait()
    assert len(calls) == 6  # one refresh at a time, one per view at most


def test_the_unread_inbox_count(app_client: httpx.Client, settings: Settings,
                                engine: Engine) -> None:
    login(app_client, settings, OPERATOR)
    assert "未读留言" in app_client.get("/console/").text
    now = datetime.now(UTC)
    with transaction(engine) as s:
        for n, read in enumerate([False, False, True]):
            mailbox.store(s, openid=f"o_writer_{n}", text="你好", kind="text", key=f"k{n}",
                          at=now, max_chars=100, read=read)
    html = app_client.get("/console/").text
    assert re.search(r'<a class="card" href="/console/inbox"><span class="n">2</span>'
                     r'<span class="l">未读留言</span></a>', html)
