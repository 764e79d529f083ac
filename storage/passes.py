"""Passes (会员卡): periods during which a subscriber reads every issue published, plus the
issue that was current when the period started.

A period is granted by a purchase (with its ledger debit), a code, a gift or an operator;
each grant starts where the subscriber's last period ends (or now), so buying again extends.
Coverage is worked out from the periods when it is asked for (``covered``, and the SQL the
webhook's fast path and redeem run), never copied into entitlements: a refund that cuts a
period short (``cut_at``) takes away exactly the issues of the days given back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import Table, func
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from storage import events, ledger
from storage.coverage import covered_clause, period_end
from storage.errors import IdempotencyConflict, InvalidAmount
from storage.models import Issue, LedgerEntry, PassPeriod, utcnow
from storage.subscribers import lock_subscriber

PassSource = Literal["purchase", "code", "gift", "grant"]

_PERIOD: Table = PassPeriod.__table__  # type: ignore[attr-defined]


def covered(session: Session, *, openid: str, issue_number: int) -> bool:
    """Whether a pass of ``openid`` covers issue ``issue_number``."""
    if session.autoflush:
        session.flush()
    return bool(session.connection().execute(
        sa_select(covered_clause(openid, issue_number))).scalar())


def effective_end(period: PassPeriod) -> datetime:
    return period.cut_at if period.cut_at is not None else period.ends_at


def last_end(session: Session, *, openid: str) -> datetime | None:
    """When the subscriber's last period ends (cut periods count up to their cut)."""
    value = session.connection().execute(
        sa_select(func.max(period_end())).where(_PERIOD.c.openid == openid)).scalar()
    if value is None:
        return None
    # max() over a COALESCE loses the column type: SQLite hands back its text form.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=utcnow().tzinfo)


def _current_issue_number(session: Session, now: datetime) -> int | None:
    row = session.exec(
        select(Issue.number).where(col(Issue.published_at).is_not(None),
                                   col(Issue.published_at) <= now)
        .order_by(col(Issue.published_at).desc(), col(Issue.number).desc()).limit(1)
    ).first()
    return None if row is None else int(row)


@dataclass(frozen=True)
class PassGrant:
    period: PassPeriod
    replayed: bool  # the key had granted this before; nothing new was written


def _by_key(session: Session, key: str) -> PassPeriod | None:
    return session.exec(select(PassPeriod).where(PassPeriod.idempotency_key == key)).first()


def grant(
    session: Session,
    *,
    openid: str,
    pass_id: str,
    days: int,
    source: PassSource,
    key: str,
    now: datetime | None = None,
    ledger_entry_id: int | None = None,
    code_redemption_id: int | None = None,
    operator: str | None = None,
    reason: str = "",
) -> PassGrant:
    """Add a period of ``days`` days, starting where the subscriber's last one ends (or now).

    Takes the subscriber's row lock first, so concurrent grants and unlocks of one reader are
    serialised; a key already used for the same grant returns that period (``replayed``)."""
    now = now or utcnow()
    lock_subscriber(session, openid=openid)  # raises UnknownSubscriber
    existing = _by_key(session, key)
    if existing is not None:
        if (existing.openid, existing.pass_id, existing.source) != (openid, pass_id, source):
            raise IdempotencyConflict(key, f"pass {existing.pass_id} for {existing.openid}")
        return PassGrant(existing, replayed=True)
    previous_end = last_end(session, openid=openid)
    starts = previous_end if previous_end is not None and previous_end > now else now
    period = PassPeriod(
        openid=openid, pass_id=pass_id, days=days, starts_at=starts,
        ends_at=starts + timedelta(days=days),
        # An extension starts later: the issues published by then are the running period's.
        first_issue=_current_issue_number(session, now) if starts == now else None,
        source=source, ledger_entry_id=ledger_entry_id, code_redemption_id=code_redemption_id,
        idempotency_key=key, operator=operator, reason=reason, created_at=now,
    )
    try:
        with session.begin_nested():
            session.add(period)
            session.flush()
    except IntegrityError:
        winner = _by_key(session, key)
        if winner is None:
            raise
        return PassGrant(winner, replayed=True)
    return PassGrant(period, replayed=False)


def periods(session: Session, *, openid: str) -> list[PassPeriod]:
    """All of a subscriber's periods, oldest first."""
    return list(session.exec(select(PassPeriod).where(PassPeriod.openid == openid)
                             .order_by(col(PassPeriod.starts_at), col(PassPeriod.id))).all())


@dataclass(frozen=True)
class PassStatus:
    """The pass a subscriber holds now: which, and until when (extensions included)."""

    pass_id: str
    until: datetime


def status(session: Session, *, openid: str, now: datetime | None = None) -> PassStatus | None:
    """The running pass, or None. ``until`` is the end of the chain of periods that follow
    each other without a gap from now."""
    now = now or utcnow()
    running: PassStatus | None = None
    for p in periods(session, openid=openid):
        end = effective_end(p)
        if end <= p.starts_at or end <= now:
            continue
        if running is None:
            if p.starts_at <= now:
                running = PassStatus(p.pass_id, end)
        elif p.starts_at <= running.until:
            running = PassStatus(running.pass_id, max(running.until, end))
    return running


@dataclass(frozen=True)
class PassPurchase:
    """A pass bought with tokens: the period granted, the debit that paid for it and the
    balance after it."""

    period: PassPeriod
    entry: LedgerEntry
    balance: int
    replayed: bool  # the key had bought this before; nothing new was written


def buy(
    session: Session,
    *,
    openid: str,
    pass_id: str,
    days: int,
    price: int,
    key: str,
    now: datetime | None = None,
    reason: str | None = None,
) -> PassPurchase:
    """Debit ``price`` tokens and grant ``days`` days of pass ``pass_id`` (extending a running
    pass), both or neither.

    Raises InsufficientBalance (nothing written) when the balance is below ``price``,
    UnknownSubscriber, IdempotencyConflict when ``key`` was used for something else; a key
    that bought this very pass returns the first purchase with ``replayed`` set."""
    if price < 1 or days < 1:
        raise InvalidAmount(f"a pass needs a price and days of at least 1 (got {price} for "
                            f"{days} days)", problem="not_positive", amount=price)
    lock_subscriber(session, openid=openid)  # raises UnknownSubscriber; serialises the reader
    earlier = _by_key(session, key)
    if earlier is not None:
        return _replayed(session, earlier, openid=openid, pass_id=pass_id, key=key)
    # One savepoint: a grant that fails after the debit (a key taken) takes the debit with it,
    # even when the caller turns the error into a reply and commits.
    with session.begin_nested():
        paid = ledger.post(session, openid=openid, amount=-price, kind="pass", key=key,
                           pass_id=pass_id, reason=reason or f"pass {pass_id}, {days} days")
        if paid.replayed:  # the key is a ledger entry's without a period: not a purchase
            raise IdempotencyConflict(key, f"ledger entry #{paid.entry.id}")
        granted = grant(session, openid=openid, pass_id=pass_id, days=days, source="purchase",
                        key=key, now=now, ledger_entry_id=paid.entry.id)
        if granted.replayed:  # cannot happen under the lock; never keep a debit without it
            raise IdempotencyConflict(key, f"pass period #{granted.period.id}")
        events.record(session, events.PASS, openid=openid, at=now, detail=pass_id,
                      amount=price)
    return PassPurchase(granted.period, paid.entry, paid.balance, replayed=False)


def _replayed(session: Session, period: PassPeriod, *, openid: str, pass_id: str,
              key: str) -> PassPurchase:
    entry = (session.get(LedgerEntry, period.ledger_entry_id)
             if period.ledger_entry_id is not None else None)
    if (period.openid, period.pass_id, period.source) != (openid, pass_id, "purchase") \
            or entry is None:
        raise IdempotencyConflict(key, f"pass {period.pass_id} ({period.source}) for "
                                       f"{period.openid}")
    return PassPurchase(period, entry, entry.balance_after, replayed=True)
