"""WeChat Pay orders and refunds: `pay orders`, `pay show`, `pay sync`, `pay refund`, and
`pay certificates` (downloads platform certificates).

Every command needs a [pay] section (exit 2 without one). A refund debits the order's tokens
and records the refund in one transaction before WeChat Pay is asked; if WeChat cannot be
reached the refund stays recorded (exit 1) and `pay sync` resends it with the same
out_refund_no, so asking twice never returns the money twice."""

from __future__ import annotations

import getpass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer
from rich.table import Column, Table
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
    _plural,
    _settings,
    _zone,
    app,
    out,
    whole_number,
)
from bot.jobs.pay_sync import SyncReport, notify_url, send_refund, sync_orders
from bot.pay import certificates
from bot.pay.client import PayClient, PayError
from bot.pay.keys import KeyFileError, VerifyKeys, load_certificates
from bot.settings import EMPTY_CERTIFICATES_DIR_OK, PaySettings, Settings
from storage import payments
from storage.db import transaction
from storage.models import LedgerEntry, PayOrder, PayRefund
from storage.payments import RefundRefused, UnknownOrder, yuan

pay_app = typer.Typer(help="WeChat Pay orders and refunds (needs [pay]).", no_args_is_help=True)
app.add_typer(pay_app, name="pay")


def _pay(settings: Settings) -> PaySettings:
    if settings.pay is None:
        _fail("payments are off: configure [pay] in the config to use `newsbot pay` "
              "(see docs/pay.md)", 2)
    return settings.pay


def _client(pay: PaySettings) -> PayClient:
    try:
        return PayClient.from_settings(pay)
    except KeyFileError as exc:
        _fail(f"[pay]: {exc}", 2)


def _order_json(o: PayOrder, zone: ZoneInfo) -> dict[str, Any]:
    return {
        "out_trade_no": o.out_trade_no, "openid": o.openid, "status": o.status,
        "kind": o.kind, "package": o.package_id, "tokens": o.tokens,
        "amount_fen": o.amount_fen, "amount_yuan": yuan(o.amount_fen),
        "issue_number": o.issue_number, "unlock": o.unlock_note,
        "transaction_id": o.transaction_id, "payer_openid": o.payer_openid,
        "refunded_fen": o.refunded_fen, "credit_entry_id": o.credit_entry_id,
        "unlock_entry_id": o.unlock_entry_id, "error": o.error,
        "created_at": _iso(o.created_at, zone), "expires_at": _iso(o.expires_at, zone),
        "paid_at": _iso(o.paid_at, zone), "closed_at": _iso(o.closed_at, zone),
        "last_query_at": _iso(o.last_query_at, zone),
    }


def _refund_json(r: PayRefund, zone: ZoneInfo) -> dict[str, Any]:
    return {
        "out_refund_no": r.out_refund_no, "out_trade_no": r.out_trade_no, "status": r.status,
        "amount_fen": r.amount_fen, "amount_yuan": yuan(r.amount_fen), "tokens": r.tokens,
        "forced": r.forced, "reason": r.reason, "operator": r.operator,
        "refund_id": r.refund_id, "debit_entry_id": r.debit_entry_id, "error": r.error,
        "created_at": _iso(r.created_at, zone), "finished_at": _iso(r.finished_at, zone),
    }


def _status_option(value: str | None) -> str | None:
    if value is not None and value not in payments.ORDER_STATUSES:
        raise typer.BadParameter(f"{value!r} is not one of "
                                 f"{', '.join(payments.ORDER_STATUSES)}")
    return value


@pay_app.command("orders")
def pay_orders(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(
        "--status", help="Only orders in this state: "
        f"{', '.join(payments.ORDER_STATUSES)}.", callback=_status_option)] = None,
    limit: Annotated[int, typer.Option(parser=whole_number(1), help="At most this many.")]
    = 100,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Orders, newest first."""
    settings = _settings(ctx, config)
    _pay(settings)
    with _database(settings) as engine, transaction(engine) as s:
        orders = payments.list_orders(s, status=status, limit=limit)
    zone = _zone(settings)
    if as_json:
        _dump([_order_json(o, zone) for o in orders])
        return
    unit = settings.tokens.name
    table = Table(Column("out_trade_no", no_wrap=True), _header("created", zone), "openid",
                  "tokens", "¥", "kind", "status", "issue")
    for o in orders:
        table.add_row(o.out_trade_no, _local(o.created_at, zone), Text(o.openid),
                      f"{o.tokens} {unit}", yuan(o.amount_fen), o.kind, o.status,
                      "" if o.issue_number is None else f"#{o.issue_number}")
    out.print(table)
    out.print(_plural(len(orders), "order") + (f" {status}" if status else ""), markup=False)


@pay_app.command("show")
def pay_show(
    ctx: typer.Context,
    out_trade_no: Annotated[str, typer.Argument(metavar="OUT_TRADE_NO")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One order: its state, the ledger entries it wrote and its refunds."""
    settings = _settings(ctx, config)
    _pay(settings)
    with _database(settings) as engine, transaction(engine) as s:
        order = payments.get_order(s, out_trade_no=out_trade_no)
        if order is None:
            _fail(f"no order {out_trade_no!r}", 1)
        refunds = payments.list_refunds(s, out_trade_no=out_trade_no)
        ids = [i for i in (order.credit_entry_id, order.unlock_entry_id,
                           *(r.debit_entry_id for r in refunds)) if i is not None]
        entries = [e for i in ids if (e := s.get(LedgerEntry, i)) is not None]
    zone = _zone(settings)
    if as_json:
        _dump({**_order_json(order, zone), "refunds": [_refund_json(r, zone) for r in refunds],
               "entries": [{"id": e.id, "kind": e.kind, "amount": e.amount,
                            "balance_after": e.balance_after, "reason": e.reason}
                           for e in entries]})
        return
    unit = settings.tokens.name
    o = order
    lines = [
        f"{o.out_trade_no}: {o.status}, {o.kind}, {o.tokens} {unit} for ¥{yuan(o.amount_fen)}"
        f" ({o.package_id}) to {o.openid}",
        f"created {_local(o.created_at, zone)}, expires {_local(o.expires_at, zone)}"
        + (f", paid {_local(o.paid_at, zone)}" if o.paid_at else "")
        + (f", closed {_local(o.closed_at, zone)}" if o.closed_at else "") + f" ({zone.key})",
    ]
    if o.issue_number is not None:
        lines.append(f"buy-and-unlock issue #{o.issue_number}: {o.unlock_note or 'not yet'}")
    if o.transaction_id:
        lines.append(f"WeChat transaction {o.transaction_id}, payer {o.payer_openid}")
    if o.refunded_fen:
        lines.append(f"refunded ¥{yuan(o.refunded_fen)} of ¥{yuan(o.amount_fen)}")
    if o.error:
        lines.append(f"error: {o.error}")
    for line in lines:
        out.print(line, markup=False, soft_wrap=True)
    for e in entries:
        out.print(f"  entry #{e.id}: {e.kind} {e.amount:+d} {unit}, balance after "
                  f"{e.balance_after}", markup=False)
    for r in refunds:
        out.print(f"  refund {r.out_refund_no}: {r.status}, ¥{yuan(r.amount_fen)}, "
                  f"-{r.tokens} {unit}{' (forced)' if r.forced else ''}, {r.reason!r}",
                  markup=False, soft_wrap=True)


def _print_sync(report: SyncReport, unit: str) -> None:
    for item in report.orders:
        extra = f" +{item.tokens} {unit}" if item.tokens else ""
        out.print(f"{item.out_trade_no}: {item.outcome}{extra}"
                  + (f" ({item.detail})" if item.detail else ""), markup=False)
    for no, state in report.refunds.items():
        out.print(f"refund {no}: {state}", markup=False)
    out.print(f"{_plural(len(report.orders), 'order')} asked: "
              f"{report.count('credited')} credited, {report.count('closed')} closed, "
              f"{report.count('pending')} still pending, {_plural(report.errors, 'error')}",
              markup=False)


@pay_app.command("sync")
def pay_sync(
    ctx: typer.Context,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask WeChat Pay about every order still creating or pending, whatever its age, and
    settle or close it; resend or follow open refunds. Exit 1 if any could not be asked."""
    settings = _settings(ctx, config)
    pay = _pay(settings)
    with _database(settings) as engine, _client(pay) as client:
        report = sync_orders(engine, client, min_age=timedelta(0),
                             min_interval=timedelta(0),
                             notify_url=notify_url(settings))
    if as_json:
        _dump({"orders": [{"out_trade_no": i.out_trade_no, "outcome": i.outcome,
                           "detail": i.detail, "tokens": i.tokens} for i in report.orders],
               "refunds": report.refunds, "errors": report.errors})
    else:
        _print_sync(report, settings.tokens.name)
    if report.errors:
        raise typer.Exit(1)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


@pay_app.command("refund")
def pay_refund(
    ctx: typer.Context,
    out_trade_no: Annotated[str, typer.Argument(metavar="OUT_TRADE_NO")],
    reason: Annotated[str, typer.Option("--reason", help="Why (sent to WeChat, shown to the "
                                        "payer; kept in the ledger).", show_default=False)],
    amount: Annotated[int | None, typer.Option(
        "--amount", parser=whole_number(1), metavar="FEN",
        help="Refund this many fen (default: all that is left). The tokens taken back are in "
        "proportion.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Refund even if the subscriber has spent the tokens; debits what is "
        "left.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Refund an order (all or part): debit its tokens and record the refund, then ask WeChat
    Pay. Refused (exit 2, nothing written) when the tokens were spent, unless --force."""
    settings = _settings(ctx, config)
    pay = _pay(settings)
    unit = settings.tokens.name
    if not reason.strip():
        _fail("--reason must say why; nothing written", 2)
    if len(reason.strip()) > 80:
        _fail("--reason is at most 80 characters (WeChat's limit); nothing written", 2)
    with _database(settings) as engine:
        client = _client(pay)
        try:
            with transaction(engine) as s:
                refund = payments.request_refund(
                    s, out_trade_no=out_trade_no, amount_fen=amount, reason=reason,
                    force=force, operator=f"cli:{_os_user()}")
                total = payments.require_order(s, out_trade_no=out_trade_no).amount_fen
        except UnknownOrder:
            client.close()
            _fail(f"no order {out_trade_no!r}; nothing written", 2)
        except RefundRefused as exc:
            client.close()
            _fail(f"{exc}; nothing written", 2)
        with client:
            state = send_refund(engine, client, out_refund_no=refund.out_refund_no,
                                total_fen=total, notify_url=notify_url(settings))
        with transaction(engine) as s:
            final = payments.get_refund(s, out_refund_no=refund.out_refund_no)
            assert final is not None
    if as_json:
        _dump({**_refund_json(final, _zone(settings)), "sent": not state.startswith("error")})
    what = (f"refund {final.out_refund_no} of ¥{yuan(final.amount_fen)} "
            f"(-{final.tokens} {unit}{', forced' if final.forced else ''})")
    if state == "refused":
        _fail(f"WeChat Pay refused {what}: {final.error}; the {unit} were given back", 1)
    if state.startswith("error"):
        _fail(f"{what} is recorded and its {unit} debited, but WeChat Pay could not be asked "
              f"({state.removeprefix('error: ')}): `newsbot pay sync` resends it with the same "
              "out_refund_no", 1)
    if not as_json:
        out.print(f"{what}: {state} (WeChat Pay says the money goes back to the payer; "
                  "`newsbot pay show` follows it)", markup=False, soft_wrap=True)


@pay_app.command("certificates")
def pay_certificates(
    ctx: typer.Context,
    directory: Annotated[Path | None, typer.Option(
        "--dir", metavar="DIR", help="Save into this directory (default: [pay] "
        "platform_certificates_dir).")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download WeChat Pay's platform certificates and save each new one as <serial>.pem.
    The answer must verify with a key already held (public key or a saved certificate); the
    first download with neither trusts the certificate it names (trust on first use). Exit 1,
    nothing written, when WeChat cannot be asked, refuses, or the answer does not verify."""
    token = EMPTY_CERTIFICATES_DIR_OK.set(True)  # this command is what fills the directory
    try:
        settings = _settings(ctx, config)
    finally:
        EMPTY_CERTIFICATES_DIR_OK.reset(token)
    pay = _pay(settings)
    target = directory or pay.platform_certificates_dir
    if target is None:
        _fail("[pay] platform_certificates_dir is not set: set it, or pass --dir DIR; "
              "nothing written", 2)
    if not target.is_dir():
        _fail(f"{target} is not a directory: create it first; nothing written", 2)
    client = _client(pay)
    try:
        saved = load_certificates(target)
    except KeyFileError as exc:
        client.close()
        _fail(f"{exc}; nothing written", 2)
    # Certificates already saved in --dir are trusted too, like the configured ones.
    client.keys = VerifyKeys.of(client.keys.apiv3_key, client.keys.public_keys, saved)
    trusted = sorted(client.keys.serials())
    now = datetime.now(UTC)
    with client:
        try:
            got = certificates.download(client, now=now)
        except PayError as exc:
            _fail(f"{exc}; nothing written", 1)
    outcomes = certificates.save(target, got.certificates, now=now)
    if as_json:
        _dump({"directory": str(target), "first_use": got.first_use, "trusted": trusted,
               "certificates": [{"serial": c.serial, "outcome": outcome,
                                 "not_before": c.not_before.isoformat(),
                                 "not_after": c.not_after.isoformat(),
                                 "path": str(target / f"{c.serial}.pem")}
                                for c, outcome in outcomes]})
        return
    if got.first_use:
        out.print("FIRST USE: no WeChat Pay public key is configured and no certificate was "
                  "saved yet, so the answer was verified with the certificate it carries "
                  "(trust on first use). Check that the serial below is the one the merchant "
                  "platform shows (账户中心 → API安全).", markup=False, soft_wrap=True)
    else:
        out.print(f"answer verified with a key already held ({', '.join(trusted)})",
                  markup=False, soft_wrap=True)
    for c, outcome in outcomes:
        note = {"added": f"saved as {target / f'{c.serial}.pem'}",
                "kept": "already saved, left alone",
                "expired": "not saved"}[outcome]
        out.print(f"{outcome} {c.serial}: valid {c.not_before:%Y-%m-%d} to "
                  f"{c.not_after:%Y-%m-%d} ({note})", markup=False, soft_wrap=True)
    count = {o: sum(1 for _, x in outcomes if x == o) for o in ("added", "kept", "expired")}
    out.print(f"{count['added']} added, {count['kept']} kept, {count['expired']} expired "
              f"in {target}", markup=False, soft_wrap=True)
