"""The token ledger: append-only entries, a cached balance that can never go negative, and
idempotency keys so a retried action returns its first result instead of running twice.

The balance update, the entry and (for redemptions) the entitlement land together or not at
all: credits and SQLite redemptions write inside a SAVEPOINT, so a unique-key collision with a
concurrent transaction rolls back only our attempt before we look at what the winner wrote; a
PostgreSQL redemption is one statement whose writes all hang off the entry insert, which does
nothing when it loses a race (see ``redeem``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    String,
    Table,
    bindparam,
    exists,
    func,
    insert,
    literal,
    true,
)
from sqlalchemy import select as sa_select
from sqlalchemy import update as sa_update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key
from sqlmodel import Session, col, select, update

from storage import audit, events
from storage.audit import Mismatch
from storage.coverage import covered_clause
from storage.errors import (
    IdempotencyConflict,
    InsufficientBalance,
    InvalidAmount,
    UnknownSubscriber,
)
from storage.models import Entitlement, Event, Issue, LedgerEntry, Subscriber, utcnow
from storage.sql import scalar

CreditKind = Literal["topup", "adjust"]

# Far above any real balance, far below SQLite's and PostgreSQL's 64-bit integer limit: the
# bound on any one amount, whoever types it (chat, CLI).
MAX_ABS_AMOUNT = 10**12


@dataclass(frozen=True)
class LedgerResult:
    entry: LedgerEntry
    replayed: bool  # True when the key had been used before and nothing new was written

    @property
    def balance(self) -> int:
        return self.entry.balance_after


@dataclass(frozen=True)
class RedeemResult:
    status: Literal["unlocked", "already", "free", "pass"]  # pass: a pass covers it, no charge
    balance: int
    entry: LedgerEntry | None = None
    replayed: bool = False


def _by_key(session: Session, key: str) -> LedgerEntry | None:
    return session.exec(select(LedgerEntry).where(LedgerEntry.idempotency_key == key)).first()


def key_used(session: Session, *, key: str) -> bool:
    """Whether an entry carries this idempotency key."""
    return scalar(session, sa_select(_ENTRY_T.c.id).where(
        _ENTRY_T.c.idempotency_key == key)) is not None


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
    if abs(amount) > MAX_ABS_AMOUNT:
        raise InvalidAmount(f"{kind} {amount} is implausibly large (more than {MAX_ABS_AMOUNT:,})",
                            problem="too_large", amount=amount, limit=MAX_ABS_AMOUNT)
    if kind == "topup" and amount <= 0:
        raise InvalidAmount(f"a top-up must be a positive whole number, got {amount}",
                            problem="not_positive", amount=amount)
    if kind == "adjust" and amount == 0:
        raise InvalidAmount("an adjustment of 0 changes nothing; give a non-zero delta",
                            problem="zero", amount=amount)
    if max_topup is not None and amount > max_topup:
        raise InvalidAmount(f"{kind} {amount} is over the limit [tokens] max_topup = {max_topup}",
                            problem="over_limit", amount=amount, limit=max_topup)
    if not reason.strip():
        raise InvalidAmount("a reason is required", problem="no_reason")
    result = post(session, openid=openid, amount=amount, kind=kind, key=key, reason=reason,
                  operator=operator, same_reason=True)
    if kind == "topup" and not result.replayed:  # an adjustment is a correction, not a top-up
        events.record(session, events.TOPUP, openid=openid, detail="operator", amount=amount)
    return result


EntryKind = Literal["topup", "adjust", "redeem", "code", "pass", "gift", "refund", "pay",
                    "pay_refund"]


def post(
    session: Session,
    *,
    openid: str,
    amount: int,
    kind: EntryKind,
    key: str,
    reason: str,
    issue_number: int | None = None,
    pass_id: str | None = None,
    code_batch_id: int | None = None,
    refers_to: int | None = None,
    operator: str | None = None,
    same_reason: bool = False,
) -> LedgerResult:
    """Write one entry and move the cached balance with it, inside a savepoint: the building
    block of codes, passes, gifts and refunds (each adds its own rows in the same transaction).

    Raises InsufficientBalance (nothing written) when a debit would go below zero,
    IdempotencyConflict when ``key`` was used for another action; a key used for this very
    action returns the first entry with ``replayed`` set (``same_reason``: only if the reason
    matches too, as for operator top-ups). The caller validates the amount."""
    if abs(amount) > MAX_ABS_AMOUNT or amount == 0:
        raise InvalidAmount(f"{kind} {amount} is not a usable amount",
                            problem="too_large" if amount else "zero", amount=amount,
                            limit=MAX_ABS_AMOUNT)

    def matches(e: LedgerEntry) -> bool:
        return (_same_action(e, openid=openid, kind=kind, amount=amount,
                             issue_number=issue_number, reason=reason if same_reason else None)
                and e.pass_id == pass_id and e.code_batch_id == code_batch_id
                and e.refers_to == refers_to)

    if session.autoflush:
        session.flush()
    existing = _by_key(session, key)
    if existing is not None:
        if not matches(existing):
            raise IdempotencyConflict(key, _describe(existing))
        return LedgerResult(existing, replayed=True)
    try:
        with session.begin_nested():
            new_balance = _apply_delta(session, openid=openid, amount=amount)
            if new_balance is None:
                balance = get_balance(session, openid=openid)  # raises UnknownSubscriber
                raise InsufficientBalance(needed=-amount, balance=balance)
            entry = LedgerEntry(
                openid=openid, amount=amount, kind=kind, issue_number=issue_number,
                pass_id=pass_id, code_batch_id=code_batch_id, refers_to=refers_to,
                idempotency_key=key, operator=operator, reason=reason,
                balance_after=new_balance, created_at=utcnow(),
            )
            session.add(entry)
            session.flush()
    except IntegrityError:
        winner = _by_key(session, key)
        if winner is None:
            raise
        if not matches(winner):
            raise IdempotencyConflict(key, _describe(winner)) from None
        return LedgerResult(winner, replayed=True)
    return LedgerResult(entry, replayed=False)


_SUB_T: Table = Subscriber.__table__  # type: ignore[attr-defined]
_ENTRY_T: Table = LedgerEntry.__table__  # type: ignore[attr-defined]
_ENT_T: Table = Entitlement.__table__  # type: ignore[attr-defined]
_ISSUE_T: Table = Issue.__table__  # type: ignore[attr-defined]
_EVENT_T: Table = Event.__table__  # type: ignore[attr-defined]


def has_entitlement(session: Session, *, openid: str, issue_number: int) -> bool:
    """An unlock of the issue itself (by tokens or a code); a pass is ``may_read``."""
    return scalar(session, sa_select(_ENT_T.c.id).where(
        _ENT_T.c.openid == openid, _ENT_T.c.issue_number == issue_number)) is not None


def may_read(session: Session, *, openid: str, issue_number: int) -> bool:
    """Unlocked, or covered by one of the subscriber's passes."""
    if session.autoflush:
        session.flush()
    return bool(session.connection().execute(sa_select(
        exists().where(_ENT_T.c.openid == openid, _ENT_T.c.issue_number == issue_number)
        | covered_clause(openid, issue_number))).scalar())


# --- redeem: statements built once; each call only binds values ------------------------------
#
# Bind parameters shared by the statements below.
_P_OPENID = bindparam("p_openid", type_=String())
_P_ISSUE = bindparam("p_issue", type_=Integer())
_P_PRICE = bindparam("p_price", type_=BigInteger())
_P_KEY = bindparam("p_key", type_=String())
_P_REASON = bindparam("p_reason", type_=String())
_P_NOW = bindparam("p_now", type_=_ENTRY_T.c.created_at.type)

_UNLOCKED = exists().where(_ENT_T.c.openid == _P_OPENID, _ENT_T.c.issue_number == _P_ISSUE)
_KEY_USED = exists().where(_ENTRY_T.c.idempotency_key == _P_KEY)
_COVERED = covered_clause(_P_OPENID, _P_ISSUE)

# Everything redeem decides on, in one round trip. FOR UPDATE (PostgreSQL; SQLite ignores it and
# needs no lock: its write transactions run one at a time) serialises this user's redemptions
# from here to COMMIT, so the write below, which takes a fresh snapshot in READ COMMITTED, sees
# every redemption that committed before us and computes balance_after from the current balance.
_STATE = (
    sa_select(_SUB_T.c.id, _SUB_T.c.balance, _KEY_USED.label("key_used"),
              _UNLOCKED.label("unlocked"), _COVERED.label("covered"))
    .where(_SUB_T.c.openid == _P_OPENID)
    .with_for_update(of=_SUB_T)
)

# PostgreSQL: entry, debit and entitlement in ONE statement, no SAVEPOINT. The entry goes first
# and the other two hang off its RETURNING row, so if the entry is not written (key taken by a
# concurrent transaction, issue already unlocked, balance too low) nothing is, and the statement
# returns no row; the caller re-reads to learn why. The entitlement insert has no ON CONFLICT:
# under the row lock a duplicate cannot happen, and if it somehow did the error aborts the whole
# transaction rather than leave a charge without an unlock.
_PG_CLAIM = (
    postgresql.insert(_ENTRY_T)
    .from_select(
        ["openid", "amount", "kind", "issue_number", "idempotency_key", "reason",
         "balance_after", "created_at"],
        sa_select(_SUB_T.c.openid, -_P_PRICE, literal("redeem", String()), _P_ISSUE, _P_KEY,
                  _P_REASON, _SUB_T.c.balance - _P_PRICE, _P_NOW)
        .where(_SUB_T.c.openid == _P_OPENID, _SUB_T.c.balance >= _P_PRICE, ~_UNLOCKED,
               ~_COVERED),
    )
    .on_conflict_do_nothing(index_elements=["idempotency_key"])
    .returning(_ENTRY_T.c.id, _ENTRY_T.c.openid, _ENTRY_T.c.balance_after)
    .cte("claim")
)
_PG_DEBIT = (
    sa_update(_SUB_T)
    .where(_SUB_T.c.openid == _PG_CLAIM.c.openid)
    .values(balance=_SUB_T.c.balance - _P_PRICE)
    .returning(_SUB_T.c.id, _SUB_T.c.balance)
    .cte("debit")
)
_PG_GRANT = (
    insert(_ENT_T)
    .from_select(["openid", "issue_number", "ledger_entry_id", "created_at"],
                 sa_select(_P_OPENID, _P_ISSUE, _PG_CLAIM.c.id, _P_NOW))
    .returning(_ENT_T.c.id)
    .cte("granted")
)
# The unlock's event (storage.events), written only with the entitlement.
_UNLOCK_EVENT = {"at": _P_NOW, "kind": literal(events.UNLOCK, String()), "openid": _P_OPENID,
                 "issue_number": _P_ISSUE, "detail": literal("tokens", String()),
                 "amount": _P_PRICE}
_PG_EVENT = (
    insert(_EVENT_T)
    .from_select(list(_UNLOCK_EVENT), sa_select(*_UNLOCK_EVENT.values()).select_from(_PG_GRANT))
    .cte("unlock_event")
)
# Outer joins: a claimed entry whose debit or grant went missing must show up, not vanish.
_PG_REDEEM = (
    sa_select(_PG_CLAIM.c.id, _PG_CLAIM.c.balance_after, _PG_DEBIT.c.id.label("sub_id"),
              _PG_DEBIT.c.balance, _PG_GRANT.c.id.label("grant_id"))
    .select_from(_PG_CLAIM.outerjoin(_PG_DEBIT, true()).outerjoin(_PG_GRANT, true()))
    .add_cte(_PG_EVENT)  # not selected from: PostgreSQL runs a writing CTE all the same
)

# SQLite: the same three writes as separate statements inside a savepoint.
_DEBIT = (
    sa_update(_SUB_T)
    .where(_SUB_T.c.openid == _P_OPENID, _SUB_T.c.balance >= _P_PRICE)
    .values(balance=_SUB_T.c.balance - _P_PRICE)
    .returning(_SUB_T.c.id, _SUB_T.c.balance)
)
_ENTRY = insert(_ENTRY_T).values(
    openid=_P_OPENID, amount=-_P_PRICE, kind="redeem", issue_number=_P_ISSUE,
    idempotency_key=_P_KEY, reason=_P_REASON, balance_after=bindparam("p_balance_after"),
    created_at=_P_NOW,
).returning(_ENTRY_T.c.id)
_GRANT = insert(_ENT_T).values(openid=_P_OPENID, issue_number=_P_ISSUE,
                               ledger_entry_id=bindparam("p_entry_id"), created_at=_P_NOW)
_EVENT = insert(_EVENT_T).values(**_UNLOCK_EVENT)


def redeem(
    session: Session, *, openid: str, issue_number: int, price: int, key: str
) -> RedeemResult:
    """Debit ``price`` and grant the entitlement in one step; already unlocked costs nothing.
    The unlock is recorded as an event (storage.events) with the entitlement; one a pass
    covers, each time it is asked for (nothing else is written then).

    Two statements on PostgreSQL (the locking read, then one statement that writes the entry,
    the debit, the entitlement and the event) instead of nine; see docs/benchmarks.md §3."""
    if session.autoflush:  # as an ORM query would: our Core statements must see pending objects
        session.flush()
    if price == 0:
        return RedeemResult("free", balance=get_balance(session, openid=openid))
    conn = session.connection()
    now = utcnow()
    params: dict[str, Any] = {"p_openid": openid, "p_issue": issue_number, "p_price": price,
                              "p_key": key, "p_reason": f"unlock issue {issue_number}",
                              "p_now": now}
    postgres = conn.dialect.name == "postgresql"
    for _ in range(3):
        ready = _redeem_state(session, conn, params)
        if isinstance(ready, RedeemResult):
            if ready.status == "pass":
                events.record(session, events.UNLOCK, openid=openid, at=now,
                              issue_number=issue_number, detail="pass")
            return ready
        if postgres:
            row = conn.execute(_PG_REDEEM, params).first()
            if row is None:
                continue  # lost a race after our read; the next read says to whom
            entry_id, balance, sub_id = int(row.id), int(row.balance_after), row.sub_id
            if sub_id is None or row.grant_id is None or int(row.balance) != balance:
                # Cannot happen under the row lock; never let half a redemption be committed.
                raise RuntimeError(f"redeem {key!r}: entry {entry_id} written without its "
                                   "debit or entitlement; roll the transaction back")
        else:
            try:
                with conn.begin_nested():
                    debit = conn.execute(_DEBIT, params).first()
                    if debit is None:
                        continue  # rolled back to the savepoint; nothing written
                    sub_id, balance = debit.id, int(debit.balance)
                    entry_id = int(conn.execute(
                        _ENTRY, params | {"p_balance_after": balance}).scalar_one())
                    conn.execute(_GRANT, params | {"p_entry_id": entry_id})
                    conn.execute(_EVENT, params)
            except IntegrityError:
                continue  # rolled back to the savepoint; the next read says who won
        sync_balance(session, int(sub_id), balance)
        entry = LedgerEntry(
            id=entry_id, openid=openid, amount=-price, kind="redeem", issue_number=issue_number,
            idempotency_key=key, reason=params["p_reason"], balance_after=balance, created_at=now,
        )
        # Persistent in the session, as the ORM insert used to leave it; no SQL.
        make_transient_to_detached(entry)
        session.add(entry)
        return RedeemResult("unlocked", balance=balance, entry=entry)
    raise RuntimeError(f"redeem {key!r}: the write kept failing although the checks passed")


def _redeem_state(session: Session, conn: Connection,
                  params: dict[str, Any]) -> RedeemResult | None:
    """The outcome decided by the current state (and the row lock taken), or None when the
    redemption should go ahead. Raises for an unknown user, a reused key or too few tokens."""
    openid, issue_number, price, key = (params["p_openid"], params["p_issue"],
                                        params["p_price"], params["p_key"])
    state = conn.execute(_STATE, params).first()
    if state is None:
        raise UnknownSubscriber(openid)
    if state.key_used:
        existing = _by_key(session, key)
        if existing is None:  # seen a moment ago, and entries are never deleted
            raise RuntimeError(f"idempotency key {key!r} vanished")
        if not _same_action(existing, openid=openid, kind="redeem", amount=None,
                            issue_number=issue_number, reason=None):
            raise IdempotencyConflict(key, _describe(existing))
        return RedeemResult("unlocked", balance=existing.balance_after, entry=existing,
                            replayed=True)
    if state.unlocked:
        return RedeemResult("already", balance=int(state.balance))
    if state.covered:  # never charged: the pass grants it (storage.passes)
        return RedeemResult("pass", balance=int(state.balance))
    if state.balance < price:
        raise InsufficientBalance(needed=price, balance=int(state.balance))
    return None


def sync_balance(session: Session, subscriber_id: int, balance: int) -> None:
    """Keep a Subscriber already loaded in this session in step with the Core UPDATE (the ORM
    update this replaces did that itself)."""
    if not session.identity_map:
        return
    loaded = session.identity_map.get(identity_key(Subscriber, subscriber_id))
    if loaded is not None:
        set_committed_value(loaded, "balance", balance)


def get_balance(session: Session, *, openid: str) -> int:
    balance = scalar(session, sa_select(_SUB_T.c.balance).where(_SUB_T.c.openid == openid))
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
    """Issues the subscriber may read in full: unlocked or covered by a pass."""
    rows = session.exec(
        select(Entitlement.issue_number).where(Entitlement.openid == openid)
    ).all()
    covered = session.connection().execute(
        sa_select(_ISSUE_T.c.number).where(covered_clause(openid, _ISSUE_T.c.number))).all()
    return {int(n) for n in rows} | {int(n) for (n,) in covered}


def check(session: Session) -> list[Mismatch]:
    """Every subscriber's cached balance against the sum of their entries, then every unlock,
    code, pass, gift and refund against its source (storage.audit); an empty list means the
    books balance."""
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
    return problems + audit.problems(session)
