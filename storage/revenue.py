"""The revenue report: where tokens came from and where they went, read from the ledger alone.

Every figure is a sum of ledger entries grouped by kind (and issue, pass or code batch); the
other tables only name things (a batch's label) or count redemptions. Tokens outstanding are
the sum of every balance now: tokens sold or given and not yet spent, which the publisher still
owes its readers. ``storage.audit`` proves that the categories add up to that sum."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Table, func, true
from sqlalchemy import select as sa_select
from sqlalchemy.orm import aliased
from sqlmodel import Session

from storage.models import (
    CodeBatch,
    CodeRedemption,
    LedgerEntry,
    PayOrder,
    PayRefund,
    Subscriber,
)

_ENTRY: Table = LedgerEntry.__table__  # type: ignore[attr-defined]
_BATCH: Table = CodeBatch.__table__  # type: ignore[attr-defined]
_REDEMPTION: Table = CodeRedemption.__table__  # type: ignore[attr-defined]
_SUB: Table = Subscriber.__table__  # type: ignore[attr-defined]
_ORDER: Table = PayOrder.__table__  # type: ignore[attr-defined]
_PAY_REFUND: Table = PayRefund.__table__  # type: ignore[attr-defined]

# Kinds that bring tokens in (top-ups, codes, refunds and WeChat Pay are positive; an
# adjustment either way; a WeChat Pay refund takes tokens back, so it counts against "in")
# and kinds that spend them (always negative).
IN_KINDS = ("topup", "adjust", "code", "refund", "pay", "pay_refund")
SPEND_KINDS = ("redeem", "pass", "gift")
KINDS = IN_KINDS + SPEND_KINDS


@dataclass(frozen=True)
class BatchLine:
    """One code batch: what each code grants, how many redemptions, tokens credited."""

    batch_id: int
    label: str
    kind: str  # tokens | issue | pass; "" for a batch the ledger names but that is missing
    grants_tokens: int | None
    issue_number: int | None
    pass_id: str | None
    redemptions: int
    tokens: int


@dataclass(frozen=True)
class SpendLine:
    """Tokens spent on one issue (redemptions) or one pass (purchases)."""

    issue_number: int | None
    pass_id: str | None
    count: int
    tokens: int


@dataclass(frozen=True)
class GiftLine:
    issue_number: int | None
    pass_id: str | None
    bought: int
    redeemed: int  # of those bought in the window, how many a friend has redeemed by now
    tokens: int


@dataclass(frozen=True)
class RefundLine:
    """Refunds of the redemptions of one issue or the purchases of one pass."""

    issue_number: int | None
    pass_id: str | None
    count: int
    tokens: int


@dataclass(frozen=True)
class Money:
    """WeChat Pay in ¥ (fen): orders paid in the window, and refunds asked for in it (not
    given back: refused or closed ones are not counted)."""

    orders: int = 0
    paid_fen: int = 0
    refunds: int = 0
    refunded_fen: int = 0

    @property
    def net_fen(self) -> int:
        return self.paid_fen - self.refunded_fen


@dataclass(frozen=True)
class Revenue:
    since: datetime | None
    topups: int
    adjustments: int  # net: corrections go both ways
    refunds_in: int
    codes: list[BatchLine] = field(default_factory=list)
    issues: list[SpendLine] = field(default_factory=list)
    passes: list[SpendLine] = field(default_factory=list)
    gifts: list[GiftLine] = field(default_factory=list)
    refunds: list[RefundLine] = field(default_factory=list)
    pay: int = 0  # tokens bought with WeChat Pay
    pay_refunds: int = 0  # net tokens taken back by WeChat Pay refunds (≤ 0)
    money: Money = field(default_factory=Money)
    opening: int = 0  # Σ entries before ``since``: what readers held when the window opened
    outstanding: int = 0  # Σ balances now

    @property
    def codes_in(self) -> int:
        return sum(b.tokens for b in self.codes)

    @property
    def tokens_in(self) -> int:
        return (self.topups + self.adjustments + self.codes_in + self.refunds_in + self.pay
                + self.pay_refunds)

    @property
    def spent_on_issues(self) -> int:
        return sum(line.tokens for line in self.issues)

    @property
    def spent_on_passes(self) -> int:
        return sum(line.tokens for line in self.passes)

    @property
    def spent_on_gifts(self) -> int:
        return sum(line.tokens for line in self.gifts)

    @property
    def tokens_spent(self) -> int:
        return self.spent_on_issues + self.spent_on_passes + self.spent_on_gifts

    @property
    def net(self) -> int:
        """In minus spent over the window: how much the outstanding total grew."""
        return self.tokens_in - self.tokens_spent


def _window(since: datetime | None, column: Any) -> ColumnElement[bool]:
    return true() if since is None else column >= since


def _sum_of(session: Session, kind: str, since: datetime | None) -> int:
    value = session.connection().execute(
        sa_select(func.coalesce(func.sum(_ENTRY.c.amount), 0))
        .where(_ENTRY.c.kind == kind, _window(since, _ENTRY.c.created_at))).scalar()
    return int(value or 0)


def report(session: Session, *, since: datetime | None = None) -> Revenue:
    """The flows since ``since`` (all time when None) and what is outstanding now."""
    if session.autoflush:
        session.flush()
    conn = session.connection()
    opening = 0
    if since is not None:
        opening = int(conn.execute(sa_select(func.coalesce(func.sum(_ENTRY.c.amount), 0))
                                   .where(_ENTRY.c.created_at < since)).scalar() or 0)
    outstanding = int(conn.execute(
        sa_select(func.coalesce(func.sum(_SUB.c.balance), 0))).scalar() or 0)
    return Revenue(
        since=since,
        topups=_sum_of(session, "topup", since),
        adjustments=_sum_of(session, "adjust", since),
        refunds_in=_sum_of(session, "refund", since),
        codes=_codes(session, since),
        issues=_spend(session, "redeem", since),
        passes=_spend(session, "pass", since),
        gifts=_gifts(session, since),
        refunds=_refunds(session, since),
        pay=_sum_of(session, "pay", since),
        pay_refunds=_sum_of(session, "pay_refund", since),
        money=_money(session, since),
        opening=opening,
        outstanding=outstanding,
    )


def _money(session: Session, since: datetime | None) -> Money:
    conn = session.connection()
    orders, paid = conn.execute(
        sa_select(func.count(), func.coalesce(func.sum(_ORDER.c.amount_fen), 0))
        .where(_ORDER.c.status.in_(["paid", "refunded"]),
               _window(since, _ORDER.c.paid_at))).one()
    refunds, refunded = conn.execute(
        sa_select(func.count(), func.coalesce(func.sum(_PAY_REFUND.c.amount_fen), 0))
        .where(_PAY_REFUND.c.status.not_in(["refused", "closed"]),
               _window(since, _PAY_REFUND.c.created_at))).one()
    return Money(orders=int(orders), paid_fen=int(paid), refunds=int(refunds),
                 refunded_fen=int(refunded))


def _spend(session: Session, kind: str, since: datetime | None) -> list[SpendLine]:
    group = _ENTRY.c.issue_number if kind == "redeem" else _ENTRY.c.pass_id
    rows = session.connection().execute(
        sa_select(group, func.count(), -func.sum(_ENTRY.c.amount))
        .where(_ENTRY.c.kind == kind, _window(since, _ENTRY.c.created_at))
        .group_by(group).order_by(group)).all()
    return [SpendLine(issue_number=key if kind == "redeem" else None,
                      pass_id=key if kind == "pass" else None,
                      count=int(n), tokens=int(tokens)) for key, n, tokens in rows]


def _codes(session: Session, since: datetime | None) -> list[BatchLine]:
    """Batches sold or handed out by the operator (gift batches are under gifts): the tokens
    their codes credited, from the ledger, and how many times their codes were redeemed."""
    conn = session.connection()
    credited = {int(b): int(t) for b, t in conn.execute(
        sa_select(_ENTRY.c.code_batch_id, func.sum(_ENTRY.c.amount))
        .where(_ENTRY.c.kind == "code", _window(since, _ENTRY.c.created_at))
        .group_by(_ENTRY.c.code_batch_id)).all() if b is not None}
    orphan = int(conn.execute(
        sa_select(func.coalesce(func.sum(_ENTRY.c.amount), 0))
        .where(_ENTRY.c.kind == "code", _ENTRY.c.code_batch_id.is_(None),
               _window(since, _ENTRY.c.created_at))).scalar() or 0)
    used = {int(b): int(n) for b, n in conn.execute(
        sa_select(_REDEMPTION.c.batch_id, func.count())
        .where(_window(since, _REDEMPTION.c.created_at))
        .group_by(_REDEMPTION.c.batch_id)).all()}
    batches = {int(row.id): row for row in conn.execute(
        sa_select(_BATCH).where(_BATCH.c.giver.is_(None))).all()}
    shown = sorted({*credited, *(b for b in used if b in batches),
                    *(b for b, row in batches.items()
                      if since is None or row.created_at >= since)})
    lines: list[BatchLine] = []
    for batch_id in shown:
        row = batches.get(batch_id)
        lines.append(BatchLine(
            batch_id=batch_id, label=row.label if row is not None else "",
            kind=row.kind if row is not None else "",
            grants_tokens=row.tokens if row is not None else None,
            issue_number=row.issue_number if row is not None else None,
            pass_id=row.pass_id if row is not None else None,
            redemptions=used.get(batch_id, 0), tokens=credited.get(batch_id, 0)))
    if orphan:  # credited by a code entry that names no batch: storage.audit reports it
        lines.append(BatchLine(batch_id=0, label="", kind="", grants_tokens=None,
                               issue_number=None, pass_id=None, redemptions=0, tokens=orphan))
    return lines


def _gifts(session: Session, since: datetime | None) -> list[GiftLine]:
    redeemed = (sa_select(_BATCH.c.gift_entry_id)
                .join(_REDEMPTION, _REDEMPTION.c.batch_id == _BATCH.c.id)
                .where(_BATCH.c.gift_entry_id.is_not(None)))
    rows = session.connection().execute(
        sa_select(_ENTRY.c.issue_number, _ENTRY.c.pass_id, func.count(),
                  func.count().filter(_ENTRY.c.id.in_(redeemed)),
                  -func.sum(_ENTRY.c.amount))
        .where(_ENTRY.c.kind == "gift", _window(since, _ENTRY.c.created_at))
        .group_by(_ENTRY.c.issue_number, _ENTRY.c.pass_id)).all()
    return sorted((GiftLine(issue_number=issue, pass_id=pass_id, bought=int(n),
                            redeemed=int(done or 0), tokens=int(tokens))
                   for issue, pass_id, n, done, tokens in rows), key=_issues_then_passes)


def _refunds(session: Session, since: datetime | None) -> list[RefundLine]:
    """Grouped by what the refunded entry bought: an issue or a pass."""
    original = aliased(_ENTRY)
    issue = func.coalesce(original.c.issue_number, _ENTRY.c.issue_number)
    pass_id = func.coalesce(original.c.pass_id, _ENTRY.c.pass_id)
    rows = session.connection().execute(
        sa_select(issue, pass_id, func.count(), func.sum(_ENTRY.c.amount))
        .select_from(_ENTRY.outerjoin(original, original.c.id == _ENTRY.c.refers_to))
        .where(_ENTRY.c.kind == "refund", _window(since, _ENTRY.c.created_at))
        .group_by(issue, pass_id)).all()
    return sorted((RefundLine(issue_number=i, pass_id=p, count=int(n), tokens=int(t))
                   for i, p, n, t in rows), key=_issues_then_passes)


def _issues_then_passes(line: GiftLine | RefundLine) -> tuple[bool, int, str]:
    """Issues by number, then passes by id (SQL sorts NULL first or last by dialect)."""
    return (line.issue_number is None, line.issue_number or 0, line.pass_id or "")


def as_json(rev: Revenue) -> dict[str, Any]:
    """The report with the stable keys README "newsbot revenue --json" documents (times are
    left to the caller, which knows the zone to show them in)."""
    return {
        "in": {"topups": rev.topups, "adjustments": rev.adjustments, "codes": rev.codes_in,
               "refunds": rev.refunds_in, "wechat_pay": rev.pay,
               "wechat_pay_refunds": rev.pay_refunds, "total": rev.tokens_in},
        "money": {"orders": rev.money.orders, "paid_fen": rev.money.paid_fen,
                  "refunds": rev.money.refunds, "refunded_fen": rev.money.refunded_fen,
                  "net_fen": rev.money.net_fen},
        "spent": {"issues": rev.spent_on_issues, "passes": rev.spent_on_passes,
                  "gifts": rev.spent_on_gifts, "total": rev.tokens_spent},
        "net": rev.net,
        "opening": rev.opening,
        "outstanding": rev.outstanding,
        "codes": [{"batch": b.batch_id or None, "label": b.label, "kind": b.kind or None,
                   "grants_tokens": b.grants_tokens, "issue": b.issue_number,
                   "pass": b.pass_id, "redemptions": b.redemptions, "tokens": b.tokens}
                  for b in rev.codes],
        "issues": [{"issue": s.issue_number, "redemptions": s.count, "tokens": s.tokens}
                   for s in rev.issues],
        "passes": [{"pass": s.pass_id, "purchases": s.count, "tokens": s.tokens}
                   for s in rev.passes],
        "gifts": [{"issue": g.issue_number, "pass": g.pass_id, "bought": g.bought,
                   "redeemed": g.redeemed, "tokens": g.tokens} for g in rev.gifts],
        "refunds": [{"issue": r.issue_number, "pass": r.pass_id, "count": r.count,
                     "tokens": r.tokens} for r in rev.refunds],
    }
