"""WeChat message encryption (安全模式 / 兼容模式).

WeChat encrypts pushes with AES-256-CBC: the key is the account's 43-character EncodingAESKey
decoded from base64 (with the missing ``=`` restored), the IV is the key's first 16 bytes and the
padding is PKCS#7 to 32-byte blocks. The plaintext is 16 random bytes, the message length as a
4-byte big-endian integer, the message and finally the AppId, which must be ours.

CBC carries no integrity check of its own: the ciphertext is authenticated by ``msg_signature``
(SHA-1 over the token, timestamp, nonce and the ciphertext), so callers must check that before
decrypting. Only then does the difference between our error messages stop mattering to someone
probing with forged ciphertexts.

Nothing here is process-wide: each :class:`WeChatCrypto` holds its own keys, and whether a reply
is encrypted is decided per request by the caller.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_SETTING = "[wechat] encoding_aes_key"
PREVIOUS_KEY_SETTING = "[wechat] previous_encoding_aes_key"
BLOCK_SIZE = 32  # WeChat pads to 32 bytes, not AES's 16
_RANDOM_BYTES = 16
_HEADER = _RANDOM_BYTES + 4


class CryptoError(Exception):
    """A pushed message could not be decrypted or is not addressed to our AppId."""


def _decode_key(encoding_aes_key: str) -> bytes | None:
    if len(encoding_aes_key) != 43:
        return None
    try:
        key = base64.b64decode(encoding_aes_key + "=", validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == 32 else None


def validate_aes_key(encoding_aes_key: str, *, setting: str = KEY_SETTING) -> str | None:
    """``None`` when the key is usable or unset (safe mode off), else what is wrong with it.
    The message never repeats the key."""
    if not encoding_aes_key:
        return None
    if _decode_key(encoding_aes_key) is None:
        return (f"{setting} is not a valid EncodingAESKey: it must be the 43 letters and digits "
                f"shown in the WeChat admin console (got {len(encoding_aes_key)} characters)")
    return None


def safe_mode_problems(encoding_aes_key: str, app_id: str,
                       previous_encoding_aes_key: str = "") -> list[str]:
    """Configuration problems that would make safe mode fail at the first message; empty when
    safe mode is off or correctly configured. For startup checks."""
    problems = [p for p in (validate_aes_key(encoding_aes_key),
                            validate_aes_key(previous_encoding_aes_key,
                                             setting=PREVIOUS_KEY_SETTING)) if p]
    if encoding_aes_key and not app_id:
        problems.append("[wechat] app_id is missing: safe mode checks every message against it")
    if previous_encoding_aes_key and not encoding_aes_key:
        problems.append(f"{PREVIOUS_KEY_SETTING} is set but {KEY_SETTING} is not")
    return problems


def msg_signature(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    """SHA-1 hex of the sorted, concatenated token, timestamp, nonce and ciphertext."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, encrypt])).encode()).hexdigest()


def _cdata(text: str) -> str:
    return text.replace("]]>", "]]]]><![CDATA[>")


@dataclass(frozen=True)
class Decrypted:
    xml: str
    key_index: int  # 0: the current key, 1: the previous one (during a rotation)


class WeChatCrypto:
    """Encrypts replies and decrypts pushes for one account."""

    def __init__(self, token: str, encoding_aes_key: str, app_id: str, *,
                 previous_aes_key: str = "") -> None:
        problem = validate_aes_key(encoding_aes_key) or (
            validate_aes_key(previous_aes_key, setting=PREVIOUS_KEY_SETTING))
        if problem:
            raise ValueError(problem)
        if not app_id:
            raise ValueError("[wechat] app_id is missing: safe mode needs it")
        keys = [encoding_aes_key, *([previous_aes_key] if previous_aes_key else [])]
        self._keys = [k for k in (_decode_key(raw) for raw in keys) if k is not None]
        self._token = token
        self._app_id = app_id.encode("utf-8")

    def __repr__(self) -> str:  # never show the keys or the token
        return f"WeChatCrypto(app_id={self._app_id.decode()!r}, keys={len(self._keys)})"

    # --- signatures ---

    def sign(self, timestamp: str, nonce: str, encrypt: str) -> str:
        return msg_signature(self._token, timestamp, nonce, encrypt)

    def check_msg_signature(self, msg_signature: str, timestamp: str, nonce: str,
                            encrypt: str) -> bool:
        expected = self.sign(timestamp, nonce, encrypt).encode()
        return hmac.compare_digest(expected, msg_signature.lower().encode("utf-8", "replace"))

    # --- encryption ---

    def encrypt_payload(self, xml: str, *, key_index: int = 0) -> str:
        """The base64 ciphertext of ``xml`` (the ``Encrypt`` value)."""
        key = self._keys[key_index]
        body = xml.encode("utf-8")
        plain = os.urandom(_RANDOM_BYTES) + struct.pack(">I", len(body)) + body + self._app_id
        pad = BLOCK_SIZE - len(plain) % BLOCK_SIZE
        plain += bytes([pad]) * pad
        encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
        return base64.b64encode(encryptor.update(plain) + encryptor.finalize()).decode("ascii")

    def encrypt(self, xml: str, *, nonce: str, timestamp: str, key_index: int = 0) -> str:
        """The encrypted passive-reply envelope for ``xml``."""
        encrypt = self.encrypt_payload(xml, key_index=key_index)
        signature = self.sign(timestamp, nonce, encrypt)
        return (f"<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt>"
                f"<MsgSignature><![CDATA[{signature}]]></MsgSignature>"
                f"<TimeStamp>{timestamp}</TimeStamp>"
                f"<Nonce><![CDATA[{_cdata(nonce)}]]></Nonce></xml>")

    # --- decryption ---

    def decrypt(self, encrypted_b64: str) -> str:
        """The message inside an ``Encrypt`` value; :class:`CryptoError` if it is not ours."""
        return self.decrypt_any(encrypted_b64).xml

    def decrypt_any(self, encrypted_b64: str) -> Decrypted:
        """Like :meth:`decrypt`, trying the previous key too and saying which one worked, so
        the reply can use the same key."""
        try:
            raw = base64.b64decode(encrypted_b64.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise CryptoError("ciphertext is not base64") from None
        if not raw or len(raw) % 16:
            raise CryptoError("ciphertext is not a whole number of AES blocks")
        error = CryptoError("cannot decrypt")
        for index, key in enumerate(self._keys):
            try:
                return Decrypted(self._open(raw, key), index)
            except CryptoError as exc:
                if index == 0:
                    error = exc  # report the current key's failure, not the fallback's
        raise error

    def _open(self, raw: bytes, key: bytes) -> str:
        decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
        plain = decryptor.update(raw) + decryptor.finalize()
        pad = plain[-1]
        if not 1 <= pad <= BLOCK_SIZE or plain[-pad:] != bytes([pad]) * pad:
            raise CryptoError("bad padding")
        content = plain[:-pad]
        if len(content) < _HEADER:
            raise CryptoError("plaintext too short")
        (length,) = struct.unpack(">I", content[_RANDOM_BYTES:_HEADER])
        if _HEADER + length > len(content):
            raise CryptoError("bad message length")
        app_id = content[_HEADER + length:]
        if not hmac.compare_digest(app_id, self._app_id):
            raise CryptoError("message is for another AppId")
        try:
            return content[_HEADER:_HEADER + length].decode("utf-8")
        except UnicodeDecodeError:
            raise CryptoError("message is not UTF-8") from None
