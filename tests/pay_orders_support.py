"""Shared by test_pay_notify / test_pay_sync / test_pay_cli / test_pay_races: settings with a
[pay] section for the session's fake merchant, orders made through storage.payments, signed
notifications built the way WeChat builds them, and the real WSGI app on a loopback port (the
fake WeChat Pay posts its notifications over HTTP)."""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from sqlalchemy import Engine

from bot.pay.fake import FakeIdentity
from bot.pay.signing import encrypt_resource, new_nonce, signed_headers
from bot.settings import Settings
from storage import payments
from storage.db import transaction
from storage.models import PayOrder, utcnow
from storage.subscribers import ensure_subscriber
from tests.conftest import make_settings
from tests.pay_support import identity

PAYER = "o_payer_0001"
NOTIFY_PATH = "/pay/notify"


def pay_settings(tmp_path: Path, *, api_base: str = "http://127.0.0.1:9",
                 public_url: str = "http://127.0.0.1:8080",
                 wechat_api: str | None = None, **sections: Any) -> Settings:
    """Settings with [pay] for the session's fake merchant (keys written under tmp_path)."""
    table = identity().pay_table(tmp_path / "paykeys", api_base)
    table["packages"] = [{"id": "p99", "tokens": 99, "price_fen": 990, "label": "99 豆"},
                         {"id": "p10", "tokens": 10, "price_fen": 100, "label": "10 豆"}]
    wechat: dict[str, Any] = {"app_id": identity().app_id}
    if wechat_api is not None:
        wechat |= {"app_secret": "fake-secret", "api_base": wechat_api}
    return make_settings(pay=table, server={"public_url": public_url}, wechat=wechat,
                         **sections)


def make_order(engine: Engine, *, openid: str = PAYER, package: tuple[str, int, int] =
               ("p99", 99, 990), kind: str = "jsapi", issue_number: int | None = None,
               created: bool = True, ttl: timedelta = timedelta(minutes=30),
               notify_url: str = "http://127.0.0.1:8080/pay/notify",
               age: timedelta = timedelta(0)) -> PayOrder:
    """An order as the purchase page leaves it: recorded, and (``created``) accepted by
    WeChat. ``age``: made that long ago."""
    ident = identity()
    with transaction(engine) as s:
        ensure_subscriber(s, openid=openid)
        order = payments.new_order(
            s, openid=openid, package=package, kind=kind, issue_number=issue_number,
            app_id=ident.app_id, mch_id=ident.mch_id, notify_url=notify_url, ttl=ttl,
            now=utcnow() - age, description="99 豆")
        if created:
            order = payments.mark_created(s, out_trade_no=order.out_trade_no,
                                          prepay_id=f"wx{secrets.token_hex(15)}")
        return order


def transaction_resource(order: PayOrder, **changes: Any) -> dict[str, Any]:
    """The decrypted resource of a TRANSACTION.SUCCESS notification for ``order``; keys in
    ``changes`` replace fields (``amount``/``payer`` whole)."""
    ident = identity()
    resource: dict[str, Any] = {
        "appid": ident.app_id, "mchid": ident.mch_id, "out_trade_no": order.out_trade_no,
        "transaction_id": f"42000{secrets.randbelow(10**23):023d}",
        "trade_type": "JSAPI" if order.kind == "jsapi" else "NATIVE",
        "trade_state": "SUCCESS", "trade_state_desc": "支付成功", "bank_type": "OTHERS",
        "attach": "", "success_time": time.strftime("%Y-%m-%dT%H:%M:%S+08:00"),
        "payer": {"openid": order.openid},
        "amount": {"total": order.amount_fen, "payer_total": order.amount_fen,
                   "currency": "CNY", "payer_currency": "CNY"},
    }
    resource.update(changes)
    return resource


def notification(resource: dict[str, Any], *, event_type: str = "TRANSACTION.SUCCESS",
                 ident: FakeIdentity | None = None, timestamp: float | None = None,
                 key: RSAPrivateKey | None = None, serial: str | None = None,
                 apiv3_key: bytes | None = None) -> tuple[dict[str, str], bytes]:
    """Headers and raw body of a notification, signed like WeChat signs one (by default
    with the WeChat Pay public key pair of the session's identity)."""
    ident = ident or identity()
    original = "refund" if event_type.startswith("REFUND.") else "transaction"
    envelope = {
        "id": str(uuid.uuid4()), "create_time": time.strftime("%Y-%m-%dT%H:%M:%S+08:00"),
        "resource_type": "encrypt-resource", "event_type": event_type,
        "summary": "支付成功",
        "resource": encrypt_resource(json.dumps(resource, ensure_ascii=False).encode(),
                                     apiv3_key or ident.apiv3_key,
                                     associated_data=original, original_type=original),
    }
    body = json.dumps(envelope, ensure_ascii=False).encode()
    headers = signed_headers(private_key=key or ident.platform_key,
                             serial=serial or ident.public_key_id, body=body,
                             timestamp=str(int(timestamp if timestamp is not None
                                               else time.time())),
                             nonce=new_nonce())
    headers["Content-Type"] = "application/json"
    return headers, body


def refund_resource(order: PayOrder, out_refund_no: str, refund_fen: int,
                    status: str) -> dict[str, Any]:
    ident = identity()
    return {"mchid": ident.mch_id, "out_trade_no": order.out_trade_no,
            "transaction_id": order.transaction_id, "out_refund_no": out_refund_no,
            "refund_id": f"50{secrets.randbelow(10**27):027d}", "refund_status": status,
            "success_time": time.strftime("%Y-%m-%dT%H:%M:%S+08:00"),
            "user_received_account": "支付用户零钱",
            "amount": {"total": order.amount_fen, "refund": refund_fen,
                       "payer_total": order.amount_fen, "payer_refund": refund_fen}}


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class LoopbackServer:
    """A WSGI app on 127.0.0.1 (bound first, so settings can name its URL before the app
    exists; ``serve(app)`` starts it)."""

    def __init__(self) -> None:
        self._server = make_server("127.0.0.1", 0, cast(Any, None),
                                   server_class=_ThreadingWSGIServer,
                                   handler_class=_QuietHandler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def serve(self, app: Any) -> None:
        self._server.set_app(app)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
        self._server.server_close()


@contextmanager
def loopback_server() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    try:
        yield server
    finally:
        server.close()

