"""Codes redeemed across processes: two real `newsbot serve` on one database (a SQLite file,
and PostgreSQL), the code made with the real CLI, signed XML over HTTP, and the deliveries
released together by a barrier.

* 50 deliveries of one single-use tokens code, from 10 subscribers, spread over both servers:
  exactly one credit and one recorded use; every other reply says the code has been used (to
  the winner's own other messages: that they used it already); the books balance.
* One delivery — the same MsgId — posted three times at once, twice to one server and once to
  the other (WeChat retrying while the first is still being answered): one credit, and the
  same reply three times.
"""

from __future__ import annotations

import contextlib
import csv
import re
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlmodel import select

from storage.models import CodeRedemption, LedgerEntry, RedemptionCode, Subscriber
from tests import test_multiprocess as mp
from tests.conftest import WeChatUser, free_port, parse_reply
from tests.test_multiprocess import Server, cli_ok

SECRET = "code-races-secret-0123456789abcdef"
READERS = [f"o_cr_reader_{i:02d}" for i in range(10)]
DELIVERIES = 50
TOKENS = 10
GRANTED = f"兑换成功：+{TOKENS} 豆"
USED_UP = "这个兑换码已经被使用过了"
USED_BY_ME = "你已经用过这个兑换码了"


@dataclass(frozen=True)
class Answer:
    openid: str
    msg_id: int
    server: int
    status: int
    body: str

    @property
    def text(self) -> str:
        return parse_reply(self.body).get("content", "") if self.status == 200 else ""


@contextlib.contextmanager
def two_servers(tmp_path: Path, url: str) -> Iterator[tuple[Path, list[Server]]]:
    """Two servers on ``url`` with codes on; yields the first one's config (for the CLI)."""
    ports = [free_port(), free_port()]
    configs = [mp.write_config(tmp_path / f"server-{i}.toml", db_url=url, port=port,
                            extra={"codes": {"secret": SECRET}})
               for i, port in enumerate(ports)]
    mp.prepare_database(configs[0])
    with mp.running(tmp_path) as procs:
        servers = [procs.serve(f"server-{i}", config, port)
                   for i, (config, port) in enumerate(zip(configs, ports, strict=True))]
        for server in servers:
            mp.wait_healthy(server)
        yield configs[0], servers
        assert procs.stop_all() == {"server-0": 0, "server-1": 0}


def make_code(config: Path, folder: Path, name: str) -> str:
    """One single-use code worth TOKENS, made as an operator makes it; its display form."""
    out = folder / f"{name}.csv"
    cli_ok(config, "code", "create", "--count", "1", "--tokens", str(TOKENS), "--out", str(out),
           "--label", name)
    with out.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["grants"] == f"tokens:{TOKENS}", rows
    return rows[0]["code"]


def say_hello(servers: list[Server], openids: list[str]) -> None:
    """Each reader messages once first, so they are subscribers (as in real life)."""
    for i, openid in enumerate(openids):
        with httpx.Client(base_url=servers[i % 2].base_url,
                          timeout=mp.REQUEST_TIMEOUT_S) as http:
            assert "content" in WeChatUser(http, openid).send("帮助")


def release_together(servers: list[Server],
                     deliveries: list[tuple[str, int, int, str]]) -> list[Answer]:
    """Post every (openid, msg_id, server, text) from a thread of its own, all let go by one
    barrier once every request is built."""
    barrier = threading.Barrier(len(deliveries), timeout=mp.BARRIER_TIMEOUT_S)
    limits = httpx.Limits(max_connections=len(deliveries),
                          max_keepalive_connections=len(deliveries))
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(httpx.Client(base_url=s.base_url, limits=limits,
                                                    timeout=mp.REQUEST_TIMEOUT_S))
                   for s in servers]

        def post(openid: str, msg_id: int, server: int, text: str) -> Answer:
            user = WeChatUser(clients[server], openid)
            xml = user.text_xml(text, msg_id=msg_id)
            barrier.wait()
            resp = user.post_xml(xml)
            return Answer(openid, msg_id, server, resp.status_code, resp.text)

        with ThreadPoolExecutor(max_workers=len(deliveries)) as pool:
            futures = [pool.submit(post, *d) for d in deliveries]
            return [f.result() for f in futures]


def check_logs(servers: list[Server]) -> None:
    """No 500, no handler error; and each server answered webhook requests itself."""
    for server in servers:
        text = server.log_text()
        problems = [line for line in text.splitlines()
                    if "status=500" in line or "outcome=error" in line or "Traceback" in line]
        assert not problems, "\n".join(problems[:20])
        assert "newsbot.webhook: webhook id=" in text, f"{server.name} answered no delivery"


def code_books(url: str, code_text: str) -> tuple[list[LedgerEntry], list[CodeRedemption],
                                                  RedemptionCode, dict[str, int]]:
    """The code's credits and uses, its row, and every reader's balance."""
    with mp.database(url) as engine, mp.reading(engine) as s:
        credits = list(s.exec(select(LedgerEntry).where(LedgerEntry.kind == "code")).all())
        uses = list(s.exec(select(CodeRedemption)).all())
        codes_ = list(s.exec(select(RedemptionCode)).all())
        balances = {sub.openid: sub.balance for sub in s.exec(select(Subscriber)).all()}
    assert len(codes_) == 1, f"expected the one code {code_text}, found {len(codes_)}"
    return credits, uses, codes_[0], balances


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_one_single_use_code_fifty_deliveries_ten_readers_two_servers(
        tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> None:
    url: str = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    with two_servers(tmp_path, url) as (config, servers):
        say_hello(servers, READERS)
        code = make_code(config, tmp_path, "race")
        # Reader i sends deliveries i, i+10, i+20, …: five each, alternating servers.
        deliveries = [(READERS[n % len(READERS)], 7_000_000 + n, n % 2, code)
                      for n in range(DELIVERIES)]
        answers = release_together(servers, deliveries)
        check_logs(servers)
    assert [a for a in answers if a.status != 200] == []

    won = [a for a in answers if GRANTED in a.text]
    assert len(won) == 1, [a.text for a in won]
    winner = won[0].openid
    assert f"余额 {TOKENS} 豆" in won[0].text, won[0].text
    for a in answers:
        if a is won[0]:
            continue
        # The code is gone for everyone else; the winner's other messages are told they used
        # it (a loser told "you used it" would mean a use was recorded for them).
        expected = USED_BY_ME if a.openid == winner else USED_UP
        assert expected in a.text, (a.openid, winner, a.text)

    credits, uses, row, balances = code_books(url, code)
    assert [(e.openid, e.amount) for e in credits] == [(winner, TOKENS)]
    assert [(u.openid, u.ledger_entry_id) for u in uses] == [(winner, credits[0].id)]
    assert (row.used, row.uses) == (1, 1)
    assert balances[winner] == TOKENS
    assert all(balances[r] == 0 for r in READERS if r != winner), balances
    check = cli_ok(config, "ledger", "check")
    assert "ledger OK" in check.output, check.output


# WeChat's reply XML carries the second it was rendered in; everything else must match.
_CREATE_TIME = re.compile(r"<CreateTime>\d+</CreateTime>")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_one_code_delivery_retried_three_times_at_once_credits_once(
        tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> None:
    url: str = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    reader = READERS[0]
    with two_servers(tmp_path, url) as (config, servers):
        say_hello(servers, [reader])
        code = make_code(config, tmp_path, "retry")
        # The same MsgId three times: twice to server 0, once to server 1.
        answers = release_together(servers, [(reader, 8_000_001, server, code)
                                             for server in (0, 0, 1)])
        logs = "".join(s.log_text() for s in servers)
        check_logs(servers)
    assert [a.status for a in answers] == [200, 200, 200]
    bodies = Counter(_CREATE_TIME.sub("", a.body) for a in answers)
    assert len(bodies) == 1, list(bodies)
    assert GRANTED in answers[0].text and f"余额 {TOKENS} 豆" in answers[0].text
    # Handled once; the other two answered from the stored reply.
    assert (logs.count("type=text outcome=ok"), logs.count("type=text outcome=duplicate")) == \
        (2, 2), "expected the hello and the code handled once each, two duplicates"

    credits, uses, row, balances = code_books(url, code)
    assert [(e.openid, e.amount) for e in credits] == [(reader, TOKENS)]
    assert [u.openid for u in uses] == [reader]
    assert row.used == 1 and balances[reader] == TOKENS
    check = cli_ok(config, "ledger", "check")
    assert "ledger OK" in check.output, check.output
