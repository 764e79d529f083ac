"""[pay] settings: validated at startup, each refusal naming the key; no [pay], no payments."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from bot.settings import SettingsError, load_settings
from tests.conftest import make_settings
from tests.pay_support import identity

SECRET = "0123456789abcdef0123456789ABCDEF"


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    identity().write(tmp_path / "keys")
    return tmp_path / "keys"


def table(keys_dir: Path, **changes: Any) -> dict[str, Any]:
    ident = identity()
    base: dict[str, Any] = {
        "mch_id": "1900000001", "apiv3_key": SECRET,
        "merchant_serial_no": ident.merchant_serial_no,
        "merchant_private_key_file": str(keys_dir / "apiclient_key.pem"),
        "wechatpay_public_key_file": str(keys_dir / "pub_key.pem"),
        "wechatpay_public_key_id": ident.public_key_id,
        "api_base": "http://127.0.0.1:9",
        "packages": [{"id": "p99", "tokens": 99, "price_fen": 990, "label": "99 豆"}],
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def write_config(tmp_path: Path, pay: dict[str, Any], *, app_id: str = "wx_app",
                 public_url: str = "http://127.0.0.1:8080") -> Path:
    packages = pay.pop("packages", [])
    lines = ['[wechat]', 'token = "t"', f'app_id = "{app_id}"', '[reader]',
             'secret = "0123456789abcdef0123"', '[server]', f'public_url = "{public_url}"',
             '[pay]']
    lines += [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in pay.items()]
    for package in packages:
        lines += ["[[pay.packages]]"]
        lines += [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in package.items()]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def refusal(tmp_path: Path, pay: dict[str, Any], **kw: Any) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(write_config(tmp_path, pay, **kw), environ={})
    return str(caught.value)


def test_no_pay_section_means_payments_off() -> None:
    assert make_settings().pay is None


def test_valid_section_loads_and_app_id_defaults_to_wechat(tmp_path: Path,
                                                           keys_dir: Path) -> None:
    settings = load_settings(write_config(tmp_path, table(keys_dir)), environ={})
    assert settings.pay is not None and settings.pay.app_id == "wx_app"
    assert settings.pay.order_ttl_minutes == 30 and settings.pay.package("p99") is not None
    assert settings.pay.package("p1") is None
    assert SECRET not in repr(settings.pay)


def test_own_app_id_wins(tmp_path: Path, keys_dir: Path) -> None:
    settings = load_settings(write_config(tmp_path, table(keys_dir, app_id="wx_pay")),
                             environ={})
    assert settings.pay is not None and settings.pay.app_id == "wx_pay"


def test_apiv3_key_may_come_from_the_environment(tmp_path: Path, keys_dir: Path) -> None:
    path = write_config(tmp_path, table(keys_dir, apiv3_key="CHANGE-ME-32-bytes-0000000000000"))
    settings = load_settings(path, environ={"NEWSBOT_PAY__APIV3_KEY": SECRET})
    assert settings.pay is not None and settings.pay.apiv3_key == SECRET


@pytest.mark.parametrize("key", ["0123456789abcdef0123456789abcde",      # 31
                                 "0123456789abcdef0123456789abcdef0",    # 33
                                 "密钥密钥密钥密钥密钥密钥密钥密钥"])          # 16 chars, 48 bytes
def test_apiv3_key_must_be_32_bytes_and_is_never_echoed(tmp_path: Path, keys_dir: Path,
                                                        key: str) -> None:
    message = refusal(tmp_path, table(keys_dir, apiv3_key=key))
    assert "[pay] apiv3_key" in message and "exactly 32 bytes" in message
    assert key not in message


def test_apiv3_key_counts_bytes_not_characters(tmp_path: Path, keys_dir: Path) -> None:
    ten_chinese_and_two = "密" * 10 + "ab"  # 32 bytes in UTF-8
    settings = load_settings(write_config(tmp_path, table(keys_dir,
                                                          apiv3_key=ten_chinese_and_two)),
                             environ={})
    assert settings.pay is not None


def test_placeholder_apiv3_key_is_refused(tmp_path: Path, keys_dir: Path) -> None:
    message = refusal(tmp_path, table(keys_dir, apiv3_key="CHANGE-ME-32-bytes-0000000000000"))
    assert "[pay] apiv3_key" in message and "placeholder" in message


@pytest.mark.parametrize("mch_id", ["19000x0001", "", "１９００００００"])
def test_mch_id_must_be_digits(tmp_path: Path, keys_dir: Path, mch_id: str) -> None:
    assert "[pay] mch_id" in refusal(tmp_path, table(keys_dir, mch_id=mch_id))


def test_app_id_needed_from_somewhere(tmp_path: Path, keys_dir: Path) -> None:
    message = refusal(tmp_path, table(keys_dir), app_id="")
    assert "[pay] app_id" in message and "[wechat] app_id" in message


def test_missing_private_key_file(tmp_path: Path, keys_dir: Path) -> None:
    message = refusal(tmp_path, table(keys_dir, merchant_private_key_file=str(tmp_path / "x")))
    assert "[pay] merchant_private_key_file" in message and "does not exist" in message


def test_certificate_given_as_private_key(tmp_path: Path, keys_dir: Path) -> None:
    cert = next((keys_dir / "platform_certificates").glob("*.pem"))
    message = refusal(tmp_path, table(keys_dir, merchant_private_key_file=str(cert)))
    assert "[pay] merchant_private_key_file" in message and "apiclient_key.pem" in message


def test_private_key_given_as_public_key(tmp_path: Path, keys_dir: Path) -> None:
    message = refusal(tmp_path, table(
        keys_dir, wechatpay_public_key_file=str(keys_dir / "apiclient_key.pem")))
    assert "[pay] wechatpay_public_key_file" in message and "private key" in message


def test_certificate_given_as_public_key_points_to_the_certificates_dir(
        tmp_path: Path, keys_dir: Path) -> None:
    cert = next((keys_dir / "platform_certificates").glob("*.pem"))
    message = refusal(tmp_path, table(keys_dir, wechatpay_public_key_file=str(cert)))
    assert "platform_certificates_dir" in message


def test_not_pem_at_all(tmp_path: Path, keys_dir: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    message = refusal(tmp_path, table(keys_dir, merchant_private_key_file=str(junk)))
    assert "not a PEM file" in message


def test_public_key_id_must_look_like_one(tmp_path: Path, keys_dir: Path) -> None:
    message = refusal(tmp_path, table(keys_dir, wechatpay_public_key_id="1234"))
    assert "[pay] wechatpay_public_key_id" in message and "PUB_KEY_ID_" in message


def test_public_key_file_and_id_go_together(tmp_path: Path, keys_dir: Path) -> None:
    message = refusal(tmp_path, table(keys_dir, wechatpay_public_key_id=None))
    assert "wechatpay_public_key_file and wechatpay_public_key_id" in message
    assert SECRET not in message  # a section-wide error does not dump the section


def test_some_verification_key_is_required(tmp_path: Path, keys_dir: Path) -> None:
    message = refusal(tmp_path, table(keys_dir, wechatpay_public_key_id=None,
                                      wechatpay_public_key_file=None))
    assert "no key to verify WeChat Pay" in message


def test_certificate_mode_alone_loads(tmp_path: Path, keys_dir: Path) -> None:
    pay = table(keys_dir, wechatpay_public_key_id=None, wechatpay_public_key_file=None,
                platform_certificates_dir=str(keys_dir / "platform_certificates"))
    assert load_settings(write_config(tmp_path, pay), environ={}).pay is not None


def test_only_expired_certificates_are_refused(tmp_path: Path, keys_dir: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    key = identity().certificate_key
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    past = datetime.now(UTC) - timedelta(days=800)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7).not_valid_before(past)
            .not_valid_after(past + timedelta(days=365)).sign(key, hashes.SHA256()))
    (old / "7.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    message = refusal(tmp_path, table(keys_dir, wechatpay_public_key_id=None,
                                      wechatpay_public_key_file=None,
                                      platform_certificates_dir=str(old)))
    assert "[pay] platform_certificates_dir" in message and "valid today" in message


@pytest.mark.parametrize(("packages", "expected"), [
    ([], "at least one [[pay.packages]]"),
    ([{"id": "p1", "tokens": 1, "price_fen": 1, "label": "a"},
      {"id": "p1", "tokens": 2, "price_fen": 2, "label": "b"}], "'p1' names two packages"),
    ([{"id": "p1", "tokens": 1, "price_fen": 0, "label": "a"}], "packages.0.price_fen"),
    ([{"id": "p1", "tokens": 0, "price_fen": 1, "label": "a"}], "packages.0.tokens"),
    ([{"id": "P 1", "tokens": 1, "price_fen": 1, "label": "a"}], "packages.0.id"),
])
def test_packages(tmp_path: Path, keys_dir: Path, packages: list[dict[str, Any]],
                  expected: str) -> None:
    assert expected in refusal(tmp_path, table(keys_dir, packages=packages))


def test_api_base_must_be_https_unless_loopback(tmp_path: Path, keys_dir: Path) -> None:
    message = refusal(tmp_path, table(keys_dir, api_base="http://api.mch.weixin.qq.com"))
    assert "[pay] api_base" in message


def test_real_merchant_needs_an_https_public_url(tmp_path: Path, keys_dir: Path) -> None:
    pay = table(keys_dir, api_base="https://api.mch.weixin.qq.com")
    message = refusal(tmp_path, dict(pay), public_url="http://bot.example.com")
    assert "[server] public_url" in message and "https://" in message
    path = write_config(tmp_path, pay, public_url="https://bot.example.com")
    assert load_settings(path, environ={}).pay is not None


def test_order_ttl_bounds(tmp_path: Path, keys_dir: Path) -> None:
    assert "[pay] order_ttl_minutes" in refusal(tmp_path, table(keys_dir, order_ttl_minutes=121))


def test_unknown_key_is_named(tmp_path: Path, keys_dir: Path) -> None:
    assert "unknown key [pay] mchid" in refusal(tmp_path, table(keys_dir, mchid="1"))
