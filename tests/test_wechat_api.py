"""WeChatClient against a scripted httpx.MockTransport: tokens, retries, errors, bodies."""

from __future__ import annotations

import json
import logging
import random
from collections import deque
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from bot.settings import WechatSettings
from bot.wechat.api import (
    MassSendResult,
    WeChatAlreadySent,
    WeChatAuthError,
    WeChatClient,
    WeChatError,
    WeChatQuotaExceeded,
    WeChatRateLimited,
    WeChatTransientError,
    error_for,
)
from storage.db import transaction
from storage.tokens import get_cached_token

API = "https://api.weixin.qq.com"
T0 = 1_700_000_000.0
TOKEN_PATH = "/cgi-bin/stable_token"
USERS = "/cgi-bin/user/get"
SENDALL = "/cgi-bin/message/mass/sendall"
SEND = "/cgi-bin/message/mass/send"
CUSTOM = "/cgi-bin/message/custom/send"

# An answer queued for a path: a JSON body, an HTTP status, or an exception to raise.
Answer = dict[str, Any] | int | Exception

OK_BODIES: dict[str, dict[str, Any]] = {
    USERS: {"total": 2, "count": 2, "data": {"openid": ["o1", "o2"]}, "next_openid": "o2"},
    SENDALL: {"errcode": 0, "errmsg": "send job submission success", "msg_id": 77},
    SEND: {"errcode": 0, "errmsg": "send job submission success", "msg_id": 78},
    CUSTOM: {"errcode": 0, "errmsg": "ok"},
    "/cgi-bin/message/mass/preview": {"errcode": 0, "errmsg": "preview success"},
    "/cgi-bin/menu/create": {"errcode": 0, "errmsg": "ok"},
}


class ScriptedWeChat:
    """A MockTransport handler: hands out ``token`` from stable_token, answers API paths from
    per-path queues (then a default success) and fails on any URL it does not know."""

    def __init__(self) -> None:
        self.token = "tok-1"
        self.expires_in = 7200
        self.forced = 0
        self.requests: list[httpx.Request] = []
        self.queued: dict[str, deque[Answer]] = {}

    def queue(self, path: str, *answers: Answer) -> None:
        self.queued.setdefault(path, deque()).extend(answers)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.host == "api.weixin.qq.com", request.url
        self.requests.append(request)
        path = request.url.path
        queued = self.queued.get(path)
        if queued:
            answer = queued.popleft()
            if isinstance(answer, Exception):
                raise answer
            if isinstance(answer, int):
                return httpx.Response(answer, text="<html>busy</html>")
            return httpx.Response(200, json=answer)
        if path == TOKEN_PATH:
            if json.loads(request.content)["force_refresh"]:
                self.forced += 1
                self.token = f"tok-forced-{self.forced}"
            return httpx.Response(200, json={"access_token": self.token, "expires_in": 7200})
        if path in OK_BODIES:
            return httpx.Response(200, json=OK_BODIES[path])
        raise AssertionError(f"unexpected request {request.method} {path}")

    def calls(self, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == path]

    def token_bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.calls(TOKEN_PATH)]


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class CeilingRandom(random.Random):
    """Full jitter always at its ceiling, so the backoff schedule is visible."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.fixture
def settings() -> WechatSettings:
    return WechatSettings(
        app_id="wx_test",
        app_secret="very-secret-value",
        api_base=API,
        connect_timeout_s=1.0,
        read_timeout_s=2.0,
    )


@pytest.fixture
def wechat() -> ScriptedWeChat:
    return ScriptedWeChat()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make_client(
    settings: WechatSettings,
    engine: Engine,
    wechat: ScriptedWeChat,
    clock: FakeClock,
    sleeps: list[float],
    **kwargs: Any,
) -> WeChatClient:
    http = httpx.Client(transport=httpx.MockTransport(wechat))
    return WeChatClient(
        settings,
        engine,
        http=http,
        clock=clock,
        sleep=sleeps.append,
        rng=CeilingRandom(),
        **kwargs,
    )


@pytest.fixture
def client(
    settings: WechatSettings,
    engine: Engine,
    wechat: ScriptedWeChat,
    clock: FakeClock,
    sleeps: list[float],
) -> WeChatClient:
    return make_client(settings, engine, wechat, clock, sleeps)


def used_tokens(wechat: ScriptedWeChat, path: str) -> list[str | None]:
    return [r.url.params.get("access_token") for r in wechat.calls(path)]


# -- access token ----------------------------------------------------------------------------


def test_token_fetched_from_stable_token_with_client_credentials(
    client: WeChatClient, wechat: ScriptedWeChat, engine: Engine, clock: FakeClock
) -> None:
    client.get_followers()

    [token_request] = wechat.calls(TOKEN_PATH)
    assert token_request.method == "POST"
    assert json.loads(token_request.content) == {
        "grant_type": "client_credential",
        "appid": "wx_test",
        "secret": "very-secret-value",
        "force_refresh": False,
    }
    assert not wechat.calls("/cgi-bin/token")
    assert used_tokens(wechat, USERS) == ["tok-1"]
    with transaction(engine) as session:
        row = get_cached_token(session, app_id="wx_test")
        assert row is not None
        assert row.token == "tok-1"
        assert row.expires_at.timestamp() == pytest.approx(T0 + 7200)


def test_token_cache_is_shared_between_clients_on_one_database(
    settings: WechatSettings, engine: Engine, clock: FakeClock, sleeps: list[float]
) -> None:
    first, second = ScriptedWeChat(), ScriptedWeChat()
    second.token = "tok-other"
    make_client(settings, engine, first, clock, sleeps).get_followers()
    make_client(settings, engine, second, clock, sleeps).get_followers()

    assert len(first.calls(TOKEN_PATH)) == 1
    assert second.calls(TOKEN_PATH) == []
    assert used_tokens(second, USERS) == ["tok-1"]


def test_token_renewed_when_under_300_seconds_remain(
    client: WeChatClient, wechat: ScriptedWeChat, clock: FakeClock
) -> None:
    client.get_followers()
    wechat.token = "tok-2"

    clock.now = T0 + 7200 - 301
    client.get_followers()
    assert len(wechat.calls(TOKEN_PATH)) == 1

    clock.now = T0 + 7200 - 299
    client.get_followers()
    assert len(wechat.calls(TOKEN_PATH)) == 2
    assert used_tokens(wechat, USERS) == ["tok-1", "tok-1", "tok-2"]


def test_rejected_token_is_refetched_once_and_the_call_retried(
    client: WeChatClient, wechat: ScriptedWeChat
) -> None:
    client.get_followers()
    wechat.token = "tok-2"
    wechat.queue(USERS, {"errcode": 40001, "errmsg": "invalid credential"})

    page = client.get_followers()

    assert page.openids == ["o1", "o2"]
    assert len(wechat.calls(TOKEN_PATH)) == 2  # exactly one extra fetch
    assert [b["force_refresh"] for b in wechat.token_bodies()] == [False, False]
    assert used_tokens(wechat, USERS) == ["tok-1", "tok-1", "tok-2"]


@pytest.mark.parametrize("errcode", [40001, 40014, 42001])
def test_second_rejection_raises_without_looping(
    client: WeChatClient, wechat: ScriptedWeChat, errcode: int
) -> None:
    client.get_followers()
    wechat.token = "tok-2"
    wechat.queue(USERS, *[{"errcode": errcode, "errmsg": "bad token"}] * 5)

    with pytest.raises(WeChatAuthError) as info:
        client.get_followers()

    assert info.value.errcode == errcode
    assert len(wechat.calls(TOKEN_PATH)) == 2
    assert len(wechat.calls(USERS)) == 3  # the warm-up, the failure, one retry
    assert wechat.forced == 0


def test_force_refresh_only_when_wechat_returns_the_rejected_token(
    client: WeChatClient, wechat: ScriptedWeChat, clock: FakeClock, engine: Engine
) -> None:
    client.get_followers()
    wechat.queue(USERS, {"errcode": 40001, "errmsg": "invalid credential"})

    client.get_followers()

    assert [b["force_refresh"] for b in wechat.token_bodies()] == [False, False, True]
    assert used_tokens(wechat, USERS) == ["tok-1", "tok-1", "tok-forced-1"]
    with transaction(engine) as session:
        row = get_cached_token(session, app_id="wx_test")
        assert row is not None and row.token == "tok-forced-1"


def test_force_refresh_at_most_once_per_30_seconds(
    client: WeChatClient, wechat: ScriptedWeChat, clock: FakeClock
) -> None:
    client.get_followers()
    wechat.queue(USERS, {"errcode": 40001, "errmsg": "invalid credential"})
    client.get_followers()
    assert wechat.forced == 1

    clock.now += 10
    wechat.queue(USERS, {"errcode": 40001, "errmsg": "invalid credential"})
    with pytest.raises(WeChatAuthError):
        client.get_followers()
    assert wechat.forced == 1

    clock.now += 25
    wechat.queue(USERS, {"errcode": 40001, "errmsg": "invalid credential"})
    client.get_followers()
    assert wechat.forced == 2


def test_bad_app_secret_raises_auth_error_without_retry(
    client: WeChatClient, wechat: ScriptedWeChat, sleeps: list[float]
) -> None:
    wechat.queue(TOKEN_PATH, {"errcode": 40125, "errmsg": "invalid appsecret"})

    with pytest.raises(WeChatAuthError) as info:
        client.get_followers()

    assert info.value.errcode == 40125
    assert len(wechat.requests) == 1
    assert sleeps == []


def test_token_and_secret_never_logged(
    client: WeChatClient, wechat: ScriptedWeChat, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wechat.queue(USERS, {"errcode": 40001, "errmsg": "invalid credential"}, 502)

    client.get_followers()

    assert "HTTP Request" in caplog.text  # httpx did log the URLs...
    assert "access_token=***" in caplog.text
    for secret in ("tok-1", "tok-forced-1", "very-secret-value"):
        assert secret not in caplog.text  # ...but not the credentials


# -- retries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("errcode", [45009, 45011])
def test_rate_limit_waits_longer_each_time_then_succeeds(
    client: WeChatClient, wechat: ScriptedWeChat, sleeps: list[float], errcode: int
) -> None:
    wechat.queue(SENDALL, *[{"errcode": errcode, "errmsg": "slow down"}] * 2)

    result = client.send_all_text("hi", clientmsgid="issue-1")

    assert result == MassSendResult(msg_id=77, msg_data_id=None, already_sent=False)
    assert sleeps == [60.0, 120.0]
    assert len(wechat.calls(SENDALL)) == 3


def test_rate_limit_gives_up_after_two_retries(
    client: WeChatClient, wechat: ScriptedWeChat, sleeps: list[float]
) -> None:
    wechat.queue(SENDALL, *[{"errcode": 45009, "errmsg": "quota"}] * 5)

    with pytest.raises(WeChatRateLimited):
        client.send_all_text("hi")

    assert len(wechat.calls(SENDALL)) == 3
    assert sleeps == [60.0, 120.0]


@pytest.mark.parametrize(
    "failure",
    [502, {"errcode": -1, "errmsg": "system error"}, httpx.ConnectError("refused")],
    ids=["http-5xx", "errcode-1", "connect-error"],
)
def test_transient_failures_back_off_exponentially_then_succeed(
    client: WeChatClient, wechat: ScriptedWeChat, sleeps: list[float], failure: Answer
) -> None:
    client.get_followers()
    wechat.queue(USERS, failure, failure, failure)

    page = client.get_followers()

    assert page.count == 2
    assert sleeps == [0.5, 1.0, 2.0]
    assert len(wechat.calls(USERS)) == 5


def test_backoff_is_jittered_and_capped(
    settings: WechatSettings, engine: Engine, wechat: ScriptedWeChat, clock: FakeClock
) -> None:
    sleeps: list[float] = []
    client = WeChatClient(
        settings,
        engine,
        http=httpx.Client(transport=httpx.MockTransport(wechat)),
        clock=clock,
        sleep=sleeps.append,
        max_retries=10,
        rng=random.Random(7),
    )
    wechat.queue(USERS, *[503] * 10)

    client.get_followers()

    ceilings = [min(30.0, 0.5 * 2**i) for i in range(10)]
    assert all(0 <= s <= c for s, c in zip(sleeps, ceilings, strict=True))
    assert len(set(sleeps)) == 10  # random, not a fixed schedule


def test_transient_failures_stop_after_max_retries(
    settings: WechatSettings,
    engine: Engine,
    wechat: ScriptedWeChat,
    clock: FakeClock,
    sleeps: list[float],
) -> None:
    client = make_client(settings, engine, wechat, clock, sleeps, max_retries=2)
    client.get_followers()
    wechat.queue(USERS, *[500] * 5)

    with pytest.raises(WeChatTransientError) as info:
        client.get_followers()

    assert info.value.status_code == 500
    assert len(wechat.calls(USERS)) == 4  # warm-up + first try + 2 retries
    assert len(sleeps) == 2


@pytest.mark.parametrize("errcode", [40003, 45028, 40007, 45015])
def test_errors_that_cannot_succeed_are_not_retried(
    client: WeChatClient, wechat: ScriptedWeChat, sleeps: list[float], errcode: int
) -> None:
    wechat.queue(CUSTOM, {"errcode": errcode, "errmsg": "no"})

    with pytest.raises(WeChatError) as info:
        client.send_custom_text("o1", "hello")

    assert info.value.errcode == errcode
    assert len(wechat.calls(CUSTOM)) == 1
    assert sleeps == []


def test_clientmsgid_too_fast_waits_a_minute_once(
    client: WeChatClient, wechat: ScriptedWeChat, sleeps: list[float]
) -> None:
    too_fast = {"errcode": 45066, "errmsg": "same clientmsgid retry too fast"}
    wechat.queue(SENDALL, too_fast)
    assert client.send_all_text("hi", clientmsgid="c1").msg_id == 77
    assert sleeps == [60.0]

    wechat.queue(SENDALL, too_fast, too_fast)
    with pytest.raises(WeChatRateLimited):
        client.send_all_text("hi", clientmsgid="c2")
    assert sleeps == [60.0, 60.0]


def test_send_that_may_have_gone_through_is_not_replayed_without_clientmsgid(
    client: WeChatClient, wechat: ScriptedWeChat, sleeps: list[float]
) -> None:
    wechat.queue(SENDALL, httpx.ReadTimeout("timed out"))

    with pytest.raises(WeChatTransientError) as info:
        client.send_all_text("hi")

    assert info.value.maybe_processed
    assert len(wechat.calls(SENDALL)) == 1
    assert sleeps == []


def test_timed_out_send_with_clientmsgid_is_replayed_and_deduplicated(
    client: WeChatClient, wechat: ScriptedWeChat
) -> None:
    wechat.queue(
        SENDALL,
        httpx.ReadTimeout("timed out"),
        {"errcode": 45065, "errmsg": "clientmsgid exist", "msg_id": 1234},
    )

    result = client.send_all_text("hi", clientmsgid="issue-7")

    assert result == MassSendResult(msg_id=1234, msg_data_id=None, already_sent=True)
    bodies = [json.loads(r.content) for r in wechat.calls(SENDALL)]
    assert [b["clientmsgid"] for b in bodies] == ["issue-7", "issue-7"]


# -- mass sends and bodies -------------------------------------------------------------------


def test_already_sent_clientmsgid_returns_the_old_msg_id(
    client: WeChatClient, wechat: ScriptedWeChat
) -> None:
    wechat.queue(SEND, {"errcode": 45065, "errmsg": "clientmsgid exist", "msg_id": 555})

    result = client.send_to_openids_text(["o1", "o2"], "hi", clientmsgid="issue-3-batch-0")

    assert result == MassSendResult(msg_id=555, msg_data_id=None, already_sent=True)


def test_mass_send_returns_ids(client: WeChatClient, wechat: ScriptedWeChat) -> None:
    wechat.queue(SEND, {"errcode": 0, "errmsg": "ok", "msg_id": 9, "msg_data_id": 2247483650})

    result = client.send_to_openids_text(["o1", "o2"], "hi")

    assert result == MassSendResult(msg_id=9, msg_data_id=2247483650, already_sent=False)


@pytest.mark.parametrize("count", [0, 1, 10_001])
def test_mass_send_openid_count_is_checked_before_calling(
    client: WeChatClient, wechat: ScriptedWeChat, count: int
) -> None:
    with pytest.raises(ValueError, match="2–10000"):
        client.send_to_openids_text([f"o{i}" for i in range(count)], "hi")
    assert wechat.requests == []


@pytest.mark.parametrize("count", [2, 10_000])
def test_mass_send_accepts_openid_count_limits(
    client: WeChatClient, wechat: ScriptedWeChat, count: int
) -> None:
    client.send_to_openids_text([f"o{i}" for i in range(count)], "hi")
    [request] = wechat.calls(SEND)
    assert len(json.loads(request.content)["touser"]) == count


def test_overlong_clientmsgid_is_refused(client: WeChatClient, wechat: ScriptedWeChat) -> None:
    with pytest.raises(ValueError, match="clientmsgid"):
        client.send_all_text("hi", clientmsgid="x" * 65)
    assert wechat.requests == []


def test_bodies_are_utf8_json_with_chinese_unescaped(
    client: WeChatClient, wechat: ScriptedWeChat
) -> None:
    text = "本周简报：第 12 期 ✓"
    client.send_all_text(text, clientmsgid="第12期")
    client.send_all_text(text, tag_id=101)
    client.send_to_openids_text(["o1", "o2"], text, clientmsgid="c")
    client.preview_text("o1", text)
    client.send_custom_text("o2", text)

    api_requests = [r for r in wechat.requests if r.url.path != TOKEN_PATH]
    assert len(api_requests) == 5
    for request in api_requests:
        assert request.method == "POST"
        assert request.headers["content-type"] == "application/json; charset=utf-8"
        assert "本周简报".encode() in request.content
        assert b"\\u" not in request.content
    bodies = [json.loads(r.content.decode("utf-8")) for r in api_requests]
    assert bodies == [
        {
            "filter": {"is_to_all": True},
            "text": {"content": text},
            "msgtype": "text",
            "clientmsgid": "第12期",
        },
        {
            "filter": {"is_to_all": False, "tag_id": 101},
            "text": {"content": text},
            "msgtype": "text",
        },
        {"touser": ["o1", "o2"], "msgtype": "text", "text": {"content": text}, "clientmsgid": "c"},
        {"touser": "o1", "msgtype": "text", "text": {"content": text}},
        {"touser": "o2", "msgtype": "text", "text": {"content": text}},
    ]
    assert used_tokens(wechat, SENDALL) == ["tok-1", "tok-1"]


def test_create_menu_posts_the_menu(client: WeChatClient, wechat: ScriptedWeChat) -> None:
    menu = {"button": [{"type": "click", "name": "余额", "key": "BALANCE"}]}
    client.create_menu(menu)
    [request] = wechat.calls("/cgi-bin/menu/create")
    assert json.loads(request.content) == menu


# -- followers -------------------------------------------------------------------------------


def test_iter_followers_pages_until_data_is_missing(
    client: WeChatClient, wechat: ScriptedWeChat
) -> None:
    wechat.queue(
        USERS,
        {"total": 3, "count": 2, "data": {"openid": ["a", "b"]}, "next_openid": "b"},
        {"total": 3, "count": 1, "data": {"openid": ["c"]}, "next_openid": "c"},
        {"total": 3, "count": 0, "next_openid": ""},
    )

    assert list(client.iter_followers()) == [["a", "b"], ["c"]]
    assert [r.url.params.get("next_openid") for r in wechat.calls(USERS)] == [None, "b", "c"]


def test_iter_followers_stops_on_a_repeated_cursor(
    client: WeChatClient, wechat: ScriptedWeChat
) -> None:
    page = {"total": 1, "count": 1, "data": {"openid": ["a"]}, "next_openid": "a"}
    wechat.queue(USERS, page, page, page)

    assert list(client.iter_followers()) == [["a"], ["a"]]
    assert len(wechat.calls(USERS)) == 2


def test_last_follower_page_has_no_openids(client: WeChatClient, wechat: ScriptedWeChat) -> None:
    wechat.queue(USERS, {"total": 5, "count": 0, "next_openid": ""})
    page = client.get_followers("o5")
    assert (page.total, page.count, page.openids, page.next_openid) == (5, 0, [], None)


# -- error mapping ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("errcode", "kind"),
    [
        (40001, WeChatAuthError),
        (40014, WeChatAuthError),
        (42001, WeChatAuthError),
        (40125, WeChatAuthError),
        (40164, WeChatAuthError),
        (45009, WeChatRateLimited),
        (45011, WeChatRateLimited),
        (-1, WeChatTransientError),
        (45065, WeChatAlreadySent),
        (45028, WeChatQuotaExceeded),
        (40003, WeChatError),
        (40007, WeChatError),
    ],
)
def test_error_for_maps_errcodes(errcode: int, kind: type[WeChatError]) -> None:
    error = error_for(errcode, "message", {"errcode": errcode})
    assert type(error) is kind
    assert (error.errcode, error.errmsg) == (errcode, "message")


def test_already_sent_error_carries_msg_id() -> None:
    error = error_for(45065, "clientmsgid exist", {"msg_id": "1000000123"})
    assert isinstance(error, WeChatAlreadySent)
    assert error.msg_id == 1000000123
