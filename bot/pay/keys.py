"""Loading the merchant's private key and WeChat Pay's verification keys from PEM files.

Two kinds of verification key exist side by side during WeChat's transition: the "WeChat Pay
public key" (named by an id ``PUB_KEY_ID_…``) and the older platform certificates (named by
their serial number). Either kind is looked up by the ``Wechatpay-Serial`` header."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_pem_public_key,
)

PUBLIC_KEY_ID_PREFIX = "PUB_KEY_ID_"
MIN_RSA_BITS = 2048


class KeyFileError(Exception):
    """A key file is missing, unreadable or not the kind of PEM expected; says which."""


def _read_pem(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"{path} cannot be read: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise KeyFileError(f"{path} is not a PEM file (no -----BEGIN line)")
    return data


def load_private_key(path: Path) -> RSAPrivateKey:
    """The merchant API private key (apiclient_key.pem)."""
    data = _read_pem(path)
    if b"BEGIN CERTIFICATE" in data:
        raise KeyFileError(f"{path} holds a certificate; give the private key "
                           "(apiclient_key.pem), not apiclient_cert.pem")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, RSAPrivateKey):
        raise KeyFileError(f"{path} is not an RSA private key")
    if key.key_size < MIN_RSA_BITS:
        raise KeyFileError(f"{path} is a {key.key_size}-bit key; WeChat Pay uses 2048 bits")
    return key


def load_public_key(path: Path) -> RSAPublicKey:
    """The WeChat Pay public key (pub_key.pem, downloaded from the merchant platform)."""
    data = _read_pem(path)
    if b"BEGIN CERTIFICATE" in data:
        raise KeyFileError(f"{path} holds a certificate: put platform certificates in "
                           "platform_certificates_dir, not in wechatpay_public_key_file")
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{path} holds a private key, not WeChat Pay's public key")
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM public key ({exc})") from None
    if not isinstance(key, RSAPublicKey):
        raise KeyFileError(f"{path} is not an RSA public key")
    return key


def certificate_serial(cert: x509.Certificate) -> str:
    """The serial as WeChat writes it in ``Wechatpay-Serial``: upper-case hex."""
    return f"{cert.serial_number:X}"


def normalise_serial(serial: str) -> str:
    """Public key ids as they are; certificate serials compared as hex numbers, so case and
    leading zeros do not matter."""
    serial = serial.strip()
    if serial.startswith(PUBLIC_KEY_ID_PREFIX):
        return serial
    try:
        return f"{int(serial, 16):X}"
    except ValueError:
        return serial


def load_certificates(directory: Path, *, now: datetime | None = None) -> dict[str, RSAPublicKey]:
    """Every ``*.pem`` platform certificate in ``directory`` that is valid now, by serial.
    Expired or not-yet-valid ones are left out so a rotation can keep both files around."""
    if not directory.is_dir():
        raise KeyFileError(f"{directory} is not a directory")
    at = now or datetime.now(UTC)
    found: dict[str, RSAPublicKey] = {}
    for path in sorted(directory.glob("*.pem")):
        try:
            cert = x509.load_pem_x509_certificate(_read_pem(path))
        except ValueError as exc:
            raise KeyFileError(f"{path} is not a PEM certificate ({exc})") from None
        key = cert.public_key()
        if not isinstance(key, RSAPublicKey):
            raise KeyFileError(f"{path} does not hold an RSA public key")
        if cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            found[certificate_serial(cert)] = key
    return found


@dataclass(frozen=True)
class VerifyKeys:
    """What it takes to trust WeChat Pay: its public keys by serial, and the APIv3 key that
    encrypts notification resources."""

    public_keys: Mapping[str, RSAPublicKey]
    apiv3_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.apiv3_key) != 32:
            raise ValueError("the APIv3 key must be 32 bytes")

    def find(self, serial: str) -> RSAPublicKey | None:
        return self.public_keys.get(normalise_serial(serial))

    @classmethod
    def of(cls, apiv3_key: bytes, *groups: Mapping[str, RSAPublicKey]) -> VerifyKeys:
        merged: dict[str, RSAPublicKey] = {}
        for group in groups:
            merged.update({normalise_serial(k): v for k, v in group.items()})
        return cls(merged, apiv3_key)

    def serials(self) -> Iterable[str]:
        return self.public_keys.keys()
