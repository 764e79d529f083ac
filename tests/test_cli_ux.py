"""What a new operator meets in the CLI: help that keeps `[section]` names, --version, a refusal
without a config, checks before the progress bar, times in the configured zone, counts in
agreement, a second demo refused in a busy folder and previews visible in the demo's chat."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer.main
from sqlalchemy import Engine
from typer.testing import CliRunner, Result

import bot
from bot.cli import app
from bot.cli import base as cli_base
from bot.wechat.fake import FakeWeChat
from storage import subscribers
from storage.db import transaction
from storage.ledger import credit
from tests.conftest import ROOT, SAMPLE_DRAFT, SAMPLE_ISSUE, TOKEN, child_env, free_port

READER_SECRET = "cli-ux-reader-secret-0123456789"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The developer's own NEWSBOT_* variables or ./config.toml must not leak into the tests.
    for name in list(os.environ):
        if name.startswith("NEWSBOT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def invoke(*args: str, **kwargs: Any) -> Result:
    return CliRunner().invoke(app, list(args), **kwargs)


def write_config(path: Path, db_url: str, extra: str = "") -> Path:
    path.write_text(f'[wechat]\ntoken = "{TOKEN}"\n[database]\nurl = "{db_url}"\n'
                    f'[reader]\nsecret = "{READER_SECRET}"\n{extra}', encoding="utf-8")
    return path


# --------------------------------------------------------------------------- help


def all_commands() -> list[tuple[list[str], Any]]:
    def walk(cmd: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def test_every_help_keeps_bracketed_names_and_shows_flags_bare() -> None:
    pages = {}
    flags = 0
    for path, cmd in all_commands():
        result = invoke(*path, "--help", env={"COLUMNS": "100"})
        assert result.exit_code == 0, (path, result.output)
        page = result.output
        assert "<bool>" not in page, (path, page)
        assert "[]" not in page and "[[N]]" not in page, (path, page)
        # A flag is its name, then its help: no value placeholder between them.
        for param in cmd.params:
            if getattr(param, "is_flag", False) and not param.hidden:
                flags += 1
                name = max(param.opts, key=len)
                assert re.search(rf"^\s+{name}( {{2,}}[A-Z]|$)", page, flags=re.M), (
                    path, name, page)
        pages[" ".join(path)] = page
    assert flags >= 10
    assert len(pages) > 20  # every group and command, not just the root
    assert "[[menu.buttons]]" in pages["menu sync"]
    assert "[server] host" in pages["serve"] and "[server] port" in pages["serve"]
    assert "[broadcast] preview_openids" in pages["broadcast"]
    assert "[wechat] token" in pages["chat"]
    assert re.search(r"^\s+--json\s{2,}Machine-readable output\.", pages["issue list"],
                     flags=re.M)
    assert "--version" in pages[""]


# --------------------------------------------------------------------------- --version


def test_version_prints_the_installed_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"newsbot {metadata.version('newsbot')}"
    assert metadata.version("newsbot") == bot.__version__  # pyproject reads it from bot/
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "--version"], capture_output=True,
                          text=True, env=child_env(), timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"newsbot {bot.__version__}"


def test_version_falls_back_to_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli_base.metadata, "version", not_installed)
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"newsbot {bot.__version__}"


# --------------------------------------------------------------------------- no config


@pytest.mark.parametrize("args", [
    ["issue", "list"], ["user", "list"], ["ledger", "check"], ["broadcast", "status"],
    ["db", "upgrade"], ["serve"], ["menu", "sync", "--dry-run"], ["users", "sync"],
    ["topup", "o_x", "5", "--reason", "r"], ["scheduler"], ["chat", "--url", "http://x/"],
], ids=" ".join)
def test_without_a_config_commands_refuse_and_create_nothing(tmp_path: Path,
                                                             args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    message = result.stderr
    assert "no config file found" in message
    assert "--config" in message and "$NEWSBOT_CONFIG" in message and "./config.toml" in message
    assert f"cp {ROOT / 'config.example.toml'} config.toml" in message  # a checkout: its path
    assert "newsbot demo" in message
    assert list(tmp_path.iterdir()) == []  # no newsbot.db, no lock file, nothing


def test_chat_names_its_own_way_without_a_config(tmp_path: Path) -> None:
    result = invoke("chat", "--url", "http://127.0.0.1:9/wechat")
    assert result.exit_code == 2 and "--url URL and --token TOKEN" in result.stderr
    # Both given: no config needed; the server being absent is the only complaint.
    result = invoke("chat", "--url", f"http://127.0.0.1:{free_port()}/wechat", "--token", "t",
                    input="本周\n")
    assert "no config" not in result.output
    assert result.exit_code == 1 and "is `newsbot serve` running there?" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_missing_config_named_by_the_environment(tmp_path: Path, db_url: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSBOT_CONFIG", str(tmp_path / "nope.toml"))
    result = invoke("issue", "list")
    assert result.exit_code == 2
    assert f"{tmp_path / 'nope.toml'} (from $NEWSBOT_CONFIG) does not exist" in result.stderr
    assert list(tmp_path.iterdir()) == []
    # The environment route itself works.
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    monkeypatch.setenv("NEWSBOT_CONFIG", str(write_config(elsewhere / "newsbot.toml", db_url)))
    result = invoke("issue", "list")
    assert result.exit_code == 0, result.output
    # So does ./config.toml in the working folder.
    monkeypatch.delenv("NEWSBOT_CONFIG")
    write_config(tmp_path / "config.toml", db_url)
    assert invoke("issue", "list").exit_code == 0


def test_help_and_version_need_no_config(tmp_path: Path) -> None:
    for args in (["--help"], ["--version"], ["issue", "list", "--help"], ["demo", "--help"]):
        assert invoke(*args).exit_code == 0, args
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- broadcasts


@pytest.fixture
def fake() -> Iterator[FakeWeChat]:
    with FakeWeChat(app_id="wx_ux", app_secret="ux-secret") as f:
        yield f


def bc_config(tmp_path: Path, db_url: str, fake: FakeWeChat, broadcast: str = "",
              mode: str = "openids") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""
[wechat]
token = "{TOKEN}"
app_id = "wx_ux"
app_secret = "ux-secret"
api_base = "{fake.base_url}"
[reader]
secret = "{READER_SECRET}"
[database]
url = "{db_url}"
[broadcast]
mode = "{mode}"
{broadcast}
""", encoding="utf-8")
    return path


def seed_followers(engine: Engine, fake: FakeWeChat, openids: list[str]) -> None:
    with transaction(engine) as s:
        subscribers.add_followers(s, openids=openids)
    fake.followers = openids


BAR = re.compile(r"[━─]{3}|\d+:\d\d:\d\d")  # a Rich bar or its elapsed-time column


@pytest.mark.parametrize(("args", "mode", "broadcast", "said"), [
    (["broadcast", "99"], "openids", "", "no issue 99"),
    (["broadcast", "2"], "openids", "", "not published yet"),
    (["broadcast", "resume", "1"], "openids", "", "has no broadcast to resume"),
    (["broadcast", "99", "--preview"], "openids", 'preview_openids = ["o_ux_1"]', "no issue 99"),
    (["broadcast", "1", "--preview"], "openids", "", "preview_openids is empty"),
    (["broadcast", "1"], "off", "", 'mode is "off"'),
], ids=["unknown", "draft", "resume-nothing", "preview-unknown", "preview-nobody", "mode-off"])
def test_broadcast_refuses_before_drawing_a_bar(tmp_path: Path, db_url: str, engine: Engine,
                                                fake: FakeWeChat, args: list[str], mode: str,
                                                broadcast: str, said: str) -> None:
    config = bc_config(tmp_path, db_url, fake, broadcast, mode)
    seed_followers(engine, fake, ["o_ux_1", "o_ux_2"])
    assert invoke("--config", str(config), "issue", "import", str(SAMPLE_ISSUE),
                  str(SAMPLE_DRAFT)).exit_code == 0
    result = invoke("--config", str(config), *args)
    assert result.exit_code == 2, result.output
    assert said in result.stderr
    assert not BAR.search(result.output), result.output
    assert fake.mass_sends == [] and fake.previews == []


def test_broadcast_counts_and_times(tmp_path: Path, db_url: str, engine: Engine,
                                    fake: FakeWeChat) -> None:
    config = bc_config(tmp_path, db_url, fake)
    seed_followers(engine, fake, ["o_ux_1", "o_ux_2"])
    run = CliRunner(env={"COLUMNS": "200"})

    def cli(*args: str) -> Result:
        return run.invoke(app, ["--config", str(config), *args])

    assert cli("issue", "import", str(SAMPLE_ISSUE)).exit_code == 0
    dry = cli("broadcast", "1", "--dry-run")
    assert "2 active subscribers in 1 batch of up to" in dry.stdout, dry.stdout
    done = cli("broadcast", "1")
    assert done.exit_code == 0, done.output
    assert "done: 1 batch, 2 recipients confirmed" in done.stdout
    again = cli("broadcast", "1")
    assert again.exit_code == 2 and "1 batch, 2 recipients" in again.stderr
    assert "(Asia/Shanghai)" in again.stderr and "UTC" not in again.stderr
    status = cli("broadcast", "status")
    assert "1 batch;" in status.stdout and "1 batches" not in status.stdout
    assert "(Asia/Shanghai)" in status.stdout and "UTC" not in status.stdout
    data = json.loads(cli("broadcast", "status", "1", "--json").stdout)
    assert data["started_at"].endswith("+08:00") and data["finished_at"].endswith("+08:00")
    assert all(b["sent_at"].endswith("+08:00") for b in data["batches"])


def test_times_are_in_the_configured_zone(tmp_path: Path, db_url: str, engine: Engine) -> None:
    # New York in December: UTC-5, distinct from both UTC and the default Asia/Shanghai.
    config = write_config(tmp_path / "config.toml", db_url,
                          '[broadcast]\ntimezone = "America/New_York"\n')
    run = CliRunner(env={"COLUMNS": "200"})

    def cli(*args: str) -> Result:
        result = run.invoke(app, ["--config", str(config), *args])
        assert result.exit_code == 0, (args, result.output)
        return result

    cli("issue", "import", str(SAMPLE_ISSUE), str(SAMPLE_DRAFT))
    with transaction(engine) as s:
        subscribers.ensure_subscriber(s, openid="o_ux_1")
        credit(s, openid="o_ux_1", amount=5, kind="topup", key="cli:ux", reason="r",
               operator="t")
    published = json.loads(cli("issue", "show", "1", "--json").stdout)["published"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d-0[45]:00", published), published
    assert all(i["published"] is None or i["published"][-6:] in ("-05:00", "-04:00")
               for i in json.loads(cli("issue", "list", "--json").stdout))
    user = json.loads(cli("user", "show", "o_ux_1", "--json").stdout)
    assert user["created_at"].endswith(("-05:00", "-04:00"))
    assert all(e["created_at"].endswith(("-05:00", "-04:00")) for e in user["entries"])

    zone = "(America/New_York)"
    assert zone in cli("issue", "show", "1").stdout
    assert zone in cli("issue", "list").stdout
    assert zone in cli("user", "list").stdout
    assert zone in cli("user", "show", "o_ux_1").stdout
    published_now = cli("issue", "publish", "2").stdout
    assert re.search(r"at \d{4}-\d\d-\d\d \d\d:\d\d \(America/New_York\)", published_now)
    replay = cli("topup", "o_ux_1", "5", "--reason", "r", "--key", "cli:ux")
    assert "already applied" in replay.stdout and zone in replay.stdout
    assert "+00:00" not in replay.stdout


# --------------------------------------------------------------------------- the demo


def newsbot(*args: str) -> list[str]:
    return [sys.executable, "-m", "bot.cli", *args]


def start_demo(tmp_path: Path, workdir: Path, name: str) -> tuple[subprocess.Popen[bytes], Path,
                                                                  int]:
    port = free_port()
    log = tmp_path / f"{name}.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            newsbot("demo", "--no-chat", "--port", str(port), "--dir", str(workdir)),
            cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log, port


def wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"demo exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        with suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"no /healthz within 30 s:\n{log.read_text(errors='replace')}")


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=15)


def wait_for(log: Path, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(encoding="utf-8", errors="replace")
        if text in content:
            return content
        time.sleep(0.1)
    pytest.fail(f"{text!r} not in the demo's output:\n{content}")


def test_a_second_demo_in_a_busy_folder_is_refused(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    first, first_log, port = start_demo(tmp_path, workdir, "first")
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_healthy(first, port, first_log)
        config_before = (workdir / "config.toml").read_bytes()
        db_before = (workdir / "newsbot.db").stat().st_ino

        # Its own session, so a demo that wrongly starts can be stopped with all it started.
        refused, refused_log, _ = start_demo(tmp_path, workdir, "refused")
        try:
            code = refused.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            kill_group(refused)
        said = " ".join(refused_log.read_text(encoding="utf-8", errors="replace").split())
        assert code == 2, said
        assert f"a demo is already running in {workdir} (pid {first.pid}" in said
        assert f"http://127.0.0.1:{port}/wechat" in said
        assert "newsbot demo --dir" in said and "Ctrl-C" in said
        # The running demo keeps its config, database and port.
        assert (workdir / "config.toml").read_bytes() == config_before
        assert (workdir / "newsbot.db").stat().st_ino == db_before
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200

        # A demo killed outright leaves no stale lock: the kernel released it.
        kill_group(first)
        second, second_log, second_port = start_demo(tmp_path, workdir, "second")
        wait_healthy(second, second_port, second_log)
        assert (workdir / "config.toml").read_bytes() != config_before  # a fresh demo
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        kill_group(first)
        if second is not None:
            kill_group(second)


def test_a_preview_shows_in_the_demo_chat(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc, log, port = start_demo(tmp_path, workdir, "demo")
    try:
        wait_healthy(proc, port, log)
        config = workdir / "config.toml"
        result = subprocess.run(newsbot("--config", str(config), "broadcast", "2", "--preview"),
                                env=child_env(), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "preview of issue 2 sent to o_demo_operator" in result.stdout
        shown = wait_for(log, "preview pushed to o_demo_operator only")
        assert "回复" in shown.split("preview pushed to o_demo_operator only", 1)[1]
    finally:
        kill_group(proc)
