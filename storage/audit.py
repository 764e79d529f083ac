"""``ledger check`` beyond the balances: every token, unlock and pass has its source.

Each selling path writes its rows together in one transaction (see storage.codes, gifts,
passes, refunds), so each row can be traced to the rows written with it:

* an entry's kind fixes its sign and the columns it must carry;
* a code credit has its code redemption, of a tokens batch, for that batch's amount; a code's
  ``used`` counts its redemptions and never passes its uses; a batch never credits more than
  count × uses × tokens;
* an unlock comes from a redeem charge of that user and issue, or a code redemption of an
  issue batch for that issue; a pass period from its purchase, a code, a gift or an operator;
* a gift batch is paid for by a "gift" entry of its giver, one single-use code;
* a refund reverses a redeem (at most once, the unlock then withdrawn) or a pass purchase (the
  period cut, never more than its price) of the same user, for no more than was charged;
* a WeChat Pay credit ("pay") is the credit of exactly one paid order, of that order's user
  and tokens, and every paid order has its credit; a WeChat Pay refund ("pay_refund") refers
  to that credit, and an order's refunds never take back more than it credited;
* the revenue report's categories add up to the sum of all entries (storage.revenue).

Problems are ``Mismatch`` rows; ``openid`` is empty for one that belongs to no single reader.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, func, or_
from sqlalchemy import select as sa_select
from sqlalchemy.orm import aliased
from sqlmodel import Session

from storage import revenue
from storage.models import (
    CodeBatch,
    CodeRedemption,
    Entitlement,
    Issue,
    LedgerEntry,
    PassPeriod,
    PayOrder,
    RedemptionCode,
    Subscriber,
)

_ENTRY: Table = LedgerEntry.__table__  # type: ignore[attr-defined]
_ENT: Table = Entitlement.__table__  # type: ignore[attr-defined]
_ISSUE: Table = Issue.__table__  # type: ignore[attr-defined]
_BATCH: Table = CodeBatch.__table__  # type: ignore[attr-defined]
_CODE: Table = RedemptionCode.__table__  # type: ignore[attr-defined]
_REDEMPTION: Table = CodeRedemption.__table__  # type: ignore[attr-defined]
_PERIOD: Table = PassPeriod.__table__  # type: ignore[attr-defined]
_SUB: Table = Subscriber.__table__  # type: ignore[attr-defined]
_ORDER: Table = PayOrder.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Mismatch:
    openid: str
    cached: int
    ledger: int
    problem: str
    about_balance: bool = True  # False: rows that disagree with each other (cached/ledger n/a)


Flag = Callable[[str, str], None]

_POSITIVE = ("topup", "code", "refund", "pay")
_NEGATIVE = ("redeem", "pass", "gift")


def problems(session: Session) -> list[Mismatch]:
    """Every check below the balances, in a fixed order."""
    found: list[Mismatch] = []

    def flag(openid: str, problem: str) -> None:
        found.append(Mismatch(openid, 0, 0, problem, about_balance=False))

    for step in (_entries, _unlocks, _code_credits, _codes, _passes, _gifts, _refunds,
                 _payments, _totals):
        step(session, flag)
    return found


def _n(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _grants(kind: str | None, tokens: int | None, issue: int | None,
            pass_id: str | None) -> str:
    if kind == "tokens":
        return f"{tokens} tokens"
    if kind == "issue":
        return f"issue {issue}"
    if kind == "pass":
        return f"pass {pass_id}"
    return f"{kind!r}"


def _entry_what(kind: str, issue: int | None, pass_id: str | None, openid: str) -> str:
    about = (f" of issue {issue}" if issue is not None
             else f" of pass {pass_id}" if pass_id is not None else "")
    return f"a {kind}{about} by {openid}"


# --- entries ---------------------------------------------------------------------------------


def _entries(session: Session, flag: Flag) -> None:
    """Kind, sign and the columns each kind must carry."""
    e = _ENTRY.c
    rows = session.execute(
        sa_select(e.id, e.openid, e.kind, e.amount, e.issue_number, e.pass_id,
                  e.code_batch_id, e.refers_to)
        .where(or_(
            e.kind.not_in(revenue.KINDS),
            (e.kind.in_(_POSITIVE) & (e.amount <= 0)),
            (e.kind.in_(_NEGATIVE) & (e.amount >= 0)),
            (e.kind == "redeem") & e.issue_number.is_(None),
            (e.kind == "pass") & e.pass_id.is_(None),
            (e.kind == "code") & e.code_batch_id.is_(None),
            (e.kind == "gift") & (e.issue_number.is_(None) == e.pass_id.is_(None)),
            (e.kind == "refund") & e.refers_to.is_(None),
            (e.kind == "pay_refund") & e.refers_to.is_(None),
        )).order_by(e.id)).all()
    for entry_id, openid, kind, amount, issue, pass_id, batch, refers_to in rows:
        where = f"ledger entry #{entry_id}"
        if kind not in revenue.KINDS:
            flag(openid, f"{where} has the unknown kind {kind!r}")
            continue
        if kind in _POSITIVE and amount <= 0:
            flag(openid, f"{where} ({kind}) takes tokens away ({amount:+d}); it can only add")
        if kind in _NEGATIVE and amount >= 0:
            flag(openid, f"{where} ({kind}) adds tokens ({amount:+d}); it can only spend")
        if kind == "redeem" and issue is None:
            flag(openid, f"{where} (redeem) names no issue")
        if kind == "pass" and pass_id is None:
            flag(openid, f"{where} (pass) names no pass")
        if kind == "code" and batch is None:
            flag(openid, f"{where} (code) names no code batch")
        if kind == "gift" and (issue is None) == (pass_id is None):
            flag(openid, f"{where} (gift) must name one issue or one pass")
        if kind in ("refund", "pay_refund") and refers_to is None:
            flag(openid, f"{where} ({kind}) refers to no entry")


# --- unlocks ---------------------------------------------------------------------------------


def _refunded_redeems(session: Session) -> dict[int, list[int]]:
    refunds: dict[int, list[int]] = defaultdict(list)
    original = aliased(_ENTRY)
    for refund_id, target in session.execute(
            sa_select(_ENTRY.c.id, _ENTRY.c.refers_to)
            .join(original, original.c.id == _ENTRY.c.refers_to)
            .where(_ENTRY.c.kind == "refund", original.c.kind == "redeem")
            .order_by(_ENTRY.c.id)).all():
        refunds[int(target)].append(int(refund_id))
    return refunds


def _unlocks(session: Session, flag: Flag) -> None:
    """An unlock points at a redeem charge of the same user and issue (not refunded), or at a
    code redemption of that user from a batch granting that issue; every redeem charge and
    every issue-code redemption has its unlock. (A free issue grants no unlock; an unlock
    without a source of an issue that is free now gives nothing away and is let be.)"""
    refunded = _refunded_redeems(session)
    e, r, b = _ENTRY.c, _REDEMPTION.c, _BATCH.c
    rows = session.execute(
        sa_select(_ENT.c.openid, _ENT.c.issue_number, _ENT.c.ledger_entry_id,
                  _ENT.c.code_redemption_id, e.id, e.openid, e.kind, e.issue_number,
                  _ISSUE.c.price, r.id, r.openid, b.id, b.kind, b.tokens, b.issue_number,
                  b.pass_id)
        .select_from(_ENT.outerjoin(_ENTRY, e.id == _ENT.c.ledger_entry_id)
                     .outerjoin(_ISSUE, _ISSUE.c.number == _ENT.c.issue_number)
                     .outerjoin(_REDEMPTION, r.id == _ENT.c.code_redemption_id)
                     .outerjoin(_BATCH, b.id == r.batch_id))
        .order_by(_ENT.c.id)).all()
    paid_for: set[int] = set()  # charges that have their own unlock
    granted: set[int] = set()  # code redemptions that have their unlock
    for (openid, number, entry_ref, redemption_ref, entry_id, entry_openid, kind, entry_issue,
         price, redemption_id, redemption_openid, batch_id, batch_kind, tokens, batch_issue,
         batch_pass) in rows:
        unlock = f"unlock of issue {number}"
        if entry_ref is not None:
            if entry_id is None:
                flag(openid, f"{unlock} points at ledger entry #{entry_ref}, which does not "
                             "exist")
            elif (entry_openid, kind, entry_issue) != (openid, "redeem", number):
                what = (f"a {kind} of issue {entry_issue}" if entry_issue is not None
                        else f"a {kind}")
                flag(openid, f"{unlock} points at ledger entry #{entry_id}, which is {what} "
                             f"by {entry_openid}")
            else:
                paid_for.add(int(entry_id))
                if int(entry_id) in refunded:
                    flag(openid, f"{unlock} stays after its redemption (ledger entry "
                                 f"#{entry_id}) was refunded (#{refunded[int(entry_id)][0]})")
        elif redemption_ref is not None:
            if redemption_id is None:
                flag(openid, f"{unlock} points at code redemption #{redemption_ref}, which "
                             "does not exist")
            elif redemption_openid != openid:
                flag(openid, f"{unlock} points at code redemption #{redemption_id}, which is "
                             f"by {redemption_openid}")
            elif batch_kind != "issue" or batch_issue != number:
                flag(openid, f"{unlock} points at code redemption #{redemption_id}, whose "
                             f"batch #{batch_id} grants "
                             f"{_grants(batch_kind, tokens, batch_issue, batch_pass)}")
            else:
                granted.add(int(redemption_id))
        elif price is None or price > 0:
            flag(openid, f"{unlock} without its charge")
    for entry_id, openid, number in session.execute(
            sa_select(e.id, e.openid, e.issue_number)
            .where(e.kind == "redeem").order_by(e.id)).all():
        if int(entry_id) not in paid_for and int(entry_id) not in refunded:
            flag(openid, f"redemption of issue {number} (ledger entry #{entry_id}) without "
                         "its unlock")
    for redemption_id, openid, batch_id, number in session.execute(
            sa_select(r.id, r.openid, b.id, b.issue_number)
            .join(_BATCH, b.id == r.batch_id).where(b.kind == "issue").order_by(r.id)).all():
        if int(redemption_id) not in granted:
            flag(openid, f"code redemption #{redemption_id} of batch #{batch_id} (issue "
                         f"{number}) without its unlock")


# --- codes -----------------------------------------------------------------------------------


def _code_credits(session: Session, flag: Flag) -> None:
    """Code credits against their redemptions and batches, both ways."""
    e, r, b = _ENTRY.c, _REDEMPTION.c, _BATCH.c
    claims: dict[int, list[Any]] = defaultdict(list)
    for row in session.execute(
            sa_select(r.id, r.openid, r.batch_id, r.ledger_entry_id, e.id.label("entry"),
                      e.kind, b.kind.label("batch_kind"))
            .select_from(_REDEMPTION.outerjoin(_ENTRY, e.id == r.ledger_entry_id)
                         .outerjoin(_BATCH, b.id == r.batch_id))
            .order_by(r.id)).all():
        where = f"code redemption #{row.id} of batch #{row.batch_id}"
        if row.ledger_entry_id is None:
            if row.batch_kind == "tokens":
                flag(row.openid, f"{where} (tokens) without its credit")
        elif row.entry is None:
            flag(row.openid, f"{where} points at ledger entry #{row.ledger_entry_id}, which "
                             "does not exist")
        elif row.kind != "code":
            flag(row.openid, f"{where} points at ledger entry #{row.entry}, which is a "
                             f"{row.kind}")
        else:
            claims[int(row.entry)].append(row)
    for entry in session.execute(
            sa_select(e.id, e.openid, e.amount, e.code_batch_id, b.id.label("batch"),
                      b.kind.label("batch_kind"), b.tokens, b.issue_number, b.pass_id)
            .select_from(_ENTRY.outerjoin(_BATCH, b.id == e.code_batch_id))
            .where(e.kind == "code").order_by(e.id)).all():
        where = f"code credit #{entry.id} ({entry.amount:+d})"
        mine = claims.get(int(entry.id), [])
        if not mine:
            flag(entry.openid, f"{where} has no code redemption")
        elif len(mine) > 1:
            flag(entry.openid, f"{where} is claimed by {len(mine)} code redemptions "
                               f"({', '.join(f'#{m.id}' for m in mine)})")
        else:
            [claim] = mine
            if claim.openid != entry.openid:
                flag(entry.openid, f"{where} is for {entry.openid} but its code redemption "
                                   f"#{claim.id} is by {claim.openid}")
            if entry.code_batch_id is not None and claim.batch_id != entry.code_batch_id:
                flag(entry.openid, f"{where} names batch #{entry.code_batch_id} but its code "
                                   f"redemption #{claim.id} is of batch #{claim.batch_id}")
        if entry.code_batch_id is None:
            continue  # _entries reports it
        if entry.batch is None:
            flag(entry.openid, f"{where} names code batch #{entry.code_batch_id}, which does "
                               "not exist")
        elif entry.batch_kind != "tokens":
            grants = _grants(entry.batch_kind, entry.tokens, entry.issue_number,
                             entry.pass_id)
            flag(entry.openid, f"{where} is from batch #{entry.batch}, which grants {grants}, "
                               "not tokens")
        elif entry.tokens != entry.amount:
            flag(entry.openid, f"{where} is from batch #{entry.batch}, whose codes grant "
                               f"{entry.tokens}")


def _codes(session: Session, flag: Flag) -> None:
    """Each code's use count against its redemptions; each batch's credits against its size."""
    r, c, b, e = _REDEMPTION.c, _CODE.c, _BATCH.c, _ENTRY.c
    for row in session.execute(
            sa_select(r.id, r.openid, r.code_id, r.batch_id, c.id.label("code"),
                      c.batch_id.label("code_batch"))
            .select_from(_REDEMPTION.outerjoin(_CODE, c.id == r.code_id))
            .where(or_(c.id.is_(None), c.batch_id != r.batch_id)).order_by(r.id)).all():
        if row.code is None:
            flag(row.openid, f"code redemption #{row.id} names code #{row.code_id}, which does "
                             "not exist")
        else:
            flag(row.openid, f"code redemption #{row.id} says batch #{row.batch_id} but its "
                             f"code #{row.code} is of batch #{row.code_batch}")
    redemptions = func.count(r.id)
    for code_id, batch_id, used, uses, n in session.execute(
            sa_select(c.id, c.batch_id, c.used, c.uses, redemptions)
            .select_from(_CODE.outerjoin(_REDEMPTION, r.code_id == c.id))
            .group_by(c.id, c.batch_id, c.used, c.uses)
            .having(or_(redemptions != c.used, redemptions > c.uses))
            .order_by(c.id)).all():
        where = f"code #{code_id} of batch #{batch_id}"
        if n != used:
            flag("", f"{where} counts {_n(used, 'use')} but has {_n(n, 'code redemption')}")
        if n > uses:
            flag("", f"{where} has {_n(n, 'code redemption')}, more than its {_n(uses, 'use')}")
    credited = func.coalesce(func.sum(e.amount), 0)
    for batch_id, count, uses, tokens, total in session.execute(
            sa_select(b.id, b.count, b.uses, b.tokens, credited)
            .select_from(_BATCH.join(_ENTRY, (e.code_batch_id == b.id) & (e.kind == "code")))
            .where(b.kind == "tokens")
            .group_by(b.id, b.count, b.uses, b.tokens)
            .having(credited > b.count * b.uses * b.tokens)
            .order_by(b.id)).all():
        flag("", f"code batch #{batch_id} credited {total} tokens, more than its "
                 f"{_n(count, 'code')} × {_n(uses, 'use')} × {tokens} tokens = "
                 f"{count * uses * tokens}")


# --- passes ----------------------------------------------------------------------------------


def _passes(session: Session, flag: Flag) -> None:
    """Each period against its source; each purchase and pass-code redemption has one period;
    each refunded purchase is cut."""
    p, e, r, b = _PERIOD.c, _ENTRY.c, _REDEMPTION.c, _BATCH.c
    refund = aliased(_ENTRY)
    bought: dict[int, list[int]] = defaultdict(list)  # purchase entry -> periods
    from_codes: dict[int, list[int]] = defaultdict(list)  # code redemption -> periods
    cut: set[int] = set()  # purchase entries whose period was cut
    for row in session.execute(
            sa_select(p.id, p.openid, p.pass_id, p.days, p.source, p.ledger_entry_id,
                      p.code_redemption_id, p.operator, p.reason, p.cut_at, p.refund_entry_id,
                      e.id.label("entry"), e.openid.label("entry_openid"),
                      e.kind.label("entry_kind"), e.issue_number.label("entry_issue"),
                      e.pass_id.label("entry_pass"), r.id.label("redemption"),
                      r.openid.label("redemption_openid"), b.id.label("batch"),
                      b.kind.label("batch_kind"), b.tokens, b.issue_number.label("batch_issue"),
                      b.pass_id.label("batch_pass"), b.pass_days, b.giver,
                      refund.c.id.label("refund"), refund.c.kind.label("refund_kind"),
                      refund.c.refers_to)
            .select_from(_PERIOD.outerjoin(_ENTRY, e.id == p.ledger_entry_id)
                         .outerjoin(_REDEMPTION, r.id == p.code_redemption_id)
                         .outerjoin(_BATCH, b.id == r.batch_id)
                         .outerjoin(refund, refund.c.id == p.refund_entry_id))
            .order_by(p.id)).all():
        where = f"pass period #{row.id} ({row.pass_id})"
        if row.source == "purchase":
            if row.ledger_entry_id is None:
                flag(row.openid, f"{where} bought without its charge")
            elif row.entry is None:
                flag(row.openid, f"{where} points at ledger entry #{row.ledger_entry_id}, "
                                 "which does not exist")
            elif (row.entry_openid, row.entry_kind, row.entry_pass) != (
                    row.openid, "pass", row.pass_id):
                flag(row.openid, f"{where} points at ledger entry #{row.entry}, which is "
                                 + _entry_what(row.entry_kind, row.entry_issue, row.entry_pass,
                                               row.entry_openid))
            else:
                bought[int(row.entry)].append(int(row.id))
                if row.cut_at is not None:
                    cut.add(int(row.entry))
        elif row.source in ("code", "gift"):
            if row.code_redemption_id is None:
                flag(row.openid, f"{where} from a {row.source} without its code redemption")
            elif row.redemption is None:
                flag(row.openid, f"{where} points at code redemption "
                                 f"#{row.code_redemption_id}, which does not exist")
            elif row.redemption_openid != row.openid:
                flag(row.openid, f"{where} points at code redemption #{row.redemption}, which "
                                 f"is by {row.redemption_openid}")
            elif row.batch_kind != "pass" or row.batch_pass != row.pass_id:
                grants = _grants(row.batch_kind, row.tokens, row.batch_issue, row.batch_pass)
                flag(row.openid, f"{where} points at code redemption #{row.redemption}, whose "
                                 f"batch #{row.batch} grants {grants}")
            else:
                from_codes[int(row.redemption)].append(int(row.id))
                if (row.giver is not None) != (row.source == "gift"):
                    flag(row.openid, f"{where} says {row.source!r} but batch #{row.batch} is "
                                     f"{'a gift' if row.giver is not None else 'not a gift'}")
                if row.pass_days is not None and row.pass_days != row.days:
                    flag(row.openid, f"{where} lasts {row.days} days but batch #{row.batch} "
                                     f"grants {row.pass_days}")
        elif row.source == "grant":
            if not (row.operator or "").strip() or not row.reason.strip():
                flag(row.openid, f"{where} granted without an operator and a reason")
        else:
            flag(row.openid, f"{where} has the unknown source {row.source!r}")
        if row.refund_entry_id is not None and (
                row.refund is None or row.refund_kind != "refund"
                or row.refers_to is None or row.refers_to != row.ledger_entry_id):
            flag(row.openid, f"{where} names refund #{row.refund_entry_id}, which does not "
                             "refund its purchase")
        elif row.cut_at is not None and row.refund_entry_id is None:
            flag(row.openid, f"{where} is cut short without a refund")
    for entry_id, openid, pass_id in session.execute(
            sa_select(e.id, e.openid, e.pass_id).where(e.kind == "pass").order_by(e.id)).all():
        periods = bought.get(int(entry_id), [])
        if not periods:
            flag(openid, f"pass purchase #{entry_id} ({pass_id}) without its pass period")
        elif len(periods) > 1:
            flag(openid, f"pass purchase #{entry_id} ({pass_id}) is claimed by "
                         f"{len(periods)} pass periods")
    for redemption_id, openid, batch_id, pass_id in session.execute(
            sa_select(r.id, r.openid, b.id, b.pass_id)
            .join(_BATCH, b.id == r.batch_id).where(b.kind == "pass").order_by(r.id)).all():
        periods = from_codes.get(int(redemption_id), [])
        if len(periods) != 1:
            flag(openid, f"code redemption #{redemption_id} of batch #{batch_id} (pass "
                         f"{pass_id}) has {_n(len(periods), 'pass period')}, not one")
    target = aliased(_ENTRY)
    for refund_id, openid, purchase in session.execute(
            sa_select(e.id, e.openid, target.c.id)
            .join(target, target.c.id == e.refers_to)
            .where(e.kind == "refund", target.c.kind == "pass").order_by(e.id)).all():
        if int(purchase) in bought and int(purchase) not in cut:
            flag(openid, f"refund #{refund_id} of pass purchase #{purchase}, whose period was "
                         "never cut short")


# --- gifts -----------------------------------------------------------------------------------


def _gifts(session: Session, flag: Flag) -> None:
    """A gift batch is one single-use code paid for by a gift entry of its giver, granting
    what was paid for; every gift entry has exactly one batch."""
    b, e = _BATCH.c, _ENTRY.c
    paid: dict[int, list[int]] = defaultdict(list)
    for row in session.execute(
            sa_select(b.id, b.giver, b.gift_entry_id, b.kind, b.tokens, b.issue_number,
                      b.pass_id, b.count.label("codes"), b.uses, e.id.label("entry"),
                      e.openid.label("entry_openid"), e.kind.label("entry_kind"),
                      e.issue_number.label("entry_issue"), e.pass_id.label("entry_pass"))
            .select_from(_BATCH.outerjoin(_ENTRY, e.id == b.gift_entry_id))
            .where(or_(b.giver.is_not(None), b.gift_entry_id.is_not(None)))
            .order_by(b.id)).all():
        giver = row.giver or ""
        where = f"gift batch #{row.id}"
        if row.giver is None:
            flag("", f"{where} names its payment #{row.gift_entry_id} but no giver")
        if row.gift_entry_id is None:
            flag(giver, f"{where} of {giver} without its payment")
            continue
        if row.entry is None:
            flag(giver, f"{where} points at ledger entry #{row.gift_entry_id}, which does not "
                        "exist")
            continue
        paid[int(row.entry)].append(int(row.id))
        if row.entry_kind != "gift" or row.entry_openid != row.giver:
            flag(giver, f"{where} points at ledger entry #{row.entry}, which is "
                        + _entry_what(row.entry_kind, row.entry_issue, row.entry_pass,
                                      row.entry_openid))
        elif (row.issue_number, row.pass_id) != (row.entry_issue, row.entry_pass):
            grants = _grants(row.kind, row.tokens, row.issue_number, row.pass_id)
            paid_for = _grants("issue" if row.entry_issue is not None else "pass", None,
                               row.entry_issue, row.entry_pass)
            flag(giver, f"{where} grants {grants} but its payment #{row.entry} was for "
                        f"{paid_for}")
        if (row.codes, row.uses) != (1, 1):
            flag(giver, f"{where} has {_n(row.codes, 'code')} × {_n(row.uses, 'use')}; a gift "
                        "is one single-use code")
    for entry_id, openid in session.execute(
            sa_select(e.id, e.openid).where(e.kind == "gift").order_by(e.id)).all():
        batches = paid.get(int(entry_id), [])
        if len(batches) != 1:
            codes = _n(len(batches), "gift batch", "gift batches")
            flag(openid, f"gift payment #{entry_id} has {codes}, not one")


# --- refunds ---------------------------------------------------------------------------------


def _refunds(session: Session, flag: Flag) -> None:
    """A refund reverses a redeem or a pass purchase of the same user, for no more than was
    charged; a redeem at most once, a purchase never past its price."""
    e = _ENTRY.c
    target = aliased(_ENTRY)
    of_redeem: dict[int, list[int]] = defaultdict(list)
    of_pass: dict[int, int] = defaultdict(int)
    prices: dict[int, tuple[str, int]] = {}
    for row in session.execute(
            sa_select(e.id, e.openid, e.amount, e.refers_to, target.c.id.label("target"),
                      target.c.openid.label("target_openid"), target.c.kind.label("kind"),
                      target.c.amount.label("charged"))
            .select_from(_ENTRY.outerjoin(target, target.c.id == e.refers_to))
            .where(e.kind == "refund", e.refers_to.is_not(None)).order_by(e.id)).all():
        where = f"refund #{row.id} ({row.amount:+d})"
        if row.target is None:
            flag(row.openid, f"{where} refers to ledger entry #{row.refers_to}, which does not "
                             "exist")
            continue
        if row.target_openid != row.openid:
            flag(row.openid, f"{where} refers to ledger entry #{row.target} of "
                             f"{row.target_openid}")
        if row.kind not in ("redeem", "pass"):
            flag(row.openid, f"{where} refers to ledger entry #{row.target}, a {row.kind}: "
                             "only a redeem or a pass purchase is refunded")
            continue
        if row.amount > -row.charged:
            flag(row.openid, f"{where} is more than the {-row.charged} charged by ledger entry "
                             f"#{row.target}")
        if row.kind == "redeem":
            of_redeem[int(row.target)].append(int(row.id))
        else:
            of_pass[int(row.target)] += int(row.amount)
            prices[int(row.target)] = (row.target_openid, -int(row.charged))
    for redeem_id, refunds in of_redeem.items():
        if len(refunds) > 1:
            flag("", f"redemption #{redeem_id} refunded {len(refunds)} times "
                     f"({', '.join(f'#{i}' for i in refunds)})")
    for purchase, total in of_pass.items():
        openid, price = prices[purchase]
        if total > price:
            flag(openid, f"pass purchase #{purchase} refunded {total} in all, more than its "
                         f"price {price}")


# --- WeChat Pay ------------------------------------------------------------------------------


def _payments(session: Session, flag: Flag) -> None:
    """A "pay" entry is the credit of one paid order (its user, its tokens), every paid order
    has one, and an order's "pay_refund" entries refer to that credit and never take back more
    than it gave (an undone refund adds back what its debit took)."""
    e, o = _ENTRY.c, _ORDER.c
    orders_of: dict[int, list[str]] = defaultdict(list)
    for row in session.execute(
            sa_select(o.out_trade_no, o.openid, o.tokens, o.status, o.credit_entry_id,
                      e.id.label("entry"), e.openid.label("entry_openid"), e.kind,
                      e.amount)
            .select_from(_ORDER.outerjoin(_ENTRY, e.id == o.credit_entry_id))
            .where(o.status.in_(["paid", "refunded"]) | o.credit_entry_id.is_not(None))
            .order_by(o.out_trade_no)).all():
        where = f"WeChat Pay order {row.out_trade_no}"
        if row.entry is None:
            flag(row.openid, f"{where} is {row.status} without its credit"
                 + (f" (ledger entry #{row.credit_entry_id} does not exist)"
                    if row.credit_entry_id is not None else ""))
            continue
        orders_of[int(row.entry)].append(row.out_trade_no)
        if row.status not in ("paid", "refunded"):
            flag(row.openid, f"{where} is {row.status} but was credited (entry #{row.entry})")
        if (row.kind, row.entry_openid, row.amount) != ("pay", row.openid, row.tokens):
            flag(row.openid, f"{where} points at ledger entry #{row.entry}, a {row.kind} of "
                             f"{row.amount:+d} for {row.entry_openid}, not its credit of "
                             f"+{row.tokens}")
    for entry_id, openid in session.execute(
            sa_select(e.id, e.openid).where(e.kind == "pay").order_by(e.id)).all():
        found = orders_of.get(int(entry_id), [])
        if len(found) != 1:
            flag(openid, f"WeChat Pay credit #{entry_id} belongs to "
                         f"{_n(len(found), 'order')}" + (f" ({', '.join(found)})" if found
                                                          else "") + ", not exactly one")
    credit = aliased(_ENTRY)
    taken: dict[int, tuple[str, int, int]] = {}
    for row in session.execute(
            sa_select(e.id, e.openid, e.amount, e.refers_to, credit.c.id.label("target"),
                      credit.c.kind.label("target_kind"), credit.c.openid.label("owner"),
                      credit.c.amount.label("credited"))
            .select_from(_ENTRY.outerjoin(credit, credit.c.id == e.refers_to))
            .where(e.kind == "pay_refund").order_by(e.id)).all():
        where = f"WeChat Pay refund #{row.id} ({row.amount:+d})"
        if row.target is None:
            flag(row.openid, f"{where} refers to ledger entry #{row.refers_to}, which does "
                             "not exist")
            continue
        if row.target_kind == "pay_refund" and row.amount > 0:  # an undone refund
            origin = session.execute(sa_select(e.refers_to).where(e.id == row.target)).scalar()
            if origin is None or int(origin) not in taken:
                flag(row.openid, f"{where} undoes #{row.target}, which took nothing back")
                continue
            owner, credited, sum_back = taken[int(origin)]
            taken[int(origin)] = (owner, credited, sum_back + int(row.amount))
            continue
        if row.target_kind != "pay" or row.owner != row.openid or row.amount >= 0:
            flag(row.openid, f"{where} refers to ledger entry #{row.target}, a "
                             f"{row.target_kind} of {row.owner}: only a WeChat Pay credit of "
                             "the same reader is refunded, by a debit")
            continue
        owner, credited, sum_back = taken.get(int(row.target), (row.owner, row.credited, 0))
        taken[int(row.target)] = (owner, credited, sum_back + int(row.amount))
    for target, (owner, credited, net) in taken.items():
        if -net > credited:
            flag(owner, f"WeChat Pay credit #{target} of +{credited} had {-net} taken back by "
                        "refunds, more than it gave")


# --- totals ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    tokens_in: int
    tokens_spent: int
    entries: int  # Σ amount of every entry
    balances: int  # Σ cached balances

    @property
    def by_category(self) -> int:
        return self.tokens_in - self.tokens_spent


def totals(session: Session) -> Totals:
    """The revenue report's all-time categories, the ledger's sum and the balances' sum."""
    rev = revenue.report(session)
    conn = session.connection()
    entries = conn.execute(sa_select(func.coalesce(func.sum(_ENTRY.c.amount), 0))).scalar()
    return Totals(tokens_in=rev.tokens_in, tokens_spent=rev.tokens_spent,
                  entries=int(entries or 0), balances=rev.outstanding)


def _totals(session: Session, flag: Flag) -> None:
    """The report accounts for every token: in − spent is the sum of all entries. (That sum
    equals the balances' whenever each balance equals its own entries, checked first.)"""
    t = totals(session)
    if t.by_category != t.entries:
        flag("", f"the revenue categories add up to {t.by_category} (in {t.tokens_in} − spent "
                 f"{t.tokens_spent}) but the ledger entries to {t.entries}")
