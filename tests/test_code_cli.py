"""`newsbot code …` through the real CLI: the CSV written once and only after the commit, the
batch's codes working in the real chat, every refusal exiting 2 with nothing written (no rows,
no CSV, no temporary file), and the look-ups operators need (list, show, revoke, frozen)."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import Engine, func
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select
from typer.testing import CliRunner, Result

from bot.cli import app as cli_app
from storage import codes
from storage.db import transaction
from storage.models import CodeBatch, RedemptionCode
from tests.conftest import CODES_SECRET, TOKEN, WeChatUser
from tests.test_chat_replies import add_issue, balance

SECRET = CODES_SECRET.encode()
ZONE = ZoneInfo("Asia/Shanghai")


def write_config(tmp_path: Path, engine: Engine, *, secret: str | None = CODES_SECRET) -> Path:
    url = engine.url.render_as_string(hide_password=False)
    codes_section = f'[codes]\nsecret = "{secret}"\n' if secret else ""
    path = tmp_path / "config.toml"
    path.write_text(
        f'[wechat]\ntoken = "{TOKEN}"\n[reader]\nsecret = "test-reader-secret-0123"\n'
        f'[database]\nurl = "{url}"\n[broadcast]\nscheduler = false\n'
        f'[tokens]\nmax_topup = 1000\n{codes_section}'
        '[[passes]]\nid = "month"\nname = "月卡"\ndays = 30\nprice = 300\n',
        encoding="utf-8")
    return path


@pytest.fixture
def config(tmp_path: Path, engine: Engine) -> Path:
    return write_config(tmp_path, engine)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def cli(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli_app, [*args, "--config", str(config)])


def rows(engine: Engine) -> tuple[int, int]:
    with transaction(engine) as s:
        return (int(s.exec(select(func.count()).select_from(CodeBatch)).one()),
                int(s.exec(select(func.count()).select_from(RedemptionCode)).one()))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["code", "batch", "grants", "expires"]
        return list(reader)


def test_create_writes_the_codes_once(config: Path, engine: Engine, out_dir: Path,
                                      http: httpx.Client) -> None:
    out = out_dir / "codes.csv"
    done = cli(config, "code", "create", "--count", "25", "--tokens", "40", "--label",
               "小鹅通 12月", "--out", str(out))
    assert done.exit_code == 0, done.output
    assert "batch #1: 25 codes granting 40 豆" in done.stdout
    made = read_csv(out)
    assert len(made) == 25 and len({r["code"] for r in made}) == 25
    for r in made:
        code = codes.canonical(r["code"])
        assert code is not None and codes.check_ok(code) and r["code"] == codes.display(code)
        assert (r["batch"], r["grants"], r["expires"]) == ("1", "tokens:40", "")
    assert rows(engine) == (1, 25)
    assert sorted(p.name for p in out_dir.iterdir()) == ["codes.csv"]  # no temporary left
    reader = WeChatUser(http, "o_reader_0001")
    reader.send("hi")
    assert "兑换成功：+40 豆" in reader.send(made[0]["code"])["content"]
    # Written once: the file is never replaced.
    again = cli(config, "code", "create", "--count", "1", "--tokens", "40", "--out", str(out))
    assert again.exit_code == 2 and "exists" in again.output
    assert len(read_csv(out)) == 25 and rows(engine) == (1, 25)


def test_expiry_is_the_end_of_that_day_in_the_broadcast_zone(
        config: Path, engine: Engine, out_dir: Path) -> None:
    day = (datetime.now(ZONE) + timedelta(days=3)).date()
    out = out_dir / "c.csv"
    add_issue(engine, 3)
    done = cli(config, "code", "create", "--count", "2", "--issue", "3", "--expires",
               day.isoformat(), "--uses", "3", "--out", str(out))
    assert done.exit_code == 0, done.output
    end = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=ZONE)
    with transaction(engine) as s:
        b = s.exec(select(CodeBatch)).one()
        assert b.expires_at == end and b.uses == 3 and b.issue_number == 3
    assert {r["expires"] for r in read_csv(out)} == {end.isoformat()}
    assert {r["grants"] for r in read_csv(out)} == {"issue:3"}


def test_a_pass_batch_fixes_its_days(config: Path, engine: Engine, out_dir: Path) -> None:
    done = cli(config, "code", "create", "--count", "1", "--pass", "month", "--out",
               str(out_dir / "p.csv"))
    assert done.exit_code == 0, done.output
    with transaction(engine) as s:
        b = s.exec(select(CodeBatch)).one()
        assert (b.kind, b.pass_id, b.pass_days) == ("pass", "month", 30)


REFUSALS: list[tuple[list[str], str]] = [
    (["--count", "0", "--tokens", "5"], "between 1 and 1,000,000"),
    (["--count", "10000000", "--tokens", "5"], "between 1 and 1,000,000"),
    (["--count", "1", "--tokens", "1001"], "max_topup"),
    (["--count", "1", "--tokens", "0"], "--tokens must be between 1"),
    (["--count", "1", "--issue", "99"], "no issue 99"),
    (["--count", "1", "--pass", "year"], "no pass 'year'"),
    (["--count", "1", "--tokens", "5", "--expires", "2020-01-01"], "in the past"),
    (["--count", "1", "--tokens", "5", "--expires", "tomorrow"], "a date like"),
    (["--count", "1"], "exactly one of --tokens, --issue, --pass (none given)"),
    (["--count", "1", "--tokens", "5", "--pass", "month"], "--tokens and --pass"),
    (["--count", "1", "--tokens", "5", "--uses", "0"], "minimum"),
    (["--count", "-3", "--tokens", "5"], "whole number"),
]


@pytest.mark.parametrize(("args", "message"), REFUSALS)
def test_refusals_write_nothing(config: Path, engine: Engine, out_dir: Path,
                                args: list[str], message: str) -> None:
    out = out_dir / "codes.csv"
    done = cli(config, "code", "create", *args, "--out", str(out))
    assert done.exit_code == 2, done.output
    assert message in done.output, done.output
    assert rows(engine) == (0, 0) and list(out_dir.iterdir()) == []


def test_codes_off_says_which_key_to_set(tmp_path: Path, engine: Engine,
                                         out_dir: Path) -> None:
    config = write_config(tmp_path, engine, secret=None)
    done = cli(config, "code", "create", "--count", "1", "--tokens", "5", "--out",
               str(out_dir / "c.csv"))
    assert done.exit_code == 2 and "[codes] secret" in done.output
    assert "NEWSBOT_CODES__SECRET" in done.output
    assert rows(engine) == (0, 0) and list(out_dir.iterdir()) == []


def test_a_failed_commit_leaves_no_file(
        config: Path, engine: Engine, out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: the CSV is linked into place only after the commit, and the temporary file is
    deleted when the commit fails (here: the disk fills as the batch is committed)."""
    real_commit = Session.commit
    failed: list[bool] = []

    def commit_once_failing(self: Session) -> None:
        if not failed:
            failed.append(True)
            raise OperationalError("COMMIT", {}, OSError(28, "database or disk is full"))
        real_commit(self)

    monkeypatch.setattr(Session, "commit", commit_once_failing)
    done = cli(config, "code", "create", "--count", "5", "--tokens", "5", "--out",
               str(out_dir / "c.csv"))
    assert failed and done.exit_code != 0
    assert rows(engine) == (0, 0) and list(out_dir.iterdir()) == []


def test_list_show_revoke(config: Path, engine: Engine, out_dir: Path,
                          http: httpx.Client) -> None:
    assert cli(config, "code", "create", "--count", "3", "--tokens", "10", "--out",
               str(out_dir / "a.csv")).exit_code == 0
    assert cli(config, "code", "create", "--count", "2", "--tokens", "7", "--uses", "2",
               "--out", str(out_dir / "b.csv")).exit_code == 0
    first = [r["code"] for r in read_csv(out_dir / "a.csv")]
    second = [r["code"] for r in read_csv(out_dir / "b.csv")]
    readers = [WeChatUser(http, f"o_r{i}") for i in range(2)]
    for r in readers:
        r.send("hi")
        assert "兑换成功" in r.send(second[0])["content"]
    assert "兑换成功" in readers[0].send(first[0])["content"]

    listed = json.loads(cli(config, "code", "list", "--json").stdout)
    assert [(b["batch"], b["redeemed"], b["codes_used"], b["tokens_granted"], b["count"])
            for b in listed] == [(1, 1, 1, 10, 3), (2, 2, 1, 14, 2)]
    table = cli(config, "code", "list")
    assert table.exit_code == 0 and "2 batches" in table.stdout

    shown = json.loads(cli(config, "code", "show", second[0].lower(), "--json").stdout)
    assert shown["used"] == 2 and shown["uses"] == 2
    assert [u["openid"] for u in shown["redeemed_by"]] == ["o_r0", "o_r1"]
    batch = cli(config, "code", "show", "2")
    assert batch.exit_code == 0 and "redeemed 2 of 4" in batch.stdout, batch.output

    assert cli(config, "code", "revoke", first[1]).exit_code == 0
    again = cli(config, "code", "revoke", first[1])
    assert again.exit_code == 0 and "already revoked" in again.stdout
    assert "已停用" in readers[1].send(first[1])["content"]
    assert cli(config, "code", "revoke", "--batch", "2").exit_code == 0
    assert "已停用" in readers[1].send(second[1])["content"]
    listed = json.loads(cli(config, "code", "list", "--json").stdout)
    assert [b["codes_revoked"] for b in listed] == [1, 2]
    assert listed[1]["revoked_at"] is not None
    assert balance(engine, "o_r0") == 17 and balance(engine, "o_r1") == 7


@pytest.mark.parametrize("args", [
    ["show", "ABCD"], ["show", "ABCD-EFGH-JKMN-PQRS"], ["revoke", "hello"],
    ["revoke", "ABCD-EFGH-JKMN-PQRS"], ["revoke"], ["revoke", "--batch", "x"],
    ["revoke", "--batch", "9"],
])
def test_bad_codes_and_batches_are_refused(config: Path, engine: Engine, args: list[str]) -> None:
    done = cli(config, "code", *args)
    assert done.exit_code == 2, done.output
    assert "nothing" in done.output


def test_unknown_look_ups_answer_no(config: Path, engine: Engine) -> None:
    assert cli(config, "code", "show", "7").exit_code == 1
    assert cli(config, "code", "show", codes.display(codes.new_code())).exit_code == 1
    unknown = codes.display(codes.new_code())
    revoke = cli(config, "code", "revoke", unknown)
    assert revoke.exit_code == 2 and "no code" in revoke.output


def test_frozen_subscribers_are_listed(config: Path, engine: Engine,
                                       http: httpx.Client) -> None:
    guesser = WeChatUser(http, "o_guesser")
    guesser.send("hi")
    for _ in range(5):
        guesser.send(codes.display(codes.new_code()))
    listed = json.loads(cli(config, "code", "frozen", "--json").stdout)
    assert [(f["openid"], f["failures"]) for f in listed] == [("o_guesser", 5)]
    until = datetime.fromisoformat(listed[0]["until"])
    assert timedelta(minutes=59) < until - datetime.now(ZONE) <= timedelta(minutes=60)
    table = cli(config, "code", "frozen")
    assert "o_guesser" in table.stdout and "1 subscriber frozen" in table.stdout
