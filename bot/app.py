"""Builds the WSGI application: the webhook, the reader pages and a health check."""

from __future__ import annotations

import logging

import bottle
from sqlalchemy import Engine, text

from bot.settings import Settings
from bot.web import policy
from bot.wechat.webhook import Webhook

log = logging.getLogger("newsbot.app")


def create_app(settings: Settings, engine: Engine) -> bottle.Bottle:
    from bot.web import reader  # imported here so the webhook can be tested without it

    app = policy.App()  # fixed error pages, nosniff/no-store, unhandled errors logged once
    Webhook(settings, engine).install(app)
    reader.install(app, settings=settings, engine=engine)

    @app.get("/healthz")  # type: ignore[untyped-decorator]
    def healthz() -> dict[str, str]:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            log.warning("health check: database unreachable: %s", type(exc).__name__)
            bottle.response.status = 503
            return {"status": "unavailable", "database": "unreachable"}
        return {"status": "ok", "database": "ok"}

    return app
