"""`newsbot stats`: the funnel per issue (card → excerpt → unlock, distinct readers), the
business per week and per QR scene, and tokens outstanding, read from the events
(storage.stats)."""

from __future__ import annotations

from typing import Annotated
from zoneinfo import ZoneInfo

import typer
from rich.table import Table
from rich.text import Text

from bot.cli.base import (
    WHOLE_NUMBER,
    ConfigOpt,
    JsonOpt,
    _database,
    _dump,
    _fail,
    _settings,
    _since,
    _when,
    _zone,
    app,
    out,
)
from storage import stats as stats_store
from storage.db import transaction
from storage.stats import Stats

IssueOpt = Annotated[int | None, typer.Option(
    "--issue", metavar="N", parser=WHOLE_NUMBER, help="Only this issue's funnel (the weeks "
    "and scenes stay the account's).", show_default=False)]
SinceOpt = Annotated[str | None, typer.Option(
    "--since", metavar="DATE", help="Only events from this day on (YYYY-MM-DD, a day in "
    "[broadcast] timezone). Tokens outstanding and subscriber counts are always as of now.",
    show_default=False)]


@app.command("stats")
def stats_report(
    ctx: typer.Context,
    issue: IssueOpt = None,
    since: SinceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Card views, excerpt opens, unlocks and full reads per issue (distinct readers) with the
    card → unlock conversion; follows, active readers, new and repeat payers and revenue per
    week; follows, payers and revenue per QR scene; tokens outstanding."""
    settings = _settings(ctx, config)
    zone = _zone(settings)
    start = _since(since, zone)
    with _database(settings) as engine:
        with transaction(engine) as session:
            if issue is not None and not stats_store.known_issue(session, issue):
                _fail(f"--issue {issue}: there is no issue #{issue}; `newsbot issue list` "
                      "shows the issues", 2)
        # Fold the events since the scheduler's last minutely run (never far behind), then
        # read: compute counts the pairs plus whatever came in between.
        with transaction(engine) as session:
            stats_store.roll_up(session, timezone=zone.key)
        with transaction(engine) as session:
            result = stats_store.compute(session, issue=issue, since=start, timezone=zone.key)
    if as_json:
        _dump(result.to_json())
        return
    _print(result, zone, settings.tokens.name)


def _table(title: str, *columns: str) -> Table:
    """Figures (every column after the first) right-aligned."""
    table = Table(*columns, title=title, title_justify="left", caption_justify="left")
    for column in table.columns[1:]:
        column.justify = "right"
    return table


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _print(result: Stats, zone: ZoneInfo, unit: str) -> None:
    window = f"since {_when(result.since, zone)}" if result.since is not None else "all time"
    out.print(f"Stats, {window}; readers are distinct subscribers, amounts in {unit}",
              markup=False, soft_wrap=True)

    funnel = _table("Issues: card → excerpt → unlock", "issue", "cards", "excerpts",
                    "unlocks", "card → unlock", "full reads", "revenue")
    for i in result.issues:
        funnel.add_row(Text(f"#{i.number} {i.title}".rstrip()), str(i.card_views),
                       str(i.excerpt_opens), str(i.unlocks), _percent(i.conversion),
                       str(i.full_reads), str(i.revenue_tokens))
    out.print(funnel)

    weeks = _table(f"Weeks ({zone.key})", "week", "follows", "unfollows", "active",
                   "new payers", "repeat payers", "revenue", "top-ups")
    weeks.columns[0].no_wrap = True
    for w in result.weeks:
        weeks.add_row(w.week, str(w.follows), str(w.unfollows), str(w.active_readers),
                      str(w.new_payers), str(w.repeat_payers), str(w.revenue_tokens),
                      str(w.topup_tokens))
    out.print(weeks)
    out.print("active: distinct subscribers with any event; payers spent tokens or bought "
              "them with money, new ones for the first time", markup=False, soft_wrap=True,
              style="dim")

    if result.scenes:
        scenes = _table("QR scenes", "scene", "follows", "scans", "brought", "payers",
                        "revenue")
        for s in result.scenes:
            scenes.add_row(Text(s.scene), str(s.follows), str(s.scans), str(s.subscribers),
                           str(s.payers), str(s.revenue_tokens))
        out.print(scenes)

    out.print(f"subscribers: {result.subscribers}, following now: {result.followers}",
              markup=False)
    out.print(f"tokens outstanding now: {result.tokens_outstanding} {unit} (in readers' "
              "balances)", markup=False, soft_wrap=True)
