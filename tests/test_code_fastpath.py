"""The one-statement redemption of a tokens code on PostgreSQL (storage.codes._pg_credit): a
locking read that waited, and so predates what the transaction it waited for committed; rows
still in flight that the claim cannot see; real races. Each condition of the statement has a
test here that fails without it (see the docstrings)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session

from storage import codes, ledger
from storage.db import run_in_transaction, transaction
from storage.errors import IdempotencyConflict
from storage.models import CodeFreeze, utcnow
from storage.subscribers import ensure_subscriber
from tests.conftest import ON_POSTGRES
from tests.test_chat_replies import balance
from tests.test_codes import READER, SECRET, batch, entries, failures, uses_of

pytestmark = pytest.mark.skipif(not ON_POSTGRES,
                                reason="the one-statement path is PostgreSQL's")


def subscribers(engine: Engine, *openids: str) -> None:
    with transaction(engine) as s:
        for o in openids:
            ensure_subscriber(s, openid=o)


def redeem(engine: Engine, code: str, *, openid: str = READER,
           key: str = "k") -> codes.CodeOutcome:
    with transaction(engine) as s:
        return codes.redeem_code(s, openid=openid, text=code, secret=SECRET, key=key)


def first_read_predates(monkeypatch: pytest.MonkeyPatch,
                        change: Callable[[Any], Any]) -> None:
    """The first read of each redemption returns ``change(state)``: what a locking read that
    waited sees of a commit made meanwhile (nothing). Later reads are real."""
    real_read = codes._read
    seen: set[int] = set()

    def read(session: Session, params: dict[str, Any]) -> Any:
        state = real_read(session, params)
        if id(session) in seen:
            return state
        seen.add(id(session))
        return change(state)

    monkeypatch.setattr(codes, "_read", read)


def test_a_freeze_committed_while_we_waited_stops_the_claim(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: the claim's NOT EXISTS (freeze). The read missed a freeze; without the
    condition the real code is used up although its sender is frozen."""
    code = batch(engine)[0]
    subscribers(engine, READER)
    with transaction(engine) as s:
        s.add(CodeFreeze(openid=READER, since=utcnow(), until=utcnow() + timedelta(hours=1),
                         failures=5))
    first_read_predates(monkeypatch, lambda st: dataclasses.replace(st, frozen_until=None))
    assert redeem(engine, code).status == "frozen"
    assert uses_of(engine, code) == 0 and balance(engine) == 0 and entries(engine) == 0
    assert failures(engine) == 0


def test_an_own_use_committed_while_we_waited_stops_the_claim(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: the claim's NOT EXISTS (this subscriber's use). The read missed the
    subscriber's own use of a three-use code; without the condition the claim goes ahead and
    the statement ends half done (an error instead of the answer)."""
    code = batch(engine, uses=3)[0]
    subscribers(engine, READER)
    assert redeem(engine, code, key="k1").status == "granted"
    first_read_predates(monkeypatch, lambda st: dataclasses.replace(
        st, found=dataclasses.replace(st.found, used_by_me=False)))
    assert redeem(engine, code, key="k2").status == "already_used"
    assert uses_of(engine, code) == 1 and balance(engine) == 50 and entries(engine) == 1


def test_a_key_committed_while_we_waited_stops_the_claim(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: the claim's NOT EXISTS (the key). The read missed the key's first use; without
    the condition the claim goes ahead and the entry is not written (an error other than
    IdempotencyConflict)."""
    first, second = batch(engine, count=2)
    subscribers(engine, READER)
    assert redeem(engine, first, key="same").status == "granted"
    first_read_predates(monkeypatch, lambda st: dataclasses.replace(st, key_used=False))
    with pytest.raises(IdempotencyConflict):
        redeem(engine, second, key="same")
    assert uses_of(engine, second) == 0 and balance(engine) == 50


def _blocked_on_a_lock(engine: Engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            waiting = conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'")).scalar_one()
        if waiting:
            return
        time.sleep(0.05)
    raise AssertionError("the redemption never waited for the row in flight")


def _redeem_behind(engine: Engine, code: str, key: str,
                   in_flight: Callable[[Session], None]) -> BaseException | None:
    """Redeem ``code`` while another transaction holds ``in_flight``'s uncommitted rows, then
    commit those: what our statement's unique index waited for. Returns what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            redeem(engine, code, key=key)
        except BaseException as exc:
            raised.append(exc)

    with transaction(engine) as other:
        in_flight(other)
        other.flush()
        worker = threading.Thread(target=run)
        worker.start()
        _blocked_on_a_lock(engine)
    worker.join(timeout=30)
    return raised[0] if raised else None


def test_a_use_in_flight_is_never_credited_twice(engine: Engine) -> None:
    """Guards: the unique (code, subscriber) key and the check that the statement wrote all
    of it. A use of the same code by the same subscriber, written without the row lock and
    still in flight, is invisible to the claim; the key makes our use write nothing and the
    check rolls the claim back. Without the key the code credits twice; without the check
    half a redemption is committed."""
    code = batch(engine, uses=3)[0]
    subscribers(engine, READER)
    with transaction(engine) as s:
        found = codes.find_code(s, secret=SECRET, code=codes.canonical(code) or "")
        assert found is not None
    raised = _redeem_behind(engine, code, "k", lambda other: other.connection().execute(text(
        "INSERT INTO code_redemption (code_id, batch_id, openid, created_at)"
        " VALUES (:c, :b, :o, now())"), {"c": found.code_id, "b": found.batch.id, "o": READER}))
    assert isinstance(raised, RuntimeError), raised
    assert uses_of(engine, code) == 0 and balance(engine) == 0 and entries(engine) == 0


def test_a_key_in_flight_for_another_subscriber_writes_nothing(engine: Engine) -> None:
    """Guard: the check that the statement wrote all of it. Another subscriber's top-up
    under the same key, still in flight (our row lock does not cover it), makes the entry
    write nothing; the claim must not be committed without it."""
    code = batch(engine)[0]
    subscribers(engine, READER, "o_other")
    raised = _redeem_behind(engine, code, "shared", lambda other: ledger.credit(
        other, openid="o_other", amount=5, kind="topup", key="shared", reason="top-up"))
    assert isinstance(raised, RuntimeError), raised
    assert uses_of(engine, code) == 0 and balance(engine) == 0 and entries(engine) == 0
    assert balance(engine, "o_other") == 5


def _race(engine: Engine, attempts: list[tuple[str, str]], code: str) -> Counter[str]:
    start = threading.Barrier(len(attempts))
    out: Counter[str] = Counter()
    lock = threading.Lock()

    def attempt(openid: str, key: str) -> None:
        start.wait()
        try:
            status: str = run_in_transaction(engine, lambda s: codes.redeem_code(
                s, openid=openid, text=code, secret=SECRET, key=key)).status
        except Exception as exc:
            status = f"{type(exc).__name__}: {exc}"
        with lock:
            out[status] += 1

    threads = [threading.Thread(target=attempt, args=a) for a in attempts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_one_subscriber_sending_a_code_ten_times_at_once_is_credited_once(
        engine: Engine) -> None:
    """Real waits on the row lock: the reads behind the winner predate its commit, and the
    claim's conditions turn each into "already used" (not an error). Five of those are five
    failures: the rest find the freeze."""
    code = batch(engine, uses=3)[0]
    subscribers(engine, READER)
    out = _race(engine, [(READER, f"k{i}") for i in range(10)], code)
    assert out == Counter({"granted": 1, "already_used": 5, "frozen": 4}), out
    assert uses_of(engine, code) == 1 and balance(engine) == 50 and entries(engine) == 1
    with transaction(engine) as s:
        assert ledger.check(s) == []


def test_fifty_redemptions_of_one_code_by_ten_subscribers_credit_once(engine: Engine) -> None:
    code = batch(engine)[0]
    people = [f"o_race_{i}" for i in range(10)]
    subscribers(engine, *people)
    out = _race(engine, [(people[i % 10], f"k{i}") for i in range(50)], code)
    assert out["granted"] == 1 and out["granted"] + out["used_up"] + out["already_used"] == 50
    assert uses_of(engine, code) == 1 and entries(engine) == 1
    assert sum(balance(engine, p) for p in people) == 50
    with transaction(engine) as s:
        assert ledger.check(s) == []
