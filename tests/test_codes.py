"""Redemption codes (issue 8 §1) through the real WSGI app as signed XML: every status's reply,
the forms a code may be typed in, exactly-once use, the freeze, and what the database keeps.
Each guard has a test that fails without it (see the comments naming the guard)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, func
from sqlmodel import select

from bot.settings import Settings
from storage import codes, ledger
from storage.codes import ALPHABET, canonical, check_ok, display
from storage.db import transaction
from storage.models import (
    CodeBatch,
    CodeFailure,
    CodeFreeze,
    CodeRedemption,
    Entitlement,
    LedgerEntry,
    PassPeriod,
    RedemptionCode,
    utcnow,
)
from storage.subscribers import ensure_subscriber
from tests.conftest import CODES_SECRET, ON_POSTGRES, WeChatUser, make_settings
from tests.test_chat_replies import add_issue, balance

SECRET = CODES_SECRET.encode()
READER = "o_reader_0001"
SHANGHAI = ZoneInfo("Asia/Shanghai")  # [broadcast] timezone by default: how times are shown
PASSES = [{"id": "month", "name": "月卡", "days": 30, "price": 300}]


@pytest.fixture
def settings() -> Settings:
    return make_settings(passes=PASSES)


def batch(engine: Engine, *, count: int = 1, **kw: object) -> list[str]:
    kw.setdefault("kind", "tokens")
    if kw["kind"] == "tokens":
        kw.setdefault("tokens", 50)
    with transaction(engine) as s:
        return codes.create_batch(s, secret=SECRET, count=count, **kw).codes  # type: ignore[arg-type]


def uses_of(engine: Engine, code: str) -> int:
    with transaction(engine) as s:
        row = s.exec(select(RedemptionCode).where(
            RedemptionCode.digest == codes.digest(SECRET, canonical(code) or ""))).one()
        return row.used


def failures(engine: Engine, openid: str = READER) -> int:
    with transaction(engine) as s:
        return int(s.exec(select(func.count()).select_from(CodeFailure)
                          .where(CodeFailure.openid == openid)).one())


def entries(engine: Engine, kind: str = "code") -> int:
    with transaction(engine) as s:
        return int(s.exec(select(func.count()).select_from(LedgerEntry)
                          .where(LedgerEntry.kind == kind)).one())


def mistype(code: str, at: int = 5) -> str:
    """``code`` with one symbol replaced (a typo the check symbol catches)."""
    raw = canonical(code)
    assert raw is not None
    wrong = ALPHABET[(ALPHABET.index(raw[at]) + 1) % len(ALPHABET)]
    return display(raw[:at] + wrong + raw[at + 1:])


def well_formed_unknown() -> str:
    return display(codes.new_code())


# ----------------------------------------------------------------- the code itself


def test_check_symbol_catches_every_substitution_and_transposition() -> None:
    """Guard: the check symbol. Without it (check_ok always True) every typo reads as a
    wrong code."""
    for _ in range(40):
        code = codes.new_code()
        assert check_ok(code) and canonical(display(code)) == code
        for i in range(len(code)):
            for ch in ALPHABET:
                if ch != code[i]:
                    assert not check_ok(code[:i] + ch + code[i + 1:]), (code, i, ch)
        for i in range(len(code)):
            for j in range(i + 1, len(code)):
                if code[i] != code[j]:
                    swapped = list(code)
                    swapped[i], swapped[j] = swapped[j], swapped[i]
                    assert not check_ok("".join(swapped)), (code, i, j)


def test_canonical_forms() -> None:
    code = codes.new_code()
    shown = display(code)
    assert len(shown) == 19 and shown.count("-") == 3
    full_width = "".join(chr(ord(c) + 0xFEE0) if c != "-" else "－" for c in shown)
    for typed in (shown, shown.lower(), code, code.lower(), shown.replace("-", " "),
                  f"  {shown.replace('-', '—')} ", full_width, shown.replace("-", "ー"),
                  shown.replace("-", "_"), "　".join(shown.split("-"))):
        assert canonical(typed) == code, typed
    for bad in ("", "ABC", code[:-1], code + "2", code.replace(code[0], "O", 1),
                code.replace(code[0], "0", 1), code.replace(code[0], "I", 1), "中文" * 8):
        assert canonical(bad) is None, bad


# ----------------------------------------------------------------- every status in chat


def test_tokens_code_credits_once(user: WeChatUser, engine: Engine, app_client) -> None:  # type: ignore[no-untyped-def]
    add_issue(engine, 3)
    user.send("hi")
    code = batch(engine)[0]
    reply = user.send(code)["content"]
    assert "兑换成功：+50 豆，余额 50 豆" in reply and "「兑换 3」" in reply, reply
    again = user.send(code)["content"]
    assert "你已经用过这个兑换码" in again, again
    other = WeChatUser(app_client, "o_reader_0002")
    other.send("hi")
    assert "已经被使用过" in other.send(code)["content"]
    assert balance(engine) == 50 and balance(engine, "o_reader_0002") == 0
    assert entries(engine) == 1 and uses_of(engine, code) == 1
    with transaction(engine) as s:
        entry = s.exec(select(LedgerEntry).where(LedgerEntry.kind == "code")).one()
        use = s.exec(select(CodeRedemption)).one()
        assert entry.code_batch_id == use.batch_id and use.ledger_entry_id == entry.id
        assert ledger.check(s) == []
    assert "兑换码 +50 豆" in user.send("余额")["content"]


@pytest.mark.parametrize("form", ["plain", "lower", "spaces", "full_width", "prefix_cn",
                                  "prefix_colon", "prefix_code", "prefix_gift", "redeem_word",
                                  "one_word", "em_dash"])
def test_every_typed_form_is_a_code(user: WeChatUser, engine: Engine, form: str) -> None:
    user.send("hi")
    code = batch(engine)[0]
    raw = canonical(code)
    assert raw is not None
    typed = {
        "plain": code, "lower": code.lower(), "spaces": code.replace("-", " "),
        "full_width": "".join(chr(ord(c) + 0xFEE0) if c != "-" else "－" for c in code),
        "prefix_cn": f"兑换码 {code}", "prefix_colon": f"兑换码：{code.lower()}",
        "prefix_code": f"CODE: {code}", "prefix_gift": f"礼品码{code}",
        "redeem_word": f"兑换 {code}", "one_word": raw.lower(),
        "em_dash": code.replace("-", "—"),
    }[form]
    assert "兑换成功：+50 豆" in user.send(typed)["content"], typed
    assert balance(engine) == 50


def test_issue_code_unlocks_without_charge(user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 3)
    user.send("hi")
    first, second = batch(engine, kind="issue", issue_number=3, count=2)
    reply = user.send(first)
    assert reply["type"] == "news" and "/read/3" in reply["url"], reply
    assert "兑换成功" in reply["description"] and "余额 0 豆" in reply["description"]
    assert "「全文 3」" in reply["description"]
    with transaction(engine) as s:
        ent = s.exec(select(Entitlement)).one()
        assert ent.issue_number == 3 and ent.ledger_entry_id is None
        assert ent.code_redemption_id == s.exec(select(CodeRedemption.id)).one()
    # The issue is owned now: a second code for it stays unused and can be passed on.
    owned = user.send(second)["content"]
    assert "你已经可以阅读第3期全文" in owned and "没有被使用" in owned, owned
    assert uses_of(engine, second) == 0 and failures(engine) == 0
    assert "未重复扣费" in user.send("兑换 3")["description"]
    assert balance(engine) == 0


def test_issue_code_for_a_draft_unlocks_it_for_later(user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 4, publish=False)
    user.send("hi")
    reply = user.send(batch(engine, kind="issue", issue_number=4)[0])["content"]
    assert "第4期已为你解锁" in reply and "发布后回复「全文 4」" in reply, reply


def test_pass_code_grants_the_pass(user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 3)
    user.send("hi")
    code = batch(engine, kind="pass", pass_id="month", pass_days=30)[0]
    before = utcnow()
    reply = user.send(code)["content"]
    with transaction(engine) as s:
        period = s.exec(select(PassPeriod)).one()
    assert period.source == "code" and period.code_redemption_id is not None
    assert timedelta(days=30) <= period.ends_at - before < timedelta(days=30, minutes=1)
    end = period.ends_at.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M")
    assert f"月卡（30 天）已开通，有效期至 {end}" in reply and "「全文 3」" in reply, reply
    # The pass covers the current issue: 兑换 charges nothing.
    assert "会员卡包含本期" in user.send("兑换 3")["description"]


def test_typo_and_unknown_and_malformed_are_told_apart(user: WeChatUser,
                                                       engine: Engine) -> None:
    user.send("hi")
    code = batch(engine)[0]
    typo = user.send(mistype(code))["content"]
    assert "输错了一位" in typo and "再错 4 次" in typo, typo
    unknown = user.send(well_formed_unknown())["content"]
    assert "没有找到这个兑换码" in unknown and "再错 3 次" in unknown, unknown
    malformed = user.send("兑换码 hello")["content"]
    assert "这不像是一个兑换码" in malformed and "再错 2 次" in malformed, malformed
    assert failures(engine) == 3 and uses_of(engine, code) == 0
    assert "兑换成功" in user.send(code)["content"]


def test_ordinary_text_is_never_an_attempt(user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 3)
    user.send("hi")
    for text in ("what is this week", "next week safe bets", "internationalisation",
                 "兑换 3", "兑换第3期", "兑换 本期", "兑换 ٣", "3", "第3期", "code", "兑换码",
                 "帮助", "余额", "你好，我想问问兑换码怎么用"):
        user.send(text)
    assert failures(engine) == 0
    assert "请把兑换码直接发给我" in user.send("兑换码")["content"]


def test_expired_and_revoked(user: WeChatUser, engine: Engine) -> None:
    user.send("hi")
    soon = utcnow() + timedelta(seconds=2)
    expiring = batch(engine, expires_at=soon)[0]
    revoked_one, kept = batch(engine, count=2)
    whole = batch(engine, count=2)
    with transaction(engine) as s:
        assert codes.revoke_code(s, secret=SECRET, code=canonical(revoked_one) or "")
        batch_id = s.exec(select(CodeBatch.id).order_by(CodeBatch.id.desc())).first()  # type: ignore[union-attr]
        assert batch_id is not None and codes.revoke_batch(s, batch_id=batch_id)
    assert "已停用" in user.send(revoked_one)["content"]
    assert "已停用" in user.send(whole[1])["content"]
    assert "兑换成功" in user.send(kept)["content"]
    with transaction(engine) as s:
        # Move the expiry into the past rather than sleeping.
        b = s.exec(select(CodeBatch).where(CodeBatch.expires_at.is_not(None))).one()  # type: ignore[union-attr]
        b.expires_at = utcnow() - timedelta(minutes=1)
        s.add(b)
    expired = user.send(expiring)["content"]
    assert "已于" in expired and "过期" in expired, expired
    assert balance(engine) == 50 and failures(engine) == 3


def test_conference_code_three_uses(app_client, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    code = batch(engine, uses=3, tokens=20)[0]
    people = [WeChatUser(app_client, f"o_conf_{i}") for i in range(4)]
    for p in people:
        p.send("hi")
    for p in people[:3]:
        assert "兑换成功：+20 豆" in p.send(code)["content"]
    assert "你已经用过这个兑换码" in people[0].send(code)["content"]
    assert "3 个名额已经用完" in people[3].send(code)["content"]
    assert [balance(engine, p.openid) for p in people] == [20, 20, 20, 0]
    assert uses_of(engine, code) == 3 and entries(engine) == 3


def test_a_wechat_retry_is_answered_alike_and_credits_once(user: WeChatUser,
                                                           engine: Engine) -> None:
    user.send("hi")
    code = batch(engine)[0]
    xml = user.text_xml(code, msg_id=424242)
    first = user.post_xml(xml).text
    assert all(user.post_xml(xml).text == first for _ in range(3))
    assert balance(engine) == 50 and entries(engine) == 1 and failures(engine) == 0


def test_codes_off(engine: Engine) -> None:
    from bot.app import create_app
    from tests.conftest import client_for

    settings = make_settings()
    settings = settings.model_copy(update={"codes": settings.codes.model_copy(
        update={"secret": ""})})
    with client_for(create_app(settings, engine)) as http:
        reader = WeChatUser(http, READER)
        reader.send("hi")
        code = display(codes.new_code())
        reply = reader.send(code)["content"]
        assert "本号暂未开通兑换码" in reply and "有兑换码" not in reply, reply
        assert "暂时不能赠送" in reader.send("赠送 3")["content"]
    assert failures(engine) == 0


# ----------------------------------------------------------------- the freeze


def test_five_failures_freeze_without_looking_at_the_code(user: WeChatUser,
                                                          engine: Engine) -> None:
    """Guard: the freeze check before the code is read. Without it the real code sent while
    frozen is used up."""
    time_machine = pytest.importorskip("time_machine")
    user.send("hi")
    code = batch(engine)[0]
    for i in range(4):
        assert f"再错 {4 - i} 次" in user.send(well_formed_unknown())["content"]
    fifth = user.send(mistype(code))["content"]
    assert "兑换已暂停到" in fifth and "不会被使用" in fifth, fifth
    refused = user.send(code)["content"]
    assert "错误次数过多" in refused and "不会被查看" in refused, refused
    assert uses_of(engine, code) == 0 and balance(engine) == 0
    assert failures(engine) == 5  # attempts while frozen are not counted
    with transaction(engine) as s:
        freeze = s.exec(select(CodeFreeze)).one()
        assert freeze.openid == READER and freeze.failures == 5
    with time_machine.travel(utcnow() + timedelta(minutes=61), tick=True):
        assert "兑换成功：+50 豆" in user.send(code)["content"]
        # The failures before the freeze are paid for: a new one starts a fresh count.
        assert "再错 4 次" in user.send(well_formed_unknown())["content"]
    assert balance(engine) == 50


def test_failures_spread_over_the_window_do_not_freeze(user: WeChatUser,
                                                       engine: Engine) -> None:
    time_machine = pytest.importorskip("time_machine")
    user.send("hi")
    code = batch(engine)[0]
    for _ in range(4):
        user.send(well_formed_unknown())
    with time_machine.travel(utcnow() + timedelta(minutes=11), tick=True):
        assert "再错 4 次" in user.send(well_formed_unknown())["content"]
        assert "兑换成功" in user.send(code)["content"]


def test_the_freeze_is_per_subscriber(app_client, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    guesser, honest = WeChatUser(app_client, "o_guess"), WeChatUser(app_client, "o_honest")
    guesser.send("hi")
    honest.send("hi")
    for _ in range(5):
        guesser.send(well_formed_unknown())
    code = batch(engine)[0]
    assert "错误次数过多" in guesser.send(code)["content"]
    assert "兑换成功" in honest.send(code)["content"]


# ----------------------------------------------------------------- what is stored


@pytest.mark.skipif(ON_POSTGRES, reason="reads the SQLite file's bytes")
def test_the_database_holds_no_plaintext_code(user: WeChatUser, engine: Engine,
                                              db_url: str) -> None:
    """Guard: only the HMAC is stored. Storing the code itself fails this test."""
    user.send("hi")
    made = batch(engine, count=20)
    user.send(made[0])
    engine.dispose()
    data = Path(db_url.removeprefix("sqlite:///")).read_bytes()
    for wal in (".db-wal", ".db-journal"):
        extra = Path(db_url.removeprefix("sqlite:///").replace(".db", wal))
        if extra.exists():
            data += extra.read_bytes()
    for code in made:
        raw = canonical(code)
        assert raw is not None
        for form in (raw, code, raw.lower()):
            assert form.encode() not in data, form
        assert codes.digest(SECRET, raw).encode() in data


def test_a_different_secret_finds_nothing(engine: Engine) -> None:
    """Guard: the HMAC key. A digest without the key (plain SHA-256) would let anyone with a
    dump test guesses offline; under another key the stored digests match nothing."""
    code = canonical(batch(engine)[0])
    assert code is not None
    with transaction(engine) as s:
        ensure_subscriber(s, openid=READER)
        out = codes.redeem_code(s, openid=READER, text=code, secret=b"another-secret-0123456",
                                key="k1")
        assert out.status == "unknown"
        assert codes.find_code(s, secret=SECRET, code=code) is not None


# ----------------------------------------------------------------- exactly once


def test_a_stale_read_cannot_overuse_a_code(engine: Engine,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: the conditional UPDATE (used < uses). Another subscriber's use committed between
    our read and our claim is simulated by a read that still says unused; without the
    condition the CHECK constraint trips instead and the answer is wrong."""
    code = canonical(batch(engine)[0])
    assert code is not None
    with transaction(engine) as s:
        for o in ("o_a", "o_b"):
            ensure_subscriber(s, openid=o)
        assert codes.redeem_code(s, openid="o_a", text=code, secret=SECRET,
                                 key="k-a").status == "granted"
    real_read = codes._read

    def stale(session, params):  # type: ignore[no-untyped-def]
        state = real_read(session, params)
        return dataclasses.replace(
            state, found=state.found and dataclasses.replace(state.found, used=0))

    monkeypatch.setattr(codes, "_read", stale)
    with transaction(engine) as s:
        out = codes.redeem_code(s, openid="o_b", text=code, secret=SECRET, key="k-b")
    assert out.status == "used_up" and out.balance == 0
    assert balance(engine, "o_b") == 0 and uses_of(engine, code) == 1
    assert failures(engine, "o_b") == 1


def test_a_stale_read_cannot_let_one_subscriber_use_a_code_twice(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: the unique (code, subscriber) key. With a read that misses the subscriber's own
    earlier use, only the key stops a second credit from a three-use code."""
    code = canonical(batch(engine, uses=3)[0])
    assert code is not None
    with transaction(engine) as s:
        ensure_subscriber(s, openid=READER)
        assert codes.redeem_code(s, openid=READER, text=code, secret=SECRET,
                                 key="k1").status == "granted"
    real_read = codes._read

    def forgetful(session, params):  # type: ignore[no-untyped-def]
        state = real_read(session, params)
        return dataclasses.replace(
            state, found=state.found and dataclasses.replace(state.found, used_by_me=False))

    monkeypatch.setattr(codes, "_read", forgetful)
    with transaction(engine) as s:
        out = codes.redeem_code(s, openid=READER, text=code, secret=SECRET, key="k2")
    assert out.status == "already_used"
    assert balance(engine) == 50 and uses_of(engine, code) == 1 and entries(engine) == 1


def test_a_failed_grant_leaves_the_code_unused(engine: Engine) -> None:
    """The claim, the use and the grant share one savepoint: a grant that is refused (here
    the key already credited another code) takes the claim back with it."""
    first, second = (canonical(c) for c in batch(engine, count=2))
    assert first and second
    with transaction(engine) as s:
        ensure_subscriber(s, openid=READER)
        assert codes.redeem_code(s, openid=READER, text=first, secret=SECRET,
                                 key="same").status == "granted"
    from storage.errors import IdempotencyConflict

    with pytest.raises(IdempotencyConflict), transaction(engine) as s:
        codes.redeem_code(s, openid=READER, text=second, secret=SECRET, key="same")
    with transaction(engine) as s:
        s.connection()
        out = codes.redeem_code(s, openid=READER, text=second, secret=SECRET, key="other")
    assert out.status == "granted" and balance(engine) == 100


def test_create_batch_refuses_bad_requests(engine: Engine) -> None:
    now = datetime.now(UTC)
    bad: list[dict[str, object]] = [
        {"kind": "tokens", "count": 0, "tokens": 5},
        {"kind": "tokens", "count": codes.MAX_COUNT + 1, "tokens": 5},
        {"kind": "tokens", "count": 1, "tokens": 0},
        {"kind": "tokens", "count": 1, "tokens": 5, "uses": 0},
        {"kind": "tokens", "count": 1},
        {"kind": "tokens", "count": 1, "tokens": 5, "issue_number": 3},
        {"kind": "issue", "count": 1, "issue_number": 99},
        {"kind": "pass", "count": 1, "pass_id": "month"},
        {"kind": "tokens", "count": 1, "tokens": 5, "expires_at": now - timedelta(seconds=1)},
    ]
    for kw in bad:
        with pytest.raises(codes.InvalidBatch), transaction(engine) as s:
            codes.create_batch(s, secret=SECRET, **kw)  # type: ignore[arg-type]
    with pytest.raises(codes.InvalidBatch), transaction(engine) as s:
        codes.create_batch(s, secret=b"", kind="tokens", count=1, tokens=5)
    with transaction(engine) as s:
        assert s.exec(select(func.count()).select_from(CodeBatch)).one() == 0
        assert s.exec(select(func.count()).select_from(RedemptionCode)).one() == 0


@pytest.mark.skipif(not ON_POSTGRES, reason="SQLite runs one writer at a time anyway")
def test_a_burst_of_guesses_is_counted_one_after_another(engine: Engine) -> None:
    """Guard: the subscriber's row lock. Twenty guesses at once from one subscriber: the
    first five are looked at and counted, the rest find the freeze. Without the lock they
    run side by side, none sees the others' failures and every guess is looked at."""
    import threading

    from storage.db import run_in_transaction

    with transaction(engine) as s:
        ensure_subscriber(s, openid=READER)
    statuses: list[str] = []
    start = threading.Barrier(20)

    def guess() -> None:
        start.wait()
        out = run_in_transaction(engine, lambda s: codes.redeem_code(
            s, openid=READER, text=well_formed_unknown(), secret=SECRET,
            key=f"g:{threading.get_ident()}"))
        statuses.append(out.status)

    threads = [threading.Thread(target=guess) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == ["frozen"] * 15 + ["unknown"] * 5
    assert failures(engine) == 5
