"""The console's gate: one-time links, sessions, CSRF, the audit trail and the flash message,
through the real WSGI app."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import bottle
import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import select

from bot.app import create_app
from bot.console.core import Console, ConsoleRequest, Done, Refused
from bot.settings import Settings
from storage.db import transaction
from storage.models import ConsoleSession, OperatorAction
from tests.conftest import OPERATOR, client_for
from tests.console_support import console_link, csrf_of, login


@pytest.fixture
def console(settings: Settings, engine: Engine) -> Iterator[httpx.Client]:
    with client_for(create_app(settings, engine)) as client:
        yield client


def _actions(engine: Engine) -> list[OperatorAction]:
    with transaction(engine) as s:
        return list(s.exec(select(OperatorAction).order_by(OperatorAction.id)))  # type: ignore[arg-type]


def test_an_operator_link_opens_the_console_once(console: httpx.Client,
                                                 settings: Settings) -> None:
    link = console_link(settings, OPERATOR)
    opened = console.get(link)
    assert opened.status_code == 303 and opened.headers["location"] == "/console/"
    cookie = opened.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    page = console.get("/console/")
    assert page.status_code == 200 and "概览" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]

    other = httpx.Client(transport=console._transport, base_url="http://testserver")
    again = other.get(link)  # the same link, forwarded to someone else
    assert again.status_code == 403 and "只能打开一次" in again.text
    assert other.get("/console/").status_code == 403


def test_a_non_operator_cannot_open_a_link(console: httpx.Client, settings: Settings) -> None:
    refused = console.get(console_link(settings, "o_not_an_operator"))
    assert refused.status_code == 403 and "不是本号的运营者" in refused.text
    assert console.get("/console/").status_code == 403


def test_a_forged_or_edited_link_is_refused(console: httpx.Client, settings: Settings) -> None:
    link = console_link(settings, OPERATOR)
    assert console.get(link.replace("u=", "u=x")).status_code == 403
    assert console.get(link[:-3] + "AAA").status_code == 403
    assert console.get("/console/open").status_code == 403


def test_an_expired_link_is_refused(console: httpx.Client, settings: Settings) -> None:
    old = console_link(settings, OPERATOR, now=time.time() - 16 * 60)
    refused = console.get(old)
    assert refused.status_code == 403 and "已过期" in refused.text


def test_the_session_ends_after_session_hours(settings: Settings, engine: Engine) -> None:
    app = create_app(settings, engine)
    with client_for(app) as client:
        login(client, settings, OPERATOR)
        assert client.get("/console/").status_code == 200
        with transaction(engine) as s:  # as if the working day had passed
            for row in s.exec(select(ConsoleSession)):
                row.expires_at = row.created_at.replace(year=2000)
                s.add(row)
        assert client.get("/console/").status_code == 403


def test_logout_needs_the_csrf_token_and_ends_the_session(console: httpx.Client,
                                                          settings: Settings,
                                                          engine: Engine) -> None:
    csrf = login(console, settings, OPERATOR)
    forged = console.post("/console/logout", data={})
    assert forged.status_code == 403 and "表单已失效" in forged.text
    assert console.get("/console/").status_code == 200  # still logged in
    assert console.post("/console/logout", data={"csrf": csrf}).status_code == 200
    assert console.get("/console/").status_code == 403
    assert console.post("/console/logout", data={"csrf": csrf}).status_code == 403
    assert [(a.action, a.result) for a in _actions(engine)] == [
        ("csrf:/console/logout", "refused"), ("logout", "ok")]


@pytest.fixture
def test_console(settings: Settings, engine: Engine) -> Iterator[tuple[httpx.Client, list[str]]]:
    """A console with one action of the test's own, mounted on a bare Bottle app."""
    calls: list[str] = []
    console = Console(settings, engine)

    @console.page("/things", title="Things", nav="Things")
    def things(req: ConsoleRequest) -> str:
        return f"<form method=post action=/console/things/add>{req.csrf_field()}</form>"

    @console.action("/things/add", name="thing.add")
    def add(req: ConsoleRequest) -> Done:
        if req.get("name") == "bad":
            raise Refused("名字不行", target="bad")
        if req.get("name") == "boom":
            raise RuntimeError("boom")
        calls.append(req.get("name"))
        return Done("已添加", target=req.get("name"), detail={"n": 1})

    app = bottle.Bottle()
    console.install(app)
    with client_for(app) as client:
        yield client, calls


def test_actions_are_audited_with_their_result(test_console: tuple[httpx.Client, list[str]],
                                               settings: Settings, engine: Engine) -> None:
    client, calls = test_console
    opened = client.get(console_link(settings, OPERATOR))
    csrf = csrf_of(client.get("/console/things").text)
    assert opened.status_code == 303

    done = client.post("/console/things/add", data={"csrf": csrf, "name": "甲"})
    assert done.status_code == 303
    back = client.get(done.headers["location"])
    assert "已添加" in back.text and 'class="flash ok"' in back.text
    refused = client.post("/console/things/add", data={"csrf": csrf, "name": "bad"})
    assert "名字不行" in client.get(refused.headers["location"]).text
    failed = client.post("/console/things/add", data={"csrf": csrf, "name": "boom"})
    assert "没有做任何更改" in client.get(failed.headers["location"]).text
    no_token = client.post("/console/things/add", data={"name": "乙"})
    assert no_token.status_code == 403
    wrong = client.post("/console/things/add", data={"csrf": csrf + "x", "name": "乙"})
    assert wrong.status_code == 403
    foreign = client.post("/console/things/add", data={"csrf": csrf, "name": "丙"},
                          headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403

    assert calls == ["甲"]  # nothing ran without the token, or from another site
    audited = [(a.operator, a.action, a.target, a.result) for a in _actions(engine)]
    assert audited == [
        (OPERATOR, "thing.add", "甲", "ok"), (OPERATOR, "thing.add", "bad", "refused"),
        (OPERATOR, "thing.add", "", "error"),
        (OPERATOR, "csrf:/console/things/add", "", "refused"),
        (OPERATOR, "csrf:/console/things/add", "", "refused"),
        (OPERATOR, "csrf:/console/things/add", "", "refused")]


def test_a_crafted_flash_message_is_not_shown(test_console: tuple[httpx.Client, list[str]],
                                              settings: Settings) -> None:
    client, _ = test_console
    client.get(console_link(settings, OPERATOR))
    csrf = csrf_of(client.get("/console/things").text)
    done = client.post("/console/things/add", data={"csrf": csrf, "name": "甲"})
    query = parse_qs(urlsplit(done.headers["location"]).query)
    assert "已添加" in client.get(done.headers["location"]).text
    crafted = client.get("/console/things", params={"m": "请转账到…", "k": "ok",
                                                    "ms": query["ms"][0]})
    assert "请转账" not in crafted.text


def test_an_operator_removed_from_the_config_loses_the_session(engine: Engine) -> None:
    from tests.conftest import make_settings

    with_op = make_settings()
    with client_for(create_app(with_op, engine)) as client:
        login(client, with_op, OPERATOR)
        cookies = dict(client.cookies)
    without = make_settings(operators={"openids": []})
    with client_for(create_app(without, engine)) as client:
        for name, value in cookies.items():
            client.cookies.set(name, value, path="/console")
        assert client.get("/console/").status_code == 403
