"""Replay protection across processes: two real `newsbot serve` on one database (a SQLite file,
and PostgreSQL), signed XML over HTTP. A URL accepted by one server is refused by the other
with another body; two different bodies racing under one signed pair, one to each server at
the same instant, let exactly one through."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from bot.wechat.webhook import sign
from storage.models import LedgerEntry, SignedRequest
from tests.conftest import OPERATOR, TOKEN, free_port, parse_reply
from tests.test_multiprocess import (
    cli_ok,
    database,
    prepare_database,
    reading,
    running,
    wait_healthy,
    write_config,
)
from tests.test_replay import text_xml

READERS = [f"o_rp_reader_{i:02d}" for i in range(4)]
RACES = 12


def signed_query() -> dict[str, str]:
    ts, nonce = str(int(time.time())), uuid.uuid4().hex[:10]
    return {"signature": sign(TOKEN, ts, nonce), "timestamp": ts, "nonce": nonce}


def xml(openid: str, content: str, msg_id: int) -> bytes:
    return text_xml(openid, content, msg_id).encode()


def post(http: httpx.Client, query: dict[str, str], body: bytes) -> httpx.Response:
    return http.post("/wechat", params=query, content=body,
                     headers={"Content-Type": "text/xml"})


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_servers_share_the_replay_check(
        tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> None:
    url: str = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    ports = [free_port(), free_port()]
    configs = [write_config(tmp_path / f"server-{i}.toml", db_url=url, port=port)
               for i, port in enumerate(ports)]
    prepare_database(configs[0])
    with running(tmp_path) as procs, contextlib.ExitStack() as stack:
        servers = [procs.serve(f"server-{i}", config, port)
                   for i, (config, port) in enumerate(zip(configs, ports, strict=True))]
        for server in servers:
            wait_healthy(server)
        one, two = (stack.enter_context(httpx.Client(base_url=s.base_url, timeout=20))
                    for s in servers)
        for n, openid in enumerate([*READERS, OPERATOR]):  # the subscribers exist
            assert post(one, signed_query(), xml(openid, "帮助", 1000 + n)).status_code == 200
        for openid in READERS:
            cli_ok(configs[0], "topup", openid, "10", "--reason", "start")

        # A URL the operator's real top-up came with, replayed on the other server.
        captured = signed_query()
        real = xml(OPERATOR, f"#topup {READERS[0]} 5 gift", 2000)
        first = post(one, captured, real)
        assert first.status_code == 200 and "15" in parse_reply(first.text)["content"]
        forged = post(two, captured, xml(OPERATOR, f"#topup {READERS[1]} 90000 x", 2001))
        assert forged.status_code == 403
        retry = post(two, captured, real)  # WeChat retrying: the stored reply
        assert retry.status_code == 200 and parse_reply(retry.text) == parse_reply(first.text)

        # Races: two different bodies under one pair, one to each server, released together.
        # Write path against write path, fast path against fast path, and mixed.
        kinds = [("#topup {r} 1 race", "#topup {r} 1 race"), ("余额", "余额"),
                 ("#topup {r} 1 race", "余额")]
        won: list[tuple[int, int]] = []
        for i in range(RACES):
            left_text, right_text = kinds[i % len(kinds)]
            bodies = [
                xml(OPERATOR if "#" in left_text else READERS[1],
                    left_text.format(r=READERS[2]), 3000 + 2 * i),
                xml(OPERATOR if "#" in right_text else READERS[3],
                    right_text.format(r=READERS[3]), 3001 + 2 * i),
            ]
            query = signed_query()
            barrier = threading.Barrier(2, timeout=15)
            statuses: list[int] = [0, 0]

            def send(side: int, http: httpx.Client, body: bytes, q: dict[str, str] = query,
                     b: threading.Barrier = barrier, out: list[int] = statuses) -> None:
                b.wait()
                out[side] = post(http, q, body).status_code

            threads = [threading.Thread(target=send, args=(0, one, bodies[0])),
                       threading.Thread(target=send, args=(1, two, bodies[1]))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            assert sorted(statuses) == [200, 403], (i, statuses)
            won.append((i, statuses.index(200)))
        logs = "".join(s.log_text() for s in servers)
        codes = procs.stop_all()
    assert codes == {"server-0": 0, "server-1": 0}
    assert logs.count("outcome=refused-403") == 1 + RACES
    assert logs.count("seen before with another message") == 1 + RACES

    # Exactly the winners' top-ups are in the ledger, and the books balance.
    expected = {READERS[0]: 10 + 5, READERS[1]: 10, READERS[2]: 10, READERS[3]: 10}
    for i, side in won:
        left_text, right_text = kinds[i % len(kinds)]
        text = (left_text, right_text)[side]
        if text.startswith("#topup"):
            expected[READERS[2] if side == 0 else READERS[3]] += 1
    with database(url) as engine, reading(engine) as s:
        for openid, amount in expected.items():
            got = s.execute(select(func.sum(LedgerEntry.amount))
                            .where(LedgerEntry.openid == openid)).scalar_one()
            assert got == amount, (openid, got, amount)
        assert s.execute(select(func.count()).select_from(SignedRequest)).scalar_one() > 0
    check = cli_ok(configs[0], "ledger", "check")
    assert "ledger OK" in check.output
