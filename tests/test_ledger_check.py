"""`newsbot ledger check` beyond the balances: books holding every kind of entry (top-ups, an
adjustment, redemptions, code credits, issue and pass codes, pass purchases, an operator grant,
gifts, refunds of an issue and of a pass) are clean; then each corruption, made with raw SQL
(or an entry posted outside the rules), makes the real CLI exit 1 and name the problem.

The books are written row by row as storage.codes, gifts, passes and refunds write them (the
same rows, in one transaction each), so these tests pin the check to the schema's contract."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session

from storage import ledger, passes, subscribers
from storage.db import transaction
from storage.models import (
    CodeBatch,
    CodeRedemption,
    Entitlement,
    PassPeriod,
    RedemptionCode,
    utcnow,
)
from tests.test_money_cli import cli, write_config
from tests.test_webhook import add_issue

ALICE, BOB, CAROL, DAVE = "o_alice_00001", "o_bob_0000001", "o_carol_00001", "o_dave_000001"
_digests = itertools.count(1)


@dataclass
class Books:
    """The ids of the rows the corruptions below aim at."""

    topup: int = 0  # ALICE's
    adjust: int = 0  # BOB's −5
    redeem: int = 0  # ALICE's unlock of issue 1
    refunded_redeem: int = 0  # BOB's unlock of issue 1, refunded
    redeem_refund: int = 0
    tokens_batch: int = 0  # 2 codes × 1 use × 40 tokens
    tokens_code: int = 0
    code_credit: int = 0  # BOB's +40
    code_use: int = 0  # BOB's redemption of tokens_code
    issue_batch: int = 0  # issue 2, 1 code × 3 uses
    issue_code: int = 0
    issue_use: int = 0  # CAROL's
    pass_batch: int = 0  # pass month, 30 days
    pass_use: int = 0  # CAROL's
    code_period: int = 0  # CAROL's, from pass_use
    purchase: int = 0  # ALICE's pass entry, −60
    bought_period: int = 0
    pass_refund: int = 0  # +30 of purchase
    grant_period: int = 0  # DAVE's
    issue_gift: int = 0  # ALICE's gift entry, issue 2, −20
    issue_gift_batch: int = 0
    gift_use: int = 0  # BOB's redemption of the issue gift
    pass_gift: int = 0  # ALICE's gift entry, pass month, −60 (not redeemed)
    pass_gift_batch: int = 0


def _post(s: Session, openid: str, amount: int, kind: ledger.EntryKind, **kw: object) -> int:
    done = ledger.post(s, openid=openid, amount=amount, kind=kind,
                       key=f"test:{kind}:{next(_digests)}", reason=f"test {kind}",
                       **kw)  # type: ignore[arg-type]
    assert done.entry.id is not None
    return done.entry.id


def _batch(s: Session, **kw: object) -> tuple[int, int]:
    """A batch and its first code (the others are never used here)."""
    batch = CodeBatch(**kw)  # type: ignore[arg-type]
    s.add(batch)
    s.flush()
    assert batch.id is not None
    first = 0
    for _ in range(batch.count):
        code = RedemptionCode(batch_id=batch.id, uses=batch.uses,
                              digest=hashlib.sha256(str(next(_digests)).encode()).hexdigest())
        s.add(code)
        s.flush()
        assert code.id is not None
        first = first or code.id
    return batch.id, first


def _use(s: Session, code_id: int, batch_id: int, openid: str,
         entry: int | None = None) -> int:
    s.execute(text("UPDATE redemption_code SET used = used + 1 WHERE id = :id"), {"id": code_id})
    use = CodeRedemption(code_id=code_id, batch_id=batch_id, openid=openid, ledger_entry_id=entry)
    s.add(use)
    s.flush()
    assert use.id is not None
    return use.id


def _period(s: Session, openid: str, source: passes.PassSource, **kw: object) -> int:
    done = passes.grant(s, openid=openid, pass_id="month", days=30, source=source,
                        key=f"test:period:{next(_digests)}", **kw)  # type: ignore[arg-type]
    assert done.period.id is not None
    return done.period.id


def write_books(engine: Engine) -> Books:
    add_issue(engine, 1, price=30)
    add_issue(engine, 2, price=20)
    b = Books()
    with transaction(engine) as s:
        for who in (ALICE, BOB, CAROL, DAVE):
            subscribers.ensure_subscriber(s, openid=who)
        b.topup = _post(s, ALICE, 300, "topup", operator="cli:test")
        _post(s, BOB, 60, "topup", operator="cli:test")
        b.adjust = _post(s, BOB, -5, "adjust", operator="cli:test")
        b.redeem = _redeem(s, ALICE, 1)
        b.refunded_redeem = _redeem(s, BOB, 1)
        b.redeem_refund = _post(s, BOB, 30, "refund", issue_number=1,
                                refers_to=b.refunded_redeem)
        s.execute(text("DELETE FROM entitlement WHERE ledger_entry_id = :id"),
                  {"id": b.refunded_redeem})

        b.tokens_batch, b.tokens_code = _batch(s, kind="tokens", tokens=40, count=2,
                                               label="小鹅通 12月")
        b.code_credit = _post(s, BOB, 40, "code", code_batch_id=b.tokens_batch)
        b.code_use = _use(s, b.tokens_code, b.tokens_batch, BOB, b.code_credit)

        b.issue_batch, b.issue_code = _batch(s, kind="issue", issue_number=2, count=1, uses=3)
        b.issue_use = _use(s, b.issue_code, b.issue_batch, CAROL)
        s.add(Entitlement(openid=CAROL, issue_number=2, code_redemption_id=b.issue_use))

        b.pass_batch, pass_code = _batch(s, kind="pass", pass_id="month", pass_days=30,
                                         count=1)
        b.pass_use = _use(s, pass_code, b.pass_batch, CAROL)
        b.code_period = _period(s, CAROL, "code", code_redemption_id=b.pass_use)

        b.purchase = _post(s, ALICE, -60, "pass", pass_id="month")
        b.bought_period = _period(s, ALICE, "purchase", ledger_entry_id=b.purchase)
        b.pass_refund = _post(s, ALICE, 30, "refund", pass_id="month", refers_to=b.purchase)
        bought = s.get(PassPeriod, b.bought_period)
        assert bought is not None
        bought.cut_at, bought.refund_entry_id = bought.ends_at - timedelta(days=15), b.pass_refund
        s.add(bought)
        b.grant_period = _period(s, DAVE, "grant", operator="cli:test", reason="press")

        b.issue_gift = _post(s, ALICE, -20, "gift", issue_number=2)
        b.issue_gift_batch, gift_code = _batch(s, kind="issue", issue_number=2, count=1,
                                               giver=ALICE, gift_entry_id=b.issue_gift)
        b.gift_use = _use(s, gift_code, b.issue_gift_batch, BOB)
        s.add(Entitlement(openid=BOB, issue_number=2, code_redemption_id=b.gift_use))
        b.pass_gift = _post(s, ALICE, -60, "gift", pass_id="month")
        b.pass_gift_batch, _ = _batch(s, kind="pass", pass_id="month", pass_days=30, count=1,
                                      giver=ALICE, gift_entry_id=b.pass_gift)
    return b


def _redeem(s: Session, openid: str, issue: int) -> int:
    done = ledger.redeem(s, openid=openid, issue_number=issue, price=30,
                         key=f"test:redeem:{next(_digests)}")
    assert done.entry is not None and done.entry.id is not None
    return done.entry.id


@pytest.fixture
def books(engine: Engine) -> Books:
    return write_books(engine)


@pytest.fixture
def config(tmp_path: Path, engine: Engine) -> Path:
    return write_config(tmp_path, engine)


def problems(config: Path) -> list[str]:
    """The problem lines of a failing `ledger check` (exit 1), without the summary."""
    done = cli(config, "ledger", "check")
    assert done.exit_code == 1, done.output
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("ledger MISMATCH"), lines
    return lines[:-1]


def sql(engine: Engine, statement: str, **params: object) -> None:
    with engine.begin() as conn:
        conn.execute(text(statement), params)


# --- clean books -------------------------------------------------------------------------------


def test_books_with_every_kind_of_entry_are_clean(books: Books, config: Path,
                                                  engine: Engine) -> None:
    done = cli(config, "ledger", "check")
    assert done.exit_code == 0, done.output
    # In: 300 + 60 − 5 (operator) + 40 (code) + 30 + 30 (refunds) = 455.
    # Spent: 30 + 30 (issue 1) + 60 (pass) + 20 + 60 (gifts) = 200. Outstanding: 255.
    assert ("ledger OK: 4 users, 11 entries; in 455 − spent 200 = 255 豆 = the sum of all "
            "entries = the sum of all balances") in done.stdout
    with transaction(engine) as s:
        assert ledger.check(s) == []


# --- corruptions, one per check ------------------------------------------------------------------

Corrupt = Callable[[Engine, Books], None]


def _set(table: str, assignment: str, row: str, x: str | None = None) -> Corrupt:
    """UPDATE the row of id ``row`` (a field of Books); ``:x`` in the assignment is the id
    ``x`` names."""
    def corrupt(engine: Engine, b: Books) -> None:
        sql(engine, f"UPDATE {table} SET {assignment} WHERE id = :id", id=getattr(b, row),
            **({"x": getattr(b, x)} if x is not None else {}))
    return corrupt


def _entry(openid: str, amount: int, kind: ledger.EntryKind,
           **kw: Callable[[Books], object]) -> Corrupt:
    """An entry posted outside the rules (its balance moved with it, so only the rule
    breaks)."""
    def corrupt(engine: Engine, b: Books) -> None:
        with transaction(engine) as s:
            _post(s, openid, amount, kind, **{k: f(b) for k, f in kw.items()})
    return corrupt


def _add_use(code: Callable[[Books], int], batch: Callable[[Books], int], openid: str,
             entry: Callable[[Books], int | None] = lambda b: None) -> Corrupt:
    def corrupt(engine: Engine, b: Books) -> None:
        with transaction(engine) as s:
            s.add(CodeRedemption(code_id=code(b), batch_id=batch(b), openid=openid,
                                 ledger_entry_id=entry(b)))
    return corrupt


def _add_unlock(openid: str, issue: int, entry: str) -> Corrupt:
    """An unlock pointing at the entry ``entry`` names."""
    def corrupt(engine: Engine, b: Books) -> None:
        with transaction(engine) as s:
            s.add(Entitlement(openid=openid, issue_number=issue,
                              ledger_entry_id=getattr(b, entry)))
    return corrupt


def _add_purchased_period(openid: str, entry: str) -> Corrupt:
    def corrupt(engine: Engine, b: Books) -> None:
        now = utcnow()
        with transaction(engine) as s:
            s.add(PassPeriod(openid=openid, pass_id="month", days=30, starts_at=now,
                             ends_at=now + timedelta(days=30), source="purchase",
                             idempotency_key=f"test:extra:{next(_digests)}",
                             ledger_entry_id=getattr(b, entry)))
    return corrupt


def _amount_up(row: Callable[[Books], int], openid: str, by: int) -> Corrupt:
    """An entry's amount changed and the balances made to agree: only the rule it breaks
    shows."""
    def corrupt(engine: Engine, b: Books) -> None:
        sql(engine, "UPDATE ledger_entry SET amount = amount + :by, balance_after = "
                    "balance_after + :by WHERE id = :id", by=by, id=row(b))
        sql(engine, "UPDATE subscriber SET balance = balance + :by WHERE openid = :o",
            by=by, o=openid)
    return corrupt


# Each case: the corruption and a line `ledger check` must print, with {field} of Books.
CASES: dict[str, tuple[Corrupt, str]] = {
    # entries
    "unknown kind": (_set("ledger_entry", "kind = 'bonus'", "topup"),
                     f"{ALICE}: ledger entry #{{topup}} has the unknown kind 'bonus'"),
    "revenue categories": (_set("ledger_entry", "kind = 'bonus'", "topup"),
                           "the revenue categories add up to -45 (in 155 − spent 200) but "
                           "the ledger entries to 255"),
    "credit kind that takes away": (
        _set("ledger_entry", "kind = 'topup'", "adjust"),
        f"{BOB}: ledger entry #{{adjust}} (topup) takes tokens away (-5); it can only add"),
    "spend kind that adds": (
        _set("ledger_entry", "kind = 'gift', issue_number = 1", "topup"),
        f"{ALICE}: ledger entry #{{topup}} (gift) adds tokens (+300); it can only spend"),
    "redeem without issue": (
        _set("ledger_entry", "issue_number = NULL", "redeem"),
        f"{ALICE}: ledger entry #{{redeem}} (redeem) names no issue"),
    "pass entry without pass": (
        _set("ledger_entry", "pass_id = NULL", "purchase"),
        f"{ALICE}: ledger entry #{{purchase}} (pass) names no pass"),
    "code entry without batch": (
        _set("ledger_entry", "code_batch_id = NULL", "code_credit"),
        f"{BOB}: ledger entry #{{code_credit}} (code) names no code batch"),
    "gift of an issue and a pass": (
        _set("ledger_entry", "pass_id = 'month'", "issue_gift"),
        f"{ALICE}: ledger entry #{{issue_gift}} (gift) must name one issue or one pass"),
    "refund of nothing": (
        _set("ledger_entry", "refers_to = NULL", "redeem_refund"),
        f"{BOB}: ledger entry #{{redeem_refund}} (refund) refers to no entry"),
    # code credits
    "credit without redemption": (
        lambda e, b: sql(e, "UPDATE code_redemption SET ledger_entry_id = NULL, batch_id = :o "
                            "WHERE id = :id", id=b.code_use, o=b.issue_batch),
        f"{BOB}: code credit #{{code_credit}} (+40) has no code redemption"),
    "credit claimed twice": (
        _add_use(lambda b: b.tokens_code + 1, lambda b: b.tokens_batch, BOB,
                 lambda b: b.code_credit),
        f"{BOB}: code credit #{{code_credit}} (+40) is claimed by 2 code redemptions "
        "(#{code_use}, #{extra_use})"),
    "credit redeemed by someone else": (
        _set("code_redemption", f"openid = '{CAROL}'", "code_use"),
        f"{BOB}: code credit #{{code_credit}} (+40) is for {BOB} but its code redemption "
        f"#{{code_use}} is by {CAROL}"),
    "credit of another batch than its redemption": (
        _set("ledger_entry", "code_batch_id = :x", "code_credit", "issue_batch"),
        f"{BOB}: code credit #{{code_credit}} (+40) names batch #{{issue_batch}} but its code "
        "redemption #{code_use} is of batch #{tokens_batch}"),
    "credit from a missing batch": (
        _set("ledger_entry", "code_batch_id = 9999", "code_credit"),
        f"{BOB}: code credit #{{code_credit}} (+40) names code batch #9999, which does not "
        "exist"),
    "credit from an issue batch": (
        _set("code_batch", "kind = 'issue', tokens = NULL, issue_number = 1",
             "tokens_batch"),
        f"{BOB}: code credit #{{code_credit}} (+40) is from batch #{{tokens_batch}}, which "
        "grants issue 1, not tokens"),
    "credit of another amount": (
        _set("code_batch", "tokens = 30", "tokens_batch"),
        f"{BOB}: code credit #{{code_credit}} (+40) is from batch #{{tokens_batch}}, whose "
        "codes grant 30"),
    "tokens redemption without credit": (
        _add_use(lambda b: b.tokens_code + 1, lambda b: b.tokens_batch, CAROL),
        f"{CAROL}: code redemption #{{extra_use}} of batch #{{tokens_batch}} (tokens) without "
        "its credit"),
    "redemption on a missing entry": (
        _set("code_redemption", "ledger_entry_id = 9999", "issue_use"),
        f"{CAROL}: code redemption #{{issue_use}} of batch #{{issue_batch}} points at ledger "
        "entry #9999, which does not exist"),
    "redemption on a top-up": (
        _set("code_redemption", "ledger_entry_id = :x", "issue_use", "topup"),
        f"{CAROL}: code redemption #{{issue_use}} of batch #{{issue_batch}} points at ledger "
        "entry #{topup}, which is a topup"),
    # codes
    "redemption of a missing code": (
        _set("code_redemption", "code_id = 9999", "issue_use"),
        f"{CAROL}: code redemption #{{issue_use}} names code #9999, which does not exist"),
    "redemption of another batch's code": (
        _set("code_redemption", "code_id = :x", "issue_use", "tokens_code"),
        f"{CAROL}: code redemption #{{issue_use}} says batch #{{issue_batch}} but its code "
        "#{tokens_code} is of batch #{tokens_batch}"),
    "used count off": (
        _set("redemption_code", "used = 0", "tokens_code"),
        "code #{tokens_code} of batch #{tokens_batch} counts 0 uses but has 1 code "
        "redemption"),
    "more redemptions than uses": (
        _add_use(lambda b: b.tokens_code, lambda b: b.tokens_batch, CAROL,
                 lambda b: b.code_credit),
        "code #{tokens_code} of batch #{tokens_batch} has 2 code redemptions, more than its "
        "1 use"),
    "batch credits more than it holds": (
        _set("code_batch", "count = 0", "tokens_batch"),
        "code batch #{tokens_batch} credited 40 tokens, more than its 0 codes × 1 use × 40 "
        "tokens = 0"),
    # unlocks
    "unlock on a missing charge": (
        lambda e, b: sql(e, "UPDATE entitlement SET ledger_entry_id = 9999 WHERE "
                            "ledger_entry_id = :id", id=b.redeem),
        f"{ALICE}: unlock of issue 1 points at ledger entry #9999, which does not exist"),
    "unlock on a top-up": (
        lambda e, b: sql(e, "UPDATE entitlement SET ledger_entry_id = :x WHERE "
                            "ledger_entry_id = :id", id=b.redeem, x=b.topup),
        f"{ALICE}: unlock of issue 1 points at ledger entry #{{topup}}, which is a topup by "
        f"{ALICE}"),
    "unlock without a source": (
        lambda e, b: sql(e, "UPDATE entitlement SET ledger_entry_id = NULL WHERE "
                            "ledger_entry_id = :id", id=b.redeem),
        f"{ALICE}: unlock of issue 1 without its charge"),
    "redemption without its unlock": (
        lambda e, b: sql(e, "DELETE FROM entitlement WHERE ledger_entry_id = :id", id=b.redeem),
        f"{ALICE}: redemption of issue 1 (ledger entry #{{redeem}}) without its unlock"),
    "unlock from a missing redemption": (
        lambda e, b: sql(e, "UPDATE entitlement SET code_redemption_id = 9999 WHERE "
                            "code_redemption_id = :id", id=b.issue_use),
        f"{CAROL}: unlock of issue 2 points at code redemption #9999, which does not exist"),
    "unlock from someone else's redemption": (
        lambda e, b: sql(e, "UPDATE entitlement SET code_redemption_id = :g WHERE "
                            "code_redemption_id = :id", id=b.issue_use, g=b.gift_use),
        f"{CAROL}: unlock of issue 2 points at code redemption #{{gift_use}}, which is by "
        f"{BOB}"),
    "unlock from a batch of another issue": (
        lambda e, b: sql(e, "UPDATE code_batch SET issue_number = 1 WHERE id = :id",
                         id=b.issue_batch),
        f"{CAROL}: unlock of issue 2 points at code redemption #{{issue_use}}, whose batch "
        "#{issue_batch} grants issue 1"),
    "issue redemption without unlock": (
        lambda e, b: sql(e, "DELETE FROM entitlement WHERE code_redemption_id = :id",
                         id=b.issue_use),
        f"{CAROL}: code redemption #{{issue_use}} of batch #{{issue_batch}} (issue 2) without "
        "its unlock"),
    "unlock kept after its refund": (
        _add_unlock(BOB, 1, "refunded_redeem"),
        f"{BOB}: unlock of issue 1 stays after its redemption (ledger entry "
        "#{refunded_redeem}) was refunded (#{redeem_refund})"),
    # passes
    "purchase without charge": (
        _set("pass_period", "ledger_entry_id = NULL", "bought_period"),
        f"{ALICE}: pass period #{{bought_period}} (month) bought without its charge"),
    "purchase on a missing entry": (
        _set("pass_period", "ledger_entry_id = 9999", "bought_period"),
        f"{ALICE}: pass period #{{bought_period}} (month) points at ledger entry #9999, "
        "which does not exist"),
    "purchase on a top-up": (
        _set("pass_period", "ledger_entry_id = :x", "bought_period", "topup"),
        f"{ALICE}: pass period #{{bought_period}} (month) points at ledger entry #{{topup}}, "
        f"which is a topup by {ALICE}"),
    "purchase without period": (
        _set("pass_period", "ledger_entry_id = NULL, source = 'grant', operator = 'x', "
                            "reason = 'y'", "bought_period"),
        f"{ALICE}: pass purchase #{{purchase}} (month) without its pass period"),
    "purchase claimed twice": (
        _add_purchased_period(ALICE, "purchase"),
        f"{ALICE}: pass purchase #{{purchase}} (month) is claimed by 2 pass periods"),
    "code period without redemption": (
        _set("pass_period", "code_redemption_id = NULL", "code_period"),
        f"{CAROL}: pass period #{{code_period}} (month) from a code without its code "
        "redemption"),
    "code period on a missing redemption": (
        _set("pass_period", "code_redemption_id = 9999", "code_period"),
        f"{CAROL}: pass period #{{code_period}} (month) points at code redemption #9999, "
        "which does not exist"),
    "code period on someone else's redemption": (
        _set("pass_period", "code_redemption_id = :x", "code_period", "gift_use"),
        f"{CAROL}: pass period #{{code_period}} (month) points at code redemption "
        f"#{{gift_use}}, which is by {BOB}"),
    "code period of another pass": (
        _set("pass_period", "pass_id = 'year'", "code_period"),
        f"{CAROL}: pass period #{{code_period}} (year) points at code redemption "
        "#{pass_use}, whose batch #{pass_batch} grants pass month"),
    "pass redemption without period": (
        _set("pass_period", "code_redemption_id = NULL, source = 'grant', operator = 'x', "
                            "reason = 'y'", "code_period"),
        f"{CAROL}: code redemption #{{pass_use}} of batch #{{pass_batch}} (pass month) has 0 "
        "pass periods, not one"),
    "code period called a gift": (
        _set("pass_period", "source = 'gift'", "code_period"),
        f"{CAROL}: pass period #{{code_period}} (month) says 'gift' but batch #{{pass_batch}} "
        "is not a gift"),
    "code period of other days": (
        _set("pass_period", "days = 31", "code_period"),
        f"{CAROL}: pass period #{{code_period}} (month) lasts 31 days but batch "
        "#{pass_batch} grants 30"),
    "grant without operator": (
        _set("pass_period", "operator = NULL", "grant_period"),
        f"{DAVE}: pass period #{{grant_period}} (month) granted without an operator and a "
        "reason"),
    "unknown source": (
        _set("pass_period", "source = 'promo'", "grant_period"),
        f"{DAVE}: pass period #{{grant_period}} (month) has the unknown source 'promo'"),
    "period names a foreign refund": (
        _set("pass_period", "refund_entry_id = :x", "bought_period", "topup"),
        f"{ALICE}: pass period #{{bought_period}} (month) names refund #{{topup}}, which does "
        "not refund its purchase"),
    "cut without refund": (
        _set("pass_period", "refund_entry_id = NULL", "bought_period"),
        f"{ALICE}: pass period #{{bought_period}} (month) is cut short without a refund"),
    "refund without cut": (
        _set("pass_period", "cut_at = NULL", "bought_period"),
        f"{ALICE}: refund #{{pass_refund}} of pass purchase #{{purchase}}, whose period was "
        "never cut short"),
    # gifts
    "gift batch without payment": (
        _set("code_batch", "gift_entry_id = NULL", "pass_gift_batch"),
        f"{ALICE}: gift batch #{{pass_gift_batch}} of {ALICE} without its payment"),
    "gift paid by a missing entry": (
        _set("code_batch", "gift_entry_id = 9999", "pass_gift_batch"),
        f"{ALICE}: gift batch #{{pass_gift_batch}} points at ledger entry #9999, which does "
        "not exist"),
    "gift paid by a top-up": (
        _set("code_batch", "gift_entry_id = :x", "pass_gift_batch", "topup"),
        f"{ALICE}: gift batch #{{pass_gift_batch}} points at ledger entry #{{topup}}, which is "
        f"a topup by {ALICE}"),
    "gift paid by someone else": (
        _set("code_batch", f"giver = '{BOB}'", "pass_gift_batch"),
        f"{BOB}: gift batch #{{pass_gift_batch}} points at ledger entry #{{pass_gift}}, which "
        f"is a gift of pass month by {ALICE}"),
    "gift of something else than paid for": (
        _set("code_batch", "issue_number = 1", "issue_gift_batch"),
        f"{ALICE}: gift batch #{{issue_gift_batch}} grants issue 1 but its payment "
        "#{issue_gift} was for issue 2"),
    "gift of many codes": (
        _set("code_batch", "count = 2", "pass_gift_batch"),
        f"{ALICE}: gift batch #{{pass_gift_batch}} has 2 codes × 1 use; a gift is one "
        "single-use code"),
    "gift without giver": (
        _set("code_batch", "giver = NULL", "pass_gift_batch"),
        "gift batch #{pass_gift_batch} names its payment #{pass_gift} but no giver"),
    "gift payment without its code": (
        _set("code_batch", "gift_entry_id = :x", "pass_gift_batch", "issue_gift"),
        f"{ALICE}: gift payment #{{pass_gift}} has 0 gift batches, not one"),
    # refunds
    "refund of a missing entry": (
        _set("ledger_entry", "refers_to = 9999", "redeem_refund"),
        f"{BOB}: refund #{{redeem_refund}} (+30) refers to ledger entry #9999, which does not "
        "exist"),
    "refund of someone else's entry": (
        _set("ledger_entry", "refers_to = :x", "redeem_refund", "redeem"),
        f"{BOB}: refund #{{redeem_refund}} (+30) refers to ledger entry #{{redeem}} of "
        f"{ALICE}"),
    "refund of a top-up": (
        _set("ledger_entry", "refers_to = :x", "redeem_refund", "adjust"),
        f"{BOB}: refund #{{redeem_refund}} (+30) refers to ledger entry #{{adjust}}, a adjust:"
        " only a redeem or a pass purchase is refunded"),
    "refund of more than was charged": (
        _amount_up(lambda b: b.redeem_refund, BOB, 5),
        f"{BOB}: refund #{{redeem_refund}} (+35) is more than the 30 charged by ledger entry "
        "#{refunded_redeem}"),
    "redeem refunded twice": (
        _entry(BOB, 30, "refund", issue_number=lambda b: 1,
               refers_to=lambda b: b.refunded_redeem),
        "redemption #{refunded_redeem} refunded 2 times (#{redeem_refund}, #{last_entry})"),
    "pass refunded past its price": (
        _entry(ALICE, 40, "refund", pass_id=lambda b: "month", refers_to=lambda b: b.purchase),
        f"{ALICE}: pass purchase #{{purchase}} refunded 70 in all, more than its price 60"),
}



def _last_id(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT max(id) FROM {table}")).scalar_one())


@pytest.mark.parametrize("case", list(CASES))
def test_each_corruption_is_named(case: str, books: Books, config: Path,
                                  engine: Engine) -> None:
    corrupt, expected = CASES[case]
    corrupt(engine, books)
    fields = {**vars(books), "extra_use": _last_id(engine, "code_redemption"),
              "last_entry": _last_id(engine, "ledger_entry")}
    assert expected.format(**fields) in problems(config)


def test_a_clean_check_after_real_refunds_of_a_redeem_keeps_no_unlock(
        books: Books, config: Path, engine: Engine) -> None:
    """The refunded redeem has no unlock and is not reported as "without its unlock"."""
    with transaction(engine) as s:
        assert not ledger.has_entitlement(s, openid=BOB, issue_number=1)
        assert ledger.check(s) == []


def test_json_names_problems_without_a_reader(books: Books, config: Path,
                                              engine: Engine) -> None:
    import json

    sql(engine, "UPDATE code_batch SET count = 0 WHERE id = :id", id=books.tokens_batch)
    done = cli(config, "ledger", "check", "--json")
    assert done.exit_code == 1
    data = json.loads(done.stdout)
    assert data["ok"] is False
    assert data["totals"] == {"in": 455, "spent": 200, "entries": 255, "balances": 255}
    [problem] = data["mismatches"]
    assert problem["openid"] is None and problem["problem"].startswith("code batch #")


# --- the real selling paths ----------------------------------------------------------------------


def test_books_written_by_the_real_selling_paths_are_clean(
        tmp_path: Path, engine: Engine) -> None:
    """Every path through chat and storage as shipped (codes, passes, gifts, refunds): the
    check agrees with what they write, and revenue adds up."""
    import json
    import re

    from bot.app import create_app
    from storage import codes, refunds
    from tests.conftest import WeChatUser, client_for
    from tests.test_selling import selling_settings
    from tests.test_webhook import topup

    settings = selling_settings()
    secret = settings.chat_config().codes.secret
    add_issue(engine, 1, price=30)
    add_issue(engine, 2, price=20)
    topup(engine, ALICE, 3000)
    topup(engine, BOB, 100)
    with transaction(engine) as s:
        tokens = codes.create_batch(s, secret=secret, kind="tokens", count=2, tokens=40)
        issue = codes.create_batch(s, secret=secret, kind="issue", count=1, uses=2,
                                   issue_number=1)
        month = codes.create_batch(s, secret=secret, kind="pass", count=1, pass_id="month",
                                   pass_days=30)
    with client_for(create_app(settings, engine)) as http:
        alice, bob, carol, dave = (WeChatUser(http, who) for who in (ALICE, BOB, CAROL, DAVE))
        assert alice.send("兑换 1")["type"] == "news"
        assert "已开通月卡" in alice.send("开通 月卡")["content"]
        gift_issue = re.findall(r"礼品码：(\S+)", alice.send("赠送 2")["content"])
        gift_pass = re.findall(r"礼品码：(\S+)", alice.send("赠送 月卡")["content"])
        assert gift_issue and gift_pass
        for sent, who in ((gift_issue[0], bob), ("兑换 1", bob), (tokens.codes[0], carol),
                          (month.codes[0], carol), (issue.codes[0], dave),
                          (gift_pass[0], dave)):
            assert "余额" in str(who.send(sent)), sent
    with transaction(engine) as s:
        refunds.refund_issue(s, openid=BOB, issue_number=1, reason="test", key="test:r1")
        refunds.refund_pass(s, openid=ALICE, pass_id="month", reason="test", key="test:r2")
        passes.grant(s, openid=CAROL, pass_id="year", days=365, source="grant",
                     key="test:grant", operator="cli:test", reason="press")
    config = write_config(tmp_path, engine)
    done = cli(config, "ledger", "check")
    assert done.exit_code == 0, done.output
    rev = json.loads(cli(config, "revenue", "--json").stdout)
    assert rev["in"]["codes"] == 40 and rev["spent"]["gifts"] == 20 + 300
    assert [(g["issue"], g["pass"], g["redeemed"]) for g in rev["gifts"]] == [
        (2, None, 1), (None, "month", 1)]
    assert [(r["issue"], r["pass"], r["count"]) for r in rev["refunds"]] == [
        (1, None, 1), (None, "month", 1)]
    assert rev["outstanding"] == rev["net"] == 3000 + 100 + 40 - rev["spent"]["total"] \
        + rev["in"]["refunds"]
