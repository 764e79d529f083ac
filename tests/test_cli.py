"""The operator CLI, in process through Typer's runner, against a temporary SQLite database
configured by a real TOML file. Money commands must refuse bad input with exit 2 and leave the
ledger exactly as it was."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from typer.testing import CliRunner, Result

from bot.cli import app
from storage.db import transaction
from storage.subscribers import ensure_subscriber
from tests.conftest import SAMPLE_DRAFT, SAMPLE_ISSUE, TOKEN

READER_SECRET = "cli-test-reader-secret-0123456789"
USER = "o_cli_reader"

Run = Callable[..., Result]


def write_config(path: Path, db_url: str, *, extra: str = "", token: str = TOKEN) -> Path:
    path.write_text(
        f'[wechat]\ntoken = "{token}"\n\n[database]\nurl = "{db_url}"\n\n'
        f'[reader]\nsecret = "{READER_SECRET}"\n\n[tokens]\nmax_topup = 1000\n{extra}',
        encoding="utf-8",
    )
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The developer's own NEWSBOT_* variables or ./config.toml must not leak into the tests.
    import os

    for name in list(os.environ):
        if name.startswith("NEWSBOT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def config(tmp_path: Path, db_url: str, engine: Engine) -> Path:
    return write_config(tmp_path / "config.toml", db_url)


@pytest.fixture
def run(config: Path) -> Run:
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(app, ["--config", str(config), *args])

    return invoke


@pytest.fixture
def reader(engine: Engine) -> str:
    with transaction(engine) as s:
        ensure_subscriber(s, openid=USER)
    return USER


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def entries(run: Run, openid: str = USER) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = as_json(run("user", "show", openid, "--json"))["entries"]
    return data


def balance(run: Run, openid: str = USER) -> int:
    return int(as_json(run("user", "show", openid, "--json"))["balance"])


# --------------------------------------------------------------------------- issues


def test_import_then_reimport_unchanged_and_updated(run: Run, tmp_path: Path) -> None:
    copy = tmp_path / "issue.md"
    copy.write_bytes(SAMPLE_ISSUE.read_bytes())

    first = run("issue", "import", str(copy))
    assert first.exit_code == 0, first.output
    assert "created" in first.stdout and "#1" in first.stdout and "字" in first.stdout

    again = run("issue", "import", str(copy))
    assert again.exit_code == 0
    assert "unchanged" in again.stdout

    copy.write_text(SAMPLE_ISSUE.read_text(encoding="utf-8").replace(
        'title = "AI客服的真实账本，与订阅经济的退潮"', 'title = "改过的标题"'), encoding="utf-8")
    updated = run("issue", "import", str(copy))
    assert updated.exit_code == 0
    assert "updated" in updated.stdout and "改过的标题" in updated.stdout
    [issue] = as_json(run("issue", "list", "--json"))
    assert issue["title"] == "改过的标题"


def test_broken_file_names_file_and_field_and_stores_nothing(run: Run, tmp_path: Path) -> None:
    bad = tmp_path / "bad.md"
    bad.write_text(SAMPLE_ISSUE.read_text(encoding="utf-8").replace("price = 99", 'price = "x"'),
                   encoding="utf-8")
    result = run("issue", "import", str(bad))
    assert result.exit_code == 2
    assert f"{bad}:5: price: " in result.stderr
    assert as_json(run("issue", "list", "--json")) == []


def test_mixed_good_and_bad_files_store_nothing(run: Run, tmp_path: Path) -> None:
    bad = tmp_path / "no-title.md"
    bad.write_text(SAMPLE_DRAFT.read_text(encoding="utf-8").replace("title = ", "headline = ", 1),
                   encoding="utf-8")
    missing = tmp_path / "missing.md"
    result = run("issue", "import", str(bad), str(SAMPLE_ISSUE), str(missing))
    assert result.exit_code == 2
    assert f"{bad}:" in result.stderr and f"{missing}: file: " in result.stderr
    assert "created" not in result.stdout
    assert as_json(run("issue", "list", "--json")) == []


def test_import_json_output(run: Run) -> None:
    data = as_json(run("issue", "import", "--json", str(SAMPLE_ISSUE)))
    assert data[0]["status"] == "created" and data[0]["number"] == 1
    assert data[0]["char_count"] > data[0]["excerpt_char_count"] > 0


def test_list_show_and_publish(run: Run) -> None:
    assert run("issue", "import", str(SAMPLE_ISSUE), str(SAMPLE_DRAFT)).exit_code == 0

    listed = {i["number"]: i for i in as_json(run("issue", "list", "--json"))}
    assert listed[1]["published"] is not None and listed[2]["published"] is None
    assert listed[2]["status"] == "draft"
    assert {"number", "title", "price", "char_count", "excerpt_char_count"} <= set(listed[1])

    shown = as_json(run("issue", "show", "2", "--json"))
    for field in ("number", "title", "price", "free_percent", "published", "char_count",
                  "excerpt_char_count", "summary", "topics"):
        assert field in shown
    assert shown["published"] is None
    assert shown["topics"][0]["title"] and shown["topics"][0]["questions"]

    human = run("issue", "show", "1")
    assert human.exit_code == 0
    assert "free excerpt" in human.stdout
    first = as_json(run("issue", "show", "1", "--json"))
    assert first["topics"][0]["questions"][0] in human.stdout

    published = run("issue", "publish", "2")
    assert published.exit_code == 0 and "published #2" in published.stdout
    assert as_json(run("issue", "show", "2", "--json"))["published"] is not None
    assert "already published" in run("issue", "publish", "2").stdout

    unknown = run("issue", "publish", "99")
    assert unknown.exit_code == 2 and "no issue 99" in unknown.stderr
    assert run("issue", "show", "99").exit_code == 1


def test_human_list_shows_drafts(run: Run) -> None:
    run("issue", "import", str(SAMPLE_ISSUE), str(SAMPLE_DRAFT))
    result = run("issue", "list")
    assert result.exit_code == 0
    assert "draft" in result.stdout and "published" in result.stdout


# --------------------------------------------------------------------------- users and tokens


def test_topup_and_adjust_happy_path(run: Run, reader: str) -> None:
    top = run("topup", reader, "100", "--reason", "welcome gift", "--operator", "alice")
    assert top.exit_code == 0, top.output
    assert "balance now 100" in top.stdout and "key: cli:" in top.stdout

    down = run("adjust", reader, "-5", "--reason", "typo")
    assert down.exit_code == 0, down.output
    assert balance(run) == 95

    rows = entries(run)
    assert [(e["kind"], e["amount"], e["balance_after"]) for e in rows] == [
        ("adjust", -5, 95), ("topup", 100, 100)]
    assert rows[1]["operator"] == "alice" and rows[0]["operator"].startswith("cli:")
    assert rows[1]["reason"] == "welcome gift" and rows[0]["key"].startswith("cli:")
    assert run("ledger", "check").exit_code == 0


@pytest.mark.parametrize(
    ("command", "amount", "message"),
    [
        ("topup", "0", "positive"),
        ("topup", "-5", "positive"),
        ("topup", "abc", "whole number"),
        ("topup", "1.5", "whole number"),
        ("topup", "1001", "max_topup"),
        ("topup", "99999999999999999999", "large"),
        ("adjust", "0", "non-zero"),
        ("adjust", "-51", "below zero"),
        ("adjust", "x", "whole number"),
    ],
)
def test_bad_amounts_exit_2_and_write_nothing(run: Run, reader: str, command: str, amount: str,
                                              message: str) -> None:
    assert run("topup", reader, "50", "--reason", "start").exit_code == 0
    result = run(command, reader, amount, "--reason", "bad")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "nothing written" in result.stderr
    assert len(entries(run)) == 1 and balance(run) == 50


def test_missing_reason_is_refused(run: Run, reader: str) -> None:
    assert run("topup", reader, "5").exit_code == 2
    assert run("topup", reader, "5", "--reason", "  ").exit_code == 2
    assert entries(run) == []


def test_idempotency_key_replay_and_conflict(run: Run, reader: str) -> None:
    first = run("topup", reader, "30", "--reason", "gift", "--key", "ticket-42")
    assert first.exit_code == 0 and "ticket-42" in first.stdout

    replay = run("topup", reader, "30", "--reason", "gift", "--key", "ticket-42")
    assert replay.exit_code == 0
    assert "already applied" in replay.stdout and "+30" in replay.stdout
    assert balance(run) == 30 and len(entries(run)) == 1

    conflict = run("topup", reader, "31", "--reason", "gift", "--key", "ticket-42")
    assert conflict.exit_code == 2
    assert "ticket-42" in conflict.stderr and "different action" in conflict.stderr
    assert balance(run) == 30 and len(entries(run)) == 1


def test_unknown_user(run: Run) -> None:
    result = run("topup", "o_nobody", "5", "--reason", "r")
    assert result.exit_code == 2
    assert "message the account first" in result.stderr
    shown = run("user", "show", "o_nobody")
    assert shown.exit_code == 1 and "o_nobody" in shown.stderr


def test_user_list(run: Run, reader: str, engine: Engine) -> None:
    with transaction(engine) as s:
        ensure_subscriber(s, openid="o_second")
    with engine.begin() as conn:
        conn.execute(text("UPDATE subscriber SET subscribed = :no WHERE openid = 'o_second'"),
                     {"no": False})
    everyone = as_json(run("user", "list", "--json"))
    assert [u["openid"] for u in everyone] == [USER, "o_second"]
    assert {"openid", "balance", "subscribed"} <= set(everyone[0])
    assert [u["openid"] for u in as_json(run("user", "list", "--json", "--active"))] == [USER]
    assert len(as_json(run("user", "list", "--json", "--limit", "1"))) == 1
    human = run("user", "list")
    assert human.exit_code == 0 and "2 shown of 2" in human.stdout


def test_user_show_lists_unlocks(run: Run, reader: str, engine: Engine) -> None:
    from storage.ledger import redeem

    run("issue", "import", str(SAMPLE_ISSUE))
    run("topup", reader, "120", "--reason", "gift")
    with transaction(engine) as s:
        redeem(s, openid=reader, issue_number=1, price=99, key="test:redeem")
    shown = as_json(run("user", "show", reader, "--json"))
    assert shown["unlocked"] == [1] and shown["balance"] == 21 and shown["subscribed"] is True
    assert shown["entries"][0]["kind"] == "redeem" and shown["entries"][0]["issue_number"] == 1
    assert run("user", "show", reader).exit_code == 0


# --------------------------------------------------------------------------- ledger check


def test_ledger_check_ok_then_corrupted(run: Run, reader: str, engine: Engine) -> None:
    run("topup", reader, "10", "--reason", "r")
    ok = run("ledger", "check")
    assert ok.exit_code == 0 and "ledger OK: 1 user, 1 entry" in ok.stdout

    with engine.begin() as conn:
        conn.execute(text("UPDATE subscriber SET balance = balance + 1"))
    bad = run("ledger", "check")
    assert bad.exit_code == 1
    assert USER in bad.stderr and "cached 11" in bad.stderr and "ledger 10" in bad.stderr
    data = json.loads(run("ledger", "check", "--json").stdout)
    assert data["ok"] is False and data["mismatches"][0]["openid"] == USER


# --------------------------------------------------------------------------- configuration


def test_config_option_after_the_command_and_from_env(config: Path, reader: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    after = runner.invoke(app, ["user", "show", USER, "--json", "--config", str(config)])
    assert after.exit_code == 0, after.output
    monkeypatch.setenv("NEWSBOT_CONFIG", str(config))
    assert runner.invoke(app, ["user", "show", USER, "--json"]).exit_code == 0


def test_serve_refuses_placeholder_secrets(tmp_path: Path, db_url: str) -> None:
    cfg = write_config(tmp_path / "placeholder.toml", db_url, token="CHANGE-ME-wechat-token")
    result = CliRunner().invoke(app, ["serve", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "[wechat] token" in result.stderr and "placeholder" in result.stderr


def test_serve_refuses_missing_secret(tmp_path: Path, db_url: str) -> None:
    cfg = tmp_path / "nosecret.toml"
    cfg.write_text(f'[wechat]\ntoken = "t"\n[database]\nurl = "{db_url}"\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["serve", "--config", str(cfg)])
    assert result.exit_code == 2 and "[reader] secret" in result.stderr


@pytest.mark.parametrize(
    ("extra", "named"),
    [("[server]\nprot = 8080\n", "[server] prot"),
     ("[server]\nport = \"eighty\"\n", "[server] port"),
     ("[tokens]\nmax_topup = -1\n", "[tokens] max_topup")],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, db_url: str, extra: str,
                                           named: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[database]\nurl = "{db_url}"\n{extra}', encoding="utf-8")
    for args in (["issue", "list"], ["serve"], ["ledger", "check"]):
        result = CliRunner().invoke(app, ["--config", str(cfg), *args])
        assert result.exit_code == 2, (args, result.output)
        assert named in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--config", str(tmp_path / "nope.toml"), "issue", "list"])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_chat_without_token_exits_2() -> None:
    result = CliRunner().invoke(app, ["chat", "--url", "http://127.0.0.1:9/wechat"])
    assert result.exit_code == 2 and "token" in result.stderr


def test_chat_reports_unreachable_server() -> None:
    result = CliRunner().invoke(app, ["chat", "--url", "http://127.0.0.1:9/wechat", "--token",
                                      "t"], input="本周\n")
    assert result.exit_code == 1
    assert "cannot connect" in result.stderr


def test_json_logs_one_object_per_line() -> None:
    import io
    import logging

    from bot.logs import setup_logging

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    stream = io.StringIO()
    setup_logging("INFO", "json", stream=stream)
    try:
        logging.getLogger("newsbot.test").info("hello %s", "world")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("newsbot.test").exception("failed")
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert {"ts", "level", "logger", "msg"} <= set(first)
    assert first["msg"] == "hello world" and first["level"] == "INFO"
    assert second["logger"] == "newsbot.test" and "ValueError: boom" in second["exc"]
