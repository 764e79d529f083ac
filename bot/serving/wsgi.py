"""WSGI (PEP 3333) on top of a request that h11 has parsed and the event loop has buffered: the
environ for it, and one call of the application that collects the whole response.

Both run with the request complete, so the application never reads from a socket: its
``wsgi.input`` is the buffered (de-chunked) body and ``CONTENT_LENGTH`` its exact length."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import h11

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

SERVER_SOFTWARE = "newsbot"
# CGI puts these two in CONTENT_TYPE/CONTENT_LENGTH; the framing headers are the server's
# business (the body is already de-chunked and its length known).
_NOT_HTTP_VARS = frozenset({b"content-type", b"content-length", b"transfer-encoding"})


@dataclass(frozen=True)
class Peer:
    """One end of a connection as WSGI names it: host and port as strings ("" for a Unix
    socket's port)."""

    host: str
    port: str

    @classmethod
    def of(cls, address: Any) -> Peer:
        if isinstance(address, tuple) and len(address) >= 2:
            return cls(str(address[0]), str(address[1]))
        return cls(str(address or ""), "")


def build_environ(request: h11.Request, body: bytes, *, client: Peer, server: Peer,
                  multiprocess: bool) -> dict[str, Any]:
    target = request.target
    if not target.startswith(b"/") and b"://" in target:  # absolute form (RFC 9112 §3.2.2)
        parts = urlsplit(target)
        path, query = parts.path or b"/", parts.query
    else:
        path, _, query = target.partition(b"?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method.decode("ascii"),
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "RAW_URI": target.decode("latin-1"),
        "SERVER_NAME": server.host,
        "SERVER_PORT": server.port,
        "SERVER_PROTOCOL": "HTTP/" + request.http_version.decode("ascii"),
        "SERVER_SOFTWARE": SERVER_SOFTWARE,
        "REMOTE_ADDR": client.host,
        "REMOTE_PORT": client.port,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": multiprocess,
        "wsgi.run_once": False,
    }
    framed = False
    for name, value in request.headers:  # h11 gives names lower-cased
        if name in (b"content-length", b"transfer-encoding"):
            framed = True
        if name == b"content-type":
            environ["CONTENT_TYPE"] = value.decode("latin-1")
        if name in _NOT_HTTP_VARS or b"_" in name:
            # A name with "_" would map onto the same variable as its "-" twin (X_Real_IP
            # spoofing X-Real-IP): dropped, as gunicorn does by default.
            continue
        key = "HTTP_" + name.decode("ascii").upper().replace("-", "_")
        text = value.decode("latin-1")
        environ[key] = f"{environ[key]},{text}" if key in environ else text
    if framed:
        environ["CONTENT_LENGTH"] = str(len(body))
    return environ


@dataclass(frozen=True)
class AppResponse:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


class AppError(Exception):
    """The application broke the WSGI contract (no start_response, a bad status line or a
    header that cannot be sent): the caller answers 500."""


def call_app(app: WSGIApp, environ: dict[str, Any]) -> AppResponse:
    """Run the application once and collect its whole response. Exceptions from the
    application propagate; contract violations raise AppError."""
    started: list[tuple[str, list[tuple[str, str]]]] = []
    chunks: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]],
                       exc_info: ExcInfo | None = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if chunks:  # body already "sent" through write(): too late to change
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif started:
            raise AppError("start_response called twice without exc_info")
        started[:] = [(status, headers)]
        return chunks.append

    result = app(environ, start_response)
    try:
        for chunk in result:
            if chunk:
                chunks.append(bytes(chunk))
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if not started:
        raise AppError("the application did not call start_response")
    status_line, raw_headers = started[0]
    code, _, reason = status_line.partition(" ")
    if not (len(code) == 3 and code.isdigit() and 200 <= int(code) <= 599):
        raise AppError("bad status line")
    try:
        headers = [(str(k).encode("latin-1"), str(v).encode("latin-1"))
                   for k, v in raw_headers]
        reason_bytes = reason.encode("latin-1")
    except UnicodeEncodeError:
        raise AppError("a response header is not latin-1") from None
    return AppResponse(int(code), reason_bytes, headers, b"".join(chunks))
