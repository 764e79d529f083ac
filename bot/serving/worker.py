"""A gunicorn worker that buffers each request completely before a thread runs the app.

Why: gunicorn's gthread worker hands a connection to a thread as soon as its first bytes
arrive, and the thread then blocks reading the rest. A client that sends 80 bytes of headers
and waits holds that thread for as long as it likes, so as many such connections as a server
has threads stop it (8 stop a 2 × 4 server). Here one event loop per worker process reads
every connection without blocking and feeds the bytes to h11 (a sans-I/O HTTP/1.1 parser:
request line, headers, Content-Length and chunked bodies, size limits); only a request that h11
has seen end completely goes to the thread pool, with its body in memory. A slow or idle
client therefore costs one socket in a selector, never a thread, and real deliveries keep
getting threads at once.

Limits, all absolute (a client trickling a byte a second gains nothing):
- the request head (request line + headers) must be complete ``header_timeout_s`` after the
  connection was accepted, or after the first byte of a kept-alive connection's next request;
- the body ``body_timeout_s`` after the head; a request that misses either gets 408;
- a kept-alive connection may sit idle ``cfg.keepalive`` seconds; one that never sends a byte
  is closed after ``header_timeout_s``;
- the response must be taken by the client within ``write_timeout_s``;
- the head may be ``max_header_bytes`` (431 beyond), the body ``max_body_bytes`` (413 as soon
  as a Content-Length or the chunks say so, before the rest is read);
- at most ``cfg.worker_connections`` open connections per worker. A new connection beyond
  that closes the oldest connection that is still sending its request or sitting idle (never
  one whose request is running or being answered), so filling the table does not lock real
  clients out: their requests complete in milliseconds and are never the oldest.

Malformed requests (a bad chunk-size line, a body cut short, both Content-Length and
Transfer-Encoding, a broken head) are answered here with a fixed 4xx text that echoes nothing
of the request, one log line each, and the connection closed; the app never sees them.
Timeouts and evictions are counted and logged as one summary line per ``SUMMARY_INTERVAL_S``,
so an attack cannot flood the log.

gunicorn stays the process manager: the arbiter forks these workers, restarts them, stops them
gracefully, runs the ``when_ready``/``on_exit`` hooks (the scheduler process) and watches the
heartbeat, which this loop sends on every turn. Only gunicorn's documented ``Worker`` base API
is used, not gthread's internals. No TLS (terminate it in front, see docs/deploy.md) and no
HTTP/2."""

from __future__ import annotations

import contextlib
import email.utils
import enum
import errno
import logging
import os
import re
import resource
import selectors
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from queue import Empty, SimpleQueue
from typing import Any

import h11
from gunicorn.workers.base import Worker

from bot.serving.wsgi import AppError, AppResponse, Peer, WSGIApp, build_environ, call_app

log = logging.getLogger("newsbot.http")

RECV_BYTES = 64 * 1024
ACCEPT_BATCH = 16
SWEEP_INTERVAL_S = 0.25
SUMMARY_INTERVAL_S = 10.0
# After a final response: stop writing, then read and discard for this long before closing,
# so the client reads the response instead of a reset (it may still be sending its body).
LINGER_S = 2.0
# On SIGTERM, how long a request still being received may take to arrive.
STOP_READ_GRACE_S = 2.0
# File descriptors kept free for the database, log files and the wake-up pipe.
RESERVED_FDS = 64
_PATH_UNSAFE = re.compile(r"[^A-Za-z0-9/._~%+-]")


class Phase(enum.Enum):
    IDLE = "idle"  # kept alive between requests, nothing of the next one received yet
    HEAD = "head"  # accepted, or the next request has started: reading request line + headers
    BODY = "body"  # reading the body
    APP = "app"  # complete; a thread runs the app (the loop neither reads nor times it out)
    SEND = "send"  # writing the response
    LINGER = "linger"  # final response written: discarding input until EOF or LINGER_S


READABLE = (Phase.IDLE, Phase.HEAD, Phase.BODY, Phase.LINGER)
# What the connection cap may close to make room: nothing with a request in hand.
EVICTABLE = (Phase.IDLE, Phase.HEAD, Phase.BODY, Phase.LINGER)


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    client: Peer
    server: Peer
    http: h11.Connection  # the connection's HTTP/1.1 state (h11)
    phase: Phase
    since: float  # when the current request (or idle spell) began: the cap evicts the oldest
    deadline: float | None
    got_bytes: bool = False  # anything of the current request received
    request: h11.Request | None = None
    body: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    close_after_send: bool = False
    events: int = 0  # selector interest currently registered
    closed: bool = False
    body_limit: int = 0  # of the current request: max_body_bytes, or the upload limit


_date_cache: tuple[int, bytes] = (0, b"")


def _http_date(now: float) -> bytes:
    global _date_cache
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second, usegmt=True).encode("ascii"))
    return _date_cache[1]


def _log_path(request: h11.Request | None) -> str:
    """The request's path for a log line: no query string (signatures, openids), only
    harmless characters, bounded."""
    if request is None:
        return "-"
    path = request.target.partition(b"?")[0].decode("latin-1")
    return _PATH_UNSAFE.sub("?", path)[:80] or "-"


def _log_method(request: h11.Request | None) -> str:
    if request is None:
        return "-"
    return _PATH_UNSAFE.sub("?", request.method.decode("latin-1"))[:16]


class BufferingWorker(Worker):  # type: ignore[misc]
    header_timeout_s = 10.0
    body_timeout_s = 10.0
    write_timeout_s = 10.0
    max_header_bytes = 32 * 1024
    max_body_bytes = 64 * 1024
    # Paths that take file uploads (the console's issue import), and their larger limit.
    upload_prefixes: tuple[bytes, ...] = ()
    max_upload_bytes = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.alive: bool = True
        self.conns: dict[int, Conn] = {}
        self.done: SimpleQueue[tuple[Conn, bytes | None]] = SimpleQueue()
        self.stats: Counter[str] = Counter()
        self.accepting = False
        self.stopping = False
        self.max_connections = int(self.cfg.worker_connections)
        self.keepalive_s = float(self.cfg.keepalive)

    # ------------------------------------------------------------------ gunicorn lifecycle

    def init_process(self) -> None:
        if self.cfg.is_ssl:
            raise RuntimeError("newsbot's worker does not terminate TLS: put a TLS proxy in "
                               "front (docs/deploy.md) and leave certfile/keyfile unset")
        self.max_connections = self._fit_connection_cap(self.max_connections)
        self.pool = ThreadPoolExecutor(max_workers=int(self.cfg.threads),
                                       thread_name_prefix="newsbot-request")
        self.selector = selectors.DefaultSelector()
        super().init_process()  # sets up signals and the wake-up pipe, loads the app, run()

    def _fit_connection_cap(self, wanted: int) -> int:
        """Raise the soft file-descriptor limit towards what the cap needs; lower the cap when
        the hard limit does not allow it (accept() failing with EMFILE is worse)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = wanted + RESERVED_FDS
        if soft != resource.RLIM_INFINITY and soft < need:
            target = need if hard == resource.RLIM_INFINITY else min(need, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        if soft != resource.RLIM_INFINITY and soft < need:
            fitted = max(int(self.cfg.threads) * 2, soft - RESERVED_FDS)
            log.warning("open-file limit %d allows %d connections per worker, not %d",
                        soft, fitted, wanted)
            return fitted
        return wanted

    def run(self) -> None:
        self.selector.register(self.PIPE[0], selectors.EVENT_READ, None)
        for listener in self.sockets:
            listener.setblocking(False)
        self._set_accepting(True)
        last_sweep = last_summary = time.monotonic()
        self.notify()
        while self.alive:
            self._turn(SWEEP_INTERVAL_S)
            now = time.monotonic()
            if now - last_sweep >= SWEEP_INTERVAL_S:
                last_sweep = now
                self.notify()  # the arbiter's heartbeat: this loop is alive
                self._sweep(now)
                if self.ppid != os.getppid():
                    log.info("parent changed, shutting down")
                    self.alive = False
            if now - last_summary >= SUMMARY_INTERVAL_S:
                last_summary = now
                self._summary()
        self._stop_gracefully()

    def _turn(self, timeout: float) -> None:
        try:
            ready = self.selector.select(timeout)
        except InterruptedError:
            ready = []
        for key, mask in ready:
            conn = key.data
            if conn is None:
                self._drain_wakeups()
            elif isinstance(conn, Conn):
                if conn.closed:
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._flush(conn)
                if mask & selectors.EVENT_READ and not conn.closed:
                    self._on_readable(conn)
            else:
                self._accept(conn)
        self._finish_done()

    def _stop_gracefully(self) -> None:
        """SIGTERM: take no new connections. A request still being sent, or about to be sent
        on a kept-alive connection, gets STOP_READ_GRACE_S to arrive (so slow clients cannot
        hold up a stop); requests already complete run and are answered (with Connection:
        close) within graceful_timeout."""
        self.stopping = True
        self._set_accepting(False)
        for listener in self.sockets:
            listener.close()
        now = time.monotonic()
        deadline = now + float(self.cfg.graceful_timeout)
        reading_until = now + STOP_READ_GRACE_S
        while time.monotonic() < deadline:
            self.notify()
            now = time.monotonic()
            for conn in list(self.conns.values()):
                if conn.phase is Phase.LINGER or (conn.phase in READABLE
                                                  and now >= reading_until):
                    self._close(conn)
            if not self.conns:
                break
            self._turn(0.1)
            self._sweep(time.monotonic())
        for conn in list(self.conns.values()):
            self._close(conn)
        self._summary()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ accepting

    def _set_accepting(self, on: bool) -> None:
        if on == self.accepting or (on and self.stopping):
            return
        for listener in self.sockets:
            if on:
                self.selector.register(listener, selectors.EVENT_READ, listener)
            else:
                self.selector.unregister(listener)
        self.accepting = on

    def _accept(self, listener: Any) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept failed (%s): pausing new connections",
                                errno.errorcode.get(exc.errno or 0, exc.errno))
                    self._set_accepting(False)  # the sweep turns it back on
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            full = len(self.conns) >= self.max_connections and not self._evict_oldest()
            now = time.monotonic()
            conn = Conn(sock=sock, client=Peer.of(address),
                        server=Peer.of(listener.getsockname()),
                        http=h11.Connection(h11.SERVER,
                                           max_incomplete_event_size=self.max_header_bytes),
                        phase=Phase.HEAD, since=now, deadline=now + self.header_timeout_s)
            self.conns[sock.fileno()] = conn
            self._update_interest(conn)
            if full:  # every connection has a request in hand: wait until one is answered
                self._set_accepting(False)
                return

    def _evict_oldest(self) -> bool:
        candidates = [c for c in self.conns.values() if c.phase in EVICTABLE]
        if not candidates:
            return False
        self.stats["evicted"] += 1
        self._close(min(candidates, key=lambda c: c.since))
        return True

    # ------------------------------------------------------------------ reading

    def _on_readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if conn.phase is Phase.LINGER:
            if not data:
                self._close(conn)
            return
        if data and conn.phase is Phase.IDLE:
            self._enter(conn, Phase.HEAD, self.header_timeout_s)
        if data:
            conn.got_bytes = True
        conn.http.receive_data(data)  # b"" is EOF
        self._advance(conn, eof=not data)

    def _advance(self, conn: Conn, *, eof: bool = False) -> None:
        """Take whatever h11 can parse from the bytes received so far."""
        while True:
            try:
                event = conn.http.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse_malformed(conn, exc, eof=eof)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.ConnectionClosed):
                self._close(conn)
                return
            if isinstance(event, h11.Request):
                if not self._start_body(conn, event) or conn.closed:
                    return
            elif isinstance(event, h11.Data):
                conn.body += event.data
                if len(conn.body) > conn.body_limit:
                    self._refuse(conn, 413, "body too large")
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch(conn)
                return
        self._update_interest(conn)

    def _start_body(self, conn: Conn, request: h11.Request) -> bool:
        conn.request = request
        names = {name for name, _ in request.headers}
        if b"transfer-encoding" in names and b"content-length" in names:
            # Two framings: whoever sits in front may have used the other one (smuggling).
            self._refuse(conn, 400, "both Content-Length and Transfer-Encoding")
            return False
        declared = [v for n, v in request.headers if n == b"content-length"]
        conn.body_limit = (self.max_upload_bytes if request.target.startswith(
            self.upload_prefixes) else self.max_body_bytes) if self.upload_prefixes \
            else self.max_body_bytes
        if declared and int(declared[0]) > conn.body_limit:
            self._refuse(conn, 413, "body too large")
            return False
        self._enter(conn, Phase.BODY, self.body_timeout_s)
        if conn.http.they_are_waiting_for_100_continue:
            conn.outbox += conn.http.send(h11.InformationalResponse(status_code=100,
                                                                   headers=[])) or b""
            self._flush(conn)
        return True

    def _refuse_malformed(self, conn: Conn, exc: h11.RemoteProtocolError, *, eof: bool) -> None:
        status = exc.error_status_hint
        in_body = conn.request is not None
        if status == 431:
            reason = "request head too large"
        elif status == 501:
            reason = "unsupported transfer coding"
        elif in_body:
            reason = "body cut short" if eof else "malformed body framing"
        elif eof:  # gave up before its head was complete: counted, not logged one by one
            self.stats["gave up"] += 1
            self._refuse(conn, 400, "", log_line=False)
            return
        else:
            reason = "malformed request head"
        self._refuse(conn, status if 400 <= status < 600 else 400, reason)

    # ------------------------------------------------------------------ the app

    def _dispatch(self, conn: Conn) -> None:
        request = conn.request
        assert request is not None
        self._enter(conn, Phase.APP, None)
        self._update_interest(conn)
        environ = build_environ(request, bytes(conn.body), client=conn.client,
                                server=conn.server, multiprocess=int(self.cfg.workers) > 1)
        conn.body = bytearray()
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            log.info("max_requests reached: restarting this worker after its requests")
            self.alive = False
        self.pool.submit(self._run_app, conn, environ, not conn.outbox)

    def _run_app(self, conn: Conn, environ: dict[str, Any], direct: bool) -> None:
        """In a pool thread, which owns ``conn`` until it queues it back: runs the app, frames
        the response and sends what the socket takes at once (usually all of it), so the reply
        does not wait for the loop; the loop then sends any rest and reads the next request.
        Not ``direct`` when the loop still has bytes queued for this connection (a 100
        Continue): then the loop sends everything, in order."""
        rest: bytes | None = None  # None: close the connection
        try:
            result: AppResponse | None
            try:
                app: WSGIApp = self.wsgi
                result = call_app(app, environ)
            except AppError as exc:
                log.error("application error %s %s: %s", _log_method(conn.request),
                          _log_path(conn.request), exc)
                result = None
            except Exception:
                log.exception("application error %s %s", _log_method(conn.request),
                              _log_path(conn.request))
                result = None
            rest = self._frame_response(conn, result)
            if rest is not None and direct and not conn.closed:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    rest = rest[conn.sock.send(rest):]
        except OSError:  # the client has gone
            rest = None
        except Exception:
            log.exception("cannot answer %s %s", _log_method(conn.request),
                          _log_path(conn.request))
            rest = None
        finally:  # whatever happened, the loop gets the connection back
            self.done.put((conn, rest))
            with contextlib.suppress(OSError):  # a full pipe: the loop is awake anyway
                os.write(self.PIPE[1], b".")

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.PIPE[0], 4096):
                pass
        except OSError:
            pass

    def _finish_done(self) -> None:
        while True:
            try:
                conn, rest = self.done.get_nowait()
            except Empty:
                return
            if conn.closed:
                continue
            if rest is None:
                self._close(conn)
                continue
            conn.outbox += rest
            conn.close_after_send = conn.http.our_state is not h11.DONE
            self._enter(conn, Phase.SEND, self.write_timeout_s)
            self._flush(conn)

    def _frame_response(self, conn: Conn, result: AppResponse | None) -> bytes | None:
        """The response's bytes (h11 frames them), a fixed 500 when the app failed, or None
        when nothing can be sent. Touches only ``conn.http``, so a pool thread may call it."""
        request = conn.request
        assert request is not None
        if result is None:
            return self._frame_error(conn, 500)
        closing = self.stopping or not self.alive or self.keepalive_s <= 0
        headers = [(k, v) for k, v in result.headers
                   if k.lower() not in (b"content-length", b"transfer-encoding", b"connection")]
        length = str(len(result.body)).encode()
        if request.method == b"HEAD":  # keep what a GET would have said
            length = next((v for k, v in result.headers if k.lower() == b"content-length"),
                          length)
        if result.status not in (204, 304):
            headers.append((b"Content-Length", length))
        if not any(k.lower() == b"date" for k, _ in headers):
            headers.append((b"Date", _http_date(time.time())))
        if closing:
            headers.append((b"Connection", b"close"))
        try:
            response = h11.Response(status_code=result.status, headers=headers,
                                    reason=result.reason)
        except h11.LocalProtocolError:
            log.error("application error %s %s: a response header cannot be sent",
                      _log_method(request), _log_path(request))
            return self._frame_error(conn, 500)
        try:
            out = conn.http.send(response) or b""
            if result.body and request.method != b"HEAD" and result.status not in (204, 304):
                out += conn.http.send(h11.Data(data=result.body)) or b""
            out += conn.http.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            log.exception("cannot frame the response to %s %s", _log_method(request),
                          _log_path(request))
            return None
        return out

    def _frame_error(self, conn: Conn, status: int) -> bytes | None:
        """A fixed text response that closes the connection; echoes nothing of the request."""
        phrase = HTTPStatus(status).phrase
        text = f"{phrase.lower()}\n".encode()
        try:
            out = conn.http.send(h11.Response(status_code=status, reason=phrase, headers=[
                (b"Content-Type", b"text/plain; charset=utf-8"),
                (b"Content-Length", str(len(text)).encode()),
                (b"Date", _http_date(time.time())),
                (b"Connection", b"close")])) or b""
            out += conn.http.send(h11.Data(data=text)) or b""
            out += conn.http.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:  # a response already started: nothing sane to add
            return None
        return out

    # ------------------------------------------------------------------ writing

    def _refuse(self, conn: Conn, status: int, reason: str, *, log_line: bool = True) -> None:
        """Answer with a fixed error text (``_frame_error``) and close after it, lingering."""
        if log_line:
            method, path = _log_method(conn.request), _log_path(conn.request)
            log.warning('http refused status=%d reason="%s" method=%s path=%s', status, reason,
                        method, path, extra={"fields": {
                            "status": status, "reason": reason, "method": method,
                            "path": path}})
        out = self._frame_error(conn, status)
        if out is None:
            self._close(conn)
            return
        conn.outbox += out
        conn.close_after_send = True
        self._enter(conn, Phase.SEND, self.write_timeout_s)
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        while conn.outbox:
            try:
                sent = conn.sock.send(conn.outbox)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn)
                return
            del conn.outbox[:sent]
        if not conn.outbox and conn.phase is Phase.SEND:
            self._sent(conn)
            return
        self._update_interest(conn)

    def _sent(self, conn: Conn) -> None:
        """The response is out: next request on the same connection, or close."""
        if conn.close_after_send or self.stopping or not self.alive:
            self._linger(conn)
            return
        conn.http.start_next_cycle()
        conn.request = None
        conn.got_bytes = False
        pending, _closed = conn.http.trailing_data
        if pending:  # the client pipelined its next request
            conn.got_bytes = True
            self._enter(conn, Phase.HEAD, self.header_timeout_s)
            self._advance(conn)
        else:
            self._enter(conn, Phase.IDLE, self.keepalive_s)
            self._update_interest(conn)

    def _linger(self, conn: Conn) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        self._enter(conn, Phase.LINGER, LINGER_S)
        self._update_interest(conn)

    # ------------------------------------------------------------------ bookkeeping

    def _enter(self, conn: Conn, phase: Phase, timeout: float | None) -> None:
        now = time.monotonic()
        if phase is not Phase.BODY:  # a request's body is still that request: keep its age
            conn.since = now
        conn.phase = phase
        conn.deadline = None if timeout is None else now + timeout

    def _update_interest(self, conn: Conn) -> None:
        if conn.closed:
            return
        want = selectors.EVENT_READ if conn.phase in READABLE else 0
        if conn.outbox:
            want |= selectors.EVENT_WRITE
        if want == conn.events:
            return
        if conn.events and want:
            self.selector.modify(conn.sock, want, conn)
        elif want:
            self.selector.register(conn.sock, want, conn)
        else:
            self.selector.unregister(conn.sock)
        conn.events = want

    def _close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.events:
            self.selector.unregister(conn.sock)
            conn.events = 0
        self.conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _sweep(self, now: float) -> None:
        for conn in list(self.conns.values()):
            if conn.deadline is None or conn.deadline > now or conn.closed:
                continue
            if conn.phase is Phase.HEAD and conn.got_bytes:
                self.stats["head timeout"] += 1
                self._refuse(conn, 408, "", log_line=False)
            elif conn.phase is Phase.BODY:
                self.stats["body timeout"] += 1
                self._refuse(conn, 408, "", log_line=False)
            elif conn.phase is Phase.HEAD:
                self.stats["silent"] += 1
                self._close(conn)
            elif conn.phase is Phase.SEND:
                self.stats["unread response"] += 1
                self._close(conn)
            else:  # IDLE (keep-alive over, nothing to report) or LINGER
                self._close(conn)
        if not self.accepting and not self.stopping and len(self.conns) < self.max_connections:
            self._set_accepting(True)

    def _summary(self) -> None:
        if not self.stats:
            return
        parts = []
        for key, label in (("head timeout", "sent no complete request head in time (408)"),
                           ("body timeout", "sent no complete body in time (408)"),
                           ("silent", "sent nothing"),
                           ("gave up", "closed before their request head was complete"),
                           ("unread response", "did not read their response"),
                           ("evicted", "closed at the connection cap")):
            if self.stats[key]:
                parts.append(f"{self.stats[key]} {label}")
        fields = {k.replace(" ", "_"): v for k, v in self.stats.items()}
        log.warning("slow clients: %s (limits: head %g s, body %g s, %d connections per "
                    "worker)", ", ".join(parts), self.header_timeout_s, self.body_timeout_s,
                    self.max_connections, extra={"fields": fields})
        self.stats.clear()
