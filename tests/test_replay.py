"""Replay protection, delivery keys scoped to their sender, and no stored 系统繁忙: signed WeChat
XML through the real WSGI app (the attacks of issue 7 among them), the books checked with the
real CLI. Two server processes on one database: tests/test_replay_multiprocess.py."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import bottle
import httpx
import pytest
from sqlalchemy import Engine, func, select, text
from typer.testing import CliRunner
from werobot.utils import get_signature

from bot.app import create_app
from bot.cli import app as cli_app
from bot.settings import Settings
from bot.wechat.webhook import PURGE_EVERY_S, Webhook, sign
from handlers import ROUTERS
from handlers.router import Context, Incoming, Router, Text
from storage import ledger, replay
from storage.db import transaction
from storage.models import InboundMessage, LedgerEntry, SignedRequest
from tests.conftest import OPERATOR, TOKEN, WeChatUser, parse_reply
from tests.test_safe_mode import SafeUser, safe_settings, werobot_encrypt
from tests.test_webhook import add_issue, balance, topup

READER = "o_reader_0001"
VICTIM = "o_victim_0001"
ATTACKER = "o_attacker_01"
BUSY = "系统繁忙，请稍后再试"


class Captured:
    """One signed query as it would sit in an access log, to be posted with any body."""

    def __init__(self, *, ts: int | None = None, nonce: str | None = None) -> None:
        self.ts = str(ts if ts is not None else int(time.time()))
        self.nonce = nonce or uuid.uuid4().hex[:10]
        self.query = {"signature": sign(TOKEN, self.ts, self.nonce), "timestamp": self.ts,
                      "nonce": self.nonce}

    def post(self, http: httpx.Client, xml: str, **extra: str) -> httpx.Response:
        return http.post("/wechat", params={**self.query, **extra}, content=xml.encode(),
                         headers={"Content-Type": "text/xml"})


def text_xml(openid: str, content: str, msg_id: int) -> str:
    """A text message as WeChat posts it (WeChatUser.text_xml without a client)."""
    return (f"<xml><ToUserName><![CDATA[gh_test]]></ToUserName>"
            f"<FromUserName><![CDATA[{openid}]]></FromUserName>"
            f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[{content}]]></Content><MsgId>{msg_id}</MsgId></xml>")


def config_for(tmp_path: Path, engine: Engine) -> Path:
    url = engine.url.render_as_string(hide_password=False)
    path = tmp_path / "config.toml"
    path.write_text(f'[wechat]\ntoken = "{TOKEN}"\n[reader]\nsecret = "test-reader-secret-0"\n'
                    f'[database]\nurl = "{url}"\n[operators]\nopenids = ["{OPERATOR}"]\n',
                    encoding="utf-8")
    return path


def ledger_check(tmp_path: Path, engine: Engine) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, ["ledger", "check", "--config",
                                          str(config_for(tmp_path, engine))])
    return result.exit_code, result.output


def count(engine: Engine, model: type[Any]) -> int:
    with transaction(engine) as s:
        return int(s.execute(select(func.count()).select_from(model)).scalar_one())


def entries(engine: Engine) -> list[LedgerEntry]:
    with transaction(engine) as s:
        return list(s.exec(select(LedgerEntry)).scalars())  # type: ignore[call-overload]


# --- 1. replay -------------------------------------------------------------------------------


def test_a_captured_operator_url_cannot_forge_topups(
        http: httpx.Client, engine: Engine, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The issue's attack: one accepted operator URL, reused 20 times with other bodies."""
    topup(engine, READER, 10)
    topup(engine, ATTACKER, 1)
    url = Captured()
    real = url.post(http, text_xml(OPERATOR, "#topup o_reader_0001 50 gift", 9001))
    assert real.status_code == 200 and "60" in parse_reply(real.text)["content"]
    with caplog.at_level(logging.WARNING, logger="newsbot.webhook"):
        for i in range(20):
            forged = url.post(http, text_xml(OPERATOR, f"#topup {ATTACKER} 100000 x", 9100 + i))
            assert forged.status_code == 403, forged.text
    assert balance(engine, ATTACKER) == 1 and balance(engine, READER) == 60
    assert len(entries(engine)) == 3  # the two fixtures' top-ups and the real one
    refusals = [r.getMessage() for r in caplog.records if "refused-403" in r.getMessage()]
    assert len(refusals) == 20 and all("seen before with another message" in r for r in refusals)
    assert ledger_check(tmp_path, engine)[0] == 0


def test_a_captured_url_cannot_spend_a_victims_balance(
        http: httpx.Client, engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, VICTIM, 100)
    url = Captured()
    assert url.post(http, text_xml(READER, "帮助", 77)).status_code == 200
    forged = url.post(http, text_xml(VICTIM, "兑换 1", 78))
    assert forged.status_code == 403
    assert balance(engine, VICTIM) == 100


def test_the_same_pair_with_the_same_body_is_wechat_retrying(
        http: httpx.Client, engine: Engine) -> None:
    topup(engine, READER, 10)
    url = Captured()
    xml = text_xml(OPERATOR, "#topup o_reader_0001 5 gift", 4242)
    first, again = url.post(http, xml), url.post(http, xml)
    assert first.status_code == again.status_code == 200
    assert parse_reply(first.text)["content"] == parse_reply(again.text)["content"]
    assert balance(engine, READER) == 15  # credited once
    # The fast path (a reader's 余额) too: the same reply, one row each.
    url2 = Captured()
    xml2 = text_xml(READER, "余额", 4243)
    first, again = url2.post(http, xml2), url2.post(http, xml2)
    assert first.status_code == again.status_code == 200 and first.text == again.text
    assert count(engine, SignedRequest) == 2


def test_a_forged_body_on_the_fast_path_is_refused_and_stores_nothing(
        http: httpx.Client, engine: Engine) -> None:
    topup(engine, READER, 10)
    topup(engine, VICTIM, 10)
    url = Captured()
    assert url.post(http, text_xml(READER, "余额", 501)).status_code == 200
    before = count(engine, InboundMessage)
    forged = url.post(http, text_xml(VICTIM, "余额", 502))
    assert forged.status_code == 403 and "余额" not in forged.text
    assert count(engine, InboundMessage) == before


def test_compatible_mode_records_encrypted_deliveries_too(engine: Engine) -> None:
    """In 兼容模式 an encrypted delivery's URL also carries a valid plain ``signature``: reused
    without encrypt_type, with a plain body, it must not pass."""
    topup(engine, READER, 10)
    app = create_app(safe_settings(accept_plain=True), engine)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        user = SafeUser(http, OPERATOR)
        resp = user.post_encrypted(user.text_xml("#topup o_reader_0001 5 gift", msg_id=61))
        assert resp.status_code == 200
        leaked = {k: v for k, v in resp.request.url.params.items()
                  if k in ("signature", "timestamp", "nonce")}
        forged = http.post("/wechat", params=leaked, content=text_xml(
            OPERATOR, f"#topup {READER} 90000 x", 62).encode())
        assert forged.status_code == 403
    assert balance(engine, READER) == 15


def test_safe_mode_alone_records_no_pairs(engine: Engine) -> None:
    app = create_app(safe_settings(), engine)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        user = SafeUser(http, READER)
        assert user.send_encrypted("帮助")["type"] == "text"
    assert count(engine, SignedRequest) == 0


def test_an_encrypted_retry_is_the_same_message(engine: Engine) -> None:
    """The pair is kept with the hash of the decrypted message: the same message encrypted
    afresh under the same pair (as a retry may be) is still a retry, not a forgery."""
    topup(engine, READER, 10)
    app = create_app(safe_settings(accept_plain=True), engine)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        user = SafeUser(http, OPERATOR)
        inner = user.text_xml("#topup o_reader_0001 5 gift", msg_id=71)
        first = user.post_encrypted(inner)
        params = dict(first.request.url.params)
        encrypt = werobot_encrypt(inner)  # fresh random prefix: another ciphertext
        params["msg_signature"] = get_signature(TOKEN, params["timestamp"], params["nonce"],
                                                encrypt)
        body = (f"<xml><ToUserName><![CDATA[gh_test]]></ToUserName>"
                f"<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>")
        again = http.post("/wechat", params=params, content=body.encode())
        assert first.status_code == again.status_code == 200
    assert balance(engine, READER) == 15


def test_old_pairs_are_purged(settings: Settings, engine: Engine) -> None:
    now = [time.time()]
    app = bottle.Bottle()
    Webhook(settings, engine, clock=lambda: now[0]).install(app)
    skew = settings.server.max_clock_skew_s
    with transaction(engine) as s:
        for age in (10, skew + replay.PURGE_MARGIN_S + 5, 10_000):
            s.add(SignedRequest(timestamp=int(now[0]) - age, nonce=f"old{age}",
                                body_sha256="0" * 64))
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        user = WeChatUser(http, READER)
        user.send("帮助", create_time=int(now[0]))
        with transaction(engine) as s:
            left = set(s.execute(text("SELECT nonce FROM signed_request")).scalars())
        assert "old10" in left and len(left) == 2  # the fresh row and this request's
        # The next purge waits PURGE_EVERY_S; then the once fresh row goes as well.
        now[0] += skew + replay.PURGE_MARGIN_S + PURGE_EVERY_S + 20
        user.post_xml(user.text_xml("帮助"), timestamp=int(now[0]))
        with transaction(engine) as s:
            left = set(s.execute(text("SELECT nonce FROM signed_request")).scalars())
        assert len(left) == 1 and "old10" not in left


def test_a_url_whose_message_was_refused_cannot_carry_another(
        http: httpx.Client, engine: Engine) -> None:
    topup(engine, READER, 10)
    url = Captured()
    assert url.post(http, "<xml><FromUserName>broken").status_code == 400
    forged = url.post(http, text_xml(OPERATOR, f"#topup {READER} 500 x", 91))
    assert forged.status_code == 403
    assert balance(engine, READER) == 10


def test_an_overlong_nonce_is_refused(http: httpx.Client) -> None:
    url = Captured(nonce="n" * 200)
    assert url.post(http, text_xml(READER, "帮助", 1)).status_code == 400


# --- 2. keys scoped to the sender ---------------------------------------------------------------


def test_another_users_msgid_gets_its_own_answer(http: httpx.Client, engine: Engine) -> None:
    topup(engine, READER, 77)
    topup(engine, VICTIM, 5)
    mine = WeChatUser(http, READER).send("余额", msg_id=31337)
    theirs = WeChatUser(http, VICTIM).send("余额", msg_id=31337)
    assert "77" in mine["content"] and "77" not in theirs["content"]
    assert "5" in theirs["content"]


def test_the_same_msgid_from_two_users_moves_money_for_both(
        http: httpx.Client, engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 40)
    topup(engine, VICTIM, 40)
    WeChatUser(http, READER).send("兑换 1", msg_id=555)
    WeChatUser(http, VICTIM).send("兑换 1", msg_id=555)
    assert balance(engine, READER) == 10 and balance(engine, VICTIM) == 10
    keys = {e.idempotency_key for e in entries(engine) if e.kind == "redeem"}
    assert keys == {f"wechat:{READER}:555", f"wechat:{VICTIM}:555"}


def test_a_cli_key_like_wechat_n_does_not_block_a_chat_message(
        http: httpx.Client, engine: Engine, tmp_path: Path) -> None:
    topup(engine, READER, 10)
    config = config_for(tmp_path, engine)
    done = CliRunner().invoke(cli_app, ["topup", READER, "3", "--reason", "by hand", "--key",
                                        "wechat:888", "--config", str(config)])
    assert done.exit_code == 0, done.output
    reply = WeChatUser(http, OPERATOR).send(f"#topup {READER} 7 chat", msg_id=888)
    assert "20" in reply["content"], reply
    assert balance(engine, READER) == 20


# --- 3. no stored 系统繁忙 ----------------------------------------------------------------------


def test_a_transient_failure_stores_nothing_and_the_retry_runs_the_handler(
        settings: Settings, engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    flaky = Router("flaky")
    calls: list[int] = []

    @flaky.command(r"flaky")
    def _flaky(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Text:
        calls.append(1)
        ledger.credit(ctx.session, openid=msg.openid, amount=1, kind="topup", key=ctx.key,
                      reason="flaky")
        if len(calls) == 1:
            raise ConnectionError("the database blinked")
        return Text("好了")

    topup(engine, READER, 10)
    app = bottle.Bottle()
    Webhook(settings, engine, routers=(flaky, *ROUTERS)).install(app)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        user = WeChatUser(http, READER)
        xml = user.text_xml("flaky", msg_id=6060)
        with caplog.at_level(logging.ERROR, logger="newsbot.webhook"):
            first = parse_reply(user.post_xml(xml).text)
        assert first["content"] == BUSY
        assert any("the database blinked" in (r.exc_text or "") for r in caplog.records)
        assert count(engine, InboundMessage) == 0  # nothing stored: not even the claim
        retry = parse_reply(user.post_xml(xml).text)
        again = parse_reply(user.post_xml(xml).text)
    assert retry["content"] == "好了" == again["content"]
    assert len(calls) == 2 and balance(engine, READER) == 11


def test_a_failed_deliverys_url_takes_its_own_retry_but_no_other_message(
        settings: Settings, engine: Engine) -> None:
    flaky = Router("flaky")
    calls: list[int] = []

    @flaky.command(r"flaky")
    def _flaky(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Text:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("the database blinked")
        return Text("好了")

    topup(engine, READER, 10)
    app = bottle.Bottle()
    Webhook(settings, engine, routers=(flaky, *ROUTERS)).install(app)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        url = Captured()
        xml = text_xml(READER, "flaky", 6161)
        assert parse_reply(url.post(http, xml).text)["content"] == BUSY
        forged = url.post(http, text_xml(OPERATOR, f"#topup {READER} 500 x", 6162))
        assert forged.status_code == 403
        assert parse_reply(url.post(http, xml).text)["content"] == "好了"
    assert balance(engine, READER) == 10


def test_a_handler_that_always_fails_writes_nothing_on_any_retry(
        settings: Settings, engine: Engine) -> None:
    boom = Router("boom")

    @boom.command(r"boom")
    def _boom(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Text:
        raise RuntimeError("a bug")

    app = bottle.Bottle()
    Webhook(settings, engine, routers=(boom, *ROUTERS)).install(app)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        user = WeChatUser(http, READER)
        xml = user.text_xml("boom", msg_id=7070)
        replies = [parse_reply(user.post_xml(xml).text)["content"] for _ in range(3)]
    assert replies == [BUSY] * 3
    assert count(engine, InboundMessage) == 0



def test_the_replay_cost_benchmark_runs() -> None:
    """bench/webhook.py --replay-cost (the figure in docs/benchmarks.md) keeps working."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSBOT_")}
    env["PYTHONPATH"] = str(root)
    done = subprocess.run([sys.executable, str(root / "bench" / "webhook.py"), "--replay-cost",
                           "--quick", "--no-pg"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SQLite: check on" in done.stdout and "CPU on/off" in done.stdout
