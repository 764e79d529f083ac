"""WeChat Pay notifications handled per second: verify (RSA-SHA256 over the raw body),
decrypt (AES-256-GCM) and credit exactly once (storage.payments.settle in one transaction).

``bot.pay.notify.PayNotify.handle`` — everything ``POST /pay/notify`` does but the HTTP — is
called from several processes × threads against a fresh database holding one pending order
per notification, each notification signed beforehand by a fake WeChat Pay identity. Every
notification is then delivered a second time (a duplicate must answer 204 and credit nothing),
and the books are checked.

    python bench/pay_notify.py           # PostgreSQL (the target) and SQLite for comparison
    python bench/pay_notify.py --quick   # tiny, for CI (PostgreSQL if $NEWSBOT_TEST_DATABASE_URL)

Target: ≥ 500 notifications/s on PostgreSQL.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import _common
from _common import Table, note, verdict

TARGET_PG_PER_S = 500.0
USERS = 500


def openid_for(i: int) -> str:
    return f"opaybench{i % USERS:019d}"


@contextmanager
def database(backend: str, pg_admin: str | None, workdir: Path) -> Iterator[str]:
    with ExitStack() as stack:
        if backend == "PostgreSQL":
            assert pg_admin is not None
            url = stack.enter_context(_common.temp_pg_database(pg_admin,
                                                               prefix="newsbot_bench_pay"))
        else:
            url = f"sqlite:///{workdir}/pay.db"
        _common.prepare_database(url, workdir)
        yield url


def make_settings(identity: Any, workdir: Path, db_url: str) -> Any:
    from bot.settings import Settings

    table = identity.pay_table(workdir / "paykeys", "http://127.0.0.1:9")
    return Settings.model_validate({
        "wechat": {"token": _common.TOKEN, "app_id": identity.app_id},
        "reader": {"secret": _common.READER_SECRET},
        "database": {"url": db_url}, "pay": table})


def place_orders(db_url: str, identity: Any, count: int) -> list[Any]:
    """``count`` pending orders (as the purchase page leaves them), over USERS subscribers."""
    from storage import payments, subscribers
    from storage.db import make_engine, transaction

    engine = make_engine(db_url)
    orders = []
    try:
        for start in range(0, count, 500):
            with transaction(engine) as s:
                subscribers.add_followers(s, openids=sorted({openid_for(i) for i in range(
                    start, min(count, start + 500))}))
                for i in range(start, min(count, start + 500)):
                    order = payments.new_order(
                        s, openid=openid_for(i), package=("p99", 99, 990), kind="jsapi",
                        app_id=identity.app_id, mch_id=identity.mch_id,
                        notify_url="https://bench.example.com/pay/notify",
                        ttl=timedelta(minutes=30), out_trade_no=f"NBBENCH{i:012d}")
                    orders.append(payments.mark_created(s, out_trade_no=order.out_trade_no,
                                                        prepay_id=f"wx{i:030d}"))
    finally:
        engine.dispose()
    return orders


def sign_all(identity: Any, orders: list[Any]) -> list[tuple[dict[str, str], bytes]]:
    """One TRANSACTION.SUCCESS notification per order, signed and encrypted as WeChat does."""
    import json
    import uuid

    from bot.pay.signing import encrypt_resource, new_nonce, signed_headers

    now = str(int(time.time()))
    signed = []
    for n, order in enumerate(orders):
        resource = {"appid": identity.app_id, "mchid": identity.mch_id,
                    "out_trade_no": order.out_trade_no, "transaction_id": f"42{n:026d}",
                    "trade_type": "JSAPI", "trade_state": "SUCCESS",
                    "trade_state_desc": "支付成功", "bank_type": "OTHERS",
                    "success_time": "2026-12-01T12:00:00+08:00",
                    "payer": {"openid": order.openid},
                    "amount": {"total": order.amount_fen, "payer_total": order.amount_fen,
                               "currency": "CNY", "payer_currency": "CNY"}}
        envelope = {"id": str(uuid.uuid4()), "create_time": "2026-12-01T12:00:00+08:00",
                    "resource_type": "encrypt-resource", "event_type": "TRANSACTION.SUCCESS",
                    "summary": "支付成功",
                    "resource": encrypt_resource(json.dumps(resource).encode(),
                                                 identity.apiv3_key,
                                                 associated_data="transaction",
                                                 original_type="transaction")}
        body = json.dumps(envelope, ensure_ascii=False).encode()
        signed.append((signed_headers(private_key=identity.platform_key,
                                      serial=identity.public_key_id, body=body,
                                      timestamp=now, nonce=new_nonce()), body))
    return signed


def _worker(settings: Any, batch: list[tuple[dict[str, str], bytes]], threads: int,
            start_at: float, out: Any) -> None:
    from bot.pay.notify import PayNotify
    from storage.db import make_engine

    engine = make_engine(settings.database.url, pool_size=threads)
    endpoint = PayNotify(settings, engine)
    statuses: list[int] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def work(mine: list[tuple[dict[str, str], bytes]]) -> None:
        while time.monotonic() < start_at:
            time.sleep(0.001)
        got: list[int] = []
        took: list[float] = []
        for headers, body in mine:
            began = time.perf_counter()
            answer = endpoint.handle(headers, body)
            took.append(time.perf_counter() - began)
            got.append(answer.status if answer.settlement is None
                       else (201 if answer.settlement.credited else 200))
        with lock:
            statuses.extend(got)
            latencies.extend(took)

    pool = [threading.Thread(target=work, args=(batch[i::threads],)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    engine.dispose()
    out.put((statuses, latencies, time.monotonic()))


@dataclass
class Run:
    backend: str
    label: str
    handled: int
    credited: int
    duplicates: int
    refused: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def per_s(self) -> float:
        return self.handled / self.seconds if self.seconds else 0.0


def deliver(settings: Any, signed: list[tuple[dict[str, str], bytes]], *, procs: int,
            threads: int, backend: str, label: str) -> Run:
    ctx = mp.get_context("fork")
    queue: Any = ctx.Queue()
    start_at = time.monotonic() + 1.0 + 0.2 * procs
    workers = [ctx.Process(target=_worker, args=(settings, signed[p::procs], threads,
                                                 start_at, queue)) for p in range(procs)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=3600) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    statuses = [s for r in results for s in r[0]]
    latencies = sorted(x for r in results for x in r[1])
    return Run(backend, label, len(statuses), statuses.count(201), statuses.count(200),
               sum(1 for s in statuses if s >= 300), max(r[2] for r in results) - start_at,
               _common.percentile(latencies, 50) * 1000,
               _common.percentile(latencies, 99) * 1000)


def books(db_url: str) -> tuple[list[str], int]:
    from sqlalchemy import func
    from sqlmodel import select

    from storage import ledger
    from storage.db import make_engine, transaction
    from storage.models import LedgerEntry

    engine = make_engine(db_url)
    try:
        with transaction(engine) as s:
            problems = [f"{p.openid}: {p.problem}" for p in ledger.check(s)]
            credits = int(s.exec(select(func.count()).select_from(LedgerEntry)
                                 .where(LedgerEntry.kind == "pay")).one())
    finally:
        engine.dispose()
    return problems, credits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="WeChat Pay notifications per second.")
    parser.add_argument("--orders", type=int, default=6000, help="orders (default 6000)")
    parser.add_argument("--procs", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--threads", type=int, default=4,
                        help="threads per process, each with its own connection (default 4)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite comparison")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="wait up to this many seconds for other load on the machine to "
                        "stop before measuring (default 120)")
    args = parser.parse_args(argv)
    if args.quick:
        args.orders, args.procs, args.threads, args.quiet_wait = 100, 2, 2, 0
    pg_admin, pg_note = _common.pg_admin_url(quick=args.quick)
    if args.no_pg:
        pg_admin, pg_note = None, "PostgreSQL skipped: --no-pg"
    print(_common.machine_line(pg_admin))
    print(f"{args.orders:,} orders over {USERS} subscribers, one notification each, then each "
          f"again (duplicates); PayNotify.handle (verify + decrypt + settle, one transaction), "
          f"{args.procs} processes × {args.threads} threads")
    if pg_note:
        note(pg_note)
    backends = (["PostgreSQL"] if pg_admin else []) + ([] if args.no_sqlite else ["SQLite"])

    from bot.pay.fake import FakeIdentity

    identity = FakeIdentity.generate()
    runs: list[Run] = []
    checks: list[tuple[str, list[str], int]] = []
    with tempfile.TemporaryDirectory(prefix="newsbot-bench-pay-") as tmp:
        workdir = Path(tmp)
        for backend in backends:
            with database(backend, pg_admin, workdir) as url:
                settings = make_settings(identity, workdir, url)
                print(f"  {backend}: placing {args.orders:,} orders and signing their "
                      "notifications …", flush=True)
                signed = sign_all(identity, place_orders(url, identity, args.orders))
                _common.wait_until_quiet(args.quiet_wait)
                for label in ("first delivery", "duplicate"):
                    runs.append(deliver(settings, signed, procs=args.procs,
                                        threads=args.threads, backend=backend, label=label))
                problems, credits = books(url)
                checks.append((backend, problems, credits))
    table = Table(["backend", "delivery", "handled", "credited", "dup 204", "refused",
                   "notifications/s", "p50 ms", "p99 ms"],
                  [[r.backend, r.label, f"{r.handled:,}", f"{r.credited:,}",
                    f"{r.duplicates:,}", str(r.refused), f"{r.per_s:,.0f}",
                    f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}"] for r in runs])
    print(table.render())
    ok = True
    for backend, problems, credits in checks:
        clean = not problems and credits == args.orders
        ok = ok and clean
        print(f"{backend} books: {credits:,} credits for {args.orders:,} orders, ledger check "
              f"{'clean' if not problems else 'PROBLEMS: ' + '; '.join(problems[:3])}: "
              f"{'OK' if clean else 'FAILED'}")
    for r in runs:
        expected = (r.credited, r.duplicates) == ((r.handled, 0) if r.label == "first delivery"
                                                 else (0, r.handled))
        ok = ok and expected and r.refused == 0
    pg_first = next((r for r in runs if r.backend == "PostgreSQL"
                     and r.label == "first delivery"), None)
    met = None if pg_first is None or args.quick else pg_first.per_s >= TARGET_PG_PER_S
    print(f"target ≥ {TARGET_PG_PER_S:.0f} notifications/s on PostgreSQL: "
          f"{'n/a' if pg_first is None else f'{pg_first.per_s:,.0f}/s'} {verdict(met)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
