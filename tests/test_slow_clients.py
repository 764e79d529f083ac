"""Slow clients and malformed bodies against the real `newsbot serve` process.

A server of 2 workers × 2 threads is held by 10× as many slow connections as it has threads
(partial heads, silent connections, bodies that stop after a few bytes); real signed deliveries
and /healthz must still be answered within 1 s, on one server and on two servers sharing one
database. The deadlines then close the slow connections (408 where a request had begun).
Bad or truncated chunked bodies get a 4xx that echoes nothing of the request, one log line,
and the server keeps serving. With NEWSBOT_TEST_DATABASE_URL set, the same runs on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
from sqlalchemy import Engine, func
from sqlmodel import select

from bot.wechat.webhook import MAX_BODY_BYTES, sign
from storage.content import parse_issue_file
from storage.db import read_only
from storage.models import InboundMessage
from tests.conftest import SAMPLE_ISSUE, TOKEN, WeChatUser, child_env, free_port, parse_reply

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gunicorn needs fork")

ROOT = Path(__file__).resolve().parent.parent
WORKERS, THREADS = 2, 2
SLOW_CONNECTIONS = 10 * WORKERS * THREADS
ANSWER_WITHIN_S = 1.0
CLIENT_TIMEOUT_S = 5.0  # WeChat's: a reply later than this is as good as none
STARTUP_TIMEOUT_S = 30.0
DEADLINE_S = 10.0  # bot.server.HEADER_TIMEOUT_S and BODY_TIMEOUT_S (checked below)
SAMPLE_TITLE = parse_issue_file(SAMPLE_ISSUE, default_free_percent=10).title


@pytest.fixture(autouse=True)
def _no_newsbot_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("NEWSBOT_"):
            monkeypatch.delenv(name)


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def write_config(path: Path, db_url: str, port: int, workers: int = WORKERS) -> Path:
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\npublic_url = "http://127.0.0.1:{port}"\n'
        f"workers = {workers}\nthreads = {THREADS}\n"
        f'[wechat]\ntoken = "{TOKEN}"\n'
        f"[database]\nurl = {_toml_string(db_url)}\n"
        '[reader]\nsecret = "slow-clients-reader-secret-0123456789"\n'
        "[broadcast]\nscheduler = false\n", encoding="utf-8")
    return path


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def start(tmp_path: Path, db_url: str, name: str, *command: str,
          workers: int = WORKERS) -> Server:
    port = free_port()
    config = write_config(tmp_path / f"{name}.toml", db_url, port, workers)
    log = tmp_path / f"{name}.log"
    args = list(command) or [sys.executable, "-m", "bot.cli", "serve"]
    with log.open("wb") as out:
        proc = subprocess.Popen([*args, "--config", str(config)], cwd=tmp_path, env=child_env(),
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Server(proc, port, log)


def wait_healthy(server: Server, workers: int = WORKERS) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"server exited with {server.proc.returncode}:\n{server.log_text()}")
        with contextlib.suppress(httpx.HTTPError):
            healthy = httpx.get(f"{server.base_url}/healthz", timeout=1.0).status_code == 200
            if healthy and server.log_text().count("worker ready") >= workers:
                return
        time.sleep(0.1)
    pytest.fail(f"server not ready within {STARTUP_TIMEOUT_S} s:\n{server.log_text()}")


def stop(server: Server) -> int | None:
    if server.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(timeout=20)
    code = server.proc.returncode
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)
    return code


@contextlib.contextmanager
def serving(tmp_path: Path, db_url: str, count: int = 1) -> Iterator[list[Server]]:
    servers: list[Server] = []
    try:
        for i in range(count):
            servers.append(start(tmp_path, db_url, f"server-{i}"))
        for server in servers:
            wait_healthy(server)
        yield servers
    finally:
        codes = [stop(s) for s in servers]
        assert codes == [0] * len(servers), [s.log_text()[-3000:] for s in servers]


# --------------------------------------------------------------------------- clients


HEAD_START = b"POST /wechat?signature=0&timestamp=0&nonce=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"


class SlowClients:
    """Connections that start a request (or nothing) and then stall."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socks: dict[str, list[socket.socket]] = {}

    def open(self, kind: str, count: int) -> list[socket.socket]:
        opened = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            if kind == "head":  # ~80 bytes of a request head, never its end
                sock.sendall(HEAD_START + b"User-Agent: slow\r\n")
            elif kind == "body":  # a whole head, then 20 of the 1000 bytes it announces
                sock.sendall(HEAD_START + b"Content-Type: text/xml\r\nContent-Length: 1000\r\n"
                             b"\r\n<xml><ToUserName><!")
            elif kind == "chunked":  # a chunk announced, a few of its bytes sent
                sock.sendall(HEAD_START + b"Transfer-Encoding: chunked\r\n\r\n40\r\n<xml><To")
            opened.append(sock)
        self.socks.setdefault(kind, []).extend(opened)
        return opened

    def open_mix(self, total: int) -> None:
        kinds = ["head", "idle", "body"]
        for i, kind in enumerate(kinds):
            self.open(kind, total // len(kinds) + (1 if i < total % len(kinds) else 0))

    def all(self) -> list[socket.socket]:
        return [s for socks in self.socks.values() for s in socks]

    def close(self) -> None:
        for sock in self.all():
            sock.close()


def still_waiting(sock: socket.socket) -> bool:
    """The server has neither answered nor closed this connection."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)  # an answer, or b"" for a close
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes (or ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


@dataclass
class Timed:
    seconds: float
    status: int | None
    text: str


def timed_delivery(server: Server, openid: str, content: str = "本周") -> Timed:
    """One signed delivery on a new connection, as WeChat makes it."""
    with httpx.Client(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as http:
        user = WeChatUser(http, openid)
        started = time.perf_counter()
        try:
            resp = user.post_xml(user.text_xml(content))
        except httpx.HTTPError as exc:
            return Timed(time.perf_counter() - started, None, type(exc).__name__)
        return Timed(time.perf_counter() - started, resp.status_code, resp.text)


def timed_health(server: Server) -> Timed:
    started = time.perf_counter()
    try:
        resp = httpx.get(f"{server.base_url}/healthz", timeout=CLIENT_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return Timed(time.perf_counter() - started, None, type(exc).__name__)
    return Timed(time.perf_counter() - started, resp.status_code, resp.text)


def assert_answered(result: Timed, what: str) -> None:
    assert result.status == 200, f"{what}: no answer ({result.text}) after {result.seconds:.2f} s"
    assert result.seconds < ANSWER_WITHIN_S, f"{what}: answered after {result.seconds:.2f} s"


def assert_card(result: Timed) -> None:
    reply = parse_reply(result.text)
    assert reply["type"] == "text" and SAMPLE_TITLE in reply["content"], reply


def done_deliveries(engine: Engine) -> int:
    with read_only(engine) as s:
        return int(s.exec(select(func.count()).select_from(InboundMessage)
                          .where(InboundMessage.status == "done")).one())


def signed_query() -> str:
    ts = str(int(time.time()))
    nonce = uuid.uuid4().hex[:10]
    return f"signature={sign(TOKEN, ts, nonce)}&timestamp={ts}&nonce={nonce}"


# --------------------------------------------------------------------------- slow clients


def test_deliveries_are_answered_while_ten_times_the_threads_are_held(
        tmp_path: Path, db_url: str, sample: int, engine: Engine) -> None:
    with serving(tmp_path, db_url) as [server]:
        slow = SlowClients(server.port)
        try:
            opened = time.monotonic()
            slow.open_mix(SLOW_CONNECTIONS)
            time.sleep(0.5)  # all accepted and stalled (gthread: every thread blocked reading)
            results = []
            for i in range(4):
                results.append(timed_delivery(server, f"o_slow_reader_{i}"))
                results.append(timed_health(server))
            # The attack was in place throughout: every slow connection is still open.
            held = [still_waiting(s) for s in slow.all()]
            assert all(held), (held.count(False), time.monotonic() - opened, results)
        finally:
            slow.close()
        for i, result in enumerate(results):
            assert_answered(result, "delivery" if i % 2 == 0 else "/healthz")
        for result in results[::2]:
            assert_card(result)
        assert done_deliveries(engine) == 4


def test_two_servers_on_one_database_keep_answering_under_slow_clients(
        tmp_path: Path, db_url: str, sample: int, engine: Engine) -> None:
    with serving(tmp_path, db_url, count=2) as servers:
        attacks = [SlowClients(s.port) for s in servers]
        try:
            opened = time.monotonic()
            for attack in attacks:
                attack.open_mix(SLOW_CONNECTIONS)
            time.sleep(0.5)
            results = []
            for i in range(6):
                server = servers[i % 2]
                results.append(timed_delivery(server, f"o_slow_pair_{i % 4}"))
                results.append(timed_health(server))
            held = [still_waiting(s) for attack in attacks for s in attack.all()]
            assert all(held), (held.count(False), time.monotonic() - opened, results)
        finally:
            for attack in attacks:
                attack.close()
        for i, result in enumerate(results):
            assert_answered(result, f"server {i // 2 % 2}: "
                            + ("delivery" if i % 2 == 0 else "/healthz"))
        for result in results[::2]:
            assert_card(result)
    assert done_deliveries(engine) == 6


def test_requests_that_never_finish_get_408_at_the_deadline(
        tmp_path: Path, db_url: str, sample: int) -> None:
    with serving(tmp_path, db_url) as [server]:
        slow = SlowClients(server.port)
        try:
            heads = slow.open("head", 3)
            bodies = slow.open("body", 3)
            chunked = slow.open("chunked", 2)
            silent = slow.open("idle", 3)
            trickler = slow.open("head", 1)[0]
            opened = time.monotonic()
            # A byte every half second keeps per-read timers happy; the deadline is absolute.
            while time.monotonic() - opened < DEADLINE_S - 1:
                trickler.sendall(b"X")
                time.sleep(0.5)
            assert all(still_waiting(s) for s in slow.all())
            assert_answered(timed_delivery(server, "o_deadline_reader"), "delivery")

            for sock in [*heads, *bodies, *chunked, trickler]:
                answer = read_all(sock, timeout=DEADLINE_S)
                assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
                assert b"Connection: close" in answer
                assert b"wechat" not in answer.lower() and b"signature" not in answer
            for sock in silent:  # nothing was asked, nothing is answered: just closed
                assert read_all(sock, timeout=5.0) == b""
            assert time.monotonic() - opened < DEADLINE_S + 5
        finally:
            slow.close()
        # Counted in a summary line per worker and interval, not one line per connection.
        expected = {"sent no complete request head": 4, "sent no complete body": 5,
                    "sent nothing": 3}
        deadline = time.monotonic() + 15
        while (counts := summary_counts(server, expected)) != expected:
            assert time.monotonic() < deadline, (counts, server.log_text())
            time.sleep(0.2)
        assert "http refused" not in server.log_text()
        assert_answered(timed_delivery(server, "o_deadline_reader"), "delivery after")
    from bot.server import BODY_TIMEOUT_S, HEADER_TIMEOUT_S
    assert HEADER_TIMEOUT_S == BODY_TIMEOUT_S == DEADLINE_S


def summary_counts(server: Server, keys: dict[str, int]) -> dict[str, int]:
    lines = [line for line in server.log_text().splitlines() if "slow clients:" in line]
    return {key: sum(int(n) for line in lines for n in re.findall(rf"(\d+) {key}", line))
            for key in keys}


def test_a_full_connection_table_makes_room_for_new_clients(
        tmp_path: Path, db_url: str, sample: int) -> None:
    """With the connection cap reached by stalled clients, a new connection closes the oldest
    stalled one instead of waiting (bench/slow_clients.py's server: newsbot's worker with the
    cap lowered to 12, one worker process)."""
    server = start(tmp_path, db_url, "capped", sys.executable,
                   str(ROOT / "bench" / "slow_clients.py"), "--max-connections", "12",
                   "--serve", workers=1)
    try:
        wait_healthy(server, workers=1)
        slow = SlowClients(server.port)
        try:
            oldest = slow.open("head", 12)
            time.sleep(0.3)
            newer = slow.open("body", 12)  # each of these pushes out one of the oldest
            time.sleep(0.3)
            assert not any(still_waiting(s) for s in oldest)
            assert all(still_waiting(s) for s in newer)
            for i in range(4):
                assert_answered(timed_delivery(server, f"o_capped_{i}"), "delivery")
            # Room for the deliveries came from the oldest of the stalled, never a request.
            alive = [still_waiting(s) for s in newer]
            assert alive == sorted(alive) and sum(alive) >= 12 - 4, alive
        finally:
            slow.close()
        deadline = time.monotonic() + 15
        while "closed at the connection cap" not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.2)
    finally:
        assert stop(server) == 0, server.log_text()[-3000:]


# --------------------------------------------------------------------------- chunked bodies


def chunked_delivery(user: WeChatUser) -> bytes:
    xml = user.text_xml("本周").encode()
    half = len(xml) // 2
    return (b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (half, xml[:half], len(xml) - half, xml[half:]))


def post_raw(server: Server, query: str, body: bytes, *, half_close: bool = False,
             headers: bytes = b"Transfer-Encoding: chunked\r\n") -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /wechat?" + query.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: text/xml\r\n" + headers + b"\r\n" + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock, timeout=5.0)


BAD_CHUNKED = {
    "bad chunk-size line": (b"zz\r\n<xml></xml>\r\n0\r\n\r\n", False),
    "chunk without its CRLF": (b"b\r\n<xml></xml>XX0\r\n\r\n", False),
    "cut short, then closed": (b"40\r\n<xml><ToUserName><![CDATA[gh_test", True),
    "no last chunk, then closed": (b"b\r\n<xml></xml>\r\n", True),
}


@pytest.mark.parametrize("case", sorted(BAD_CHUNKED))
def test_bad_chunked_bodies_are_a_4xx_that_echoes_nothing(
        tmp_path: Path, db_url: str, sample: int, case: str) -> None:
    body, half_close = BAD_CHUNKED[case]
    with serving(tmp_path, db_url) as [server]:
        query = signed_query()
        answer = post_raw(server, query, body, half_close=half_close)
        head, _, text = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        assert 400 <= status < 500, answer[:300]
        assert text == b"bad request\n"
        for secret in (query, query.split("&")[0].split("=")[1], "/wechat", "nonce"):
            assert secret.encode() not in answer
        # One log line for the refused request, without its query string.
        deadline = time.monotonic() + 5
        while "http refused" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        refused = [line for line in server.log_text().splitlines() if "http refused" in line]
        assert len(refused) == 1, server.log_text()
        assert f"status={status}" in refused[0] and "path=/wechat" in refused[0]
        assert "signature" not in server.log_text() and "Traceback" not in server.log_text()
        # Still serving.
        result = timed_delivery(server, "o_chunked_reader")
        assert_answered(result, "delivery after a bad body")
        assert_card(result)


def test_a_chunked_delivery_is_answered(tmp_path: Path, db_url: str, sample: int) -> None:
    with serving(tmp_path, db_url) as [server]:
        with httpx.Client() as http:
            body = chunked_delivery(WeChatUser(http, "o_chunked_ok"))
        answer = post_raw(server, signed_query(), body)
        head, _, text = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
        reply = parse_reply(text.decode())
        assert reply["type"] == "text" and SAMPLE_TITLE in reply["content"]


# --------------------------------------------------------------------------- HTTP framing


def test_oversized_and_ambiguous_bodies_are_refused_before_they_are_read(
        tmp_path: Path, db_url: str, sample: int) -> None:
    with serving(tmp_path, db_url) as [server]:
        # Announced too large: refused at once, without waiting for the body.
        started = time.perf_counter()
        answer = post_raw(server, signed_query(), b"",
                          headers=b"Content-Length: %d\r\n" % (MAX_BODY_BYTES + 1))
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert time.perf_counter() - started < ANSWER_WITHIN_S
        # Chunks adding up to too much.
        chunk = b"x" * 8192
        answer = post_raw(server, signed_query(), b"2000\r\n%s\r\n" % chunk * 9 + b"0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        # Two framings at once (request smuggling through a proxy in front).
        answer = post_raw(server, signed_query(), b"0\r\n\r\n", headers=(
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"))
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert_answered(timed_delivery(server, "o_framing_reader"), "delivery")


def test_only_the_console_may_post_an_issue_file_sized_body(
        tmp_path: Path, db_url: str, sample: int) -> None:
    """An issue file (~80 KB) fits the console's upload limit, not the webhook's 64 KiB."""
    from bot.console.core import MAX_UPLOAD_BYTES

    def post(path: bytes, size: int) -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % size
                         + b"x" * min(size, 200_000))
            return read_all(sock, timeout=5.0)

    with serving(tmp_path, db_url) as [server]:
        # Read whole and handed to the app, which refuses it for want of a session.
        assert post(b"/console/issues/import", 100_000).startswith(b"HTTP/1.1 403 ")
        assert post(b"/console/issues/import", MAX_UPLOAD_BYTES + 1).startswith(
            b"HTTP/1.1 413 ")
        assert post(b"/wechat", 100_000).startswith(b"HTTP/1.1 413 ")


def test_keep_alive_and_pipelined_requests_are_answered_in_order(
        tmp_path: Path, db_url: str, sample: int) -> None:
    with serving(tmp_path, db_url) as [server]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = read_all(sock, timeout=5.0)
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
        assert statuses == [b"200", b"404", b"200"], answer
        assert answer.endswith(b"\r\n\r\n")  # the HEAD answer carries no body
        with httpx.Client(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S) as http:
            user = WeChatUser(http, "o_keepalive_reader")
            for _ in range(3):
                assert SAMPLE_TITLE in user.send("本周")["content"]


def test_expect_100_continue_gets_its_interim_answer_before_the_body(
        tmp_path: Path, db_url: str, sample: int) -> None:
    with serving(tmp_path, db_url) as [server], httpx.Client() as http:
        body = WeChatUser(http, "o_continue_reader").text_xml("本周").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"POST /wechat?" + signed_query().encode() + b" HTTP/1.1\r\n"
                         b"Host: 127.0.0.1\r\nContent-Type: text/xml\r\nExpect: 100-continue\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            assert sock.recv(100).startswith(b"HTTP/1.1 100 ")
            sock.sendall(body)
            sock.shutdown(socket.SHUT_WR)
            answer = read_all(sock, timeout=5.0)
        head, _, text = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert SAMPLE_TITLE in parse_reply(text.decode())["content"]


def test_bench_slow_clients_quick() -> None:
    env = child_env()
    done = subprocess.run([sys.executable, str(ROOT / "bench/slow_clients.py"), "--quick",
                           "--worker", "newsbot"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("machine: ")
    # Figures only (a busy machine makes them slow); the liveness tests above assert.
    assert re.search(r"verdict newsbot: \d+ of \d+ deliveries answered within 1 s with 40 "
                     r"slow connections held: (OK|STALLED)", done.stdout), done.stdout


# --------------------------------------------------------------------------- the WSGI glue


def test_environ_from_a_buffered_chunked_request() -> None:
    from bot.serving.wsgi import Peer, build_environ

    request = h11.Request(method="POST", target="/wechat/%E4%B8%AD?a=1&b=%20", headers=[
        ("Host", "news.example.com"), ("Transfer-Encoding", "chunked"),
        ("Content-Type", "text/xml"), ("X-Real-IP", "1.2.3.4"), ("X_Real_IP", "6.6.6.6"),
        ("Accept", "a"), ("Accept", "b")])
    environ = build_environ(request, b"<xml/>", client=Peer("10.0.0.9", "5555"),
                            server=Peer.of(("127.0.0.1", 8080)), multiprocess=True)
    assert environ["PATH_INFO"] == "/wechat/\xe4\xb8\xad"  # PEP 3333: bytes as latin-1
    assert environ["QUERY_STRING"] == "a=1&b=%20"
    assert environ["CONTENT_LENGTH"] == "6" and environ["wsgi.input"].read() == b"<xml/>"
    assert environ["CONTENT_TYPE"] == "text/xml"
    assert "HTTP_TRANSFER_ENCODING" not in environ  # Bottle would de-chunk a second time
    assert environ["HTTP_X_REAL_IP"] == "1.2.3.4"  # the "_" twin cannot overwrite it
    assert environ["HTTP_ACCEPT"] == "a,b"
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("127.0.0.1", "8080")
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("10.0.0.9", "5555")
    bodiless = build_environ(h11.Request(method="GET", target="/healthz",
                                         headers=[("Host", "x")]), b"",
                             client=Peer("", ""), server=Peer("", ""), multiprocess=False)
    assert "CONTENT_LENGTH" not in bodiless and bodiless["QUERY_STRING"] == ""


def test_call_app_collects_the_response_and_enforces_the_contract() -> None:
    from bot.serving.wsgi import AppError, call_app

    def app(environ: dict[str, object], start_response: Any) -> Iterator[bytes]:
        write = start_response("201 Created", [("X-A", "1")])
        write(b"a")
        yield b""
        yield b"bc"

    response = call_app(app, {})
    assert (response.status, response.reason, response.body) == (201, b"Created", b"abc")
    assert response.headers == [(b"X-A", b"1")]

    def silent(environ: dict[str, object], start_response: Any) -> list[bytes]:
        return [b"x"]

    def bad_status(environ: dict[str, object], start_response: Any) -> list[bytes]:
        start_response("ok", [])
        return []

    def bad_header(environ: dict[str, object], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("X-Name", "中文")])
        return []

    for broken in (silent, bad_status, bad_header):
        with pytest.raises(AppError):
            call_app(broken, {})
