"""``/healthz`` answers 503 when the database cannot take a write (it said ok while a full disk
or a read-only database failed every webhook), through the real app and engine: a database
that refuses writes (SQLite query_only, PostgreSQL default_transaction_read_only) and a SQLite
database that cannot grow (max_page_count: SQLite's own SQLITE_FULL path, as on a full disk)."""

from __future__ import annotations

import sqlite3
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url

from bot.app import create_app
from bot.settings import Settings
from handlers.errors import BUSY
from storage.db import make_engine
from storage.models import InboundMessage
from tests.conftest import ON_POSTGRES, WeChatUser, client_for
from tests.test_hostile_input import READER, count

# --- 3. health means "can take a write" ------------------------------------------------------

def test_healthz_ok_leaves_nothing_behind(http: httpx.Client, engine: Engine) -> None:
    for _ in range(3):
        resp = http.get("/healthz")
        assert resp.status_code == 200 and resp.json() == {"status": "ok", "database": "ok"}
    assert count(engine, InboundMessage) == 0
    assert resp.headers["cache-control"] == "no-store"


def _read_only_engine(db_url: str) -> Engine:
    """The same database, but it refuses every write: SQLite's query_only on each connection,
    PostgreSQL's default_transaction_read_only (the server itself says no, as on a standby or
    a database an operator made read-only)."""
    if not ON_POSTGRES:
        eng = make_engine(db_url)

        @event.listens_for(eng, "connect")
        def _read_only(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute("PRAGMA query_only=1")

        return eng
    url = make_url(db_url)
    options = f"{url.query.get('options', '')} -c default_transaction_read_only=on".strip()
    return make_engine(url.update_query_dict({"options": options}).render_as_string(
        hide_password=False))


@pytest.mark.usefixtures("sample")
def test_healthz_503_when_the_database_is_read_only(
        settings: Settings, engine: Engine, db_url: str,
        captured: pytest.LogCaptureFixture) -> None:
    ro = _read_only_engine(db_url)
    try:
        with client_for(create_app(settings, ro)) as c:
            resp = c.get("/healthz")
            assert resp.status_code == 503
            assert resp.json() == {"status": "unavailable", "database": "cannot write"}
            # …which is the truth: a delivery cannot be stored either.
            user = WeChatUser(c, READER)
            failed = user.post_xml(user.text_xml("兑换"))
            assert failed.status_code == 200 and BUSY in failed.text
    finally:
        ro.dispose()
    [warning] = [r for r in captured.records
                 if r.name == "newsbot.app" and r.getMessage().startswith("health check")]
    assert "read" in warning.getMessage().lower()  # the database's own words: read-only
    assert count(engine, InboundMessage) == 0


@pytest.mark.skipif(ON_POSTGRES, reason="SQLite's max_page_count; PostgreSQL has no equivalent")
@pytest.mark.usefixtures("sample")
def test_healthz_503_when_the_sqlite_database_is_full(
        settings: Settings, engine: Engine, captured: pytest.LogCaptureFixture) -> None:
    """A full disk, through SQLite's own code path for it (SQLITE_FULL): the database may not
    grow past the pages it has, as when the filesystem has no block left."""
    engine.dispose()

    @event.listens_for(engine, "connect")
    def _no_more_pages(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
        dbapi_conn.execute(f"PRAGMA max_page_count={pages}")

    with client_for(create_app(settings, engine)) as c:
        resp = c.get("/healthz")
        assert resp.status_code == 503
        assert resp.json()["database"] == "cannot write"
        user = WeChatUser(c, READER)
        # The first deliveries may still fit in free space of existing pages; the database
        # fills up well before 50 and from then on every delivery fails, as health said.
        replies = [user.post_xml(user.text_xml("兑换" + "长" * 600)).text for _ in range(50)]
        assert BUSY in replies[-1]
    assert any("full" in r.getMessage() for r in captured.records
               if r.getMessage().startswith("health check"))


