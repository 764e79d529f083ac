"""Retention (storage.retention): what the delivery records cost before and after the purge,
and what purging millions of old rows does to the webhook.

(a) Bytes per 1,000,000 deliveries: ``inbound_message`` filled with 1,000,000 rows shaped
    like the webhook's (a real 本周 card as the stored reply, the key and openid shapes of
    WeChat's), two days old, beside 1,000,000 card events; sizes before the purge, after it,
    and after VACUUM (SQLite: the database file; PostgreSQL: pg_total_relation_size, plain
    VACUUM and VACUUM FULL).
(b) ``newsbot db purge`` deleting N old rows (10,000,000 on PostgreSQL, filled with INSERT …
    SELECT generate_series) while ``newsbot serve`` answers signed 本周 deliveries from a
    closed-loop generator (bench/webhook.py's): the webhook's p50/p99 before and during.

Run: ``python bench/purge.py`` (~3 min per backend), ``--quick`` for CI."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import _common
import webhook as wh
from _common import Table, machine_line, note

MIB = 1024 * 1024


# --------------------------------------------------------------------------- filling

def real_card_reply(db_url: str) -> str:
    """The reply the webhook stores for 本周 with the sample issue, as it stores it."""
    import httpx
    from sqlmodel import select

    from bot.app import create_app
    from bot.settings import Settings
    from storage.db import make_engine, transaction
    from storage.models import InboundMessage

    sections = _common.base_sections(db_url)
    settings = Settings.model_validate(sections)
    engine = make_engine(db_url)
    try:
        app = create_app(settings, engine)
        body = wh.BODY_TEMPLATE.format(openid=wh.openid_for(1), ts=int(time.time()), msgid=1)
        with httpx.Client(transport=httpx.WSGITransport(app=app),
                          base_url="http://127.0.0.1") as http:
            http.post(wh.signed_target(), content=body.encode(),
                      headers={"Content-Type": "text/xml"})
        with transaction(engine) as s:
            row = s.exec(select(InboundMessage)).one()
            reply = str(row.reply_json)
            s.delete(row)
        return reply
    finally:
        engine.dispose()


def _sqlite_time(age: timedelta) -> str:
    """A timestamp as SQLAlchemy stores it in SQLite (UTC, no zone, microseconds)."""
    from storage.models import utcnow

    return (utcnow() - age).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def fill_inbound(db_url: str, rows: int, reply: str, *, age: timedelta,
                 start: int = 0) -> float:
    """``rows`` deliveries ``age`` old, ids ascending, in SQL on the server; returns seconds."""
    t0 = time.perf_counter()
    if db_url.startswith("sqlite"):
        import sqlite3

        path = db_url.split("///", 1)[1]
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=OFF")  # filling only; the purge runs as configured
            conn.execute(
                "WITH RECURSIVE c(x) AS (SELECT :a UNION ALL SELECT x + 1 FROM c WHERE x < :b) "
                "INSERT INTO inbound_message (dedupe_key, openid, status, reply_json, created_at,"
                " finished_at) SELECT 'msg:' || printf('obench%022d', x % 100000) || ':' ||"
                " (100000000000000000 + x), printf('obench%022d', x % 100000), 'done', :reply,"
                " :at, :at FROM c",
                {"a": start + 1, "b": start + rows, "reply": reply, "at": _sqlite_time(age)})
    else:
        import psycopg

        with psycopg.connect(_common.libpq_url(db_url)) as conn:
            conn.execute("SET synchronous_commit = off")
            # The unique key is built once after the fill rather than row by row (minutes
            # saved at 10,000,000 rows; the table ends up exactly as the webhook's).
            found = conn.execute(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'inbound_message'::regclass"
                " AND contype = 'u'").fetchone()
            if found:
                conn.execute(f'ALTER TABLE inbound_message DROP CONSTRAINT "{found[0]}"')
            conn.execute(
                "INSERT INTO inbound_message (dedupe_key, openid, status, reply_json,"
                " created_at, finished_at) SELECT 'msg:' || 'obench' || lpad((x %% 100000)::text,"
                " 22, '0') || ':' || (100000000000000000 + x), 'obench' ||"
                " lpad((x %% 100000)::text, 22, '0'), 'done', %(reply)s, now() - %(age)s,"
                " now() - %(age)s FROM generate_series(%(a)s::bigint, %(b)s::bigint) AS x",
                {"reply": reply, "age": age, "a": start + 1, "b": start + rows})
            if found:
                conn.execute(f'ALTER TABLE inbound_message ADD CONSTRAINT "{found[0]}"'
                             " UNIQUE (dedupe_key)")
            conn.execute("ANALYZE inbound_message")
    return time.perf_counter() - t0


def fill_events(db_url: str, rows: int) -> None:
    """``rows`` card events, as the webhook records one per 本周."""
    if db_url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(db_url.split("///", 1)[1]) as conn:
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < :n) "
                "INSERT INTO event (at, kind, openid, issue_number) SELECT :at, 'card',"
                " printf('obench%022d', x % 100000), 1 FROM c",
                {"n": rows, "at": _sqlite_time(timedelta(days=2))})
    else:
        import psycopg

        with psycopg.connect(_common.libpq_url(db_url)) as conn:
            conn.execute(
                "INSERT INTO event (at, kind, openid, issue_number) SELECT now() - interval"
                " '2 days', 'card', 'obench' || lpad((x %% 100000)::text, 22, '0'), 1"
                " FROM generate_series(1, %(n)s) AS x", {"n": rows})


# --------------------------------------------------------------------------- sizes

def sqlite_bytes(db_url: str) -> dict[str, int]:
    import sqlite3

    path = db_url.split("///", 1)[1]
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    wal = Path(path + "-wal")
    return {"file": os.path.getsize(path) + (wal.stat().st_size if wal.exists() else 0),
            "free": free * page}


def sqlite_vacuum(db_url: str) -> None:
    import sqlite3

    with sqlite3.connect(db_url.split("///", 1)[1], isolation_level=None) as conn:
        conn.execute("VACUUM")


def pg_bytes(db_url: str, table: str) -> int:
    import psycopg

    with psycopg.connect(_common.libpq_url(db_url)) as conn:
        row = conn.execute("SELECT pg_total_relation_size(%s)", (table,)).fetchone()
        return int(row[0]) if row else 0


def pg_vacuum(db_url: str, full: bool = False) -> None:
    import psycopg

    with psycopg.connect(_common.libpq_url(db_url), autocommit=True) as conn:
        conn.execute("VACUUM FULL inbound_message" if full else "VACUUM inbound_message")


def sizes(backend: str, pg_admin: str | None, workdir: Path, rows: int, reply: str,
          args: argparse.Namespace) -> list[list[str]]:
    per = 1_000_000 / rows

    def mb(n: float) -> str:
        return f"{n * per / MIB:,.1f}"

    out: list[list[str]] = []
    with _common.fresh_database(backend, pg_admin, workdir, "sizes", "newsbot_bench_purge") as url:
        config = _common.write_config(workdir / "sizes.toml", _common.base_sections(url))
        sqlite = backend == "SQLite"
        empty = sqlite_bytes(url)["file"] if sqlite else pg_bytes(url, "inbound_message")
        fill_inbound(url, rows, reply, age=timedelta(days=2))
        if sqlite:
            full = sqlite_bytes(url)["file"]
            out.append([backend, "inbound_message, before the purge", mb(full - empty)])
            t0 = time.perf_counter()
            _common.run_cli(config, "db", "purge")
            purge_s = time.perf_counter() - t0
            after = sqlite_bytes(url)
            out.append([backend, "after the purge (file; pages free for reuse)",
                        f"{mb(after['file'] - empty)} ({mb(after['free'])} free)"])
            sqlite_vacuum(url)
            out.append([backend, "after VACUUM", mb(sqlite_bytes(url)["file"] - empty)])
            before_events = sqlite_bytes(url)["file"]
            fill_events(url, rows)
            out.append([backend, "event (kept): 1 card event per delivery",
                        mb(sqlite_bytes(url)["file"] - before_events)])
        else:
            full = pg_bytes(url, "inbound_message")
            out.append([backend, "inbound_message, before the purge", mb(full - empty)])
            t0 = time.perf_counter()
            _common.run_cli(config, "db", "purge")
            purge_s = time.perf_counter() - t0
            out.append([backend, "after the purge (dead rows, before VACUUM)",
                        mb(pg_bytes(url, "inbound_message") - empty)])
            pg_vacuum(url)
            out.append([backend, "after VACUUM (space kept for reuse by new rows)",
                        mb(pg_bytes(url, "inbound_message") - empty)])
            pg_vacuum(url, full=True)
            out.append([backend, "after VACUUM FULL", mb(pg_bytes(url, "inbound_message"))])
            fill_events(url, rows)
            out.append([backend, "event (kept): 1 card event per delivery",
                        mb(pg_bytes(url, "event"))])
        out.append([backend, f"db purge of {rows:,} rows took", f"{purge_s:.1f} s"])
    return out


# --------------------------------------------------------------------------- under load

def under_load(backend: str, pg_admin: str | None, workdir: Path, rows: int, reply: str,
               args: argparse.Namespace) -> tuple[list[list[str]], str]:
    """Fill ``rows`` old deliveries, serve, measure the webhook before and while ``newsbot db
    purge`` deletes them."""
    with _common.fresh_database(backend, pg_admin, workdir, "load", "newsbot_bench_purge") as url:
        fill_s = fill_inbound(url, rows, reply, age=timedelta(days=2))
        note(f"{backend}: filled {rows:,} old deliveries in {fill_s:.0f} s")
        server_args = argparse.Namespace(workers=args.workers, threads=args.threads)
        with wh.newsbot_server(f"newsbot 本周, {backend}", "purge", url, server_args,
                               workdir) as target:
            wh.sanity_check(target)
            query = wh.signed_target()

            def window(seconds: float) -> wh.LoadResult:
                return wh.python_load(target.port, query, warmup=1.0, seconds=seconds,
                                      connections=args.connections, procs=args.gen_procs)

            before = window(args.window)
            config = _common.write_config(
                workdir / "purge.toml", {**_common.base_sections(url),
                                         "retention": {"purge_batch": args.batch}})
            done: dict[str, Any] = {}

            def purge() -> None:
                t0 = time.perf_counter()
                done["out"] = _common.run_cli(config, "db", "purge", timeout=3600)
                done["seconds"] = time.perf_counter() - t0

            thread = threading.Thread(target=purge)
            thread.start()
            during: list[wh.LoadResult] = []
            while thread.is_alive() and len(during) < args.max_windows:
                during.append(window(args.window))
            thread.join()
            after = window(args.window)
        deleted = next((int(line.split()[1].replace(",", "")) for line in
                        done.get("out", "").splitlines() if line.startswith("inbound_message")),
                       0)
    rows_out = [[backend, "before", f"{before.rps:,.0f}", f"{before.p50_ms:.1f}",
                 f"{before.p99_ms:.1f}", f"{before.max_ms:.0f}", str(before.errors)]]
    for i, r in enumerate(during, 1):
        rows_out.append([backend, f"during {i}", f"{r.rps:,.0f}", f"{r.p50_ms:.1f}",
                         f"{r.p99_ms:.1f}", f"{r.max_ms:.0f}", str(r.errors)])
    rows_out.append([backend, "after", f"{after.rps:,.0f}", f"{after.p50_ms:.1f}",
                     f"{after.p99_ms:.1f}", f"{after.max_ms:.0f}", str(after.errors)])
    seconds = done.get("seconds", 0.0)
    p99s = [r.p99_ms for r in during] or [0.0]
    summary = (f"{backend}: purged {deleted:,} of {rows:,} rows in {seconds:.0f} s "
               f"({deleted / seconds if seconds else 0:,.0f} rows/s, batches of {args.batch:,}); "
               f"webhook p99 before {before.p99_ms:.1f} ms, during median "
               f"{statistics.median(p99s):.1f} ms / worst {max(p99s):.1f} ms; "
               f"server log errors {target.checks.get('log_errors')}")
    if len(during) >= args.max_windows and seconds > args.window * args.max_windows:
        summary += f" (load measured for the first {len(during)} windows only)"
    return rows_out, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_run_options(parser)
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--size-rows", type=int, default=1_000_000)
    parser.add_argument("--pg-rows", type=int, default=10_000_000,
                        help="old rows purged under load on PostgreSQL")
    parser.add_argument("--sqlite-rows", type=int, default=2_000_000,
                        help="old rows purged under load on SQLite")
    parser.add_argument("--load-reply", choices=["card", "short"], default="short",
                        help="stored reply of the rows purged under load (short: ~150 bytes, "
                        "so 10,000,000 rows fit the disk and the time)")
    parser.add_argument("--batch", type=int, default=1000, help="[retention] purge_batch")
    parser.add_argument("--window", type=float, default=10.0, help="seconds per load window")
    parser.add_argument("--max-windows", type=int, default=12)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--gen-procs", type=int, default=1)
    parser.add_argument("--skip-sizes", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_rows, args.pg_rows, args.sqlite_rows = 20_000, 50_000, 50_000
        args.window, args.max_windows, args.connections = 2.0, 3, 4
        args.batch = 500
    pg_admin, why = _common.pg_for(args)
    print(machine_line(pg_admin), flush=True)
    if why:
        note(why)
    backends = ([] if args.no_sqlite else ["SQLite"]) + ([] if pg_admin is None
                                                         else ["PostgreSQL"])
    _common.wait_until_quiet(0 if args.quick else args.quiet_wait)
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-purge-")))
        card = real_card_reply(_prepare_scratch(workdir))
        short = ('{"type": "text", "content": "'
                 + "你的余额：120 豆。回复「充值」了解获取方式。" + '"}')
        note(f"stored card reply: {len(card.encode()):,} bytes; short reply "
             f"{len(short.encode()):,} bytes")
        if not args.skip_sizes:
            size_rows: list[list[str]] = []
            for backend in backends:
                size_rows += sizes(backend, pg_admin, workdir, args.size_rows, card, args)
            print(f"\n(a) MiB per 1,000,000 deliveries ({args.size_rows:,} filled)")
            print(Table(["backend", "state", "MiB / 1M"], size_rows).render(), flush=True)
        if not args.skip_load:
            load_rows: list[list[str]] = []
            summaries: list[str] = []
            reply = card if args.load_reply == "card" else short
            for backend in backends:
                rows = args.pg_rows if backend == "PostgreSQL" else args.sqlite_rows
                got, summary = under_load(backend, pg_admin, workdir, rows, reply, args)
                load_rows += got
                summaries.append(summary)
            print(f"\n(b) webhook (signed 本周, {args.connections} connections, "
                  f"{args.workers} workers × {args.threads} threads) while `db purge` runs")
            print(Table(["backend", "window", "req/s", "p50 ms", "p99 ms", "max ms", "errors"],
                        load_rows).render())
            for s in summaries:
                print(s)
    return 0


def _prepare_scratch(workdir: Path) -> str:
    """A SQLite database with the schema and the sample issue, for the one real reply."""
    url = f"sqlite:///{workdir}/scratch.db"
    _common.prepare_database(url, workdir)
    _common.seed_sample_issue(url)
    return url


if __name__ == "__main__":
    sys.exit(main())
