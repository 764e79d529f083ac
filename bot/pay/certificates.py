"""Downloading WeChat Pay platform certificates (``GET /v3/certificates``) into
``platform_certificates_dir``.

Each certificate comes AEAD_AES_256_GCM-encrypted with the APIv3 key. The answer is trusted
only when its signature verifies with a key we already hold (the public key, or a saved
certificate); with neither, the certificate the answer's ``Wechatpay-Serial`` names, taken
from the answer itself, is trusted on first use, as WeChat's own downloader does. Nothing is
written unless everything checked out; each new certificate lands as ``<serial>.pem`` through
a temp file and a rename, and files already there are left alone."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import Encoding

from bot.pay.client import PayClient
from bot.pay.keys import VerifyKeys, certificate_serial, normalise_serial
from bot.pay.signing import VerificationError, decrypt_resource

Outcome = Literal["added", "kept", "expired"]
CERTIFICATE_ASSOCIATED_DATA = "certificate"


class CertificateRefused(VerificationError):
    """An item of the answer is not a usable certificate (shape, serial, key type)."""


@dataclass(frozen=True)
class PlatformCertificate:
    serial: str
    certificate: x509.Certificate

    @property
    def not_before(self) -> datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def valid_at(self, at: datetime) -> bool:
        return self.not_before <= at <= self.not_after

    def public_key(self) -> RSAPublicKey:
        key = self.certificate.public_key()
        assert isinstance(key, RSAPublicKey)  # checked by decrypt_certificates
        return key


def decrypt_certificates(body: bytes, apiv3_key: bytes) -> list[PlatformCertificate]:
    """The certificates of a ``/v3/certificates`` answer. Raises VerificationError when the
    body is not that answer, an item does not decrypt (wrong APIv3 key, altered data), or a
    certificate's serial is not the ``serial_no`` beside it."""
    try:
        data = json.loads(body)
    except ValueError:
        raise CertificateRefused("answer is not JSON") from None
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise CertificateRefused("answer lists no certificates (no data)")
    found: list[PlatformCertificate] = []
    for item in items:
        sealed = item.get("encrypt_certificate") if isinstance(item, dict) else None
        serial_no = item.get("serial_no") if isinstance(item, dict) else None
        if not isinstance(sealed, Mapping) or not isinstance(serial_no, str):
            raise CertificateRefused("a certificate item lacks serial_no or "
                                     "encrypt_certificate")
        pem = decrypt_resource(sealed, apiv3_key)
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise CertificateRefused(f"item {serial_no[:40]!r} is not a PEM certificate") from None
        serial = certificate_serial(cert)
        if serial != normalise_serial(serial_no):
            raise CertificateRefused(f"certificate serial {serial} is not the serial_no "
                                     f"{serial_no[:40]!r} beside it")
        if not isinstance(cert.public_key(), RSAPublicKey):
            raise CertificateRefused(f"certificate {serial} does not hold an RSA key")
        found.append(PlatformCertificate(serial, cert))
    return found


@dataclass
class Download:
    certificates: list[PlatformCertificate]
    first_use: bool  # no key was held: the answer was verified with its own certificate


def download(client: PayClient, *, now: datetime | None = None) -> Download:
    """Fetch and check the certificates. Raises PayError (PayUnverifiedResponse when the
    answer does not decrypt or verify): then nothing may be written."""
    at = now or datetime.now(UTC)
    result = Download([], first_use=False)

    def trust(body: bytes) -> VerifyKeys:
        result.certificates = decrypt_certificates(body, client.keys.apiv3_key)
        if any(True for _ in client.keys.serials()):
            return client.keys
        result.first_use = True
        return VerifyKeys.of(client.keys.apiv3_key,
                             {c.serial: c.public_key() for c in result.certificates
                              if c.valid_at(at)})

    client.download_certificates(trust)
    return result


def saved_serials(directory: Path) -> set[str]:
    """Serials of every certificate file in ``directory``, valid or not."""
    serials: set[str] = set()
    for path in directory.glob("*.pem"):
        try:
            serials.add(certificate_serial(x509.load_pem_x509_certificate(path.read_bytes())))
        except (OSError, ValueError):
            continue
    return serials


def save(directory: Path, certificates: list[PlatformCertificate], *,
         now: datetime | None = None) -> list[tuple[PlatformCertificate, Outcome]]:
    """Write each new, unexpired certificate as ``<serial>.pem``; what became of each."""
    at = now or datetime.now(UTC)
    have = saved_serials(directory)
    outcomes: list[tuple[PlatformCertificate, Outcome]] = []
    for cert in certificates:
        # The name comes from the parsed serial (hex digits), never from the answer's text.
        target = directory / f"{cert.serial}.pem"
        if cert.serial in have or target.exists():
            outcomes.append((cert, "kept"))
        elif at > cert.not_after:
            outcomes.append((cert, "expired"))
        else:
            _write_atomically(target, cert.certificate.public_bytes(Encoding.PEM))
            have.add(cert.serial)
            outcomes.append((cert, "added"))
    return outcomes


def _write_atomically(target: Path, data: bytes) -> None:
    # A reader (the bot loading the directory) sees the whole file or none of it.
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
