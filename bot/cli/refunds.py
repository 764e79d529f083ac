"""`refund`: give back what an unlock or a pass cost, as correcting ledger entries."""

from __future__ import annotations

from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer

from bot.cli.base import (
    ConfigOpt,
    JsonOpt,
    _database,
    _dump,
    _fail,
    _iso,
    _plural,
    _settings,
    _when,
    _zone,
    app,
    cli_key,
    out,
    whole_number,
)
from storage import passes, refunds
from storage.db import transaction
from storage.errors import IdempotencyConflict, InvalidAmount, UnknownSubscriber
from storage.refunds import NothingToRefund, Refund

# A pass refund writes one entry per period, keyed KEY/<period id>.
_PERIOD_SUFFIX = 12


@app.command()
def refund(
    ctx: typer.Context,
    openid: Annotated[str, typer.Argument(metavar="OPENID")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the ledger).",
                                        show_default=False)],
    issue: Annotated[int | None, typer.Argument(
        metavar="[ISSUE]", parser=whole_number(1),
        help="The issue whose unlock to reverse (or give --pass).")] = None,
    pass_id: Annotated[str | None, typer.Option(
        "--pass", metavar="ID", help="Refund the unused whole days of this pass instead.",
        show_default=False)] = None,
    key: Annotated[str | None, typer.Option(
        "--key", help="Idempotency key, stored as cli:KEY (default: one derived from what is "
        "refunded, so the same refund run twice refunds once).")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Reverse an issue unlock (tokens back, unlock withdrawn) or refund a pass's unused whole
    days, in one transaction; refused, with the reason, when nothing paid is left."""
    if (issue is None) == (pass_id is None):
        _fail("give either ISSUE or --pass ID; nothing written", 2)
    if not reason.strip():
        _fail("--reason is required: say why (it is kept in the ledger); nothing written", 2)
    settings = _settings(ctx, config)
    unit = settings.tokens.name
    given = key or None
    reserve = _PERIOD_SUFFIX if pass_id is not None else 0
    stored = cli_key(given, reserve=reserve) if given is not None else None
    try:
        with _database(settings) as engine, transaction(engine) as session:
            if pass_id is not None:
                pass_id = pass_id.strip().lower()
                stored = stored or cli_key("refund:" + refunds.pass_refund_target(
                    session, openid=openid, pass_id=pass_id), reserve=reserve)
                result = refunds.refund_pass(session, openid=openid, pass_id=pass_id,
                                             reason=reason, key=stored, operator="cli")
                refunded = {e.id for e in result.entries}
                cut = [p for p in passes.periods(session, openid=openid)
                       if p.refund_entry_id in refunded]
            else:
                assert issue is not None
                stored = stored or cli_key("refund:" + refunds.issue_refund_target(
                    session, openid=openid, issue_number=issue))
                result = refunds.refund_issue(session, openid=openid, issue_number=issue,
                                              reason=reason, key=stored, operator="cli")
                cut = []
    except NothingToRefund as exc:
        _fail(f"nothing to refund ({exc.reason}): {exc}; nothing written", 2)
    except UnknownSubscriber:
        _fail(f"no subscriber {openid!r}; nothing written", 2)
    except (IdempotencyConflict, InvalidAmount) as exc:
        _fail(f"{exc}; nothing written", 2)
    zone = _zone(settings)
    what = f"issue {issue}" if pass_id is None else f"pass {pass_id}"
    if as_json:
        _dump(_refund_json(result, key=stored, what=what, zone=zone))
        return
    ids = ", ".join(f"#{e.id}" for e in result.entries)
    if result.replayed:
        out.print(f"already refunded: key {stored} was used at "
                  f"{_when(result.entries[0].created_at, zone)} to refund {what} to {openid} "
                  f"(+{result.tokens} {unit}, {_plural(len(result.entries), 'entry', 'entries')}"
                  f" {ids}); nothing new written", markup=False, soft_wrap=True)
        return
    withdrawn = "; the unlock is withdrawn" if pass_id is None else ""
    out.print(f"refunded {what} to {openid}: +{result.tokens} {unit}, balance now "
              f"{result.balance} {unit} ({_plural(len(result.entries), 'entry', 'entries')} "
              f"{ids}){withdrawn}", markup=False, soft_wrap=True)
    for p in cut:
        assert p.cut_at is not None
        out.print(f"  period #{p.id} ({p.days} days from {_when(p.starts_at, zone)}): now ends "
                  f"{_when(p.cut_at, zone)}", markup=False, soft_wrap=True)
    out.print(f"key: {stored}  (re-run with this --key to retry without refunding twice)",
              markup=False, soft_wrap=True)


def _refund_json(result: Refund, *, key: str | None, what: str, zone: ZoneInfo) -> dict[str, Any]:
    return {
        "refunded": what, "replayed": result.replayed, "tokens": result.tokens,
        "balance": result.balance, "key": key,
        "entries": [{"id": e.id, "amount": e.amount, "refers_to": e.refers_to,
                     "issue_number": e.issue_number, "pass_id": e.pass_id,
                     "reason": e.reason, "created_at": _iso(e.created_at, zone)}
                    for e in result.entries],
    }
