"""`newsbot pass list / grant / show` (issue 8 §2) through the real CLI: a grant is idempotent by
key like `topup`, extends a running pass, and every refusal exits 2 with nothing written."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from storage import passes
from storage.db import transaction
from storage.models import PassPeriod
from tests.test_money_cli import cli, write_config
from tests.test_webhook import balance, topup

ALICE = "o_alice_00001"
PASSES = ('[[passes]]\nid = "month"\nname = "月卡"\ndays = 30\nprice = 30\n'
          '[[passes]]\nid = "year"\nname = "年卡"\ndays = 365\nprice = 300\n')


def pass_config(tmp_path: Path, engine: Engine) -> Path:
    """A config file on ``engine`` with a month and a year pass."""
    path = write_config(tmp_path, engine)
    path.write_text(path.read_text(encoding="utf-8") + PASSES, encoding="utf-8")
    return path


@pytest.fixture
def config(tmp_path: Path, engine: Engine) -> Path:
    return pass_config(tmp_path, engine)


def periods(engine: Engine, openid: str = ALICE) -> list[PassPeriod]:
    with transaction(engine) as s:
        return passes.periods(s, openid=openid)


def test_list_shows_the_configured_passes(config: Path) -> None:
    done = cli(config, "pass", "list")
    assert done.exit_code == 0, done.output
    assert re.search(r"month\s+│\s+月卡\s+│\s+30\s+│\s+30 豆\s+│\s+开通 月卡", done.stdout)
    data = json.loads(cli(config, "pass", "list", "--json").stdout)
    assert data == [{"id": "month", "name": "月卡", "days": 30, "price": 30},
                    {"id": "year", "name": "年卡", "days": 365, "price": 300}]


def test_list_without_passes_says_how_to_add_them(tmp_path: Path, engine: Engine) -> None:
    done = cli(write_config(tmp_path, engine), "pass", "list")
    assert done.exit_code == 0 and "no passes configured" in done.stdout


def test_grant_gives_the_days_without_tokens_and_extends_a_running_pass(
        config: Path, engine: Engine) -> None:
    topup(engine, ALICE, 5)
    first = cli(config, "pass", "grant", ALICE, "month", "--reason", "conference")
    assert first.exit_code == 0, first.output
    assert "granted pass month (月卡, 30 days)" in first.stdout
    second = cli(config, "pass", "grant", ALICE, "YEAR", "--reason", "prize")
    assert second.exit_code == 0, second.output
    one, two = periods(engine)
    assert (one.source, one.operator, one.reason, one.ledger_entry_id) == ("grant", "cli",
                                                                          "conference", None)
    assert two.starts_at == one.ends_at and two.pass_id == "year"
    with transaction(engine) as s:
        held = passes.status(s, openid=ALICE)
        assert held is not None and held.until == one.starts_at + timedelta(days=30 + 365)
    assert balance(engine, ALICE) == 5  # a grant takes no tokens


def test_a_key_grants_once_and_the_printed_key_retries(config: Path, engine: Engine) -> None:
    topup(engine, ALICE, 1)
    first = cli(config, "pass", "grant", ALICE, "month", "--reason", "r", "--key", "inv-7")
    printed = re.search(r"key: (\S+)", first.stdout)
    assert first.exit_code == 0 and printed is not None and printed.group(1) == "cli:inv-7"
    for again in ("inv-7", "cli:inv-7"):
        retry = cli(config, "pass", "grant", ALICE, "month", "--reason", "r", "--key", again)
        assert retry.exit_code == 0 and "already applied" in retry.stdout, retry.output
    assert len(periods(engine)) == 1
    other = cli(config, "pass", "grant", ALICE, "year", "--reason", "r", "--key", "inv-7")
    assert other.exit_code == 2 and "nothing written" in other.output
    assert len(periods(engine)) == 1
    # Without --key every run is a new grant, as with topup.
    assert cli(config, "pass", "grant", ALICE, "month", "--reason", "r").exit_code == 0
    assert len(periods(engine)) == 2


@pytest.mark.parametrize("args, message", [
    (("pass", "grant", ALICE, "week", "--reason", "r"), "no pass 'week'"),
    (("pass", "grant", "o_nobody", "month", "--reason", "r"), "no subscriber"),
    (("pass", "grant", ALICE, "month", "--reason", "  "), "--reason"),
    (("pass", "grant", ALICE, "month"), "Missing option '--reason'"),
    (("pass", "grant", ALICE, "month", "--reason", "r", "--key", "k" * 200), "too long"),
])
def test_refusals_exit_2_and_write_nothing(config: Path, engine: Engine,
                                           args: tuple[str, ...], message: str) -> None:
    topup(engine, ALICE, 1)
    done = cli(config, *args)
    assert done.exit_code == 2 and message in done.output, done.output
    assert periods(engine) == [] and periods(engine, "o_nobody") == []


def test_show_lists_periods_and_the_running_pass(config: Path, engine: Engine) -> None:
    topup(engine, ALICE, 1)
    assert "no pass running" in cli(config, "pass", "show", ALICE).stdout
    cli(config, "pass", "grant", ALICE, "month", "--reason", "welcome gift")
    shown = cli(config, "pass", "show", ALICE)
    assert shown.exit_code == 0, shown.output
    assert "pass month running until" in shown.stdout and "welcome" in shown.stdout
    data = json.loads(cli(config, "pass", "show", ALICE, "--json").stdout)
    [period] = periods(engine)
    assert data["running"]["pass_id"] == "month" and data["running"]["name"] == "月卡"
    assert data["running"]["until"] == data["periods"][0]["ends_at"]
    assert data["periods"][0]["source"] == "grant" and data["periods"][0]["id"] == period.id
    assert data["running"]["until"].endswith("+08:00")
    assert cli(config, "pass", "show", "o_nobody").exit_code == 1
