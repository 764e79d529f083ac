"""`newsbot console-link` (an operator's one-time link to the web console, as ``#console``
gives in the chat) and `newsbot audit` (what was done in the console: storage.console)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

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
    _header,
    _iso,
    _local,
    _settings,
    _since,
    _when,
    _zone,
    app,
    out,
)
from bot.console.links import ConsoleLinks
from storage import console as store
from storage.db import read_only

SinceOpt = Annotated[str | None, typer.Option(
    "--since", metavar="DATE", help="Only actions from this day on (YYYY-MM-DD, a day in "
    "[broadcast] timezone).", show_default=False)]

MAX_LIMIT = 10_000


@app.command("console-link")
def console_link(
    ctx: typer.Context,
    openid: Annotated[str, typer.Argument(help="The operator's openid (in [operators] "
                                          "openids).", show_default=False)],
    config: ConfigOpt = None,
) -> None:
    """Print a one-time link to the web console for an operator: it opens once, within
    [console] link_minutes, and starts a session of [console] session_hours."""
    settings = _settings(ctx, config)
    openid = openid.strip()
    if openid not in settings.operators.openids:
        _fail(f"{openid!r} is not an operator: add it to [operators] openids in the config "
              "file first (only operators may open the console); no link made", 2)
    if not settings.reader.secret:
        _fail("[reader] secret is not set: console links are signed with it; no link made", 2)
    now = time.time()
    link = ConsoleLinks(settings).url(openid, now=now)
    zone = _zone(settings)
    expires = datetime.fromtimestamp(now + settings.console.link_minutes * 60, UTC)
    out.print(link, markup=False, soft_wrap=True)
    out.print(f"Opens once, until {_when(expires, zone)}; the session it starts lasts "
              f"{settings.console.session_hours} hours. Do not forward it.",
              markup=False, soft_wrap=True, style="dim")


_RESULTS = {"ok": "green", "refused": "red", "error": "red"}


@app.command("audit")
def audit(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(
        "--limit", metavar="N", parser=WHOLE_NUMBER,
        help=f"At most this many actions, newest first (1-{MAX_LIMIT}).")] = 100,
    since: SinceOpt = None,
    operator: Annotated[str | None, typer.Option(
        "--operator", metavar="OPENID", help="Only this operator's actions.",
        show_default=False)] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What operators did in the web console (refused and failed actions too), newest first."""
    if not 1 <= limit <= MAX_LIMIT:
        _fail(f"--limit must be between 1 and {MAX_LIMIT}, got {limit}", 2)
    settings = _settings(ctx, config)
    zone = _zone(settings)
    start = _since(since, zone)
    with _database(settings) as engine, read_only(engine) as session:
        # Plain dicts: the rows expire when the read-only session ends.
        actions: list[dict[str, Any]] = [
            {"at": a.at, "operator": a.operator, "action": a.action, "target": a.target,
             "result": a.result, "detail": a.detail}
            for a in store.list_actions(session, limit=limit, since=start,
                                        operator=operator.strip() if operator else None)]
    if as_json:
        _dump([{**a, "at": _iso(a["at"], zone)} for a in actions])
        return
    if not actions:
        out.print("No console actions" + (f" since {since}" if since else "") + ".",
                  markup=False)
        return
    table = Table(_header("time", zone), "operator", "action", "target", "result", "detail")
    for a in actions:
        table.add_row(_local(a["at"], zone, "%Y-%m-%d %H:%M:%S"),
                      *(Text(a[k]) for k in ("operator", "action", "target")),
                      Text(a["result"], style=_RESULTS.get(a["result"], "")), Text(a["detail"]))
    out.print(table)
