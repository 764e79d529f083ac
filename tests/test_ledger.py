"""The ledger: idempotency keys, the never-negative balance, redemption atomicity, the check."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session

from storage import ledger, subscribers
from storage.db import transaction
from storage.errors import (
    IdempotencyConflict,
    InsufficientBalance,
    InvalidAmount,
    UnknownSubscriber,
)
from storage.models import LedgerEntry, Subscriber

ALICE = "o_alice"
BOB = "o_bob"


@pytest.fixture
def alice(engine: Engine) -> str:
    with transaction(engine) as s:
        subscribers.ensure_subscriber(s, openid=ALICE)
    return ALICE


def credit(engine: Engine, amount: int, key: str, *, kind: str = "topup",
           reason: str = "r") -> ledger.LedgerResult:
    with transaction(engine) as s:
        return ledger.credit(s, openid=ALICE, amount=amount, kind=kind,  # type: ignore[arg-type]
                             key=key, reason=reason, max_topup=1000)


def entries(engine: Engine) -> int:
    with transaction(engine) as s:
        return int(s.execute(text("SELECT COUNT(*) FROM ledger_entry")).scalar_one())


def fund(engine: Engine, openid: str, amount: int) -> None:
    with transaction(engine) as s:
        subscribers.ensure_subscriber(s, openid=openid)
        ledger.credit(s, openid=openid, amount=amount, kind="topup", key=f"fund:{openid}",
                      reason="r")


def race(n: int, attempt: Callable[[int], object]) -> list[object]:
    """Run ``attempt(i)`` for i < n in n threads released together; each result or exception."""
    barrier = threading.Barrier(n)
    outcomes: list[object] = [None] * n

    def go(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = attempt(i)
        except Exception as exc:  # the callers assert on exactly which ones
            outcomes[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def redeem_alone(engine: Engine, openid: str, issue: int, key: str,
                 price: int = 10) -> ledger.RedeemResult:
    with transaction(engine) as s:
        return ledger.redeem(s, openid=openid, issue_number=issue, price=price, key=key)


def run_while_held(engine: Engine, first: Callable[[Session], object],
                   second: Callable[[], object]) -> object:
    """``first(session)`` in a transaction kept open until ``second()``, started in another
    thread, is blocked behind it (on PostgreSQL, seen waiting for a lock; on SQLite the second
    simply queues for the write lock); then commit and return what ``second()`` gave."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(second())
        except Exception as exc:
            out.append(exc)

    with transaction(engine) as s:
        first(s)
        thread = threading.Thread(target=run)
        thread.start()
        if engine.dialect.name == "postgresql":
            _wait_for_lock_wait(engine, thread)
    thread.join()
    return out[0]


def _wait_for_lock_wait(engine: Engine, thread: threading.Thread) -> None:
    # Each test has its own application_name (tests/conftest.py), so other tests on the same
    # server do not count. A synchronisation timeout, not an assertion about speed.
    deadline = time.monotonic() + 30
    while thread.is_alive() and time.monotonic() < deadline:
        with engine.connect() as c:
            if c.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND application_name = current_setting('application_name')")).scalar_one():
                return
        time.sleep(0.01)
    # The second finished (or never blocked): the assertions on its result decide.


@pytest.mark.usefixtures("alice")
class TestIdempotency:
    def test_same_key_returns_the_original_result(self, engine: Engine) -> None:
        first = credit(engine, 100, "k1")
        again = credit(engine, 100, "k1")
        assert not first.replayed and again.replayed
        assert again.entry.id == first.entry.id and again.balance == 100
        assert entries(engine) == 1

    @pytest.mark.parametrize("change", [{"amount": 101}, {"reason": "other"},
                                        {"kind": "adjust"}])
    def test_same_key_different_parameters_is_refused(
            self, engine: Engine, change: dict[str, object]) -> None:
        credit(engine, 100, "k1")
        args: dict[str, object] = {"amount": 100, "reason": "r"} | change
        with pytest.raises(IdempotencyConflict, match="k1"):
            credit(engine, key="k1", **args)  # type: ignore[arg-type]
        assert entries(engine) == 1

    def test_redeem_key_reused_for_another_issue_is_refused(self, engine: Engine) -> None:
        credit(engine, 100, "k1")
        with transaction(engine) as s:
            ledger.redeem(s, openid=ALICE, issue_number=1, price=10, key="m1")
        with transaction(engine) as s, pytest.raises(IdempotencyConflict):
            ledger.redeem(s, openid=ALICE, issue_number=2, price=10, key="m1")
        with transaction(engine) as s:
            replay = ledger.redeem(s, openid=ALICE, issue_number=1, price=10, key="m1")
            assert replay.replayed and replay.balance == 90

    def test_concurrent_same_key_applies_once(self, engine: Engine) -> None:
        results: list[ledger.LedgerResult] = []

        def go() -> None:
            results.append(credit(engine, 50, "shared"))

        threads = [threading.Thread(target=go) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 10
        assert sum(not r.replayed for r in results) == 1
        with transaction(engine) as s:
            assert ledger.get_balance(s, openid=ALICE) == 50


@pytest.mark.usefixtures("alice")
class TestAmounts:
    @pytest.mark.parametrize("amount,kind", [(0, "topup"), (-5, "topup"), (0, "adjust"),
                                             (1001, "topup")])
    def test_bad_amounts_write_nothing(self, engine: Engine, amount: int, kind: str) -> None:
        with pytest.raises(InvalidAmount):
            credit(engine, amount, "k", kind=kind)
        assert entries(engine) == 0

    def test_blank_reason_is_refused(self, engine: Engine) -> None:
        with pytest.raises(InvalidAmount, match="reason"):
            credit(engine, 5, "k", reason="  ")

    def test_debit_past_zero_is_refused(self, engine: Engine) -> None:
        credit(engine, 10, "k1")
        with pytest.raises(InsufficientBalance) as err:
            credit(engine, -11, "k2", kind="adjust")
        assert err.value.shortfall == 1
        assert credit(engine, -10, "k3", kind="adjust").balance == 0
        assert entries(engine) == 2

    def test_unknown_subscriber(self, engine: Engine) -> None:
        with transaction(engine) as s, pytest.raises(UnknownSubscriber):
            ledger.credit(s, openid="o_ghost", amount=1, kind="topup", key="k", reason="r")

    def test_database_refuses_a_negative_balance_even_past_the_code(
            self, engine: Engine) -> None:
        with pytest.raises(Exception, match=r"(?i)constraint|check"), transaction(engine) as s:
            s.execute(text("UPDATE subscriber SET balance = -1"))


@pytest.mark.usefixtures("alice")
class TestRedeem:
    def test_redeem_debits_and_grants_together(self, engine: Engine) -> None:
        credit(engine, 100, "k")
        with transaction(engine) as s:
            result = ledger.redeem(s, openid=ALICE, issue_number=3, price=99, key="m")
        assert result.status == "unlocked" and result.balance == 1
        with transaction(engine) as s:
            assert ledger.unlocked_issues(s, openid=ALICE) == {3}
            again = ledger.redeem(s, openid=ALICE, issue_number=3, price=99, key="m2")
            assert again.status == "already" and again.balance == 1

    def test_failed_redeem_leaves_no_trace(self, engine: Engine) -> None:
        credit(engine, 98, "k")
        with transaction(engine) as s, pytest.raises(InsufficientBalance):
            ledger.redeem(s, openid=ALICE, issue_number=3, price=99, key="m")
        with transaction(engine) as s:
            assert ledger.unlocked_issues(s, openid=ALICE) == set()
            assert ledger.get_balance(s, openid=ALICE) == 98
        assert entries(engine) == 1

    def test_rollback_of_the_outer_transaction_undoes_both(self, engine: Engine) -> None:
        credit(engine, 100, "k")
        with pytest.raises(RuntimeError), transaction(engine) as s:
            ledger.redeem(s, openid=ALICE, issue_number=3, price=99, key="m")
            raise RuntimeError("crash after the debit")
        with transaction(engine) as s:
            assert ledger.get_balance(s, openid=ALICE) == 100
            assert ledger.unlocked_issues(s, openid=ALICE) == set()

    def test_concurrent_unlocks_of_one_issue_charge_once(self, engine: Engine) -> None:
        credit(engine, 500, "k")
        statuses: list[str] = []

        def go(i: int) -> None:
            with transaction(engine) as s:
                statuses.append(ledger.redeem(s, openid=ALICE, issue_number=7, price=99,
                                              key=f"m{i}").status)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses.count("unlocked") == 1 and statuses.count("already") == 11
        with transaction(engine) as s:
            assert ledger.get_balance(s, openid=ALICE) == 401
            assert ledger.check(s) == []


@pytest.mark.usefixtures("alice")
class TestRedeemRaces:
    """The races redeem must survive, including those settled inside its single PostgreSQL
    write statement (ON CONFLICT on the key; the row lock for the balance and the unlock)."""

    def test_many_issues_on_one_balance_succeed_exactly_floor_times(
            self, engine: Engine) -> None:
        fund(engine, ALICE, 100)
        outcomes = race(30, lambda i: redeem_alone(engine, ALICE, 100 + i, f"m{i}", price=7))
        unlocked = [o for o in outcomes if isinstance(o, ledger.RedeemResult)]
        refused = [o for o in outcomes if isinstance(o, InsufficientBalance)]
        assert len(unlocked) == 100 // 7 and len(refused) == 30 - 100 // 7, outcomes
        assert all(r.status == "unlocked" and not r.replayed for r in unlocked)
        # Each success saw its own balance: 100 - 7k for k = 1 … 14, each once.
        assert sorted(r.balance for r in unlocked) == [100 - 7 * k for k in range(14, 0, -1)]
        with transaction(engine) as s:
            assert ledger.get_balance(s, openid=ALICE) == 100 % 7
            assert len(ledger.unlocked_issues(s, openid=ALICE)) == 14
            assert ledger.check(s) == []

    def test_same_key_raced_charges_once(self, engine: Engine) -> None:
        fund(engine, ALICE, 100)
        outcomes = race(10, lambda i: redeem_alone(engine, ALICE, 5, "tap"))
        assert all(isinstance(o, ledger.RedeemResult) for o in outcomes), outcomes
        results = [o for o in outcomes if isinstance(o, ledger.RedeemResult)]
        assert sum(not r.replayed for r in results) == 1
        assert {r.status for r in results} == {"unlocked"}
        assert all(r.balance == 90 for r in results)
        assert len({r.entry.id for r in results if r.entry}) == 1
        with transaction(engine) as s:
            assert ledger.get_balance(s, openid=ALICE) == 90
            assert ledger.check(s) == []
        assert entries(engine) == 2

    def test_same_key_raced_for_different_issues_charges_once(self, engine: Engine) -> None:
        fund(engine, ALICE, 100)
        outcomes = race(10, lambda i: redeem_alone(engine, ALICE, i, "tap"))
        won = [o for o in outcomes if isinstance(o, ledger.RedeemResult)]
        assert len(won) == 1 and not won[0].replayed, outcomes
        assert all(isinstance(o, IdempotencyConflict) for o in outcomes if o is not won[0])
        with transaction(engine) as s:
            assert ledger.get_balance(s, openid=ALICE) == 90
            assert len(ledger.unlocked_issues(s, openid=ALICE)) == 1
            assert ledger.check(s) == []

    def test_key_taken_by_another_user_in_flight_charges_neither_twice(
            self, engine: Engine) -> None:
        # Bob's redemption holds no lock Alice's needs except the key's: it must wait for the
        # key, find it taken, and write nothing (no debit without an entry).
        fund(engine, ALICE, 100)
        fund(engine, BOB, 100)
        outcome = run_while_held(
            engine,
            lambda s: ledger.redeem(s, openid=BOB, issue_number=1, price=10,
                                    key="shared"),
            lambda: redeem_alone(engine, ALICE, 1, "shared"))
        assert isinstance(outcome, IdempotencyConflict), outcome
        with transaction(engine) as s:
            assert ledger.get_balance(s, openid=ALICE) == 100
            assert ledger.get_balance(s, openid=BOB) == 90
            assert ledger.unlocked_issues(s, openid=ALICE) == set()
            assert ledger.check(s) == []

    def test_unlock_committed_while_waiting_is_seen(self, engine: Engine) -> None:
        # The second redemption read the subscriber while the first still held it; it must
        # answer "already" from what the first committed, charge nothing, and leave its own
        # transaction usable (no aborted statement, no savepoint left behind).
        fund(engine, ALICE, 100)
        out: list[str] = []

        def second() -> ledger.RedeemResult:
            with transaction(engine) as s:
                result = ledger.redeem(s, openid=ALICE, issue_number=4, price=10, key="m2")
                ledger.credit(s, openid=ALICE, amount=1, kind="topup", key="after",
                              reason="same transaction")
                out.append("committed")
                return result

        outcome = run_while_held(
            engine,
            lambda s: ledger.redeem(s, openid=ALICE, issue_number=4, price=10,
                                    key="m1"),
            second)
        assert isinstance(outcome, ledger.RedeemResult), outcome
        assert outcome.status == "already" and outcome.balance == 90 and out == ["committed"]
        with transaction(engine) as s:
            assert ledger.get_balance(s, openid=ALICE) == 91
            assert ledger.check(s) == []
        assert entries(engine) == 3

    def test_debit_committed_while_waiting_sets_balance_after(self, engine: Engine) -> None:
        fund(engine, ALICE, 25)
        outcome = run_while_held(
            engine,
            lambda s: ledger.redeem(s, openid=ALICE, issue_number=1, price=10,
                                    key="m1"),
            lambda: redeem_alone(engine, ALICE, 2, "m2"))
        assert isinstance(outcome, ledger.RedeemResult) and outcome.entry is not None, outcome
        assert outcome.balance == 5 and outcome.entry.balance_after == 5
        outcome = run_while_held(
            engine,
            lambda s: ledger.redeem(s, openid=ALICE, issue_number=3, price=5,
                                    key="m3"),
            lambda: redeem_alone(engine, ALICE, 4, "m4", price=5))
        assert isinstance(outcome, InsufficientBalance) and outcome.balance == 0, outcome
        with transaction(engine) as s:
            assert ledger.get_balance(s, openid=ALICE) == 0
            assert ledger.check(s) == []


@pytest.mark.usefixtures("alice")
class TestRedeemInTheCallersSession:
    def test_sees_pending_objects_and_updates_loaded_ones(self, engine: Engine) -> None:
        credit(engine, 100, "k")
        with transaction(engine) as s:
            loaded = subscribers.require_subscriber(s, openid=ALICE)
            s.add(Subscriber(openid=BOB))  # pending: redeem must flush it, not miss it
            with pytest.raises(InsufficientBalance):
                ledger.redeem(s, openid=BOB, issue_number=1, price=10, key="b")
            result = ledger.redeem(s, openid=ALICE, issue_number=1, price=10, key="a")
            assert loaded.balance == 90
            assert result.entry is not None and s.get(LedgerEntry, result.entry.id) is result.entry
        with transaction(engine) as s:
            stored = s.get(LedgerEntry, result.entry.id)
            assert stored is not None and stored.model_dump() == result.entry.model_dump()

    def test_free_issue(self, engine: Engine) -> None:
        credit(engine, 30, "k")
        with transaction(engine) as s:
            assert ledger.redeem(s, openid=ALICE, issue_number=1, price=0, key="f") == \
                ledger.RedeemResult("free", balance=30)
            with pytest.raises(UnknownSubscriber):
                ledger.redeem(s, openid="o_ghost", issue_number=1, price=0, key="g")
            with pytest.raises(UnknownSubscriber):
                ledger.redeem(s, openid="o_ghost", issue_number=1, price=10, key="g")
        assert entries(engine) == 1


@pytest.mark.usefixtures("alice")
def test_check_finds_a_tampered_balance(engine: Engine) -> None:
    credit(engine, 100, "k")
    with transaction(engine) as s:
        assert ledger.check(s) == []
        s.execute(text("UPDATE subscriber SET balance = balance + 5"))
    with transaction(engine) as s:
        problems = ledger.check(s)
    assert len(problems) == 1 and problems[0].cached == 105 and problems[0].ledger == 100
