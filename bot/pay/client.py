"""The WeChat Pay API v3 client: the only code that talks to WeChat Pay.

Every request is signed; every answer's signature is checked before its body is read, and an
answer that does not verify is refused (a 2xx without a valid signature is a forgery).
Retries happen only where WeChat makes them safe: every call here is repeatable with the same
out_trade_no or out_refund_no and the same body, so the caller must store those keys before
the first attempt."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote, urlencode

import httpx
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from bot import __version__
from bot.pay.keys import VerifyKeys, load_certificates, load_private_key, load_public_key
from bot.pay.signing import (
    VerificationError,
    authorization,
    jsapi_pay_params,
    new_nonce,
    verify_signed,
)
from bot.settings import PaySettings

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]

CONNECT_TIMEOUT_S: Final = 3.0
READ_TIMEOUT_S: Final = 10.0
BACKOFF_BASE_S: Final = 0.5
BACKOFF_CAP_S: Final = 8.0
# WeChat's advice for these is "retry with the same parameters".
RETRYABLE_CODES: Final = frozenset({"SYSTEM_ERROR", "BANK_ERROR", "FREQUENCY_LIMITED"})
# Local codes for failures that never got a WeChat answer.
CODE_NETWORK: Final = "NETWORK"
CODE_HTTP: Final = "HTTP_STATUS"


class PayError(Exception):
    """A WeChat Pay call failed; ``code`` is WeChat's (``PARAM_ERROR``, ``ORDER_NOT_EXIST``…)
    or a local one (``NETWORK``, ``HTTP_STATUS``)."""

    def __init__(self, code: str, message: str, *, status: int | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(f"WeChat Pay {code}: {message}"
                         + (f" (Request-ID {request_id})" if request_id else ""))
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id


class PayApiError(PayError):
    """WeChat Pay answered with an error body ``{code, message}``. ``verified`` is False when
    the answer carried no signature (WeChat signs nothing when it rejects ours: 401), so it
    should not decide anything irreversible."""

    def __init__(self, code: str, message: str, *, status: int, request_id: str | None,
                 verified: bool, detail: Any = None) -> None:
        super().__init__(code, message, status=status, request_id=request_id)
        self.verified = verified
        self.detail = detail


class PayTransientError(PayError):
    """No usable answer after the retries: network failure, timeout, 5xx, rate limit.
    ``maybe_processed``: the request may have taken effect at WeChat; query before acting."""

    def __init__(self, code: str, message: str, *, status: int | None = None,
                 request_id: str | None = None, maybe_processed: bool = True) -> None:
        super().__init__(code, message, status=status, request_id=request_id)
        self.maybe_processed = maybe_processed


class PayUnverifiedResponse(PayError):
    """An answer whose WeChat Pay signature did not verify; it is ignored, not trusted."""

    def __init__(self, failure: VerificationError, *, status: int,
                 request_id: str | None) -> None:
        super().__init__("UNVERIFIED_RESPONSE", failure.reason, status=status,
                         request_id=request_id)
        self.failure = failure


@dataclass(frozen=True)
class Transaction:
    """An order as WeChat Pay reports it (query, or a TRANSACTION.* notification)."""

    out_trade_no: str
    trade_state: str  # SUCCESS, NOTPAY, CLOSED, REFUND, USERPAYING, PAYERROR, REVOKED
    appid: str
    mchid: str
    transaction_id: str | None
    total_fen: int | None
    currency: str | None
    payer_openid: str | None
    success_time: str | None
    trade_state_desc: str
    raw: JSONDict

    @classmethod
    def from_json(cls, data: JSONDict) -> Transaction:
        amount, payer = _object(data, "amount"), _object(data, "payer")
        return cls(
            out_trade_no=str(data.get("out_trade_no", "")),
            trade_state=str(data.get("trade_state", "")),
            appid=str(data.get("appid", "")), mchid=str(data.get("mchid", "")),
            transaction_id=_opt_str(data.get("transaction_id")),
            total_fen=_opt_int(amount.get("total")), currency=_opt_str(amount.get("currency")),
            payer_openid=_opt_str(payer.get("openid")),
            success_time=_opt_str(data.get("success_time")),
            trade_state_desc=str(data.get("trade_state_desc", "")), raw=data)


@dataclass(frozen=True)
class Refund:
    """A refund as WeChat Pay reports it (create, query, or a REFUND.* notification)."""

    out_refund_no: str
    out_trade_no: str
    refund_id: str | None
    status: str  # PROCESSING, SUCCESS, CLOSED, ABNORMAL
    refund_fen: int | None
    total_fen: int | None
    raw: JSONDict

    @classmethod
    def from_json(cls, data: JSONDict) -> Refund:
        amount = _object(data, "amount")
        # Queries say "status"; REFUND.* notifications say "refund_status".
        status = data.get("status", data.get("refund_status", ""))
        return cls(out_refund_no=str(data.get("out_refund_no", "")),
                   out_trade_no=str(data.get("out_trade_no", "")),
                   refund_id=_opt_str(data.get("refund_id")), status=str(status),
                   refund_fen=_opt_int(amount.get("refund")),
                   total_fen=_opt_int(amount.get("total")), raw=data)


def _object(data: JSONDict, name: str) -> JSONDict:
    value = data.get(name)
    return value if isinstance(value, dict) else {}


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def verify_keys(settings: PaySettings) -> VerifyKeys:
    """The keys that verify WeChat Pay for this merchant: public key and/or certificates."""
    groups = []
    if settings.wechatpay_public_key_file is not None:
        groups.append({settings.wechatpay_public_key_id:
                       load_public_key(settings.wechatpay_public_key_file)})
    if settings.platform_certificates_dir is not None:
        groups.append(load_certificates(settings.platform_certificates_dir))
    return VerifyKeys.of(settings.apiv3_key.encode("utf-8"), *groups)


class PayClient:
    """Thread-safe; one per process is enough."""

    def __init__(
        self,
        *,
        mch_id: str,
        app_id: str,
        merchant_serial_no: str,
        private_key: RSAPrivateKey,
        keys: VerifyKeys,
        api_base: str,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        max_retries: int = 2,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
        rng: random.Random | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.mch_id = mch_id
        self.app_id = app_id
        self._serial_no = merchant_serial_no
        self._private_key = private_key
        self.keys = keys
        self._base = api_base.rstrip("/")
        timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s,
                                write=read_timeout_s, pool=connect_timeout_s)
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=timeout)
        self._timeout = timeout
        self._clock = clock
        self._sleep = sleep
        self._max_retries = max_retries
        self._rng = rng or random.Random()

    @classmethod
    def from_settings(cls, settings: PaySettings, **kwargs: Any) -> PayClient:
        return cls(mch_id=settings.mch_id, app_id=settings.app_id,
                   merchant_serial_no=settings.merchant_serial_no,
                   private_key=load_private_key(settings.merchant_private_key_file),
                   keys=verify_keys(settings), api_base=settings.api_base, **kwargs)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> PayClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- orders ----------------------------------------------------------------------------

    def create_jsapi_order(self, *, out_trade_no: str, description: str, total_fen: int,
                           openid: str, notify_url: str, time_expire: datetime,
                           attach: str | None = None) -> str:
        """Place a JSAPI order (paid inside WeChat by ``openid``); the prepay_id. Placing it
        again is safe only with identical arguments (store ``time_expire`` with the order):
        WeChat answers the same prepay_id, and refuses a different body under that number."""
        body = self._order_body(out_trade_no, description, total_fen, notify_url, time_expire,
                                attach)
        body["payer"] = {"openid": openid}
        answer = self._call("POST", "/v3/pay/transactions/jsapi", body=body)
        return _required_str(answer, "prepay_id")

    def create_native_order(self, *, out_trade_no: str, description: str, total_fen: int,
                            notify_url: str, time_expire: datetime,
                            attach: str | None = None) -> str:
        """Place a Native order (a QR code scanned with 扫一扫); the code_url."""
        body = self._order_body(out_trade_no, description, total_fen, notify_url, time_expire,
                                attach)
        answer = self._call("POST", "/v3/pay/transactions/native", body=body)
        return _required_str(answer, "code_url")

    def submit_order(self, kind: str, request_json: str) -> str:
        """Place an order from the body stored with it (storage.payments.new_order), so a
        retry sends exactly the same bytes; the prepay_id (jsapi) or the code_url (native)."""
        body = json.loads(request_json)
        if kind not in ("jsapi", "native") or not isinstance(body, dict):
            raise ValueError(f"cannot submit a {kind!r} order")
        if body.get("mchid") != self.mch_id or body.get("appid") != self.app_id:
            raise ValueError("the stored order is for another merchant or app")
        answer = self._call("POST", f"/v3/pay/transactions/{kind}", body=body)
        return _required_str(answer, "prepay_id" if kind == "jsapi" else "code_url")

    def jsapi_params(self, prepay_id: str) -> dict[str, str]:
        """The signed argument of ``getBrandWCPayRequest`` for a prepay_id."""
        return jsapi_pay_params(app_id=self.app_id, prepay_id=prepay_id,
                                private_key=self._private_key,
                                timestamp=str(int(self._clock())), nonce=new_nonce())

    def query_order(self, out_trade_no: str) -> Transaction:
        answer = self._call("GET", f"/v3/pay/transactions/out-trade-no/{_segment(out_trade_no)}",
                            query={"mchid": self.mch_id})
        return Transaction.from_json(answer)

    def close_order(self, out_trade_no: str) -> None:
        """Close an unpaid order; closing a closed one again is harmless."""
        self._call("POST", f"/v3/pay/transactions/out-trade-no/{_segment(out_trade_no)}/close",
                   body={"mchid": self.mch_id})

    def _order_body(self, out_trade_no: str, description: str, total_fen: int,
                    notify_url: str, time_expire: datetime, attach: str | None) -> JSONDict:
        if time_expire.tzinfo is None:
            raise ValueError("time_expire must be timezone-aware")
        body: JSONDict = {
            "appid": self.app_id, "mchid": self.mch_id, "description": description,
            "out_trade_no": out_trade_no, "notify_url": notify_url,
            "time_expire": time_expire.isoformat(timespec="seconds"),
            "amount": {"total": total_fen, "currency": "CNY"},
        }
        if attach:
            body["attach"] = attach
        return body

    # -- refunds ---------------------------------------------------------------------------

    def create_refund(self, *, out_trade_no: str, out_refund_no: str, refund_fen: int,
                      total_fen: int, reason: str, notify_url: str | None = None) -> Refund:
        """Ask for a refund; repeating it with the same out_refund_no is safe. The outcome
        usually comes later (status PROCESSING, then a REFUND.* notification)."""
        body: JSONDict = {"out_trade_no": out_trade_no, "out_refund_no": out_refund_no,
                          "reason": reason,
                          "amount": {"refund": refund_fen, "total": total_fen,
                                     "currency": "CNY"}}
        if notify_url:
            body["notify_url"] = notify_url
        return Refund.from_json(self._call("POST", "/v3/refund/domestic/refunds", body=body))

    def query_refund(self, out_refund_no: str) -> Refund:
        return Refund.from_json(
            self._call("GET", f"/v3/refund/domestic/refunds/{_segment(out_refund_no)}"))

    # -- platform certificates -------------------------------------------------------------

    def download_certificates(self, trust: Callable[[bytes], VerifyKeys]) -> JSONDict:
        """``GET /v3/certificates``. Its answer is verified with the keys ``trust`` returns for
        the raw body (which may name a certificate from that very body on a first download);
        ``trust`` may raise VerificationError to refuse the answer before that."""
        return self._call("GET", "/v3/certificates", keys_for=trust)

    # -- transport -------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, body: JSONDict | None = None,
              query: Mapping[str, str] | None = None,
              keys_for: Callable[[bytes], VerifyKeys] | None = None) -> JSONDict:
        # Serialised once: every attempt sends, and signs, exactly the same bytes.
        data = b"" if body is None else json.dumps(
            body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        target = path + (f"?{urlencode(query)}" if query else "")
        attempt = 0
        while True:
            try:
                return self._attempt(method, target, data, keys_for)
            except PayTransientError as exc:
                if attempt >= self._max_retries:
                    raise
                attempt += 1
                delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
                delay *= 0.5 + self._rng.random() / 2
                log.warning("WeChat Pay %s %s failed (%s); retry %d in %.1f s", method, path,
                            exc.code, attempt, delay)
                self._sleep(delay)

    def _attempt(self, method: str, target: str, data: bytes,
                 keys_for: Callable[[bytes], VerifyKeys] | None = None) -> JSONDict:
        headers = {
            "Accept": "application/json",
            "User-Agent": f"newsbot/{__version__}",
            "Authorization": authorization(
                mch_id=self.mch_id, serial_no=self._serial_no, private_key=self._private_key,
                method=method, path=target, body=data, timestamp=str(int(self._clock())),
                nonce=new_nonce()),
        }
        if data:
            headers["Content-Type"] = "application/json"
        try:
            response = self._http.request(method, self._base + target, content=data or None,
                                          headers=headers, timeout=self._timeout)
        except httpx.TimeoutException as exc:
            # A write or read timeout may come after WeChat acted on the request.
            sent = not isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
            raise PayTransientError(CODE_NETWORK, f"timeout: {type(exc).__name__}",
                                    maybe_processed=sent) from exc
        except httpx.HTTPError as exc:
            sent = not isinstance(exc, httpx.ConnectError)
            raise PayTransientError(CODE_NETWORK, f"{type(exc).__name__}: {exc}",
                                    maybe_processed=sent) from exc
        return self._answer(response, keys_for)

    def _answer(self, response: httpx.Response,
                keys_for: Callable[[bytes], VerifyKeys] | None = None) -> JSONDict:
        status, request_id = response.status_code, response.headers.get("Request-ID")
        signed = "wechatpay-signature" in response.headers
        if 200 <= status < 300 or signed:
            try:
                keys = self.keys
                if keys_for is not None and 200 <= status < 300:
                    keys = keys_for(response.content)
                verify_signed(response.headers, response.content, keys, now=self._clock())
            except VerificationError as failure:
                log.error("WeChat Pay answer refused (status %d, Request-ID %s): %s", status,
                          request_id, failure.reason)
                raise PayUnverifiedResponse(failure, status=status,
                                            request_id=request_id) from failure
        payload = _json_object(response.content)
        if 200 <= status < 300:
            if payload is None and response.content:
                raise PayError("BAD_RESPONSE", "answer is not a JSON object", status=status,
                               request_id=request_id)
            return payload or {}
        code = str(payload.get("code")) if payload and payload.get("code") else CODE_HTTP
        message = str(payload.get("message", "")) if payload else f"HTTP {status}"
        if status >= 500 or status == 429 or code in RETRYABLE_CODES:
            raise PayTransientError(code, message or f"HTTP {status}", status=status,
                                    request_id=request_id)
        raise PayApiError(code, message, status=status, request_id=request_id,
                          verified=signed, detail=payload.get("detail") if payload else None)


def _json_object(content: bytes) -> JSONDict | None:
    if not content:
        return None
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _required_str(answer: JSONDict, name: str) -> str:
    value = answer.get(name)
    if not isinstance(value, str) or not value:
        raise PayError("BAD_RESPONSE", f"answer lacks {name}")
    return value


def _segment(value: str) -> str:
    return quote(value, safe="")
