"""A loopback fake of WeChat Pay API v3, for tests, benchmarks and ``newsbot demo``.

It holds its own RSA keys (a "WeChat Pay public key" with a ``PUB_KEY_ID_…`` and a platform
certificate), checks our Authorization signatures (401 SIGN_ERROR otherwise), signs every
answer, runs the order state machine NOTPAY → SUCCESS / CLOSED / REFUND, has a page that
"pays" an order, and posts encrypted notifications to notify_url on WeChat's retry schedule
(compressed by ``retry_scale``) until a 2xx. Switches make it misbehave the way the real one
can: duplicate notifications (also two at once), SIGNTEST probes, an unknown serial, a
notification that never comes, 5xx or slow answers, forged answers.

Run standalone: ``python -m bot.pay.fake --port 0 --keys-dir DIR``; it writes the merchant
key, WeChat Pay's public key and certificate and a ready ``[pay]`` table (DIR/pay.toml) into
DIR, and its first stdout line is the base URL. Behaviour the real service documents only
loosely (error codes of some refusals) is approximated; docs/pay.md lists what is faked."""

from __future__ import annotations

import argparse
import contextlib
import functools
import heapq
import html
import itertools
import json
import logging
import re
import secrets
import signal
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final, Literal, cast
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from cryptography.x509.oid import NameOID

from bot.pay.keys import certificate_serial
from bot.pay.signing import (
    SIGNTEST_PREFIX,
    encrypt_resource,
    new_nonce,
    parse_authorization,
    request_message,
    rsa_verify,
    signed_headers,
)

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]
SignWith = Literal["public_key", "certificate"]
Misbehaviour = Literal["drop", "signtest", "unknown_serial"]

# WeChat's documented notification retry intervals, in seconds (about 24 h in all).
WECHAT_RETRY_SCHEDULE_S: Final = (15, 15, 30, 180, 600, 1200, 1800, 1800, 1800, 3600,
                                  10800, 10800, 10800, 21600, 21600)
AUTH_MAX_SKEW_S: Final = 300
CHINA: Final = timezone(timedelta(hours=8))
_OUT_NO = re.compile(r"[0-9A-Za-z_\-|*]{6,32}")
_TRADE_STATE_DESC: Final = {"NOTPAY": "订单未支付", "SUCCESS": "支付成功", "CLOSED": "订单已关闭",
                            "REFUND": "转入退款"}


class _PayFailure(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _rsa_key() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _self_signed(key: RSAPrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1825))
            .sign(key, hashes.SHA256()))


@dataclass(frozen=True)
class FakeIdentity:
    """The keys of a fake merchant and of the fake WeChat Pay it talks to. Generating one
    takes a few RSA key pairs, so tests make one per session."""

    mch_id: str
    app_id: str
    apiv3_key: bytes = field(repr=False)
    merchant_key: RSAPrivateKey = field(repr=False)
    merchant_serial_no: str
    platform_key: RSAPrivateKey = field(repr=False)  # the "WeChat Pay public key" pair
    public_key_id: str
    certificate_key: RSAPrivateKey = field(repr=False)  # the platform certificate's pair
    certificate: x509.Certificate = field(repr=False)
    stranger_key: RSAPrivateKey = field(repr=False)  # signs forgeries

    @classmethod
    def generate(cls, *, mch_id: str = "1900000001", app_id: str = "wx_fake") -> FakeIdentity:
        certificate_key = _rsa_key()
        return cls(
            mch_id=mch_id, app_id=app_id,
            apiv3_key=secrets.token_hex(16).encode("ascii"),
            merchant_key=_rsa_key(), merchant_serial_no=secrets.token_hex(20).upper(),
            platform_key=_rsa_key(),
            public_key_id=f"PUB_KEY_ID_{secrets.randbelow(10**28):028d}",
            certificate_key=certificate_key,
            certificate=_self_signed(certificate_key, "Fake Tenpay Platform"),
            stranger_key=_rsa_key())

    @property
    def certificate_serial(self) -> str:
        return certificate_serial(self.certificate)

    def write(self, directory: Path) -> dict[str, Path]:
        """Write the files a ``[pay]`` section points at; their paths by setting name."""
        directory.mkdir(parents=True, exist_ok=True)
        certs = directory / "platform_certificates"
        certs.mkdir(exist_ok=True)
        paths = {"merchant_private_key_file": directory / "apiclient_key.pem",
                 "wechatpay_public_key_file": directory / "pub_key.pem",
                 "platform_certificates_dir": certs}
        paths["merchant_private_key_file"].write_bytes(self.merchant_key.private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        paths["merchant_private_key_file"].chmod(0o600)
        paths["wechatpay_public_key_file"].write_bytes(self.platform_key.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
        (certs / f"{self.certificate_serial}.pem").write_bytes(
            self.certificate.public_bytes(Encoding.PEM))
        return paths

    def pay_table(self, directory: Path, api_base: str, *,
                  mode: Literal["public_key", "certificate", "both"] = "public_key") -> JSONDict:
        """A ``[pay]`` table for these keys (written to ``directory`` first)."""
        paths = self.write(directory)
        table: JSONDict = {
            "mch_id": self.mch_id, "app_id": self.app_id,
            "apiv3_key": self.apiv3_key.decode("ascii"),
            "merchant_serial_no": self.merchant_serial_no,
            "merchant_private_key_file": str(paths["merchant_private_key_file"]),
            "api_base": api_base,
            "packages": [{"id": "p99", "tokens": 99, "price_fen": 990, "label": "99 豆"}],
        }
        if mode in ("public_key", "both"):
            table["wechatpay_public_key_file"] = str(paths["wechatpay_public_key_file"])
            table["wechatpay_public_key_id"] = self.public_key_id
        if mode in ("certificate", "both"):
            table["platform_certificates_dir"] = str(paths["platform_certificates_dir"])
        return table


@dataclass
class FakeOrder:
    out_trade_no: str
    trade_type: Literal["JSAPI", "NATIVE"]
    body: JSONDict  # as created, to tell a retry from a different order under the same number
    prepay: str  # prepay_id or code_url
    state: str = "NOTPAY"
    transaction_id: str | None = None
    payer_openid: str | None = None
    success_time: str | None = None
    refunded_fen: int = 0

    @property
    def total_fen(self) -> int:
        return int(self.body["amount"]["total"])

    @property
    def notify_url(self) -> str:
        return str(self.body["notify_url"])

    def as_json(self) -> JSONDict:
        data: JSONDict = {
            "appid": self.body["appid"], "mchid": self.body["mchid"],
            "out_trade_no": self.out_trade_no, "trade_type": self.trade_type,
            "trade_state": self.state, "trade_state_desc": _TRADE_STATE_DESC[self.state],
            "attach": self.body.get("attach", ""),
            "amount": {"total": self.total_fen, "currency": "CNY", "payer_currency": "CNY"},
        }
        payer = self.payer_openid or self.body.get("payer", {}).get("openid")
        if payer:
            data["payer"] = {"openid": payer}
        if self.transaction_id:
            data.update(transaction_id=self.transaction_id, bank_type="OTHERS",
                        success_time=self.success_time)
            data["amount"]["payer_total"] = self.total_fen
        return data


@dataclass
class FakeRefund:
    out_refund_no: str
    out_trade_no: str
    refund_id: str
    refund_fen: int
    total_fen: int
    notify_url: str
    reason: str
    status: str = "PROCESSING"
    create_time: str = ""
    success_time: str | None = None

    def as_json(self, order: FakeOrder) -> JSONDict:
        return {"refund_id": self.refund_id, "out_refund_no": self.out_refund_no,
                "transaction_id": order.transaction_id, "out_trade_no": self.out_trade_no,
                "channel": "ORIGINAL", "user_received_account": "支付用户零钱",
                "success_time": self.success_time, "create_time": self.create_time,
                "status": self.status, "funds_account": "AVAILABLE",
                "amount": {"total": self.total_fen, "refund": self.refund_fen,
                           "payer_total": self.total_fen, "payer_refund": self.refund_fen,
                           "settlement_total": self.total_fen,
                           "settlement_refund": self.refund_fen, "discount_refund": 0,
                           "currency": "CNY", "refund_fee": 0}}

    def notification_json(self, order: FakeOrder) -> JSONDict:
        return {"mchid": order.body["mchid"], "out_trade_no": self.out_trade_no,
                "transaction_id": order.transaction_id, "out_refund_no": self.out_refund_no,
                "refund_id": self.refund_id, "refund_status": self.status,
                "success_time": self.success_time, "user_received_account": "支付用户零钱",
                "amount": {"total": self.total_fen, "refund": self.refund_fen,
                           "payer_total": self.total_fen, "payer_refund": self.refund_fen}}


@dataclass(frozen=True)
class PayCall:
    """One API request as the fake saw it."""

    method: str
    path: str
    status: int
    code: str | None  # WeChat's error code, None on success
    time: float


@dataclass(frozen=True)
class Delivery:
    """One POST of a notification (or of a probe) to a notify URL."""

    notification_id: str
    event_type: str
    out_trade_no: str
    kind: Literal["notification", "signtest", "unknown_serial"]
    attempt: int  # 0 for the first try, then one more per retry
    status: int | None  # None: no answer (the error is in ``error``)
    error: str | None
    time: float


@dataclass
class _Fault:
    kind: Literal["status", "delay", "forge_key", "forge_body", "after"]
    path: str | None
    times: int
    status: int = 500
    code: str = "SYSTEM_ERROR"
    seconds: float = 0.0


_FAULT_GROUP: Final = {"delay": "delay", "status": "error", "after": "error",
                       "forge_key": "forge", "forge_body": "forge"}


@dataclass
class _Notice:
    """A notification to deliver: fixed body, re-signed on every attempt as WeChat does."""

    id: str
    url: str
    event_type: str
    out_trade_no: str
    body: bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], fake: FakeWeChatPay) -> None:
        self.fake = fake
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60

    def do_GET(self) -> None:
        cast(_Server, self.server).fake._handle(self, "GET")

    def do_POST(self) -> None:
        cast(_Server, self.server).fake._handle(self, "POST")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class FakeWeChatPay:
    """In-process HTTP server speaking the WeChat Pay v3 endpoints newsbot uses."""

    def __init__(
        self,
        identity: FakeIdentity,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        sign_with: SignWith = "public_key",
        retry_schedule: Sequence[float] = WECHAT_RETRY_SCHEDULE_S,
        retry_scale: float = 1.0,
        refund_delay_s: float = 0.2,
        refund_outcome: Literal["SUCCESS", "ABNORMAL", "CLOSED"] = "SUCCESS",
        notify_copies: int = 1,
        simultaneous: bool = False,
        duplicate_gap_s: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.sign_with: SignWith = sign_with
        self.retry_schedule = tuple(retry_schedule)
        self.retry_scale = retry_scale
        self.refund_delay_s = refund_delay_s
        self.refund_outcome = refund_outcome
        # Each notification is sent this many times (each copy retried until a 2xx); with
        # ``simultaneous`` the first two copies leave at the same instant.
        self.notify_copies = notify_copies
        self.simultaneous = simultaneous
        self.duplicate_gap_s = duplicate_gap_s
        self.orders: dict[str, FakeOrder] = {}
        self.refunds: dict[str, FakeRefund] = {}
        self.calls: list[PayCall] = []
        self.deliveries: list[Delivery] = []
        self._misbehaviours: list[Misbehaviour] = []
        self._faults: list[_Fault] = []
        self._clock = clock
        self._host, self._port = host, port
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # Timed work (notification attempts, refund outcomes), run by one scheduler thread;
        # each delivery runs in a thread of its own so simultaneous copies really overlap.
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._wake = threading.Condition(self._lock)
        self._busy = 0
        self._stopping = False
        self._scheduler: threading.Thread | None = None
        self._http = _notify_client()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeWeChatPay:
        if self._server is not None:
            return self
        self._stopping = False
        self._server = _Server((self._host, self._port), self)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, name="fake-pay",
                                        daemon=True)
        self._thread.start()
        self._scheduler = threading.Thread(target=self._run_timers, name="fake-pay-timers",
                                           daemon=True)
        self._scheduler.start()
        log.info("fake WeChat Pay at %s", self.base_url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._server.shutdown()
        self._server.server_close()
        for thread in (self._thread, self._scheduler):
            if thread is not None:
                thread.join(timeout=5)
        self._server = self._thread = self._scheduler = None
        self._http.close()
        self._http = _notify_client()

    def __enter__(self) -> FakeWeChatPay:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeWeChatPay is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def pay_page_url(self, out_trade_no: str) -> str:
        return f"{self.base_url}/pay/{out_trade_no}"

    # -- switches --------------------------------------------------------------------------

    def fail_next(self, *, status: int = 500, code: str = "SYSTEM_ERROR", times: int = 1,
                  path: str | None = None, after_processing: bool = False) -> None:
        """Answer the next matching requests with an error. ``after_processing``: do the
        work first (the order exists), then fail, as a 5xx after a commit does."""
        self._add_fault(_Fault("after" if after_processing else "status", path, times,
                               status=status, code=code))

    def delay_next(self, seconds: float, *, times: int = 1, path: str | None = None) -> None:
        """Hold the next matching answers (for client timeouts)."""
        self._add_fault(_Fault("delay", path, times, seconds=seconds))

    def forge_next(self, *, how: Literal["key", "body"] = "key", times: int = 1,
                   path: str | None = None) -> None:
        """Sign the next answers with a key WeChat does not hold (under the real serial), or
        alter the body after signing."""
        self._add_fault(_Fault("forge_key" if how == "key" else "forge_body", path, times))

    def misbehave_next(self, *kinds: Misbehaviour) -> None:
        """Change the next notifications, one kind each: ``drop`` (it never comes),
        ``signtest`` (a WECHATPAY/SIGNTEST/ probe goes first), ``unknown_serial`` (a copy
        signed under an unknown serial goes first)."""
        with self._lock:
            self._misbehaviours.extend(kinds)

    def _add_fault(self, fault: _Fault) -> None:
        if fault.times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._faults.append(fault)

    def _take_faults(self, path: str) -> list[_Fault]:
        """The faults that apply to this request, each used up once: at most one delay,
        one error and one forgery, in the order they were queued."""
        taken: list[_Fault] = []
        with self._lock:
            for fault in list(self._faults):
                if fault.path is not None and not path.startswith(fault.path):
                    continue
                if any(_FAULT_GROUP[t.kind] == _FAULT_GROUP[fault.kind] for t in taken):
                    continue
                taken.append(fault)
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
        return taken

    # -- paying (the page, and tests) ------------------------------------------------------

    def pay(self, out_trade_no: str, *, openid: str | None = None) -> FakeOrder:
        """The payer confirms in WeChat: the order succeeds and its notification is queued."""
        with self._lock:
            order = self.orders.get(out_trade_no)
            if order is None:
                raise _PayFailure(404, "ORDER_NOT_EXIST", "订单不存在")
            if order.state != "NOTPAY":
                raise _PayFailure(400, "INVALID_REQUEST", "订单状态不可支付："
                                  + _TRADE_STATE_DESC[order.state])
            expire = order.body.get("time_expire")
            if expire and datetime.fromisoformat(expire).timestamp() < self._clock():
                raise _PayFailure(400, "INVALID_REQUEST", "订单已过期")
            owner = order.body.get("payer", {}).get("openid")
            if owner and openid and openid != owner:
                raise _PayFailure(400, "INVALID_REQUEST", "下单账号与支付账号不一致")
            order.state = "SUCCESS"
            order.payer_openid = owner or openid or "oFakeNativePayer0000000000000"
            order.transaction_id = f"42000{secrets.randbelow(10**23):023d}"
            order.success_time = _rfc3339(self._clock())
            self._notify(order.notify_url, "TRANSACTION.SUCCESS", "支付成功", "transaction",
                         order.out_trade_no, order.as_json())
            return order

    # -- HTTP plumbing ---------------------------------------------------------------------

    def _handle(self, handler: _Handler, method: str) -> None:
        split = urlsplit(handler.path)
        path = split.path
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        if not path.startswith("/v3/"):
            self._handle_page(handler, method, path, raw)
            return
        faults: dict[str, _Fault] = {f.kind: f for f in self._take_faults(path)}
        if "delay" in faults:
            time.sleep(faults["delay"].seconds)
        status, payload = 200, None
        try:
            self._check_authorization(handler, method, raw)
            if "status" in faults:
                fault = faults["status"]
                raise _PayFailure(fault.status, fault.code, "系统繁忙，请稍后重试")
            status, payload = self._route(method, path, parse_qs(split.query), raw)
            if "after" in faults:
                fault = faults["after"]
                raise _PayFailure(fault.status, fault.code, "系统繁忙，请稍后重试")
        except _PayFailure as failure:
            status, payload = failure.status, {"code": failure.code, "message": failure.message}
        except Exception:
            log.exception("fake WeChat Pay failed on %s %s", method, path)
            status, payload = 500, {"code": "SYSTEM_ERROR", "message": "系统错误"}
        code = payload.get("code") if payload and status >= 300 else None
        with self._lock:
            self.calls.append(PayCall(method, path, status, code, self._clock()))
        body = b"" if payload is None else json.dumps(payload, ensure_ascii=False).encode()
        # WeChat signs nothing when it could not verify our signature.
        signed = code != "SIGN_ERROR"
        self._write(handler, status, body, "application/json; charset=utf-8",
                    self._answer_headers(body, faults) if signed else {})

    def _answer_headers(self, body: bytes, faults: dict[str, _Fault]) -> dict[str, str]:
        key, serial = self._signer()
        if "forge_key" in faults:
            key = self.identity.stranger_key
        headers = signed_headers(private_key=key, serial=serial, body=body,
                                 timestamp=str(int(self._clock())), nonce=new_nonce())
        headers["Request-ID"] = uuid.uuid4().hex.upper()
        if "forge_body" in faults:
            headers["X-Fake-Forged"] = "body"
        return headers

    def _signer(self) -> tuple[RSAPrivateKey, str]:
        if self.sign_with == "certificate":
            return self.identity.certificate_key, self.identity.certificate_serial
        return self.identity.platform_key, self.identity.public_key_id

    @staticmethod
    def _write(handler: _Handler, status: int, body: bytes, content_type: str,
               headers: dict[str, str]) -> None:
        if headers.pop("X-Fake-Forged", None) == "body":
            body = body.replace(b"\"", b"'", 1) if body else b"{}"  # altered after signing
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    def _check_authorization(self, handler: _Handler, method: str, raw: bytes) -> None:
        params = parse_authorization(handler.headers.get("Authorization", ""))
        wrong = _PayFailure(401, "SIGN_ERROR", "签名错误")
        if params is None or not all(
                params.get(k) for k in ("mchid", "nonce_str", "timestamp", "serial_no",
                                        "signature")):
            raise wrong
        if (params["mchid"] != self.identity.mch_id
                or params["serial_no"].upper() != self.identity.merchant_serial_no):
            raise wrong
        if not params["timestamp"].isdigit() or abs(
                int(params["timestamp"]) - self._clock()) > AUTH_MAX_SKEW_S:
            raise wrong
        message = request_message(method, handler.path, params["timestamp"],
                                  params["nonce_str"], raw)
        public: RSAPublicKey = self.identity.merchant_key.public_key()
        if not rsa_verify(public, message, params["signature"]):
            raise wrong

    def _route(self, method: str, path: str, query: dict[str, list[str]],
               raw: bytes) -> tuple[int, JSONDict | None]:
        parts = [unquote(p) for p in path.split("/")[1:]]
        with self._lock:
            match method, parts:
                case "POST", ["v3", "pay", "transactions", ("jsapi" | "native") as kind]:
                    return 200, self._create_order(kind, _json_body(raw))
                case "GET", ["v3", "pay", "transactions", "out-trade-no", no]:
                    if query.get("mchid", [""])[-1] != self.identity.mch_id:
                        raise _PayFailure(400, "PARAM_ERROR", "mchid 与请求商户号不一致")
                    return 200, self._order(no).as_json()
                case "POST", ["v3", "pay", "transactions", "out-trade-no", no, "close"]:
                    self._close_order(no, _json_body(raw))
                    return 204, None
                case "POST", ["v3", "refund", "domestic", "refunds"]:
                    return 200, self._create_refund(_json_body(raw))
                case "GET", ["v3", "certificates"]:
                    return 200, self._certificates()
                case "GET", ["v3", "refund", "domestic", "refunds", no]:
                    refund = self.refunds.get(no)
                    if refund is None:
                        raise _PayFailure(404, "RESOURCE_NOT_EXISTS", "退款单不存在")
                    return 200, refund.as_json(self.orders[refund.out_trade_no])
        raise _PayFailure(404, "NOT_FOUND", "接口不存在")

    def _certificates(self) -> JSONDict:
        """Its platform certificate, encrypted with the APIv3 key as WeChat serves it."""
        cert = self.identity.certificate
        sealed = encrypt_resource(cert.public_bytes(Encoding.PEM), self.identity.apiv3_key,
                                  associated_data="certificate", original_type="certificate")
        del sealed["original_type"]  # certificate items carry no original_type
        return {"data": [{
            "serial_no": self.identity.certificate_serial,
            "effective_time": _rfc3339(cert.not_valid_before_utc.timestamp()),
            "expire_time": _rfc3339(cert.not_valid_after_utc.timestamp()),
            "encrypt_certificate": sealed}]}

    # -- orders ----------------------------------------------------------------------------

    def _order(self, out_trade_no: str) -> FakeOrder:
        order = self.orders.get(out_trade_no)
        if order is None:
            raise _PayFailure(404, "ORDER_NOT_EXIST", "订单不存在")
        return order

    def _create_order(self, kind: str, body: JSONDict) -> JSONDict:
        _check_order_body(body, jsapi=kind == "jsapi", clock=self._clock)
        if body["mchid"] != self.identity.mch_id:
            raise _PayFailure(400, "MCH_NOT_EXISTS", "商户号不存在")
        if body["appid"] != self.identity.app_id:
            raise _PayFailure(400, "APPID_MCHID_NOT_MATCH", "appid和mch_id不匹配")
        no = body["out_trade_no"]
        answer_key = "prepay_id" if kind == "jsapi" else "code_url"
        existing = self.orders.get(no)
        if existing is not None:
            # The same order placed again (a retry) gets the same answer; anything else
            # under that number is refused.
            if existing.body != body:
                raise _PayFailure(400, "INVALID_REQUEST", "201 商户订单号重复")
            if existing.state == "CLOSED":
                raise _PayFailure(400, "ORDER_CLOSED", "订单已关闭")
            if existing.state != "NOTPAY":
                raise _PayFailure(400, "INVALID_REQUEST", "该订单已支付")
            return {answer_key: existing.prepay}
        if kind == "jsapi":
            prepay = f"wx{secrets.token_hex(15)}"
        else:
            prepay = f"weixin://wxpay/bizpayurl?pr={secrets.token_urlsafe(6)}"
        self.orders[no] = FakeOrder(no, "JSAPI" if kind == "jsapi" else "NATIVE", body, prepay)
        return {answer_key: prepay}

    def _close_order(self, out_trade_no: str, body: JSONDict) -> None:
        if body.get("mchid") != self.identity.mch_id:
            raise _PayFailure(400, "PARAM_ERROR", "mchid 与请求商户号不一致")
        order = self._order(out_trade_no)
        if order.state in ("SUCCESS", "REFUND"):
            raise _PayFailure(400, "ORDERPAID", "订单已支付")
        order.state = "CLOSED"

    # -- refunds ---------------------------------------------------------------------------

    def _create_refund(self, body: JSONDict) -> JSONDict:
        no, trade_no = body.get("out_refund_no"), body.get("out_trade_no")
        amount = body.get("amount")
        if not (isinstance(no, str) and _OUT_NO.fullmatch(no) and isinstance(trade_no, str)
                and isinstance(amount, dict)):
            raise _PayFailure(400, "PARAM_ERROR", "out_refund_no、out_trade_no、amount 必填")
        if not (_positive_int(amount.get("refund")) and _positive_int(amount.get("total"))
                and amount.get("currency", "CNY") == "CNY"):
            raise _PayFailure(400, "PARAM_ERROR", "amount 格式错误")
        refund_fen, total_fen = int(amount["refund"]), int(amount["total"])
        order = self.orders.get(trade_no)
        if order is None:
            raise _PayFailure(404, "RESOURCE_NOT_EXISTS", "订单不存在")
        existing = self.refunds.get(no)
        if existing is not None:
            if (existing.out_trade_no, existing.refund_fen) != (trade_no, refund_fen):
                raise _PayFailure(400, "INVALID_REQUEST", "out_refund_no 已用于另一笔退款")
            return existing.as_json(order)
        if order.state not in ("SUCCESS", "REFUND"):
            raise _PayFailure(400, "INVALID_REQUEST", "订单未支付，不能退款")
        if total_fen != order.total_fen:
            raise _PayFailure(400, "PARAM_ERROR", "订单金额与原订单不一致")
        if order.refunded_fen + refund_fen > order.total_fen:
            raise _PayFailure(403, "NOT_ENOUGH", "退款金额超过订单可退金额")
        notify_url = str(body.get("notify_url") or order.notify_url)
        if not _is_notify_url(notify_url):
            raise _PayFailure(400, "PARAM_ERROR", "notify_url 必须是 https 且不带参数")
        order.refunded_fen += refund_fen
        refund = FakeRefund(no, trade_no, f"50{secrets.randbelow(10**27):027d}", refund_fen,
                            order.total_fen, notify_url, str(body.get("reason", "")),
                            create_time=_rfc3339(self._clock()))
        self.refunds[no] = refund
        self._at(self.refund_delay_s, lambda: self._settle_refund(no))
        return refund.as_json(order)

    def _settle_refund(self, out_refund_no: str) -> None:
        with self._lock:
            refund = self.refunds[out_refund_no]
            order = self.orders[refund.out_trade_no]
            refund.status = self.refund_outcome
            if refund.status == "SUCCESS":
                refund.success_time = _rfc3339(self._clock())
                order.state = "REFUND"
            else:
                order.refunded_fen -= refund.refund_fen
            summary = {"SUCCESS": "退款成功", "ABNORMAL": "退款异常", "CLOSED": "退款关闭"}
            self._notify(refund.notify_url, f"REFUND.{refund.status}", summary[refund.status],
                         "refund", refund.out_trade_no, refund.notification_json(order))

    # -- notifications ---------------------------------------------------------------------

    def _notify(self, url: str, event_type: str, summary: str, original_type: str,
                out_trade_no: str, resource: JSONDict) -> None:
        """Queue a notification (under the lock), with whatever misbehaviour is switched on."""
        misbehaviour = self._misbehaviours.pop(0) if self._misbehaviours else None
        plaintext = json.dumps(resource, ensure_ascii=False).encode()
        envelope: JSONDict = {
            "id": str(uuid.uuid4()), "create_time": _rfc3339(self._clock()),
            "resource_type": "encrypt-resource", "event_type": event_type, "summary": summary,
            "resource": encrypt_resource(plaintext, self.identity.apiv3_key,
                                         associated_data=original_type,
                                         original_type=original_type),
        }
        notice = _Notice(envelope["id"], url, event_type, out_trade_no,
                         json.dumps(envelope, ensure_ascii=False).encode())
        if misbehaviour == "drop":
            log.info("fake WeChat Pay drops notification %s (%s)", notice.id, out_trade_no)
            return
        if misbehaviour in ("signtest", "unknown_serial"):
            probe: Literal["signtest", "unknown_serial"] = misbehaviour
            self._at(0, lambda: self._spawn(notice, 0, kind=probe, retry=False))
        copies = max(1, self.notify_copies)
        pair = threading.Barrier(2) if self.simultaneous and copies >= 2 else None
        for copy in range(copies):
            barrier = pair if copy < 2 else None
            delay = 0.0 if barrier else copy * self.duplicate_gap_s
            self._at(delay, functools.partial(self._spawn, notice, 0, barrier=barrier))

    def _spawn(self, notice: _Notice, attempt: int, *,
               kind: Literal["notification", "signtest", "unknown_serial"] = "notification",
               barrier: threading.Barrier | None = None, retry: bool = True) -> None:
        with self._lock:
            self._busy += 1
        threading.Thread(target=self._deliver, args=(notice, attempt, kind, barrier, retry),
                         name="fake-pay-notify", daemon=True).start()

    def _deliver(self, notice: _Notice, attempt: int,
                 kind: Literal["notification", "signtest", "unknown_serial"],
                 barrier: threading.Barrier | None, retry: bool) -> None:
        try:
            key, serial = self._signer()
            if kind == "unknown_serial":
                key, serial = self.identity.stranger_key, "PUB_KEY_ID_0000UNKNOWN000000000000000000"
            headers = signed_headers(private_key=key, serial=serial, body=notice.body,
                                     timestamp=str(int(self._clock())), nonce=new_nonce())
            if kind == "signtest":
                headers["Wechatpay-Signature"] = SIGNTEST_PREFIX + secrets.token_urlsafe(24)
            headers["Content-Type"] = "application/json"
            headers["Request-ID"] = uuid.uuid4().hex.upper()
            if barrier is not None:
                with contextlib.suppress(threading.BrokenBarrierError):
                    barrier.wait(timeout=5)
            status: int | None = None
            error: str | None = None
            try:
                status = self._http.post(notice.url, content=notice.body,
                                         headers=headers).status_code
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.deliveries.append(Delivery(notice.id, notice.event_type,
                                                notice.out_trade_no, kind, attempt, status,
                                                error, self._clock()))
                delivered = status is not None and 200 <= status < 300
                if retry and not delivered and attempt < len(self.retry_schedule):
                    wait = self.retry_schedule[attempt] * self.retry_scale
                    self._at(wait, lambda: self._spawn(notice, attempt + 1))
        finally:
            with self._wake:
                self._busy -= 1
                self._wake.notify_all()

    def _at(self, delay_s: float, job: Callable[[], None]) -> None:
        with self._wake:
            heapq.heappush(self._timers, (time.monotonic() + delay_s, next(self._seq), job))
            self._wake.notify_all()

    def _run_timers(self) -> None:
        with self._wake:
            while not self._stopping:
                if not self._timers:
                    self._wake.wait()
                    continue
                due, _, job = self._timers[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                heapq.heappop(self._timers)
                self._busy += 1
                try:
                    job()
                except Exception:
                    log.exception("fake WeChat Pay timer failed")
                finally:
                    self._busy -= 1

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until nothing is scheduled or being delivered; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._timers or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, 0.05))
        return True

    # -- the page that "pays", and the control API for tests in other processes ----------

    def _handle_page(self, handler: _Handler, method: str, path: str, raw: bytes) -> None:
        parts = [unquote(p) for p in path.split("/")[1:] if p]
        try:
            if parts == ["_fake", "control"] and method == "POST":
                payload = self._control(_json_body(raw))
                self._write(handler, 200, json.dumps(payload, ensure_ascii=False).encode(),
                            "application/json", {})
                return
            if parts == [] and method == "GET":
                self._page(handler, 200, self._index_html())
                return
            if len(parts) == 2 and parts[0] == "pay":
                if method == "POST":
                    form = parse_qs(raw.decode("utf-8", "replace"))
                    openid = form.get("openid", [""])[-1].strip() or None
                    self.pay(parts[1], openid=openid)
                    self._page(handler, 200, _page("支付成功", f"<p class=ok>支付成功：订单 "
                                                   f"{html.escape(parts[1])}。通知已发往商户。</p>"))
                    return
                with self._lock:
                    order = self._order(parts[1])
                    self._page(handler, 200, _order_html(order))
                return
            self._page(handler, 404, _page("未找到", "<p>没有这个页面。</p>"))
        except _PayFailure as failure:
            if parts[:2] == ["_fake", "control"]:
                self._write(handler, failure.status, json.dumps(
                    {"code": failure.code, "message": failure.message},
                    ensure_ascii=False).encode(), "application/json", {})
                return
            self._page(handler, failure.status,
                       _page("支付失败", f"<p class=err>{html.escape(failure.message)}</p>"))

    def _page(self, handler: _Handler, status: int, text: str) -> None:
        self._write(handler, status, text.encode(), "text/html; charset=utf-8", {})

    def _index_html(self) -> str:
        with self._lock:
            rows = "".join(
                f"<li><a href='/pay/{html.escape(o.out_trade_no)}'>{html.escape(o.out_trade_no)}"
                f"</a> {html.escape(str(o.body.get('description')))} ¥{o.total_fen / 100:.2f} "
                f"{o.state}</li>" for o in self.orders.values())
        return _page("假微信支付", f"<ul>{rows or '<li>还没有订单</li>'}</ul>")

    def _control(self, body: JSONDict) -> JSONDict:
        """Switches for a fake in another process: ``{"action": …, …}``."""
        action = body.pop("action", None)
        if action == "fail_next":
            self.fail_next(**body)
        elif action == "delay_next":
            self.delay_next(**body)
        elif action == "forge_next":
            self.forge_next(**body)
        elif action == "misbehave_next":
            self.misbehave_next(*body.get("kinds", []))
        elif action == "pay":
            self.pay(body["out_trade_no"], openid=body.get("openid"))
        elif action == "set":
            for name in ("sign_with", "notify_copies", "simultaneous", "refund_outcome",
                         "refund_delay_s", "retry_scale"):
                if name in body:
                    setattr(self, name, body[name])
        elif action == "wait_idle":
            return {"idle": self.wait_idle(float(body.get("timeout", 10)))}
        elif action != "state":
            raise _PayFailure(400, "PARAM_ERROR", f"unknown action {action!r}")
        with self._lock:
            return {"orders": {no: o.state for no, o in self.orders.items()},
                    "refunds": {no: r.status for no, r in self.refunds.items()},
                    "deliveries": len(self.deliveries)}


@functools.cache
def _tls() -> ssl.SSLContext:
    # Building a context costs ~80 ms; tests start many fakes.
    return ssl.create_default_context()


def _notify_client() -> httpx.Client:
    return httpx.Client(timeout=5.0, verify=_tls())


def _json_body(raw: bytes) -> JSONDict:
    try:
        body = json.loads(raw)
    except ValueError:
        raise _PayFailure(400, "PARAM_ERROR", "请求体不是合法的 JSON") from None
    if not isinstance(body, dict):
        raise _PayFailure(400, "PARAM_ERROR", "请求体不是 JSON 对象")
    return body


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_notify_url(url: str) -> bool:
    # WeChat wants HTTPS without a query; the fake also accepts loopback http for the bot.
    loopback = url.startswith(("http://127.0.0.1", "http://localhost"))
    return (url.startswith("https://") or loopback) and "?" not in url


def _check_order_body(body: JSONDict, *, jsapi: bool, clock: Callable[[], float]) -> None:
    for name in ("appid", "mchid", "description", "out_trade_no", "notify_url"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise _PayFailure(400, "PARAM_ERROR", f"输入源“/body/{name}”映射到字段“{name}”"
                                                  "必填性规则校验失败，此字段为必填项")
    if not _OUT_NO.fullmatch(body["out_trade_no"]):
        raise _PayFailure(400, "PARAM_ERROR", "out_trade_no 须为 6-32 位数字、字母或 _-|*")
    if len(body["description"]) > 127:
        raise _PayFailure(400, "PARAM_ERROR", "description 超过 127 个字符")
    if not _is_notify_url(body["notify_url"]):
        raise _PayFailure(400, "PARAM_ERROR", "notify_url 必须是 https 且不带参数")
    amount = body.get("amount")
    if not (isinstance(amount, dict) and _positive_int(amount.get("total"))
            and amount.get("currency", "CNY") == "CNY"):
        raise _PayFailure(400, "PARAM_ERROR", "amount.total 必须是正整数（分）")
    if "time_expire" in body:
        try:
            expire = datetime.fromisoformat(str(body["time_expire"]))
        except ValueError:
            raise _PayFailure(400, "PARAM_ERROR", "time_expire 格式错误") from None
        if expire.tzinfo is None or expire.timestamp() <= clock():
            raise _PayFailure(400, "PARAM_ERROR", "time_expire 必须是未来的带时区时间")
    payer = body.get("payer")
    if jsapi and not (isinstance(payer, dict) and isinstance(payer.get("openid"), str)
                      and payer["openid"]):
        raise _PayFailure(400, "PARAM_ERROR", "JSAPI 下单须填 payer.openid")


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, CHINA).isoformat(timespec="seconds")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=zh><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width'><title>{html.escape(title)}"
            f"</title><style>body{{font:16px sans-serif;max-width:28em;margin:2em auto;"
            f"padding:0 1em}}.ok{{color:#07c160}}.err{{color:#c00}}button{{background:#07c160;"
            f"color:#fff;border:0;padding:.6em 2em;font-size:1em}}</style>"
            f"<h1>{html.escape(title)}</h1>{body}<p><small>假微信支付（本机测试用，"
            f"不会扣款）</small></p></html>")


def _order_html(order: FakeOrder) -> str:
    owner = order.body.get("payer", {}).get("openid", "")
    info = (f"<p>{html.escape(str(order.body.get('description')))}</p>"
            f"<p><b>¥{order.total_fen / 100:.2f}</b>（订单 {html.escape(order.out_trade_no)}，"
            f"{_TRADE_STATE_DESC[order.state]}）</p>")
    if order.state != "NOTPAY":
        return _page("订单", info)
    form = (f"<form method=post><label>付款人 openid <input name=openid "
            f"value='{html.escape(owner, quote=True)}'></label>"
            f"<p><button>确认支付</button></p></form>")
    return _page("确认付款", info + form)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a fake WeChat Pay (API v3) on loopback.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--keys-dir", type=Path, required=True,
                        help="where to write the keys and pay.toml for the bot's [pay] section")
    parser.add_argument("--mch-id", default="1900000001")
    parser.add_argument("--app-id", default="wx_fake")
    parser.add_argument("--sign-with", choices=["public_key", "certificate"],
                        default="public_key")
    parser.add_argument("--config-mode", choices=["public_key", "certificate", "both"],
                        default="both", help="which verification keys pay.toml lists")
    parser.add_argument("--retry-scale", type=float, default=0.01,
                        help="factor on WeChat's notification retry intervals (1 = real time)")
    parser.add_argument("--refund-delay", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    identity = FakeIdentity.generate(mch_id=args.mch_id, app_id=args.app_id)
    fake = FakeWeChatPay(identity, host=args.host, port=args.port, sign_with=args.sign_with,
                         retry_scale=args.retry_scale, refund_delay_s=args.refund_delay)
    with fake:
        table = identity.pay_table(args.keys_dir, fake.base_url, mode=args.config_mode)
        (args.keys_dir / "pay.toml").write_text(_toml_pay(table), encoding="utf-8")
        (args.keys_dir / "pay.toml").chmod(0o600)
        # The parent process reads this first line to find the port.
        sys.stdout.write(fake.base_url + "\n")
        sys.stdout.flush()
        stopping.wait()
    return 0


def _toml_pay(table: JSONDict) -> str:
    lines = ["# Written by python -m bot.pay.fake: a [pay] section for its keys.", "[pay]"]
    packages = table.pop("packages")
    lines += [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in table.items()]
    for package in packages:
        lines += ["", "[[pay.packages]]"]
        lines += [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in package.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
