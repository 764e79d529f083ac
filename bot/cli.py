"""The operator CLI: serve, demo, chat, issues, users and the token ledger.

Exit codes: 0 done; 1 something was not found or did not check out (unknown issue or user, a
bad issue file, ledger mismatches, server unreachable); 2 the request itself is wrong (bad
configuration, missing secrets, a bad amount, a refused ledger write). Money commands never
write anything when they exit non-zero.
"""

from __future__ import annotations

import getpass
import json
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, tzinfo
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from bot.crypto import safe_mode_problems
from bot.logs import setup_logging
from bot.settings import Settings, SettingsError, load_settings
from storage import ledger, schema, subscribers
from storage.content import IssueFileError, parse_issue_file
from storage.db import make_engine, transaction
from storage.errors import (
    IdempotencyConflict,
    InsufficientBalance,
    InvalidAmount,
    UnknownIssue,
    UnknownSubscriber,
)
from storage.issues import IssuePreview, get_issue, list_issues, publish_issue, upsert_issue
from storage.ledger import CreditKind, LedgerResult
from storage.models import LedgerEntry, Subscriber, utcnow

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

app = typer.Typer(
    name="newsbot",
    help="WeChat newsletter bot: run the server, manage issues, users and tokens.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
issue_app = typer.Typer(help="Import, list, show and publish issues.", no_args_is_help=True)
user_app = typer.Typer(help="Subscribers and their balances.", no_args_is_help=True)
ledger_app = typer.Typer(help="The token ledger.", no_args_is_help=True)
db_app = typer.Typer(
    help="The database schema. `serve` refuses to start unless the schema is current; the "
    "other commands set up a database that holds no newsbot tables yet (a first run) and "
    "refuse any other out-of-date schema. Run `newsbot db upgrade` after installing a new "
    "newsbot version.",
    short_help="The database schema: `db upgrade` after installing a new version.",
    no_args_is_help=True,
)
app.add_typer(issue_app, name="issue")
app.add_typer(user_app, name="user")
app.add_typer(ledger_app, name="ledger")
app.add_typer(db_app, name="db")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (default: $NEWSBOT_CONFIG, then "
                 "./config.toml).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

# Far above any real balance, far below SQLite's and PostgreSQL's 64-bit integer limit.
MAX_ABS_AMOUNT = 10**12
_INTEGER = re.compile(r"[+-]?[0-9]+")


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


# --------------------------------------------------------------------------- helpers


def _fail(message: str, code: int) -> NoReturn:
    err.print(message, style="red", markup=False, soft_wrap=True)
    raise typer.Exit(code)


@app.callback()
def _root(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """WeChat newsletter bot: run the server, manage issues, users and tokens."""
    ctx.obj = {"config": config}


def _config_path(ctx: typer.Context, config: Path | None) -> Path | None:
    if config is not None:
        return config
    root = ctx.find_root().obj
    return root.get("config") if isinstance(root, dict) else None


def _settings(ctx: typer.Context, config: Path | None,
              overrides: dict[str, Any] | None = None) -> Settings:
    try:
        return load_settings(_config_path(ctx, config), overrides=overrides)
    except SettingsError as exc:
        _fail(str(exc), 2)


def _db_label(settings: Settings) -> str:
    return make_url(settings.database.url).render_as_string(hide_password=True)


@contextmanager
def _database(settings: Settings, *, set_up_empty: bool = True) -> Iterator[Engine]:
    """The configured database, which must be at the current schema revision (exit 2 with
    the `newsbot db upgrade` hint otherwise). A database with no newsbot tables at all is what
    a first run finds: unless ``set_up_empty`` is false (``serve``), it is upgraded here."""
    engine = make_engine(settings.database.url)
    try:
        try:
            if set_up_empty and schema.is_empty(engine):
                schema.upgrade(engine)
                err.print(f"new database: created the schema (revision "
                          f"{schema.head_revision()})", style="dim", markup=False)
            schema.check_current(engine)
        except schema.SchemaError as exc:  # out of date, or tables that cannot be adopted
            _fail(f"{_db_label(settings)}: {exc}", 2)
        except DBAPIError as exc:
            _fail(f"cannot open the database {_db_label(settings)!r}: {exc.orig}", 1)
        yield engine
    finally:
        engine.dispose()


def _zone(settings: Settings) -> tzinfo:
    try:
        return ZoneInfo(settings.broadcast.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat()


def _local(dt: datetime | None, zone: tzinfo, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return "" if dt is None else dt.astimezone(zone).strftime(fmt)


def _status(issue: IssuePreview, now: datetime) -> str:
    if issue.published_at is None:
        return "draft"
    return "published" if issue.published_at <= now else "scheduled"


def _dump(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))


# --------------------------------------------------------------------------- serve / demo / chat


@app.command()
def serve(
    ctx: typer.Context,
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address [server] host.")] = None,
    port: Annotated[int | None, typer.Option(help="Port [server] port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
    threads: Annotated[int | None, typer.Option(help="Threads per worker.")] = None,
    log_level: Annotated[LogLevel, typer.Option(help="Log level.")] = LogLevel.info,
) -> None:
    """Run the webhook and reader pages on gunicorn.

    Refuses to start (exit 2) unless the database schema is current: run `newsbot db upgrade`
    first."""
    from bot.server import ServerOptions, run_server

    given = {"host": host, "port": port, "workers": workers, "threads": threads}
    overrides = {"server": {k: v for k, v in given.items() if v is not None}}
    settings = _settings(ctx, config, overrides)
    problems = settings.missing_secrets(
        need_api=settings.broadcast.scheduler and settings.broadcast.mode != "off")
    wechat = settings.wechat
    problems += safe_mode_problems(wechat.encoding_aes_key, wechat.app_id,
                                   wechat.previous_encoding_aes_key)
    if problems:
        for line in problems:
            err.print(line, style="red", markup=False, soft_wrap=True)
        _fail("refusing to start until these are set", 2)
    setup_logging(log_level.value.upper(), settings.server.log_format)
    with _database(settings, set_up_empty=False):
        pass  # checks the schema revision; each worker opens its own engine after the fork
    srv = settings.server
    run_server(settings, ServerOptions(host=srv.host, port=srv.port, workers=srv.workers,
                                       threads=srv.threads, log_level=log_level.value))


@app.command()
def demo(
    port: Annotated[int | None, typer.Option(help="Port (default: a free one).")] = None,
    workdir: Annotated[Path, typer.Option("--dir", help="Working folder, wiped each run.")]
    = Path(".newsbot-demo"),
    no_chat: Annotated[bool, typer.Option("--no-chat", help="Only serve until Ctrl-C.")]
    = False,
) -> None:
    """Try the bot locally: fresh database, sample issue, a funded reader, a chat."""
    from bot.demo import run_demo

    raise typer.Exit(run_demo(port=port, workdir=workdir, chat=not no_chat, console=out))


@app.command()
def chat(
    ctx: typer.Context,
    config: ConfigOpt = None,
    url: Annotated[str | None, typer.Option(help="Webhook URL (default from the config).")]
    = None,
    user: Annotated[str, typer.Option(help="The openid to chat as.")] = "o_chat_user",
    token: Annotated[str | None, typer.Option(help="WeChat token (default [wechat] token).")]
    = None,
) -> None:
    """Chat with a running server as a WeChat user would (signed XML pushes)."""
    from bot.chat import run_chat

    if url is None or token is None:
        settings = _settings(ctx, config)
        srv = settings.server
        host = "127.0.0.1" if srv.host in ("0.0.0.0", "::", "") else srv.host
        url = url or f"http://{host}:{srv.port}{srv.webhook_path}"
        token = token if token is not None else settings.wechat.token
    if not token:
        _fail("no WeChat token: pass --token or set [wechat] token in the config", 2)
    raise typer.Exit(run_chat(url=url, token=token, openid=user, console=out))


# --------------------------------------------------------------------------- issues


def _issue_summary(issue: IssuePreview, now: datetime) -> dict[str, Any]:
    return {
        "number": issue.number,
        "title": issue.title,
        "price": issue.price,
        "free_percent": issue.free_percent,
        "published": _iso(issue.published_at),
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
    now = utcnow()
    if as_json:
        _dump([_issue_summary(i, now) for i in items])
        return
    if not items:
        out.print("no issues yet: import one with `newsbot issue import FILE`", markup=False)
        return
    zone = _zone(settings)
    table = Table("#", "title", "price", "status", "字", "free 字")
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
    now = utcnow()
    topics = [{"title": t.title, "questions": list(t.questions)} for t in issue.topics]
    if as_json:
        _dump({**_issue_summary(issue, now), "summary": issue.summary, "topics": topics,
               "excerpt": issue.excerpt_md})
        return
    zone = _zone(settings)
    status = _status(issue, now)
    lines = [
        f"#{issue.number} {issue.title}",
        f"status: {status}" + (f" ({_local(issue.published_at, zone)})"
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
    when = _local(issue.published_at, _zone(settings))
    if before.published_at is not None and before.published_at <= now:
        out.print(f"#{number} {before.title} was already published ({when})", markup=False)
    else:
        out.print(f"published #{number} {before.title} ({when})", markup=False)


# --------------------------------------------------------------------------- users


def _entry_json(e: LedgerEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "amount": e.amount,
        "kind": e.kind,
        "issue_number": e.issue_number,
        "reason": e.reason,
        "operator": e.operator,
        "key": e.idempotency_key,
        "balance_after": e.balance_after,
        "created_at": _iso(e.created_at),
    }


def _user_json(sub: Subscriber) -> dict[str, Any]:
    return {
        "openid": sub.openid,
        "balance": sub.balance,
        "subscribed": sub.subscribed,
        "created_at": _iso(sub.created_at),
        "subscribed_at": _iso(sub.subscribed_at),
        "unsubscribed_at": _iso(sub.unsubscribed_at),
    }


@user_app.command("list")
def user_list(
    ctx: typer.Context,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    active: Annotated[bool, typer.Option("--active", help="Only current followers.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 100,
) -> None:
    """Subscribers, oldest first."""
    settings = _settings(ctx, config)
    with _database(settings) as engine, transaction(engine) as session:
        subs = subscribers.list_subscribers(session, limit=limit, active_only=active)
        total = subscribers.count_subscribers(session, active_only=active)
    if as_json:
        _dump([_user_json(s) for s in subs])
        return
    zone = _zone(settings)
    table = Table("openid", "balance", "subscribed", "since")
    for s in subs:
        table.add_row(Text(s.openid), f"{s.balance} {settings.tokens.name}",
                      "yes" if s.subscribed else "no", _local(s.created_at, zone))
    out.print(table)
    out.print(f"{len(subs)} shown of {total}{' active' if active else ''}", markup=False)


@user_app.command("show")
def user_show(
    ctx: typer.Context,
    openid: Annotated[str, typer.Argument(metavar="OPENID")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    entries: Annotated[int, typer.Option(min=1, help="Ledger rows to show.")] = 100,
) -> None:
    """One subscriber: balance, unlocked issues and ledger entries (newest first)."""
    settings = _settings(ctx, config)
    with _database(settings) as engine, transaction(engine) as session:
        sub = subscribers.get_subscriber(session, openid=openid)
        if sub is None:
            _fail(f"no subscriber {openid!r}", 1)
        unlocked = sorted(ledger.unlocked_issues(session, openid=openid))
        rows = ledger.recent_entries(session, openid=openid, limit=entries)
    if as_json:
        _dump({**_user_json(sub), "unlocked": unlocked, "entries": [_entry_json(e) for e in rows]})
        return
    unit = settings.tokens.name
    zone = _zone(settings)
    out.print(
        f"{sub.openid}: balance {sub.balance} {unit}, "
        f"{'subscribed' if sub.subscribed else 'unsubscribed'}; unlocked: "
        f"{', '.join(f'#{n}' for n in unlocked) or 'none'}",
        markup=False, soft_wrap=True,
    )
    table = Table("id", "when", "amount", "kind", "balance", "reason", "by")
    for e in rows:
        table.add_row(str(e.id), _local(e.created_at, zone), f"{e.amount:+d}", e.kind,
                      str(e.balance_after), Text(e.reason), Text(e.operator or ""))
    out.print(table)


# --------------------------------------------------------------------------- tokens


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no $USER and no passwd entry (some containers)
        return "unknown"


def _parse_amount(raw: str, name: str, unit: str) -> int:
    text = raw.strip()
    if not _INTEGER.fullmatch(text):
        _fail(f"{name} must be a whole number of {unit}, got {raw!r}; nothing written", 2)
    amount = int(text)
    if abs(amount) > MAX_ABS_AMOUNT:
        _fail(f"{name} {amount} is implausibly large; nothing written", 2)
    return amount


def _credit(ctx: typer.Context, config: Path | None, *, kind: CreditKind, openid: str,
            raw_amount: str, reason: str, key: str | None, operator: str | None) -> None:
    settings = _settings(ctx, config)
    unit = settings.tokens.name
    amount = _parse_amount(raw_amount, "AMOUNT" if kind == "topup" else "DELTA", unit)
    key = key or f"cli:{uuid.uuid4()}"
    operator = operator or f"cli:{_os_user()}"
    try:
        with _database(settings) as engine, transaction(engine) as session:
            result = ledger.credit(session, openid=openid, amount=amount, kind=kind, key=key,
                                   reason=reason, operator=operator,
                                   max_topup=settings.tokens.max_topup)
    except InvalidAmount as exc:
        _fail(f"{exc}; nothing written", 2)
    except InsufficientBalance as exc:
        _fail(f"{openid} has {exc.balance} {unit}: an adjustment of {amount:+d} would take the "
              "balance below zero; nothing written", 2)
    except UnknownSubscriber:
        _fail(f"no subscriber {openid!r}: the user must message the account first (or be "
              "synced from WeChat); nothing written", 2)
    except IdempotencyConflict as exc:
        _fail(f"{exc}; nothing written", 2)
    _report_credit(result, key=key, unit=unit)


def _report_credit(result: LedgerResult, *, key: str, unit: str) -> None:
    e = result.entry
    what = f"{e.kind} {e.amount:+d} {unit} for {e.openid}"
    if result.replayed:
        out.print(f"already applied: key {key} was used at {_iso(e.created_at)} for {what} "
                  f"(entry #{e.id}, balance after {e.balance_after} {unit}); nothing new "
                  "written", markup=False, soft_wrap=True)
        return
    out.print(f"{what}: balance now {e.balance_after} {unit} (entry #{e.id})", markup=False,
              soft_wrap=True)
    out.print(f"key: {key}  (re-run with this --key to retry without a second charge)",
              markup=False, soft_wrap=True)


# ignore_unknown_options lets a negative number like -5 through as an argument.
_AMOUNT_CTX = {"ignore_unknown_options": True}
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (kept in the ledger).",
                                        show_default=False)]
KeyOpt = Annotated[str | None, typer.Option("--key", help="Idempotency key (default: a new "
                                            "cli:<uuid>); re-use it to retry safely.")]
OperatorOpt = Annotated[str | None, typer.Option("--operator", help="Who did it (default: "
                                                 "cli:$USER).")]


@app.command(context_settings=_AMOUNT_CTX)
def topup(
    ctx: typer.Context,
    openid: Annotated[str, typer.Argument(metavar="OPENID")],
    amount: Annotated[str, typer.Argument(metavar="AMOUNT")],
    reason: ReasonOpt,
    key: KeyOpt = None,
    operator: OperatorOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Add tokens to a subscriber's balance."""
    _credit(ctx, config, kind="topup", openid=openid, raw_amount=amount, reason=reason,
            key=key, operator=operator)


@app.command(context_settings=_AMOUNT_CTX)
def adjust(
    ctx: typer.Context,
    openid: Annotated[str, typer.Argument(metavar="OPENID")],
    delta: Annotated[str, typer.Argument(metavar="DELTA")],
    reason: ReasonOpt,
    key: KeyOpt = None,
    operator: OperatorOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Correct a balance by DELTA (negative allowed, never below zero)."""
    _credit(ctx, config, kind="adjust", openid=openid, raw_amount=delta, reason=reason,
            key=key, operator=operator)


@ledger_app.command("check")
def ledger_check(ctx: typer.Context, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every cached balance against the sum of its ledger entries."""
    settings = _settings(ctx, config)
    with _database(settings) as engine, transaction(engine) as session:
        problems = ledger.check(session)
        users = subscribers.count_subscribers(session)
        entries = ledger.count_entries(session)
    if as_json:
        _dump({"ok": not problems, "users": users, "entries": entries,
               "mismatches": [{"openid": p.openid, "cached": p.cached, "ledger": p.ledger,
                               "problem": p.problem} for p in problems]})
    elif not problems:
        out.print(f"ledger OK: {users} users, {entries} entries", markup=False)
    else:
        for p in problems:
            err.print(f"{p.openid}: {p.problem} (cached {p.cached}, ledger {p.ledger})",
                      style="red", markup=False, soft_wrap=True)
        err.print(f"ledger MISMATCH: {len(problems)} problem(s) across {users} users, "
                  f"{entries} entries", style="bold red", markup=False)
    if problems:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- database


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Bring the database to the current schema revision (a no-op when it is there).

    Creates the tables in an empty database, adopts one made before migrations existed and
    applies newer migrations, in one transaction. Run it after installing a new newsbot, before
    `serve`."""
    settings = _settings(ctx, config)
    label = _db_label(settings)
    engine = make_engine(settings.database.url)
    try:
        before = schema.current_revision(engine)
        empty = before is None and schema.is_empty(engine)
        schema.upgrade(engine)
        after = schema.current_revision(engine)
    except schema.SchemaError as exc:
        _fail(f"{label}: {exc}", 2)
    except DBAPIError as exc:
        _fail(f"cannot open the database {label!r}: {exc.orig}", 1)
    finally:
        engine.dispose()
    if before == after:
        out.print(f"{label}: already at revision {after}, nothing to do", markup=False,
                  soft_wrap=True)
        return
    start = before or ("empty" if empty else "no revision (made before migrations)")
    out.print(f"{label}: upgraded {start} → {after}", markup=False, soft_wrap=True)




# The WeChat-facing commands live in their own module; importing it registers them on `app`.


# The WeChat-facing commands live in their own module; importing it registers them on `app`.
from bot import cli_ops  # noqa: E402, F401


def main() -> None:
    setup_logging("WARNING")
    app(prog_name="newsbot")


if __name__ == "__main__":
    # Go through the importable module: bot.cli_ops registers its commands on *its* `app`.
    from bot.cli import main as _main

    _main()
