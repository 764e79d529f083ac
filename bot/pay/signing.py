"""WeChat Pay API v3 signatures and notification decryption, on ``cryptography``.

- Requests carry ``Authorization: WECHATPAY2-SHA256-RSA2048 mchid=…,nonce_str=…,…`` whose
  signature is RSA-SHA256 (PKCS#1 v1.5) with the merchant key over
  ``METHOD\\nPATH?QUERY\\nTIMESTAMP\\nNONCE\\nBODY\\n``.
- WeChat signs its answers and notifications over ``TIMESTAMP\\nNONCE\\nBODY\\n`` of the raw
  body, with the key the ``Wechatpay-Serial`` header names.
- A notification's ``resource`` is AEAD_AES_256_GCM-encrypted with the APIv3 key.

Each refusal is its own exception type with a short ``reason`` for the one log line the
notify endpoint writes; nothing here logs or touches the network."""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256

from bot.pay.keys import VerifyKeys

SCHEME: Final = "WECHATPAY2-SHA256-RSA2048"
# WeChat probes notify endpoints with signatures starting with this; they must be refused.
SIGNTEST_PREFIX: Final = "WECHATPAY/SIGNTEST/"
MAX_SKEW_S: Final = 300
GCM_ALGORITHM: Final = "AEAD_AES_256_GCM"
GCM_NONCE_BYTES: Final = 12

HEADER_SIGNATURE: Final = "Wechatpay-Signature"
HEADER_TIMESTAMP: Final = "Wechatpay-Timestamp"
HEADER_NONCE: Final = "Wechatpay-Nonce"
HEADER_SERIAL: Final = "Wechatpay-Serial"
HEADER_SIGNATURE_TYPE: Final = "Wechatpay-Signature-Type"

_AUTH_PARAM = re.compile(r'\s*([a-z_]+)="([^"]*)"\s*(?:,|$)')


class VerificationError(Exception):
    """WeChat Pay's signature or encryption did not check out; ``reason`` is short and
    safe to log (it never contains a key or the body)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MissingSignature(VerificationError):
    """A Wechatpay-* header is missing or empty."""


class SignTestProbe(VerificationError):
    """A ``WECHATPAY/SIGNTEST/`` probe: WeChat checks that we refuse bad signatures."""


class StaleTimestamp(VerificationError):
    """Wechatpay-Timestamp is more than five minutes from our clock (or not a number)."""


class UnknownSerial(VerificationError):
    """Wechatpay-Serial names no key we hold (neither a public key id nor a certificate)."""


class BadSignature(VerificationError):
    """The signature does not match the body with the key the serial names."""


class DecryptionFailed(VerificationError):
    """The resource could not be decrypted: wrong APIv3 key, or altered/truncated data."""


class MalformedNotification(VerificationError):
    """The body is not a notification of the shape WeChat Pay sends."""


# -- our side: signing --------------------------------------------------------------------------

def new_nonce() -> str:
    return secrets.token_hex(16).upper()


def rsa_sign(private_key: RSAPrivateKey, message: bytes) -> str:
    return base64.b64encode(private_key.sign(message, PKCS1v15(), SHA256())).decode("ascii")


def rsa_verify(public_key: RSAPublicKey, message: bytes, signature: str) -> bool:
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    try:
        public_key.verify(raw, message, PKCS1v15(), SHA256())
    except InvalidSignature:
        return False
    return True


def request_message(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """What a request signature covers; ``path`` includes ``?query`` when there is one."""
    return f"{method.upper()}\n{path}\n{timestamp}\n{nonce}\n".encode() + body + b"\n"


def authorization(*, mch_id: str, serial_no: str, private_key: RSAPrivateKey, method: str,
                  path: str, body: bytes, timestamp: str, nonce: str) -> str:
    """The Authorization header of one API request."""
    signature = rsa_sign(private_key, request_message(method, path, timestamp, nonce, body))
    return (f'{SCHEME} mchid="{mch_id}",nonce_str="{nonce}",timestamp="{timestamp}",'
            f'serial_no="{serial_no}",signature="{signature}"')


def parse_authorization(header: str) -> dict[str, str] | None:
    """The parameters of an Authorization header, or None when it is not ours to read."""
    scheme, _, rest = header.partition(" ")
    if scheme != SCHEME:
        return None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        match = _AUTH_PARAM.match(rest, pos)
        if match is None:
            return None
        params[match.group(1)] = match.group(2)
        pos = match.end()
    return params


def jsapi_pay_params(*, app_id: str, prepay_id: str, private_key: RSAPrivateKey,
                     timestamp: str, nonce: str) -> dict[str, str]:
    """The argument of ``WeixinJSBridge.invoke('getBrandWCPayRequest', …)``."""
    package = f"prepay_id={prepay_id}"
    message = f"{app_id}\n{timestamp}\n{nonce}\n{package}\n".encode()
    return {"appId": app_id, "timeStamp": timestamp, "nonceStr": nonce, "package": package,
            "signType": "RSA", "paySign": rsa_sign(private_key, message)}


def response_message(timestamp: str, nonce: str, body: bytes) -> bytes:
    """What WeChat's signature of an answer or notification covers."""
    return f"{timestamp}\n{nonce}\n".encode() + body + b"\n"


def signed_headers(*, private_key: RSAPrivateKey, serial: str, body: bytes, timestamp: str,
                   nonce: str) -> dict[str, str]:
    """The Wechatpay-* headers WeChat puts on an answer or a notification (used by the fake)."""
    return {HEADER_NONCE: nonce, HEADER_TIMESTAMP: timestamp, HEADER_SERIAL: serial,
            HEADER_SIGNATURE_TYPE: SCHEME,
            HEADER_SIGNATURE: rsa_sign(private_key, response_message(timestamp, nonce, body))}


# -- WeChat's side: verifying -------------------------------------------------------------------

def verify_signed(headers: Mapping[str, str], body: bytes, keys: VerifyKeys, *, now: float,
                  max_skew_s: int = MAX_SKEW_S) -> str:
    """Check WeChat Pay's signature on an answer or notification; the serial that signed it.
    ``body`` must be the raw bytes as received: re-encoded JSON would not verify."""
    lowered = {k.lower(): v for k, v in headers.items()}

    def header(name: str) -> str:
        value = lowered.get(name.lower(), "").strip()
        if not value:
            raise MissingSignature(f"no {name} header")
        return value

    signature = header(HEADER_SIGNATURE)
    if signature.startswith(SIGNTEST_PREFIX):
        raise SignTestProbe("signature test probe (WECHATPAY/SIGNTEST/)")
    timestamp, nonce, serial = header(HEADER_TIMESTAMP), header(HEADER_NONCE), header(HEADER_SERIAL)
    kind = lowered.get(HEADER_SIGNATURE_TYPE.lower())
    if kind is not None and kind.strip() != SCHEME:
        raise BadSignature(f"unsupported signature type {kind.strip()[:40]!r}")
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise StaleTimestamp("Wechatpay-Timestamp is not a number")
    skew = int(timestamp) - now
    if abs(skew) > max_skew_s:
        raise StaleTimestamp(f"timestamp {abs(skew):.0f} s in the "
                             f"{'future' if skew > 0 else 'past'} (limit {max_skew_s} s)")
    key = keys.find(serial)
    if key is None:
        raise UnknownSerial(f"unknown Wechatpay-Serial {serial[:64]!r}")
    if not rsa_verify(key, response_message(timestamp, nonce, body), signature):
        raise BadSignature(f"signature does not match the body (serial {serial[:64]})")
    return serial


def encrypt_resource(plaintext: bytes, apiv3_key: bytes, *, associated_data: str,
                     original_type: str, nonce: str | None = None) -> dict[str, str]:
    """A notification ``resource`` as WeChat builds it (used by the fake and tests)."""
    nonce = nonce or secrets.token_hex(GCM_NONCE_BYTES // 2)
    sealed = AESGCM(apiv3_key).encrypt(nonce.encode(), plaintext, associated_data.encode())
    return {"original_type": original_type, "algorithm": GCM_ALGORITHM,
            "ciphertext": base64.b64encode(sealed).decode("ascii"),
            "associated_data": associated_data, "nonce": nonce}


def decrypt_resource(resource: Mapping[str, Any], apiv3_key: bytes) -> bytes:
    """The plaintext of a notification ``resource``; the GCM tag authenticates it."""
    if resource.get("algorithm") != GCM_ALGORITHM:
        raise MalformedNotification(f"resource algorithm {str(resource.get('algorithm'))[:30]!r}"
                                    f" is not {GCM_ALGORITHM}")
    ciphertext, nonce = resource.get("ciphertext"), resource.get("nonce")
    associated = resource.get("associated_data", "")
    if not (isinstance(ciphertext, str) and isinstance(nonce, str)
            and isinstance(associated, str)):
        raise MalformedNotification("resource lacks ciphertext, nonce or associated_data")
    if len(nonce.encode()) != GCM_NONCE_BYTES:
        raise MalformedNotification("resource nonce is not 12 bytes")
    try:
        sealed = base64.b64decode(ciphertext, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedNotification("resource ciphertext is not base64") from None
    try:
        return AESGCM(apiv3_key).decrypt(nonce.encode(), sealed, associated.encode())
    except InvalidTag:
        raise DecryptionFailed("resource does not decrypt: wrong APIv3 key, or the data "
                               "was altered or truncated") from None


@dataclass(frozen=True)
class Notification:
    """A verified, decrypted notification. ``resource`` is the decrypted object: a
    transaction for TRANSACTION.*, a refund for REFUND.*."""

    id: str
    event_type: str
    create_time: str
    summary: str
    original_type: str
    resource: dict[str, Any]
    serial: str


def verify_notification(headers: Mapping[str, str], raw_body: bytes, keys: VerifyKeys,
                        now: float) -> Notification:
    """Verify and decrypt a notification POSTed to the notify URL, or raise a
    :class:`VerificationError`. Checking the resource against our own order (mchid, appid,
    amount, payer) and crediting it exactly once are the caller's job."""
    serial = verify_signed(headers, raw_body, keys, now=now)
    try:
        envelope = json.loads(raw_body)
    except ValueError:
        raise MalformedNotification("body is not JSON") from None
    if not isinstance(envelope, dict):
        raise MalformedNotification("body is not a JSON object")
    resource = envelope.get("resource")
    event_type, notification_id = envelope.get("event_type"), envelope.get("id")
    if not (isinstance(resource, dict) and isinstance(event_type, str)
            and isinstance(notification_id, str)):
        raise MalformedNotification("body lacks id, event_type or resource")
    if envelope.get("resource_type") != "encrypt-resource":
        raise MalformedNotification("resource_type is not encrypt-resource")
    try:
        decrypted = json.loads(decrypt_resource(resource, keys.apiv3_key))
    except ValueError:
        raise MalformedNotification("decrypted resource is not JSON") from None
    if not isinstance(decrypted, dict):
        raise MalformedNotification("decrypted resource is not a JSON object")
    return Notification(
        id=notification_id, event_type=event_type,
        create_time=str(envelope.get("create_time", "")),
        summary=str(envelope.get("summary", "")),
        original_type=str(resource.get("original_type", "")),
        resource=decrypted, serial=serial)
