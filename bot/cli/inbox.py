"""`newsbot inbox` and `newsbot reply`: the messages subscribers left (storage.mailbox) and the
operator's answer, sent as a customer-service message (bot.wechat.reply, shared with the
console)."""

from __future__ import annotations

import getpass
from typing import Annotated, Any
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
    _header,
    _iso,
    _local,
    _settings,
    _when,
    _zone,
    app,
    out,
)
from bot.logs import setup_logging
from bot.wechat.api import WeChatClient
from bot.wechat.reply import BadReply, Outcome, check_text, send_reply
from storage import mailbox
from storage.db import transaction
from storage.mailbox import Message, Reply


@app.command("inbox")
def inbox(
    ctx: typer.Context,
    unread: Annotated[bool, typer.Option("--unread", help="Only messages no operator has "
                                         "read (answered ones are read).")] = False,
    openid: Annotated[str | None, typer.Option(
        "--openid", help="One subscriber's conversation, oldest first, replies included.",
        show_default=False)] = None,
    limit: Annotated[int, typer.Option(parser=WHOLE_NUMBER, metavar="N",
                                       help="At most this many messages.")] = 200,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Messages subscribers left (text no command took, and 人工), newest first, with the
    replies sent beside them. Reading them here does not mark them read: a reply does, and so
    does opening the conversation in the console."""
    settings = _settings(ctx, config)
    zone = _zone(settings)
    with _database(settings) as engine, transaction(engine) as s:
        found = mailbox.messages(s, unread=unread, openid=openid, limit=limit)
        if openid is not None:
            found.reverse()
        total_unread = mailbox.unread_count(s)
    if as_json:
        _dump({"unread": total_unread, "messages": [_message_json(m, zone) for m in found]})
        return
    if not found:
        out.print("no unread messages" if unread else "no messages", markup=False)
        return
    table = Table(title=f"inbox: {len(found)} shown, {total_unread} unread")
    for column in (_header("time", zone), "openid", "kind", "text", "answered"):
        table.add_column(column, overflow="fold")
    for m in found:
        table.add_row(_local(m.at, zone), m.openid, m.kind + ("" if m.read_at else " •"),
                      Text(m.text), _answered(m, zone))
        for r in m.replies:
            table.add_row(_local(r.at, zone), Text(f"↳ {r.operator}", style="dim"),
                          Text(f"reply, {r.status}", style="dim"), Text(r.text, style="dim"),
                          Text(r.error or "", style="dim"))
    out.print(table)
    out.print("• unread. Answer with: newsbot reply OPENID TEXT", style="dim", markup=False)


def _answered(m: Message, zone: ZoneInfo) -> str:
    if m.answered_at is not None:
        return f"yes, {_local(m.answered_at, zone)}"
    return "no"


def _reply_json(r: Reply, zone: ZoneInfo) -> dict[str, Any]:
    return {"id": r.id, "at": _iso(r.at, zone), "operator": r.operator, "text": r.text,
            "status": r.status, "error": r.error}


def _message_json(m: Message, zone: ZoneInfo) -> dict[str, Any]:
    return {"id": m.id, "at": _iso(m.at, zone), "openid": m.openid, "kind": m.kind,
            "text": m.text, "read": m.read_at is not None,
            "answered_at": _iso(m.answered_at, zone),
            "replies": [_reply_json(r, zone) for r in m.replies]}


@app.command("reply")
def reply(
    ctx: typer.Context,
    openid: Annotated[str, typer.Argument(help="The subscriber to answer.")],
    text: Annotated[str, typer.Argument(help="The answer (at most 2048 bytes of UTF-8).")],
    operator: Annotated[str | None, typer.Option(
        help="Who answers, stored with the reply (default: cli:<your OS user>).",
        show_default=False)] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer a subscriber in the chat (a customer-service message), stored beside their
    messages. Exit 1 when it cannot reach them: outside WeChat's 48-hour window (they have not
    written for 48 hours), the account may not send such messages (48001: unverified), or
    WeChat refused it; the refused attempt is stored with the reason. Exit 2 for an empty or
    oversized TEXT or an unknown OPENID, and nothing is written."""
    settings = _settings(ctx, config)
    try:
        text = check_text(text)
    except BadReply as exc:
        _fail(f"{exc.reason}; nothing written", 2)
    problems = [p for p in settings.missing_secrets(need_api=True) if "wechat" in p]
    if problems:
        _fail("\n".join(problems), 2)
    setup_logging("WARNING", settings.server.log_format)
    zone = _zone(settings)
    who = operator or f"cli:{_os_user()}"
    with _database(settings) as engine, WeChatClient(settings.wechat, engine) as client:
        try:
            outcome = send_reply(engine, client, openid=openid, text=text, operator=who)
        except BadReply as exc:
            _fail(f"{exc.reason}; nothing written", 2)
    if as_json:
        _dump({"status": _status(outcome), "why": outcome.why,
               "reply_id": outcome.reply_id, "error": outcome.error,
               "last_interaction": _iso(outcome.window.last, zone),
               "window_closes_at": _iso(outcome.window.closes_at, zone)})
    elif outcome.sent:
        out.print(f"sent to {openid}; the 48-hour window closes "
                  f"{_when(outcome.window.closes_at, zone)}", markup=False)
    if not outcome.sent:
        _fail(explain(outcome, zone), 1)


def explain(outcome: Outcome, zone: ZoneInfo) -> str:
    """Why a reply did not go out, for the operator."""
    win = outcome.window
    last = f"; their last message we know of: {_when(win.last, zone)}" if win.last else ""
    reasons = {
        "window": (f"not sent: outside WeChat's 48-hour window (it closed "
                   f"{_when(win.closes_at, zone)}{last})" if win.closes_at else
                   "not sent: the subscriber has not written in the last 48 hours, so WeChat "
                   "would not deliver it"),
        "unfollowed": "not sent: the subscriber has unfollowed the account",
        "unauthorized": "not sent: WeChat says this account may not send customer-service "
                        "messages (48001 api unauthorized: only verified accounts can)",
        "out_of_time": "not sent: WeChat says the subscriber's window has closed (45015: "
                       "no message from them in 48 hours, or they unfollowed)",
        "count": "not sent: WeChat's limit of messages in this window is used up (45047); "
                 "it reopens when the subscriber writes again",
        "not_follower": "not sent: WeChat does not know this openid as a follower (40003)",
    }
    text = reasons.get(outcome.why, f"not sent: WeChat failed ({outcome.error}); try again")
    return f"{text}. The attempt is stored as {_status(outcome)} (reply {outcome.reply_id})."


def _status(outcome: Outcome) -> str:
    return {"sent": "sent", "failed": "failed"}.get(outcome.why, "refused")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no $USER and no passwd entry (some containers)
        return "unknown"
