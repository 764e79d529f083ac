"""Safe mode (安全模式) and compatible mode (兼容模式): encrypted pushes and replies, checked
against WeChat's published sample and against WeRoBot's independent implementation, through the
real WSGI app with signed requests."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from typing import Any
from xml.etree import ElementTree

import bottle
import httpx
import pytest
from sqlalchemy import Engine
from werobot.crypto import MessageCrypt, PrpCrypto
from werobot.utils import get_signature

from bot.app import create_app
from bot.wechat.crypto import (
    CryptoError,
    WeChatCrypto,
    msg_signature,
    safe_mode_problems,
    validate_aes_key,
)
from bot.wechat.webhook import Webhook, sign
from tests.conftest import TOKEN, WeChatUser, make_settings, parse_reply
from tests.test_webhook import balance, inbound_count, redeem_count, topup

READER = "o_reader_0001"
APP_ID = "wx0123456789abcdef"
AES_KEY = "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR"  # 43 base64 characters
OTHER_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"

# WeChat's published sample (消息加解密接入指引 / Technical_Plan and the sample code it ships).
SAMPLE_TOKEN = "spamtest"
SAMPLE_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
SAMPLE_APP_ID = "wx2c2769f8efd9abc2"
SAMPLE_TIMESTAMP = "1409735669"
SAMPLE_NONCE = "1320562132"
SAMPLE_SIGNATURE = "16120ec1b8dbb870f510d87ce6bc2463eae6ca1a"
SAMPLE_MSG_SIGNATURE = "5d197aaffba7e9b25a30732f161a50dee96bd5fa"
SAMPLE_ENCRYPT = (
    "hyzAe4OzmOMbd6TvGdIOO6uBmdJoD0Fk53REIHvxYtJlE2B655HuD0m8KUePWB3+LrPXo87wzQ1QLvbeUgmBM4x6F8"
    "PGHQHFVAFmOD2LdJF9FrXpbUAh0B5GIItb52sn896wVsMSHGuPE328HnRGBcrS7C41IzDWyWNlZkyyXwon8T332j"
    "isa+h6tEDYsVticbSnyU8dKOIbgU6ux5VTjg3yt+WGzjlpKn6NPhRjpA912xMezR4kw6KWwMrCVKSVCZciVGCgav"
    "jIQ6X8tCOp3yZbGpy0VxpAe+77TszTfRd5RJSVO/HTnifJpXgCSUdUue1v6h0EIBYYI1BD1DlD+C0CR8e6Oewpus"
    "jZ4uBl9FyJvnhvQl+q5rv1ixrcpCumEPo5MJSgM9ehVsNPfUM669WuMyVWQLCzpu9GhglF2PE="
)
SAMPLE_PLAIN = (
    "<xml><ToUserName><![CDATA[gh_10f6c3c3ac5a]]></ToUserName>\n"
    "<FromUserName><![CDATA[oyORnuP8q7ou2gfYjqLzSIWZf0rs]]></FromUserName>\n"
    "<CreateTime>1409735668</CreateTime>\n"
    "<MsgType><![CDATA[text]]></MsgType>\n"
    "<Content><![CDATA[abcdteT]]></Content>\n"
    "<MsgId>6054768590064713728</MsgId>\n"
    "</xml>"
)


def werobot_key(encoding_aes_key: str) -> bytes:
    return base64.b64decode(encoding_aes_key + "=")


def werobot_encrypt(xml: str, *, key: str = AES_KEY, app_id: str = APP_ID) -> str:
    """A ciphertext made by WeRoBot, not by us."""
    return bytes(PrpCrypto(werobot_key(key)).encrypt(xml, app_id)).decode()


def werobot_open_reply(body: str, *, nonce: str, key: str = AES_KEY, app_id: str = APP_ID,
                       token: str = TOKEN) -> dict[str, str]:
    """Check an encrypted reply envelope with WeRoBot's code and flatten the inner reply."""
    root = ElementTree.fromstring(body)
    encrypt = root.findtext("Encrypt") or ""
    timestamp = root.findtext("TimeStamp") or ""
    assert root.findtext("Nonce") == nonce
    assert abs(int(timestamp) - time.time()) < 60
    assert root.findtext("MsgSignature") == get_signature(token, timestamp, nonce, encrypt)
    inner = MessageCrypt(token, key, app_id).decrypt_message(
        timestamp, nonce, root.findtext("MsgSignature"), encrypt)
    return parse_reply(bytes(inner).decode("utf-8"))


class SafeUser(WeChatUser):
    """Posts like WeChat in safe mode: the message encrypted by WeRoBot's implementation,
    ``encrypt_type=aes`` and ``msg_signature`` next to the usual signature."""

    def __init__(self, http: httpx.Client, openid: str, *, key: str = AES_KEY,
                 app_id: str = APP_ID, token: str = TOKEN) -> None:
        super().__init__(http, openid, token=token)
        self.key = key
        self.app_id = app_id
        self.last_nonce = ""

    def post_encrypted(self, inner_xml: str, *, encrypt: str | None = None,
                       msg_sig: str | None = None, **params: str) -> httpx.Response:
        ts = str(int(time.time()))
        nonce = self.last_nonce = uuid.uuid4().hex[:10]
        encrypt = encrypt if encrypt is not None else werobot_encrypt(
            inner_xml, key=self.key, app_id=self.app_id)
        body = (f"<xml><ToUserName><![CDATA[gh_test]]></ToUserName>"
                f"<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>")
        query = {"signature": sign(self.token, ts, nonce), "timestamp": ts, "nonce": nonce,
                 "openid": self.openid, "encrypt_type": "aes",
                 "msg_signature": msg_sig if msg_sig is not None
                 else get_signature(self.token, ts, nonce, encrypt)}
        query.update(params)
        return self.http.post(self.path, params=query, content=body.encode(),
                              headers={"Content-Type": "text/xml"})

    def send_encrypted(self, content: str, **kw: Any) -> dict[str, str]:
        resp = self.post_encrypted(self.text_xml(content, **kw))
        assert resp.status_code == 200, resp.text
        return self.open(resp.text)

    def open(self, body: str) -> dict[str, str]:
        return werobot_open_reply(body, nonce=self.last_nonce, key=self.key)


def safe_settings(**wechat: Any) -> Any:
    return make_settings(wechat={"token": TOKEN, "app_id": APP_ID, "encoding_aes_key": AES_KEY,
                                 **wechat})


def client_for(app: bottle.Bottle) -> httpx.Client:
    return httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://testserver")


@pytest.fixture
def safe_client(engine: Engine) -> Iterator[httpx.Client]:
    with client_for(create_app(safe_settings(), engine)) as client:
        yield client


@pytest.fixture
def safe_user(safe_client: httpx.Client) -> SafeUser:
    return SafeUser(safe_client, READER)


# --- WeChat's published sample -----------------------------------------------------------

def test_sample_signatures_match_the_published_values() -> None:
    assert sign(SAMPLE_TOKEN, SAMPLE_TIMESTAMP, SAMPLE_NONCE) == SAMPLE_SIGNATURE
    assert msg_signature(SAMPLE_TOKEN, SAMPLE_TIMESTAMP, SAMPLE_NONCE,
                         SAMPLE_ENCRYPT) == SAMPLE_MSG_SIGNATURE
    crypto = WeChatCrypto(SAMPLE_TOKEN, SAMPLE_KEY, SAMPLE_APP_ID)
    assert crypto.check_msg_signature(SAMPLE_MSG_SIGNATURE, SAMPLE_TIMESTAMP, SAMPLE_NONCE,
                                      SAMPLE_ENCRYPT)
    assert crypto.check_msg_signature(SAMPLE_MSG_SIGNATURE.upper(), SAMPLE_TIMESTAMP,
                                      SAMPLE_NONCE, SAMPLE_ENCRYPT)
    assert not crypto.check_msg_signature(SAMPLE_MSG_SIGNATURE, SAMPLE_TIMESTAMP, "1",
                                          SAMPLE_ENCRYPT)
    assert not crypto.check_msg_signature(SAMPLE_MSG_SIGNATURE, SAMPLE_TIMESTAMP, SAMPLE_NONCE,
                                          SAMPLE_ENCRYPT[:-4] + "AAA=")
    assert not crypto.check_msg_signature("é" * 40, SAMPLE_TIMESTAMP, SAMPLE_NONCE,
                                          SAMPLE_ENCRYPT)


def test_sample_ciphertext_decrypts_to_the_published_message() -> None:
    crypto = WeChatCrypto(SAMPLE_TOKEN, SAMPLE_KEY, SAMPLE_APP_ID)
    assert crypto.decrypt(SAMPLE_ENCRYPT) == SAMPLE_PLAIN
    with pytest.raises(CryptoError, match="AppId"):
        WeChatCrypto(SAMPLE_TOKEN, SAMPLE_KEY, "wx_not_ours").decrypt(SAMPLE_ENCRYPT)
    with pytest.raises(CryptoError):
        WeChatCrypto(SAMPLE_TOKEN, AES_KEY, SAMPLE_APP_ID).decrypt(SAMPLE_ENCRYPT)


def test_sample_request_through_the_webhook(engine: Engine) -> None:
    """The published request, byte for byte, at the published time: accepted, answered with
    an envelope WeRoBot can verify and open."""
    settings = make_settings(wechat={"token": SAMPLE_TOKEN, "app_id": SAMPLE_APP_ID,
                                     "encoding_aes_key": SAMPLE_KEY})
    app = bottle.Bottle()
    Webhook(settings, engine, clock=lambda: int(SAMPLE_TIMESTAMP) + 2.0).install(app)
    body = (f"<xml><ToUserName><![CDATA[gh_10f6c3c3ac5a]]></ToUserName>"
            f"<Encrypt><![CDATA[{SAMPLE_ENCRYPT}]]></Encrypt></xml>")
    query = {"signature": SAMPLE_SIGNATURE, "timestamp": SAMPLE_TIMESTAMP,
             "nonce": SAMPLE_NONCE, "openid": "oyORnuP8q7ou2gfYjqLzSIWZf0rs",
             "encrypt_type": "aes", "msg_signature": SAMPLE_MSG_SIGNATURE}
    with client_for(app) as client:
        resp = client.post("/wechat", params=query, content=body.encode())
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/xml")
    root = ElementTree.fromstring(resp.text)
    timestamp = root.findtext("TimeStamp") or ""
    assert timestamp == str(int(SAMPLE_TIMESTAMP) + 2)
    assert root.findtext("Nonce") == SAMPLE_NONCE
    inner = MessageCrypt(SAMPLE_TOKEN, SAMPLE_KEY, SAMPLE_APP_ID).decrypt_message(
        timestamp, SAMPLE_NONCE, root.findtext("MsgSignature"), root.findtext("Encrypt"))
    reply = parse_reply(bytes(inner).decode())
    assert reply["type"] == "text" and reply["to"] == "oyORnuP8q7ou2gfYjqLzSIWZf0rs"
    assert "帮助" in reply["content"]  # "abcdteT" is no command: the hint


# --- our implementation against WeRoBot's ------------------------------------------------

MESSAGES = ["", "a", "x" * 11, "x" * 12, "x" * 13, "y" * 43, "y" * 44, "z" * 45,
            "<xml><Content><![CDATA[兑换 1｜本周]]></Content></xml>", "长" * 700]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: f"{len(m.encode())}B")
def test_werobot_ciphertext_decrypts_with_ours(message: str) -> None:
    # 16 + 4 + len + 18-byte AppId: lengths 10..12 and 42..44 straddle the 32-byte padding edge.
    ours = WeChatCrypto(TOKEN, AES_KEY, APP_ID)
    assert ours.decrypt(werobot_encrypt(message)) == message


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: f"{len(m.encode())}B")
def test_our_ciphertext_decrypts_with_werobot(message: str) -> None:
    ours = WeChatCrypto(TOKEN, AES_KEY, APP_ID)
    encrypt = ours.encrypt_payload(message)
    assert len(base64.b64decode(encrypt)) % 32 == 0
    assert bytes(PrpCrypto(werobot_key(AES_KEY)).decrypt(encrypt, APP_ID)).decode() == message
    assert ours.decrypt(encrypt) == message
    assert ours.encrypt_payload(message) != encrypt  # 16 fresh random bytes each time


def test_our_envelope_opens_with_werobot() -> None:
    envelope = WeChatCrypto(TOKEN, AES_KEY, APP_ID).encrypt(
        "<xml><Content><![CDATA[你好]]></Content></xml>", nonce="n0nce", timestamp="1700000000")
    root = ElementTree.fromstring(envelope)
    assert [child.tag for child in root] == ["Encrypt", "MsgSignature", "TimeStamp", "Nonce"]
    assert root.findtext("TimeStamp") == "1700000000" and root.findtext("Nonce") == "n0nce"
    inner = MessageCrypt(TOKEN, AES_KEY, APP_ID).decrypt_message(
        "1700000000", "n0nce", root.findtext("MsgSignature"), root.findtext("Encrypt"))
    assert bytes(inner).decode() == "<xml><Content><![CDATA[你好]]></Content></xml>"


@pytest.mark.parametrize("encrypt, reason", [
    ("not base64 at all!", "base64"),
    ("", "AES blocks"),
    (base64.b64encode(b"0123456789").decode(), "AES blocks"),
    (base64.b64encode(bytes(64)).decode(), "padding|length|short|AppId|UTF-8"),
], ids=["not-base64", "empty", "partial-block", "zero-blocks"])
def test_garbage_is_a_crypto_error(encrypt: str, reason: str) -> None:
    with pytest.raises(CryptoError, match=reason):
        WeChatCrypto(TOKEN, AES_KEY, APP_ID).decrypt(encrypt)


def test_wrong_key_and_wrong_appid_are_crypto_errors() -> None:
    ours = WeChatCrypto(TOKEN, AES_KEY, APP_ID)
    with pytest.raises(CryptoError):
        ours.decrypt(werobot_encrypt("<xml/>", key=OTHER_KEY))
    with pytest.raises(CryptoError, match="AppId"):
        ours.decrypt(werobot_encrypt("<xml/>", app_id="wx_someone_else"))
    with pytest.raises(CryptoError, match="AppId"):  # a prefix of ours is not ours
        ours.decrypt(werobot_encrypt("<xml/>", app_id=APP_ID[:-1]))


def test_previous_key_still_opens_during_a_rotation() -> None:
    rotating = WeChatCrypto(TOKEN, AES_KEY, APP_ID, previous_aes_key=OTHER_KEY)
    opened = rotating.decrypt_any(werobot_encrypt("<xml>old</xml>", key=OTHER_KEY))
    assert (opened.xml, opened.key_index) == ("<xml>old</xml>", 1)
    assert rotating.decrypt_any(werobot_encrypt("<xml>new</xml>")).key_index == 0
    encrypt = rotating.encrypt_payload("<xml>reply</xml>", key_index=1)
    assert bytes(PrpCrypto(werobot_key(OTHER_KEY)).decrypt(encrypt, APP_ID)) == b"<xml>reply</xml>"
    with pytest.raises(CryptoError):  # without the fallback the old key is refused
        WeChatCrypto(TOKEN, AES_KEY, APP_ID).decrypt(werobot_encrypt("<xml/>", key=OTHER_KEY))


# --- key validation ----------------------------------------------------------------------

@pytest.mark.parametrize("key", ["short", AES_KEY + "A", AES_KEY[:-1] + "!", AES_KEY[:42],
                                 "=" * 43])
def test_bad_keys_are_refused_naming_the_setting(key: str) -> None:
    problem = validate_aes_key(key)
    assert problem is not None and "[wechat] encoding_aes_key" in problem
    assert key not in problem or len(key) < 8  # the key itself is not echoed
    with pytest.raises(ValueError, match=r"\[wechat\] encoding_aes_key"):
        WeChatCrypto(TOKEN, key, APP_ID)


def test_key_checks_for_startup(engine: Engine) -> None:
    assert validate_aes_key(AES_KEY) is None
    assert validate_aes_key("") is None  # safe mode off
    assert safe_mode_problems("", "") == []
    assert safe_mode_problems(AES_KEY, APP_ID) == []
    assert safe_mode_problems(AES_KEY, APP_ID, OTHER_KEY) == []
    assert any("app_id" in p for p in safe_mode_problems(AES_KEY, ""))
    assert any("previous_encoding_aes_key" in p for p in safe_mode_problems(AES_KEY, APP_ID, "x"))
    with pytest.raises(ValueError, match=r"\[wechat\] encoding_aes_key"):
        create_app(safe_settings(encoding_aes_key="too-short"), engine)
    with pytest.raises(ValueError, match=r"\[wechat\] app_id"):
        create_app(safe_settings(app_id=""), engine)
    assert AES_KEY not in repr(WeChatCrypto(TOKEN, AES_KEY, APP_ID))


# --- the conversation over encrypted requests -----------------------------------------

@pytest.mark.usefixtures("sample")
def test_latest_and_unlock_over_safe_mode(safe_user: SafeUser, engine: Engine) -> None:
    topup(engine, READER, 150)
    latest = safe_user.send_encrypted("本周")
    assert latest["type"] == "text" and latest["to"] == READER
    assert "第1期｜AI客服的真实账本" in latest["content"] and "余额 150 豆" in latest["content"]
    unlocked = safe_user.send_encrypted("兑换")
    assert unlocked["type"] == "news" and unlocked["url"].startswith("http://testserver/read/1?")
    assert "扣除 99 豆" in unlocked["description"]
    assert balance(engine, READER) == 51


@pytest.mark.usefixtures("sample")
def test_same_msgid_twice_over_safe_mode_debits_once(
        safe_user: SafeUser, engine: Engine) -> None:
    topup(engine, READER, 500)
    xml = safe_user.text_xml("兑换", msg_id=777001)
    first = safe_user.post_encrypted(xml)
    first_reply = safe_user.open(first.text)
    second = safe_user.post_encrypted(xml)  # a retry: new nonce, new random bytes
    second_reply = safe_user.open(second.text)
    assert first_reply == second_reply and first_reply["type"] == "news"
    assert balance(engine, READER) == 401
    assert redeem_count(engine, READER) == 1
    assert inbound_count(engine) == 1


def test_silent_reply_stays_a_plain_success(safe_user: SafeUser) -> None:
    resp = safe_user.post_encrypted(safe_user.event_xml("unsubscribe"))
    assert resp.status_code == 200 and resp.text == "success"


def test_handshake_is_plain_in_safe_mode(safe_client: httpx.Client) -> None:
    ts, nonce = str(int(time.time())), "n1"
    resp = safe_client.get("/wechat", params={"signature": sign(TOKEN, ts, nonce),
                                              "timestamp": ts, "nonce": nonce,
                                              "echostr": "8812345"})
    assert resp.status_code == 200 and resp.text == "8812345"


# --- refusals: nothing stored -------------------------------------------------------------

def _other_crypto_ciphertext(xml: str) -> str:
    return werobot_encrypt(xml, key=OTHER_KEY)


@pytest.mark.parametrize("case, status", [
    ("not-base64", 400), ("random-blocks", 400), ("wrong-key", 400), ("wrong-appid", 400),
    ("bad-msg-signature", 403), ("missing-msg-signature", 403), ("bad-outer-signature", 403),
    ("no-encrypt-element", 400), ("inner-not-xml", 400), ("inner-control-chars", 400),
])
def test_bad_encrypted_requests_are_refused_and_store_nothing(
        safe_user: SafeUser, engine: Engine, case: str, status: int) -> None:
    xml = safe_user.text_xml("兑换")
    kw: dict[str, Any] = {}
    if case == "not-base64":
        kw["encrypt"] = "%%%not-base64%%%"
    elif case == "random-blocks":
        kw["encrypt"] = base64.b64encode(uuid.uuid4().bytes * 4).decode()
    elif case == "wrong-key":
        kw["encrypt"] = _other_crypto_ciphertext(xml)
    elif case == "wrong-appid":
        kw["encrypt"] = werobot_encrypt(xml, app_id="wx_someone_else")
    elif case == "bad-msg-signature":
        kw["msg_sig"] = "0" * 40
    elif case == "missing-msg-signature":
        kw["msg_sig"] = ""
    elif case == "bad-outer-signature":
        kw["signature"] = "f" * 40
    elif case == "inner-not-xml":
        kw["encrypt"] = werobot_encrypt("this is not xml")
    elif case == "inner-control-chars":
        kw["encrypt"] = werobot_encrypt(safe_user.text_xml("hello\x01world"))
    if case == "no-encrypt-element":
        ts, nonce = str(int(time.time())), "abc"
        resp = safe_user.http.post("/wechat", content=xml.encode(), params={
            "signature": sign(TOKEN, ts, nonce), "timestamp": ts, "nonce": nonce,
            "encrypt_type": "aes", "msg_signature": get_signature(TOKEN, ts, nonce, "")})
    else:
        resp = safe_user.post_encrypted(xml, **kw)
    assert resp.status_code == status, resp.text
    assert "兑换" not in resp.text
    assert inbound_count(engine) == 0


def test_plain_request_in_safe_mode_is_403(safe_client: httpx.Client, engine: Engine) -> None:
    user = WeChatUser(safe_client, READER)
    resp = user.post_xml(user.text_xml("本周"))
    assert resp.status_code == 403
    assert inbound_count(engine) == 0


def test_encrypted_request_without_a_key_is_400(user: WeChatUser, engine: Engine) -> None:
    resp = SafeUser(user.http, READER).post_encrypted(user.text_xml("本周"))
    assert resp.status_code == 400 and "encoding_aes_key" in resp.text
    assert inbound_count(engine) == 0


def test_compatible_mode_answers_each_request_in_its_own_kind(engine: Engine) -> None:
    with client_for(create_app(safe_settings(accept_plain=True), engine)) as client:
        safe = SafeUser(client, READER)
        encrypted = safe.post_encrypted(safe.text_xml("帮助"))
        assert "<Encrypt>" in encrypted.text
        assert "帮助" in safe.open(encrypted.text)["content"]
        # The previous reply was encrypted; this plain one must not inherit that.
        plain = WeChatUser(client, READER).post_xml(safe.text_xml("帮助"))
        assert plain.status_code == 200 and "<Encrypt>" not in plain.text
        assert "帮助" in parse_reply(plain.text)["content"]
        again = safe.post_encrypted(safe.text_xml("帮助"))
        assert "帮助" in safe.open(again.text)["content"]


def test_compatible_envelope_with_plain_fields_uses_the_encrypted_ones(
        engine: Engine) -> None:
    """In 兼容模式 WeChat sends the plain fields and the Encrypt element together; the
    authenticated (encrypted) copy is the one that counts."""
    with client_for(create_app(safe_settings(accept_plain=True), engine)) as client:
        safe = SafeUser(client, READER)
        inner = safe.text_xml("帮助")
        encrypt = werobot_encrypt(inner)
        ts, nonce = str(int(time.time())), "compat1"
        decoy = WeChatUser(client, "o_decoy").text_xml("余额")
        body = decoy.replace("</xml>", f"<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>")
        resp = client.post("/wechat", content=body.encode(), params={
            "signature": sign(TOKEN, ts, nonce), "timestamp": ts, "nonce": nonce,
            "encrypt_type": "aes", "msg_signature": get_signature(TOKEN, ts, nonce, encrypt)})
        assert resp.status_code == 200, resp.text
        reply = werobot_open_reply(resp.text, nonce=nonce)
        assert reply["to"] == READER and "帮助" in reply["content"]


def test_rotation_reply_uses_the_key_that_opened_the_request(engine: Engine) -> None:
    settings = safe_settings()
    app = bottle.Bottle()
    hook = Webhook(settings, engine)
    hook.crypto = WeChatCrypto(TOKEN, AES_KEY, APP_ID, previous_aes_key=OTHER_KEY)
    hook.install(app)
    with client_for(app) as client:
        old = SafeUser(client, READER, key=OTHER_KEY)
        assert "帮助" in old.send_encrypted("帮助")["content"]
        new = SafeUser(client, READER)
        assert "帮助" in new.send_encrypted("帮助")["content"]
