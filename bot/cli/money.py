"""Subscribers and their tokens: `user list/show`, `topup`, `adjust`, `ledger check`."""

from __future__ import annotations

import getpass
import uuid
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer
from rich.table import Table
from rich.text import Text
from sqlmodel import Session

from bot.cli.base import (
    CLI_KEY_PREFIX,
    MAX_ABS_AMOUNT,
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
    cli_key,
    err,
    ledger_app,
    out,
    user_app,
    whole_number,
)
from handlers.numbers import parse_int
from storage import audit, ledger, subscribers
from storage.db import transaction
from storage.errors import (
    IdempotencyConflict,
    InsufficientBalance,
    InvalidAmount,
    UnknownSubscriber,
)
from storage.ledger import CreditKind, LedgerResult
from storage.models import LedgerEntry, Subscriber


def _entry_json(e: LedgerEntry, zone: ZoneInfo) -> dict[str, Any]:
    return {
        "id": e.id,
        "amount": e.amount,
        "kind": e.kind,
        "issue_number": e.issue_number,
        "reason": e.reason,
        "operator": e.operator,
        "key": e.idempotency_key,
        "balance_after": e.balance_after,
        "created_at": _iso(e.created_at, zone),
    }


def _user_json(sub: Subscriber, zone: ZoneInfo) -> dict[str, Any]:
    return {
        "openid": sub.openid,
        "balance": sub.balance,
        "subscribed": sub.subscribed,
        "created_at": _iso(sub.created_at, zone),
        "subscribed_at": _iso(sub.subscribed_at, zone),
        "unsubscribed_at": _iso(sub.unsubscribed_at, zone),
    }


@user_app.command("list")
def user_list(
    ctx: typer.Context,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    active: Annotated[bool, typer.Option("--active", help="Only current followers.")] = False,
    limit: Annotated[int, typer.Option(parser=whole_number(1), help="At most this many.")]
    = 100,
) -> None:
    """Subscribers, oldest first."""
    settings = _settings(ctx, config)
    with _database(settings) as engine, transaction(engine) as session:
        subs = subscribers.list_subscribers(session, limit=limit, active_only=active)
        total = subscribers.count_subscribers(session, active_only=active)
    zone = _zone(settings)
    if as_json:
        _dump([_user_json(s, zone) for s in subs])
        return
    table = Table("openid", "balance", "subscribed", _header("since", zone))
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
    entries: Annotated[int, typer.Option(parser=whole_number(1),
                                         help="Ledger rows to show.")] = 100,
) -> None:
    """One subscriber: balance, unlocked issues and ledger entries (newest first)."""
    settings = _settings(ctx, config)
    with _database(settings) as engine, transaction(engine) as session:
        sub = subscribers.get_subscriber(session, openid=openid)
        if sub is None:
            _fail(f"no subscriber {openid!r}", 1)
        unlocked = sorted(ledger.unlocked_issues(session, openid=openid))
        rows = ledger.recent_entries(session, openid=openid, limit=entries)
    zone = _zone(settings)
    if as_json:
        _dump({**_user_json(sub, zone), "unlocked": unlocked,
               "entries": [_entry_json(e, zone) for e in rows]})
        return
    unit = settings.tokens.name
    out.print(
        f"{sub.openid}: balance {sub.balance} {unit}, "
        f"{'subscribed' if sub.subscribed else 'unsubscribed'}; unlocked: "
        f"{', '.join(f'#{n}' for n in unlocked) or 'none'}",
        markup=False, soft_wrap=True,
    )
    table = Table("id", _header("when", zone), "amount", "kind", "balance", "reason", "by")
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
    amount = parse_int(raw.strip(), signed=True)
    if amount is None:
        _fail(f"{name} must be a whole number of {unit} in digits 0-9 (a leading - to "
              f"subtract, no +), got {raw!r}; nothing written", 2)
    if abs(amount) > MAX_ABS_AMOUNT:
        _fail(f"{name} {amount} is implausibly large; nothing written", 2)
    return amount


def _credit(ctx: typer.Context, config: Path | None, *, kind: CreditKind, openid: str,
            raw_amount: str, reason: str, key: str | None, operator: str | None) -> None:
    settings = _settings(ctx, config)
    unit = settings.tokens.name
    amount = _parse_amount(raw_amount, "AMOUNT" if kind == "topup" else "DELTA", unit)
    given = key or None  # an empty --key means a generated one, as it always did
    key = cli_key(given) if given is not None else f"{CLI_KEY_PREFIX}{uuid.uuid4()}"
    operator = operator or f"cli:{_os_user()}"
    try:
        with _database(settings) as engine, transaction(engine) as session:
            if given is not None and legacy_key(session, given=given, key=key):
                key = given
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
    _report_credit(result, key=key, unit=unit, zone=_zone(settings))


def legacy_key(session: Session, *, given: str, key: str) -> bool:
    """Whether ``--key X`` means the key ``X`` as stored by a CLI from before the namespace
    (it stored keys as given): when ``cli:X`` is unused but ``X`` exists, so a retry of a
    command from before the upgrade still answers with its first result instead of paying
    again. (It may also find a chat action's old key; then it is refused as a different action
    or reported as applied, as before, and nothing is written.)"""
    return given != key and not ledger.key_used(session, key=key) and \
        ledger.key_used(session, key=given)


def _report_credit(result: LedgerResult, *, key: str, unit: str, zone: ZoneInfo) -> None:
    e = result.entry
    what = f"{e.kind} {e.amount:+d} {unit} for {e.openid}"
    if result.replayed:
        out.print(f"already applied: key {key} was used at {_when(e.created_at, zone)} for {what} "
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
KeyOpt = Annotated[str | None, typer.Option("--key", help="Idempotency key, stored as cli:KEY "
                                            "(default: a new cli:<uuid>); re-use the printed "
                                            "key to retry safely.")]
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
    """Every cached balance against the sum of its ledger entries; every unlock, code, pass,
    gift and refund against its source; the revenue totals against the ledger."""
    settings = _settings(ctx, config)
    with _database(settings) as engine, transaction(engine) as session:
        problems = ledger.check(session)
        totals = audit.totals(session)
        users = subscribers.count_subscribers(session)
        entries = ledger.count_entries(session)
    unit = settings.tokens.name
    if as_json:
        _dump({"ok": not problems, "users": users, "entries": entries,
               "totals": {"in": totals.tokens_in, "spent": totals.tokens_spent,
                          "entries": totals.entries, "balances": totals.balances},
               "mismatches": [{"openid": p.openid or None, "cached": p.cached,
                               "ledger": p.ledger, "problem": p.problem} for p in problems]})
    elif not problems:
        out.print(f"ledger OK: {_plural(users, 'user')}, {_plural(entries, 'entry', 'entries')}"
                  f"; in {totals.tokens_in} − spent {totals.tokens_spent} = {totals.entries} "
                  f"{unit} = the sum of all entries = the sum of all balances", markup=False,
                  soft_wrap=True)
    else:
        for p in problems:
            amounts = f" (cached {p.cached}, ledger {p.ledger})" if p.about_balance else ""
            err.print(f"{p.openid}: {p.problem}{amounts}" if p.openid else p.problem,
                      style="red", markup=False, soft_wrap=True)
        err.print(f"ledger MISMATCH: {_plural(len(problems), 'problem')} across "
                  f"{_plural(users, 'user')}, {_plural(entries, 'entry', 'entries')}",
                  style="bold red", markup=False)
    if problems:
        raise typer.Exit(1)
