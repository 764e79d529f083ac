"""FakeWeChat over real loopback HTTP, driven by the real WeChatClient."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import Engine

from bot.settings import WechatSettings
from bot.wechat.api import (
    MassSendResult,
    WeChatAuthError,
    WeChatClient,
    WeChatError,
    WeChatRateLimited,
    WeChatTransientError,
)
from bot.wechat.fake import FakeWeChat, fake_openids

T0 = 1_700_000_000.0
REPO = Path(__file__).resolve().parents[1]
USERS = "/cgi-bin/user/get"
TOKEN_PATH = "/cgi-bin/stable_token"


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(clock: FakeClock) -> Iterator[FakeWeChat]:
    with FakeWeChat(followers=fake_openids(5), clock=clock) as server:
        yield server


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make_client(
    fake: FakeWeChat,
    engine: Engine,
    clock: FakeClock,
    sleeps: list[float],
    *,
    app_secret: str = "fake-secret",
    read_timeout_s: float = 5.0,
) -> WeChatClient:
    settings = WechatSettings(
        app_id=fake.app_id,
        app_secret=app_secret,
        api_base=fake.base_url,
        connect_timeout_s=2.0,
        read_timeout_s=read_timeout_s,
    )
    return WeChatClient(settings, engine, clock=clock, sleep=sleeps.append)


@pytest.fixture
def client(
    fake: FakeWeChat, engine: Engine, clock: FakeClock, sleeps: list[float]
) -> Iterator[WeChatClient]:
    with make_client(fake, engine, clock, sleeps) as wechat_client:
        yield wechat_client


def raw_call(
    fake: FakeWeChat, path: str, token: str | None, body: Any = None, **params: str
) -> dict[str, Any]:
    """A request the client would never make, straight over HTTP."""
    if token:
        params["access_token"] = token
    if body is None:
        response = httpx.get(fake.base_url + path, params=params)
    else:
        response = httpx.post(fake.base_url + path, params=params, content=body)
    assert response.status_code == 200
    payload: dict[str, Any] = response.json()
    return payload


def paths(fake: FakeWeChat) -> list[tuple[str, int | None]]:
    return [(c.path, c.errcode) for c in fake.calls]


# -- tokens ----------------------------------------------------------------------------------


def test_stable_token_is_the_same_until_forced(
    fake: FakeWeChat, client: WeChatClient, clock: FakeClock
) -> None:
    first, expires_in = client.fetch_stable_token()
    clock.now += 600
    again, expires_left = client.fetch_stable_token()
    assert again == first
    assert (expires_in, expires_left) == (7200, 6600)

    clock.now += 31
    forced, _ = client.fetch_stable_token(force_refresh=True)
    assert forced != first
    assert raw_call(fake, USERS, first)["errcode"] == 40001
    assert raw_call(fake, USERS, forced)["count"] == 5

    clock.now += 10
    with pytest.raises(WeChatRateLimited) as info:
        client.fetch_stable_token(force_refresh=True)
    assert info.value.errcode == 45009
    assert client.fetch_stable_token()[0] == forced


def test_force_refresh_limited_to_20_a_day(client: WeChatClient, clock: FakeClock) -> None:
    clock.now = 86400 * 20_000.0  # start of a day
    for _ in range(20):
        client.fetch_stable_token(force_refresh=True)
        clock.now += 31
    with pytest.raises(WeChatRateLimited):
        client.fetch_stable_token(force_refresh=True)
    clock.now += 86400
    client.fetch_stable_token(force_refresh=True)


def test_token_expiry_and_renewal_window(fake: FakeWeChat, clock: FakeClock) -> None:
    body = json.dumps(
        {"grant_type": "client_credential", "appid": "wx_fake", "secret": "fake-secret"}
    )
    old = raw_call(fake, TOKEN_PATH, None, body)["access_token"]

    clock.now = T0 + 7200 - 299  # inside the last 5 minutes: a new token, old still valid
    new = raw_call(fake, TOKEN_PATH, None, body)
    assert new["access_token"] != old and new["expires_in"] == 7200
    assert raw_call(fake, USERS, old)["count"] == 5

    clock.now = T0 + 7200
    assert raw_call(fake, USERS, old)["errcode"] == 42001
    assert raw_call(fake, USERS, None)["errcode"] == 41001
    assert raw_call(fake, USERS, "made-up")["errcode"] == 40001
    assert raw_call(fake, USERS, new["access_token"])["count"] == 5


@pytest.mark.parametrize(
    ("app_id", "secret", "errcode"),
    [("wx_fake", "wrong", 40125), ("wx_other", "fake-secret", 40013)],
)
def test_wrong_credentials_are_refused(
    fake: FakeWeChat, app_id: str, secret: str, errcode: int
) -> None:
    body = {"grant_type": "client_credential", "appid": app_id, "secret": secret}
    assert raw_call(fake, TOKEN_PATH, None, json.dumps(body))["errcode"] == errcode


def test_client_with_wrong_secret_gets_auth_error(
    fake: FakeWeChat, engine: Engine, clock: FakeClock, sleeps: list[float]
) -> None:
    client = make_client(fake, engine, clock, sleeps, app_secret="wrong")
    with client, pytest.raises(WeChatAuthError) as info:
        client.get_followers()
    assert info.value.errcode == 40125


def test_unknown_path_answers_invalid_url(fake: FakeWeChat, client: WeChatClient) -> None:
    token, _ = client.fetch_stable_token()
    assert raw_call(fake, "/cgi-bin/nope", token) == {"errcode": 40066, "errmsg": "invalid url"}


# -- followers -------------------------------------------------------------------------------


def test_followers_paged_by_10000(fake: FakeWeChat, client: WeChatClient) -> None:
    fake.followers = fake_openids(25_000)

    pages = list(client.iter_followers())

    assert [len(p) for p in pages] == [10_000, 10_000, 5_000]
    assert [o for p in pages for o in p] == fake.followers
    user_calls = [c for c in fake.calls if c.path == USERS]
    assert [c.query.get("next_openid") for c in user_calls] == [
        None,
        fake.followers[9_999],
        fake.followers[19_999],
        fake.followers[24_999],
    ]
    assert all(c.errcode == 0 for c in user_calls)


def test_last_page_has_no_data(fake: FakeWeChat, client: WeChatClient) -> None:
    token, _ = client.fetch_stable_token()
    end = raw_call(fake, USERS, token, next_openid=fake.followers[-1])
    assert end == {"total": 5, "count": 0, "next_openid": ""}


# -- mass sends ------------------------------------------------------------------------------


def test_duplicate_clientmsgid_is_already_sent(fake: FakeWeChat, client: WeChatClient) -> None:
    first = client.send_all_text("第 1 期", clientmsgid="issue-1")
    again = client.send_all_text("第 1 期", clientmsgid="issue-1")

    assert not first.already_sent
    assert again == MassSendResult(msg_id=first.msg_id, msg_data_id=None, already_sent=True)
    assert fake.deliveries == dict.fromkeys(fake.followers, 1)
    assert len(fake.mass_sends) == 1
    assert fake.mass_sends[0].content == "第 1 期"  # not \u escapes


def test_clientmsgid_reusable_after_24_hours(
    fake: FakeWeChat, client: WeChatClient, clock: FakeClock
) -> None:
    client.send_all_text("a", clientmsgid="x")
    clock.now += 24 * 3600
    assert not client.send_all_text("a", clientmsgid="x").already_sent
    assert fake.deliveries == dict.fromkeys(fake.followers, 2)


def test_mass_send_to_openids_filters_non_followers(fake: FakeWeChat, client: WeChatClient) -> None:
    targets = [*fake.followers[:3], "o_not_a_follower"]
    result = client.send_to_openids_text(targets, "hello")

    assert fake.deliveries == dict.fromkeys(fake.followers[:3], 1)
    [send] = fake.mass_sends
    assert (send.msg_id, send.kind, send.total_count, send.sent_count) == (
        result.msg_id,
        "send",
        4,
        3,
    )


def test_sendall_to_a_tag(fake: FakeWeChat, client: WeChatClient) -> None:
    fake.tags[7] = fake.followers[1:3]
    client.send_all_text("tagged", tag_id=7)
    assert fake.deliveries == dict.fromkeys(fake.followers[1:3], 1)
    with pytest.raises(WeChatError) as info:
        client.send_all_text("tagged", tag_id=8)
    assert info.value.errcode == 40050


def test_fake_rejects_bad_mass_sends(fake: FakeWeChat, client: WeChatClient) -> None:
    token, _ = client.fetch_stable_token()
    one = {"touser": ["o1"], "msgtype": "text", "text": {"content": "x"}}
    answer = raw_call(fake, "/cgi-bin/message/mass/send", token, json.dumps(one))
    assert answer["errcode"] == 40130

    with pytest.raises(WeChatError) as info:
        client.send_all_text("字" * 683)  # 2049 bytes
    assert info.value.errcode == 45002
    assert fake.mass_sends == []
    client.send_all_text("字" * 682 + "ab")  # exactly 2048 bytes
    assert len(fake.mass_sends) == 1


def test_fake_shows_unicode_escapes_literally_like_wechat(
    fake: FakeWeChat, client: WeChatClient
) -> None:
    token, _ = client.fetch_stable_token()
    body = {"filter": {"is_to_all": True}, "msgtype": "text", "text": {"content": "中文"}}
    raw_call(fake, "/cgi-bin/message/mass/sendall", token, json.dumps(body, ensure_ascii=True))
    assert fake.mass_sends[-1].content == "\\u4e2d\\u6587"


def test_sendall_quota(fake: FakeWeChat, client: WeChatClient, sleeps: list[float]) -> None:
    fake.sendall_quota_per_day = 1
    client.send_all_text("one")
    with pytest.raises(WeChatError) as info:
        client.send_all_text("two")
    assert info.value.errcode == 45028
    assert sleeps == []


def test_preview_custom_and_menu(fake: FakeWeChat, client: WeChatClient) -> None:
    client.preview_text(fake.followers[0], "preview")
    client.send_custom_text(fake.followers[1], "custom")
    assert fake.previews == [(fake.followers[0], "preview")]
    assert fake.custom_messages == [(fake.followers[1], "custom")]
    with pytest.raises(WeChatError) as info:
        client.preview_text("o_stranger", "preview")
    assert info.value.errcode == 40003

    menu = {
        "button": [
            {"type": "click", "name": "本期", "key": "ISSUE"},
            {
                "name": "更多",
                "sub_button": [{"type": "view", "name": "官网", "url": "https://x.y"}],
            },
        ]
    }
    client.create_menu(menu)
    assert fake.menu == menu

    too_many = {"button": [{"type": "click", "name": f"b{i}", "key": "k"} for i in range(4)]}
    subs = [{"type": "click", "name": f"s{i}", "key": "k"} for i in range(6)]
    bad_menus: list[tuple[dict[str, Any], int]] = [
        (too_many, 40016),
        ({"button": []}, 40016),
        ({"button": [{"name": "m", "sub_button": subs}]}, 40023),
        ({"button": [{"type": "click", "name": "m"}]}, 40019),
        ({"button": [{"type": "click", "name": "一二三四五六", "key": "k"}]}, 40018),
    ]
    for bad, errcode in bad_menus:
        with pytest.raises(WeChatError) as caught:
            client.create_menu(bad)
        assert caught.value.errcode == errcode
    assert fake.menu == menu


# -- faults ----------------------------------------------------------------------------------


def test_client_recovers_from_injected_40001(fake: FakeWeChat, client: WeChatClient) -> None:
    client.get_followers()
    old = fake.current_token
    fake.fail_next(40001, path="/cgi-bin/message/custom/send")

    client.send_custom_text(fake.followers[0], "hi")

    assert fake.custom_messages == [(fake.followers[0], "hi")]
    assert paths(fake)[2:] == [
        ("/cgi-bin/message/custom/send", 40001),
        (TOKEN_PATH, 0),
        (TOKEN_PATH, 0),
        ("/cgi-bin/message/custom/send", 0),
    ]
    # WeChat kept handing out the rejected token, so the client had to force a new one.
    assert [c.body["force_refresh"] for c in fake.calls if c.path == TOKEN_PATH] == [
        False,
        False,
        True,
    ]
    assert fake.current_token != old


def test_client_recovers_from_one_http_5xx(
    fake: FakeWeChat, client: WeChatClient, sleeps: list[float]
) -> None:
    fake.http_error_next(502, path=USERS)

    assert client.get_followers().count == 5
    assert [(c.path, c.status) for c in fake.calls if c.path == USERS] == [
        (USERS, 502),
        (USERS, 200),
    ]
    assert len(sleeps) == 1


def test_client_retries_injected_system_busy(
    fake: FakeWeChat, client: WeChatClient, sleeps: list[float]
) -> None:
    client.fetch_stable_token()
    fake.fail_next(-1, times=2)
    assert client.get_followers().count == 5
    assert len(sleeps) == 2


def test_dropped_connection_on_send_without_clientmsgid_is_not_replayed(
    fake: FakeWeChat, client: WeChatClient
) -> None:
    fake.drop_connection_next(path="/cgi-bin/message/mass/sendall")

    with pytest.raises(WeChatTransientError):
        client.send_all_text("hi")

    assert fake.mass_sends == []
    assert [c.status for c in fake.calls if c.path.endswith("sendall")] == [0]


def test_timed_out_send_never_delivers_twice(
    fake: FakeWeChat, engine: Engine, clock: FakeClock, sleeps: list[float]
) -> None:
    fake.delay_next(0.6, path="/cgi-bin/message/mass/sendall")
    with make_client(fake, engine, clock, sleeps, read_timeout_s=0.2) as client:
        result = client.send_all_text("hi", clientmsgid="issue-9")

    deadline = time.monotonic() + 5
    while len([c for c in fake.calls if c.path.endswith("sendall")]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert len(fake.mass_sends) == 1
    assert fake.deliveries == dict.fromkeys(fake.followers, 1)
    assert result.msg_id == fake.mass_sends[0].msg_id


def test_call_record(fake: FakeWeChat, client: WeChatClient, clock: FakeClock) -> None:
    fake.followers = fake_openids(10_000)
    client.send_to_openids_text(fake.followers, "hi", clientmsgid="b0")

    token_call, send_call = fake.calls
    assert (token_call.method, token_call.path, token_call.errcode) == ("POST", TOKEN_PATH, 0)
    assert token_call.body["secret"] == "***"
    assert send_call.method == "POST"
    assert send_call.path == "/cgi-bin/message/mass/send"
    assert send_call.query == {"access_token": fake.current_token}
    assert send_call.errcode == 0 and send_call.status == 200 and send_call.time == T0
    assert send_call.body == {
        "msgtype": "text",
        "text": {"content": "hi"},
        "clientmsgid": "b0",
        "touser_count": 10_000,
        "first_openid": fake.followers[0],
        "last_openid": fake.followers[-1],
    }


# -- MASSSENDJOBFINISH callback --------------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    received: queue.Queue[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.put((self.path, body))
        self.send_response(200)
        self.send_header("Content-Length", "7")
        self.end_headers()
        self.wfile.write(b"success")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_mass_send_job_finish_callback_is_signed(
    engine: Engine, clock: FakeClock, sleeps: list[float]
) -> None:
    received: queue.Queue[tuple[str, bytes]] = queue.Queue()
    handler = type("Receiver", (_Receiver,), {"received": received})
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = receiver.server_address[1]
    threading.Thread(
        target=receiver.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    try:
        with FakeWeChat(
            followers=fake_openids(3),
            clock=clock,
            webhook_url=f"http://127.0.0.1:{port}/wechat",
            webhook_token="hook-token",
        ) as fake:
            with make_client(fake, engine, clock, sleeps) as client:
                result = client.send_to_openids_text([*fake.followers, "o_gone"], "hi")
            path, body = received.get(timeout=5)
    finally:
        receiver.shutdown()
        receiver.server_close()

    url = urlsplit(path)
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert url.path == "/wechat"
    expected = hashlib.sha1(
        "".join(sorted(["hook-token", query["timestamp"], query["nonce"]])).encode()
    ).hexdigest()
    assert query["signature"] == expected
    assert query["timestamp"] == str(int(T0))
    xml = ET.fromstring(body)
    fields = {child.tag: child.text for child in xml}
    assert fields["MsgType"] == "event"
    assert fields["Event"] == "MASSSENDJOBFINISH"
    assert fields["ToUserName"] == "gh_fake"
    assert fields["MsgID"] == str(result.msg_id)
    assert fields["Status"] == "send success"
    assert (fields["TotalCount"], fields["SentCount"], fields["ErrorCount"]) == ("4", "3", "0")
    assert fake.webhook_results == [200]


# -- as a process ----------------------------------------------------------------------------


def test_runs_as_a_process() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.wechat.fake", "--port", "0", "--followers", "3"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        body = {"grant_type": "client_credential", "appid": "wx_fake", "secret": "fake-secret"}
        token = httpx.post(base_url + TOKEN_PATH, json=body).json()["access_token"]
        page = httpx.get(base_url + USERS, params={"access_token": token}).json()
        assert page["data"]["openid"] == fake_openids(3)
        proc.terminate()
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
