"""What every response of the app shares, whichever route (or none) made it: error pages with
a fixed body that never quotes the request (Bottle's own 500 page prints the whole URL, with
its signature and openid), one log line without the query string for an unhandled exception,
``X-Content-Type-Options: nosniff`` (the webhook reflects ``echostr``) and, unless a route says
otherwise, ``Cache-Control: no-store``: nothing this app serves may be kept by a cache."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import bottle

log = logging.getLogger("newsbot.app")

_BODIES = {
    400: "请求有误",
    403: "拒绝访问",
    404: "页面不存在",
    405: "不支持这种请求方式",
    413: "请求内容过大",
    500: "服务器出错了，请稍后再试",
    503: "服务暂时不可用，请稍后再试",
}
_GENERIC = "请求无法处理"
_DEFAULT_HEADERS = (("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"))
MAX_LOGGED_PATH = 200

WsgiStart = Callable[..., Any]


def error_body(status: int) -> str:
    """The fixed text of an error response: its status and a few words, nothing from the
    request."""
    return f"{status} {_BODIES.get(status, _GENERIC)}\n"


def _request_target() -> str:
    """``METHOD /path`` of the current request, without the query string."""
    path = bottle.request.environ.get("PATH_INFO", "")
    return f"{bottle.request.environ.get('REQUEST_METHOD', '?')} {str(path)[:MAX_LOGGED_PATH]}"


def _catch_unhandled(callback: Callable[..., Any]) -> Callable[..., Any]:
    """Bottle plugin: a route's unexpected exception becomes a fixed 500 and one log line."""

    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except Exception as exc:
            log.error("unhandled %s on %s", type(exc).__name__, _request_target(),
                      exc_info=True)
            return bottle.HTTPError(500)

    return wrapper


class App(bottle.Bottle):  # type: ignore[misc]
    """A Bottle app with the policy above."""

    def __init__(self) -> None:
        super().__init__()
        # Exceptions are ours to handle: Bottle's catch-all writes its page (with the URL)
        # and a raw traceback to wsgi.errors.
        self.config["catchall"] = False
        self.install(_catch_unhandled)

    def default_error_handler(self, res: bottle.HTTPError) -> str:
        bottle.response.content_type = "text/plain; charset=utf-8"
        return error_body(res.status_code)

    def wsgi(self, environ: dict[str, Any], start_response: WsgiStart) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            present = {name.lower() for name, _ in headers}
            extra = [h for h in _DEFAULT_HEADERS if h[0].lower() not in present]
            return start_response(status, [*headers, *extra], exc_info)

        try:
            return super().wsgi(environ, start)  # type: ignore[no-any-return]
        except Exception as exc:  # outside any route: a hook, an error handler, the body
            log.error("unhandled %s on %s", type(exc).__name__,
                      f"{environ.get('REQUEST_METHOD', '?')} "
                      f"{str(environ.get('PATH_INFO', ''))[:MAX_LOGGED_PATH]}", exc_info=True)
            body = error_body(500).encode()
            start_response("500 Internal Server Error",
                           [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *_DEFAULT_HEADERS],
                           sys.exc_info())
            return [body]
