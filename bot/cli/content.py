"""`newsbot issue …`: import, list, show and publish issues."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from bot.cli.base import (
    ConfigOpt,
    JsonOpt,
    _database,
    _dump,
    _fail,
    _header,
    _iso,
    _local,
    _settings,
    _status,
    _when,
    _zone,
    err,
    issue_app,
    out,
)
from storage.content import IssueFileError, parse_issue_file
from storage.db import transaction
from storage.errors import (
    UnknownIssue,
)
from storage.issues import IssuePreview, get_issue, list_issues, publish_issue, upsert_issue
from storage.models import utcnow


def _issue_summary(issue: IssuePreview, now: datetime, zone: ZoneInfo) -> dict[str, Any]:
    return {
        "number": issue.number,
        "title": issue.title,
        "price": issue.price,
        "free_percent": issue.free_percent,
        "published": _iso(issue.published_at, zone),
        "status": _status(issue, now),
        "char_count": issue.char_count,
        "excerpt_char_count": issue.excerpt_char_count,
    }


@issue_app.command("import")
def issue_import(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(metavar="FILE", show_default=False)],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import issue files (TOML front matter + Markdown); re-importing a number updates it."""
    settings = _settings(ctx, config)
    default_free = settings.content.free_percent
    results: list[dict[str, Any]] = []
    failed = 0
    with _database(settings) as engine:
        for path in files:
            try:
                parsed = parse_issue_file(path, default_free_percent=default_free)
            except IssueFileError as exc:
                failed += 1
                results.append({"file": str(path), "status": "error", "field": exc.field,
                                "message": exc.message})
                err.print(f"{exc.file}: {exc.field}: {exc.message}", style="red", markup=False,
                          soft_wrap=True)
                continue
            with transaction(engine) as session:
                status = upsert_issue(session, parsed=parsed, default_free_percent=default_free)
            results.append({"file": str(path), "status": status, "number": parsed.number,
                            "title": parsed.title, "draft": parsed.published is None,
                            "char_count": parsed.char_count,
                            "excerpt_char_count": parsed.excerpt_char_count})
            if not as_json:
                note = {"created": "created", "updated": "updated (re-import replaced it)",
                        "unchanged": "unchanged (same file as stored)"}[status]
                out.print(
                    f"{note}: #{parsed.number} {parsed.title} — {parsed.char_count:,} 字, "
                    f"free excerpt {parsed.excerpt_char_count:,} 字 "
                    f"({parsed.effective_free_percent}%)",
                    markup=False, soft_wrap=True,
                )
    if as_json:
        _dump(results)
    if failed:
        _fail(f"{failed} of {len(files)} file(s) not imported", 1)


@issue_app.command("list")
def issue_list(ctx: typer.Context, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """All issues, drafts included, newest first."""
    settings = _settings(ctx, config)
    with _database(settings) as engine, transaction(engine) as session:
        items = list_issues(session, default_free_percent=settings.content.free_percent,
                            include_drafts=True)
    now, zone = utcnow(), _zone(settings)
    if as_json:
        _dump([_issue_summary(i, now, zone) for i in items])
        return
    if not items:
        out.print("no issues yet: import one with `newsbot issue import FILE`", markup=False)
        return
    table = Table("#", "title", "price", _header("status", zone), "字", "free 字")
    table.columns[1].overflow = "fold"
    for i in items:
        status = _status(i, now)
        shown = status if status == "draft" else \
            f"{status} {_local(i.published_at, zone, '%Y-%m-%d')}"
        table.add_row(str(i.number), Text(i.title), f"{i.price} {settings.tokens.name}",
                      shown, f"{i.char_count:,}", f"{i.excerpt_char_count:,}")
    out.print(table)


@issue_app.command("show")
def issue_show(
    ctx: typer.Context,
    number: Annotated[int, typer.Argument(metavar="N")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One issue: details, topics and the free excerpt."""
    settings = _settings(ctx, config)
    with _database(settings) as engine, transaction(engine) as session:
        try:
            issue = get_issue(session, number=number,
                              default_free_percent=settings.content.free_percent,
                              include_drafts=True)
        except UnknownIssue:
            _fail(f"no issue {number}", 1)
    now, zone = utcnow(), _zone(settings)
    topics = [{"title": t.title, "questions": list(t.questions)} for t in issue.topics]
    if as_json:
        _dump({**_issue_summary(issue, now, zone), "summary": issue.summary, "topics": topics,
               "excerpt": issue.excerpt_md})
        return
    status = _status(issue, now)
    lines = [
        f"#{issue.number} {issue.title}",
        f"status: {status}" + (f" {_when(issue.published_at, zone)}"
                               if issue.published_at else ""),
        f"price: {issue.price} {settings.tokens.name}; free excerpt {issue.free_percent}% = "
        f"{issue.excerpt_char_count:,} of {issue.char_count:,} 字",
    ]
    if issue.summary:
        lines.append(f"summary: {issue.summary}")
    for n, t in enumerate(issue.topics, 1):
        lines.append(f"topic {n}: {t.title}")
        lines += [f"  - {q}" for q in t.questions]
    out.print("\n".join(lines), markup=False, soft_wrap=True)
    out.print(Panel(Text(issue.excerpt_md or "(no free excerpt)"), title="free excerpt"))


@issue_app.command("publish")
def issue_publish(
    ctx: typer.Context,
    number: Annotated[int, typer.Argument(metavar="N")],
    config: ConfigOpt = None,
) -> None:
    """Make an issue current now (a scheduled date in the future is brought forward)."""
    settings = _settings(ctx, config)
    now = utcnow()
    with _database(settings) as engine, transaction(engine) as session:
        try:
            before = get_issue(session, number=number,
                               default_free_percent=settings.content.free_percent,
                               include_drafts=True)
        except UnknownIssue:
            _fail(f"no issue {number}: import it first with `newsbot issue import FILE`", 1)
        issue = publish_issue(session, number=number, at=now)
    when = _when(issue.published_at, _zone(settings))
    if before.published_at is not None and before.published_at <= now:
        out.print(f"#{number} {before.title} was already published at {when}", markup=False)
    else:
        out.print(f"published #{number} {before.title} at {when}", markup=False)
