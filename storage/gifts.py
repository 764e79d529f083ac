"""Gifts (赠送): a subscriber pays for an issue or a pass with their own tokens and gets a
single-use code to forward; whoever redeems it first (storage.codes.redeem_code) gets it.

The debit and the one-code batch are written in the same transaction. The gift's code is not
random but derived from the secret and the debit's idempotency key (``derived_code``), which
buys two things: a retried delivery gets the very same code back, and the giver's 余额 can
show an unredeemed code again. The price: whoever holds both the ``[codes] secret`` and the
database can recompute unredeemed gift codes (random codes they could only guess). A dump
alone still gives nothing away, as only digests are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from storage import ledger
from storage.codes import InvalidBatch, create_batch, derived_code, digest, display
from storage.models import CodeBatch, CodeRedemption, LedgerEntry, RedemptionCode, utcnow
from storage.subscribers import lock_subscriber

_CODE: Table = RedemptionCode.__table__  # type: ignore[attr-defined]
_USE: Table = CodeRedemption.__table__  # type: ignore[attr-defined]
_ENTRY: Table = LedgerEntry.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Gift:
    code: str  # display form
    batch: CodeBatch
    entry: LedgerEntry  # the giver's debit
    balance: int  # the giver's, after paying
    replayed: bool  # the key had bought this gift before; nothing new was written


def _gift_code(secret: bytes, key: str) -> str:
    return derived_code(secret, "gift:" + key)


def buy_gift(
    session: Session,
    *,
    giver: str,
    secret: bytes,
    key: str,
    issue_number: int | None = None,
    issue_price: int | None = None,
    pass_id: str | None = None,
    pass_days: int | None = None,
    pass_price: int | None = None,
    now: datetime | None = None,
) -> Gift:
    """Debit the giver and make the gift's code. Raises InsufficientBalance (nothing written),
    InvalidBatch for a free issue, a missing price or codes off; ``key`` used before for this
    very gift returns it again (``replayed``)."""
    now = now or utcnow()
    if not secret:
        raise InvalidBatch("codes are off: set [codes] secret", field="secret")
    if (issue_number is None) == (pass_id is None):
        raise InvalidBatch("a gift is either an issue or a pass", field="kind")
    price = issue_price if issue_number is not None else pass_price
    if price is None or price <= 0:
        raise InvalidBatch(f"a gift needs a positive price, got {price}", field="price")
    lock_subscriber(session, openid=giver)
    # The reason is shown to the giver in 余额 (handlers.format.ledger_line).
    what = f"第{issue_number}期" if issue_number is not None else f"会员卡 {pass_id}"
    paid = ledger.post(session, openid=giver, amount=-price, kind="gift", key=key,
                       reason=f"礼物：{what}", issue_number=issue_number, pass_id=pass_id)
    code = _gift_code(secret, key)
    if paid.replayed:
        batch = session.exec(select(CodeBatch).where(
            CodeBatch.gift_entry_id == paid.entry.id)).first()
        if batch is None:  # written together with the debit, so never apart from it
            raise RuntimeError(f"gift entry #{paid.entry.id} has no code batch")
        return Gift(display(code), batch, paid.entry, paid.balance, replayed=True)
    made = create_batch(
        session, secret=secret, kind="issue" if issue_number is not None else "pass", count=1,
        uses=1, issue_number=issue_number, pass_id=pass_id, pass_days=pass_days,
        giver=giver, gift_entry_id=paid.entry.id, created_by=giver, now=now, codes=[code],
        label=f"礼物：{what}")
    return Gift(made.codes[0], made.batch, paid.entry, paid.balance, replayed=False)


@dataclass(frozen=True)
class GiftStatus:
    batch: CodeBatch
    bought_at: datetime
    redeemed_at: datetime | None
    revoked: bool
    code: str | None  # display form, while it can still be redeemed


def given(session: Session, *, giver: str, secret: bytes, limit: int = 5) -> list[GiftStatus]:
    """The giver's latest gifts, newest first, each redeemed or not. The code is shown again
    only while unredeemed and only if the current secret still makes it (a rotated secret
    would otherwise show a code that no longer works)."""
    batches = list(session.exec(
        select(CodeBatch).where(CodeBatch.giver == giver)
        .order_by(col(CodeBatch.id).desc()).limit(limit)).all())
    if not batches:
        return []
    ids = [b.id for b in batches]
    conn = session.connection()
    codes = {int(r.batch_id): r for r in conn.execute(
        sa_select(_CODE.c.batch_id, _CODE.c.digest, _CODE.c.used, _CODE.c.revoked_at)
        .where(_CODE.c.batch_id.in_(ids))).all()}
    redeemed: dict[int, Any] = {int(r.batch_id): r.created_at for r in conn.execute(
        sa_select(_USE.c.batch_id, _USE.c.created_at).where(_USE.c.batch_id.in_(ids))).all()}
    keys = {int(r.id): str(r.idempotency_key) for r in conn.execute(
        sa_select(_ENTRY.c.id, _ENTRY.c.idempotency_key)
        .where(_ENTRY.c.id.in_([b.gift_entry_id for b in batches]))).all()}
    out = []
    for b in batches:
        assert b.id is not None
        row = codes.get(b.id)
        revoked = b.revoked_at is not None or (row is not None and row.revoked_at is not None)
        at = redeemed.get(b.id)
        code: str | None = None
        key = keys.get(b.gift_entry_id) if b.gift_entry_id is not None else None
        if at is None and not revoked and row is not None and key is not None and secret:
            candidate = _gift_code(secret, key)
            if digest(secret, candidate) == row.digest:
                code = display(candidate)
        out.append(GiftStatus(b, b.created_at, at, revoked, code))
    return out
