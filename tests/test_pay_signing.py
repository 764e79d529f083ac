"""bot.pay.signing: our request signatures, and every check on WeChat Pay's signatures and
encrypted resources. Each refusal test names the guard it proves."""

from __future__ import annotations

import base64
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.hashes import SHA256

from bot.pay.keys import VerifyKeys, normalise_serial
from bot.pay.signing import (
    BadSignature,
    DecryptionFailed,
    MalformedNotification,
    MissingSignature,
    SignTestProbe,
    StaleTimestamp,
    UnknownSerial,
    authorization,
    decrypt_resource,
    encrypt_resource,
    jsapi_pay_params,
    parse_authorization,
    signed_headers,
    verify_notification,
    verify_signed,
)
from tests.pay_support import identity, verify_keys

NOW = 1_760_000_000.0
BODY = json.dumps({"prepay_id": "wx201410272009395522657a690389285100"}).encode()


def sign(body: bytes, *, by: str = "public_key", timestamp: float = NOW,
         serial: str | None = None) -> dict[str, str]:
    ident = identity()
    if by == "public_key":
        key, default_serial = ident.platform_key, ident.public_key_id
    elif by == "certificate":
        key, default_serial = ident.certificate_key, ident.certificate_serial
    else:
        key, default_serial = ident.stranger_key, ident.public_key_id
    return signed_headers(private_key=key, serial=serial or default_serial, body=body,
                          timestamp=str(int(timestamp)), nonce="593BEC0C930BF1AFEB40B4A08C8FB242")


def notification_body(resource: dict[str, object], *, event: str = "TRANSACTION.SUCCESS",
                      apiv3_key: bytes | None = None) -> bytes:
    sealed = encrypt_resource(json.dumps(resource).encode(), apiv3_key or identity().apiv3_key,
                              associated_data="transaction", original_type="transaction")
    return json.dumps({"id": "EV-2018022511223320873", "create_time": "2025-01-01T10:00:00+08:00",
                       "resource_type": "encrypt-resource", "event_type": event,
                       "summary": "支付成功", "resource": sealed}).encode()


# -- our signatures ------------------------------------------------------------------------------

def test_authorization_signs_method_path_time_nonce_and_body() -> None:
    ident = identity()
    header = authorization(mch_id="1900000001", serial_no="ABC123", private_key=ident.merchant_key,
                           method="post", path="/v3/pay/transactions/jsapi", body=b'{"a":1}',
                           timestamp="1554208460", nonce="N0NCE")
    params = parse_authorization(header)
    assert params is not None and header.startswith("WECHATPAY2-SHA256-RSA2048 ")
    assert {k: params[k] for k in ("mchid", "serial_no", "timestamp", "nonce_str")} == {
        "mchid": "1900000001", "serial_no": "ABC123", "timestamp": "1554208460",
        "nonce_str": "N0NCE"}
    expected = b'POST\n/v3/pay/transactions/jsapi\n1554208460\nN0NCE\n{"a":1}\n'
    ident.merchant_key.public_key().verify(base64.b64decode(params["signature"]), expected,
                                           PKCS1v15(), SHA256())


def test_jsapi_pay_sign_covers_app_id_time_nonce_and_package() -> None:
    ident = identity()
    params = jsapi_pay_params(app_id="wx_fake", prepay_id="wx2017", private_key=ident.merchant_key,
                              timestamp="1414561699", nonce="5K8264ILTKCH16CQ2502SI8ZNMTM67VS")
    assert params["package"] == "prepay_id=wx2017" and params["signType"] == "RSA"
    message = b"wx_fake\n1414561699\n5K8264ILTKCH16CQ2502SI8ZNMTM67VS\nprepay_id=wx2017\n"
    ident.merchant_key.public_key().verify(base64.b64decode(params["paySign"]), message,
                                           PKCS1v15(), SHA256())


# -- WeChat's signatures: both key kinds, chosen by serial ------------------------------------

@pytest.mark.parametrize("by", ["public_key", "certificate"])
def test_answer_signed_with_either_key_verifies(by: str) -> None:
    serial = verify_signed(sign(BODY, by=by), BODY, verify_keys(), now=NOW)
    ident = identity()
    assert serial == (ident.public_key_id if by == "public_key" else ident.certificate_serial)


def test_headers_are_case_insensitive_and_serial_case_and_zeros_do_not_matter() -> None:
    headers = {k.lower(): v for k, v in sign(BODY, by="certificate").items()}
    headers["wechatpay-serial"] = "00" + identity().certificate_serial.lower()
    verify_signed(headers, BODY, verify_keys(), now=NOW)
    assert normalise_serial("PUB_KEY_ID_01") == "PUB_KEY_ID_01"


def test_tampered_body_is_refused() -> None:
    # Guard: the RSA verification itself.
    with pytest.raises(BadSignature):
        verify_signed(sign(BODY), BODY.replace(b"wx2014", b"wx2015"), verify_keys(), now=NOW)


def test_reserialised_body_is_refused_only_the_raw_bytes_verify() -> None:
    pretty = json.dumps(json.loads(BODY), indent=1).encode()
    with pytest.raises(BadSignature):
        verify_signed(sign(BODY), pretty, verify_keys(), now=NOW)


def test_signature_by_a_key_we_do_not_hold_is_refused() -> None:
    with pytest.raises(BadSignature):
        verify_signed(sign(BODY, by="stranger"), BODY, verify_keys(), now=NOW)


def test_key_is_the_one_the_serial_names_not_any_we_hold() -> None:
    # Guard: lookup by Wechatpay-Serial. Signed with the public key, labelled as the
    # certificate: trying every key we hold would accept it.
    headers = sign(BODY, by="public_key", serial=identity().certificate_serial)
    with pytest.raises(BadSignature):
        verify_signed(headers, BODY, verify_keys(), now=NOW)


def test_unknown_serial_is_refused() -> None:
    headers = sign(BODY, serial="PUB_KEY_ID_0000000000000000000000000000")
    with pytest.raises(UnknownSerial) as caught:
        verify_signed(headers, BODY, verify_keys(), now=NOW)
    assert "PUB_KEY_ID_0000" in caught.value.reason


def test_certificate_mode_only_refuses_public_key_serial() -> None:
    ident = identity()
    certs_only = VerifyKeys.of(ident.apiv3_key,
                               {ident.certificate_serial: ident.certificate.public_key()})
    verify_signed(sign(BODY, by="certificate"), BODY, certs_only, now=NOW)
    with pytest.raises(UnknownSerial):
        verify_signed(sign(BODY, by="public_key"), BODY, certs_only, now=NOW)


@pytest.mark.parametrize("offset", [-301, 301, -10_000, 86_400])
def test_timestamp_more_than_five_minutes_off_is_refused(offset: int) -> None:
    # Guard: freshness (wechatpayv3 skips it; a replayed notification would verify forever).
    with pytest.raises(StaleTimestamp):
        verify_signed(sign(BODY, timestamp=NOW + offset), BODY, verify_keys(), now=NOW)


@pytest.mark.parametrize("offset", [-299, 0, 299])
def test_timestamp_within_five_minutes_is_accepted(offset: int) -> None:
    verify_signed(sign(BODY, timestamp=NOW + offset), BODY, verify_keys(), now=NOW)


@pytest.mark.parametrize("value", ["", "abc", "-1", "+1554209980", "1e9", "１５５４"])
def test_timestamp_that_is_not_plain_digits_is_refused(value: str) -> None:
    headers = sign(BODY) | {"Wechatpay-Timestamp": value}
    with pytest.raises((StaleTimestamp, MissingSignature)):
        verify_signed(headers, BODY, verify_keys(), now=NOW)


def test_signtest_probe_is_refused_as_a_probe() -> None:
    # Guard: the explicit SIGNTEST check; without it the probe would be reported as an
    # ordinary bad signature and the log line would hide that WeChat is testing us.
    headers = sign(BODY) | {"Wechatpay-Signature": "WECHATPAY/SIGNTEST/ZmFrZS1wcm9iZQ=="}
    with pytest.raises(SignTestProbe):
        verify_signed(headers, BODY, verify_keys(), now=NOW)


@pytest.mark.parametrize("missing", ["Wechatpay-Signature", "Wechatpay-Timestamp",
                                     "Wechatpay-Nonce", "Wechatpay-Serial"])
def test_missing_header_is_refused(missing: str) -> None:
    headers = {k: v for k, v in sign(BODY).items() if k != missing}
    with pytest.raises(MissingSignature, match=missing):
        verify_signed(headers, BODY, verify_keys(), now=NOW)


def test_other_signature_type_is_refused() -> None:
    headers = sign(BODY) | {"Wechatpay-Signature-Type": "WECHATPAY2-SM2-WITH-SM3"}
    with pytest.raises(BadSignature, match="unsupported"):
        verify_signed(headers, BODY, verify_keys(), now=NOW)


# -- encrypted resources -----------------------------------------------------------------------

TRANSACTION = {"mchid": "1900000001", "appid": "wx_fake", "out_trade_no": "NB20250101000001",
               "trade_state": "SUCCESS", "amount": {"total": 990, "currency": "CNY"},
               "payer": {"openid": "o_reader_0001"}}


def test_notification_round_trip() -> None:
    body = notification_body(TRANSACTION)
    note = verify_notification(sign(body), body, verify_keys(), NOW)
    assert note.event_type == "TRANSACTION.SUCCESS" and note.resource == TRANSACTION
    assert note.original_type == "transaction" and note.serial == identity().public_key_id


def test_wrong_apiv3_key_is_refused() -> None:
    # Guard: GCM authentication (a wrong key gives a tag mismatch, never garbage).
    body = notification_body(TRANSACTION, apiv3_key=b"0" * 32)
    with pytest.raises(DecryptionFailed):
        verify_notification(sign(body), body, verify_keys(), NOW)


def _resource() -> dict[str, str]:
    return encrypt_resource(json.dumps(TRANSACTION).encode(), identity().apiv3_key,
                            associated_data="transaction", original_type="transaction")


@pytest.mark.parametrize("cut", [1, 16, 100])
def test_truncated_ciphertext_is_refused(cut: int) -> None:
    resource = _resource()
    sealed = base64.b64decode(resource["ciphertext"])
    resource["ciphertext"] = base64.b64encode(sealed[:-cut]).decode()
    with pytest.raises(DecryptionFailed):
        decrypt_resource(resource, identity().apiv3_key)


def test_truncated_ciphertext_in_a_validly_signed_notification_is_refused() -> None:
    body = json.loads(notification_body(TRANSACTION))
    sealed = base64.b64decode(body["resource"]["ciphertext"])
    body["resource"]["ciphertext"] = base64.b64encode(sealed[:-4]).decode()
    raw = json.dumps(body).encode()
    with pytest.raises(DecryptionFailed):
        verify_notification(sign(raw), raw, verify_keys(), NOW)


def test_shorter_than_a_tag_is_refused() -> None:
    resource = _resource() | {"ciphertext": base64.b64encode(b"short").decode()}
    with pytest.raises(DecryptionFailed):
        decrypt_resource(resource, identity().apiv3_key)


def test_changed_associated_data_is_refused() -> None:
    resource = _resource() | {"associated_data": "refund"}
    with pytest.raises(DecryptionFailed):
        decrypt_resource(resource, identity().apiv3_key)


@pytest.mark.parametrize("change", [{"algorithm": "AES_256_CBC"}, {"nonce": "short"},
                                    {"ciphertext": "not base64!"}, {"nonce": None}])
def test_malformed_resource_is_refused(change: dict[str, object]) -> None:
    resource: dict[str, object] = {**_resource(), **change}
    with pytest.raises(MalformedNotification):
        decrypt_resource(resource, identity().apiv3_key)


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"id":"x","event_type":"E"}',
                                 b'{"id":"x","event_type":"E","resource":{},'
                                 b'"resource_type":"plain"}'])
def test_malformed_notification_body_is_refused(raw: bytes) -> None:
    with pytest.raises(MalformedNotification):
        verify_notification(sign(raw), raw, verify_keys(), NOW)


def test_signature_is_checked_before_anything_is_decrypted() -> None:
    body = notification_body(TRANSACTION)
    with pytest.raises(BadSignature):
        verify_notification(sign(body, by="stranger"), body, verify_keys(), NOW)


def test_verification_is_fast_enough_for_the_notify_endpoint() -> None:
    body = notification_body(TRANSACTION)
    headers, keys = sign(body), verify_keys()
    started = time.perf_counter()
    for _ in range(200):
        verify_notification(headers, body, keys, NOW)
    per_second = 200 / (time.perf_counter() - started)
    assert per_second > 500, per_second
