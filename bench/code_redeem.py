"""Code redemptions: throughput across distinct codes and distinct subscribers.

N subscribers each redeem their own code of one tokens batch through
``storage.codes.redeem_code``, one transaction per redemption (as the webhook does), from 1, 4
and 8 threads of one process (each thread its own pooled connection), then 4 processes × 2
threads (one process's threads share its GIL), every layout on a fresh database. Afterwards
every code must be used once, every subscriber credited once and ``storage.ledger.check``
empty. Then one redemption on an idle database is replayed to count its statements.

    python bench/code_redeem.py              # PostgreSQL (the target)
    python bench/code_redeem.py --sqlite     # and SQLite for comparison
    python bench/code_redeem.py --quick      # tiny, for CI (PostgreSQL if the test URL is set)

Target (issue 8): ≥ 1,000 code redemptions/s on PostgreSQL across distinct codes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
from _common import Table, note, verdict

TARGET_PG_RPS = 1000.0
TOKENS = 30
SECRET = b"bench-codes-secret-0123456789abcdef"


def openid_for(i: int) -> str:
    return f"ocode{i:023d}"


@contextmanager
def database(backend: str, pg_admin: str | None, workdir: Path, tag: str) -> Iterator[str]:
    if backend == "PostgreSQL":
        assert pg_admin is not None
        with _common.temp_pg_database(pg_admin, prefix="newsbot_bench_codes") as url:
            _common.prepare_database(url, workdir)
            yield url
    else:
        url = f"sqlite:///{workdir}/{tag}.db"
        _common.prepare_database(url, workdir)
        yield url


def seed(db_url: str, n: int) -> list[str]:
    """``n`` subscribers with no tokens and one batch of ``n`` single-use tokens codes."""
    from storage import codes, subscribers
    from storage.db import make_engine, transaction

    engine = make_engine(db_url)
    try:
        for start in range(0, n, 5000):
            with transaction(engine) as s:
                subscribers.add_followers(
                    s, openids=[openid_for(i) for i in range(start, min(n, start + 5000))])
        with transaction(engine) as s:
            return codes.create_batch(s, secret=SECRET, kind="tokens", count=n, tokens=TOKENS,
                                      label="bench").codes
    finally:
        engine.dispose()


@dataclass
class Run:
    backend: str
    layout: str  # processes × threads
    redemptions: int = 0
    failed: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    client_cpu_s: float = 0.0
    db_cpu_s: float | None = None
    load_before: str = ""
    load_after: str = ""
    books: str = ""

    @property
    def rps(self) -> float:
        return self.redemptions / self.seconds if self.seconds else 0.0


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


@dataclass
class Part:
    """What one process's threads did."""

    done: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def _redeem_part(db_url: str, code_list: list[str], mine: range, threads: int,
                 start_at: float) -> Part:
    """``threads`` threads of this process redeem the codes ``mine`` (each its own slice and
    pooled connection), starting together at ``start_at`` (time.monotonic)."""
    from storage import codes
    from storage.db import make_engine, transaction

    engine = make_engine(db_url, pool_size=threads)
    total = Part()
    lock = threading.Lock()

    def work(slice_: range) -> None:
        part = Part()
        while time.monotonic() < start_at:
            time.sleep(0.001)
        for i in slice_:
            began = time.perf_counter()
            try:
                with transaction(engine) as s:
                    out = codes.redeem_code(s, openid=openid_for(i), text=code_list[i],
                                            secret=SECRET, key=f"bench-code:{i}")
            except Exception as exc:  # counted and shown, never hidden
                part.failed += 1
                part.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            part.latencies.append(time.perf_counter() - began)
            if out.status == "granted" and out.tokens == TOKENS:
                part.done += 1
            else:
                part.failed += 1
                part.errors.append(f"status {out.status}")
        with lock:
            total.done += part.done
            total.failed += part.failed
            total.errors += part.errors[:3]
            total.latencies += part.latencies

    workers = [threading.Thread(target=work, args=(mine[t::threads],)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    engine.dispose()
    return total


def _child(db_url: str, code_list: list[str], mine: range, threads: int, start_at: float,
           out: Any) -> None:
    out.put(_redeem_part(db_url, code_list, mine, threads, start_at))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def redeem_all(backend: str, db_url: str, code_list: list[str], procs: int,
               threads: int) -> Run:
    """Every code redeemed once, by ``procs`` processes × ``threads`` threads (one process:
    this one)."""
    run = Run(backend, f"{procs} × {threads}")
    n = len(code_list)
    run.load_before = load_average()
    db_cpu0 = _common.named_processes_cpu("postgres") if backend == "PostgreSQL" else 0.0
    start_at = time.monotonic() + (0.5 if procs == 1 else 1.0 + 0.2 * procs)
    if procs == 1:
        cpu0 = time.process_time()
        parts = [_redeem_part(db_url, code_list, range(n), threads, start_at)]
        run.client_cpu_s = time.process_time() - cpu0
    else:
        ctx = mp.get_context("fork")
        queue: Any = ctx.Queue()
        cpu0 = _children_cpu()
        children = [ctx.Process(target=_child, args=(db_url, code_list, range(p, n, procs),
                                                     threads, start_at, queue))
                    for p in range(procs)]
        for c in children:
            c.start()
        parts = [queue.get() for _ in children]
        for c in children:
            c.join()
        run.client_cpu_s = _children_cpu() - cpu0
    run.seconds = time.monotonic() - start_at
    if backend == "PostgreSQL":
        run.db_cpu_s = _common.named_processes_cpu("postgres") - db_cpu0
    run.load_after = load_average()
    for part in parts:
        run.redemptions += part.done
        run.failed += part.failed
        run.errors += part.errors[:3]
        run.latencies += part.latencies
    run.latencies.sort()
    run.books = verify(db_url, n)
    return run


def verify(db_url: str, n: int) -> str:
    """"OK" when every code was used once and credited once and the ledger balances."""
    from sqlalchemy import func
    from sqlmodel import select

    from storage import ledger
    from storage.db import make_engine, transaction
    from storage.models import CodeRedemption, LedgerEntry, RedemptionCode, Subscriber

    engine = make_engine(db_url)
    try:
        with transaction(engine) as s:
            problems = ledger.check(s)
            used = int(s.exec(select(func.coalesce(func.sum(RedemptionCode.used), 0))).one())
            uses = int(s.exec(select(func.count()).select_from(CodeRedemption)).one())
            credits = int(s.exec(select(func.count()).select_from(LedgerEntry)
                                 .where(LedgerEntry.kind == "code")).one())
            total = int(s.exec(select(func.coalesce(func.sum(Subscriber.balance), 0))).one())
    finally:
        engine.dispose()
    if not problems and used == uses == credits == n and total == n * TOKENS:
        return "OK"
    return (f"{len(problems)} problems, used {used}, uses {uses}, credits {credits}, "
            f"tokens {total}")


def statements_of_one(db_url: str) -> tuple[Counter[str], float]:
    """The statements one redemption sends on an otherwise idle database, and its wall µs
    (median of 50)."""
    from sqlalchemy import event

    from storage import codes
    from storage.db import make_engine, transaction

    made = seed_extra(db_url, 51)
    engine = make_engine(db_url, pool_size=1)
    verbs: Counter[str] = Counter()

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        verbs[statement.lstrip().split(None, 1)[0].upper()] += 1

    def commit(_conn: Any) -> None:
        verbs["COMMIT"] += 1

    walls: list[float] = []
    for i, (openid, code) in enumerate(made):
        if i == 1:  # the first one warms the pool and the statement caches
            event.listen(engine, "before_cursor_execute", count)
            event.listen(engine, "commit", commit)
        began = time.perf_counter()
        with transaction(engine) as s:
            codes.redeem_code(s, openid=openid, text=code, secret=SECRET, key=f"seq:{openid}")
        walls.append(time.perf_counter() - began)
    engine.dispose()
    runs = len(made) - 1
    walls = sorted(walls[1:])
    return Counter({k: v // runs for k, v in verbs.items()}), walls[len(walls) // 2] * 1e6


def seed_extra(db_url: str, n: int) -> list[tuple[str, str]]:
    from storage import codes, subscribers
    from storage.db import make_engine, transaction

    engine = make_engine(db_url)
    openids = [f"oseq{i:024d}" for i in range(n)]
    try:
        with transaction(engine) as s:
            subscribers.add_followers(s, openids=openids)
            made = codes.create_batch(s, secret=SECRET, kind="tokens", count=n,
                                      tokens=TOKENS).codes
    finally:
        engine.dispose()
    return list(zip(openids, made, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Code redemption throughput.")
    parser.add_argument("--codes", type=int, default=6000,
                        help="codes (and subscribers) per run (default 6000)")
    parser.add_argument("--layouts", default="1x1,1x4,1x8,4x2",
                        help="processes x threads, one run each (default 1x1,1x4,1x8,4x2: "
                        "1, 4 and 8 threads of one process, then 4 processes of 2 threads "
                        "as bench/redeem.py)")
    parser.add_argument("--sqlite", action="store_true", help="also run on SQLite")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="wait up to this many seconds for other load on the machine to "
                        "stop before each run (default 60)")
    args = parser.parse_args(argv)
    layouts = [(int(p), int(t)) for p, t in (x.split("x") for x in args.layouts.split(","))]
    if args.quick:
        args.codes, layouts, args.quiet_wait = 40, [(1, 1), (1, 4), (2, 2)], 0
    pg_admin, pg_note = _common.pg_admin_url(quick=args.quick)
    if args.no_pg:
        pg_admin, pg_note = None, "PostgreSQL skipped: --no-pg"
    print(_common.machine_line(pg_admin))
    print(f"{args.codes:,} subscribers each redeem their own single-use code (+{TOKENS} "
          f"tokens) through storage.codes.redeem_code, one transaction each, from "
          f"{', '.join(f'{p} × {t}' for p, t in layouts)} processes × threads; a fresh "
          "database per run")
    if pg_note:
        note(pg_note)
    backends = (["PostgreSQL"] if pg_admin else []) + (
        ["SQLite"] if args.sqlite or (args.quick and not pg_admin) else [])
    runs: list[Run] = []
    singles: list[tuple[str, Counter[str], float]] = []
    with tempfile.TemporaryDirectory(prefix="newsbot-bench-codes-") as tmp:
        workdir = Path(tmp)
        for backend in backends:
            for procs, threads in layouts:
                with database(backend, pg_admin, workdir, f"l{procs}x{threads}") as url:
                    print(f"  {backend}, {procs} × {threads}: seeding {args.codes:,} codes, "
                          "then redeeming …", flush=True)
                    made = seed(url, args.codes)
                    _common.wait_until_quiet(args.quiet_wait)
                    runs.append(redeem_all(backend, url, made, procs, threads))
                    if (procs, threads) == layouts[0]:
                        singles.append((backend, *statements_of_one(url)))
    return report(runs, singles)


def report(runs: list[Run], singles: list[tuple[str, Counter[str], float]]) -> int:
    print()
    table = Table(["database", "procs × threads", "redemptions", "seconds", "redemptions/s",
                   "p50 ms", "p99 ms", "failed", "books", "client CPU µs/op", "postgres CPU µs/op",
                   "load avg before → after"], [])
    for r in runs:
        n = max(1, r.redemptions)
        table.rows.append([
            r.backend, r.layout, f"{r.redemptions:,}", f"{r.seconds:.2f}",
            f"{r.rps:,.0f}", f"{_common.percentile(r.latencies, 50) * 1e3:.2f}",
            f"{_common.percentile(r.latencies, 99) * 1e3:.2f}", str(r.failed), r.books,
            f"{r.client_cpu_s / n * 1e6:,.0f}",
            "-" if r.db_cpu_s is None else f"{r.db_cpu_s / n * 1e6:,.0f}",
            f"{r.load_before} → {r.load_after}"])
    print(table.render())
    for r in runs:
        for e in r.errors:
            print(f"  {r.backend} {r.layout} error: {e}")
    for backend, verbs, wall_us in singles:
        parts = ", ".join(f"{verb} {n}" for verb, n in sorted(verbs.items()))
        print(f"  {backend}, one redemption on an idle database: {wall_us:,.0f} µs; "
              f"statements: {parts}")
    print()
    pg = [r for r in runs if r.backend == "PostgreSQL"]
    if pg:
        best = max(pg, key=lambda r: r.rps)
        print(f"PostgreSQL: {best.rps:,.0f} code redemptions/s at {best.layout} "
              f"(target ≥ {TARGET_PG_RPS:,.0f}): {verdict(best.rps >= TARGET_PG_RPS)}")
    else:
        print("PostgreSQL: n/a (skipped)")
    bad = [r for r in runs if r.failed or r.books != "OK"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
