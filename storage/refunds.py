"""Refunds: correcting entries that give back what an unlock or a pass cost.

Nothing old is updated or deleted in the ledger: a refund is a new ``refund`` entry (amount
> 0, ``refers_to`` the entry it reverses). An issue refund also deletes the entitlement (the
ledger keeps its history), so the reader can unlock it again; a pass refund cuts each bought
period at its last used day (``cut_at``), which takes away exactly the issues of the days
given back. Each refund runs under the subscriber's row lock, in one savepoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlmodel import Session, col, func, select

from storage import ledger, passes
from storage.errors import DomainError, IdempotencyConflict, InvalidAmount
from storage.models import Entitlement, LedgerEntry, PassPeriod, utcnow
from storage.subscribers import lock_subscriber

RefundRefusal = Literal[
    "no_unlock",  # issue: never unlocked (or the entitlement is gone another way)
    "not_paid",  # issue: unlocked by a code or gift; pass: granted by a code, gift or operator
    "pass_only",  # issue: read under a pass, never bought
    "already_refunded",  # issue or pass: the purchase was refunded before
    "no_pass",  # pass: the subscriber never held it
    "used_up",  # pass: no whole day left of what was bought
]

DAY = timedelta(days=1)


class NothingToRefund(DomainError):
    """A refused refund: nothing was written. ``reason`` says why, for Chinese or CLI words."""

    def __init__(self, message: str, *, reason: RefundRefusal) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Refund:
    entries: list[LedgerEntry]  # one per unlock or period refunded
    tokens: int  # given back in all
    balance: int  # after the refund
    replayed: bool  # the key had refunded this before; nothing new was written


def _entries_by_key(session: Session, key: str) -> list[LedgerEntry]:
    """The entries a refund under ``key`` wrote: the key itself (an issue refund) or
    ``key/<period id>`` (one per period of a pass refund)."""
    return list(session.exec(
        select(LedgerEntry).where(
            (col(LedgerEntry.idempotency_key) == key)
            | col(LedgerEntry.idempotency_key).startswith(key + "/", autoescape=True))
        .order_by(col(LedgerEntry.id))).all())


def _earlier(session: Session, key: str, *, openid: str, issue_number: int | None,
             pass_id: str | None) -> Refund | None:
    """The first result of a refund already made under ``key``; IdempotencyConflict when the
    key did something else."""
    found = _entries_by_key(session, key)
    if not found:
        return None
    if any((e.kind, e.openid, e.issue_number, e.pass_id) != ("refund", openid, issue_number,
                                                             pass_id) for e in found):
        first = found[0]
        raise IdempotencyConflict(key, f"{first.kind} {first.amount:+d} for {first.openid}")
    return Refund(found, sum(e.amount for e in found), found[-1].balance_after, replayed=True)


def _require_reason(reason: str) -> None:
    if not reason.strip():
        raise InvalidAmount("a reason is required", problem="no_reason")


def refund_issue(session: Session, *, openid: str, issue_number: int, reason: str, key: str,
                 operator: str | None = None, now: datetime | None = None) -> Refund:
    """Give back what the unlock of ``issue_number`` cost and withdraw the unlock.

    Raises NothingToRefund when the issue was not bought with tokens (or was refunded),
    UnknownSubscriber, IdempotencyConflict; a key that made this refund returns it again."""
    _require_reason(reason)
    lock_subscriber(session, openid=openid)
    earlier = _earlier(session, key, openid=openid, issue_number=issue_number, pass_id=None)
    if earlier is not None:
        return earlier
    unlock = session.exec(select(Entitlement).where(
        Entitlement.openid == openid, Entitlement.issue_number == issue_number)).first()
    if unlock is None:
        raise _why_no_unlock(session, openid=openid, issue_number=issue_number)
    charge = (session.get(LedgerEntry, unlock.ledger_entry_id)
              if unlock.ledger_entry_id is not None else None)
    if charge is None or charge.kind != "redeem" or charge.amount >= 0:
        raise NothingToRefund(f"{openid} unlocked issue {issue_number} without paying tokens "
                              "(a code or a gift); nothing to refund", reason="not_paid")
    with session.begin_nested():
        posted = ledger.post(session, openid=openid, amount=-charge.amount, kind="refund",
                             key=key, reason=reason, issue_number=issue_number,
                             refers_to=charge.id, operator=operator)
        session.delete(unlock)
        session.flush()
    return Refund([posted.entry], posted.entry.amount, posted.balance, replayed=False)


def _why_no_unlock(session: Session, *, openid: str, issue_number: int) -> NothingToRefund:
    refunded = session.exec(select(func.count()).select_from(LedgerEntry).where(
        LedgerEntry.openid == openid, LedgerEntry.kind == "refund",
        LedgerEntry.issue_number == issue_number)).one()
    if refunded:
        return NothingToRefund(f"{openid}'s unlock of issue {issue_number} was already "
                               "refunded", reason="already_refunded")
    if passes.covered(session, openid=openid, issue_number=issue_number):
        return NothingToRefund(f"{openid} reads issue {issue_number} under a pass and never "
                               "bought it; refund the pass instead (--pass)", reason="pass_only")
    return NothingToRefund(f"{openid} has not unlocked issue {issue_number}",
                           reason="no_unlock")


def unused_days(period: PassPeriod, now: datetime) -> int:
    """Whole days of ``period`` not begun by ``now``."""
    end = passes.effective_end(period)
    return max((end - max(now, period.starts_at)) // DAY, 0)


def refund_pass(session: Session, *, openid: str, pass_id: str, reason: str, key: str,
                operator: str | None = None, now: datetime | None = None) -> Refund:
    """Give back the unused whole days of every bought period of ``pass_id``: for each, the
    price × unused days // days, and the period cut where those days begin.

    Raises NothingToRefund when nothing bought is left to give back, UnknownSubscriber,
    IdempotencyConflict; a key that made this refund returns it again."""
    _require_reason(reason)
    now = now or utcnow()
    lock_subscriber(session, openid=openid)
    earlier = _earlier(session, key, openid=openid, issue_number=None, pass_id=pass_id)
    if earlier is not None:
        return earlier
    held = [p for p in passes.periods(session, openid=openid) if p.pass_id == pass_id]
    bought = [p for p in held if p.source == "purchase" and p.ledger_entry_id is not None]
    plan: list[tuple[PassPeriod, LedgerEntry, int, int]] = []
    for period in bought:
        if period.refund_entry_id is not None:  # once, whatever ``now`` a caller passes
            continue
        debit = session.get(LedgerEntry, period.ledger_entry_id)
        if debit is None or debit.kind != "pass" or debit.amount >= 0:
            continue
        days = unused_days(period, now)
        tokens = -debit.amount * days // period.days
        if tokens >= 1:  # no whole day left, or days worth less than a token: keep the pass
            plan.append((period, debit, days, tokens))
    if not plan:
        raise _why_nothing_left(openid, pass_id, held=held, bought=bought)
    entries: list[LedgerEntry] = []
    with session.begin_nested():
        for period, debit, days, tokens in plan:
            posted = ledger.post(session, openid=openid, amount=tokens, kind="refund",
                                 key=f"{key}/{period.id}", reason=reason, pass_id=pass_id,
                                 refers_to=debit.id, operator=operator)
            period.cut_at = passes.effective_end(period) - days * DAY
            period.refund_entry_id = posted.entry.id
            session.add(period)
            entries.append(posted.entry)
        session.flush()
    return Refund(entries, sum(e.amount for e in entries), entries[-1].balance_after,
                  replayed=False)


def _why_nothing_left(openid: str, pass_id: str, *, held: list[PassPeriod],
                      bought: list[PassPeriod]) -> NothingToRefund:
    if not held:
        return NothingToRefund(f"{openid} never held pass {pass_id}", reason="no_pass")
    if not bought:
        return NothingToRefund(f"{openid}'s pass {pass_id} was granted (a code, a gift or an "
                               "operator), not bought; nothing to refund", reason="not_paid")
    if all(p.refund_entry_id is not None for p in bought):
        return NothingToRefund(f"{openid}'s pass {pass_id} was already refunded",
                               reason="already_refunded")
    return NothingToRefund(f"{openid}'s pass {pass_id} has no whole unused day left to refund",
                           reason="used_up")


def issue_refund_target(session: Session, *, openid: str, issue_number: int) -> str:
    """What a refund of this issue would reverse, for a default idempotency key: the latest
    redeem charge, so refunding the same unlock twice finds the first refund, and an unlock
    bought again after a refund is a new target."""
    latest = session.exec(select(func.max(LedgerEntry.id)).where(
        LedgerEntry.openid == openid, LedgerEntry.kind == "redeem",
        LedgerEntry.issue_number == issue_number)).one()
    return f"{openid}:issue:{issue_number}:{latest or 'none'}"


def pass_refund_target(session: Session, *, openid: str, pass_id: str) -> str:
    """As ``issue_refund_target`` for a pass: its latest bought period."""
    latest = session.exec(select(func.max(PassPeriod.id)).where(
        PassPeriod.openid == openid, PassPeriod.pass_id == pass_id,
        PassPeriod.source == "purchase")).one()
    return f"{openid}:pass:{pass_id}:{latest or 'none'}"
