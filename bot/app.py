"""Builds the WSGI application: the webhook, the reader pages, WeChat Pay's purchase page and
notifications, the operators' console, and a health check."""

from __future__ import annotations

import bottle
from sqlalchemy import Engine

from bot.settings import Settings
from bot.web import health, policy
from bot.wechat.webhook import Webhook

# app.config key of the /pay/notify endpoint (None without [pay]); tests wait on its messages.
PAY_NOTIFY = "newsbot.pay_notify"
# app.config key of the pay page's PayClient (None without [pay]); tests close it.
PAY_CLIENT = "newsbot.pay_client"


def create_app(settings: Settings, engine: Engine) -> bottle.Bottle:
    from bot.web import reader  # imported here so the webhook can be tested without it

    app = policy.App()  # fixed error pages, nosniff/no-store, unhandled errors logged once
    Webhook(settings, engine).install(app)
    reader.install(app, settings=settings, engine=engine)
    if settings.pay is not None:
        from bot.pay import notify, page
        from bot.wechat.api import WeChatClient

        wechat = settings.wechat
        factory = ((lambda: WeChatClient(wechat, engine))
                   if wechat.app_id and wechat.app_secret else None)
        app.config[PAY_NOTIFY] = notify.install(app, settings=settings, engine=engine,
                                                messenger_factory=factory)
        app.config[PAY_CLIENT] = page.install(app, settings=settings, engine=engine)
    from bot.console.core import create_console

    create_console(settings, engine).install(app)
    health.install(app, engine=engine)
    return app
