"""Shared by the tests/test_pay_*.py modules: one fake merchant identity per test session
(RSA key generation is the slow part) and a loopback notify endpoint that records what the
fake WeChat Pay posts."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import httpx

from bot.pay.fake import FakeIdentity
from bot.pay.keys import VerifyKeys
from bot.pay.signing import Notification, VerificationError, verify_notification


@functools.cache
def web() -> httpx.Client:
    """One plain HTTP client for the tests' own calls (each new client costs ~80 ms)."""
    return httpx.Client(timeout=10.0)


@functools.cache
def identity() -> FakeIdentity:
    return FakeIdentity.generate()


def verify_keys(ident: FakeIdentity | None = None) -> VerifyKeys:
    """Both of WeChat Pay's keys, as a merchant in the transition holds them."""
    ident = ident or identity()
    return VerifyKeys.of(ident.apiv3_key,
                         {ident.public_key_id: ident.platform_key.public_key()},
                         {ident.certificate_serial: ident.certificate.public_key()})


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    time: float
    status: int
    notification: Notification | None
    refusal: VerificationError | None


class NotifyReceiver:
    """A stand-in for the bot's notify endpoint: verifies like the real one will and answers
    204, or 401 with a refusal, or whatever ``statuses`` scripts for the next posts."""

    def __init__(self, keys: VerifyKeys, statuses: list[int] | None = None) -> None:
        self.keys = keys
        self.statuses = list(statuses or [])
        self.received: list[Received] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver._on_post(self, dict(self.headers.items()), body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = cast(tuple[str, int], self.server.server_address[:2])
        return f"http://{host}:{port}/pay/notify"

    def _on_post(self, handler: BaseHTTPRequestHandler, headers: dict[str, str],
                 body: bytes) -> None:
        notification: Notification | None = None
        refusal: VerificationError | None = None
        try:
            notification = verify_notification(headers, body, self.keys, time.time())
            status = 204
        except VerificationError as exc:
            refusal, status = exc, 401
        with self.lock:
            if notification is not None and self.statuses:
                status = self.statuses.pop(0)
            self.received.append(Received(headers, body, time.time(), status, notification,
                                          refusal))
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.01)
        with self.lock:
            raise AssertionError(f"expected {count} posts, got {len(self.received)}")


@contextmanager
def notify_receiver(keys: VerifyKeys, statuses: list[int] | None = None
                    ) -> Iterator[NotifyReceiver]:
    receiver = NotifyReceiver(keys, statuses)
    receiver.thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
