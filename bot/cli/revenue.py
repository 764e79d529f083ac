"""`newsbot revenue`: tokens in by source, spent per issue, pass and gift, refunds, and what
is still owed to readers, all read from the ledger (storage.revenue)."""

from __future__ import annotations

from typing import Annotated
from zoneinfo import ZoneInfo

import typer
from rich.table import Table
from rich.text import Text

from bot.cli.base import (
    ConfigOpt,
    JsonOpt,
    _database,
    _dump,
    _iso,
    _settings,
    _since,
    _when,
    _zone,
    app,
    out,
)
from bot.settings import Settings
from storage import issues, revenue
from storage.db import transaction
from storage.payments import yuan
from storage.revenue import BatchLine, Revenue

SinceOpt = Annotated[str | None, typer.Option(
    "--since", metavar="DATE", help="Only flows from this day on (YYYY-MM-DD, a day in "
    "[broadcast] timezone). Outstanding tokens are always as of now.", show_default=False)]


@app.command("revenue")
def revenue_report(
    ctx: typer.Context,
    since: SinceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Tokens in (top-ups, adjustments, each code batch, refunds), spent (per issue, per
    pass, gifts), refunds, and tokens outstanding: sold, not yet spent, owed to readers."""
    settings = _settings(ctx, config)
    zone = _zone(settings)
    start = _since(since, zone)
    with _database(settings) as engine, transaction(engine) as session:
        rev = revenue.report(session, since=start)
        titles = {i.number: i.title for i in issues.list_issues(
            session, default_free_percent=settings.content.free_percent)}
    if as_json:
        _dump({"since": _iso(start, zone), "unit": settings.tokens.name,
               **revenue.as_json(rev)})
        return
    _print(rev, settings, zone, titles)


def _grants(b: BatchLine, settings: Settings) -> str:
    if b.kind == "tokens":
        return f"{b.grants_tokens} {settings.tokens.name} each"
    if b.kind == "issue":
        return f"issue #{b.issue_number}"
    if b.kind == "pass":
        return f"pass {_pass_name(b.pass_id, settings)}"
    return "(batch missing)"


def _pass_name(pass_id: str | None, settings: Settings) -> str:
    found = settings.pass_by_id(pass_id or "")
    return f"{pass_id} ({found.name})" if found is not None else str(pass_id)


def _what(issue: int | None, pass_id: str | None, settings: Settings,
          titles: dict[int, str]) -> str:
    if issue is not None:
        return f"#{issue} {titles.get(issue, '')}".rstrip()
    if pass_id is not None:
        return f"pass {_pass_name(pass_id, settings)}"
    return "(unknown)"


def _table(title: str, *columns: str) -> Table:
    """Figures (the columns after the first two) right-aligned."""
    table = Table(*columns, title=title, title_justify="left")
    for column in table.columns[2 if len(columns) > 2 else 1:]:
        column.justify = "right"
    return table


def _print(rev: Revenue, settings: Settings, zone: ZoneInfo, titles: dict[int, str]) -> None:
    unit = settings.tokens.name
    window = f"since {_when(rev.since, zone)}" if rev.since is not None else "all time"
    out.print(f"Revenue, {window}; amounts in {unit}", markup=False, soft_wrap=True)

    sources = _table("Tokens in", "source", "tokens")
    sources.add_row("operator top-ups", str(rev.topups))
    sources.add_row("adjustments (net)", f"{rev.adjustments:+d}")
    for b in rev.codes:
        if b.tokens:
            sources.add_row(Text(_batch_name(b)), str(b.tokens))
    sources.add_row("refunds", str(rev.refunds_in))
    if rev.pay or rev.pay_refunds or rev.money.orders:
        money = rev.money
        sources.add_row(f"WeChat Pay ({money.orders} orders, ¥{yuan(money.paid_fen)})",
                        str(rev.pay))
        sources.add_row(f"WeChat Pay refunds ({money.refunds}, ¥{yuan(money.refunded_fen)})",
                        f"{rev.pay_refunds:+d}")
    sources.add_row("total", str(rev.tokens_in), style="bold")
    out.print(sources)

    if rev.codes:
        batches = _table("Code batches", "batch", "grants", "redemptions", "tokens in")
        for b in rev.codes:
            batches.add_row(Text(_batch_name(b)), Text(_grants(b, settings)),
                            str(b.redemptions), str(b.tokens))
        out.print(batches)

    spent = _table("Tokens spent", "on", "count", "tokens")
    for line in rev.issues:
        spent.add_row(Text(_what(line.issue_number, None, settings, titles)),
                      f"{line.count} unlocks", str(line.tokens))
    for line in rev.passes:
        spent.add_row(Text(_what(None, line.pass_id, settings, titles)),
                      f"{line.count} bought", str(line.tokens))
    for g in rev.gifts:
        spent.add_row(Text("gift: " + _what(g.issue_number, g.pass_id, settings, titles)),
                      f"{g.bought} bought, {g.redeemed} redeemed", str(g.tokens))
    spent.add_row("total", "", str(rev.tokens_spent), style="bold")
    out.print(spent)

    if rev.refunds:
        refunds = _table("Refunds", "of", "count", "tokens")
        for r in rev.refunds:
            refunds.add_row(Text(_what(r.issue_number, r.pass_id, settings, titles)),
                            str(r.count), str(r.tokens))
        out.print(refunds)

    out.print(f"in {rev.tokens_in} − spent {rev.tokens_spent} = net {rev.net:+d} {unit}",
              markup=False)
    if rev.since is not None:
        out.print(f"outstanding when the window opened {rev.opening} + net {rev.net:+d} = "
                  f"{rev.opening + rev.net} {unit}", markup=False)
    out.print(f"outstanding now: {rev.outstanding} {unit} (in readers' balances: sold or given, "
              "not yet spent)", markup=False, soft_wrap=True)


def _batch_name(b: BatchLine) -> str:
    if not b.batch_id:
        return "codes of no batch"
    return f"code batch #{b.batch_id}" + (f" {b.label}" if b.label else "")

