"""Shared by tests/test_console_browser.py: the real app on a loopback port with the console,
the fake WeChat API (customer-service messages go there), subscribers who talk to the bot
through the real webhook, and a browser page that records every request, script error and
CSP violation it meets, with screenshots saved for a person to look at."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine

from bot.app import create_app
from bot.console.links import ConsoleLinks
from bot.settings import Settings
from bot.wechat.fake import FakeWeChat
from tests.conftest import OPERATOR, WeChatUser, make_settings
from tests.pay_orders_support import loopback_server

APP_ID = "wx_console_browser"
APP_SECRET = "console-browser-secret"
PUBLICATION = "深潮周刊"
# Operators open the link from the chat, so the phone is WeChat's own browser on an iPhone.
PHONE: dict[str, Any] = {
    "viewport": {"width": 375, "height": 812}, "device_scale_factor": 2, "is_mobile": True,
    "has_touch": True, "locale": "zh-CN",
    "user_agent": ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15"
                   " (KHTML, like Gecko) Mobile/15E148 MicroMessenger/8.0.49(0x18003129) "
                   "NetType/WIFI Language/zh_CN")}
DESKTOP: dict[str, Any] = {"viewport": {"width": 1280, "height": 800}, "locale": "zh-CN"}
DEVICES = {"phone": PHONE, "desktop": DESKTOP}
_LINK = re.compile(r"https?://\S+/console/open\?\S+")


@dataclass
class ConsoleSite:
    """The real app serving on ``url``; ``wechat`` is the fake WeChat API it calls."""

    url: str
    settings: Settings
    engine: Engine
    wechat: FakeWeChat
    http: httpx.Client

    def link(self, openid: str = OPERATOR, *, now: float | None = None) -> str:
        """A one-time console link signed as ``#console`` signs it."""
        return ConsoleLinks(self.settings).url(openid, now=now)

    def user(self, openid: str) -> WeChatUser:
        """A subscriber posting signed XML to the running server's webhook."""
        if openid not in self.wechat.followers:
            self.wechat.followers = [*self.wechat.followers, openid]
        return WeChatUser(self.http, openid)

    def chat_link(self, openid: str = OPERATOR) -> str | None:
        """The link in the bot's reply to ``#console`` (None when the reply has none)."""
        reply = self.user(openid).send("#console")
        found = _LINK.search(reply.get("content", "") + " " + reply.get("url", ""))
        return found.group(0) if found else None


@contextmanager
def console_site(engine: Engine) -> Iterator[ConsoleSite]:
    with FakeWeChat(app_id=APP_ID, app_secret=APP_SECRET) as wechat, \
            loopback_server() as server:
        settings = make_settings(
            server={"public_url": server.url}, content={"publication": PUBLICATION},
            wechat={"app_id": APP_ID, "app_secret": APP_SECRET, "api_base": wechat.base_url})
        server.serve(create_app(settings, engine))
        with httpx.Client(base_url=server.url, timeout=20.0) as http:
            yield ConsoleSite(server.url, settings, engine, wechat, http)


@dataclass
class Shots:
    """Screenshots, always saved in ``directory`` (named by viewport and step)."""

    directory: Path
    saved: list[Path] = field(default_factory=list)

    def take(self, page: Any, name: str, *, full_page: bool = True) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        self.saved.append(path)
        return path


@dataclass
class Tab:
    """A browser page on the site that records what it fetched and what went wrong."""

    page: Any
    site: ConsoleSite
    device: str
    shots: Shots
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "404 URL" of every 4xx/5xx response

    def goto(self, url: str) -> Any:
        """Open ``url`` (a path on the site, or a full URL); the main response."""
        return self.page.goto(url if url.startswith("http") else self.site.url + url)

    def shot(self, name: str) -> Path:
        return self.shots.take(self.page, f"console-{self.device}-{name}")

    def text(self, selector: str = "main") -> str:
        return str(self.page.locator(selector).first.inner_text())

    def assert_clean(self) -> None:
        """No script error or CSP violation, nothing fetched from outside the server, and the
        page no wider than the screen."""
        assert not self.errors, (self.errors, self.failed)
        outside = [u for u in self.requests if not u.startswith(self.site.url + "/")]
        assert not outside, outside
        width = self.page.viewport_size["width"]
        assert self.page.evaluate("document.documentElement.scrollWidth") <= width


@contextmanager
def open_tab(browser: Any, site: ConsoleSite, device: str, shots: Shots) -> Iterator[Tab]:
    context = browser.new_context(**DEVICES[device])
    try:
        page = context.new_page()
        tab = Tab(page, site, device, shots)
        page.on("request", lambda r: tab.requests.append(r.url))
        # CSP violations are reported on the console as errors too. Chromium's own request
        # for /favicon.ico (which the console does not serve) is not the page's doing.
        page.on("console", lambda m: tab.errors.append(m.text) if m.type == "error"
                and not m.location.get("url", "").endswith("/favicon.ico") else None)
        page.on("pageerror", lambda e: tab.errors.append(str(e)))
        page.on("response", lambda r: tab.failed.append(f"{r.status} {r.url}")
                if r.status >= 400 else None)
        yield tab
    finally:
        context.close()


@dataclass
class Tally:
    """What the test sent, counted by the test: the numbers stats must show."""

    seen: set[str] = field(default_factory=set)  # everyone who wrote to the account
    followed: set[str] = field(default_factory=set)
    unfollowed: set[str] = field(default_factory=set)
    card_viewers: set[str] = field(default_factory=set)
    excerpt_readers: set[str] = field(default_factory=set)
    full_readers: set[str] = field(default_factory=set)
    unlocked: set[str] = field(default_factory=set)
    revenue: int = 0
    credited: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_outstanding(self) -> int:
        return sum(self.credited.values()) - self.revenue

    @property
    def following(self) -> set[str]:
        return self.seen - self.unfollowed

    @property
    def active(self) -> set[str]:
        return (self.followed | self.unfollowed | self.card_viewers | self.excerpt_readers
                | self.full_readers | self.unlocked | set(self.credited))


def make_traffic(site: ConsoleSite, *, price: int, import_issue: Any) -> Tally:
    """A small week of the account, through the running server's webhook and reader pages:
    five subscribers follow and one leaves; issue 1 is published; the operator tops up three
    with ``#topup``; three ask for the card (one twice); two unlock it and one cannot afford
    it; one opens the full text, one the excerpt."""
    from bot.web.links import ReaderLinks

    tally = Tally()
    people = [f"o_console_reader_{i:05d}" for i in range(1, 6)]
    for openid in people:  # before the issue is out, so the welcome shows no card
        site.user(openid).event("subscribe")
        tally.followed.add(openid)
        tally.seen.add(openid)
    site.user(people[4]).event("unsubscribe")
    tally.unfollowed.add(people[4])
    import_issue()
    operator = site.user(OPERATOR)
    tally.seen.add(OPERATOR)  # a subscriber row too, as anyone who writes
    for openid, amount in zip(people[:3], (200, 150, 50), strict=True):
        reply = operator.send(f"#topup {openid} {amount} 线下转账")
        assert "充值" in reply["content"], reply
        tally.credited[openid] = amount
    for openid in (people[0], people[1], people[2], people[0]):
        site.user(openid).send("本周")
        tally.card_viewers.add(openid)
    for openid in people[:3]:
        reply = site.user(openid).send("兑换 1")
        said = " ".join(reply.get(k, "") for k in ("content", "title", "description"))
        if tally.credited[openid] >= price:
            assert f"兑换成功：扣除 {price} " in said, reply
            tally.unlocked.add(openid)
            tally.revenue += price
        else:
            assert "余额不足" in said, reply
    links = ReaderLinks(site.settings)
    for openid in (people[0], people[2]):
        page = site.http.get(links.url(openid, 1).removeprefix(site.url))
        assert page.status_code == 200
        (tally.full_readers if openid in tally.unlocked else tally.excerpt_readers).add(openid)
    return tally
