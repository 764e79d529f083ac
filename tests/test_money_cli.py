"""The operator CLI's side of issue 7: `--key` in a namespace of its own (printed keys given
back map to the same entry, keys from before the namespace are still honoured), `ledger check`
comparing unlocks and charges both ways, and `serve` warning about operators in plain mode.
All through the real CLI; the chat side through signed XML posted to the real WSGI app."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner, Result

import bot.server
from bot.cli import app as cli_app
from storage import ledger
from storage.db import transaction
from storage.models import Entitlement, LedgerEntry
from tests.conftest import OPERATOR, TOKEN, WeChatUser
from tests.test_safe_mode import AES_KEY, APP_ID
from tests.test_webhook import add_issue, balance, topup

ALICE = "o_alice_00001"
BOB = "o_bob_0000001"


def write_config(tmp_path: Path, engine: Engine, **wechat: Any) -> Path:
    url = engine.url.render_as_string(hide_password=False)
    extra = "".join(f'{k} = {"true" if v is True else "false" if v is False else repr(v)}\n'
                    .replace("'", '"') for k, v in wechat.items())
    path = tmp_path / "config.toml"
    path.write_text(f'[wechat]\ntoken = "{TOKEN}"\n{extra}[reader]\nsecret = "test-reader-'
                    f'secret-0123"\n[database]\nurl = "{url}"\n[operators]\nopenids = '
                    f'["{OPERATOR}"]\n[broadcast]\nscheduler = false\n', encoding="utf-8")
    return path


@pytest.fixture
def config(tmp_path: Path, engine: Engine) -> Path:
    return write_config(tmp_path, engine)


def cli(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli_app, [*args, "--config", str(config)])


def keys(engine: Engine) -> list[str]:
    with transaction(engine) as s:
        return list(s.execute(select(LedgerEntry.idempotency_key)  # type: ignore[call-overload]
                              .order_by(LedgerEntry.id)).scalars())


# --- --key ---------------------------------------------------------------------------------------


def test_a_given_key_is_stored_as_cli_key_and_the_printed_key_retries(
        config: Path, engine: Engine) -> None:
    topup(engine, ALICE, 1, key="setup")
    first = cli(config, "topup", ALICE, "5", "--reason", "gift", "--key", "invoice-9")
    assert first.exit_code == 0, first.output
    printed = re.search(r"key: (\S+)", first.stdout)
    assert printed is not None and printed.group(1) == "cli:invoice-9"
    for again in ("invoice-9", printed.group(1)):
        retry = cli(config, "topup", ALICE, "5", "--reason", "gift", "--key", again)
        assert retry.exit_code == 0 and "already applied" in retry.stdout, retry.output
    assert balance(engine, ALICE) == 6
    assert keys(engine) == ["setup", "cli:invoice-9"]


def test_a_generated_key_is_printed_and_accepted_back(config: Path, engine: Engine) -> None:
    topup(engine, ALICE, 1)
    first = cli(config, "adjust", ALICE, "-1", "--reason", "fix")
    printed = re.search(r"key: (cli:\S+)", first.stdout)
    assert first.exit_code == 0 and printed is not None, first.output
    retry = cli(config, "adjust", ALICE, "-1", "--reason", "fix", "--key", printed.group(1))
    assert retry.exit_code == 0 and "already applied" in retry.stdout
    assert balance(engine, ALICE) == 0


def test_a_key_stored_before_the_namespace_is_still_honoured(
        config: Path, engine: Engine) -> None:
    """A database upgraded from a CLI that stored `--key X` as X: a retry of that command
    must find it, not pay again; another action under it is refused as before."""
    topup(engine, ALICE, 10, key="march-bonus")  # as the old CLI stored it
    retry = cli(config, "topup", ALICE, "10", "--reason", "test", "--key", "march-bonus")
    assert retry.exit_code == 0 and "already applied" in retry.stdout, retry.output
    other = cli(config, "topup", ALICE, "11", "--reason", "test", "--key", "march-bonus")
    assert other.exit_code == 2 and "nothing written" in other.output
    assert balance(engine, ALICE) == 10 and keys(engine) == ["march-bonus"]


def test_a_chat_key_given_to_the_cli_never_blocks_the_chat(
        config: Path, engine: Engine, http: httpx.Client) -> None:
    topup(engine, ALICE, 10)
    for msg_id in (100, 101):
        done = cli(config, "topup", ALICE, "1", "--reason", "r", "--key", f"wechat:{msg_id}")
        assert done.exit_code == 0, done.output
    done = cli(config, "topup", ALICE, "1", "--reason", "r", "--key",
               f"wechat:{OPERATOR}:101")
    assert done.exit_code == 0, done.output
    operator = WeChatUser(http, OPERATOR)
    for msg_id in (100, 101):
        operator.send(f"#topup {ALICE} 5 chat", msg_id=msg_id)
    assert balance(engine, ALICE) == 10 + 3 + 10
    assert f"wechat:{OPERATOR}:100" in keys(engine)


def test_an_empty_key_still_means_a_generated_one(config: Path, engine: Engine) -> None:
    topup(engine, ALICE, 1)
    done = cli(config, "topup", ALICE, "1", "--reason", "r", "--key", "")
    assert done.exit_code == 0 and re.search(r"key: cli:[0-9a-f-]{36}\b", done.stdout)
    assert balance(engine, ALICE) == 2


# --- ledger check --------------------------------------------------------------------------------


def redeem_in_chat(http: httpx.Client, engine: Engine, openid: str, issue: int) -> None:
    topup(engine, openid, 100)
    reply = WeChatUser(http, openid).send(f"兑换 {issue}")
    assert reply["type"] in ("text", "news"), reply


def entry_id(engine: Engine, openid: str, issue: int) -> int:
    with transaction(engine) as s:
        found = s.execute(select(LedgerEntry.id).where(  # type: ignore[call-overload]
            LedgerEntry.openid == openid, LedgerEntry.kind == "redeem",
            LedgerEntry.issue_number == issue)).scalar_one()
        return int(found)


def check(config: Path) -> tuple[int, list[str]]:
    done = cli(config, "ledger", "check")
    return done.exit_code, [ln for ln in done.stderr.splitlines() if ln.strip()]


def test_real_redemptions_and_free_issues_are_clean(
        config: Path, engine: Engine, http: httpx.Client) -> None:
    add_issue(engine, 1, price=30)
    add_issue(engine, 2, price=0)
    redeem_in_chat(http, engine, ALICE, 1)
    redeem_in_chat(http, engine, ALICE, 2)  # free: no charge, no unlock
    done = cli(config, "ledger", "check")
    assert done.exit_code == 0 and "ledger OK" in done.stdout, done.output


def test_an_unlock_without_its_charge_is_reported(
        config: Path, engine: Engine, http: httpx.Client) -> None:
    add_issue(engine, 1, price=30)
    add_issue(engine, 3, price=0)
    redeem_in_chat(http, engine, ALICE, 1)
    with transaction(engine) as s:
        s.add(Entitlement(openid=BOB, issue_number=1))  # a priced issue, never paid for
        s.add(Entitlement(openid=BOB, issue_number=3))  # free now: grants nothing, let be
    code, lines = check(config)
    assert code == 1
    assert lines[0] == f"{BOB}: unlock of issue 1 without its charge"
    assert len(lines) == 2 and "1 problem across" in lines[1]


def test_an_unlock_pointing_at_another_users_charge_is_reported(
        config: Path, engine: Engine, http: httpx.Client) -> None:
    add_issue(engine, 1, price=30)
    redeem_in_chat(http, engine, ALICE, 1)
    topup(engine, BOB, 5)
    charge = entry_id(engine, ALICE, 1)
    with transaction(engine) as s:
        s.add(Entitlement(openid=BOB, issue_number=1, ledger_entry_id=charge))
    code, lines = check(config)
    assert code == 1
    assert lines[0] == (f"{BOB}: unlock of issue 1 points at ledger entry #{charge}, which is "
                        f"a redeem of issue 1 by {ALICE}")


def test_an_unlock_pointing_at_a_charge_for_another_issue_is_reported(
        config: Path, engine: Engine, http: httpx.Client) -> None:
    add_issue(engine, 1, price=30)
    add_issue(engine, 2, price=30)
    redeem_in_chat(http, engine, ALICE, 1)
    charge = entry_id(engine, ALICE, 1)
    with transaction(engine) as s:
        s.add(Entitlement(openid=ALICE, issue_number=2, ledger_entry_id=charge))
    code, lines = check(config)
    assert code == 1
    assert lines[0] == (f"{ALICE}: unlock of issue 2 points at ledger entry #{charge}, which "
                        f"is a redeem of issue 1 by {ALICE}")


def test_a_charge_whose_unlock_belongs_to_someone_else_is_reported_both_ways(
        config: Path, engine: Engine, http: httpx.Client) -> None:
    add_issue(engine, 1, price=30)
    redeem_in_chat(http, engine, ALICE, 1)
    topup(engine, BOB, 5)
    charge = entry_id(engine, ALICE, 1)
    with transaction(engine) as s:
        s.execute(Entitlement.__table__.update().values(openid=BOB))  # type: ignore[attr-defined]
    code, lines = check(config)
    assert code == 1
    assert lines[:2] == [
        f"{BOB}: unlock of issue 1 points at ledger entry #{charge}, which is a redeem of "
        f"issue 1 by {ALICE}",
        f"{ALICE}: redemption of issue 1 (ledger entry #{charge}) without its unlock"]


def test_check_is_a_storage_function_too(engine: Engine) -> None:
    with transaction(engine) as s:
        s.add(Entitlement(openid=BOB, issue_number=9))  # no such issue: not free either
    with transaction(engine) as s:
        [problem] = ledger.check(s)
    assert problem.problem == "unlock of issue 9 without its charge"
    assert not problem.about_balance


# --- serve warns about operators in plain mode -------------------------------------------------


@pytest.mark.parametrize(("wechat", "warned"), [
    ({}, "plain mode"),
    ({"encoding_aes_key": AES_KEY, "app_id": APP_ID, "accept_plain": True},
     "compatible mode"),
    ({"encoding_aes_key": AES_KEY, "app_id": APP_ID}, None),
])
def test_serve_warns_when_operators_may_arrive_in_plain_messages(
        tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch,
        wechat: dict[str, Any], warned: str | None) -> None:
    started: list[Any] = []
    monkeypatch.setattr(bot.server, "run_server", lambda *a: started.append(a))
    done = cli(write_config(tmp_path, engine, **wechat), "serve")
    assert done.exit_code == 0, done.output
    assert started
    if warned is None:
        assert "warning" not in done.stderr
    else:
        assert "warning: [operators] openids is set while plain messages are accepted" in \
            done.stderr and warned in done.stderr
        assert "安全模式 with accept_plain = false" in done.stderr


def test_serve_does_not_warn_without_operators(
        tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bot.server, "run_server", lambda *a: None)
    path = write_config(tmp_path, engine)
    path.write_text(path.read_text(encoding="utf-8").replace(f'["{OPERATOR}"]', "[]"),
                    encoding="utf-8")
    done = cli(path, "serve")
    assert done.exit_code == 0 and "warning" not in done.stderr, done.output
