"""The operator's weekly cycle from the CLI against the fake WeChat API, including a broadcast
process killed with SIGKILL in the middle and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from bot.wechat.fake import FakeWeChat
from storage import subscribers
from storage.db import transaction
from tests.conftest import ROOT, SAMPLE_DRAFT, SAMPLE_ISSUE, TOKEN

MASS_SEND = "/cgi-bin/message/mass/send"


@pytest.fixture
def fake() -> Iterator[FakeWeChat]:
    with FakeWeChat(app_id="wx_cli", app_secret="cli-secret") as f:
        yield f


@pytest.fixture
def config(tmp_path: Path, fake: FakeWeChat, db_url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""
[wechat]
token = "{TOKEN}"
app_id = "wx_cli"
app_secret = "cli-secret"
api_base = "{fake.base_url}"
[reader]
secret = "cli-reader-secret-0123456789"
[database]
url = "{db_url}"
[broadcast]
mode = "openids"
batch_size = 1000
preview_openids = ["o_editor"]
""", encoding="utf-8")
    return path


def newsbot(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "bot.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def seed(engine: Engine, fake: FakeWeChat, count: int) -> list[str]:
    openids = [f"o_cli_{i:06d}" for i in range(count)]
    with transaction(engine) as s:
        subscribers.add_followers(s, openids=openids)
    fake.followers = openids
    return openids


@pytest.fixture
def db(engine: Engine) -> Engine:
    return engine  # the current schema, stamped, so the CLI subprocesses accept it


def test_weekly_cycle_from_the_cli(config: Path, fake: FakeWeChat, db: Engine) -> None:
    newsbot(config, "issue", "import", str(SAMPLE_ISSUE), str(SAMPLE_DRAFT))
    fake.followers = [f"o_f{i}" for i in range(2499)] + ["o_editor"]
    synced = json.loads(newsbot(config, "users", "sync", "--json").stdout)
    assert synced == {"pages": 1, "followers": 2500, "new": 2500, "active": 2500}

    dry = newsbot(config, "broadcast", "2", "--dry-run").stdout
    assert "2500 active subscribers in 3 batch" in dry and "nothing was sent" in dry
    assert fake.mass_sends == []
    refused = newsbot(config, "broadcast", "2", check=False)
    assert refused.returncode == 2 and "not published yet" in refused.stderr

    newsbot(config, "issue", "publish", "2")
    newsbot(config, "broadcast", "2", "--preview")
    assert [p[0] for p in fake.previews] == ["o_editor"]
    out = newsbot(config, "broadcast", "2").stdout
    assert "done: 3 batches, 2500 recipients" in out
    assert set(fake.deliveries.values()) == {1} and len(fake.deliveries) == 2500

    again = newsbot(config, "broadcast", "2", check=False)
    assert again.returncode == 2 and "already broadcast" in again.stderr
    status = json.loads(newsbot(config, "broadcast", "status", "2", "--json").stdout)
    assert status["status"] == "done" and [b["recipients"] for b in status["batches"]] == [
        1000, 1000, 500]


def test_cli_mistakes_exit_2(config: Path) -> None:
    for args in (["broadcast", "abc"], ["broadcast", "resume"], ["broadcast", "9"]):
        proc = newsbot(config, *args, check=False)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.strip()


def wait_until_dead(pid: int) -> None:
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if stat.read_text().split(") ", 1)[1].startswith(("Z", "X")):
                return
        except (FileNotFoundError, IndexError):
            return
        time.sleep(0.005)


@pytest.mark.parametrize("kill_at", [2, 4])
def test_sigkill_mid_broadcast_then_resume_sends_each_subscriber_exactly_once(
        config: Path, fake: FakeWeChat, db: Engine, kill_at: int) -> None:
    """The broadcast process is SIGKILLed right after WeChat accepted batch ``kill_at`` and
    before the process heard of it; `broadcast resume` must neither resend nor skip anyone."""
    newsbot(config, "issue", "import", str(SAMPLE_ISSUE))
    openids = seed(db, fake, 5500)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "broadcast", "1", "--config",
                             str(config)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed = threading.Event()
    accepted = {"n": 0}

    def kill_after_accept(path: str, payload: dict[str, Any]) -> None:
        if path == MASS_SEND and payload.get("errcode", 0) == 0:
            accepted["n"] += 1
            if accepted["n"] == kill_at:
                proc.send_signal(signal.SIGKILL)
                wait_until_dead(proc.pid)  # before the fake writes its answer
                killed.set()

    fake.before_reply = kill_after_accept
    try:
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed.wait(10) and proc.returncode == -signal.SIGKILL
    fake.before_reply = None
    assert len(fake.mass_sends) == kill_at

    status = json.loads(newsbot(config, "broadcast", "status", "1", "--json").stdout)
    assert status["status"] == "sending"
    assert status["batches_sent"] == kill_at - 1  # the last accepted batch was never confirmed

    newsbot(config, "broadcast", "resume", "1")
    assert set(fake.deliveries) == set(openids)  # nobody skipped
    assert set(fake.deliveries.values()) == {1}  # nobody twice
    status = json.loads(newsbot(config, "broadcast", "status", "1", "--json").stdout)
    assert status["status"] == "done" and status["recipients"] == 5500
    replayed = [b for b in status["batches"] if b["already_sent"]]
    assert [b["seq"] for b in replayed] == [kill_at]
