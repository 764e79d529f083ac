"""``POST /pay/notify``: WeChat Pay's notifications (TRANSACTION.SUCCESS, REFUND.*).

The signature covers the raw body, so the body is read from ``wsgi.input`` as bytes and
never parsed by Bottle first. A notification is trusted only after it verifies, decrypts and
describes exactly one of our orders (merchant, app, amount, currency, payer); then it is
settled exactly once (storage.payments.settle). The answer is what WeChat asks for: 204 with
no body when it is settled (also for a duplicate), else 4xx/5xx ``{"code": "FAIL",
"message": …}`` — WeChat retries those — with one log line naming why.

After a credit has been committed the subscriber gets a 客服消息 from a background thread:
its failure is logged and never undoes the credit, and a duplicate notification sends
nothing because only the transaction that claimed the order reports ``credited``."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Protocol

import bottle
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from bot.pay.client import Refund, Transaction, verify_keys
from bot.pay.keys import VerifyKeys
from bot.pay.signing import (
    BadSignature,
    MissingSignature,
    Notification,
    SignTestProbe,
    StaleTimestamp,
    UnknownSerial,
    VerificationError,
    verify_notification,
)
from bot.settings import Settings
from storage import payments
from storage.db import run_in_transaction
from storage.payments import PaymentError, PaymentMismatch, Settlement, UnknownOrder

log = logging.getLogger("newsbot.pay")

PATH: Final = "/pay/notify"
MAX_BODY_BYTES: Final = 64 * 1024  # a notification is about 1 KB
TRANSACTION_EVENTS: Final = frozenset({"TRANSACTION.SUCCESS"})
REFUND_EVENTS: Final = frozenset({"REFUND.SUCCESS", "REFUND.ABNORMAL", "REFUND.CLOSED"})


class Messenger(Protocol):
    def send_custom_text(self, openid: str, content: str) -> None: ...


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str | None = None  # why it was refused (logged, and the FAIL message)
    settlement: Settlement | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _status_for(failure: VerificationError) -> int:
    # Not signed by WeChat (or a probe): 401. Signed but unusable: 400.
    if isinstance(failure, MissingSignature | SignTestProbe | StaleTimestamp | UnknownSerial
                  | BadSignature):
        return 401
    return 400


def credited_text(settlement: Settlement, *, token_name: str) -> str:
    """The 客服消息 after a credit."""
    order = settlement.order
    text = (f"充值成功 +{settlement.tokens} {token_name}（¥{payments.yuan(order.amount_fen)}），"
            f"当前余额 {settlement.balance} {token_name}。")
    n = order.issue_number
    if n is not None:
        text += {
            "unlocked": f"第{n}期已为你解锁，回复「全文 {n}」即可阅读。",
            "already": f"第{n}期你已解锁过，回复「全文 {n}」即可阅读。",
            "pass": f"第{n}期在你的会员期内，回复「全文 {n}」即可阅读。",
            "free": f"第{n}期免费，回复「全文 {n}」即可阅读。",
            "short": f"余额不足以解锁第{n}期，回复「兑换 {n}」可再试。",
            "no_issue": f"第{n}期暂不能解锁，{token_name}已存入余额。",
        }.get(settlement.unlock or "", "")
    return text


class PayNotify:
    """The endpoint; ``handle`` is the whole decision without Bottle (the benchmark calls it)."""

    def __init__(self, settings: Settings, engine: Engine, *,
                 keys: VerifyKeys | None = None,
                 messenger_factory: Callable[[], Messenger] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if settings.pay is None:
            raise ValueError("PayNotify needs a [pay] section")
        self.settings = settings
        self.pay = settings.pay
        self.engine = engine
        self.keys = keys if keys is not None else verify_keys(settings.pay)
        self.clock = clock
        self._messenger_factory = messenger_factory
        self._messenger_lock = threading.Lock()
        self._outbox: ThreadPoolExecutor | None = None
        self._pending: set[Future[None]] = set()

    def install(self, app: bottle.Bottle) -> None:
        app.route(PATH, method="POST", callback=self._route)

    # -- the decision ----------------------------------------------------------------------

    def handle(self, headers: Mapping[str, str], raw: bytes) -> Answer:
        try:
            notification = verify_notification(headers, raw, self.keys, self.clock())
        except VerificationError as failure:
            return Answer(_status_for(failure), failure.reason)
        try:
            if notification.event_type in TRANSACTION_EVENTS:
                return Answer(204, settlement=self._settle(notification))
            if notification.event_type in REFUND_EVENTS:
                self._refund(notification)
                return Answer(204)
        except Refused as refused:
            return Answer(refused.status, refused.reason)
        except SQLAlchemyError as exc:
            # WeChat retries a 5xx: the next attempt settles it.
            return Answer(500, f"database error {type(exc).__name__}")
        # Signed and decrypted, but nothing we act on: acknowledged so it is not retried.
        log.info("pay notification %s of type %s ignored", notification.id[:64],
                 notification.event_type[:40])
        return Answer(204)

    def _settle(self, notification: Notification) -> Settlement:
        tx = Transaction.from_json(notification.resource)
        if tx.mchid != self.pay.mch_id:  # before touching the database
            raise Refused(400, f"mchid {tx.mchid[:32]!r} is not ours")
        if not payments.OUT_TRADE_NO_RE.fullmatch(tx.out_trade_no):
            raise Refused(400, "out_trade_no is not one we could have made")

        def work(session: Any) -> Settlement:
            return payments.settle(session, out_trade_no=tx.out_trade_no, transaction=tx)

        try:
            settlement = run_in_transaction(self.engine, work)
        except UnknownOrder as exc:
            raise Refused(404, exc.reason) from None
        except PaymentMismatch as exc:
            raise Refused(400, f"order {tx.out_trade_no}: {exc.reason}") from None
        if settlement.outcome == "not_paid":
            raise Refused(400, f"order {tx.out_trade_no}: trade_state {tx.trade_state[:20]!r} "
                               "in a TRANSACTION.SUCCESS notification")
        if settlement.credited:
            log.info("pay order %s credited +%d to %s (¥%s)%s", tx.out_trade_no,
                     settlement.tokens, settlement.order.openid,
                     payments.yuan(settlement.order.amount_fen),
                     f", unlock {settlement.unlock}" if settlement.unlock else "")
            self._tell(settlement)
        return settlement

    def _refund(self, notification: Notification) -> None:
        refund = Refund.from_json(notification.resource)
        mchid = notification.resource.get("mchid")
        if mchid is not None and mchid != self.pay.mch_id:
            raise Refused(400, f"mchid {str(mchid)[:32]!r} is not ours")
        status = notification.event_type.removeprefix("REFUND.")

        def work(session: Any) -> None:
            known = payments.get_refund(session, out_refund_no=refund.out_refund_no)
            if known is None:
                raise payments.UnknownRefund(refund.out_refund_no)
            if known.out_trade_no != refund.out_trade_no:
                raise PaymentMismatch("out_trade_no is not the refund's order")
            order = payments.require_order(session, out_trade_no=known.out_trade_no)
            if refund.refund_fen is not None and refund.refund_fen != known.amount_fen:
                raise PaymentMismatch(f"refund amount {refund.refund_fen} fen is not the "
                                      f"{known.amount_fen} fen asked for")
            if refund.total_fen is not None and refund.total_fen != order.amount_fen:
                raise PaymentMismatch("order total is not the order's")
            payments.note_refund(session, out_refund_no=refund.out_refund_no, status=status,
                                 refund_id=refund.refund_id)

        try:
            run_in_transaction(self.engine, work)
        except (payments.UnknownRefund, UnknownOrder) as exc:
            raise Refused(404, exc.reason) from None
        except PaymentError as exc:
            raise Refused(400, f"refund {refund.out_refund_no[:64]}: {exc.reason}") from None
        log.info("pay refund %s of order %s: %s", refund.out_refund_no[:64],
                 refund.out_trade_no[:32], status)

    # -- the customer-service message ---------------------------------------------------------

    def _tell(self, settlement: Settlement) -> None:
        if self._messenger_factory is None:
            return
        text = credited_text(settlement, token_name=self.settings.tokens.name)
        openid = settlement.order.openid
        with self._messenger_lock:
            if self._outbox is None:
                self._outbox = ThreadPoolExecutor(max_workers=2,
                                                  thread_name_prefix="pay-message")
            future = self._outbox.submit(self._send, openid, text,
                                         settlement.order.out_trade_no)
            self._pending.add(future)
            future.add_done_callback(self._pending.discard)

    def _send(self, openid: str, text: str, out_trade_no: str) -> None:
        # A client per message: payments are rare, and nothing is left open between them.
        assert self._messenger_factory is not None
        try:
            messenger = self._messenger_factory()
            try:
                messenger.send_custom_text(openid, text)
            finally:
                close = getattr(messenger, "close", None)
                if callable(close):
                    close()
        except Exception as exc:  # the credit stands whatever happens here
            log.warning("pay order %s: the 客服消息 to %s failed (%s: %s); the credit stands",
                        out_trade_no, openid, type(exc).__name__, str(exc)[:200])

    def drain(self, timeout: float = 10.0) -> None:
        """Wait for the messages queued so far (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)

    # -- Bottle --------------------------------------------------------------------------------

    def _route(self) -> Any:
        try:
            raw = _read_raw_body()
        except Refused as refused:
            answer = Answer(refused.status, refused.reason)
        else:
            answer = self.handle(dict(bottle.request.headers.items()), raw)
        if answer.ok:
            bottle.response.status = 204
            return b""
        log.warning("pay notification refused (%d): %s", answer.status, answer.reason)
        bottle.response.status = answer.status
        bottle.response.content_type = "application/json"
        return json.dumps({"code": "FAIL", "message": answer.reason or "refused"},
                          ensure_ascii=False)


def _read_raw_body() -> bytes:
    """The body exactly as sent: the signature covers these bytes."""
    environ = bottle.request.environ
    try:
        length = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        raise Refused(400, "bad Content-Length") from None
    if length > MAX_BODY_BYTES:
        raise Refused(413, "body too large")
    stream = environ["wsgi.input"]
    raw: bytes = stream.read(length if length >= 0 else MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise Refused(413, "body too large")
    if length >= 0 and len(raw) < length:
        raise Refused(400, f"body truncated ({len(raw)} of {length} bytes)")
    return raw


def install(app: bottle.Bottle, *, settings: Settings, engine: Engine,
            messenger_factory: Callable[[], Messenger] | None = None) -> PayNotify | None:
    """Mount ``POST /pay/notify`` when [pay] is set; the endpoint, or None."""
    if settings.pay is None:
        return None
    endpoint = PayNotify(settings, engine, messenger_factory=messenger_factory)
    endpoint.install(app)
    return endpoint
