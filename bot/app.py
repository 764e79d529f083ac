"""Builds the WSGI application: the webhook, the reader pages and a health check."""

from __future__ import annotations

import bottle
from sqlalchemy import Engine

from bot.settings import Settings
from bot.web import health, policy
from bot.wechat.webhook import Webhook


def create_app(settings: Settings, engine: Engine) -> bottle.Bottle:
    from bot.web import reader  # imported here so the webhook can be tested without it

    app = policy.App()  # fixed error pages, nosniff/no-store, unhandled errors logged once
    Webhook(settings, engine).install(app)
    reader.install(app, settings=settings, engine=engine)
    health.install(app, engine=engine)
    return app
