"""A loopback fake of the WeChat Official Account API with WeChat's semantics and errcodes,
for tests, benchmarks and ``newsbot demo``.

Run standalone: ``python -m bot.wechat.fake --port 0 --followers 1000``; the first stdout line
is the base URL."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import queue
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Final, Literal, cast
from urllib.parse import parse_qs, urlsplit

import httpx

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]

TOKEN_TTL_S: Final = 7200
# stable_token hands out a fresh token (old one still valid) in the last 5 minutes.
TOKEN_RENEW_WINDOW_S: Final = 300
FORCE_REFRESH_INTERVAL_S: Final = 30
FORCE_REFRESH_PER_DAY: Final = 20
CLIENTMSGID_TTL_S: Final = 24 * 3600
FOLLOWERS_PAGE: Final = 10_000
TEXT_MAX_BYTES: Final = 2048
SYSTEM_OPENID: Final = "oFakeSystemSender00000000000"
ACCOUNT_ID: Final = "gh_fake"

ERRMSG: Final[dict[int, str]] = {
    -1: "system error",
    40001: "invalid credential, access_token is invalid or not latest",
    40002: "invalid grant_type",
    40003: "invalid openid",
    40008: "invalid message type",
    40013: "invalid appid",
    40016: "invalid button size",
    40017: "invalid button type",
    40018: "invalid button name size",
    40019: "invalid button key size",
    40023: "invalid sub button size",
    40050: "invalid tag id",
    40054: "invalid sub button url domain",
    40055: "invalid button url domain",
    40066: "invalid url",
    40125: "invalid appsecret",
    40130: "invalid openid list size, at least two openid",
    41001: "access_token missing",
    41002: "appid missing",
    41004: "appsecret missing",
    42001: "access_token expired",
    44002: "empty post data",
    44004: "empty content",
    45002: "content size out of limit",
    45009: "reach max api daily quota limit",
    45011: "api minute-quota reach limit, must slower retry next minute",
    45015: "response out of time limit or subscription is canceled",
    45028: "has no masssend quota",
    45065: "clientmsgid exist",
    45047: "out of response count limit",
    45066: "same clientmsgid retry too fast",
    47001: "data format error",
    48001: "api unauthorized",
}

# WeChat does not decode \uXXXX escapes in message text; it shows them literally. Doubling the
# backslash of every unescaped \u reproduces that, so a client that escapes gets caught.
_UNICODE_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u")


class _WeChatFailure(Exception):
    def __init__(self, errcode: int, **extra: Any) -> None:
        super().__init__(errcode)
        self.errcode = errcode
        self.extra = extra


@dataclass(frozen=True)
class Call:
    """One request as the fake saw it; mass-send bodies are summarised (no openid lists)."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    errcode: int | None  # None when no JSON answer was sent (HTTP error, dropped connection)
    status: int  # 0 for a dropped connection
    time: float


@dataclass(frozen=True)
class MassSend:
    msg_id: int
    msg_data_id: int
    kind: Literal["sendall", "send"]
    content: str
    clientmsgid: str | None
    tag_id: int | None
    total_count: int
    sent_count: int
    time: float


@dataclass
class _Fault:
    kind: Literal["errcode", "http", "delay", "drop"]
    value: float
    times: int
    path: str | None


@dataclass
class _TokenState:
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expires_at
    current: str | None = None
    last_forced_at: float | None = None
    forced_day: int = -1
    forced_count: int = 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], fake: FakeWeChat) -> None:
        self.fake = fake
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the benchmark pushes many calls
    # Headers and body leave in separate writes; with Nagle on, each answer waits ~40 ms
    # for the client's delayed ACK.
    disable_nagle_algorithm = True
    timeout = 60

    def do_GET(self) -> None:
        cast(_Server, self.server).fake._handle(self, "GET")

    def do_POST(self) -> None:
        cast(_Server, self.server).fake._handle(self, "POST")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class FakeWeChat:
    """In-process HTTP server speaking the subset of the WeChat API the bot uses.

    Faults are queued with ``fail_next`` & co. and consumed in order by matching requests.
    ``followers`` may be replaced or appended to; in-place edits that keep the length must be
    followed by reassigning the list."""

    def __init__(
        self,
        *,
        app_id: str = "wx_fake",
        app_secret: str = "fake-secret",
        followers: Iterable[str] = (),
        tags: dict[int, list[str]] | None = None,
        webhook_url: str | None = None,
        webhook_token: str | None = None,
        clock: Callable[[], float] = time.time,
        host: str = "127.0.0.1",
        port: int = 0,
        sendall_quota_per_day: int | None = None,
    ) -> None:
        if webhook_url and not webhook_token:
            raise ValueError("webhook_url needs webhook_token to sign the callbacks")
        self.app_id = app_id
        self.app_secret = app_secret
        self.tags: dict[int, list[str]] = dict(tags or {})
        self.webhook_url = webhook_url
        self.webhook_token = webhook_token
        self.sendall_quota_per_day = sendall_quota_per_day
        self.calls: list[Call] = []
        self.deliveries: dict[str, int] = {}
        self.mass_sends: list[MassSend] = []
        self.previews: list[tuple[str, str]] = []
        self.custom_messages: list[tuple[str, str]] = []
        self.menu: JSONDict | None = None
        self.webhook_results: list[int | str] = []  # HTTP status, or the error text
        self.before_reply: Callable[[str, JSONDict], None] | None = None
        self._clock = clock
        self._host = host
        self._port = port
        self._lock = threading.RLock()
        self._faults: list[_Fault] = []
        self._token = _TokenState()
        self._followers: list[str] = list(followers)
        self._follower_set: frozenset[str] | None = None
        self._follower_set_len = -1
        self._cursors: dict[str, int] = {}  # next_openid handed out -> index of the next page
        self._clientmsgids: dict[str, tuple[int, float]] = {}
        self._sendall_days: dict[int, int] = {}
        self._next_msg_id = 1_000_000_001
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._webhook_queue: queue.Queue[tuple[int, int, int, int] | None] = queue.Queue()
        self._webhook_thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeWeChat:
        if self._server is not None:
            return self
        self._server = _Server((self._host, self._port), self)
        self._thread = threading.Thread(
            # A short poll interval keeps stop() (and so every test teardown) fast.
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-wechat",
            daemon=True,
        )
        self._thread.start()
        if self.webhook_url:
            self._webhook_thread = threading.Thread(
                target=self._webhook_worker, name="fake-wechat-webhook", daemon=True
            )
            self._webhook_thread.start()
        log.info("fake WeChat API at %s", self.base_url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._webhook_thread is not None:
            self._webhook_queue.put(None)
            self._webhook_thread.join(timeout=10)
        self._server = self._thread = self._webhook_thread = None

    def __enter__(self) -> FakeWeChat:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeWeChat is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def followers(self) -> list[str]:
        return self._followers

    @followers.setter
    def followers(self, value: Iterable[str]) -> None:
        with self._lock:
            self._followers = list(value)
            self._follower_set = None
            self._cursors.clear()

    @property
    def current_token(self) -> str | None:
        with self._lock:
            return self._token.current

    # -- fault injection -------------------------------------------------------------------

    def fail_next(self, errcode: int, times: int = 1, path: str | None = None) -> None:
        """Answer the next ``times`` matching requests with ``errcode`` (any path if None)."""
        self._add_fault(_Fault("errcode", errcode, times, path))

    def http_error_next(self, status: int, times: int = 1, path: str | None = None) -> None:
        self._add_fault(_Fault("http", status, times, path))

    def delay_next(self, seconds: float, times: int = 1, path: str | None = None) -> None:
        """Hold the next matching answers for ``seconds`` of real time."""
        self._add_fault(_Fault("delay", seconds, times, path))

    def drop_connection_next(self, times: int = 1, path: str | None = None) -> None:
        """Close the connection without answering (after reading the request)."""
        self._add_fault(_Fault("drop", 0, times, path))

    def _add_fault(self, fault: _Fault) -> None:
        if fault.times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._faults.append(fault)

    def _take_faults(self, path: str) -> tuple[float, _Fault | None]:
        """The delay and the first other fault queued for this path, each used up once."""
        delay = 0.0
        other: _Fault | None = None
        with self._lock:
            for fault in list(self._faults):
                if fault.path is not None and fault.path != path:
                    continue
                if fault.kind == "delay":
                    if delay:
                        continue
                    delay = fault.value
                elif other is None:
                    other = fault
                else:
                    continue
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
        return delay, other

    # -- HTTP plumbing ---------------------------------------------------------------------

    def _handle(self, handler: _Handler, method: str) -> None:
        split = urlsplit(handler.path)
        path = split.path
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        delay, fault = self._take_faults(path)
        if delay:
            time.sleep(delay)
        if fault is not None and fault.kind == "drop":
            self._record(method, path, query, None, None, 0)
            handler.close_connection = True
            return
        if fault is not None and fault.kind == "http":
            status = int(fault.value)
            self._record(method, path, query, None, None, status)
            self._write(handler, status, b"<html><body>fault</body></html>", "text/html")
            return
        body: Any = None
        try:
            if fault is not None:
                raise _WeChatFailure(int(fault.value))
            body = self._parse_body(method, raw)
            payload = self._route(method, path, query, body)
        except _WeChatFailure as failure:
            payload = {"errcode": failure.errcode, "errmsg": ERRMSG.get(failure.errcode, "error")}
            payload.update(failure.extra)
        except Exception:
            log.exception("fake WeChat failed on %s %s", method, path)
            self._record(method, path, query, None, None, 500)
            self._write(handler, 500, b"internal error", "text/plain")
            return
        errcode = int(payload.get("errcode", 0))
        self._record(method, path, query, _summarise(path, body), errcode, 200)
        hook = self.before_reply
        if hook is not None:
            # Tests use this to kill the client after WeChat accepted a call but before the
            # client could hear about it.
            hook(path, payload)
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self._write(handler, 200, data, "application/json; encoding=utf-8")

    @staticmethod
    def _write(handler: _Handler, status: int, data: bytes, content_type: str) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def _parse_body(method: str, raw: bytes) -> Any:
        if method != "POST":
            return None
        if not raw:
            raise _WeChatFailure(44002)
        try:
            text = raw.decode("utf-8")
            if "\\u" in text:
                text = _UNICODE_ESCAPE.sub(r"\1\\\\u", text)
            return json.loads(text)
        except ValueError:
            raise _WeChatFailure(47001) from None

    def _record(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        body: Any,
        errcode: int | None,
        status: int,
    ) -> None:
        call = Call(method, path, query, body, errcode, status, self._clock())
        with self._lock:
            self.calls.append(call)

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> JSONDict:
        with self._lock:
            if path == "/cgi-bin/stable_token":
                return self._stable_token(_require_object(body))
            handler = self._routes.get(path)
            if handler is None:
                raise _WeChatFailure(40066)
            self._check_token(query.get("access_token"))
            if method == "POST":
                body = _require_object(body)
            return handler(self, query, body)

    # -- tokens ----------------------------------------------------------------------------

    def _stable_token(self, body: JSONDict) -> JSONDict:
        if body.get("grant_type") != "client_credential":
            raise _WeChatFailure(40002)
        if not body.get("appid"):
            raise _WeChatFailure(41002)
        if not body.get("secret"):
            raise _WeChatFailure(41004)
        if body["appid"] != self.app_id:
            raise _WeChatFailure(40013)
        if body["secret"] != self.app_secret:
            raise _WeChatFailure(40125)
        now = self._clock()
        state = self._token
        if body.get("force_refresh") is True:
            day = int(now // 86400)
            if state.forced_day != day:
                state.forced_day, state.forced_count = day, 0
            too_soon = (
                state.last_forced_at is not None
                and now - state.last_forced_at < FORCE_REFRESH_INTERVAL_S
            )
            if too_soon or state.forced_count >= FORCE_REFRESH_PER_DAY:
                raise _WeChatFailure(45009)
            state.last_forced_at = now
            state.forced_count += 1
            # Forcing invalidates every earlier token at once.
            state.tokens.clear()
            return self._issue_token(now)
        current = state.current
        if current is not None:
            remaining = state.tokens.get(current, now) - now
            if remaining >= TOKEN_RENEW_WINDOW_S:
                return {"access_token": current, "expires_in": int(remaining)}
        return self._issue_token(now)

    def _issue_token(self, now: float) -> JSONDict:
        token = secrets.token_urlsafe(96)
        # Keep recently expired tokens so they still answer 42001 rather than 40001.
        horizon = now - TOKEN_TTL_S
        self._token.tokens = {t: e for t, e in self._token.tokens.items() if e > horizon}
        self._token.tokens[token] = now + TOKEN_TTL_S
        self._token.current = token
        return {"access_token": token, "expires_in": TOKEN_TTL_S}

    def _check_token(self, token: str | None) -> None:
        if not token:
            raise _WeChatFailure(41001)
        expires_at = self._token.tokens.get(token)
        if expires_at is None:
            raise _WeChatFailure(40001)
        if self._clock() >= expires_at:
            raise _WeChatFailure(42001)

    # -- followers -------------------------------------------------------------------------

    def _is_follower(self, openid: str) -> bool:
        if self._follower_set is None or self._follower_set_len != len(self._followers):
            self._follower_set = frozenset(self._followers)
            self._follower_set_len = len(self._followers)
        return openid in self._follower_set

    def _user_get(self, query: dict[str, str], body: Any) -> JSONDict:
        followers = self._followers
        cursor = query.get("next_openid", "")
        start = 0
        if cursor:
            start_or_none = self._cursors.get(cursor)
            if start_or_none is None or followers[start_or_none - 1 : start_or_none] != [cursor]:
                try:
                    start_or_none = followers.index(cursor) + 1
                except ValueError:
                    raise _WeChatFailure(40003) from None
            start = start_or_none
        page = followers[start : start + FOLLOWERS_PAGE]
        if not page:
            return {"total": len(followers), "count": 0, "next_openid": ""}
        if len(self._cursors) > 1000:
            self._cursors.clear()
        self._cursors[page[-1]] = start + len(page)
        return {
            "total": len(followers),
            "count": len(page),
            "data": {"openid": page},
            "next_openid": page[-1],
        }

    # -- messages --------------------------------------------------------------------------

    def _sendall(self, query: dict[str, str], body: JSONDict) -> JSONDict:
        content = _text_content(body)
        filter_ = body.get("filter")
        if not isinstance(filter_, dict):
            raise _WeChatFailure(47001)
        tag_id: int | None = None
        if filter_.get("is_to_all") is True:
            recipients: list[str] = self._followers
        else:
            tag_id = filter_.get("tag_id")
            if not isinstance(tag_id, int) or tag_id not in self.tags:
                raise _WeChatFailure(40050)
            recipients = [o for o in self.tags[tag_id] if self._is_follower(o)]
        now = self._clock()
        self._check_clientmsgid(body, now)
        if self.sendall_quota_per_day is not None:
            day = int(now // 86400)
            if self._sendall_days.get(day, 0) >= self.sendall_quota_per_day:
                raise _WeChatFailure(45028)
            self._sendall_days[day] = self._sendall_days.get(day, 0) + 1
        return self._deliver("sendall", body, content, tag_id, len(recipients), recipients, now)

    def _send(self, query: dict[str, str], body: JSONDict) -> JSONDict:
        touser = body.get("touser")
        if not isinstance(touser, list) or not all(isinstance(o, str) for o in touser):
            raise _WeChatFailure(47001)
        if not 2 <= len(touser) <= 10_000:
            raise _WeChatFailure(40130)
        content = _text_content(body)
        now = self._clock()
        self._check_clientmsgid(body, now)
        # Openids that do not follow the account are filtered out, as WeChat does.
        recipients = [o for o in touser if self._is_follower(o)]
        return self._deliver("send", body, content, None, len(touser), recipients, now)

    def _check_clientmsgid(self, body: JSONDict, now: float) -> None:
        clientmsgid = body.get("clientmsgid")
        if clientmsgid is None:
            return
        seen = self._clientmsgids.get(str(clientmsgid))
        if seen is not None and now - seen[1] < CLIENTMSGID_TTL_S:
            raise _WeChatFailure(45065, msg_id=seen[0])

    def _deliver(
        self,
        kind: Literal["sendall", "send"],
        body: JSONDict,
        content: str,
        tag_id: int | None,
        total: int,
        recipients: list[str],
        now: float,
    ) -> JSONDict:
        msg_id = self._next_msg_id
        self._next_msg_id += 1
        msg_data_id = 2_247_000_000 + msg_id % 1_000_000
        deliveries = self.deliveries
        for openid in recipients:
            deliveries[openid] = deliveries.get(openid, 0) + 1
        clientmsgid = body.get("clientmsgid")
        if clientmsgid is not None:
            self._clientmsgids[str(clientmsgid)] = (msg_id, now)
        self.mass_sends.append(
            MassSend(
                msg_id=msg_id,
                msg_data_id=msg_data_id,
                kind=kind,
                content=content,
                clientmsgid=None if clientmsgid is None else str(clientmsgid),
                tag_id=tag_id,
                total_count=total,
                sent_count=len(recipients),
                time=now,
            )
        )
        if self.webhook_url:
            self._webhook_queue.put((msg_id, total, len(recipients), len(recipients)))
        return {
            "errcode": 0,
            "errmsg": "send job submission success",
            "msg_id": msg_id,
            "msg_data_id": msg_data_id,
        }

    def _preview(self, query: dict[str, str], body: JSONDict) -> JSONDict:
        openid, content = self._single_text(body)
        self.previews.append((openid, content))
        return {"errcode": 0, "errmsg": "preview success", "msg_id": self._next_msg_id}

    def _custom_send(self, query: dict[str, str], body: JSONDict) -> JSONDict:
        openid, content = self._single_text(body)
        self.custom_messages.append((openid, content))
        self.deliveries[openid] = self.deliveries.get(openid, 0) + 1
        return {"errcode": 0, "errmsg": "ok"}

    def _single_text(self, body: JSONDict) -> tuple[str, str]:
        openid = body.get("touser")
        if not isinstance(openid, str) or not self._is_follower(openid):
            raise _WeChatFailure(40003)
        return openid, _text_content(body)

    def _menu_create(self, query: dict[str, str], body: JSONDict) -> JSONDict:
        buttons = body.get("button")
        if not isinstance(buttons, list) or not 1 <= len(buttons) <= 3:
            raise _WeChatFailure(40016)
        for button in buttons:
            _check_button(button, top=True)
        self.menu = body
        return {"errcode": 0, "errmsg": "ok"}

    _routes: Final[dict[str, Callable[[FakeWeChat, dict[str, str], Any], JSONDict]]] = {
        "/cgi-bin/user/get": _user_get,
        "/cgi-bin/message/mass/sendall": _sendall,
        "/cgi-bin/message/mass/send": _send,
        "/cgi-bin/message/mass/preview": _preview,
        "/cgi-bin/message/custom/send": _custom_send,
        "/cgi-bin/menu/create": _menu_create,
    }

    # -- MASSSENDJOBFINISH callback --------------------------------------------------------

    def _webhook_worker(self) -> None:
        with httpx.Client(timeout=5.0) as http:
            while True:
                item = self._webhook_queue.get()
                if item is None:
                    return
                self._post_job_finish(http, *item)

    def _post_job_finish(
        self, http: httpx.Client, msg_id: int, total: int, filtered: int, sent: int
    ) -> None:
        assert self.webhook_url is not None and self.webhook_token is not None
        timestamp = str(int(self._clock()))
        nonce = str(secrets.randbelow(10**10))
        signature = wechat_signature(self.webhook_token, timestamp, nonce)
        xml = (
            f"<xml><ToUserName><![CDATA[{ACCOUNT_ID}]]></ToUserName>"
            f"<FromUserName><![CDATA[{SYSTEM_OPENID}]]></FromUserName>"
            f"<CreateTime>{timestamp}</CreateTime>"
            "<MsgType><![CDATA[event]]></MsgType>"
            "<Event><![CDATA[MASSSENDJOBFINISH]]></Event>"
            f"<MsgID>{msg_id}</MsgID>"
            "<Status><![CDATA[send success]]></Status>"
            f"<TotalCount>{total}</TotalCount>"
            f"<FilterCount>{filtered}</FilterCount>"
            f"<SentCount>{sent}</SentCount>"
            "<ErrorCount>0</ErrorCount></xml>"
        )
        params = {
            "signature": signature,
            "timestamp": timestamp,
            "nonce": nonce,
            "openid": SYSTEM_OPENID,
        }
        result: int | str
        try:
            response = http.post(
                self.webhook_url,
                params=params,
                content=xml.encode("utf-8"),
                headers={"Content-Type": "text/xml"},
            )
            result = response.status_code
        except httpx.HTTPError as exc:
            # Best effort, like WeChat: a lost callback is not retried forever.
            log.warning("MASSSENDJOBFINISH callback for %d failed: %s", msg_id, exc)
            result = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.webhook_results.append(result)


def wechat_signature(token: str, timestamp: str, nonce: str) -> str:
    """The ``signature`` query parameter WeChat puts on every push to the webhook."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce])).encode("utf-8")).hexdigest()


def _require_object(body: Any) -> JSONDict:
    if not isinstance(body, dict):
        raise _WeChatFailure(47001)
    return body


def _text_content(body: JSONDict) -> str:
    if body.get("msgtype") != "text":
        raise _WeChatFailure(40008)
    text = body.get("text")
    content = text.get("content") if isinstance(text, dict) else None
    if not isinstance(content, str) or not content:
        raise _WeChatFailure(44004)
    if len(content.encode("utf-8")) > TEXT_MAX_BYTES:
        raise _WeChatFailure(45002)
    return content


def _check_button(button: Any, *, top: bool) -> None:
    if not isinstance(button, dict):
        raise _WeChatFailure(47001)
    name = button.get("name")
    if not isinstance(name, str) or not name or len(name.encode("utf-8")) > (16 if top else 60):
        raise _WeChatFailure(40018)
    subs = button.get("sub_button")
    if top and subs:
        if not isinstance(subs, list) or len(subs) > 5:
            raise _WeChatFailure(40023)
        for sub in subs:
            _check_button(sub, top=False)
        return
    kind = button.get("type")
    if kind == "click":
        key = button.get("key")
        if not isinstance(key, str) or not key or len(key.encode("utf-8")) > 128:
            raise _WeChatFailure(40019)
    elif kind == "view":
        url = button.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise _WeChatFailure(40055 if top else 40054)
    else:
        raise _WeChatFailure(40017)


def _summarise(path: str, body: Any) -> Any:
    """Mass-send bodies can hold 10,000 openids; keep only what a test needs to see."""
    if not isinstance(body, dict):
        return body
    if path == "/cgi-bin/stable_token":
        return {**body, "secret": "***"} if "secret" in body else body
    if path == "/cgi-bin/message/mass/send" and isinstance(body.get("touser"), list):
        touser = body["touser"]
        summary = {k: v for k, v in body.items() if k != "touser"}
        summary["touser_count"] = len(touser)
        summary["first_openid"] = touser[0] if touser else None
        summary["last_openid"] = touser[-1] if touser else None
        return summary
    return body


def fake_openids(count: int) -> list[str]:
    """Deterministic 28-character openids, shaped like WeChat's."""
    return [f"ofake{i:023d}" for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a fake WeChat API on loopback.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--followers", type=int, default=0, help="number of fake followers")
    parser.add_argument("--app-id", default="wx_fake")
    parser.add_argument("--app-secret", default="fake-secret")
    parser.add_argument("--webhook-url")
    parser.add_argument("--webhook-token")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stopping = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    fake = FakeWeChat(
        app_id=args.app_id,
        app_secret=args.app_secret,
        followers=fake_openids(args.followers),
        webhook_url=args.webhook_url,
        webhook_token=args.webhook_token,
        host=args.host,
        port=args.port,
    )
    with fake:
        # The parent process reads this first line to find the port.
        sys.stdout.write(fake.base_url + "\n")
        sys.stdout.flush()
        stopping.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
