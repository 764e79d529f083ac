"""``newsbot stats`` over 1,000,000 events: storage.stats.compute() in process and
``newsbot stats --json`` as an operator runs it, on SQLite and PostgreSQL.

The events (a fixed seed: 50 issues, 100,000 subscribers, 26 weeks up to now; card views most,
then excerpt opens, full reads, unlocks, top-ups, follows…) are made once in Python and bulk
loaded (executemany on SQLite, COPY on PostgreSQL; not timed), the subscribers with balances
and a QR scene for some. The figures are then checked against counts this script makes from the
same rows (tokens topped up and spent, one issue's distinct card views, distinct readers).

    python bench/stats.py            # 1,000,000 events on SQLite and PostgreSQL, ~2 min
    python bench/stats.py --quick    # 20,000 events, for CI

First storage.stats.roll_up folds every event into the pair tables (timed on its own: the
scheduler's job does that once, then a minute's events at a time); compute() is then timed
with nothing past the watermark, and once with the last 5,000 events as the tail.

Target: ``stats`` over 1,000,000 events in ≤ 1 s.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import _common
from _common import Table, child_env, note, verdict

TARGET_S = 1.0
SCENES = tuple(f"scene{i:02d}" for i in range(10))
# kind, weight, what detail/amount it carries
MIX: tuple[tuple[str, float], ...] = (
    ("card", 0.55), ("excerpt", 0.18), ("full", 0.07), ("unlock", 0.06), ("topup", 0.03),
    ("follow", 0.05), ("unfollow", 0.015), ("scan", 0.01), ("inbox", 0.015), ("code", 0.01),
    ("pass", 0.005))


@dataclass
class Data:
    events: list[tuple[datetime, str, str, int | None, str | None, int | None]]
    subscribers: list[tuple[str, int, str | None, bool]]  # openid, balance, scene, following
    topups: int  # Σ topup amounts
    spent: int  # Σ unlock + pass amounts
    issue1_cards: int  # distinct subscribers shown issue 1's card
    readers: int  # distinct subscribers with any event


def openid_for(i: int) -> str:
    return f"ostats{i:022d}"


def generate(n_events: int, n_subs: int, n_issues: int, weeks: int, now: datetime) -> Data:
    rnd = random.Random(10)
    start = now - timedelta(weeks=weeks)
    span = int((now - start).total_seconds())
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    drawn = rnd.choices(kinds, weights, k=n_events)
    rows: list[tuple[datetime, str, str, int | None, str | None, int | None]] = []
    topups = spent = 0
    cards1: set[int] = set()
    readers: set[int] = set()
    for kind in drawn:
        # Most events by anyone, the rest by the keenest twentieth of the readers.
        who = rnd.randrange(n_subs if rnd.random() < 0.7 else max(1, n_subs // 20))
        readers.add(who)
        at = start + timedelta(seconds=rnd.randrange(span))
        issue = detail = amount = None
        if kind in ("card", "excerpt", "full", "unlock"):
            issue = rnd.randrange(1, n_issues + 1)
            if kind == "card" and issue == 1:
                cards1.add(who)
        if kind == "unlock":
            detail = rnd.choice(("tokens", "tokens", "pass", "code", "gift"))
            amount = 30 if detail == "tokens" else None
        elif kind == "topup":
            detail = rnd.choice(("operator", "pay", "code"))
            amount = rnd.choice((10, 50, 100))
            topups += amount
        elif kind == "pass":
            detail, amount = "month", 60
        elif kind in ("follow", "scan"):
            detail = rnd.choice(SCENES) if rnd.random() < 0.4 else None
        elif kind == "inbox":
            detail = "text"
        elif kind == "code":
            detail = "tokens"
        if kind in ("unlock", "pass") and amount:
            spent += amount
        rows.append((at, kind, openid_for(who), issue, detail, amount))
    rows.sort(key=lambda r: r[0])  # recorded as they happen: in time order, as ids are
    subs = [(openid_for(i), rnd.randrange(0, 300),
             rnd.choice(SCENES) if rnd.random() < 0.3 else None, rnd.random() < 0.9)
            for i in range(n_subs)]
    return Data(rows, subs, topups, spent, len(cards1), len(readers))


def _sqlite_ts(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")  # SQLAlchemy's storage format


def load(url: str, data: Data) -> float:
    """Bulk load subscribers and events; returns the seconds it took."""
    t0 = time.perf_counter()
    if url.startswith("sqlite"):
        _load_sqlite(url.removeprefix("sqlite:///"), data)
    else:
        _load_pg(url, data)
    return time.perf_counter() - t0


def _load_sqlite(path: str, data: Data) -> None:
    import sqlite3

    made = _sqlite_ts(data.events[0][0])
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO subscriber (openid, subscribed, balance, created_at, scene) "
            "VALUES (?, ?, ?, ?, ?)", ((o, f, b, made, s) for o, b, s, f in data.subscribers))
        conn.executemany(
            "INSERT INTO event (at, kind, openid, issue_number, detail, amount) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            ((_sqlite_ts(at), k, o, i, d, a) for at, k, o, i, d, a in data.events))
    conn.execute("ANALYZE")
    conn.close()


def _load_pg(url: str, data: Data) -> None:
    import psycopg

    made = data.events[0][0]
    with psycopg.connect(_common.libpq_url(url)) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY subscriber (openid, subscribed, balance, created_at, scene) "
                          "FROM STDIN") as copy:
                for o, b, s, f in data.subscribers:
                    copy.write_row((o, f, b, made, s))
            with cur.copy("COPY event (at, kind, openid, issue_number, detail, amount) "
                          "FROM STDIN") as copy:
                for row in data.events:
                    copy.write_row(row)
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE event")
        conn.execute("VACUUM ANALYZE subscriber")


def add_issues(url: str, n_issues: int) -> None:
    from storage.content import parse_issue_text
    from storage.db import make_engine, transaction
    from storage.issues import publish_issue, upsert_issue

    engine = make_engine(url)
    try:
        with transaction(engine) as s:
            for n in range(1, n_issues + 1):
                src = (f'+++\nnumber = {n}\ntitle = "第{n}期"\nprice = 30\nfree_percent = 10\n'
                       '[[topics]]\ntitle = "话题"\nquestions = ["问题？"]\n+++\n\n'
                       + "正文的一段话。" * 40 + "\n")
                parsed = parse_issue_text(src, file=f"issue-{n}.md", default_free_percent=10)
                upsert_issue(s, parsed=parsed, default_free_percent=10)
                publish_issue(s, number=n)
    finally:
        engine.dispose()


@dataclass
class Run:
    backend: str
    events: int
    load_s: float
    compute_s: list[float]
    compute_cpu_s: list[float]
    rollup_s: float  # storage.stats.roll_up of every event, from nothing
    rollup_cpu_s: float
    tail_s: float  # compute() with TAIL events past the watermark
    cli_s: float
    startup_s: float  # `newsbot --version`: the CLI's own start, to tell apart from stats
    since_s: float
    issue_s: float
    checks: list[str]

    @property
    def best(self) -> float:
        return min(self.compute_s)


def time_compute(url: str, **kw: Any) -> tuple[float, float, Any]:
    """(wall s, CPU s of this process and PostgreSQL's backends, the stats)."""
    from storage import stats
    from storage.db import make_engine, transaction

    engine = make_engine(url)
    try:
        with transaction(engine) as s:
            s.connection()  # connected before the clock starts
            t0, c0 = time.perf_counter(), time.process_time()
            pg0 = _common.named_processes_cpu("postgres")
            result = stats.compute(s, **kw)
            cpu = time.process_time() - c0 + _common.named_processes_cpu("postgres") - pg0
            return time.perf_counter() - t0, cpu, result
    finally:
        engine.dispose()


def time_roll_up(url: str) -> tuple[float, float]:
    """(wall s, CPU s) of one roll_up transaction, as the scheduler's job runs it."""
    from storage import stats
    from storage.db import make_engine, transaction

    engine = make_engine(url)
    try:
        with transaction(engine) as s:
            s.connection()
            t0, c0 = time.perf_counter(), time.process_time()
            pg0 = _common.named_processes_cpu("postgres")
            stats.roll_up(s, timezone="Asia/Shanghai")
        cpu = time.process_time() - c0 + _common.named_processes_cpu("postgres") - pg0
        return time.perf_counter() - t0, cpu
    finally:
        engine.dispose()


TAIL = 5_000  # events past the watermark in the "with a tail" timing: ~minutes of a busy day


def set_watermark_back(url: str, by: int) -> None:
    from sqlalchemy import text

    from storage.db import make_engine

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE stats_rollup SET last_event_id = last_event_id - :by"),
                         {"by": by})
    finally:
        engine.dispose()


def check(result: Any, data: Data) -> list[str]:
    problems = []
    topups = sum(w.topup_tokens for w in result.weeks)
    if topups != data.topups:
        problems.append(f"top-ups {topups} != {data.topups}")
    spent = sum(w.revenue_tokens for w in result.weeks)
    if spent != data.spent:
        problems.append(f"spent {spent} != {data.spent}")
    one = next((i for i in result.issues if i.number == 1), None)
    if one is None or one.card_views != data.issue1_cards:
        problems.append(f"issue 1 card views {one and one.card_views} != {data.issue1_cards}")
    if sum(i.revenue_tokens for i in result.issues) + sum(
            60 for e in data.events if e[1] == "pass") != data.spent:
        problems.append("issue revenue + passes != spent")
    if result.tokens_outstanding != sum(b for _, b, _, _ in data.subscribers):
        problems.append("tokens outstanding")
    return problems


def add_funnel_index(url: str) -> None:
    """What --funnel-index measures: the issues' funnel read in order from an index."""
    from sqlalchemy import text

    from storage.db import make_engine

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE INDEX ix_event_funnel ON event "
                              "(issue_number, kind, openid)"))
            conn.execute(text("ANALYZE event"))
    finally:
        engine.dispose()


def run_backend(backend: str, url: str, data: Data, workdir: Path, n_issues: int,
                rounds: int, funnel_index: bool) -> Run:
    add_issues(url, n_issues)
    print(f"  {backend}: loading {len(data.events):,} events …", flush=True)
    load_s = load(url, data)
    if funnel_index:
        add_funnel_index(url)
    rollup_s, rollup_cpu_s = time_roll_up(url)
    times, cpus = [], []
    result = None
    for _ in range(rounds):
        seconds, cpu, result = time_compute(url)
        times.append(seconds)
        cpus.append(cpu)
    problems = check(result, data)
    since_s, _, _ = time_compute(url, since=datetime.now(UTC) - timedelta(weeks=4))
    issue_s, _, _ = time_compute(url, issue=1)
    # The last TAIL events as if not folded yet (their pairs are: the tail's NOT EXISTS probes
    # and distinct counts are what is timed, the answer is the same).
    set_watermark_back(url, TAIL)
    tail_s, _, tailed = time_compute(url)
    problems += [f"with a tail: {p}" for p in check(tailed, data)]
    config = _common.write_config(workdir / f"{backend}.toml", _common.base_sections(url))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bot.cli", "--version"], capture_output=True,
                   env=child_env(), timeout=300, check=True)
    startup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bot.cli", "--config", str(config), "stats",
                           "--json"], capture_output=True, text=True, env=child_env(),
                          timeout=300, check=False)
    cli_s = time.perf_counter() - t0
    if done.returncode != 0:
        problems.append(f"CLI exit {done.returncode}: {done.stderr[-300:]}")
    else:
        doc = json.loads(done.stdout)
        if sum(w["topup_tokens"] for w in doc["weeks"]) != data.topups:
            problems.append("CLI top-ups differ")
    return Run(backend + (" + funnel index" if funnel_index else ""), len(data.events), load_s,
               times, cpus, rollup_s, rollup_cpu_s, tail_s, cli_s, startup_s, since_s, issue_s,
               problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="newsbot stats over many events.")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--subscribers", type=int, default=100_000)
    parser.add_argument("--issues", type=int, default=50)
    parser.add_argument("--weeks", type=int, default=26)
    parser.add_argument("--rounds", type=int, default=3, help="compute() runs per database")
    parser.add_argument("--no-sqlite", action="store_true", help="skip SQLite")
    parser.add_argument("--funnel-index", action="store_true",
                        help="add an index on event (issue_number, kind, openid) first")
    _common.add_run_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.subscribers, args.issues, args.quiet_wait = 20_000, 2_000, 5, 0
    pg_admin, pg_note = _common.pg_for(args)
    print(_common.machine_line(pg_admin))
    print(f"{args.events:,} events, {args.subscribers:,} subscribers, {args.issues} issues, "
          f"{args.weeks} weeks; compute() best of {args.rounds}")
    if pg_note:
        note(pg_note)
    t0 = time.perf_counter()
    data = generate(args.events, args.subscribers, args.issues, args.weeks, datetime.now(UTC))
    print(f"  generated in {time.perf_counter() - t0:.1f} s; {data.readers:,} distinct readers",
          flush=True)
    backends = (["PostgreSQL"] if pg_admin else []) + ([] if args.no_sqlite else ["SQLite"])
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="newsbot-bench-stats-") as tmp:
        workdir = Path(tmp)
        for backend in backends:
            with _common.fresh_database(backend, pg_admin, workdir, "stats",
                                        "newsbot_bench_stats") as url:
                _common.wait_until_quiet(args.quiet_wait)
                runs.append(run_backend(backend, url, data, workdir, args.issues,
                                        args.rounds, args.funnel_index))
    print()
    table = Table(["database", "events", "load s", "roll_up s", "roll_up CPU s",
                   "compute() s best", "median", "CPU s", f"with {TAIL:,} tail s",
                   "--since 4 weeks s", "--issue 1 s", "CLI --json s", "CLI start s",
                   "checks", "≤ 1 s"], [])
    ok = True
    for r in runs:
        good = not r.checks
        ok = ok and good
        table.rows.append([r.backend, f"{r.events:,}", f"{r.load_s:.1f}", f"{r.rollup_s:.2f}",
                           f"{r.rollup_cpu_s:.2f}", f"{r.best:.3f}",
                           f"{statistics.median(r.compute_s):.3f}",
                           f"{min(r.compute_cpu_s):.3f}", f"{r.tail_s:.3f}", f"{r.since_s:.3f}",
                           f"{r.issue_s:.3f}", f"{r.cli_s:.2f}", f"{r.startup_s:.2f}",
                           "OK" if good else "WRONG",
                           verdict(r.best <= TARGET_S) if not args.quick else "n/a"])
    print(table.render())
    for r in runs:
        for p in r.checks:
            print(f"  {r.backend} problem: {p}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
