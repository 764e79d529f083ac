"""`newsbot console-link` and `newsbot audit` through the real CLI; the link it prints opens the
console on the real WSGI app."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner, Result

from bot.app import create_app
from bot.cli import app as cli_app
from bot.settings import Settings
from storage import console as store
from storage.db import transaction
from tests.conftest import OPERATOR, client_for, make_settings
from tests.test_money_cli import write_config

OTHER_OPERATOR = "o_operator_0002"


@pytest.fixture
def config(tmp_path: Path, engine: Engine) -> Path:
    path = write_config(tmp_path, engine)
    text = path.read_text(encoding="utf-8").replace(
        f'openids = ["{OPERATOR}"]', f'openids = ["{OPERATOR}", "{OTHER_OPERATOR}"]')
    path.write_text(text + '[server]\npublic_url = "http://testserver"\n', encoding="utf-8")
    return path


@pytest.fixture
def settings() -> Settings:  # the app's settings must sign like the config file
    return make_settings(reader={"secret": "test-reader-secret-0123"},
                         operators={"openids": [OPERATOR, OTHER_OPERATOR]})


def cli(config: Path, *args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(cli_app, [*args, "--config", str(config)])


def test_console_link_prints_a_link_that_opens_the_console(
        config: Path, settings: Settings, engine: Engine) -> None:
    result = cli(config, "console-link", OPERATOR)
    assert result.exit_code == 0, result.output
    link = result.stdout.split()[0]
    assert link.startswith("http://testserver/console/open?")
    assert "Opens once, until" in result.stdout and "(Asia/Shanghai)" in result.stdout
    with client_for(create_app(settings, engine)) as client:
        opened = client.get(link.removeprefix("http://testserver"))
        assert opened.status_code == 303, opened.text
        assert client.get("/console/").status_code == 200


def test_console_link_is_refused_for_anyone_not_an_operator(config: Path) -> None:
    result = cli(config, "console-link", "o_reader_0001")
    assert result.exit_code == 2
    assert "[operators] openids" in result.stderr
    assert "/console/open" not in result.output


def _actions(engine: Engine) -> None:
    with transaction(engine) as s:
        store.audit(s, operator=OPERATOR, action="topup", result="ok", target="o_a",
                    at=datetime(2026, 11, 20, 2, 0, tzinfo=UTC), detail={"amount": 5})
        store.audit(s, operator=OTHER_OPERATOR, action="publish", result="refused",
                    target="7", at=datetime(2026, 11, 30, 16, 30, tzinfo=UTC),
                    detail="[bold]not markup[/bold]")


def test_audit_lists_actions_newest_first_in_the_broadcast_timezone(
        config: Path, engine: Engine) -> None:
    _actions(engine)
    result = cli(config, "audit")
    assert result.exit_code == 0, result.output
    assert "Asia/Shanghai" in result.stdout
    assert result.stdout.index("publish") < result.stdout.index("topup")
    assert "2026-12-01 00:30:00" in result.stdout  # 16:30 UTC, the next day in Shanghai
    assert "[bold]not markup[/bold]" in result.stdout

    data = json.loads(cli(config, "audit", "--json").stdout)
    assert [a["action"] for a in data] == ["publish", "topup"]
    assert data[0] == {"at": "2026-12-01T00:30:00+08:00", "operator": OTHER_OPERATOR,
                       "action": "publish", "target": "7", "result": "refused",
                       "detail": "[bold]not markup[/bold]"}
    assert json.loads(data[1]["detail"]) == {"amount": 5}


def test_audit_filters(config: Path, engine: Engine) -> None:
    _actions(engine)

    def actions(*args: str) -> list[str]:
        result = cli(config, "audit", "--json", *args)
        assert result.exit_code == 0, result.output
        return [a["action"] for a in json.loads(result.stdout)]

    assert actions("--limit", "1") == ["publish"]
    assert actions("--since", "2026-12-01") == ["publish"]  # a day in Asia/Shanghai
    assert actions("--since", "2026-12-02") == []
    assert actions("--operator", OPERATOR) == ["topup"]
    assert "No console actions" in cli(config, "audit", "--since", "2027-01-01").stdout


@pytest.mark.parametrize("args", [("--since", "yesterday"), ("--limit", "0"),
                                  ("--limit", "x")])
def test_audit_refuses_bad_options(config: Path, args: tuple[str, ...]) -> None:
    result = cli(config, "audit", *args)
    assert result.exit_code == 2
    assert result.stdout == ""
