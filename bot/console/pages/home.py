"""The dashboard (the console's first page): followers, subscribers and tokens outstanding now;
the funnel per issue, revenue and follows per week over the last weeks (``?weeks=N``, default
12), as server-drawn charts (bot.console.charts) and a table per issue. Every number comes from
one ``storage.stats.compute`` (SQL aggregates over ``event``).

Those aggregates read every event of the period: on a small account a few milliseconds, with a
million events seconds. So when computing them took longer than ``SLOW_S`` the figures are kept
(per period, in this process) and the page shows them at once with their time, while a
background thread computes new ones at most every ``REFRESH_S``: a busy account's dashboard
opens in milliseconds (after its first view since the server started), with figures as old as
the last view but one; a small one's is always computed afresh."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time as clock
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlmodel import Session

from bot.console import charts
from bot.console.charts import Row, Series
from bot.console.core import PREFIX, Console, ConsoleRequest, esc
from storage import mailbox, stats
from storage.db import read_only
from storage.stats import IssueStats, Stats, WeekStats

log = logging.getLogger("newsbot.console")

DEFAULT_WEEKS = 12
MAX_WEEKS = 104
CHART_ISSUES = 8  # the funnel chart shows the latest issues; the table shows up to
TABLE_ISSUES = 30
FUNNEL = (Series("看到卡片", charts.GREY), Series("打开试读", charts.BLUE),
          Series("解锁", charts.GREEN))
FOLLOWS = (Series("关注", charts.GREEN), Series("取消关注", charts.RED))
SLOW_S = 0.1  # computing took longer: keep the figures and refresh them in the background
REFRESH_S = 60.0
MAX_KEPT = 8  # periods kept (each a few KB)


def weeks_asked(raw: str) -> int:
    """``?weeks=N`` within 1…MAX_WEEKS; anything else is the default, not an error page."""
    return int(raw) if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_WEEKS \
        else DEFAULT_WEEKS


def window_start(now: datetime, zone: ZoneInfo, weeks: int) -> datetime:
    """Monday 00:00 (in ``zone``) of the week ``weeks - 1`` before this one."""
    today = now.astimezone(zone).date()
    monday = today - timedelta(days=today.weekday(), weeks=weeks - 1)
    return datetime.combine(monday, time(0), zone)


@dataclass(frozen=True)
class _Kept:
    figures: Stats
    at: datetime  # when they were computed
    monotonic: float
    cost_s: float


class Figures:
    """``storage.stats.compute`` for the dashboard, kept while computing it is slow."""

    def __init__(self, compute: Callable[[datetime, str, datetime], Stats]) -> None:
        self._compute = compute
        self._kept: dict[tuple[datetime, str], _Kept] = {}
        self._refreshing: set[tuple[datetime, str]] = set()
        self._lock = threading.Lock()

    def get(self, since: datetime, zone: str, now: datetime) -> tuple[Stats, datetime | None]:
        """The figures, and when they were computed if they are not fresh."""
        key = (since, zone)
        kept = self._kept.get(key)
        if kept is None or kept.cost_s < SLOW_S:
            return self._run(key, now).figures, None
        if clock.monotonic() - kept.monotonic >= REFRESH_S:
            with self._lock:
                start = key not in self._refreshing
                self._refreshing.add(key)
            if start:
                threading.Thread(target=self._refresh, args=(key, now), daemon=True,
                                 name="console-stats").start()
        return kept.figures, kept.at

    def _run(self, key: tuple[datetime, str], now: datetime) -> _Kept:
        began = clock.monotonic()
        figures = self._compute(key[0], key[1], now)
        kept = _Kept(figures, now, clock.monotonic(), clock.monotonic() - began)
        with self._lock:
            self._kept[key] = kept
            for old in sorted(self._kept, key=lambda k: self._kept[k].monotonic)[:-MAX_KEPT]:
                del self._kept[old]
        return kept

    def wait(self) -> None:
        """Until no refresh runs (tests, benchmarks)."""
        for thread in threading.enumerate():
            if thread.name == "console-stats":
                thread.join()

    def _refresh(self, key: tuple[datetime, str], now: datetime) -> None:
        try:
            self._run(key, now)
        except Exception:
            log.exception("console: refreshing the dashboard's figures failed")
        finally:
            with self._lock:
                self._refreshing.discard(key)


def install(console: Console) -> None:
    def compute(since: datetime, zone: str, now: datetime) -> Stats:
        # All time, so the funnel is each issue's whole life and the counts come from the
        # rolled-up pairs (storage.stats.roll_up) rather than from every event of the window;
        # the weekly rows are exact per week, and only the asked-for weeks are kept.
        with read_only(console.engine) as session:
            found = stats.compute(session, timezone=zone, now=now)
        first = since.astimezone(ZoneInfo(zone)).date()
        return dataclasses.replace(found, weeks=[w for w in found.weeks if w.monday >= first])

    figures = Figures(compute)

    @console.page("/", title="概览", nav="概览", order=10)
    def dashboard(req: ConsoleRequest) -> str:
        zone = ZoneInfo(req.settings.broadcast.timezone)
        weeks = weeks_asked(req.get("weeks"))
        since = window_start(req.now, zone, weeks)
        found, computed_at = figures.get(since, zone.key, req.now)
        with req.reading() as session:  # always fresh: one count of the inbox
            unread = unread_count(session)
        html = render(found, unit=req.config.unit, weeks=weeks, since=since.strftime("%Y-%m-%d"),
                      unread=unread)
        if computed_at is not None:
            html = (f'<p class="muted">数据截至 {computed_at.astimezone(zone):%m-%d %H:%M:%S}'
                    "（数据量大，后台每分钟最多重算一次；稍后刷新页面可看到更新的数据）</p>") + html
        return html


def unread_count(session: Session) -> int | None:
    """Unread inbox messages."""
    return int(mailbox.unread_count(session))


def _card(label: str, n: int, href: str | None = None) -> str:
    inner = f'<span class="n">{charts.number(n)}</span><span class="l">{esc(label)}</span>'
    if href is not None:
        return f'<a class="card" href="{esc(href)}">{inner}</a>'
    return f'<div class="card">{inner}</div>'


def render(figures: Stats, *, unit: str, weeks: int, since: str,
           unread: int | None = None) -> str:
    revenue = sum(w.revenue_tokens for w in figures.weeks)
    cards = [_card("关注者", figures.followers), _card("订阅者（含已取关）", figures.subscribers),
             _card(f"未消费的{unit}", figures.tokens_outstanding),
             _card(f"近 {weeks} 周收入（{unit}）", revenue)]
    if unread is not None:
        cards.append(_card("未读留言", unread, f"{PREFIX}/inbox"))
    html = ['<section class="cards" aria-label="总数">', *cards, "</section>",
            f'<p class="muted">每周数字自 {esc(since)} 起'
            f"（近 {weeks} 周，{esc(figures.timezone)}）；"
            "各期转化为该期发布以来的全部数字；看到、打开、解锁按人数计。"
            f'<a href="?weeks=4">4 周</a> · <a href="?weeks=12">12 周</a> · '
            '<a href="?weeks=52">52 周</a></p>',
            '<div class="grid two dashboard">',
            _funnel_chart(figures.issues[:CHART_ISSUES]),
            _revenue_chart(figures.weeks, unit),
            _follows_chart(figures.weeks),
            "</div>",
            "<h2>各期转化</h2>", _issue_table(figures.issues[:TABLE_ISSUES], unit)]
    return "".join(html)


def _issue_label(issue: IssueStats) -> str:
    return f"第{issue.number}期 {issue.title}".strip()


def _week_label(week: WeekStats) -> str:
    return f"{week.week[-3:]} {week.monday:%m-%d}"


def _funnel_chart(issues: list[IssueStats]) -> str:
    return charts.bar_chart(
        chart_id="funnel", title="各期：看到卡片 → 打开试读 → 解锁",
        desc=f"最近 {len(issues)} 期，每期三条：看到卡片、打开试读、解锁的人数。",
        series=FUNNEL,
        rows=[Row(_issue_label(i), (i.card_views, i.excerpt_opens, i.unlocks)) for i in issues])


def _revenue_chart(weeks: list[WeekStats], unit: str) -> str:
    return charts.bar_chart(
        chart_id="revenue", title=f"每周收入（{unit}）",
        desc=f"每周解锁与会员卡花费的{unit}（已扣除退款），共 {len(weeks)} 周。",
        series=[Series("收入", charts.GREEN)], unit=unit,
        rows=[Row(_week_label(w), (w.revenue_tokens,)) for w in weeks])


def _follows_chart(weeks: list[WeekStats]) -> str:
    return charts.bar_chart(
        chart_id="follows", title="每周关注与取消关注",
        desc=f"每周新关注与取消关注的人数，共 {len(weeks)} 周。", series=FOLLOWS,
        rows=[Row(_week_label(w), (w.follows, w.unfollows)) for w in weeks])


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _issue_table(issues: list[IssueStats], unit: str) -> str:
    if not issues:
        return f'<p class="empty">{charts.EMPTY}</p>'
    head = "".join(f'<th class="num">{esc(h)}</th>' for h in (
        "看到卡片", "打开试读", "解锁", "读全文", f"收入（{unit}）", "卡片→解锁"))
    rows = "".join(
        f"<tr><td>{esc(_issue_label(i))}</td>"
        + "".join(f'<td class="num">{charts.number(n)}</td>' for n in (
            i.card_views, i.excerpt_opens, i.unlocks, i.full_reads, i.revenue_tokens))
        + f'<td class="num">{_percent(i.conversion)}</td></tr>'
        for i in issues)
    return ('<div class="table-wrap"><table class="issues"><thead><tr><th>期</th>'
            f"{head}</tr></thead><tbody>{rows}</tbody></table></div>")
