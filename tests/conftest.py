"""Shared fixtures: a fresh database per test, settings from a dict, and a client that posts
real signed WeChat XML through the real WSGI app.

The database is a SQLite file, or, with ``NEWSBOT_TEST_DATABASE_URL`` set (e.g.
``postgresql+psycopg://postgres@127.0.0.1:5432/newsbot_test``), a PostgreSQL schema of the
test's own in that database, dropped afterwards."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from bot.app import create_app
from bot.settings import Settings
from bot.wechat.webhook import sign
from storage.content import parse_issue_file
from storage.db import create_schema, make_engine, transaction
from storage.issues import publish_issue, upsert_issue
from storage.schema import stamp_head

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_ISSUE = ROOT / "bot" / "sample" / "issue-001.md"
SAMPLE_DRAFT = ROOT / "bot" / "sample" / "issue-002.md"
TOKEN = "test-wechat-token"
OPERATOR = "o_operator_0001"
CODES_SECRET = "test-codes-secret-0123456789"

# Read at import: test modules clear NEWSBOT_* from the environment before their tests run.
TEST_DATABASE_URL = os.environ.get("NEWSBOT_TEST_DATABASE_URL") or None
ON_POSTGRES = TEST_DATABASE_URL is not None


def make_settings(**sections: dict[str, Any] | list[dict[str, Any]]) -> Settings:
    data: dict[str, Any] = {
        "wechat": {"token": TOKEN},
        "reader": {"secret": "test-reader-secret-0123456789"},
        "server": {"public_url": "http://testserver"},
        "operators": {"openids": [OPERATOR]},
        "codes": {"secret": CODES_SECRET},
    }
    for name, table in sections.items():
        if isinstance(table, list):  # an array of tables: [[passes]]
            data[name] = table
        else:
            data.setdefault(name, {}).update(table)
    return Settings.model_validate(data)


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    """The PostgreSQL database of ``NEWSBOT_TEST_DATABASE_URL``, for creating and dropping
    schemas; tests that need PostgreSQL are skipped without it, and fail when it is set but
    unreachable."""
    if TEST_DATABASE_URL is None:
        pytest.skip("needs PostgreSQL: set NEWSBOT_TEST_DATABASE_URL")
    url = make_url(TEST_DATABASE_URL)
    if url.get_backend_name() != "postgresql":
        raise pytest.UsageError(f"NEWSBOT_TEST_DATABASE_URL is not PostgreSQL: {url!r}")
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")  # the driver the extras install
    eng = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text("SELECT 1"))
    yield eng
    eng.dispose()


@contextmanager
def postgres_schema(admin: Engine) -> Iterator[str]:
    """A new, empty schema; yields a URL whose connections, in this process and in any
    subprocess given the URL, use it (search_path). Afterwards the connections still open on it
    are closed and it is dropped with everything in it."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    app_name = f"newsbot-test-{name}"
    url = admin.url.update_query_dict({"options": f"-csearch_path={name}",
                                       "application_name": app_name})
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{name}"'))
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE application_name = :app AND pid <> pg_backend_pid()"),
                         {"app": app_name})
            conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))


@pytest.fixture
def pg_url(pg_admin: Engine) -> Iterator[str]:
    """An empty PostgreSQL schema of this test's own (skips without PostgreSQL)."""
    with postgres_schema(pg_admin) as url:
        yield url


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of this test's own: a SQLite file, or a PostgreSQL schema when
    NEWSBOT_TEST_DATABASE_URL is set."""
    if ON_POSTGRES:
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite:///{tmp_path}/newsbot.db"


@pytest.fixture
def sqlite_url(db_url: str, tmp_path: Path) -> str:
    """A SQLite file for tests that run on both databases whatever the suite's is."""
    return db_url if db_url.startswith("sqlite") else f"sqlite:///{tmp_path}/multiprocess.db"


@pytest.fixture
def postgres_url(db_url: str) -> Iterator[str]:
    """The suite's PostgreSQL database when it has one, else a fresh database of our own."""
    if db_url.startswith("postgresql"):
        yield db_url
        return
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                                autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL unreachable on 127.0.0.1:5432: {exc}")
    name = f"newsbot_mp_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """The database with the current schema. Made from the models, which is faster than running
    the migrations and identical (tests/test_migrations.py), and stamped with the head revision
    so that CLI commands and servers started on it accept it."""
    eng = make_engine(db_url)
    create_schema(eng)
    stamp_head(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def settings() -> Settings:
    return make_settings()


def import_issue(engine: Engine, path: Path, *, publish: bool = True) -> int:
    parsed = parse_issue_file(path, default_free_percent=10)
    with transaction(engine) as s:
        upsert_issue(s, parsed=parsed, default_free_percent=10)
        if publish:
            publish_issue(s, number=parsed.number)
    return parsed.number


@pytest.fixture
def sample(engine: Engine) -> int:
    return import_issue(engine, SAMPLE_ISSUE)


class WeChatUser:
    """Posts signed XML like WeChat's servers do and parses the reply."""

    def __init__(self, http: httpx.Client, openid: str, *, token: str = TOKEN,
                 path: str = "/wechat") -> None:
        self.http = http
        self.openid = openid
        self.token = token
        self.path = path

    def post_xml(self, xml: str, *, timestamp: int | None = None,
                 signature: str | None = None) -> httpx.Response:
        ts = str(timestamp if timestamp is not None else int(time.time()))
        nonce = uuid.uuid4().hex[:10]
        sig = signature if signature is not None else sign(self.token, ts, nonce)
        return self.http.post(self.path, params={"signature": sig, "timestamp": ts,
                                                 "nonce": nonce},
                              content=xml.encode("utf-8"),
                              headers={"Content-Type": "text/xml"})

    def text_xml(self, content: str, *, msg_id: int | None = None,
                 create_time: int | None = None) -> str:
        mid = msg_id if msg_id is not None else uuid.uuid4().int % 10**18
        ct = create_time or int(time.time())
        return (f"<xml><ToUserName><![CDATA[gh_test]]></ToUserName>"
                f"<FromUserName><![CDATA[{self.openid}]]></FromUserName>"
                f"<CreateTime>{ct}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
                f"<Content><![CDATA[{content}]]></Content><MsgId>{mid}</MsgId></xml>")

    def event_xml(self, event: str, key: str = "", *, create_time: int | None = None) -> str:
        ct = create_time or int(time.time() * 1000) % 10**12
        return (f"<xml><ToUserName><![CDATA[gh_test]]></ToUserName>"
                f"<FromUserName><![CDATA[{self.openid}]]></FromUserName>"
                f"<CreateTime>{ct}</CreateTime><MsgType><![CDATA[event]]></MsgType>"
                f"<Event><![CDATA[{event}]]></Event><EventKey><![CDATA[{key}]]></EventKey></xml>")

    def send(self, content: str, **kw: Any) -> dict[str, str]:
        resp = self.post_xml(self.text_xml(content, **kw))
        assert resp.status_code == 200, resp.text
        return parse_reply(resp.text)

    def event(self, event: str, key: str = "", **kw: Any) -> dict[str, str]:
        resp = self.post_xml(self.event_xml(event, key, **kw))
        assert resp.status_code == 200, resp.text
        return parse_reply(resp.text)


def parse_reply(body: str) -> dict[str, str]:
    """Flatten a passive reply: text → {type, content}; news → {type, title, description, url}."""
    if body == "success":
        return {"type": "silent"}
    root = ElementTree.fromstring(body)
    out = {"type": root.findtext("MsgType") or "", "to": root.findtext("ToUserName") or ""}
    if out["type"] == "text":
        out["content"] = root.findtext("Content") or ""
    elif out["type"] == "news":
        items = root.findall("./Articles/item")
        out["count"] = str(len(items))
        out["title"] = items[0].findtext("Title") or ""
        out["description"] = items[0].findtext("Description") or ""
        out["url"] = items[0].findtext("Url") or ""
    return out


def client_for(app: Any) -> httpx.Client:
    """An httpx client on the WSGI app that returns its 500 pages instead of raising, as
    WeChat would see them."""
    return httpx.Client(transport=httpx.WSGITransport(app=app, raise_app_exceptions=False),
                        base_url="http://testserver")


@pytest.fixture
def http(settings: Settings, engine: Engine) -> Iterator[httpx.Client]:
    with client_for(create_app(settings, engine)) as c:
        yield c


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record at INFO and above."""
    with caplog.at_level(logging.INFO):
        yield caplog


@pytest.fixture
def app_client(settings: Settings, engine: Engine) -> Iterator[httpx.Client]:
    app = create_app(settings, engine)
    with httpx.Client(transport=httpx.WSGITransport(app=app),
                      base_url="http://testserver") as client:
        yield client


@pytest.fixture
def user(app_client: httpx.Client) -> WeChatUser:
    return WeChatUser(app_client, "o_reader_0001")


@pytest.fixture
def operator(app_client: httpx.Client) -> WeChatUser:
    return WeChatUser(app_client, OPERATOR)


# --- shared by every test ------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise RuntimeError(f"test tried to reach {address!r}")
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def free_port() -> int:
    """A port nothing listens on right now, for servers the tests start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    """Environment for `python -m bot.cli …` subprocesses: this checkout importable, none of
    the caller's NEWSBOT_* settings, wide Rich output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSBOT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["COLUMNS"] = "200"
    return env
