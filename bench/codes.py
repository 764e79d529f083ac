"""Redemption codes: a batch made and exported as an operator makes it, and codes redeemed
through the real app.

(a) ``newsbot code create --count 100000 --tokens 10 --out codes.csv`` run as an operator runs
    it (a subprocess: start-up, the batch, the CSV written and linked into place), on SQLite and
    on PostgreSQL; then the same batch made in process (``storage.codes.create_batch``) to show
    how much of that is the batch. The CSV is checked: as many distinct codes as asked for,
    each stored under its digest, and a sample of them redeems.
(b) Codes redeemed through ``newsbot serve`` (2 workers × 8 threads): signed XML deliveries of
    distinct codes from distinct subscribers, from 2 processes × 8 threads; every reply must say
    the code was redeemed, every code be used once with one credit, ``ledger.check`` be clean
    and the server log free of errors. (``storage.codes.redeem_code`` alone, layout by layout,
    is bench/code_redeem.py.)

    python bench/codes.py              # PostgreSQL and SQLite, full sizes
    python bench/codes.py --quick      # tiny, for CI (PostgreSQL if $NEWSBOT_TEST_DATABASE_URL)

Target: (a) ≤ 10 s for 100,000 codes created and exported.
"""

from __future__ import annotations

import argparse
import csv
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
from _common import Table, note, verdict

TARGET_CREATE_S = 10.0
SECRET = "bench-codes-secret-0123456789abcdef"
TOKENS = 10
SAMPLE = 20  # codes of the exported batch redeemed to prove the CSV is right


def openid_for(i: int) -> str:
    return f"ocodes{i:022d}"


def config_for(db_url: str, workdir: Path, name: str, port: int = 8080) -> Path:
    sections = _common.base_sections(db_url, port=port)
    sections["codes"] = {"secret": SECRET}
    return _common.write_config(workdir / f"{name}.toml", sections)


def database(backend: str, pg_admin: str | None, workdir: Path,
             tag: str) -> AbstractContextManager[str]:
    return _common.fresh_database(backend, pg_admin, workdir, tag, "newsbot_bench_codes")


def add_subscribers(db_url: str, count: int) -> None:
    from storage import subscribers
    from storage.db import make_engine, transaction

    engine = make_engine(db_url)
    try:
        for start in range(0, count, 5000):
            with transaction(engine) as s:
                subscribers.add_followers(
                    s, openids=[openid_for(i) for i in range(start, min(count, start + 5000))])
    finally:
        engine.dispose()


def make_codes(db_url: str, count: int) -> tuple[list[str], float]:
    """One tokens batch of ``count`` codes, in process; (the codes, seconds)."""
    from storage import codes
    from storage.db import make_engine, transaction

    engine = make_engine(db_url)
    try:
        began = time.perf_counter()
        with transaction(engine) as s:
            made = codes.create_batch(s, secret=SECRET.encode(), kind="tokens", count=count,
                                      tokens=TOKENS, label="bench")
        return made.codes, time.perf_counter() - began
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- (a) create


@dataclass
class Creation:
    backend: str
    count: int
    cli_s: float = 0.0  # `newsbot code create … --out`, the whole subprocess
    batch_s: float = 0.0  # create_batch in process: codes, digests, insert, commit
    csv_rows: int = 0
    distinct: int = 0
    stored: int = 0
    sample_ok: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.csv_rows == self.distinct == self.count and self.stored == 2 * self.count
                and self.sample_ok == min(SAMPLE, self.count) and not self.problems)


def create_and_export(backend: str, db_url: str, workdir: Path, count: int) -> Creation:
    from sqlalchemy import func, select

    from storage import codes, ledger, subscribers
    from storage.db import make_engine, transaction
    from storage.models import RedemptionCode

    result = Creation(backend, count)
    config = config_for(db_url, workdir, f"create-{backend}")
    out = workdir / f"codes-{backend}.csv"
    began = time.perf_counter()
    _common.run_cli(config, "code", "create", "--count", str(count), "--tokens", str(TOKENS),
                    "--out", str(out), "--label", "bench")
    result.cli_s = time.perf_counter() - began

    with out.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    exported = [r["code"] for r in rows]
    result.csv_rows, result.distinct = len(rows), len(set(exported))
    if {r["grants"] for r in rows} != {f"tokens:{TOKENS}"}:
        result.problems.append(f"grants column: {sorted({r['grants'] for r in rows})[:3]}")

    # The same batch again in process: how much of the CLI's time is the batch itself (the
    # rest is the CSV, the settings and the process).
    _, result.batch_s = make_codes(db_url, count)

    engine = make_engine(db_url)
    try:
        with transaction(engine) as s:
            result.stored = int(s.execute(select(func.count()).select_from(RedemptionCode))
                                .scalar_one())
            subscribers.add_followers(s, openids=["osample"])
        for n, code in enumerate(random.sample(exported, min(SAMPLE, count))):
            with transaction(engine) as s:
                done = codes.redeem_code(s, openid="osample", text=code,
                                         secret=SECRET.encode(), key=f"bench-sample:{n}")
            result.sample_ok += done.status == "granted"
        with transaction(engine) as s:
            result.problems += [f"{p.openid}: {p.problem}" for p in ledger.check(s)]
    finally:
        engine.dispose()
    return result


# --------------------------------------------------------------------------- (b) redeem


@dataclass
class Throughput:
    backend: str
    layout: str
    redemptions: int = 0
    failed: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: list[str] = field(default_factory=list)
    busy_pct: float = 0.0
    client_cpu_s: float = 0.0  # the load generator's processes
    server_cpu_s: float = 0.0  # newsbot serve, master and workers
    db_cpu_s: float | None = None  # every postgres process on the machine
    books: str = ""

    @property
    def rps(self) -> float:
        return self.redemptions / self.seconds if self.seconds else 0.0


def collect(backend: str, layout: str, worker: Any, shares: list[tuple[Any, ...]],
            start_at: float) -> Throughput:
    """``worker(*share, start_at, queue)`` in a process per share, all starting at
    ``start_at``; each reports (done, failed, errors, latencies, finished at)."""
    fanned = _common.fan_out(worker, [(*share, start_at) for share in shares])
    results = fanned.results
    latencies = sorted(x for r in results for x in r[3])
    return Throughput(
        backend, layout, redemptions=sum(r[0] for r in results),
        failed=sum(r[1] for r in results), seconds=max(r[4] for r in results) - start_at,
        p50_ms=_common.percentile(latencies, 50) * 1000,
        p99_ms=_common.percentile(latencies, 99) * 1000,
        errors=[e for r in results for e in r[2]][:3], busy_pct=fanned.busy_pct,
        client_cpu_s=fanned.client_cpu_s)


def verify_redeemed(db_url: str, count: int) -> str:
    """'OK' when each code was used exactly once with one credit each and the books balance."""
    from sqlalchemy import func, select
    from sqlmodel import col

    from storage import ledger
    from storage.db import make_engine, transaction
    from storage.models import CodeRedemption, LedgerEntry, RedemptionCode

    engine = make_engine(db_url)
    try:
        with transaction(engine) as s:
            problems = ledger.check(s)
            uses = s.execute(select(func.count()).select_from(CodeRedemption)).scalar_one()
            credits = s.execute(select(func.count()).select_from(LedgerEntry)
                                .where(col(LedgerEntry.kind) == "code")).scalar_one()
            overused = s.execute(select(func.count()).select_from(RedemptionCode).where(
                col(RedemptionCode.used) > col(RedemptionCode.uses))).scalar_one()
    finally:
        engine.dispose()
    if not problems and uses == credits == count and not overused:
        return "OK"
    return f"{len(problems)} problems, {uses} uses, {credits} credits, {overused} overused"


# --------------------------------------------------------------------------- (c) HTTP


def _delivery(openid: str, code: str, msg_id: int) -> bytes:
    return (f"<xml><ToUserName><![CDATA[gh_bench]]></ToUserName>"
            f"<FromUserName><![CDATA[{openid}]]></FromUserName>"
            f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[{code}]]></Content><MsgId>{msg_id}</MsgId></xml>").encode()


def _http_worker(port: int, jobs: list[tuple[str, str, int]], threads: int, start_at: float,
                 out: Any) -> None:
    import httpx

    from bot.wechat.webhook import sign

    granted = [0] * threads
    wrong: list[str] = []
    latencies: list[list[float]] = [[] for _ in range(threads)]

    def work(t: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            while time.monotonic() < start_at:
                time.sleep(0.001)
            for openid, code, msg_id in jobs[t::threads]:
                ts, nonce = str(int(time.time())), secrets.token_hex(6)
                began = time.perf_counter()
                resp = http.post("/wechat", params={"signature": sign(_common.TOKEN, ts, nonce),
                                                    "timestamp": ts, "nonce": nonce},
                                 content=_delivery(openid, code, msg_id),
                                 headers={"Content-Type": "text/xml"})
                latencies[t].append(time.perf_counter() - began)
                if resp.status_code == 200 and "兑换成功" in resp.text:
                    granted[t] += 1
                elif len(wrong) < 3:
                    wrong.append(f"{resp.status_code}: {resp.text[:160]}")

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    out.put((sum(granted), len(jobs) - sum(granted), wrong,
             [x for ls in latencies for x in ls], time.monotonic()))


def http_throughput(backend: str, db_url: str, workdir: Path, *, count: int, procs: int,
                    threads: int, server_workers: int, server_threads: int) -> Throughput:
    """Distinct subscribers, one code each, as signed deliveries to a real server."""
    add_subscribers(db_url, count)
    made, _ = make_codes(db_url, count)
    port = _common.free_port()
    config = config_for(db_url, workdir, f"http-{backend}", port=port)
    log = workdir / f"http-{backend}.log"
    with log.open("wb") as f:
        server = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "serve", "--config", str(config),
             "--workers", str(server_workers), "--threads", str(server_threads)],
            stdout=f, stderr=subprocess.STDOUT, env=_common.child_env(), cwd=workdir)
    try:
        _common.wait_for_port(port, server, what="newsbot serve")
        time.sleep(1.0)  # every worker has built its app
        jobs = [(openid_for(i), code, 9_000_000 + i) for i, code in enumerate(made)]
        cpu0, db0 = _common.process_tree_cpu(server.pid), _common.named_processes_cpu("postgres")
        run = collect(backend, f"newsbot serve {server_workers} × {server_threads}, "
                      f"client {procs} × {threads}", _http_worker,
                      [(port, jobs[p::procs], threads) for p in range(procs)],
                      time.monotonic() + 1.0)
        run.server_cpu_s = _common.process_tree_cpu(server.pid) - cpu0
        if backend == "PostgreSQL":
            run.db_cpu_s = _common.named_processes_cpu("postgres") - db0
    finally:
        _common.stop_process(server)
    errors = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
              if "Traceback" in line or "status=500" in line or "outcome=error" in line]
    run.errors += errors[:3]
    run.books = verify_redeemed(db_url, count) + (f", {len(errors)} log errors" if errors
                                                  else "")
    return run


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Code batches made and exported; code "
                                     "redemptions under load.")
    parser.add_argument("--count", type=int, default=100_000,
                        help="codes in the exported batch (default 100,000)")
    parser.add_argument("--http", type=int, default=4000,
                        help="deliveries through the real app (default 4,000; 0: skip)")
    parser.add_argument("--no-sqlite", action="store_true", help="skip SQLite")
    _common.add_run_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.http, args.quiet_wait = 500, 60, 0
    pg_admin, pg_note = _common.pg_for(args)
    print(_common.machine_line(pg_admin))
    print(f"create: `newsbot code create --count {args.count:,} --tokens {TOKENS} --out …`; "
          f"http: {args.http:,} signed deliveries of distinct codes by distinct subscribers")
    if pg_note:
        note(pg_note)
    backends = (["PostgreSQL"] if pg_admin else []) + ([] if args.no_sqlite else ["SQLite"])
    made: list[Creation] = []
    runs: list[Throughput] = []
    with tempfile.TemporaryDirectory(prefix="newsbot-bench-codes-") as tmp:
        workdir = Path(tmp)
        for backend in backends:
            _common.wait_until_quiet(args.quiet_wait)
            with database(backend, pg_admin, workdir, "create") as url:
                print(f"  {backend}: creating and exporting {args.count:,} codes …", flush=True)
                made.append(create_and_export(backend, url, workdir, args.count))
            if args.http:
                with database(backend, pg_admin, workdir, "http") as url:
                    print(f"  {backend}: {args.http:,} deliveries through newsbot serve …",
                          flush=True)
                    _common.wait_until_quiet(args.quiet_wait)
                    runs.append(http_throughput(backend, url, workdir, count=args.http,
                                                procs=2, threads=8, server_workers=2,
                                                server_threads=8))
    return report(made, runs)


def report(made: list[Creation], runs: list[Throughput]) -> int:
    print()
    table = Table(["database", "codes", "CLI s (create + export)", "batch in process s",
                   "distinct in CSV", "stored", "sample redeemed", "result"], [])
    for c in made:
        table.rows.append([c.backend, f"{c.count:,}", f"{c.cli_s:.2f}", f"{c.batch_s:.2f}",
                           f"{c.distinct:,}",
                           f"{c.stored:,}", f"{c.sample_ok}/{min(SAMPLE, c.count)}",
                           "OK" if c.ok else "WRONG"])
    print(table.render())
    for c in made:
        for p in c.problems[:3]:
            print(f"  {c.backend} problem: {p}")
    print()
    table = Table(["database", "through", "redeemed", "seconds", "redemptions/s", "p50 ms",
                   "p99 ms", "failed", "books", "server CPU µs/op", "client CPU µs/op",
                   "postgres CPU µs/op", "machine busy %"], [])
    for r in runs:
        n = max(1, r.redemptions)
        table.rows.append([r.backend, r.layout, f"{r.redemptions:,}", f"{r.seconds:.2f}",
                           f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
                           str(r.failed), r.books, f"{r.server_cpu_s / n * 1e6:,.0f}",
                           f"{r.client_cpu_s / n * 1e6:,.0f}",
                           "-" if r.db_cpu_s is None else f"{r.db_cpu_s / n * 1e6:,.0f}",
                           f"{r.busy_pct:.0f}"])
    print(table.render())
    for r in runs:
        for e in r.errors:
            print(f"  {r.backend} error: {e}")
    print()
    for c in made:
        print(f"{c.backend}: {c.count:,} codes created and exported in {c.cli_s:.2f} s "
              f"(target ≤ {TARGET_CREATE_S:.0f} s for 100,000): "
              f"{verdict(c.cli_s <= TARGET_CREATE_S) if c.count >= 100_000 else 'n/a'}")
    for r in runs:
        print(f"{r.backend}: {r.rps:,.0f} code redemptions/s through newsbot serve")
    bad = [c for c in made if not c.ok] + [r for r in runs if r.failed or r.books != "OK"]
    if bad:
        print("WRONG: see the tables above")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
