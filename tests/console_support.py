"""Logging in to the console from tests: a one-time link signed as ``#console`` would sign it,
opened with an httpx client on the real WSGI app (which keeps the session cookie)."""

from __future__ import annotations

import re

import httpx

from bot.console.links import ConsoleLinks
from bot.settings import Settings

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def console_link(settings: Settings, openid: str, *, now: float | None = None) -> str:
    """The link's path and query (the client's base_url supplies the host)."""
    url = ConsoleLinks(settings).url(openid, now=now)
    return url.removeprefix(settings.server.public_url)


def csrf_of(page: str) -> str:
    found = _CSRF.search(page)
    assert found, "no CSRF field on the page"
    return found.group(1)


def login(client: httpx.Client, settings: Settings, openid: str) -> str:
    """Open a fresh link as ``openid``; return the session's CSRF token (from the dashboard)."""
    opened = client.get(console_link(settings, openid))
    assert opened.status_code == 303, opened.text
    page = client.get(opened.headers["location"])
    assert page.status_code == 200, page.text
    return csrf_of(page.text)
