"""The token ledger: append-only entries, a cached balance that can never go negative, and
idempotency keys so a retried action returns its first result instead of running twice.

Every write here happens inside a SAVEPOINT: the balance update, the entry and (for redemptions)
the entitlement land together or not at all, and a unique-key collision with a concurrent
transaction rolls back only our attempt before we look at what the winner wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select, update

from storage.errors import (
    IdempotencyConflict,
    InsufficientBalance,
    InvalidAmount,
    UnknownSubscriber,
)
from storage.models import Entitlement, LedgerEntry, Subscriber, utcnow
from storage.sql import scalar
from storage.subscribers import require_subscriber

CreditKind = Literal["topup", "adjust"]


@dataclass(frozen=True)
class LedgerResult:
    entry: LedgerEntry
    replayed: bool  # True when the key had been used before and nothing new was written

    @property
    def balance(self) -> int:
        return self.entry.balance_after


@dataclass(frozen=True)
class RedeemResult:
    status: Literal["unlocked", "already", "free"]
    balance: int
    entry: LedgerEntry | None = None
    replayed: bool = False


def _by_key(session: Session, key: str) -> LedgerEntry | None:
    return session.exec(select(LedgerEntry).where(LedgerEntry.idempotency_key == key)).first()


def _describe(e: LedgerEntry) -> str:
    issue = f" issue {e.issue_number}" if e.issue_number is not None else ""
    return f"{e.kind} {e.amount:+d} for {e.openid}{issue}, reason {e.reason!r}"


def _same_action(e: LedgerEntry, *, openid: str, kind: str, amount: int | None,
                 issue_number: int | None, reason: str | None) -> bool:
    return (
        e.openid == openid
        and e.kind == kind
        and (amount is None or e.amount == amount)
        and e.issue_number == issue_number
        and (reason is None or e.reason == reason)
    )


def _apply_delta(session: Session, *, openid: str, amount: int) -> int | None:
    """Conditional update: the new balance, or None when it would go below zero."""
    result = session.execute(
        update(Subscriber)
        .where(col(Subscriber.openid) == openid, col(Subscriber.balance) + amount >= 0)
        .values(balance=col(Subscriber.balance) + amount)
        .returning(col(Subscriber.balance))
    ).first()
    return None if result is None else int(result[0])


def credit(
    session: Session,
    *,
    openid: str,
    amount: int,
    kind: CreditKind,
    key: str,
    reason: str,
    operator: str | None = None,
    max_topup: int | None = None,
) -> LedgerResult:
    """Top up (amount > 0) or adjust (amount ≠ 0, may be negative but never past zero)."""
    if kind == "topup" and amount <= 0:
        raise InvalidAmount(f"a top-up must be a positive whole number, got {amount}")
    if kind == "adjust" and amount == 0:
        raise InvalidAmount("an adjustment of 0 changes nothing; give a non-zero delta")
    if max_topup is not None and amount > max_topup:
        raise InvalidAmount(f"{kind} {amount} is over the limit [tokens] max_topup = {max_topup}")
    if not reason.strip():
        raise InvalidAmount("a reason is required")
    def matches(e: LedgerEntry) -> bool:
        return _same_action(e, openid=openid, kind=kind, amount=amount, issue_number=None,
                            reason=reason)

    existing = _by_key(session, key)
    if existing is not None:
        if not matches(existing):
            raise IdempotencyConflict(key, _describe(existing))
        return LedgerResult(existing, replayed=True)

    sub = require_subscriber(session, openid=openid)
    try:
        with session.begin_nested():
            new_balance = _apply_delta(session, openid=openid, amount=amount)
            if new_balance is None:
                raise InsufficientBalance(needed=-amount, balance=sub.balance)
            entry = LedgerEntry(
                openid=openid, amount=amount, kind=kind, idempotency_key=key,
                operator=operator, reason=reason, balance_after=new_balance, created_at=utcnow(),
            )
            session.add(entry)
            session.flush()
    except IntegrityError:
        # A concurrent transaction committed the same key first: answer with its result.
        winner = _by_key(session, key)
        if winner is None:
            raise
        if not matches(winner):
            raise IdempotencyConflict(key, _describe(winner)) from None
        return LedgerResult(winner, replayed=True)
    return LedgerResult(entry, replayed=False)


_ENTITLEMENT = Entitlement.__table__.c  # type: ignore[attr-defined]
_SUBSCRIBER = Subscriber.__table__.c  # type: ignore[attr-defined]


def has_entitlement(session: Session, *, openid: str, issue_number: int) -> bool:
    return scalar(session, sa_select(_ENTITLEMENT.id).where(
        _ENTITLEMENT.openid == openid, _ENTITLEMENT.issue_number == issue_number)) is not None


def redeem(
    session: Session, *, openid: str, issue_number: int, price: int, key: str
) -> RedeemResult:
    """Debit ``price`` and grant the entitlement in one step; already unlocked costs nothing."""
    sub = require_subscriber(session, openid=openid)
    if price == 0:
        return RedeemResult("free", balance=sub.balance)

    existing = _by_key(session, key)
    if existing is not None:
        if not _same_action(existing, openid=openid, kind="redeem", amount=None,
                            issue_number=issue_number, reason=None):
            raise IdempotencyConflict(key, _describe(existing))
        return RedeemResult("unlocked", balance=existing.balance_after, entry=existing,
                            replayed=True)
    if has_entitlement(session, openid=openid, issue_number=issue_number):
        return RedeemResult("already", balance=sub.balance)

    try:
        with session.begin_nested():
            new_balance = _apply_delta(session, openid=openid, amount=-price)
            if new_balance is None:
                raise InsufficientBalance(needed=price, balance=sub.balance)
            entry = LedgerEntry(
                openid=openid, amount=-price, kind="redeem", issue_number=issue_number,
                idempotency_key=key, reason=f"unlock issue {issue_number}",
                balance_after=new_balance, created_at=utcnow(),
            )
            session.add(entry)
            session.flush()
            session.add(Entitlement(openid=openid, issue_number=issue_number,
                                    ledger_entry_id=entry.id, created_at=utcnow()))
            session.flush()
    except IntegrityError:
        # Lost a race: either the same key or another unlock of this issue committed first.
        session.expire_all()
        winner = _by_key(session, key)
        if winner is not None:
            return RedeemResult("unlocked", balance=winner.balance_after, entry=winner,
                                replayed=True)
        if has_entitlement(session, openid=openid, issue_number=issue_number):
            current = require_subscriber(session, openid=openid)
            return RedeemResult("already", balance=current.balance)
        raise
    return RedeemResult("unlocked", balance=new_balance, entry=entry)


def get_balance(session: Session, *, openid: str) -> int:
    balance = scalar(session, sa_select(_SUBSCRIBER.balance).where(
        _SUBSCRIBER.openid == openid))
    if balance is None:
        raise UnknownSubscriber(openid)
    return int(balance)


def recent_entries(session: Session, *, openid: str, limit: int = 5) -> list[LedgerEntry]:
    return list(session.exec(
        select(LedgerEntry).where(LedgerEntry.openid == openid)
        .order_by(col(LedgerEntry.id).desc()).limit(limit)
    ).all())


def count_entries(session: Session) -> int:
    return int(session.exec(select(func.count()).select_from(LedgerEntry)).one())


def unlocked_issues(session: Session, *, openid: str) -> set[int]:
    rows = session.exec(
        select(Entitlement.issue_number).where(Entitlement.openid == openid)
    ).all()
    return {int(n) for n in rows}


@dataclass(frozen=True)
class Mismatch:
    openid: str
    cached: int
    ledger: int
    problem: str


def check(session: Session) -> list[Mismatch]:
    """Every subscriber's cached balance against the sum of their entries, plus redemptions
    without an entitlement; an empty list means the books balance."""
    sums = dict(session.exec(
        select(LedgerEntry.openid, func.coalesce(func.sum(LedgerEntry.amount), 0))
        .group_by(col(LedgerEntry.openid))
    ).all())
    problems: list[Mismatch] = []
    seen: set[str] = set()
    for openid, cached in session.exec(select(Subscriber.openid, Subscriber.balance)).all():
        seen.add(openid)
        total = int(sums.get(openid, 0))
        if total != cached:
            problems.append(Mismatch(openid, cached, total, "cached balance differs from ledger"))
        if cached < 0:
            problems.append(Mismatch(openid, cached, total, "negative balance"))
    for openid, total in sums.items():
        if openid not in seen:
            problems.append(Mismatch(openid, 0, int(total), "ledger entries for unknown user"))
    orphans = session.exec(
        select(LedgerEntry.openid, LedgerEntry.issue_number)
        .outerjoin(Entitlement, col(Entitlement.ledger_entry_id) == col(LedgerEntry.id))
        .where(LedgerEntry.kind == "redeem", col(Entitlement.id).is_(None))
    ).all()
    for openid, number in orphans:
        problems.append(Mismatch(openid, 0, 0, f"redemption of issue {number} without unlock"))
    return problems
