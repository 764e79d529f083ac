"""Orders without a notification: ask WeChat Pay, then settle or close them.

A notification may never come (WeChat gives up after ~24 h; a firewall, a deploy…), and a
create call that timed out leaves an order in ``creating`` that WeChat may or may not have.
Every minute the scheduler asks WeChat about orders waiting longer than ``MIN_AGE``:
SUCCESS settles them exactly as a notification would (storage.payments.settle, the same
claim and ledger key, so a notification arriving at the same moment cannot credit twice);
past their time_expire and still unpaid they are closed at WeChat and here. Refunds still
open are asked again too (a request that never got an answer is resent with the same
out_refund_no). ``newsbot pay sync`` runs the same with no minimum age."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, Literal

from sqlalchemy import Engine
from sqlmodel import Session

from bot.pay.client import PayApiError, PayClient, PayError, Transaction
from bot.settings import Settings
from storage import payments
from storage.db import run_in_transaction, transaction
from storage.models import utcnow

log = logging.getLogger("newsbot.pay")

MIN_AGE: Final = timedelta(minutes=3)
# Two schedulers (two servers) ask about one order at most once in this long.
QUERY_INTERVAL: Final = timedelta(seconds=50)
NOT_AT_WECHAT: Final = frozenset({"ORDER_NOT_EXIST", "ORDERNOTEXIST", "RESOURCE_NOT_EXISTS"})
UNPAID: Final = frozenset({"NOTPAY", "USERPAYING"})
ENDED: Final = frozenset({"CLOSED", "REVOKED", "PAYERROR"})

Outcome = Literal["credited", "already", "closed", "pending", "skipped", "error"]


@dataclass(frozen=True)
class Synced:
    out_trade_no: str
    outcome: Outcome
    detail: str = ""
    tokens: int = 0


@dataclass
class SyncReport:
    orders: list[Synced] = field(default_factory=list)
    refunds: dict[str, str] = field(default_factory=dict)  # out_refund_no → status or error

    def count(self, outcome: Outcome) -> int:
        return sum(1 for s in self.orders if s.outcome == outcome)

    @property
    def errors(self) -> int:
        return self.count("error") + sum(1 for v in self.refunds.values()
                                         if v.startswith("error"))


def sync_orders(engine: Engine, client: PayClient, *, now: datetime | None = None,
                min_age: timedelta = MIN_AGE, min_interval: timedelta = QUERY_INTERVAL,
                limit: int = 200, notify_url: str | None = None) -> SyncReport:
    at = now or utcnow()
    report = SyncReport()
    with transaction(engine) as s:
        due = payments.due_for_query(s, now=at, older_than=min_age, limit=limit)
    for no in due:
        report.orders.append(_sync_one(engine, client, no, at, min_interval))
    report.refunds = sync_refunds(engine, client, notify_url=notify_url, now=at)
    return report


def _sync_one(engine: Engine, client: PayClient, no: str, at: datetime,
              min_interval: timedelta) -> Synced:
    def claim(s: Session) -> bool:
        return payments.claim_query(s, out_trade_no=no, now=at, min_interval=min_interval)

    if not run_in_transaction(engine, claim):
        return Synced(no, "skipped", "asked recently")
    try:
        tx = client.query_order(no)
    except PayApiError as exc:
        if exc.code in NOT_AT_WECHAT and exc.verified:
            return _never_made(engine, no, at)
        return _error(no, exc)
    except PayError as exc:  # network, 5xx, an answer that did not verify: next time
        return _error(no, exc)
    if tx.trade_state == "SUCCESS":
        return _settle(engine, no, tx, at)
    if tx.trade_state in ENDED:
        run_in_transaction(engine, lambda s: payments.mark_closed(
            s, out_trade_no=no, now=at, error=f"WeChat Pay: {tx.trade_state}"))
        return Synced(no, "closed", tx.trade_state)
    if tx.trade_state in UNPAID:
        return _unpaid(engine, client, no, at)
    log.warning("pay order %s: WeChat Pay says %s; left for a person to look at", no,
                tx.trade_state[:20])
    return Synced(no, "error", f"trade_state {tx.trade_state[:20]}")


def _settle(engine: Engine, no: str, tx: Transaction, at: datetime) -> Synced:
    try:
        done = run_in_transaction(engine, lambda s: payments.settle(
            s, out_trade_no=no, transaction=tx, now=at))
    except payments.PaymentError as exc:
        log.error("pay order %s: WeChat Pay's answer does not match the order: %s", no,
                  exc.reason)
        return Synced(no, "error", exc.reason)
    if done.credited:
        log.info("pay order %s credited +%d to %s by the sync job", no, done.tokens,
                 done.order.openid)
        return Synced(no, "credited", tokens=done.tokens)
    return Synced(no, "already")


def _unpaid(engine: Engine, client: PayClient, no: str, at: datetime) -> Synced:
    def state(s: Session) -> tuple[str, datetime]:
        order = payments.require_order(s, out_trade_no=no)
        payments.mark_pending(s, out_trade_no=no)  # a timed-out create did reach WeChat
        return order.status, order.expires_at

    _, expires = run_in_transaction(engine, state)
    if at < expires:
        return Synced(no, "pending", "not paid yet")
    try:
        client.close_order(no)
    except PayApiError as exc:
        if exc.code == "ORDERPAID":  # paid just now: the next query settles it
            return Synced(no, "pending", "paid while closing")
        return _error(no, exc)
    except PayError as exc:
        return _error(no, exc)
    run_in_transaction(engine, lambda s: payments.mark_closed(s, out_trade_no=no, now=at))
    log.info("pay order %s closed unpaid after its time_expire", no)
    return Synced(no, "closed", "expired unpaid")


def _never_made(engine: Engine, no: str, at: datetime) -> Synced:
    """WeChat does not know the order. A ``creating`` one never reached WeChat (its create
    call failed before): closed here, and should it turn up paid after all, a notification
    still settles a closed order. A pending one cannot be unknown: a person should look."""
    def close(s: Session) -> str:
        order = payments.require_order(s, out_trade_no=no)
        if order.status == "creating":
            payments.mark_closed(s, out_trade_no=no, now=at,
                                 error="never created at WeChat Pay")
        return order.status

    status = run_in_transaction(engine, close)
    if status == "creating":
        return Synced(no, "closed", "never created at WeChat Pay")
    log.error("pay order %s is %s here but WeChat Pay does not know it", no, status)
    return Synced(no, "error", "unknown at WeChat Pay")


def _error(no: str, exc: PayError) -> Synced:
    log.warning("pay order %s: could not ask WeChat Pay (%s); next run tries again", no,
                str(exc)[:200])
    return Synced(no, "error", exc.code)


def sync_refunds(engine: Engine, client: PayClient, *, notify_url: str | None = None,
                 now: datetime | None = None) -> dict[str, str]:
    """Resend refunds never answered (same out_refund_no, same body) and ask about those
    still processing; what each is now."""
    at = now or utcnow()
    with transaction(engine) as s:
        open_refunds = payments.list_refunds(s, status=payments.REFUND_OPEN)
        totals = {r.out_trade_no: payments.require_order(s, out_trade_no=r.out_trade_no)
                  .amount_fen for r in open_refunds}
    outcome: dict[str, str] = {}
    for refund in open_refunds:
        outcome[refund.out_refund_no] = send_refund(
            engine, client, out_refund_no=refund.out_refund_no, notify_url=notify_url,
            total_fen=totals[refund.out_trade_no], now=at)
    return outcome


def send_refund(engine: Engine, client: PayClient, *, out_refund_no: str, total_fen: int,
                notify_url: str | None, now: datetime | None = None) -> str:
    """Ask WeChat for a recorded refund (again: the same out_refund_no is safe) and note the
    answer; the refund's status, or ``error: …`` when WeChat could not be asked."""
    at = now or utcnow()
    with transaction(engine) as s:
        refund = payments.get_refund(s, out_refund_no=out_refund_no)
        assert refund is not None
    try:
        if refund.status == "processing":
            answer = client.query_refund(out_refund_no)
        else:
            answer = client.create_refund(
                out_trade_no=refund.out_trade_no, out_refund_no=out_refund_no,
                refund_fen=refund.amount_fen, total_fen=total_fen, reason=refund.reason,
                notify_url=notify_url)
    except PayApiError as exc:
        if not exc.verified or (exc.status or 500) >= 500:
            return f"error: {exc.code} {exc.message[:120]}"
        # WeChat said no, in its own signed words: the tokens go back.
        why = f"{exc.code}: {exc.message}"
        run_in_transaction(engine, lambda s: payments.note_refund(
            s, out_refund_no=out_refund_no, status="refused", error=why, now=at))
        return "refused"
    except PayError as exc:
        return f"error: {exc.code} {exc.message[:120]}"
    noted = run_in_transaction(engine, lambda s: payments.note_refund(
        s, out_refund_no=out_refund_no, status=answer.status, refund_id=answer.refund_id,
        now=at))
    return noted.status


def notify_url(settings: Settings) -> str:
    return settings.server.public_url + "/pay/notify"


class PaySyncJob:
    """What the scheduler runs every minute when [pay] is set."""

    def __init__(self, settings: Settings, engine: Engine,
                 client: PayClient | None = None) -> None:
        if settings.pay is None:
            raise ValueError("PaySyncJob needs a [pay] section")
        self.settings = settings
        self.engine = engine
        self._client = client

    def run(self) -> SyncReport:
        if self._client is None:
            assert self.settings.pay is not None
            self._client = PayClient.from_settings(self.settings.pay)
        report = sync_orders(self.engine, self._client, notify_url=notify_url(self.settings))
        if report.orders or report.refunds:
            log.info("pay sync: %d credited, %d closed, %d pending, %d errors",
                     report.count("credited"), report.count("closed"),
                     report.count("pending"), report.errors)
        return report

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
