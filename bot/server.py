"""Runs the WSGI app under gunicorn: newsbot's buffering worker (``bot.serving.worker``), no
preloading, so every worker builds its own app and database engine after the fork and no
connection is ever shared across processes.

Why not gunicorn's gthread worker: it gives a connection to a thread as soon as its first bytes
arrive and the thread then blocks reading the rest, so as many clients as there are threads,
each sending a few bytes of headers and waiting, stop the server (measured in bench/
slow_clients.py; docs/benchmarks.md). The buffering worker reads every request to its end in
an event loop with absolute deadlines and only then takes a thread; gunicorn still manages the
processes (forks, restarts, graceful stop, the scheduler hooks below)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import bottle
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

from bot.app import create_app
from bot.console.core import MAX_UPLOAD_BYTES as CONSOLE_MAX_UPLOAD_BYTES
from bot.serving.worker import BufferingWorker
from bot.settings import Settings
from bot.wechat.webhook import MAX_BODY_BYTES
from storage.db import make_engine

log = logging.getLogger("newsbot.server")

GRACEFUL_TIMEOUT_S = 10
# WeChat gives up after 5 s; a request still running at 30 s is stuck, not slow.
WORKER_TIMEOUT_S = 30
# Slow clients (bot.serving.worker): the request head, then the body, must arrive within these
# (absolute, not per byte); WeChat sends a whole delivery in milliseconds, and a phone on a
# bad network still sends a reader page's GET in well under 10 s.
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
# A client must take its response within this (replies are ≤ a few hundred KiB).
WRITE_TIMEOUT_S = 10.0
# Idle time allowed between two requests on one connection.
KEEPALIVE_S = 5
# Open connections per worker process; beyond it the oldest idle or still-sending one is
# closed for the new one (see bot.serving.worker). Slow clients cost a socket, not a thread.
MAX_CONNECTIONS_PER_WORKER = 1000
MAX_HEADER_BYTES = 32 * 1024


class NewsbotWorker(BufferingWorker):
    """The buffering worker with newsbot's limits; the body limit is the webhook's, so an
    oversized push is refused (413) before it is read. Only the console's POSTs (an issue
    file is ~80 KB) may send up to the console's own upload limit."""

    header_timeout_s = HEADER_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S
    write_timeout_s = WRITE_TIMEOUT_S
    max_header_bytes = MAX_HEADER_BYTES
    max_body_bytes = MAX_BODY_BYTES
    upload_prefixes = (b"/console/",)
    max_upload_bytes = CONSOLE_MAX_UPLOAD_BYTES


class _RootLogger(GunicornLogger):  # type: ignore[misc]
    """Gunicorn's error log through our root handler (same text/JSON format as the app);
    the access log stays off because the webhook logs each request itself."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in list(self.error_log.handlers):
            self.error_log.removeHandler(handler)
        self.error_log.propagate = True

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        return None


@dataclass(frozen=True)
class ServerOptions:
    host: str
    port: int
    workers: int
    threads: int
    log_level: str = "info"
    graceful_timeout: int = GRACEFUL_TIMEOUT_S


class NewsbotServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, options: ServerOptions) -> None:
        self.settings = settings
        self.options = options
        self._scheduler: subprocess.Popen[bytes] | None = None
        super().__init__(prog="newsbot serve")

    def _start_scheduler(self, _arbiter: Any) -> None:
        """The weekly job runs in a process of its own, started by the master once (not per
        worker). Not a thread in the master: gunicorn forks workers from the master, and a
        SQLite connection must never be carried across fork()."""
        if not self.settings.broadcast.scheduler:
            return
        args = [sys.executable, "-m", "bot.cli", "scheduler", "--parent-pid", str(os.getpid())]
        if self.settings.source:
            args += ["--config", self.settings.source]
        self._scheduler = subprocess.Popen(args)
        log.info("scheduler process started (pid %d)", self._scheduler.pid)

    def _stop_scheduler(self, _arbiter: Any) -> None:
        if self._scheduler is None or self._scheduler.poll() is not None:
            return
        self._scheduler.terminate()
        try:
            self._scheduler.wait(GRACEFUL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._scheduler.kill()

    def gunicorn_config(self) -> dict[str, Any]:
        opts = self.options
        return {
            "bind": [f"{opts.host}:{opts.port}"],
            "workers": opts.workers,
            # As a dotted path: gunicorn < 27 only logs a worker class given as a string.
            "worker_class": f"{NewsbotWorker.__module__}.{NewsbotWorker.__qualname__}",
            "threads": opts.threads,
            "worker_connections": MAX_CONNECTIONS_PER_WORKER,
            "keepalive": KEEPALIVE_S,
            "timeout": WORKER_TIMEOUT_S,
            "graceful_timeout": opts.graceful_timeout,
            "preload_app": False,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": opts.log_level.lower(),
            "logger_class": _RootLogger,
            "proc_name": "newsbot",
            # Gunicorn ≥ 24 opens a control socket in $HOME by default; two servers (a demo
            # next to a real one) would fight over it and we have no use for it.
            "control_socket_disable": True,
            "when_ready": self._start_scheduler,
            "on_exit": self._stop_scheduler,
        }

    def load_config(self) -> None:
        known = self.cfg.settings
        for key, value in self.gunicorn_config().items():
            if key in known:  # settings differ across gunicorn versions
                self.cfg.set(key, value)

    def load(self) -> bottle.Bottle:
        # Called in each worker after the fork (preload_app is off): a fresh engine per process.
        engine = make_engine(self.settings.database.url)
        log.info("worker ready: database %s", engine.url.render_as_string(hide_password=True))
        return create_app(self.settings, engine)


def run_server(settings: Settings, options: ServerOptions) -> None:
    """Serve until SIGTERM/SIGINT; gunicorn then finishes in-flight requests and exits."""
    log.info("starting gunicorn on %s:%d (%d workers × %d threads)", options.host,
             options.port, options.workers, options.threads)
    NewsbotServer(settings, options).run()
