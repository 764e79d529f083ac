"""Shared by tests/test_pay_page.py and tests/test_pay_browser.py: the fake WeChat Pay as a
process of its own (``python -m bot.pay.fake``), driven through its control API, and the real
app on a loopback port with [pay] pointing at it, so the fake's notifications reach the real
``/pay/notify`` and the page sees the credit."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, func, select

from bot.app import PAY_CLIENT, create_app
from bot.settings import Settings
from bot.web.links import PayLinks, ReaderLinks
from storage import ledger
from storage.db import read_only, transaction
from storage.models import PayOrder
from storage.subscribers import ensure_subscriber
from tests.conftest import child_env, make_settings
from tests.pay_orders_support import loopback_server

PACKAGES = [
    {"id": "p10", "tokens": 10, "price_fen": 100, "label": "10 豆"},
    {"id": "p99", "tokens": 99, "price_fen": 990, "label": "99 豆"},
    {"id": "p300", "tokens": 300, "price_fen": 2800, "label": "300 豆（超值）"},
]
READER = "o_pay_reader_000000000001"  # 20 tokens
OTHER = "o_pay_other_0000000000002"  # 500 tokens, owns issue 1


@dataclass
class FakePayProcess:
    """``python -m bot.pay.fake`` in a child process: its URL and its ready [pay] table."""

    proc: subprocess.Popen[str]
    base_url: str
    table: dict[str, Any]
    http: httpx.Client

    def control(self, action: str, **args: Any) -> dict[str, Any]:
        response = self.http.post(f"{self.base_url}/_fake/control",
                                  json={"action": action, **args})
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    def orders(self) -> dict[str, str]:
        return dict(self.control("state")["orders"])

    def pay(self, out_trade_no: str, openid: str | None = None) -> None:
        self.control("pay", out_trade_no=out_trade_no, openid=openid)


@contextmanager
def fake_pay_process(keys_dir: Path) -> Iterator[FakePayProcess]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.pay.fake", "--port", "0", "--keys-dir", str(keys_dir),
         "--retry-scale", "0.01"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=child_env())
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        if not base_url.startswith("http://"):
            raise AssertionError(f"the fake WeChat Pay did not start (said {base_url!r})")
        table = tomllib.loads((keys_dir / "pay.toml").read_text(encoding="utf-8"))["pay"]
        with httpx.Client(timeout=10.0) as http:
            yield FakePayProcess(proc, base_url, table, http)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def pay_settings(fake: FakePayProcess, public_url: str, **pay: Any) -> Settings:
    table = {**fake.table, "packages": PACKAGES, **pay}
    return make_settings(pay=table, server={"public_url": public_url},
                         content={"publication": "深潮周刊"})


@dataclass
class Site:
    """The real app on a loopback port, paying through the fake process."""

    url: str
    settings: Settings
    engine: Engine
    fake: FakePayProcess
    http: httpx.Client

    @property
    def links(self) -> PayLinks:
        return PayLinks(self.settings)

    @property
    def reader_links(self) -> ReaderLinks:
        return ReaderLinks(self.settings)

    def page_path(self, openid: str = READER, issue: int | None = None) -> str:
        return self.links.path(openid, issue)

    def link_fields(self, openid: str = READER) -> dict[str, Any]:
        """``u``, ``e`` and ``s`` of a fresh pay link, as the page sends them."""
        query = httpx.URL(self.page_path(openid)).params
        return {"u": query["u"], "e": query["e"], "s": query["s"]}


@contextmanager
def pay_site(engine: Engine, fake: FakePayProcess, **pay: Any) -> Iterator[Site]:
    with loopback_server() as server:
        settings = pay_settings(fake, server.url, **pay)
        app = create_app(settings, engine)
        server.serve(app)
        try:
            with httpx.Client(base_url=server.url, timeout=20.0) as http:
                yield Site(server.url, settings, engine, fake, http)
        finally:
            app.config[PAY_CLIENT].close()


def fund_readers(engine: Engine) -> None:
    """READER has 20 tokens; OTHER has 500 and has unlocked issue 1."""
    with transaction(engine) as s:
        for openid, amount in ((READER, 20), (OTHER, 500)):
            ensure_subscriber(s, openid=openid)
            ledger.credit(s, openid=openid, amount=amount, kind="topup",
                          key=f"fund:{openid}", reason="pay page tests")
    with transaction(engine) as s:
        ledger.redeem(s, openid=OTHER, issue_number=1, price=99, key="own:1")


def orders(engine: Engine) -> list[PayOrder]:
    with read_only(engine) as s:
        found = list(s.execute(select(PayOrder)).scalars().all())
        s.expunge_all()  # still readable after the session ends
        return found


def order_count(engine: Engine) -> int:
    with read_only(engine) as s:
        return int(s.execute(select(func.count()).select_from(PayOrder)).scalar_one())


def balance(engine: Engine, openid: str = READER) -> int:
    with read_only(engine) as s:
        return ledger.get_balance(s, openid=openid)
