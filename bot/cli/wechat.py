"""Operator commands that talk to the WeChat API: broadcasts, the scheduler, follower sync and
the custom menu. Imported by ``bot.cli``, which registers them on the root app."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from types import FrameType
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import Engine

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
    _when,
    _zone,
    app,
    err,
    out,
)
from bot.jobs.broadcast import Broadcaster
from bot.jobs.broadcast import Progress as BroadcastProgress
from bot.logs import setup_logging
from bot.settings import Settings
from bot.wechat.api import WeChatClient, WeChatError
from bot.wechat.menu import MenuError, build_menu
from handlers.numbers import parse_int
from storage import broadcasts, subscribers
from storage.db import transaction
from storage.errors import BroadcastRefused, UnknownIssue
from storage.models import Broadcast

users_app = typer.Typer(help="Followers pulled from WeChat.", no_args_is_help=True)
menu_app = typer.Typer(help="The account's custom menu.", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(menu_app, name="menu")


def _need_api(settings: Settings) -> None:
    problems = [p for p in settings.missing_secrets(need_api=True) if "wechat" in p]
    if problems:
        _fail("\n".join(problems), 2)


@contextmanager
def _client(settings: Settings, engine: Engine) -> Iterator[WeChatClient]:
    _need_api(settings)
    with WeChatClient(settings.wechat, engine) as client:
        yield client


def _broadcast_json(s: Any, record: Broadcast, zone: ZoneInfo) -> dict[str, Any]:
    return {
        "issue": record.issue_number, "mode": record.mode, "status": record.status,
        "forced": record.forced, "batches_sent": record.batches_sent,
        "recipients": record.recipients, "error": record.error,
        "started_at": _iso(record.started_at, zone),
        "finished_at": _iso(record.finished_at, zone),
        "batches": [{
            "seq": b.seq, "status": b.status, "clientmsgid": b.clientmsgid,
            "msg_id": b.msg_id, "recipients": b.recipients, "already_sent": b.already_sent,
            "sent_at": _iso(b.sent_at, zone),
            "wechat_status": b.job_status, "total_count": b.total_count,
            "sent_count": b.sent_count, "error_count": b.error_count,
            "filter_count": b.filter_count,
        } for b in broadcasts.batches(s, broadcast_id=record.id or 0)],
    }


def _parse_iso(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _status(settings: Settings, number: int | None, as_json: bool) -> None:
    zone = _zone(settings)
    with _database(settings) as engine, transaction(engine) as s:
        if number is not None:
            one = broadcasts.get_broadcast(s, issue_number=number)
            if one is None:
                _fail(f"issue {number} has not been broadcast", 1)
            records = [one]
        else:
            records = broadcasts.list_broadcasts(s)
        data = [_broadcast_json(s, r, zone) for r in records]
        runs = broadcasts.recent_weekly_runs(s, limit=5)
    if as_json:
        _dump(data[0] if number is not None else data)
        return
    if not data:
        out.print("no broadcasts yet")
    for item in data:
        table = Table(title=f"issue {item['issue']}: {item['status']} ({item['mode']}, "
                            f"{_plural(item['recipients'], 'recipient')}, "
                            f"{_plural(item['batches_sent'], 'batch', 'batches')}; started "
                            f"{_when(_parse_iso(item['started_at']), zone)})")
        for column in ("batch", "status", "recipients", _header("sent", zone), "msg_id",
                       "WeChat report"):
            table.add_column(column)
        for b in item["batches"]:
            report = (f"{b['wechat_status']}: {b['sent_count']}/{b['total_count']} sent, "
                      f"{_plural(b['error_count'] or 0, 'error')}" if b["wechat_status"]
                      else "—")
            note = " (already sent)" if b["already_sent"] else ""
            table.add_row(str(b["seq"]), b["status"] + note, str(b["recipients"]),
                          _local(_parse_iso(b["sent_at"]), zone), str(b["msg_id"] or ""),
                          report)
        out.print(table)
        if item["error"]:
            err.print(f"last error: {item['error']}", style="red", markup=False)
    if number is None and runs:
        out.print(f"weekly runs ({zone.key}): " + "; ".join(
            f"{_local(r.scheduled_for, zone)} {r.status} {r.note or ''}".strip()
            for r in runs), markup=False)


@app.command("broadcast")
def broadcast(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(
        metavar="N|status|resume", help="An issue number N to push, or `status [N]`, or "
        "`resume N`.", show_default=False)],
    number: Annotated[int | None, typer.Argument(
        metavar="N", help="The issue for `status` (default: all) or `resume`.",
        show_default=False, parser=WHOLE_NUMBER)] = None,
    preview: Annotated[bool, typer.Option(
        "--preview", help="Send to [broadcast] preview_openids only.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print text and plan; send nothing.")]
    = False,
    force: Annotated[bool, typer.Option("--force", help="Go past the monthly cap.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Push issue N to subscribers now; `broadcast status [N]`; `broadcast resume N`."""
    settings = _settings(ctx, config)
    if target == "status":
        _status(settings, number, as_json)
        return
    resume = target == "resume"
    if resume:
        if number is None:
            _fail("usage: newsbot broadcast resume N", 2)
        issue_number = number
    else:
        parsed = parse_int(target)
        if parsed is None or number is not None:
            _fail(f"expected an issue number, `status [N]` or `resume N`, got {target!r}", 2)
        issue_number = parsed
    setup_logging("WARNING", settings.server.log_format)
    with _database(settings) as engine:
        if dry_run:
            _dry_run(settings, engine, issue_number)
            return
        with _client(settings, engine) as client:
            sender = Broadcaster(settings, engine, client)
            try:
                # Everything that can refuse is checked before a progress bar is drawn.
                sender.check(issue_number, force=force, resume=resume, preview=preview)
                if preview:  # a few calls, no bar
                    sent_to = sender.preview(issue_number)
                    out.print(f"preview of issue {issue_number} sent to {', '.join(sent_to)}",
                              markup=False)
                    return
                with _bar() as bar:
                    task = bar.add_task(f"issue {issue_number}", total=None)

                    def on_progress(p: BroadcastProgress) -> None:
                        bar.update(task, completed=p.recipients, total=p.total or None,
                                   description=f"issue {issue_number} · batch {p.batch}")

                    sender.on_progress = on_progress
                    record = sender.resume(issue_number) if resume else sender.start(
                        issue_number, force=force)
            except (BroadcastRefused, UnknownIssue) as exc:
                _fail(str(exc), 2)
            except WeChatError as exc:
                if preview:
                    _fail(f"WeChat refused the preview: {exc.errcode} {exc.errmsg}", 1)
                _fail(f"WeChat refused: {exc.errcode} {exc.errmsg}. The progress so far is "
                      f"saved; fix the cause and run `newsbot broadcast resume {issue_number}`",
                      1)
    out.print(f"issue {record.issue_number} broadcast {record.status}: "
              f"{_plural(record.batches_sent, 'batch', 'batches')}, "
              f"{_plural(record.recipients, 'recipient')} confirmed ({record.mode})",
              markup=False)


def _bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=False)


def _dry_run(settings: Settings, engine: Engine, number: int) -> None:
    sender = Broadcaster(settings, engine, messenger=_NoMessenger())
    try:
        plan = sender.plan(number)
        sender.check(number)
        verdict = "would be sent"
    except (BroadcastRefused, UnknownIssue) as exc:
        if isinstance(exc, UnknownIssue):
            _fail(str(exc), 2)
        verdict = f"would be refused: {exc}"
    out.print(plan.text, markup=False)
    out.print("")
    size = settings.broadcast.batch_size
    if plan.mode == "openids":
        out.print(f"plan: mode openids, {_plural(plan.recipients, 'active subscriber')} in "
                  f"{_plural(plan.batches, 'batch', 'batches')} of up to {size}; {verdict}",
                  markup=False)
    elif plan.mode == "sendall":
        target = f"tag {settings.broadcast.tag_id}" if settings.broadcast.tag_id else "everyone"
        out.print(f"plan: mode sendall to {target}, 1 call; {verdict}", markup=False)
    else:
        out.print(f"plan: mode off, nothing is pushed; {verdict}", markup=False)
    out.print(f"{len(plan.text.encode())} bytes (limit 2048); nothing was sent", markup=False)


class _NoMessenger:
    def send_all_text(self, content: str, **_: Any) -> Any:
        raise AssertionError("dry run")

    def send_to_openids_text(self, openids: Any, content: str, **_: Any) -> Any:
        raise AssertionError("dry run")

    def preview_text(self, openid: str, content: str) -> None:
        raise AssertionError("dry run")


@app.command("scheduler")
def scheduler(
    ctx: typer.Context,
    config: ConfigOpt = None,
    parent_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run only the weekly job (publish the next draft, broadcast it) until stopped."""
    from bot.jobs.scheduler import WeeklyScheduler

    settings = _settings(ctx, config)
    if settings.broadcast.mode != "off":
        _need_api(settings)
    setup_logging("INFO", settings.server.log_format)
    with _database(settings) as engine:
        sched = WeeklyScheduler(settings, engine,
                                lambda: WeChatClient(settings.wechat, engine), blocking=True)

        def stop(_signum: int, _frame: FrameType | None) -> None:
            sched.shutdown()

        signal.signal(signal.SIGTERM, stop)
        if parent_pid is not None:
            _exit_with_parent(parent_pid, sched.shutdown)
        out.print(f"weekly job: cron {settings.broadcast.cron!r} in "
                  f"{settings.broadcast.timezone}, next run "
                  f"{_when(sched.next_fire_time(), _zone(settings)) or 'none'}", markup=False)
        try:
            sched.start()
        except KeyboardInterrupt:
            sched.shutdown()


def _exit_with_parent(parent_pid: int, shutdown: Callable[[], None]) -> None:
    """Started by `newsbot serve`: stop when that server is gone, even if it was SIGKILLed."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1)
        shutdown()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@users_app.command("sync")
def users_sync(ctx: typer.Context, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Pull the follower list page by page into the subscriber table."""
    settings = _settings(ctx, config)
    setup_logging("WARNING", settings.server.log_format)
    pages = seen = new = 0
    with _database(settings) as engine, _client(settings, engine) as client:
        try:
            for page in client.iter_followers():
                with transaction(engine) as s:
                    new += subscribers.add_followers(s, openids=page)
                pages += 1
                seen += len(page)
                if not as_json:
                    err.print(f"page {pages}: {_plural(len(page), 'follower')}", markup=False)
        except WeChatError as exc:
            _fail(f"WeChat refused: {exc.errcode} {exc.errmsg} (after "
                  f"{_plural(pages, 'page')}; "
                  "running sync again is safe)", 1)
        with transaction(engine) as s:
            active = subscribers.count_subscribers(s, active_only=True)
    if as_json:
        _dump({"pages": pages, "followers": seen, "new": new, "active": active})
    else:
        out.print(f"synced {_plural(seen, 'follower')} in {_plural(pages, 'page')}: {new} new, "
                  f"{_plural(active, 'active subscriber')} in total", markup=False)


@menu_app.command("sync")
def menu_sync(ctx: typer.Context, config: ConfigOpt = None,
              dry_run: Annotated[bool, typer.Option(
                  "--dry-run", help="Print the menu JSON; send nothing.")] = False) -> None:
    """Create the custom menu from [[menu.buttons]] in the config."""
    import json

    settings = _settings(ctx, config)
    try:
        menu = build_menu(settings.menu)
    except MenuError as exc:
        _fail(f"[[menu.buttons]]: {exc}", 2)
    if dry_run:
        out.print(json.dumps(menu, ensure_ascii=False, indent=2), markup=False)
        return
    with _database(settings) as engine, _client(settings, engine) as client:
        try:
            client.create_menu(menu)
        except WeChatError as exc:
            _fail(f"WeChat refused the menu: {exc.errcode} {exc.errmsg}", 1)
    out.print(f"menu created: {_plural(len(menu['button']), 'button')}", markup=False)


