"""``GET /healthz``: 200 only while the database takes writes, else 503 (for load balancers and
monitors). A read alone said "ok" while a full disk or a read-only database file failed every
webhook, so the check makes the write a delivery makes (storage.health.probe_write)."""

from __future__ import annotations

import logging

import bottle
from sqlalchemy import Engine

from storage.health import ProbeFailed, probe_write

log = logging.getLogger("newsbot.app")


def install(app: bottle.Bottle, *, engine: Engine) -> None:
    @app.get("/healthz")  # type: ignore[untyped-decorator]
    def healthz() -> dict[str, str]:
        try:
            probe_write(engine)
        except ProbeFailed as exc:
            cause = getattr(exc.cause, "orig", None) or exc.cause
            detail = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ""
            log.warning("health check failed at %s: %s %s", exc.stage,
                        type(exc.cause).__name__, detail)  # escaped by bot.logs
            bottle.response.status = 503
            # Unreachable and unwritable look alike from here (SQLite refuses a read-only
            # file as the write transaction begins); the log line has the database's words.
            return {"status": "unavailable", "database": "cannot write"}
        return {"status": "ok", "database": "ok"}
