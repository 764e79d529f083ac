"""`newsbot issue …`: import, list, show and publish issues."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn
from zoneinfo import ZoneInfo

import typer
from rich.panel import Panel
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
    _plural,
    _settings,
    _status,
    _when,
    _zone,
    err,
    issue_app,
    out,
)
from bot.settings import Settings
from storage.content import (
    IssueFileError,
    IssueProblem,
    ParsedIssue,
    TextDiff,
    duplicate_numbers,
    parse_issue_file,
)
from storage.db import transaction
from storage.errors import (
    UnknownIssue,
)
from storage.images import image_problems
from storage.issues import (
    ImportPlan,
    IssuePreview,
    apply_import,
    get_issue,
    list_issues,
    plan_import,
    publish_issue,
)
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


def _when_or_draft(dt: datetime | None, zone: ZoneInfo) -> str:
    return "draft" if dt is None else _when(dt, zone)


def _toml_time(dt: datetime, zone: ZoneInfo) -> str:
    return dt.astimezone(zone).isoformat(timespec="seconds")


def _quote(text: str, limit: int = 40) -> str:
    return f"「{text if len(text) <= limit else text[: limit - 1] + '…'}」"


def _text_change(diff: TextDiff) -> str:
    if not diff.added and not diff.removed:
        return f"formatting only, no 字 changed ({_plural(diff.blocks_changed, 'block')})"
    return (f"+{diff.added:,}/−{diff.removed:,} 字 in {diff.blocks_changed} of "
            f"{max(diff.blocks_before, diff.blocks_after)} blocks (paragraphs, headings…)")


def _changes(plan: ImportPlan, zone: ZoneInfo, settings: Settings) -> list[str]:
    """The diff summary of an update, one line per changed field."""
    before, new = plan.before, plan.parsed
    if before is None or plan.status != "updated":
        return []
    lines: list[str] = []
    unit = settings.tokens.name
    for name in plan.changed:
        if name == "title":
            lines.append(f"title: {_quote(before.title)} → {_quote(new.title)}")
        elif name == "summary":
            lines.append(f"summary: {_quote(before.summary)} → {_quote(new.summary)}")
        elif name == "price":
            lines.append(f"price: {before.price} → {new.price} {unit}")
        elif name == "free_percent":
            lines.append(f"free excerpt: {before.free_percent}% → {new.effective_free_percent}%")
        elif name == "published":
            was, now = (_when_or_draft(before.published_at, zone),
                        _when_or_draft(plan.published_at, zone))
            if was == now and before.published_at and plan.published_at:  # seconds apart
                was, now = (_local(before.published_at, zone, "%Y-%m-%d %H:%M:%S"),
                            _local(plan.published_at, zone, "%Y-%m-%d %H:%M:%S"))
            lines.append(f"published: {was} → {now}")
        elif name == "topics":
            old_t = {t.title: t for t in before.topics}
            new_t = {t.title: t for t in new.topics}
            parts = [f"+{_quote(t, 20)}" for t in new_t if t not in old_t]
            parts += [f"−{_quote(t, 20)}" for t in old_t if t not in new_t]
            edited = [t for t in new_t if t in old_t and new_t[t] != old_t[t]]
            if edited:
                parts.append("questions changed in " + ", ".join(_quote(t, 20) for t in edited))
            if not parts:
                parts.append("reordered")
            lines.append(f"topics: {len(before.topics)} → {len(new.topics)}: "
                         + "; ".join(parts))
        elif name == "text" and plan.text is not None:
            lines.append(f"text: {_text_change(plan.text)}; {before.char_count:,} → "
                         f"{new.char_count:,} 字")
    if not lines:
        lines.append("no visible change (only the file's formatting differs)")
    return lines


def _refusal_problems(plan: ImportPlan, zone: ZoneInfo, settings: Settings) -> list[IssueProblem]:
    """Each refusal of a plan as a problem saying what to change or which flag to pass."""
    p, before = plan.parsed, plan.before
    if before is None:
        return []
    n = p.number
    sold = f"issue {n} has been sold ({_plural(plan.buyers, 'buyer')})"
    problems = []
    for refusal in plan.refusals:
        if refusal == "published_missing" and before.published_at is not None:
            state = "published since" if before.published_at <= utcnow() else "scheduled for"
            message = (
                f"issue {n} is {state} {_when_or_draft(before.published_at, zone)}, but this "
                "file has no `published` (absent = draft). To keep it as it is, add "
                f"`published = {_toml_time(before.published_at, zone)}` to the front matter; "
                "to make it a draft again, pass --unpublish"
                + (" --force (it has buyers, and a draft is hidden from them)"
                   if plan.buyers else ""))
            problems.append(IssueProblem(p.file, p.lines.get("number"), "published", message))
        elif refusal == "sold_price":
            problems.append(IssueProblem(
                p.file, p.lines.get("price"), "price",
                f"{sold}: the price would change {before.price} → {p.price} "
                f"{settings.tokens.name}. Keep `price = {before.price}`, or pass --force to "
                "change it (buyers keep their unlock)"))
        elif refusal == "sold_text" and plan.text is not None:
            problems.append(IssueProblem(
                p.file, p.lines.get("body"), "body",
                f"{sold}: the text they paid for would change ({_text_change(plan.text)}). "
                "Keep the stored text, or pass --force to replace it: buyers will then read "
                "the new text"))
        elif refusal == "sold_hidden":
            what = "unpublishing it" if plan.published_at is None else \
                f"publishing it only at {_when_or_draft(plan.published_at, zone)}"
            keep = "" if before.published_at is None else \
                f"Keep `published = {_toml_time(before.published_at, zone)}`, or pass --force"
            problems.append(IssueProblem(
                p.file, p.lines.get("published") or p.lines.get("number"), "published",
                f"{sold}: {what} would hide it from its buyers. {keep}"))
    return problems


def _plan_json(plan: ImportPlan, zone: ZoneInfo, settings: Settings,
               dry_run: bool) -> dict[str, Any]:
    p = plan.parsed
    return {"file": p.file, "status": plan.status, "number": p.number, "title": p.title,
            "draft": plan.published_at is None, "published": _iso(plan.published_at, zone),
            "char_count": p.char_count, "excerpt_char_count": p.excerpt_char_count,
            "buyers": plan.buyers, "changed": list(plan.changed),
            "changes": _changes(plan, zone, settings), "dry_run": dry_run}


def _report(plan: ImportPlan, zone: ZoneInfo, settings: Settings, *, would: bool) -> None:
    p = plan.parsed
    verb = {"created": "create", "updated": "update", "unchanged": "leave unchanged"}
    done = {"created": "created", "updated": "updated", "unchanged": "unchanged"}
    head = f"would {verb[plan.status]}" if would else done[plan.status]
    if plan.status == "unchanged":
        out.print(f"{head}: #{p.number} {p.title} ({p.file}: same file as stored)",
                  markup=False, soft_wrap=True)
        return
    state = _when_or_draft(plan.published_at, zone)
    state = state if plan.published_at is None else (
        ("published " if plan.published_at <= utcnow() else "scheduled ") + state)
    out.print(f"{head}: #{p.number} {p.title} — {p.char_count:,} 字, free excerpt "
              f"{p.excerpt_char_count:,} 字 ({p.effective_free_percent}%), {state} ({p.file})",
              markup=False, soft_wrap=True)
    for line in _changes(plan, zone, settings):
        out.print(f"  {line}", markup=False, soft_wrap=True)


def _refuse(problems: list[IssueProblem], as_json: bool, hint: str) -> NoReturn:
    if as_json:
        _dump([{"file": q.file, "status": "error", "line": q.line, "field": q.field,
                "message": q.message} for q in problems])
    for q in problems:
        err.print(str(q), style="red", markup=False, soft_wrap=True)
    files = len({q.file for q in problems})
    _fail(f"nothing imported: {_plural(len(problems), 'problem')} in {_plural(files, 'file')}; "
          f"{hint}", 2)


DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Validate and show what would change; write nothing.")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Allow changing the price or text of an issue readers have paid for, "
    "or hiding it from them.")]
UnpublishOpt = Annotated[bool, typer.Option(
    "--unpublish", help="Make a published issue whose file has no `published` a draft again.")]


@issue_app.command("import")
def issue_import(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(metavar="FILE", show_default=False)],
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    unpublish: UnpublishOpt = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate issue files (TOML front matter + Markdown) and store them all, or none.

    Every problem of every file is reported first (exit 2, nothing written). Re-importing a
    number updates it and prints what changes; an issue readers have paid for keeps its price
    and text unless --force is given."""
    settings = _settings(ctx, config)
    default_free = settings.content.free_percent
    zone = _zone(settings)
    parsed: list[ParsedIssue] = []
    problems: list[IssueProblem] = []
    for path in files:
        try:
            issue = parse_issue_file(path, default_free_percent=default_free)
        except IssueFileError as exc:
            problems += exc.problems
            continue
        parsed.append(issue)
        problems += image_problems(issue.body_md, file=str(path),
                                   hosts=settings.reader.image_hosts)
    problems += duplicate_numbers(parsed)
    if problems:  # before the database is even opened
        _refuse(problems, as_json, "fix them and run the import again")
    with _database(settings) as engine, transaction(engine) as session:
        now = utcnow()
        plans = [plan_import(session, parsed=p, default_free_percent=default_free, now=now,
                             force=force, unpublish=unpublish) for p in parsed]
        problems = [q for plan in plans for q in _refusal_problems(plan, zone, settings)]
        if problems:
            if not as_json:
                for plan in plans:
                    _report(plan, zone, settings, would=True)
            _refuse(problems, as_json, "change the files or pass the flag named above")
        if not dry_run:
            for plan in plans:
                apply_import(session, plan=plan)
    if as_json:
        _dump([_plan_json(plan, zone, settings, dry_run) for plan in plans])
        return
    for plan in plans:
        _report(plan, zone, settings, would=dry_run)
    counts = {s: sum(1 for p in plans if p.status == s)
              for s in ("created", "updated", "unchanged")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    if dry_run:
        out.print(f"dry run: {summary} if imported; nothing written", markup=False)
    elif len(plans) > 1:
        out.print(f"imported {len(plans)} files: {summary}", markup=False)


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
    number: Annotated[int, typer.Argument(metavar="N", parser=WHOLE_NUMBER)],
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
    number: Annotated[int, typer.Argument(metavar="N", parser=WHOLE_NUMBER)],
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
            _fail(f"no issue {number}: import it first with `newsbot issue import FILE`", 2)
        issue = publish_issue(session, number=number, at=now)
    when = _when(issue.published_at, _zone(settings))
    if before.published_at is not None and before.published_at <= now:
        out.print(f"#{number} {before.title} was already published at {when}", markup=False)
    else:
        out.print(f"published #{number} {before.title} at {when}", markup=False)
