"""The operators' console: sessions, CSRF, audited actions and the page layout.

An operator gets a one-time link (``#console`` in the chat, or ``newsbot console-link``);
opening it starts a session (a random cookie; only its hash is stored) bound to that
operator for ``[console] session_hours``. Every page checks the session, and that its openid
is still in ``[operators] openids``. Pages are server-rendered HTML with one stylesheet served
from here and charts drawn as SVG by the server: nothing is fetched from anywhere else, which
the Content-Security-Policy enforces.

Page modules (bot/console/pages/) register with :meth:`Console.page` (GET, returns the page's
HTML body) and :meth:`Console.action` (POST, state-changing). An action is refused without a
valid session and the session's CSRF token, and every action that reaches its function is
audited (operator, time, action, target, result) in ``operator_action``: ``newsbot audit``
lists them. An action returns :class:`Done` or raises :class:`Refused`; either way the
browser is redirected back (POST/redirect/GET) with a one-line message signed for this
session, so a crafted URL cannot put words on the console.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import bottle
from sqlalchemy import Engine
from sqlmodel import Session

from bot.console.links import ConsoleLinks
from bot.settings import Settings
from handlers.config import ChatConfig
from storage import console as store
from storage.db import read_only, transaction
from storage.errors import DomainError

log = logging.getLogger("newsbot.console")

PREFIX = "/console"
COOKIE = "newsbot_console"
MAX_UPLOAD_BYTES = 2 * 1024 * 1024
_CSS = Path(__file__).with_name("console.css")
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY"}


def esc(value: object) -> str:
    """HTML-escape anything for text or a quoted attribute."""
    return html.escape(str(value), quote=True)


class Refused(Exception):
    """The action cannot be carried out as asked; ``message`` (Chinese) is shown, nothing is
    written, and the refusal is audited."""

    def __init__(self, message: str, *, target: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.target = target


@dataclass(frozen=True)
class Done:
    """An action carried out: ``message`` is shown on the page ``redirect`` (default: the
    page the form was on). ``response``, when given, is sent instead of the redirect (a
    download that exists only now, such as a new batch's codes)."""

    message: str
    target: str = ""
    detail: str | dict[str, Any] = ""
    redirect: str | None = None
    response: bottle.HTTPResponse | None = None


@dataclass
class ConsoleRequest:
    """What a page or action function gets: the operator, the request's parameters, and
    sessions on the database (the action's own writes go in one ``transaction()``)."""

    operator: str
    csrf: str
    console: Console
    now: datetime
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        return self.console.settings

    @property
    def config(self) -> ChatConfig:
        return self.console.config

    @property
    def engine(self) -> Engine:
        return self.console.engine

    @property
    def query(self) -> bottle.FormsDict:
        return bottle.request.query

    @property
    def form(self) -> bottle.FormsDict:
        return bottle.request.forms

    @property
    def files(self) -> bottle.FormsDict:
        return bottle.request.files

    def get(self, name: str, default: str = "") -> str:
        """A form (POST) or query (GET) field as text, decoded as UTF-8."""
        source = bottle.request.forms if bottle.request.method == "POST" else bottle.request.query
        value = source.getunicode(name, default=default)
        return str(value) if value is not None else default

    def csrf_field(self) -> str:
        """The hidden input every POST form must carry."""
        return f'<input type="hidden" name="csrf" value="{esc(self.csrf)}">'

    def form_tag(self, action: str, *, extra: str = "", multipart: bool = False) -> str:
        """``<form method=post …>`` plus the CSRF field; close it with ``</form>``."""
        enc = ' enctype="multipart/form-data"' if multipart else ""
        return f'<form method="post" action="{esc(action)}"{enc} {extra}>{self.csrf_field()}'

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with transaction(self.engine) as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        with read_only(self.engine) as session:
            yield session


PageFn = Callable[[ConsoleRequest], "str | bottle.HTTPResponse"]
ActionFn = Callable[[ConsoleRequest], Done]


@dataclass(frozen=True)
class NavItem:
    path: str
    label: str
    order: int


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class Console:
    def __init__(self, settings: Settings, engine: Engine, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.config = settings.chat_config()
        self.engine = engine
        self.clock = clock
        self.links = ConsoleLinks(settings)
        self.nav: list[NavItem] = []
        self._routes: list[tuple[str, str, Callable[..., Any]]] = []
        self.secure_cookie = settings.server.public_url.startswith("https://")

    # -- registration ------------------------------------------------------------------------

    def page(self, path: str, *, title: str, nav: str | None = None,
             order: int = 100) -> Callable[[PageFn], PageFn]:
        """A GET page at ``PREFIX + path``; ``nav`` puts it in the menu."""
        full = PREFIX + path

        def register(fn: PageFn) -> PageFn:
            if nav is not None:
                self.nav.append(NavItem(full, nav, order))
                self.nav.sort(key=lambda item: item.order)

            def view(**kwargs: Any) -> Any:
                req = self._authenticated()
                if isinstance(req, bottle.HTTPResponse):
                    return req
                req.args = kwargs
                body = fn(req)
                if isinstance(body, bottle.HTTPResponse):
                    return body
                return self._html(self.layout(req, title=title, body=body, active=full))

            self._routes.append((full, "GET", view))
            return fn

        return register

    def action(self, path: str, *, name: str) -> Callable[[ActionFn], ActionFn]:
        """A POST action at ``PREFIX + path``, audited under ``name``."""
        full = PREFIX + path

        def register(fn: ActionFn) -> ActionFn:
            def view(**kwargs: Any) -> Any:
                req = self._authenticated(posting=True)
                if isinstance(req, bottle.HTTPResponse):
                    return req
                req.args = kwargs
                back = self._back(full)
                try:
                    done = fn(req)
                except Refused as refused:
                    self._audit(req, name, "refused", refused.target, refused.message)
                    return self._redirect(req, back, refused.message, ok=False)
                except DomainError as err:
                    self._audit(req, name, "refused", "", f"{type(err).__name__}: {err}")
                    return self._redirect(req, back, f"操作被拒绝：{err}", ok=False)
                except Exception as exc:
                    log.exception("console action %s failed", name)
                    self._audit(req, name, "error", "", type(exc).__name__)
                    return self._redirect(req, back, "操作失败（服务器出错），没有做任何更改。",
                                          ok=False)
                self._audit(req, name, "ok", done.target, done.detail)
                if done.response is not None:
                    return done.response
                return self._redirect(req, done.redirect or back, done.message, ok=True)

            self._routes.append((full, "POST", view))
            return fn

        return register

    def install(self, app: bottle.Bottle) -> None:
        app.route(PREFIX + "/open", "GET", self.open)
        app.route(PREFIX + "/logout", "POST", self.logout)
        app.route(PREFIX + "/console.css", "GET", self.stylesheet)
        for path, method, view in self._routes:
            app.route(path, method, view)

    # -- sessions ----------------------------------------------------------------------------

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def open(self) -> Any:
        """The one-time link: start a session and send the browser to the dashboard."""
        q = bottle.request.query
        openid = str(q.getunicode("u", default="") or "")
        problem = self.links.verify(openid=openid, raw_expires=str(q.get("e", "")),
                                    nonce=str(q.get("n", "")), sig=str(q.get("s", "")),
                                    now=self.clock())
        if problem == "expired":
            return self._notice(403, "链接已过期", "登录链接只在发出后的几分钟内有效。"
                                "请在公众号里再发送 #console 获取新链接。")
        if problem is not None or not self.config.is_operator(openid):
            return self._notice(403, "无法登录", "这个链接无效，或者你不是本号的运营者。")
        token = secrets.token_urlsafe(32)
        now = self.now()
        with transaction(self.engine) as session:
            started = store.start_session(
                session, openid=openid, grant_nonce=str(q.get("n", "")),
                token_sha256=_sha256(token), csrf=secrets.token_urlsafe(24), now=now,
                hours=self.settings.console.session_hours)
        if not started:
            return self._notice(403, "链接已用过", "每个登录链接只能打开一次。"
                                "请在公众号里再发送 #console 获取新链接。")
        response = bottle.HTTPResponse(status=303, headers={"Location": PREFIX + "/"})
        response.set_cookie(COOKIE, token, path=PREFIX, httponly=True, samesite="strict",
                            secure=self.secure_cookie,
                            max_age=self.settings.console.session_hours * 3600)
        return response

    def logout(self) -> Any:
        req = self._authenticated(posting=True)
        if isinstance(req, bottle.HTTPResponse):
            return req
        token = bottle.request.get_cookie(COOKIE) or ""
        with transaction(self.engine) as session:
            store.end_session(session, token_sha256=_sha256(token), now=req.now)
            store.audit(session, operator=req.operator, action="logout", result="ok",
                        at=req.now)
        response = self._notice(200, "已退出", "需要时在公众号里发送 #console 重新登录。")
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    def _authenticated(self, *, posting: bool = False) -> ConsoleRequest | bottle.HTTPResponse:
        token = bottle.request.get_cookie(COOKIE) or ""
        now = self.now()
        found = None
        if token:
            with read_only(self.engine) as session:
                found = store.active_session(session, token_sha256=_sha256(token), now=now)
        if found is None:
            log.info("console: no valid session for %s %s", bottle.request.method,
                     bottle.request.path)
            return self._notice(403, "请先登录", "登录已过期或尚未登录。请在公众号里发送 "
                                "#console（仅限运营者），打开回复中的链接。")
        if not self.config.is_operator(found.openid):
            return self._notice(403, "无法访问", "你已不在本号的运营者名单中。")
        req = ConsoleRequest(operator=found.openid, csrf=found.csrf, console=self, now=now)
        if posting:
            refusal = self._check_post(req)
            if refusal == "body too large":
                self._audit(req, f"upload:{bottle.request.path}"[:40], "refused", "", refusal)
                return self._notice(413, "内容过大", f"一次最多上传 {MAX_UPLOAD_BYTES // 2**20} MB"
                                    "。请分几次上传，或用 newsbot issue import 导入。")
            if refusal is not None:
                self._audit(req, f"csrf:{bottle.request.path}"[:40], "refused", "", refusal)
                return self._notice(403, "操作被拒绝", "表单已失效（可能是页面放置太久或来自"
                                    "别的网站）。请刷新页面后重试。")
        return req

    def _check_post(self, req: ConsoleRequest) -> str | None:
        """Why this POST is refused (a missing or wrong CSRF token, a foreign Origin)."""
        if (bottle.request.content_length or 0) > MAX_UPLOAD_BYTES:
            return "body too large"
        origin = bottle.request.get_header("Origin")
        if origin and origin != "null":
            host = bottle.request.get_header("Host") or ""
            if urlsplit(origin).netloc != host:
                return "foreign origin"
        given = str(bottle.request.forms.get("csrf", ""))
        if not given or not hmac.compare_digest(given.encode("utf-8", "replace"),
                                                req.csrf.encode()):
            return "bad csrf token"
        return None

    def _audit(self, req: ConsoleRequest, action: str, result: str, target: str,
               detail: str | dict[str, Any]) -> None:
        try:
            with transaction(self.engine) as session:
                store.audit(session, operator=req.operator, action=action, result=result,
                            at=req.now, target=target, detail=detail)
        except Exception:
            log.exception("console: could not audit %s (%s)", action, result)

    # -- responses ---------------------------------------------------------------------------

    def _back(self, default: str) -> str:
        """Where to send the browser after an action: the form's ``next`` field when it is a
        console path, else the page the action sits under."""
        given = str(bottle.request.forms.get("next", ""))
        if given.startswith(PREFIX + "/") and "//" not in given and "\\" not in given:
            return given
        return default.rsplit("/", 1)[0] or PREFIX + "/"

    def _flash_mac(self, req: ConsoleRequest, text: str, kind: str) -> str:
        digest = hmac.new(req.csrf.encode(), f"{kind}\n{text}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()[:18]).decode()

    def _redirect(self, req: ConsoleRequest, path: str, message: str, *, ok: bool) -> Any:
        kind = "ok" if ok else "error"
        sep = "&" if "?" in path else "?"
        query = urlencode({"m": message, "k": kind, "ms": self._flash_mac(req, message, kind)})
        return bottle.HTTPResponse(status=303, headers={"Location": f"{path}{sep}{query}"})

    def _flash(self, req: ConsoleRequest) -> str:
        q = bottle.request.query
        text = str(q.getunicode("m", default="") or "")
        kind = str(q.get("k", ""))
        if not text or kind not in ("ok", "error") or not hmac.compare_digest(
                str(q.get("ms", "")).encode("utf-8", "replace"),
                self._flash_mac(req, text, kind).encode()):
            return ""
        role = "status" if kind == "ok" else "alert"
        return f'<p class="flash {kind}" role="{role}">{esc(text)}</p>'

    def _html(self, body: str, status: int = 200) -> bottle.HTTPResponse:
        headers = {"Content-Type": "text/html; charset=utf-8", **_HEADERS}
        return bottle.HTTPResponse(body=body, status=status, headers=headers)

    def _notice(self, status: int, heading: str, text: str) -> bottle.HTTPResponse:
        body = (f"<main class=notice><h1>{esc(heading)}</h1><p>{esc(text)}</p></main>")
        return self._html(self._document(heading, body), status)

    def stylesheet(self) -> Any:
        return bottle.HTTPResponse(body=_CSS.read_bytes(), headers={
            "Content-Type": "text/css; charset=utf-8", "Cache-Control": "max-age=3600",
            "X-Content-Type-Options": "nosniff"})

    def _document(self, title: str, body: str) -> str:
        publication = esc(self.settings.content.publication)
        return ("<!doctype html><html lang=zh-CN><head><meta charset=utf-8>"
                '<meta name=viewport content="width=device-width, initial-scale=1">'
                f"<title>{esc(title)} · {publication} 后台</title>"
                f'<link rel=stylesheet href="{PREFIX}/console.css">'
                # No icon: the browser would otherwise ask for /favicon.ico (a 404) every time.
                '<link rel=icon href="data:,"></head>'
                f"<body>{body}</body></html>")

    def layout(self, req: ConsoleRequest, *, title: str, body: str, active: str) -> str:
        links = "".join(
            f'<a href="{esc(item.path)}"'
            f'{" aria-current=page" if item.path == active else ""}>{esc(item.label)}</a>'
            for item in self.nav)
        who = esc(req.operator[-6:])
        header = (f'<header><a class=brand href="{PREFIX}/">'
                  f"{esc(self.settings.content.publication)} 后台</a>"
                  f"<nav>{links}</nav>"
                  f'<form method=post action="{PREFIX}/logout" class=logout>'
                  f"{req.csrf_field()}<span title=运营者>…{who}</span>"
                  "<button type=submit>退出</button></form></header>")
        main = f"<main><h1>{esc(title)}</h1>{self._flash(req)}{body}</main>"
        return self._document(title, header + main)


def create_console(settings: Settings, engine: Engine, *,
                   clock: Callable[[], float] = time.time) -> Console:
    """The console with every page module registered (bot.console.pages.MODULES)."""
    from bot.console import pages

    console = Console(settings, engine, clock=clock)
    for module in pages.MODULES:
        module.install(console)
    return console
