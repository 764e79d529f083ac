"""Redemptions: throughput across distinct users, and a race on one user.

``storage.ledger.redeem`` is called directly, one transaction per redemption (as the webhook
does), from several processes × threads against a fresh database with many funded users. Then
N threads redeem N different issues for one user at once: exactly ⌊balance / price⌋ must
succeed, and ``storage.ledger.check`` must find the books balanced.

    python bench/redeem.py             # PostgreSQL (the target) and SQLite for comparison
    python bench/redeem.py --quick     # tiny, for CI (PostgreSQL if $NEWSBOT_TEST_DATABASE_URL)

Target: ≥ 1,000 redemptions/s across distinct users on PostgreSQL.
"""

from __future__ import annotations

import argparse
import resource
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

TARGET_PG_RPS = 1000.0
PRICE = 7


def openid_for(i: int) -> str:
    return f"oredeem{i:021d}"


# --------------------------------------------------------------------------- setup


def fund_users(db_url: str, users: int, per_user: int, price: int) -> None:
    """Create ``users`` subscribers and top each up with exactly ``per_user × price``."""
    fund_users_range(db_url, 0, users, per_user * price)


def fund_users_range(db_url: str, first: int, users: int, amount: int) -> None:
    from storage import ledger, subscribers
    from storage.db import make_engine, transaction

    engine = make_engine(db_url)
    try:
        for start in range(first, first + users, 1000):
            ids = range(start, min(first + users, start + 1000))
            with transaction(engine) as s:
                subscribers.add_followers(s, openids=[openid_for(i) for i in ids])
                for i in ids:
                    ledger.credit(s, openid=openid_for(i), amount=amount,
                                  kind="topup", key=f"bench-fund:{i}", reason="bench funding")
    finally:
        engine.dispose()


def verify_books(db_url: str) -> tuple[list[str], int, int]:
    """(ledger.check problems, entitlements, redeem entries)."""
    from sqlalchemy import func
    from sqlmodel import select

    from storage import ledger
    from storage.db import make_engine, transaction
    from storage.models import Entitlement, LedgerEntry

    engine = make_engine(db_url)
    try:
        with transaction(engine) as s:
            problems = [f"{p.openid}: {p.problem}" for p in ledger.check(s)]
            entitlements = int(s.exec(select(func.count()).select_from(Entitlement)).one())
            redeems = int(s.exec(select(func.count()).select_from(LedgerEntry)
                                 .where(LedgerEntry.kind == "redeem")).one())
    finally:
        engine.dispose()
    return problems, entitlements, redeems


# --------------------------------------------------------------------------- throughput


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class WorkerResult:
    done: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def _redeem_loop(db_url: str, users: list[int], per_user: int, price: int, start_at: float,
                 pool: int, out: Any) -> None:
    """One process: ``len(threads)`` threads, each redeeming its own users' issues."""
    from storage import ledger
    from storage.db import make_engine, transaction

    engine = make_engine(db_url, pool_size=pool)
    threads_users = [users[i::pool] for i in range(pool)]
    results = [WorkerResult() for _ in threads_users]

    def work(mine: list[int], res: WorkerResult) -> None:
        while time.monotonic() < start_at:
            time.sleep(0.001)
        for issue in range(1, per_user + 1):
            for i in mine:
                openid = openid_for(i)
                began = time.perf_counter()
                try:
                    with transaction(engine) as s:
                        r = ledger.redeem(s, openid=openid, issue_number=issue, price=price,
                                          key=f"bench-redeem:{openid}:{issue}")
                except Exception as exc:  # counted and shown, never hidden
                    res.failed += 1
                    if len(res.errors) < 3:
                        res.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                res.latencies.append(time.perf_counter() - began)
                if r.status == "unlocked" and not r.replayed:
                    res.done += 1
                else:
                    res.failed += 1

    threads = [threading.Thread(target=work, args=(m, r)) for m, r in
               zip(threads_users, results, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    total = WorkerResult()
    for r in results:
        total.done += r.done
        total.failed += r.failed
        total.errors += r.errors
        total.latencies += r.latencies
    out.put((total.done, total.failed, total.errors[:3], total.latencies,
             time.monotonic()))


@dataclass
class Throughput:
    backend: str
    users: int
    redemptions: int
    failed: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: list[str]
    layout: str
    books: tuple[list[str], int, int] = ([], 0, 0)
    client_cpu_s: float = 0.0
    db_cpu_s: float | None = None
    machine_busy_pct: float = 0.0

    @property
    def rps(self) -> float:
        return self.redemptions / self.seconds if self.seconds else 0.0


def throughput(backend: str, db_url: str, *, users: int, per_user: int, procs: int,
               threads: int) -> Throughput:
    fund_users(db_url, users, per_user, PRICE)
    start_at = time.monotonic() + 1.0 + 0.2 * procs
    fanned = _common.fan_out(_redeem_loop, [(db_url, list(range(p, users, procs)), per_user,
                                             PRICE, start_at, threads) for p in range(procs)])
    results = fanned.results
    finished = max(r[4] for r in results)
    latencies = sorted(x for r in results for x in r[3])
    return Throughput(
        backend=backend, users=users, redemptions=sum(r[0] for r in results),
        failed=sum(r[1] for r in results), seconds=finished - start_at,
        p50_ms=_common.percentile(latencies, 50) * 1000,
        p99_ms=_common.percentile(latencies, 99) * 1000,
        errors=[e for r in results for e in r[2]][:3],
        layout=f"{procs} processes × {threads} threads",
        books=verify_books(db_url), client_cpu_s=fanned.client_cpu_s,
        db_cpu_s=fanned.db_cpu_s if backend == "PostgreSQL" else None,
        machine_busy_pct=fanned.busy_pct)


@dataclass
class Sequential:
    backend: str
    wall_us: float
    cpu_us: float
    statements: dict[str, float]
    driver_us: float


def sequential(backend: str, db_url: str, count: int) -> Sequential:
    """One thread, one redemption after another: the cost of one with no contention, the
    statements it sends and the time spent inside the driver (the rest is Python)."""
    from sqlalchemy import event

    from storage import ledger
    from storage.db import make_engine, transaction

    first = 10_000_000
    fund_users_range(db_url, first, count, PRICE)
    engine = make_engine(db_url)
    verbs: dict[str, int] = {}
    driver = [0.0]

    def before(conn: Any, *a: Any) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def after(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
        driver[0] += time.perf_counter() - conn.info["bench_t0"]
        verb = statement.split(None, 1)[0].upper() if statement.strip() else "?"
        verbs[verb] = verbs.get(verb, 0) + 1

    def commit(conn: Any) -> None:
        # Sent through the driver's commit(), not a cursor: counted here so the list is whole.
        verbs["COMMIT"] = verbs.get("COMMIT", 0) + 1

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    event.listen(engine, "commit", commit)
    cpu = time.process_time()
    began = time.perf_counter()
    for i in range(first, first + count):
        with transaction(engine) as s:
            ledger.redeem(s, openid=openid_for(i), issue_number=1, price=PRICE,
                          key=f"bench-seq:{i}")
    wall = time.perf_counter() - began
    cpu = time.process_time() - cpu
    engine.dispose()
    return Sequential(backend, wall / count * 1e6, cpu / count * 1e6,
                      {k: v / count for k, v in sorted(verbs.items())},
                      driver[0] / count * 1e6)


# --------------------------------------------------------------------------- race


@dataclass
class Race:
    backend: str
    attempts: int
    balance: int
    price: int
    expected: int
    unlocked: int = 0
    refused: int = 0
    other: list[str] = field(default_factory=list)
    final_balance: int = -1
    entries: int = 0
    problems: list[str] = field(default_factory=list)
    connections: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.unlocked == self.expected and not self.other and not self.problems
                and self.final_balance == self.balance - self.expected * self.price
                and self.entries == self.expected
                and self.unlocked + self.refused == self.attempts)


def race(backend: str, db_url: str, *, attempts: int, balance: int, price: int) -> Race:
    from sqlmodel import select

    from storage import ledger, subscribers
    from storage.db import make_engine, transaction
    from storage.errors import InsufficientBalance
    from storage.models import LedgerEntry

    openid = "orace00000000000000000000000"
    result = Race(backend, attempts, balance, price, expected=balance // price)
    # PostgreSQL allows 100 connections by default: 40 + 40 overflow leaves room for others.
    engine = make_engine(db_url, pool_size=min(attempts, 40))
    size = getattr(engine.pool, "size", lambda: 0)()
    result.connections = min(attempts, size + int(getattr(engine.pool, "_max_overflow", 0)))
    with transaction(engine) as s:
        subscribers.ensure_subscriber(s, openid=openid)
        ledger.credit(s, openid=openid, amount=balance, kind="topup", key="bench-race-fund",
                      reason="bench race funding")
    barrier = threading.Barrier(attempts)
    lock = threading.Lock()

    def attempt(n: int) -> None:
        barrier.wait()
        try:
            with transaction(engine) as s:
                r = ledger.redeem(s, openid=openid, issue_number=10_000 + n, price=price,
                                  key=f"bench-race:{n}")
            outcome: str = ("unlocked" if r.status == "unlocked" and not r.replayed
                            else r.status)
        except InsufficientBalance:
            outcome = "refused"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"[:200]
        with lock:
            if outcome == "unlocked":
                result.unlocked += 1
            elif outcome == "refused":
                result.refused += 1
            else:
                result.other.append(outcome)

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(attempts)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - began
    with transaction(engine) as s:
        result.final_balance = ledger.get_balance(s, openid=openid)
        result.entries = len(s.exec(select(LedgerEntry.id).where(
            LedgerEntry.openid == openid, LedgerEntry.kind == "redeem")).all())
        result.problems = [f"{p.openid}: {p.problem}" for p in ledger.check(s)]
    engine.dispose()
    return result


# --------------------------------------------------------------------------- main


def database(backend: str, pg_admin: str | None, workdir: Path,
             tag: str) -> AbstractContextManager[str]:
    return _common.fresh_database(backend, pg_admin, workdir, tag, "newsbot_bench_redeem")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Redemption throughput and a one-user race.")
    parser.add_argument("--users", type=int, default=4000, help="funded users (default 4000)")
    parser.add_argument("--per-user", type=int, default=3,
                        help="issues each user redeems (default 3)")
    parser.add_argument("--procs", type=int, default=4, help="processes (default 4)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads per process, each with its own connection (default 2)")
    parser.add_argument("--race", type=int, default=200, help="racing redemptions on one "
                        "user (default 200)")
    parser.add_argument("--race-balance", type=int, default=1000,
                        help=f"that user's balance (default 1000; price {PRICE})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite comparison")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="wait up to this many seconds for other load on the machine to "
                        "stop before measuring (default 120)")
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.per_user, args.procs, args.threads = 40, 2, 2, 2
        args.race, args.race_balance = 20, 100
        args.quiet_wait = 0
    pg_admin, pg_note = _common.pg_admin_url(quick=args.quick)
    if args.no_pg:
        pg_admin, pg_note = None, "PostgreSQL skipped: --no-pg"
    print(_common.machine_line(pg_admin))
    print(f"throughput: {args.users:,} users × {args.per_user} issues, one transaction per "
          f"redemption (storage.ledger.redeem), {args.procs} processes × {args.threads} "
          f"threads; race: {args.race} threads, one user, balance {args.race_balance}, "
          f"price {PRICE}")
    if pg_note:
        note(pg_note)
    backends: list[str] = []
    if pg_admin:
        backends.append("PostgreSQL")
    if not args.no_sqlite:
        backends.append("SQLite")

    runs: list[Throughput] = []
    seqs: list[Sequential] = []
    races: list[Race] = []
    with tempfile.TemporaryDirectory(prefix="newsbot-bench-redeem-") as tmp:
        workdir = Path(tmp)
        for backend in backends:
            with database(backend, pg_admin, workdir, "throughput") as url:
                print(f"  {backend}: funding {args.users:,} users, then redeeming …",
                      flush=True)
                _common.wait_until_quiet(args.quiet_wait)
                runs.append(throughput(backend, url, users=args.users,
                                       per_user=args.per_user, procs=args.procs,
                                       threads=args.threads))
                seqs.append(sequential(backend, url, 50 if args.quick else 1000))
            with database(backend, pg_admin, workdir, "race") as url:
                print(f"  {backend}: {args.race}-way race on one user …", flush=True)
                races.append(race(backend, url, attempts=args.race,
                                  balance=args.race_balance, price=PRICE))
    return report(runs, seqs, races)


def report(runs: list[Throughput], seqs: list[Sequential], races: list[Race]) -> int:
    print()
    table = Table(["database", "layout", "redemptions", "seconds", "redemptions/s",
                   "p50 ms", "p99 ms", "failed", "ledger check", "client CPU µs/op",
                   "postgres CPU µs/op", "machine busy %"], [])
    for r in runs:
        problems, entitlements, redeems = r.books
        books = ("OK" if not problems and entitlements == redeems == r.redemptions
                 else f"{len(problems)} problems, {entitlements} unlocks, {redeems} entries")
        n = max(1, r.redemptions)
        table.rows.append([r.backend, r.layout, f"{r.redemptions:,}", f"{r.seconds:.2f}",
                           f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
                           str(r.failed), books, f"{r.client_cpu_s / n * 1e6:,.0f}",
                           "-" if r.db_cpu_s is None else f"{r.db_cpu_s / n * 1e6:,.0f}",
                           f"{r.machine_busy_pct:.0f}"])
    print(table.render())
    for r in runs:
        for e in r.errors:
            print(f"  {r.backend} error: {e}")
    for q in seqs:
        parts = ", ".join(f"{verb} {n:.1f}" for verb, n in q.statements.items())
        if q.backend == "PostgreSQL":
            parts += " (+ the BEGIN psycopg sends by itself)"
        print(f"  {q.backend}, one thread, no contention: {q.wall_us:,.0f} µs per redemption "
              f"(CPU {q.cpu_us:,.0f} µs); statements: {parts}; inside the driver "
              f"{q.driver_us:,.0f} µs, the rest Python")
    print()
    table = Table(["database", "attempts", "balance", "price", "expected", "unlocked",
                   "refused", "other errors", "final balance", "connections", "seconds",
                   "ledger check", "result"], [])
    for c in races:
        table.rows.append([c.backend, str(c.attempts), str(c.balance), str(c.price),
                           str(c.expected), str(c.unlocked), str(c.refused), str(len(c.other)),
                           str(c.final_balance), str(c.connections), f"{c.seconds:.2f}",
                           "OK" if not c.problems else f"{len(c.problems)} problems",
                           "OK" if c.ok else "WRONG"])
    print(table.render())
    for c in races:
        for e in c.other[:3]:
            print(f"  {c.backend} race error: {e}")
    print()
    pg = next((r for r in runs if r.backend == "PostgreSQL"), None)
    if pg is not None:
        print(f"PostgreSQL: {pg.rps:,.0f} redemptions/s (target ≥ {TARGET_PG_RPS:,.0f}): "
              f"{verdict(pg.rps >= TARGET_PG_RPS)}")
    else:
        print("PostgreSQL: n/a (skipped)")
    for c in races:
        print(f"{c.backend} race: {c.unlocked} of {c.attempts} succeeded, expected exactly "
              f"⌊{c.balance}/{c.price}⌋ = {c.expected}: {'OK' if c.ok else 'WRONG'}")
    bad = [c for c in races if not c.ok] + [r for r in runs if r.failed or r.books[0]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

