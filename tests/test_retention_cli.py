"""The purge around storage.retention: the webhook's stored replies capped in size, a replayed
delivery still answered once after a purge, `newsbot db purge` and the scheduled job."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, insert, select
from typer.testing import CliRunner

from bot.app import create_app
from bot.cli import app as cli_app
from bot.jobs.purge import policy_for, run_purge
from bot.jobs.scheduler import PURGE_JOB_ID, WeeklyScheduler
from bot.wechat.webhook import reply_from_json, reply_to_json
from handlers.router import News, Text
from storage.db import transaction
from storage.models import InboundMessage, utcnow
from tests.conftest import WeChatUser, make_settings
from tests.test_cli import write_config

READER = "o_reader_0001"


def stored(engine: Engine) -> list[tuple[int, str]]:
    with transaction(engine) as s:
        rows = s.connection().execute(
            select(InboundMessage.id, InboundMessage.reply_json).order_by(InboundMessage.id))
        return [(int(i), str(r)) for i, r in rows]


# --- the stored reply's cap ---------------------------------------------------------------------

@pytest.mark.parametrize("text", ["本周内容" * 400, '"\\\n' * 900, "a😀" * 500])
def test_a_stored_text_is_cut_to_the_cap_on_a_character_boundary(text: str) -> None:
    raw = reply_to_json(Text(text), 512)
    assert len(raw.encode("utf-8")) <= 512
    back = reply_from_json(raw)
    assert isinstance(back, Text) and text.startswith(back.content)
    assert len(raw.encode("utf-8")) > 440  # cut to about the cap, not to nothing
    assert reply_to_json(Text("短")) == reply_to_json(Text("短"), 512)


def test_a_stored_news_keeps_its_link_and_cuts_its_description() -> None:
    news = News("第 1 期", "摘要" * 1000, "http://x/r/1?sig=abc", "")
    back = reply_from_json(reply_to_json(news, 600))
    assert isinstance(back, News)
    assert back.url == news.url and back.title == news.title
    assert news.description.startswith(back.description) and back.description


def test_the_webhook_sends_the_whole_reply_and_stores_it_capped(engine: Engine,
                                                               sample: int) -> None:
    settings = make_settings(retention={"reply_max_bytes": 512})
    with httpx.Client(transport=httpx.WSGITransport(app=create_app(settings, engine)),
                      base_url="http://testserver") as http:
        user = WeChatUser(http, READER)
        first = user.send("本周", msg_id=7001)  # the write path (a new subscriber)
        second = user.send("本周", msg_id=7002)  # the fast path
    for reply in (first, second):
        assert len(reply["content"].encode("utf-8")) > 512
    rows = stored(engine)
    assert len(rows) == 2
    for (_id, raw), reply in zip(rows, (first, second), strict=True):
        assert len(raw.encode("utf-8")) <= 512
        assert reply["content"].startswith(json.loads(raw)["content"])


# --- a purge never lets a delivery run twice -----------------------------------------------------

def test_a_delivery_replayed_after_a_purge_is_still_answered_once(engine: Engine) -> None:
    """With two hours of accepted clock skew a signed delivery can come back hours later; the
    purge keeps its stored reply for that long even though replies_hours is 1."""
    settings = make_settings(server={"max_clock_skew_s": 7200},
                             retention={"replies_hours": 1})
    with httpx.Client(transport=httpx.WSGITransport(app=create_app(settings, engine)),
                      base_url="http://testserver") as http:
        user = WeChatUser(http, READER)
        user.send("余额", msg_id=8001)
        before = stored(engine)
        deleted = run_purge(settings, engine, now=utcnow() + timedelta(minutes=90))
        assert deleted["inbound_message"] == 0
        user.send("余额", msg_id=8001)
    assert stored(engine) == before  # the same claim answered it: the handler did not run


# --- the scheduled job and the CLI ---------------------------------------------------------------

def test_the_scheduler_runs_the_purge_every_purge_every_minutes(engine: Engine) -> None:
    settings = make_settings(retention={"purge_every_minutes": 7})
    sched = WeeklyScheduler(settings, engine, messenger_factory=lambda: None)  # type: ignore[arg-type,return-value]
    job = sched.scheduler.get_job(PURGE_JOB_ID)
    assert job is not None and job.trigger.interval == timedelta(minutes=7)
    add_old(engine, 3)
    sched.run_purge()
    assert stored(engine) == []


def add_old(engine: Engine, n: int) -> None:
    with transaction(engine) as s:
        s.connection().execute(insert(InboundMessage.__table__), [  # type: ignore[attr-defined]
            {"dedupe_key": f"old{i}", "openid": READER, "status": "done", "reply_json": "{}",
             "created_at": utcnow() - timedelta(days=2)} for i in range(n)])


def test_db_purge_prints_rows_per_table_and_dry_run_deletes_nothing(
        engine: Engine, db_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", db_url, extra="[retention]\npurge_batch = 10\n")
    add_old(engine, 25)
    runner = CliRunner()
    dry = runner.invoke(cli_app, ["--config", str(config), "db", "purge", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "inbound_message" in dry.output and "25 rows would delete" in dry.output
    assert len(stored(engine)) == 25
    done = runner.invoke(cli_app, ["--config", str(config), "db", "purge", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output) == {"dry_run": False, "rows": {
        "inbound_message": 25, "code_failure": 0, "inbox_message": 0, "inbox_reply": 0,
        "console_session": 0}}
    assert stored(engine) == []
    again = runner.invoke(cli_app, ["--config", str(config), "db", "purge"])
    assert again.exit_code == 0 and "0 rows deleted" in again.output


def test_policy_for_reads_every_section() -> None:
    settings = make_settings(retention={"replies_hours": 5, "purge_batch": 50},
                             codes={"failure_window_minutes": 20}, inbox={"keep_days": 9},
                             console={"link_minutes": 3})
    p = policy_for(settings)
    assert (p.replies_hours, p.batch, p.failure_window_minutes, p.inbox_keep_days,
            p.console_link_minutes, p.max_clock_skew_s) == (5, 50, 20, 9, 3, 300)
