"""The ledger: idempotency keys, the never-negative balance, redemption atomicity, the check."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Engine, text

from storage import ledger, subscribers
from storage.db import transaction
from storage.errors import (
    IdempotencyConflict,
    InsufficientBalance,
    InvalidAmount,
    UnknownSubscriber,
)

ALICE = "o_alice"


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
def test_check_finds_a_tampered_balance(engine: Engine) -> None:
    credit(engine, 100, "k")
    with transaction(engine) as s:
        assert ledger.check(s) == []
        s.execute(text("UPDATE subscriber SET balance = balance + 5"))
    with transaction(engine) as s:
        problems = ledger.check(s)
    assert len(problems) == 1 and problems[0].cached == 105 and problems[0].ledger == 100
