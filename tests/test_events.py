"""Events (storage.events) recorded by the paths that do the thing: card views with the
delivery's claim (signed XML through the real WSGI app; a WeChat retry adds none, on the fast
path and the write path), reader pages opened, and the money paths' hooks, each recorded once
however often its idempotent call is repeated."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import bottle
import httpx
import pytest
from sqlalchemy import Engine, select

from bot.app import create_app
from bot.settings import Settings
from bot.web.links import ReaderLinks
from bot.wechat.webhook import Webhook
from storage import codes, events, gifts, ledger, passes, payments
from storage.db import transaction
from storage.models import Event
from storage.subscribers import ensure_subscriber
from tests.conftest import CODES_SECRET, WeChatUser, parse_reply
from tests.test_payments_storage import PACKAGE, Tx
from tests.test_replay import Captured
from tests.test_webhook import READER, add_issue, topup

SECRET = CODES_SECRET.encode()


def events_of(engine: Engine, kind: str | None = None,
              openid: str | None = None) -> list[tuple[Any, ...]]:
    """(kind, openid, issue, detail, amount) of the events recorded, oldest first (those of
    one statement in no particular order: sort them)."""
    stmt = select(Event.kind, Event.openid, Event.issue_number, Event.detail,  # type: ignore[call-overload]
                  Event.amount).order_by(Event.id)
    if kind is not None:
        stmt = stmt.where(Event.kind == kind)
    if openid is not None:
        stmt = stmt.where(Event.openid == openid)
    with transaction(engine) as s:
        return [tuple(r) for r in s.execute(stmt).all()]


def cards(engine: Engine, openid: str = READER) -> list[tuple[Any, ...]]:
    return events_of(engine, events.CARD, openid)


def webhook_client(settings: Settings, engine: Engine, **attrs: Any) -> httpx.Client:
    """The webhook alone, with some of its attributes set (the replay check, events)."""
    hook = Webhook(settings, engine)
    for name, value in attrs.items():
        setattr(hook, name, value)
    app = bottle.Bottle()
    hook.install(app)
    return httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t")


# --------------------------------------------------------------------------- card views


@pytest.mark.parametrize("remember_pairs", [True, False], ids=["sealed", "unsealed"])
def test_a_card_on_the_fast_path_is_one_event_and_a_retry_adds_none(
        settings: Settings, engine: Engine, remember_pairs: bool) -> None:
    """Both claim statements of the fast path (with the signed pair and without): the card's
    event is written only when the claim is new."""
    add_issue(engine, 1, price=30)
    topup(engine, READER, 40)
    with webhook_client(settings, engine, remember_pairs=remember_pairs) as http:
        user = WeChatUser(http, READER)
        user.send("帮助")  # takes the new-issue notice: the cards below are the fast path's
        xml = user.text_xml("本周", msg_id=880001)
        first = parse_reply(user.post_xml(xml).text)
        assert "测试第1期" in first["content"]
        assert cards(engine) == [("card", READER, 1, None, None)]
        # WeChat's retries (each under a fresh signed query): the same reply, no new event.
        for _ in range(2):
            assert parse_reply(user.post_xml(xml).text) == first
        assert len(cards(engine)) == 1
        user.send("1")  # the card by number is a view too
        assert len(cards(engine)) == 2


def test_the_very_same_signed_request_again_adds_no_card(engine: Engine,
                                                         app_client: httpx.Client) -> None:
    """A retry under the same signed query (the pair seen with this very body) is found
    claimed on the general statement: still no second event."""
    add_issue(engine, 1, price=30)
    topup(engine, READER, 40)
    user = WeChatUser(app_client, READER)
    user.send("帮助")
    xml = user.text_xml("本周", msg_id=880002)
    captured = Captured()
    replies = [captured.post(app_client, xml) for _ in range(2)]
    assert [r.status_code for r in replies] == [200, 200]
    assert replies[0].text == replies[1].text
    assert len(cards(engine)) == 1


def test_the_notice_message_records_its_card_once(engine: Engine,
                                                  app_client: httpx.Client) -> None:
    """The first 本周 after a publication also records the new-issue notice (a transaction of
    its own on the fast path): the card is in it, and its retry adds none."""
    add_issue(engine, 1, price=30)
    topup(engine, READER, 40)
    user = WeChatUser(app_client, READER)
    xml = user.text_xml("本周", msg_id=880003)
    first = parse_reply(user.post_xml(xml).text)
    assert "测试第1期" in first["content"]
    assert parse_reply(user.post_xml(xml).text) == first
    assert cards(engine) == [("card", READER, 1, None, None)]


def test_a_new_readers_card_on_the_write_path_is_one_event(engine: Engine,
                                                           app_client: httpx.Client) -> None:
    add_issue(engine, 1, price=30)
    user = WeChatUser(app_client, "o_brand_new_01")
    xml = user.text_xml("本周", msg_id=880004)
    first = parse_reply(user.post_xml(xml).text)
    assert "测试第1期" in first["content"]
    assert parse_reply(user.post_xml(xml).text) == first
    assert cards(engine, "o_brand_new_01") == [("card", "o_brand_new_01", 1, None, None)]


def test_follow_greeting_scan_and_menu_show_cards(engine: Engine,
                                                  app_client: httpx.Client) -> None:
    add_issue(engine, 1, price=30)
    user = WeChatUser(app_client, "o_follower_01")
    greeting = user.event("subscribe")
    assert "测试第1期" in greeting["content"]
    assert "测试第1期" in user.event("SCAN", "qrscene_x")["content"]
    assert "测试第1期" in user.event("CLICK", "LATEST")["content"]
    assert len(cards(engine, "o_follower_01")) == 3
    assert len(events_of(engine, events.FOLLOW, "o_follower_01")) == 1


def test_replies_without_a_card_record_nothing(engine: Engine, app_client: httpx.Client) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 40)
    user = WeChatUser(app_client, READER)
    for text in ("帮助", "余额", "往期"):
        user.send(text)
    assert cards(engine) == []


def test_recording_can_be_turned_off_for_the_benchmark(settings: Settings,
                                                       engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 40)
    with webhook_client(settings, engine, record_events=False) as http:
        user = WeChatUser(http, READER)
        user.send("本周")
        WeChatUser(http, "o_brand_new_02").send("本周")
    assert events_of(engine, events.CARD) == []


def test_unfollow_is_recorded_once_and_follow_once(engine: Engine,
                                                   app_client: httpx.Client) -> None:
    user = WeChatUser(app_client, "o_leaver_01")
    user.event("subscribe")
    xml = user.event_xml("unsubscribe", create_time=1_700_000_000)
    assert user.post_xml(xml).status_code == 200
    assert user.post_xml(xml).status_code == 200  # WeChat's retry
    kinds = [e[0] for e in events_of(engine, openid="o_leaver_01")]
    assert kinds.count("follow") == 1 and kinds.count("unfollow") == 1


# --------------------------------------------------------------------------- reader pages


def _reader_path(settings: Settings, openid: str, number: int) -> str:
    return ReaderLinks(settings).path_until(openid, number, 2_000_000_000)


def test_reader_pages_record_excerpt_then_full(settings: Settings, engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 40)
    with httpx.Client(transport=httpx.WSGITransport(app=create_app(settings, engine)),
                      base_url="http://t") as http:
        path = _reader_path(settings, READER, 1)
        assert http.get(path).status_code == 200
        with transaction(engine) as s:
            ledger.redeem(s, openid=READER, issue_number=1, price=30, key="t:unlock:1")
        page = http.get(path)
        assert page.status_code == 200 and "第1期第19段" in page.text
        # Refused links record nothing.
        assert http.get(path.replace("s=", "s=0")).status_code == 403
        assert http.get(_reader_path(settings, READER, 9)).status_code == 404
    assert events_of(engine, openid=READER, kind=events.EXCERPT) == [
        ("excerpt", READER, 1, None, None)]
    assert events_of(engine, openid=READER, kind=events.FULL) == [
        ("full", READER, 1, None, None)]


def test_a_failure_to_record_does_not_fail_the_page(
        settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 40)

    def broken(*a: Any, **kw: Any) -> None:
        raise RuntimeError("event table gone")

    monkeypatch.setattr(events, "record", broken)
    with httpx.Client(transport=httpx.WSGITransport(app=create_app(settings, engine)),
                      base_url="http://t") as http:
        page = http.get(_reader_path(settings, READER, 1))
    assert page.status_code == 200 and "免费试读" in page.text
    assert any("recording the excerpt event" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- money hooks


def _subscriber(engine: Engine, openid: str = READER, tokens: int = 0) -> None:
    with transaction(engine) as s:
        ensure_subscriber(s, openid=openid)
    if tokens:
        topup(engine, openid, tokens, key=f"seed:{openid}")


def test_operator_topup_once_and_adjust_never(engine: Engine) -> None:
    _subscriber(engine)
    for _ in range(2):  # the same key again: a replay, nothing new
        with transaction(engine) as s:
            ledger.credit(s, openid=READER, amount=50, kind="topup", key="op:1", reason="r",
                          operator="o_op")
    with transaction(engine) as s:
        ledger.credit(s, openid=READER, amount=-5, kind="adjust", key="op:2", reason="fix")
    assert events_of(engine, events.TOPUP) == [("topup", READER, None, "operator", 50)]


def test_redeem_by_tokens_once_and_not_when_already_unlocked(engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    _subscriber(engine, tokens=100)
    for key in ("u:1", "u:1", "u:2"):  # a replay, then another key: already unlocked
        with transaction(engine) as s:
            ledger.redeem(s, openid=READER, issue_number=1, price=30, key=key)
    assert events_of(engine, events.UNLOCK) == [("unlock", READER, 1, "tokens", 30)]


def test_a_failed_redeem_records_nothing(engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    _subscriber(engine, tokens=10)
    with transaction(engine) as s, pytest.raises(ledger.InsufficientBalance):
        ledger.redeem(s, openid=READER, issue_number=1, price=30, key="u:3")
    assert events_of(engine, events.UNLOCK) == []


def test_pass_purchase_and_a_pass_covered_unlock(engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    _subscriber(engine, tokens=200)
    for _ in range(2):
        with transaction(engine) as s:
            bought = passes.buy(s, openid=READER, pass_id="month", days=30, price=100,
                                key="pass:1")
    assert events_of(engine, events.PASS) == [("pass", READER, None, "month", 100)]
    assert bought.replayed
    with transaction(engine) as s:
        assert ledger.redeem(s, openid=READER, issue_number=1, price=30,
                             key="u:4").status == "pass"
    assert events_of(engine, events.UNLOCK) == [("unlock", READER, 1, "pass", None)]


def _code(engine: Engine, **kw: Any) -> str:
    with transaction(engine) as s:
        return codes.create_batch(s, secret=SECRET, count=1, **kw).codes[0]


def _redeem_code(engine: Engine, code: str, key: str, openid: str = READER) -> str:
    with transaction(engine) as s:
        return codes.redeem_code(s, openid=openid, text=code, secret=SECRET, key=key).status


def test_a_tokens_code_is_a_code_and_a_topup_once(engine: Engine) -> None:
    _subscriber(engine)
    code = _code(engine, kind="tokens", tokens=25)
    assert _redeem_code(engine, code, "c:1") == "granted"
    assert _redeem_code(engine, code, "c:1") == "already_used"
    assert _redeem_code(engine, code, "c:2") == "already_used"
    assert sorted(events_of(engine, openid=READER)) == [("code", READER, None, "tokens", 25),
                                                        ("topup", READER, None, "code", 25)]


def test_an_issue_code_is_a_code_and_an_unlock(engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    _subscriber(engine)
    code = _code(engine, kind="issue", issue_number=1, uses=2)
    assert _redeem_code(engine, code, "c:3") == "granted"
    assert _redeem_code(engine, code, "c:4") == "already_used"
    assert sorted(events_of(engine, openid=READER)) == [("code", READER, 1, "issue", None),
                                                        ("unlock", READER, 1, "code", None)]


def test_a_pass_code_is_a_code(engine: Engine) -> None:
    _subscriber(engine)
    code = _code(engine, kind="pass", pass_id="month", pass_days=30)
    assert _redeem_code(engine, code, "c:5") == "granted"
    assert _redeem_code(engine, code, "c:5") == "already_used"
    assert events_of(engine, openid=READER) == [("code", READER, None, "pass", None)]


def test_a_gift_is_unlocked_as_a_gift(engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    _subscriber(engine, "o_giver_01", tokens=100)
    _subscriber(engine)
    with transaction(engine) as s:
        gift = gifts.buy_gift(s, giver="o_giver_01", secret=SECRET, key="g:1", issue_number=1,
                              issue_price=30)
    assert _redeem_code(engine, gift.code, "c:6") == "granted"
    assert _redeem_code(engine, gift.code, "c:6") == "already_used"
    assert sorted(events_of(engine, openid=READER)) == [("code", READER, 1, "gift", None),
                                                        ("unlock", READER, 1, "gift", None)]


def _order(engine: Engine, issue: int | None = None) -> str:
    with transaction(engine) as s:
        ensure_subscriber(s, openid=READER)
        return payments.new_order(s, openid=READER, package=PACKAGE, kind="jsapi",
                                  issue_number=issue, app_id="wx_app", mch_id="1900000001",
                                  notify_url="https://example.com/pay/notify",
                                  ttl=timedelta(minutes=30)).out_trade_no


def test_a_payment_is_one_topup_however_often_it_is_notified(engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    no = _order(engine, issue=1)
    outcomes = []
    for _ in range(2):
        with transaction(engine) as s:
            outcomes.append(payments.settle(s, out_trade_no=no,
                                            transaction=Tx(no, payer_openid=READER)).outcome)
    assert outcomes == ["credited", "already"]
    assert events_of(engine, openid=READER) == [("topup", READER, None, "pay", 99),
                                                ("unlock", READER, 1, "tokens", 30)]


def test_a_payment_by_someone_unknown_is_recorded_too(engine: Engine) -> None:
    """The fallback credit (no subscriber row when the claim ran) records its top-up."""
    no = _order(engine)
    with transaction(engine) as s:
        s.execute(Event.__table__.delete())  # type: ignore[attr-defined]
        from storage.models import Subscriber
        s.execute(Subscriber.__table__.delete())  # type: ignore[attr-defined]
    with transaction(engine) as s:
        assert payments.settle(s, out_trade_no=no,
                               transaction=Tx(no, payer_openid=READER)).outcome == "credited"
    assert events_of(engine, openid=READER) == [("topup", READER, None, "pay", 99)]


def test_event_kinds_the_hooks_write_are_known() -> None:
    """The kinds written as SQL literals (storage.payments) are storage.events'."""
    import inspect

    source = inspect.getsource(payments)
    assert set(re.findall(r"INSERT INTO event .*?SELECT :\w+, '(\w+)'", source, re.S)) \
        <= events.KINDS


@pytest.mark.parametrize("remember_pairs", [True, False], ids=["sealed", "unsealed"])
def test_on_postgresql_the_card_rides_in_the_claims_one_statement(
        settings: Settings, engine: Engine, remember_pairs: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path keeps its one round trip for the write: the card's INSERT is a CTE of the
    claim's statement, not a statement (or a transaction) of its own."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite writes the event in the claim's transaction instead")
    add_issue(engine, 1, price=30)
    topup(engine, READER, 40)
    hook = Webhook(settings, engine)
    hook.remember_pairs = remember_pairs
    statements: list[str] = []
    real_writer = hook.fast._writer

    class Counting:
        def __init__(self, cur: Any) -> None:
            self._cur = cur

        def execute(self, sql: str, params: Any = None) -> Any:
            statements.append(sql)
            return self._cur.execute(sql, params)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._cur, name)

    from contextlib import contextmanager

    @contextmanager
    def counted(*, atomic: bool) -> Any:
        assert not atomic, "the card made the claim a transaction"
        with real_writer(atomic=atomic) as cur:
            yield Counting(cur)

    app = bottle.Bottle()
    hook.install(app)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        user = WeChatUser(http, READER)
        user.send("帮助")  # the notice, taken here (a transaction of its own, once)
        monkeypatch.setattr(hook.fast, "_writer", counted)
        assert "测试第1期" in user.send("本周")["content"]
    assert len(statements) == 1 and "INSERT INTO event" in statements[0]
    assert len(cards(engine)) == 1


def test_the_events_cost_benchmark_runs() -> None:
    """bench/webhook.py --events-cost (the figure in docs/benchmarks.md §8) keeps working."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSBOT_")}
    env["PYTHONPATH"] = str(root)
    done = subprocess.run([sys.executable, str(root / "bench" / "webhook.py"), "--events-cost",
                           "--quick", "--no-pg"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SQLite: events on" in done.stdout and "msgs/s" in done.stdout
