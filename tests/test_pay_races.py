"""Exactly-once settlement across processes: two real `newsbot serve` on one database, 100
paid orders whose notification is delivered 3 times each (two copies at the same instant, one
to each server, the third later to either) in random order, plus 10 orders whose notification
never comes, while two `newsbot pay sync` processes ask WeChat Pay about every order at once.
Every order is credited exactly once and `ledger check` is clean."""

from __future__ import annotations

import random
import re
import subprocess
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlmodel import col

from bot.pay.client import PayClient
from bot.pay.fake import FakeWeChatPay
from bot.settings import PaySettings, load_settings
from storage import payments
from storage.models import LedgerEntry, PayOrder
from tests.conftest import child_env, free_port
from tests.pay_orders_support import make_order, notification
from tests.pay_support import identity, web
from tests.test_multiprocess import (
    _toml,
    cli_ok,
    database,
    newsbot,
    prepare_database,
    reading,
    running,
    wait_healthy,
    write_config,
)

NOTIFIED = 100
SILENT = 10
USERS = [f"o_race_{i:02d}" for i in range(20)]


def with_pay(config: Path, fake: FakeWeChatPay, keys: Path) -> Path:
    table = identity().pay_table(keys, fake.base_url)
    packages = table.pop("packages")
    text = config.read_text(encoding="utf-8") + "[pay]\n"
    text += "".join(f"{k} = {_toml(v)}\n" for k, v in table.items())
    for package in packages:
        text += "\n[[pay.packages]]\n" + "".join(f"{k} = {_toml(v)}\n"
                                                 for k, v in package.items())
    text = text.replace('[wechat]\n', f'[wechat]\napp_id = "{identity().app_id}"\n', 1)
    config.write_text(text, encoding="utf-8")
    return config


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_each_order_is_credited_exactly_once(tmp_path: Path, request: pytest.FixtureRequest,
                                             backend: str) -> None:
    url: str = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    rng = random.Random(9)
    ports = [free_port(), free_port()]
    with FakeWeChatPay(identity(), retry_scale=0.001) as fake, running(tmp_path) as procs:
        configs = [with_pay(write_config(tmp_path / f"server-{i}.toml", db_url=url, port=p),
                            fake, tmp_path / "keys") for i, p in enumerate(ports)]
        prepare_database(configs[0])
        servers = [procs.serve(f"server-{i}", c, p)
                   for i, (c, p) in enumerate(zip(configs, ports, strict=True))]

        # 110 orders placed at the fake and paid there; every notification of the fake is
        # dropped: the test delivers the first 100 itself, the last 10 never come.
        orders: list[PayOrder] = []
        with database(url) as engine, PayClient.from_settings(
                _pay_settings(configs[0]), http=web()) as client:
            for n in range(NOTIFIED + SILENT):
                order = make_order(engine, openid=USERS[n % len(USERS)],
                                   notify_url=f"http://127.0.0.1:{ports[0]}/pay/notify")
                client.submit_order(order.kind, order.request_json)
                fake.misbehave_next("drop")
                fake.pay(order.out_trade_no, openid=order.openid)
                orders.append(order)
        for server in servers:
            wait_healthy(server)

        deliveries = []
        for order in orders[:NOTIFIED]:
            resource = fake.orders[order.out_trade_no].as_json()
            deliveries.append(notification(resource))
        statuses: Counter[int] = Counter()
        lock = threading.Lock()
        clients = [httpx.Client(base_url=s.base_url, timeout=30) for s in servers]

        def deliver(headers: dict[str, str], body: bytes, server: int,
                    barrier: threading.Barrier | None) -> None:
            if barrier is not None:
                barrier.wait(timeout=30)
            code = clients[server].post("/pay/notify", content=body,
                                        headers=headers).status_code
            with lock:
                statuses[code] += 1

        # Each notification: two copies at once (one to each server), a third to either.
        jobs: list[tuple[float, int, tuple[dict[str, str], bytes], int, bool]] = []
        for i, d in enumerate(deliveries):
            jobs.append((rng.random(), i, d, 0, True))
            jobs.append((rng.random() + 1, i, d, rng.randrange(2), False))
        jobs.sort(key=lambda j: j[0])
        syncs = [subprocess.Popen(newsbot("pay", "sync", "--config", str(configs[i % 2])),
                                  env=child_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
        with ThreadPoolExecutor(max_workers=16) as pool:
            futures = []
            for _, _, (headers, body), target, pair in jobs:
                if pair:
                    barrier = threading.Barrier(2)
                    futures += [pool.submit(deliver, headers, body, side, barrier)
                                for side in (0, 1)]
                else:
                    futures.append(pool.submit(deliver, headers, body, target, None))
            for f in futures:
                f.result()
        sync_out = [p.communicate(timeout=300)[0] for p in syncs]
        for c in clients:
            c.close()
        assert [p.returncode for p in syncs] == [0, 0], sync_out
        logs = "".join(s.log_text() for s in servers)
        codes = procs.stop_all()
    assert codes == {"server-0": 0, "server-1": 0}
    assert statuses == {204: 3 * NOTIFIED}, statuses

    with database(url) as engine, reading(engine) as s:
        credits = Counter(s.execute(select(col(LedgerEntry.idempotency_key))
                                    .where(col(LedgerEntry.kind) == "pay")).scalars())
        assert credits == {payments.credit_key(o.out_trade_no): 1 for o in orders}
        per_user: dict[str, int] = {
            openid: int(total) for openid, total in s.execute(
                select(col(LedgerEntry.openid), func.sum(col(LedgerEntry.amount)))
                .group_by(col(LedgerEntry.openid))).all()}
        expected: Counter[str] = Counter()
        for o in orders:
            expected[o.openid] += o.tokens
        assert per_user == dict(expected)
        for order in orders:
            stored = payments.get_order(s, out_trade_no=order.out_trade_no)
            assert stored is not None and stored.status == "paid"
            assert stored.credit_entry_id is not None
    credited_by_servers = len(re.findall(r"pay order \S+ credited", logs))
    credited_by_syncs = sum(len(re.findall(r": credited \+99", out)) for out in sync_out)
    assert credited_by_servers + credited_by_syncs == NOTIFIED + SILENT
    silent = {o.out_trade_no for o in orders[NOTIFIED:]}
    by_sync = {m for out in sync_out for m in re.findall(r"(\S+): credited \+99", out)}
    assert silent <= by_sync  # the ten that never had a notification: the job settled them
    check = cli_ok(configs[0], "ledger", "check")
    assert "ledger OK" in check.output


def _pay_settings(config: Path) -> PaySettings:
    pay = load_settings(config).pay
    assert pay is not None
    return pay
