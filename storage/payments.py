"""WeChat Pay orders and their settlement: the only code that writes ``pay_order``.

An order is written (``creating``) with the exact request body before WeChat is called, so a
retry resends the same bytes and a create call that timed out leaves a row the sync job can
query. Settling is exactly-once by construction: one conditional UPDATE claims the order
(``… SET status = 'paid' WHERE status IN (unsettled)``), and only the transaction whose UPDATE
changed the row credits it. Two identical notifications at two servers at the same moment:
on PostgreSQL the second UPDATE waits for the first transaction's row lock and then finds the
order paid; SQLite runs writers one at a time. The ledger key ``pay:<out_trade_no>`` backs the
claim up: even a second claim could not credit twice.

Everything of one settlement — the claim, the credit, the order's new fields and, for
buy-and-unlock, the unlock — happens in the caller's one transaction.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal, Protocol
from zoneinfo import ZoneInfo

from sqlalchemy import Table, text
from sqlalchemy import select as sa_select
from sqlalchemy import update as sa_update
from sqlmodel import Session, col, select

from storage import events, ledger
from storage.errors import DomainError, InsufficientBalance, UnknownSubscriber
from storage.models import Issue, PayOrder, PayRefund, utcnow
from storage.subscribers import ensure_subscriber, lock_subscriber

_ORDER: Table = PayOrder.__table__  # type: ignore[attr-defined]
_ISSUE: Table = Issue.__table__  # type: ignore[attr-defined]

OrderKind = Literal["jsapi", "native"]
OrderStatus = Literal["creating", "pending", "paid", "closed", "failed", "refunded"]
ORDER_STATUSES: Final[tuple[str, ...]] = ("creating", "pending", "paid", "closed", "failed",
                                          "refunded")
# WeChat may still take the money for these: a notification or a query saying SUCCESS
# settles them (a "closed" or "failed" one too: the payer was charged, so they get the tokens).
UNSETTLED: Final[tuple[str, ...]] = ("creating", "pending", "failed", "closed")
SETTLED: Final[tuple[str, ...]] = ("paid", "refunded")
OUT_TRADE_NO_RE: Final = re.compile(r"[A-Za-z0-9_-]{6,32}")
CURRENCY: Final = "CNY"
DESCRIPTION_MAX_BYTES: Final = 127  # WeChat's limit on description
# WeChat writes times with China's offset; an order's time_expire is sent the same way.
CHINA: Final = ZoneInfo("Asia/Shanghai")


def credit_key(out_trade_no: str) -> str:
    return f"pay:{out_trade_no}"


def unlock_key(out_trade_no: str) -> str:
    return f"pay:{out_trade_no}:unlock"


def yuan(fen: int) -> str:
    """990 → "9.90"."""
    return f"{fen // 100}.{fen % 100:02d}"


class PaymentError(DomainError):
    """A refused payment step; ``reason`` is short and safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownOrder(PaymentError):
    def __init__(self, out_trade_no: str) -> None:
        super().__init__(f"no order {out_trade_no[:40]!r}")
        self.out_trade_no = out_trade_no


class PaymentMismatch(PaymentError):
    """What WeChat reports about the order is not what we ordered (amount, merchant, app,
    payer…): never credited, whoever signed it."""


class PackageLike(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def tokens(self) -> int: ...

    @property
    def price_fen(self) -> int: ...


class TransactionLike(Protocol):
    """What settle reads of a WeChat Pay transaction (bot.pay.client.Transaction has it)."""

    @property
    def out_trade_no(self) -> str: ...

    @property
    def trade_state(self) -> str: ...

    @property
    def appid(self) -> str: ...

    @property
    def mchid(self) -> str: ...

    @property
    def transaction_id(self) -> str | None: ...

    @property
    def total_fen(self) -> int | None: ...

    @property
    def currency(self) -> str | None: ...

    @property
    def payer_openid(self) -> str | None: ...


def new_out_trade_no(now: datetime | None = None) -> str:
    """"NB" + UTC time to the second + 12 random hex digits: 28 characters, sortable by age."""
    at = (now or utcnow()).astimezone(CHINA)
    return f"NB{at:%Y%m%d%H%M%S}{secrets.token_hex(6).upper()}"


def _package_fields(package: PackageLike | tuple[str, int, int]) -> tuple[str, int, int]:
    if isinstance(package, tuple):
        package_id, tokens, price_fen = package
    else:
        package_id, tokens, price_fen = package.id, package.tokens, package.price_fen
    if tokens <= 0 or price_fen <= 0:
        raise PaymentError(f"package {package_id!r} must have positive tokens and price")
    return package_id, int(tokens), int(price_fen)


def _truncate_bytes(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def request_body(*, kind: str, app_id: str, mch_id: str, description: str, out_trade_no: str,
                 notify_url: str, time_expire: datetime, amount_fen: int,
                 openid: str) -> dict[str, Any]:
    """The create-order body, keys in the order bot.pay.client writes them."""
    body: dict[str, Any] = {
        "appid": app_id, "mchid": mch_id, "description": description,
        "out_trade_no": out_trade_no, "notify_url": notify_url,
        "time_expire": time_expire.astimezone(CHINA).isoformat(timespec="seconds"),
        "amount": {"total": amount_fen, "currency": CURRENCY},
    }
    if kind == "jsapi":
        body["payer"] = {"openid": openid}
    return body


def dump_body(body: dict[str, Any]) -> str:
    """Compact JSON, as bot.pay.client serialises a request: the same text, the same bytes."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def new_order(
    session: Session,
    *,
    openid: str,
    package: PackageLike | tuple[str, int, int],
    kind: str,
    issue_number: int | None = None,
    app_id: str,
    mch_id: str,
    notify_url: str,
    ttl: timedelta,
    now: datetime | None = None,
    description: str | None = None,
    out_trade_no: str | None = None,
) -> PayOrder:
    """Record a new order (status ``creating``) with the exact body to send to WeChat; the
    caller commits it, then calls WeChat with ``order.request_json``, then ``mark_created``
    or ``mark_failed``."""
    if kind not in ("jsapi", "native"):
        raise PaymentError(f"order kind must be jsapi or native, not {kind!r}")
    if ttl <= timedelta(0):
        raise PaymentError("an order's ttl must be positive")
    package_id, tokens, price_fen = _package_fields(package)
    at = now or utcnow()
    no = out_trade_no or new_out_trade_no(at)
    if not OUT_TRADE_NO_RE.fullmatch(no):
        raise PaymentError(f"out_trade_no {no[:40]!r} must be 6–32 of [A-Za-z0-9_-]")
    # WeChat compares time_expire to the second; stored to the second too.
    expires = (at + ttl).replace(microsecond=0)
    text = _truncate_bytes(description or f"{tokens} tokens ({package_id})",
                           DESCRIPTION_MAX_BYTES)
    body = request_body(kind=kind, app_id=app_id, mch_id=mch_id, description=text,
                        out_trade_no=no, notify_url=notify_url, time_expire=expires,
                        amount_fen=price_fen, openid=openid)
    order = PayOrder(
        out_trade_no=no, openid=openid, package_id=package_id, tokens=tokens,
        amount_fen=price_fen, issue_number=issue_number, kind=kind, status="creating",
        mch_id=mch_id, app_id=app_id, description=text, request_json=dump_body(body),
        created_at=at, expires_at=expires)
    session.add(order)
    session.flush()
    return order


def get_order(session: Session, *, out_trade_no: str) -> PayOrder | None:
    if session.autoflush:
        session.flush()
    return session.get(PayOrder, out_trade_no, populate_existing=True)


def require_order(session: Session, *, out_trade_no: str) -> PayOrder:
    order = get_order(session, out_trade_no=out_trade_no)
    if order is None:
        raise UnknownOrder(out_trade_no)
    return order


def order_state_for(session: Session, *, out_trade_no: str, openid: str) -> PayOrder | None:
    """The order if it is this subscriber's, else None (a forwarded link sees nothing)."""
    order = get_order(session, out_trade_no=out_trade_no)
    return order if order is not None and order.openid == openid else None


def _set(session: Session, out_trade_no: str, *, where_status: Sequence[str] | None,
         **values: Any) -> bool:
    """One conditional UPDATE of an order; True when it changed the row."""
    stmt = sa_update(_ORDER).where(_ORDER.c.out_trade_no == out_trade_no)
    if where_status is not None:
        stmt = stmt.where(_ORDER.c.status.in_(list(where_status)))
    if session.autoflush:
        session.flush()
    row = session.connection().execute(
        stmt.values(**values).returning(_ORDER.c.out_trade_no)).first()
    return row is not None


def mark_created(session: Session, *, out_trade_no: str, prepay_id: str | None = None,
                 code_url: str | None = None, now: datetime | None = None) -> PayOrder:
    """WeChat accepted the order: creating (or failed, after a retry) → pending. An order
    settled in the meantime keeps its status and only gains the ids."""
    require_order(session, out_trade_no=out_trade_no)
    ids: dict[str, Any] = {}
    if prepay_id is not None:
        ids["prepay_id"] = prepay_id
    if code_url is not None:
        ids["code_url"] = code_url
    if not _set(session, out_trade_no, where_status=("creating", "failed"), status="pending",
                error=None, **ids) and ids:
        _set(session, out_trade_no, where_status=None, **ids)
    return require_order(session, out_trade_no=out_trade_no)


def mark_failed(session: Session, *, out_trade_no: str, error: str) -> PayOrder:
    """WeChat refused to create the order (a definite answer, not a timeout): creating →
    failed. Leave an order whose create call may have reached WeChat in ``creating``; the
    sync job queries it."""
    require_order(session, out_trade_no=out_trade_no)
    _set(session, out_trade_no, where_status=("creating",), status="failed",
         error=error[:500])
    return require_order(session, out_trade_no=out_trade_no)


def mark_pending(session: Session, *, out_trade_no: str) -> bool:
    """A ``creating`` order WeChat turns out to know (its create call timed out after
    reaching WeChat): now pending like any other."""
    return _set(session, out_trade_no, where_status=("creating",), status="pending")


def mark_closed(session: Session, *, out_trade_no: str, now: datetime | None = None,
                error: str | None = None) -> bool:
    """An order that can no longer be paid (closed at WeChat, or never made there)."""
    values: dict[str, Any] = {"status": "closed", "closed_at": now or utcnow()}
    if error is not None:
        values["error"] = error[:500]
    return _set(session, out_trade_no, where_status=("creating", "pending", "failed"),
                **values)


def claim_query(session: Session, *, out_trade_no: str, now: datetime,
                min_interval: timedelta) -> bool:
    """Take the turn to ask WeChat about a waiting order: False when another process asked
    less than ``min_interval`` ago (every scheduler may run the sync job)."""
    stmt = (sa_update(_ORDER)
            .where(_ORDER.c.out_trade_no == out_trade_no,
                   _ORDER.c.status.in_(["creating", "pending"]),
                   _ORDER.c.last_query_at.is_(None)
                   | (_ORDER.c.last_query_at <= now - min_interval))
            .values(last_query_at=now).returning(_ORDER.c.out_trade_no))
    return session.connection().execute(stmt).first() is not None


def list_orders(session: Session, *, status: str | None = None, openid: str | None = None,
                limit: int = 100) -> list[PayOrder]:
    """Newest first."""
    stmt = select(PayOrder)
    if status is not None:
        stmt = stmt.where(PayOrder.status == status)
    if openid is not None:
        stmt = stmt.where(PayOrder.openid == openid)
    return list(session.exec(stmt.order_by(col(PayOrder.created_at).desc(),
                                           col(PayOrder.out_trade_no).desc())
                             .limit(limit)).all())


def due_for_query(session: Session, *, now: datetime, older_than: timedelta,
                  limit: int = 200) -> list[str]:
    """Orders still waiting (creating or pending) made before ``now - older_than``, oldest
    first: what the sync job asks WeChat about."""
    rows = session.connection().execute(
        sa_select(_ORDER.c.out_trade_no)
        .where(_ORDER.c.status.in_(["creating", "pending"]),
               _ORDER.c.created_at <= now - older_than)
        .order_by(_ORDER.c.created_at, _ORDER.c.out_trade_no).limit(limit)).all()
    return [str(no) for (no,) in rows]


# -- settling ------------------------------------------------------------------------------

UnlockOutcome = Literal["unlocked", "already", "pass", "free", "short", "no_issue"]


@dataclass(frozen=True)
class Settlement:
    order: PayOrder
    # credited: this call credited it · already: settled before (a duplicate; nothing
    # written) · not_paid: WeChat says it is not paid (nothing written)
    outcome: Literal["credited", "already", "not_paid"]
    tokens: int = 0  # credited by this call
    balance: int | None = None  # the subscriber's, after this call's writes
    unlock: UnlockOutcome | None = None  # buy-and-unlock orders credited by this call

    @property
    def credited(self) -> bool:
        return self.outcome == "credited"


def check_transaction(order: PayOrder, tx: TransactionLike) -> None:
    """Raise PaymentMismatch unless the transaction is for exactly this order."""
    if tx.out_trade_no and tx.out_trade_no != order.out_trade_no:
        raise PaymentMismatch(f"out_trade_no {tx.out_trade_no[:40]!r} is not the order's")
    if tx.mchid != order.mch_id:
        raise PaymentMismatch(f"mchid {tx.mchid[:32]!r} is not ours ({order.mch_id})")
    if tx.appid != order.app_id:
        raise PaymentMismatch(f"appid {tx.appid[:64]!r} is not ours ({order.app_id})")
    if tx.trade_state != "SUCCESS":
        return  # nothing is credited; amounts of an unpaid order are not ours to judge
    if tx.total_fen != order.amount_fen:
        raise PaymentMismatch(f"amount {tx.total_fen} fen is not the order's "
                              f"{order.amount_fen} fen")
    if (tx.currency or CURRENCY) != CURRENCY:
        raise PaymentMismatch(f"currency {str(tx.currency)[:8]!r} is not {CURRENCY}")
    # A JSAPI order names its payer and WeChat refuses anyone else; a payer who differs
    # means the report is not about our order. A Native QR may be scanned by anyone: the
    # tokens still go to the subscriber who ordered.
    if order.kind == "jsapi" and tx.payer_openid != order.openid:
        raise PaymentMismatch("payer openid is not the one who ordered")


def _read_order(session: Session, out_trade_no: str) -> PayOrder:
    """The order as a plain object outside the session: one Core SELECT, no ORM identity
    bookkeeping (settle is the notify endpoint's hot path; docs/benchmarks.md §6)."""
    row = session.connection().execute(
        sa_select(_ORDER).where(_ORDER.c.out_trade_no == out_trade_no)).first()
    if row is None:
        raise UnknownOrder(out_trade_no)
    return PayOrder(**row._mapping)


def settle(session: Session, *, out_trade_no: str, transaction: TransactionLike,
           now: datetime | None = None) -> Settlement:
    """Credit a paid order exactly once, in the caller's transaction (see the module doc).

    Raises UnknownOrder, or PaymentMismatch when the transaction is not this order's (nothing
    written). A transaction that is not SUCCESS writes nothing and returns ``not_paid``.
    ``Settlement.order`` is a snapshot, not attached to the session."""
    if session.autoflush:
        session.flush()
    order = _read_order(session, out_trade_no)
    check_transaction(order, transaction)
    if transaction.trade_state != "SUCCESS":
        return Settlement(order, "not_paid")
    if order.status in SETTLED:  # a duplicate: committed as settled, nothing to claim
        return Settlement(order, "already")
    at = now or utcnow()
    paid = {"status": "paid", "paid_at": at, "transaction_id": transaction.transaction_id,
            "payer_openid": transaction.payer_openid, "error": None}
    if session.connection().dialect.name == "postgresql":
        claimed = _pg_claim_and_credit(session, order, paid, at)
        if claimed is None:
            return Settlement(_read_order(session, out_trade_no), "already")
        entry_id, balance = claimed
    else:
        if not _set(session, out_trade_no, where_status=UNSETTLED, **paid):
            return Settlement(_read_order(session, out_trade_no), "already")
        credit = _credit(session, order, at)
        if credit.replayed:  # claimed twice? the ledger key still credits once
            return Settlement(_read_order(session, out_trade_no), "already")
        _record_topup(session, order, at)
        assert credit.entry.id is not None
        entry_id, balance = credit.entry.id, credit.balance
        _set(session, out_trade_no, where_status=None, credit_entry_id=entry_id)
    unlock: UnlockOutcome | None = None
    unlock_entry: int | None = None
    if order.issue_number is not None:
        unlock, unlock_entry, balance = _unlock(session, order, balance)
    if order.issue_number is not None:
        _set(session, out_trade_no, where_status=None, unlock_entry_id=unlock_entry,
             unlock_note=unlock)
    done = {"credit_entry_id": entry_id, "unlock_entry_id": unlock_entry, "unlock_note": unlock}
    for name, value in (paid | done).items():
        setattr(order, name, value)
    return Settlement(order, "credited", tokens=order.tokens, balance=balance, unlock=unlock)


# PostgreSQL: the claim, the balance and the ledger entry in ONE statement (the notify
# endpoint's hot path; docs/benchmarks.md §6). The claim draws the entry's id from the
# ledger's sequence so the order points at its credit without a second UPDATE of the row. The
# balance moves only if the claim changed the order, and the entry hangs off the balance
# update, so balance_after is the balance under the row lock; the top-up's event
# (storage.events) hangs off the entry. If the subscriber row is missing, the claim returns
# but nothing else does and the caller falls back.
_PG_SETTLE = text("""
WITH claim AS (
    UPDATE pay_order SET status = 'paid', paid_at = :paid_at, transaction_id = :transaction_id,
           payer_openid = :payer_openid, error = NULL,
           credit_entry_id = nextval(pg_get_serial_sequence('ledger_entry', 'id'))
    WHERE out_trade_no = :no AND status IN ('creating', 'pending', 'failed', 'closed')
    RETURNING openid, tokens, credit_entry_id
), moved AS (
    UPDATE subscriber SET balance = subscriber.balance + claim.tokens
    FROM claim WHERE subscriber.openid = claim.openid
    RETURNING subscriber.balance
), entry AS (
    INSERT INTO ledger_entry (id, openid, amount, kind, idempotency_key, reason,
                              balance_after, created_at)
    SELECT claim.credit_entry_id, claim.openid, claim.tokens, 'pay', :key, :reason,
           moved.balance, :paid_at
    FROM claim, moved
    RETURNING id, balance_after
), topup_event AS (
    INSERT INTO event (at, kind, openid, detail, amount)
    SELECT :paid_at, 'topup', claim.openid, 'pay', claim.tokens FROM claim, entry
)
SELECT claim.credit_entry_id AS claimed, entry.id AS entry_id, entry.balance_after
FROM claim LEFT JOIN entry ON true
""")


def _pg_claim_and_credit(session: Session, order: PayOrder, paid: dict[str, Any],
                         at: datetime) -> tuple[int, int] | None:
    """(entry id, balance) when this call claimed and credited the order; None when it was
    settled already."""
    row = session.connection().execute(_PG_SETTLE, {
        "no": order.out_trade_no, "paid_at": at, "transaction_id": paid["transaction_id"],
        "payer_openid": paid["payer_openid"], "key": credit_key(order.out_trade_no),
        "reason": f"WeChat Pay {order.out_trade_no} ¥{yuan(order.amount_fen)}"}).first()
    if row is None:
        return None
    if row.entry_id is not None:
        return int(row.entry_id), int(row.balance_after)
    # Claimed, but no subscriber row to credit: make it, credit the ordinary way.
    credit = _credit(session, order, at)
    if credit.replayed:
        raise RuntimeError(f"order {order.out_trade_no} claimed but already credited")
    _record_topup(session, order, at)
    _set(session, order.out_trade_no, where_status=None, credit_entry_id=credit.entry.id)
    assert credit.entry.id is not None
    return credit.entry.id, credit.balance


def _record_topup(session: Session, order: PayOrder, at: datetime) -> None:
    events.record(session, events.TOPUP, openid=order.openid, at=at, detail="pay",
                  amount=order.tokens)


def _credit(session: Session, order: PayOrder, at: datetime) -> ledger.LedgerResult:
    def post() -> ledger.LedgerResult:
        return ledger.post(session, openid=order.openid, amount=order.tokens, kind="pay",
                           key=credit_key(order.out_trade_no),
                           reason=f"WeChat Pay {order.out_trade_no} ¥{yuan(order.amount_fen)}")

    try:
        return post()
    except UnknownSubscriber:  # paid by someone we have no row for (yet): the money counts
        ensure_subscriber(session, openid=order.openid, at=at)
        return post()


def _unlock(session: Session, order: PayOrder,
            balance: int) -> tuple[UnlockOutcome, int | None, int]:
    """Buy-and-unlock: spend the new tokens on the issue if they (still) cover it. Never
    undoes the credit: short of tokens, already unlocked or pass-covered, the credit stays."""
    assert order.issue_number is not None
    issue = session.connection().execute(
        sa_select(_ISSUE.c.price, _ISSUE.c.published_at)
        .where(_ISSUE.c.number == order.issue_number)).first()
    if issue is None or issue.published_at is None or issue.published_at > utcnow():
        return "no_issue", None, balance
    price = issue.price
    try:
        result = ledger.redeem(session, openid=order.openid, issue_number=order.issue_number,
                               price=int(price), key=unlock_key(order.out_trade_no))
    except InsufficientBalance:
        return "short", None, balance
    entry_id = result.entry.id if result.entry is not None else None
    return result.status, entry_id, result.balance


# -- refunds -------------------------------------------------------------------------------

RefundStatus = Literal["requested", "processing", "success", "abnormal", "closed", "refused"]
# What WeChat reports, as our status.
WECHAT_REFUND_STATUS: Final[dict[str, RefundStatus]] = {
    "PROCESSING": "processing", "SUCCESS": "success", "ABNORMAL": "abnormal",
    "CLOSED": "closed"}
REFUND_OPEN: Final[tuple[str, ...]] = ("requested", "processing")
RefundRefusal = Literal["not_paid", "nothing_left", "too_much", "spent", "no_reason",
                        "unsent"]


class RefundRefused(PaymentError):
    """A refund that cannot be made; nothing was written. ``why`` is for the CLI's words."""

    def __init__(self, message: str, *, why: RefundRefusal, balance: int | None = None,
                 tokens: int | None = None) -> None:
        super().__init__(message)
        self.why = why
        self.balance = balance
        self.tokens = tokens


class UnknownRefund(PaymentError):
    def __init__(self, out_refund_no: str) -> None:
        super().__init__(f"no refund {out_refund_no[:64]!r}")
        self.out_refund_no = out_refund_no


def refund_key(out_refund_no: str) -> str:
    return f"pay-refund:{out_refund_no}"


def _tokens_for(order: PayOrder, refunded_fen: int) -> int:
    """Tokens that refunding ``refunded_fen`` of the order takes back, in proportion (whole
    tokens, rounded down; refunding everything takes back exactly what was credited)."""
    return order.tokens * refunded_fen // order.amount_fen


def _lock_order(session: Session, out_trade_no: str) -> PayOrder:
    if session.autoflush:
        session.flush()
    order = session.exec(select(PayOrder).where(PayOrder.out_trade_no == out_trade_no)
                         .with_for_update().execution_options(populate_existing=True)).first()
    if order is None:
        raise UnknownOrder(out_trade_no)
    return order


def list_refunds(session: Session, *, out_trade_no: str | None = None,
                 status: Sequence[str] | None = None) -> list[PayRefund]:
    stmt = select(PayRefund)
    if out_trade_no is not None:
        stmt = stmt.where(PayRefund.out_trade_no == out_trade_no)
    if status is not None:
        stmt = stmt.where(col(PayRefund.status).in_(list(status)))
    return list(session.exec(stmt.order_by(col(PayRefund.created_at),
                                           col(PayRefund.out_refund_no))).all())


def get_refund(session: Session, *, out_refund_no: str) -> PayRefund | None:
    if session.autoflush:
        session.flush()
    return session.get(PayRefund, out_refund_no, populate_existing=True)


def request_refund(session: Session, *, out_trade_no: str, amount_fen: int | None,
                   reason: str, force: bool = False, operator: str | None = None,
                   now: datetime | None = None) -> PayRefund:
    """Record a refund and debit its tokens, in the caller's transaction, BEFORE WeChat is
    asked (then ``note_refund``). Refused, writing nothing, when the subscriber has already
    spent the tokens, unless ``force``: then what is left is debited. Runs under the order's
    and the subscriber's row locks, so two refunds of one order are decided one at a time."""
    if not reason.strip():
        raise RefundRefused("a reason is required", why="no_reason")
    at = now or utcnow()
    order = _lock_order(session, out_trade_no)
    if order.status not in SETTLED or order.credit_entry_id is None:
        raise RefundRefused(f"order {out_trade_no} is {order.status}, not paid: nothing to "
                            "refund", why="not_paid")
    unsent = list_refunds(session, out_trade_no=out_trade_no, status=("requested",))
    if unsent:
        # Asked again while the first request still waits to be sent: a second refund would
        # return the money twice. The sync resends the first with its own out_refund_no.
        raise RefundRefused(f"refund {unsent[0].out_refund_no} of order {out_trade_no} has not "
                            "reached WeChat Pay yet: run `newsbot pay sync` to send it",
                            why="unsent")
    left = order.amount_fen - order.refunded_fen
    if left <= 0:
        raise RefundRefused(f"order {out_trade_no} is refunded in full already",
                            why="nothing_left")
    amount = left if amount_fen is None else amount_fen
    if not 1 <= amount <= left:
        raise RefundRefused(f"refund {amount} fen is not between 1 and the {left} fen left "
                            f"of order {out_trade_no}", why="too_much")
    due = _tokens_for(order, order.refunded_fen + amount) - _tokens_for(order,
                                                                      order.refunded_fen)
    balance = lock_subscriber(session, openid=order.openid)
    tokens = due
    if balance < due:
        if not force:
            raise RefundRefused(
                f"{order.openid} has {balance} of the {due} tokens this refund takes back "
                "(spent since): refused; --force refunds anyway and debits what is left",
                why="spent", balance=balance, tokens=due)
        tokens = balance
    seq = len(list_refunds(session, out_trade_no=out_trade_no)) + 1
    no = f"{out_trade_no}R{seq}"
    entry_id: int | None = None
    if tokens > 0:
        entry_id = ledger.post(
            session, openid=order.openid, amount=-tokens, kind="pay_refund",
            key=refund_key(no), refers_to=order.credit_entry_id,
            reason=f"WeChat Pay refund {no} ¥{yuan(amount)}: {reason.strip()}"[:500],
            operator=operator).entry.id
    refund = PayRefund(out_refund_no=no, out_trade_no=out_trade_no, amount_fen=amount,
                       tokens=tokens, status="requested", debit_entry_id=entry_id,
                       reason=reason.strip()[:80], forced=force and tokens < due,
                       operator=operator, created_at=at)
    session.add(refund)
    refunded = order.refunded_fen + amount
    _set(session, out_trade_no, where_status=None, refunded_fen=refunded,
         status="refunded" if refunded == order.amount_fen else order.status)
    session.flush()
    return refund


def note_refund(session: Session, *, out_refund_no: str, status: str,
                refund_id: str | None = None, error: str | None = None,
                now: datetime | None = None) -> PayRefund:
    """What WeChat said about a refund (its answer, a query or a REFUND.* notification):
    PROCESSING / SUCCESS / ABNORMAL / CLOSED, or ``refused`` (a definite no to the request).
    A refund that gives no money back (refused, closed) gives the tokens back too, once.
    A final status is never changed again."""
    at = now or utcnow()
    if session.autoflush:
        session.flush()
    refund = session.exec(select(PayRefund).where(PayRefund.out_refund_no == out_refund_no)
                          .with_for_update().execution_options(populate_existing=True)
                          ).first()
    if refund is None:
        raise UnknownRefund(out_refund_no)
    new = status if status == "refused" else WECHAT_REFUND_STATUS.get(status)
    if new is None:
        raise PaymentError(f"unknown refund status {status[:20]!r}")
    if refund.status not in REFUND_OPEN and refund.status != "abnormal":
        return refund  # final already: a duplicate notification or a late answer
    if new in ("refused", "closed"):
        _give_back(session, refund, at)
    refund.status = new
    refund.refund_id = refund_id or refund.refund_id
    if error is not None:
        refund.error = error[:500]
    if new not in REFUND_OPEN:
        refund.finished_at = at
    session.add(refund)
    session.flush()
    return refund


def _give_back(session: Session, refund: PayRefund, at: datetime) -> None:
    """The money was not returned: undo the refund's debit and its share of the order."""
    order = _lock_order(session, refund.out_trade_no)
    if refund.tokens > 0 and refund.debit_entry_id is not None:
        ledger.post(session, openid=order.openid, amount=refund.tokens, kind="pay_refund",
                    key=refund_key(refund.out_refund_no) + ":undone",
                    refers_to=refund.debit_entry_id,
                    reason=f"WeChat Pay refund {refund.out_refund_no} did not go through")
    _set(session, order.out_trade_no, where_status=None,
         refunded_fen=order.refunded_fen - refund.amount_fen, status="paid")
