"""Passes (会员卡): `pass list` (the configured offers), `pass grant` (an operator's gift of a
pass, idempotent by key like `topup`) and `pass show` (a subscriber's periods)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer
from rich.table import Table
from rich.text import Text

from bot.cli.base import (
    CLI_KEY_PREFIX,
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
    cli_key,
    out,
)
from bot.settings import Settings
from storage import passes, subscribers
from storage.db import transaction
from storage.errors import IdempotencyConflict, UnknownSubscriber
from storage.models import PassPeriod
from storage.passes import PassGrant

pass_app = typer.Typer(help="Passes (会员卡): the configured offers, grants, who holds one.",
                       no_args_is_help=True)
app.add_typer(pass_app, name="pass")


def _offers(settings: Settings) -> str:
    return ", ".join(p.id for p in settings.passes) or "none ([[passes]] is empty)"


@pass_app.command("list")
def pass_list(ctx: typer.Context, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The passes subscribers can buy ([[passes]] in the config)."""
    settings = _settings(ctx, config)
    if as_json:
        _dump([p.model_dump() for p in settings.passes])
        return
    if not settings.passes:
        out.print("no passes configured: add [[passes]] entries (id, name, days, price) to the "
                  "config", markup=False, soft_wrap=True)
        return
    unit = settings.tokens.name
    table = Table("id", "name", "days", "price", "chat words")
    for p in settings.passes:
        table.add_row(p.id, Text(p.name), str(p.days), f"{p.price} {unit}",
                      Text(f"开通 {p.name}"))
    out.print(table)


@pass_app.command("grant")
def pass_grant(
    ctx: typer.Context,
    openid: Annotated[str, typer.Argument(metavar="OPENID")],
    pass_id: Annotated[str, typer.Argument(metavar="ID", help="A pass id from `pass list`.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept with the period).",
                                        show_default=False)],
    key: Annotated[str | None, typer.Option(
        "--key", help="Idempotency key, stored as cli:KEY (default: a new cli:<uuid>); re-use "
        "the printed key to retry without granting twice.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give a subscriber a pass (no tokens taken): it starts now, or where their running pass
    ends."""
    settings = _settings(ctx, config)
    offer = settings.pass_by_id(pass_id.strip().lower())
    if offer is None:
        _fail(f"no pass {pass_id!r} in the config (configured: {_offers(settings)}); nothing "
              "written", 2)
    if not reason.strip():
        _fail("--reason must say why; nothing written", 2)
    given = key or None
    key = cli_key(given) if given is not None else f"{CLI_KEY_PREFIX}{uuid.uuid4()}"
    try:
        with _database(settings) as engine, transaction(engine) as session:
            granted = passes.grant(session, openid=openid, pass_id=offer.id, days=offer.days,
                                   source="grant", key=key, operator="cli", reason=reason)
            until = passes.status(session, openid=openid)
    except UnknownSubscriber:
        _fail(f"no subscriber {openid!r}: the user must message the account first (or be "
              "synced from WeChat); nothing written", 2)
    except IdempotencyConflict as exc:
        _fail(f"{exc}; nothing written", 2)
    zone = _zone(settings)
    if as_json:
        _dump({"replayed": granted.replayed, "key": key, "period": _period_json(
            granted.period, zone), "until": _iso(until.until if until else None, zone)})
        return
    _report_grant(granted, offer.name, key=key, zone=zone)


def _report_grant(granted: PassGrant, name: str, *, key: str, zone: ZoneInfo) -> None:
    p = granted.period
    what = f"pass {p.pass_id} ({name}, {p.days} days) for {p.openid}"
    if granted.replayed:
        out.print(f"already applied: key {key} was used at {_when(p.created_at, zone)} for "
                  f"{what} (period #{p.id}, {_when(p.starts_at, zone)} to "
                  f"{_when(p.ends_at, zone)}); nothing new written", markup=False,
                  soft_wrap=True)
        return
    out.print(f"granted {what}: {_when(p.starts_at, zone)} to {_when(p.ends_at, zone)} "
              f"(period #{p.id})", markup=False, soft_wrap=True)
    out.print(f"key: {key}  (re-run with this --key to retry without granting twice)",
              markup=False, soft_wrap=True)


def _period_json(p: PassPeriod, zone: ZoneInfo) -> dict[str, Any]:
    return {
        "id": p.id, "pass_id": p.pass_id, "days": p.days, "source": p.source,
        "starts_at": _iso(p.starts_at, zone), "ends_at": _iso(p.ends_at, zone),
        "cut_at": _iso(p.cut_at, zone), "first_issue": p.first_issue,
        "ledger_entry_id": p.ledger_entry_id, "code_redemption_id": p.code_redemption_id,
        "refund_entry_id": p.refund_entry_id, "operator": p.operator, "reason": p.reason,
        "key": p.idempotency_key, "created_at": _iso(p.created_at, zone),
    }


@pass_app.command("show")
def pass_show(
    ctx: typer.Context,
    openid: Annotated[str, typer.Argument(metavar="OPENID")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A subscriber's pass periods (oldest first) and the pass running now."""
    settings = _settings(ctx, config)
    with _database(settings) as engine, transaction(engine) as session:
        if subscribers.get_subscriber(session, openid=openid) is None:
            _fail(f"no subscriber {openid!r}", 1)
        held = passes.periods(session, openid=openid)
        running = passes.status(session, openid=openid)
    zone = _zone(settings)
    names = {p.id: p.name for p in settings.passes}
    if as_json:
        _dump({"openid": openid, "running": None if running is None else {
            "pass_id": running.pass_id, "name": names.get(running.pass_id),
            "until": _iso(running.until, zone)},
            "periods": [_period_json(p, zone) for p in held]})
        return
    out.print(f"{openid}: " + ("no pass running" if running is None else
                               f"pass {running.pass_id} running until "
                               f"{_when(running.until, zone)}"), markup=False, soft_wrap=True)
    if not held:
        return
    table = Table("id", "pass", "source", _header("starts", zone), "ends", "first issue",
                  "refund", "reason")
    for p in held:
        ends = _local(p.ends_at, zone)
        if p.cut_at is not None:
            ends = f"{_local(p.cut_at, zone)} (cut from {ends})"
        table.add_row(str(p.id), p.pass_id, p.source, _local(p.starts_at, zone), ends,
                      "" if p.first_issue is None else f"#{p.first_issue}",
                      "" if p.refund_entry_id is None else f"entry #{p.refund_entry_id}",
                      Text(p.reason))
    out.print(table)
