"""`newsbot revenue`: every figure read from the ledger, through the real CLI, on the books of
tests/test_ledger_check.py (top-ups, an adjustment, redemptions, codes, a pass purchase and its
refund, an operator grant, gifts and an issue refund)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from storage import revenue
from storage.db import transaction
from tests.test_ledger_check import ALICE, BOB, Books, problems, sql, write_books
from tests.test_money_cli import cli, write_config
from tests.test_webhook import topup


@pytest.fixture
def books(engine: Engine) -> Books:
    return write_books(engine)


@pytest.fixture
def config(tmp_path: Path, engine: Engine) -> Path:
    return write_config(tmp_path, engine)


def report(config: Path, *args: str) -> dict[str, object]:
    done = cli(config, "revenue", "--json", *args)
    assert done.exit_code == 0, done.output
    data: dict[str, object] = json.loads(done.stdout)
    return data


def test_json_has_every_category_with_stable_keys(books: Books, config: Path) -> None:
    assert report(config) == {
        "since": None,
        "unit": "豆",
        "in": {"topups": 360, "adjustments": -5, "codes": 40, "refunds": 60, "wechat_pay": 0,
               "wechat_pay_refunds": 0, "total": 455},
        "money": {"orders": 0, "paid_fen": 0, "refunds": 0, "refunded_fen": 0, "net_fen": 0},
        "spent": {"issues": 60, "passes": 60, "gifts": 80, "total": 200},
        "net": 255,
        "opening": 0,
        "outstanding": 255,
        "codes": [
            {"batch": books.tokens_batch, "label": "小鹅通 12月", "kind": "tokens",
             "grants_tokens": 40, "issue": None, "pass": None, "redemptions": 1, "tokens": 40},
            {"batch": books.issue_batch, "label": "", "kind": "issue", "grants_tokens": None,
             "issue": 2, "pass": None, "redemptions": 1, "tokens": 0},
            {"batch": books.pass_batch, "label": "", "kind": "pass", "grants_tokens": None,
             "issue": None, "pass": "month", "redemptions": 1, "tokens": 0},
        ],
        "issues": [{"issue": 1, "redemptions": 2, "tokens": 60}],
        "passes": [{"pass": "month", "purchases": 1, "tokens": 60}],
        "gifts": [{"issue": 2, "pass": None, "bought": 1, "redeemed": 1, "tokens": 20},
                  {"issue": None, "pass": "month", "bought": 1, "redeemed": 0, "tokens": 60}],
        "refunds": [{"issue": 1, "pass": None, "count": 1, "tokens": 30},
                    {"issue": None, "pass": "month", "count": 1, "tokens": 30}],
    }


def test_outstanding_is_the_sum_of_balances_and_what_ledger_check_proves(
        books: Books, config: Path, engine: Engine) -> None:
    with transaction(engine) as s:
        rev = revenue.report(s)
        balances = s.execute(text("SELECT sum(balance) FROM subscriber")).scalar_one()
    assert rev.outstanding == balances == rev.net == 255
    check = cli(config, "ledger", "check")
    assert check.exit_code == 0 and "in 455 − spent 200 = 255 豆" in check.stdout


def test_human_output_shows_each_table(books: Books, config: Path) -> None:
    done = cli(config, "revenue")
    assert done.exit_code == 0, done.output
    out = done.stdout
    for expected in ("Revenue, all time; amounts in 豆", "Tokens in", "operator top-ups",
                     "code batch #1 小鹅通 12月", "Code batches", "40 豆 each", "Tokens spent",
                     "#1 测试第1期", "2 unlocks", "gift: #2 测试第2期", "1 bought, 1 redeemed",
                     "Refunds", "in 455 − spent 200 = net +255 豆", "outstanding now: 255 豆"):
        assert expected in out, expected


def test_since_limits_the_flows_but_not_what_is_outstanding(
        books: Books, config: Path, engine: Engine) -> None:
    sql(engine, "UPDATE ledger_entry SET created_at = :t", t=datetime(2026, 1, 5, tzinfo=UTC))
    sql(engine, "UPDATE code_redemption SET created_at = :t",
        t=datetime(2026, 1, 5, tzinfo=UTC))
    sql(engine, "UPDATE code_batch SET created_at = :t", t=datetime(2026, 1, 5, tzinfo=UTC))
    topup(engine, BOB, 7)  # now
    data = report(config, "--since", "2026-02-01")
    assert data["since"] == "2026-02-01T00:00:00+08:00"
    assert data["in"] == {"topups": 7, "adjustments": 0, "codes": 0, "refunds": 0,
                          "wechat_pay": 0, "wechat_pay_refunds": 0, "total": 7}
    assert data["spent"] == {"issues": 0, "passes": 0, "gifts": 0, "total": 0}
    assert data["codes"] == data["issues"] == data["gifts"] == data["refunds"] == []
    assert (data["opening"], data["net"], data["outstanding"]) == (255, 7, 262)
    assert report(config)["outstanding"] == 262  # the same without --since
    human = cli(config, "revenue", "--since", "2026-02-01").stdout
    assert "since 2026-02-01 00:00 (Asia/Shanghai)" in human
    assert "outstanding when the window opened 255 + net +7 = 262 豆" in human


def test_since_is_a_day_in_the_broadcast_time_zone(engine: Engine, config: Path) -> None:
    topup(engine, ALICE, 1)
    topup(engine, ALICE, 10)
    # 23:30 on Nov 30 in Shanghai is 15:30 UTC; 00:30 on Dec 1 there is 16:30 UTC.
    sql(engine, "UPDATE ledger_entry SET created_at = :t WHERE amount = 1",
        t=datetime(2026, 11, 30, 15, 30, tzinfo=UTC))
    sql(engine, "UPDATE ledger_entry SET created_at = :t WHERE amount = 10",
        t=datetime(2026, 11, 30, 16, 30, tzinfo=UTC))
    data = report(config, "--since", "2026-12-01")
    assert data["in"] == {"topups": 10, "adjustments": 0, "codes": 0, "refunds": 0, "wechat_pay": 0,
                          "wechat_pay_refunds": 0, "total": 10}
    assert data["opening"] == 1


@pytest.mark.parametrize("since", ["yesterday", "2026-13-01", "2026/12/01", ""])
def test_a_bad_since_is_refused(since: str, config: Path) -> None:
    done = cli(config, "revenue", "--since", since)
    assert done.exit_code == 2
    assert "--since must be a date like 2026-12-01" in done.stderr


def test_an_empty_ledger_reports_zeros(config: Path) -> None:
    data = report(config)
    assert data["in"] == {"topups": 0, "adjustments": 0, "codes": 0, "refunds": 0,
                          "wechat_pay": 0, "wechat_pay_refunds": 0, "total": 0}
    assert (data["net"], data["outstanding"]) == (0, 0)


def test_an_entry_of_no_category_breaks_the_proof(books: Books, config: Path,
                                                  engine: Engine) -> None:
    """The report sums only the kinds it knows: ledger check says when the ledger holds
    tokens it cannot account for."""
    sql(engine, "UPDATE ledger_entry SET kind = 'bonus' WHERE id = :id", id=books.topup)
    assert report(config)["in"] == {"topups": 60, "adjustments": -5, "codes": 40, "wechat_pay": 0,
                                     "wechat_pay_refunds": 0,
                                    "refunds": 60, "total": 155}
    assert ("the revenue categories add up to -45 (in 155 − spent 200) but the ledger "
            "entries to 255") in problems(config)
