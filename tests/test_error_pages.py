"""Error pages and headers app-wide: an unhandled exception on any route is a fixed 500 (Bottle's
own page printed the whole URL, signature and openid included) with one log line that has the
path but not the query; 404/405 pages are fixed too; every response carries nosniff and, unless
a route says otherwise, no-store; the reflected ``echostr`` is refused unless it looks like
WeChat's."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from bot.app import create_app
from bot.settings import Settings
from bot.web import policy, reader
from bot.wechat import webhook
from bot.wechat.webhook import sign
from tests.conftest import TOKEN, WeChatUser, client_for
from tests.test_hostile_input import READER, request_lines

# --- 2. error pages never quote the request ----------------------------------------------------

SECRET_QUERY = {"signature": "f" * 40, "timestamp": "1700000000", "nonce": "n0nce-q",
                "openid": "o_secret_openid_42", "u": "o_secret_openid_42", "e": "9999999999",
                "s": "a" * 43}


def assert_fixed(resp: httpx.Response, status: int) -> None:
    assert resp.status_code == status
    assert resp.text == policy.error_body(status)
    for leak in ("signature", "o_secret_openid_42", "n0nce-q", "testserver", "?", "/"):
        assert leak not in resp.text
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["content-type"].startswith("text/plain")


def test_unhandled_error_in_the_webhook_is_a_fixed_500(
        settings: Settings, engine: Engine, captured: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError(f"cannot render for {kwargs.get('to_user')}")

    monkeypatch.setattr(webhook, "render_reply", broken)
    with client_for(create_app(settings, engine)) as c:
        user = WeChatUser(c, "o_secret_openid_42")
        resp = user.post_xml(user.text_xml("帮助"))
    assert_fixed(resp, 500)
    assert [line["outcome"] for line in request_lines(captured)] == ["error"]
    [app_line] = [r for r in captured.records if r.name == "newsbot.app"]
    assert app_line.getMessage() == "unhandled RuntimeError on POST /wechat"
    assert app_line.levelno == logging.ERROR and app_line.exc_info is not None


def test_unhandled_error_on_a_reader_route_is_a_fixed_500(
        settings: Settings, engine: Engine, captured: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Any, rest: str = "") -> str:
        raise RuntimeError(f"reader broke on {rest}")

    monkeypatch.setattr(reader._ReaderApp, "not_a_path", broken)
    with client_for(create_app(settings, engine)) as c:
        resp = c.get("/read/o_secret_openid_42", params=SECRET_QUERY)
    assert_fixed(resp, 500)
    [app_line] = [r for r in captured.records if r.name == "newsbot.app"]
    assert app_line.getMessage() == "unhandled RuntimeError on GET /read/o_secret_openid_42"


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/no/such/page/o_secret_openid_42", 404),
    ("POST", "/healthz", 405),
    ("DELETE", "/wechat", 405),
    ("PUT", "/read/1", 405),
])
def test_bottle_error_pages_are_fixed(http: httpx.Client, method: str, path: str,
                                      status: int) -> None:
    assert_fixed(http.request(method, path, params=SECRET_QUERY), status)


# --- 5. reflected text and caching -------------------------------------------------------------

def _handshake(http: httpx.Client, echostr: str) -> httpx.Response:
    ts, nonce = str(int(time.time())), "n1"
    return http.get("/wechat", params={"signature": sign(TOKEN, ts, nonce), "timestamp": ts,
                                       "nonce": nonce, "echostr": echostr})


def test_echostr_is_plain_text_with_nosniff(http: httpx.Client) -> None:
    resp = _handshake(http, "5838479218127813673")
    assert resp.status_code == 200 and resp.text == "5838479218127813673"
    assert resp.headers["content-type"] == "text/plain; charset=utf-8"
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("echostr", ["", "x" * 129, "<html><script>alert(1)</script></html>",
                                     "a b", "12\n34", "１２３"])
def test_odd_echostr_is_refused(http: httpx.Client, captured: pytest.LogCaptureFixture,
                                echostr: str) -> None:
    resp = _handshake(http, echostr)
    assert resp.status_code == 400 and resp.text == "bad echostr"
    assert [line["status"] for line in request_lines(captured)] == [400]


@pytest.mark.usefixtures("sample")
def test_every_webhook_response_has_nosniff_and_no_store(http: httpx.Client) -> None:
    user = WeChatUser(http, READER)
    for resp in (user.post_xml(user.text_xml("本周")), user.post_xml("<xml>"),
                 user.post_xml(user.text_xml("本周"), signature="0" * 40),
                 http.get("/read/1", params={"u": READER, "e": "1", "s": "x"})):
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert "no-store" in resp.headers["cache-control"]


