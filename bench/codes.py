"""Redemption codes: making and exporting a batch, and redeeming codes under load.

(a) ``newsbot code create --count 100000 --tokens 10 --out codes.csv`` run as an operator runs
    it (a subprocess: start-up, the batch, the CSV written and linked into place), on SQLite and
    on PostgreSQL; then the same batch made in process (``storage.codes.create_batch``) to show
    where the time goes. The CSV is checked: as many distinct codes as asked for, each stored
    under its digest, and a sample of them redeems.
(b) Redemptions across distinct codes: ``storage.codes.redeem_code`` in a transaction of its
    own (as the webhook runs it), from processes × threads, each thread with subscribers of its
    own; PostgreSQL (the target) and SQLite for comparison. Every code must be granted exactly
    once, and ``ledger.check`` must be clean afterwards.
(c) The same through the real app: ``newsbot serve`` (2 workers), signed XML deliveries of
    distinct codes from distinct subscribers, answers checked.

    python bench/codes.py              # PostgreSQL and SQLite, full sizes
    python bench/codes.py --quick      # tiny, for CI (PostgreSQL if $NEWSBOT_TEST_DATABASE_URL)

Targets: (a) ≤ 10 s for 100,000 codes created and exported; (b) ≥ 1,000 redemptions/s across
distinct codes on PostgreSQL.
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
TARGET_PG_RPS = 1000.0
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
    add_subscribers_range(db_url, 0, count)


def add_subscribers_range(db_url: str, first: int, count: int) -> None:
    from storage import subscribers
    from storage.db import make_engine, transaction

    engine = make_engine(db_url)
    try:
        for start in range(first, first + count, 5000):
            with transaction(engine) as s:
                subscribers.add_followers(s, openids=[
                    openid_for(i) for i in range(start, min(first + count, start + 5000))])
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


def _redeem_worker(db_url: str, jobs: list[tuple[str, str]], threads: int, start_at: float,
                   out: Any) -> None:
    """One process: ``threads`` threads, each redeeming its own subscribers' codes."""
    from storage import codes
    from storage.db import make_engine, transaction

    engine = make_engine(db_url, pool_size=threads)
    secret = SECRET.encode()
    by_thread: list[list[tuple[str, str]]] = [[] for _ in range(threads)]
    for openid, code in jobs:  # a subscriber's codes all go to one thread: no lock waits
        by_thread[int(openid[-6:]) % threads].append((openid, code))
    done = [0] * threads
    wrong: list[str] = []
    latencies: list[list[float]] = [[] for _ in range(threads)]

    def work(t: int) -> None:
        while time.monotonic() < start_at:
            time.sleep(0.001)
        for openid, code in by_thread[t]:
            began = time.perf_counter()
            status: str
            try:
                with transaction(engine) as s:
                    status = codes.redeem_code(s, openid=openid, text=code, secret=secret,
                                               key=f"bench-redeem:{code}").status
            except Exception as exc:  # counted and shown, never hidden
                status = f"{type(exc).__name__}: {exc}"[:200]
            latencies[t].append(time.perf_counter() - began)
            if status == "granted":
                done[t] += 1
            elif len(wrong) < 3:
                wrong.append(status)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    engine.dispose()
    out.put((sum(done), len(jobs) - sum(done), wrong, [x for ls in latencies for x in ls],
             time.monotonic()))


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
    client_cpu_s: float = 0.0
    db_cpu_s: float | None = None
    busy_pct: float = 0.0
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
        errors=[e for r in results for e in r[2]][:3], client_cpu_s=fanned.client_cpu_s,
        db_cpu_s=fanned.db_cpu_s if backend == "PostgreSQL" else None,
        busy_pct=fanned.busy_pct)


def redeem_throughput(backend: str, db_url: str, *, count: int, users: int, procs: int,
                      threads: int) -> Throughput:
    add_subscribers(db_url, users)
    made, _ = make_codes(db_url, count)
    jobs = [(openid_for(i % users), code) for i, code in enumerate(made)]
    # By subscriber, so that no two processes ever wait on one subscriber's row lock.
    shares = [(db_url, [j for j in jobs if int(j[0][-6:]) // threads % procs == p], threads)
              for p in range(procs)]
    run = collect(backend, f"{procs} processes × {threads} threads", _redeem_worker, shares,
                  time.monotonic() + 1.0 + 0.2 * procs)
    run.books = verify_redeemed(db_url, count)
    return run


@dataclass
class OneByOne:
    backend: str
    wall_us: float
    cpu_us: float
    statements: dict[str, float]


def one_by_one(backend: str, db_url: str, count: int) -> OneByOne:
    """One thread, one redemption after another, no contention: what one costs, and the
    statements it sends (cursor executions; COMMIT counted from the connection)."""
    from sqlalchemy import event

    from storage import codes
    from storage.db import make_engine, transaction

    first = 900_000
    add_subscribers_range(db_url, first, count)
    made, _ = make_codes(db_url, count)
    engine = make_engine(db_url)
    verbs: dict[str, int] = {}

    def count_verb(verb: str) -> None:
        verbs[verb] = verbs.get(verb, 0) + 1

    event.listen(engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_a: count_verb(statement.split(None, 1)[0].upper()))
    event.listen(engine, "commit", lambda _c: count_verb("COMMIT"))
    cpu, began = time.process_time(), time.perf_counter()
    for n, code in enumerate(made):
        with transaction(engine) as s:
            codes.redeem_code(s, openid=openid_for(first + n), text=code, secret=SECRET.encode(),
                              key=f"bench-one:{n}")
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    engine.dispose()
    return OneByOne(backend, wall / count * 1e6, cpu / count * 1e6,
                    {k: v / count for k, v in sorted(verbs.items())})


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
        run = collect(backend, f"server {server_workers} × {server_threads}; client {procs} × "
                      f"{threads}", _http_worker,
                      [(port, jobs[p::procs], threads) for p in range(procs)],
                      time.monotonic() + 1.0)
    finally:
        _common.stop_process(server)
    run.client_cpu_s, run.db_cpu_s = 0.0, None  # the client shares the machine: not shown
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
    parser.add_argument("--redeem", type=int, default=20_000,
                        help="codes redeemed in the throughput run (default 20,000)")
    parser.add_argument("--users", type=int, default=4000,
                        help="subscribers redeeming them (default 4000)")
    parser.add_argument("--procs", type=int, default=4,
                        help="redeeming processes (default 4)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads in each, a connection each (default 2)")
    parser.add_argument("--http", type=int, default=4000,
                        help="deliveries through the real app (default 4,000; 0: skip)")
    parser.add_argument("--no-sqlite", action="store_true", help="skip SQLite")
    _common.add_run_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.redeem, args.users, args.procs, args.threads = 500, 200, 40, 2, 2
        args.http, args.quiet_wait = 60, 0
    pg_admin, pg_note = _common.pg_for(args)
    print(_common.machine_line(pg_admin))
    print(f"create: `newsbot code create --count {args.count:,} --tokens {TOKENS} --out …`; "
          f"redeem: {args.redeem:,} distinct codes by {args.users:,} subscribers, one "
          f"transaction each (storage.codes.redeem_code), {args.procs} processes × "
          f"{args.threads} threads; http: {args.http:,} signed deliveries")
    if pg_note:
        note(pg_note)
    backends = (["PostgreSQL"] if pg_admin else []) + ([] if args.no_sqlite else ["SQLite"])
    made: list[Creation] = []
    runs: list[Throughput] = []
    singles: list[OneByOne] = []
    with tempfile.TemporaryDirectory(prefix="newsbot-bench-codes-") as tmp:
        workdir = Path(tmp)
        for backend in backends:
            _common.wait_until_quiet(args.quiet_wait)
            with database(backend, pg_admin, workdir, "create") as url:
                print(f"  {backend}: creating and exporting {args.count:,} codes …", flush=True)
                made.append(create_and_export(backend, url, workdir, args.count))
            with database(backend, pg_admin, workdir, "redeem") as url:
                print(f"  {backend}: redeeming {args.redeem:,} codes …", flush=True)
                _common.wait_until_quiet(args.quiet_wait)
                runs.append(redeem_throughput(backend, url, count=args.redeem,
                                              users=args.users, procs=args.procs,
                                              threads=args.threads))
                singles.append(one_by_one(backend, url, 50 if args.quick else 1000))
            if args.http:
                with database(backend, pg_admin, workdir, "http") as url:
                    print(f"  {backend}: {args.http:,} deliveries through newsbot serve …",
                          flush=True)
                    _common.wait_until_quiet(args.quiet_wait)
                    runs.append(http_throughput(backend, url, workdir, count=args.http,
                                                procs=2, threads=8, server_workers=2,
                                                server_threads=8))
    return report(made, runs, singles)


def report(made: list[Creation], runs: list[Throughput], singles: list[OneByOne]) -> int:
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
    table = Table(["database", "path", "layout", "redemptions", "seconds", "redemptions/s",
                   "p50 ms", "p99 ms", "failed", "books", "client CPU µs/op",
                   "postgres CPU µs/op", "machine busy %"], [])
    for r in runs:
        n = max(1, r.redemptions)
        table.rows.append([r.backend, "http" if r.layout.startswith("server") else "storage",
                           r.layout, f"{r.redemptions:,}", f"{r.seconds:.2f}",
                           f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
                           str(r.failed), r.books,
                           f"{r.client_cpu_s / n * 1e6:,.0f}" if r.client_cpu_s else "-",
                           "-" if r.db_cpu_s is None else f"{r.db_cpu_s / n * 1e6:,.0f}",
                           f"{r.busy_pct:.0f}"])
    print(table.render())
    for r in runs:
        for e in r.errors:
            print(f"  {r.backend} error: {e}")
    for q in singles:
        parts = ", ".join(f"{verb} {n:.1f}" for verb, n in q.statements.items())
        print(f"  {q.backend}, one thread, no contention: {q.wall_us:,.0f} µs per code "
              f"redemption (CPU {q.cpu_us:,.0f} µs); statements: {parts}")
    print()
    for c in made:
        print(f"{c.backend}: {c.count:,} codes created and exported in {c.cli_s:.2f} s "
              f"(target ≤ {TARGET_CREATE_S:.0f} s for 100,000): "
              f"{verdict(c.cli_s <= TARGET_CREATE_S) if c.count >= 100_000 else 'n/a'}")
    pg = next((r for r in runs if r.backend == "PostgreSQL" and r.db_cpu_s is not None), None)
    if pg is not None:
        print(f"PostgreSQL: {pg.rps:,.0f} code redemptions/s (target ≥ {TARGET_PG_RPS:,.0f}): "
              f"{verdict(pg.rps >= TARGET_PG_RPS)}")
    else:
        print("PostgreSQL: n/a (skipped)")
    bad = [c for c in made if not c.ok] + [r for r in runs if r.failed or r.books != "OK"]
    if bad:
        print("WRONG: see the tables above")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
