"""Every command's failure modes exit with the code that README's "CLI reference" table and the
``bot.cli`` docstring give them: each case names the phrase of that table it is an example of,
and the test checks the phrase is in both documents' row for the code it got. An exit 2 also
leaves every table exactly as it was."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, text
from typer.testing import CliRunner

import bot.cli
from bot.cli import app
from bot.wechat.fake import FakeWeChat
from storage.db import transaction
from storage.ledger import credit
from storage.subscribers import ensure_subscriber
from tests.conftest import ROOT, SAMPLE_ISSUE, TOKEN

USER = "o_exit_reader"
SECRET = 'secret = "exit-test-reader-secret-0123456789"'


def _squash(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def readme_rows() -> dict[int, str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## CLI reference", 1)[1].split("\n## ", 1)[0]
    return {int(m.group(1)): _squash(m.group(2))
            for m in re.finditer(r"^\| ([012]) \| (.+) \|$", section, re.M)}


def docstring_rows() -> dict[int, str]:
    doc = _squash(bot.cli.__doc__ or "")
    one = doc.index(" 1 the command ran")
    two = doc.index(" 2 the request")
    return {0: doc[:one], 1: doc[one:two], 2: doc[two:]}


@dataclass
class Env:
    tmp: Path
    db_url: str
    engine: Engine
    fake: FakeWeChat

    def config(self, extra: str = "", *, db_url: str | None = None,
               wechat: str = "") -> Path:
        path = self.tmp / "config.toml"
        path.write_text(f'[wechat]\ntoken = "{TOKEN}"\n{wechat}\n[database]\n'
                        f'url = "{db_url or self.db_url}"\n[reader]\n{SECRET}\n{extra}',
                        encoding="utf-8")
        return path

    def api(self, secret: str = "exit-secret") -> str:
        return (f'app_id = "wx_exit"\napp_secret = "{secret}"\n'
                f'api_base = "{self.fake.base_url}"\n')

    def user(self, balance: int = 0) -> None:
        with transaction(self.engine) as s:
            ensure_subscriber(s, openid=USER)
            if balance:
                credit(s, openid=USER, amount=balance, kind="topup", key="exit:seed",
                       reason="seed", operator="test")

    def issue(self) -> None:
        CliRunner().invoke(app, ["--config", str(self.config()), "issue", "import",
                                 str(SAMPLE_ISSUE)])


Setup = Callable[[Env], list[str]]


def _sold_change(env: Env) -> list[str]:
    env.issue()
    env.user(balance=200)
    from storage.ledger import redeem

    with transaction(env.engine) as s:
        redeem(s, openid=USER, issue_number=1, price=99, key="exit:redeem")
    changed = env.tmp / "issue.md"
    changed.write_text(SAMPLE_ISSUE.read_text(encoding="utf-8").replace("price = 99",
                                                                        "price = 9"),
                       encoding="utf-8")
    return ["--config", str(env.config()), "issue", "import", str(changed)]


def _bad_issue(env: Env) -> list[str]:
    bad = env.tmp / "bad.md"
    bad.write_text("+++\nnumber = 1\n+++\n", encoding="utf-8")
    return ["--config", str(env.config()), "issue", "import", str(SAMPLE_ISSUE), str(bad)]


def _ledger_mismatch(env: Env) -> list[str]:
    env.user(balance=10)
    with env.engine.begin() as conn:
        conn.execute(text("UPDATE subscriber SET balance = balance + 1"))
    return ["--config", str(env.config()), "ledger", "check"]


def _reused_key(env: Env) -> list[str]:
    env.user()
    cfg = str(env.config("[tokens]\nmax_topup = 100\n"))
    CliRunner().invoke(app, ["--config", cfg, "topup", USER, "5", "--reason", "r",
                             "--key", "k-1"])
    return ["--config", cfg, "topup", USER, "6", "--reason", "r", "--key", "k-1"]


def _unreachable_db(env: Env) -> list[str]:
    blocker = env.tmp / "not-a-folder"
    blocker.write_text("x", encoding="utf-8")
    url = f"sqlite:///{blocker}/newsbot.db"
    return ["--config", str(env.config(db_url=url)), "db", "upgrade"]


def _stale_schema(env: Env) -> list[str]:
    url = f"sqlite:///{env.tmp}/empty.db"
    return ["--config", str(env.config(db_url=url)), "serve"]


def _bad_config(command: list[str]) -> Setup:
    def setup(env: Env) -> list[str]:
        return ["--config", str(env.config("[server]\nprot = 1\n")), *command]
    return setup


def _cmd(*args: str, extra: str = "", api: bool = False, secret: str = "exit-secret",
         before: Callable[[Env], None] | None = None) -> Setup:
    def setup(env: Env) -> list[str]:
        if before is not None:
            before(env)
        cfg = env.config(extra, wechat=env.api(secret) if api else "")
        return ["--config", str(cfg), *args]
    return setup


def _no_secret(*args: str) -> Setup:
    def setup(env: Env) -> list[str]:
        path = env.tmp / "nosecret.toml"
        path.write_text(f'[database]\nurl = "{env.db_url}"\n[broadcast]\nmode = "sendall"\n',
                        encoding="utf-8")
        return ["--config", str(path), *args]
    return setup


def _demo_dir_is_a_file(env: Env) -> list[str]:
    target = env.tmp / "a-file"
    target.write_text("x", encoding="utf-8")
    return ["demo", "--dir", str(target), "--no-chat"]


SENDALL = '[broadcast]\nmode = "sendall"\n'
# (command, failure, exit code, the phrase of the README/docstring row it exemplifies)
CASES: list[tuple[str, Setup, int, str]] = [
    ("db upgrade: database folder missing", _unreachable_db, 1, "could not be reached"),
    ("db upgrade: bad config", _bad_config(["db", "upgrade"]), 2, "bad configuration"),
    ("serve: no secrets", _no_secret("serve"), 2, "missing secrets"),
    ("serve: empty database", _stale_schema, 2, "a schema that needs db upgrade"),
    ("demo: --dir is a file", _demo_dir_is_a_file, 2, "a wrong argument or option"),
    ("chat: no token", lambda env: ["chat", "--url", "http://127.0.0.1:9/wechat"], 2,
     "missing secrets"),
    ("chat: server down", lambda env: ["chat", "--url", "http://127.0.0.1:9/wechat",
                                       "--token", "t"], 1, "could not be reached"),
    ("issue import: bad file", _bad_issue, 2, "a bad issue file"),
    ("issue import: sold issue", _sold_change, 2, "a change to a sold issue without --force"),
    ("issue list: bad config", _bad_config(["issue", "list"]), 2, "bad configuration"),
    ("issue list: unknown option", _cmd("issue", "list", "--colour"), 2,
     "a wrong argument or option"),
    ("issue show: unknown", _cmd("issue", "show", "99"), 1, "a look-up found nothing"),
    ("issue publish: unknown", _cmd("issue", "publish", "99"), 2,
     "an unknown issue to publish or broadcast"),
    ("user list: bad limit", _cmd("user", "list", "--limit", "0"), 2,
     "a wrong argument or option"),
    ("user show: unknown", _cmd("user", "show", "o_nobody"), 1, "a look-up found nothing"),
    ("topup: bad amount", _cmd("topup", USER, "1.5", "--reason", "r",
                               before=lambda env: env.user()), 2, "a bad amount"),
    ("topup: unknown subscriber", _cmd("topup", "o_nobody", "5", "--reason", "r"), 2,
     "an unknown subscriber"),
    ("topup: reused key", _reused_key, 2, "a reused idempotency key"),
    ("adjust: below zero", _cmd("adjust", USER, "-5", "--reason", "r",
                                before=lambda env: env.user()), 2, "a bad amount"),
    ("ledger check: mismatch", _ledger_mismatch, 1, "ledger check found differences"),
    ("revenue: bad --since", _cmd("revenue", "--since", "last week"), 2,
     "a wrong argument or option"),
    ("broadcast: unknown issue", _cmd("broadcast", "99", "--dry-run"), 2,
     "an unknown issue to publish or broadcast"),
    ("broadcast: guard", _cmd("broadcast", "1", api=True, before=Env.issue), 2,
     "a broadcast guard"),
    ("broadcast: WeChat refuses", _cmd("broadcast", "1", extra=SENDALL, api=True,
                                       secret="wrong", before=Env.issue),
     1, "WeChat could not be reached or refused a call"),
    ("broadcast status: never sent", _cmd("broadcast", "status", "1"), 1,
     "a look-up found nothing"),
    ("broadcast resume: no N", _cmd("broadcast", "resume"), 2, "a wrong argument or option"),
    ("scheduler: no app secret", _no_secret("scheduler"), 2, "missing secrets"),
    ("users sync: no app secret", _no_secret("users", "sync"), 2, "missing secrets"),
    ("users sync: WeChat refuses", _cmd("users", "sync", api=True, secret="wrong"), 1,
     "refused a call"),
    ("menu sync: no buttons", _cmd("menu", "sync", api=True), 2, "bad configuration"),
    ("menu sync: WeChat refuses", _cmd("menu", "sync", api=True, secret="wrong",
                                       extra='[[menu.buttons]]\nname = "本周"\n'
                                             'type = "click"\nkey = "LATEST"\n'), 1,
     "refused a call"),
]


@pytest.fixture
def env(tmp_path: Path, db_url: str, engine: Engine,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    import os

    for name in list(os.environ):
        if name.startswith("NEWSBOT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    with FakeWeChat(app_id="wx_exit", app_secret="exit-secret") as fake:
        yield Env(tmp_path, db_url, engine, fake)


def snapshot(engine: Engine) -> dict[str, list[tuple[object, ...]]]:
    names = sorted(inspect(engine).get_table_names())
    with engine.connect() as conn:
        return {n: sorted(map(tuple, conn.execute(text(f'SELECT * FROM "{n}"'))), key=repr)
                for n in names}


def test_every_documented_code_has_one_row_in_both_documents() -> None:
    assert set(readme_rows()) == {0, 1, 2}
    assert "done" in readme_rows()[0] and "done" in docstring_rows()[0]
    for code in (1, 2):
        assert readme_rows()[code] and docstring_rows()[code]
    assert "nothing was written" in readme_rows()[2] and "nothing was written" in \
        docstring_rows()[2]


@pytest.mark.parametrize(("setup", "code", "phrase"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_failure_exits_with_the_documented_code(env: Env, setup: Setup, code: int,
                                                phrase: str) -> None:
    args = setup(env)
    before = snapshot(env.engine)
    result = CliRunner().invoke(app, args, input="本周\n/quit\n")  # stdin for `chat`
    assert result.exit_code == code, (args, result.output)
    assert result.output.strip(), "a failure says what went wrong"
    assert phrase in readme_rows()[code], (phrase, code)
    assert phrase in docstring_rows()[code], (phrase, code)
    if code == 2:
        assert snapshot(env.engine) == before, "exit 2 must write nothing"
