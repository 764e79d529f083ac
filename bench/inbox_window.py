"""What the 48-hour window check of a reply (storage.mailbox.window) costs with a big event
table, on PostgreSQL: ``event`` and ``inbound_message`` have no index by subscriber, so the
check looks their rows up only within the window (the event table's index on time).

Seeds ``--events`` events spread evenly over 7 days across 100,000 subscribers and
``--deliveries`` deliveries over the last day, then times ``window()`` for three subscribers:
(a) wrote an inbox message an hour ago (answered by the inbox's own index), (b) wrote 60 hours
ago but read a card an hour ago (the event range), (c) nothing for 60 hours (the event range
and the deliveries, then refused). Run: ``python bench/inbox_window.py`` (~1-2 min)."""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import timedelta

from _common import Table, add_run_options, machine_line, note, pg_for, temp_pg_database
from sqlalchemy import text

from storage import events, mailbox, subscribers
from storage.db import create_schema, make_engine, transaction
from storage.models import utcnow

SPAN = timedelta(days=7)


def seed(url: str, n_events: int, n_deliveries: int) -> None:
    engine = make_engine(url)
    create_schema(engine)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO event (at, kind, openid, issue_number) "
            "SELECT :now - (i * (:span / :n)) * interval '1 second', 'card', "
            "'o_bulk_' || (i % 100000), 1 FROM generate_series(1, :n) AS i"),
            {"now": now, "span": SPAN.total_seconds(), "n": n_events})
        conn.execute(text(
            "INSERT INTO inbound_message (dedupe_key, openid, status, created_at) "
            "SELECT 'msg:o_bulk_' || (i % 100000) || ':' || i, 'o_bulk_' || (i % 100000), "
            "'done', :now - (i * (86400.0 / :n)) * interval '1 second' "
            "FROM generate_series(1, :n) AS i"), {"now": now, "n": n_deliveries})
        conn.execute(text("ANALYZE"))
    with transaction(engine) as s:
        for openid, asked, card in (("o_a", now - timedelta(hours=1), None),
                                    ("o_b", now - timedelta(hours=60), now - timedelta(hours=1)),
                                    ("o_c", now - timedelta(hours=60), None)):
            subscribers.ensure_subscriber(s, openid=openid, at=asked)
            mailbox.store(s, openid=openid, text="?", kind="text", key=f"b:{openid}", at=asked,
                          max_chars=10)
            if card is not None:
                events.record(s, events.CARD, openid=openid, at=card, issue_number=1)
    engine.dispose()


def time_window(url: str, openid: str, repeats: int) -> tuple[float, float, bool]:
    engine = make_engine(url)
    samples = []
    is_open = False
    try:
        for _ in range(repeats):
            with transaction(engine) as s:
                started = time.perf_counter()
                is_open = mailbox.window(s, openid, utcnow()).open
                samples.append((time.perf_counter() - started) * 1000)
    finally:
        engine.dispose()
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1], is_open


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--deliveries", type=int, default=300_000)
    parser.add_argument("--repeats", type=int, default=50)
    add_run_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.events, args.deliveries, args.repeats = 20_000, 5_000, 5
    admin, why = pg_for(args)
    print(machine_line(admin))
    if admin is None:
        note(why)
        return
    with temp_pg_database(admin, prefix="newsbot_bench_window") as url:
        started = time.perf_counter()
        seed(url, args.events, args.deliveries)
        note(f"seeded {args.events:,} events and {args.deliveries:,} deliveries in "
             f"{time.perf_counter() - started:.1f} s")
        rows = []
        for openid, case in (("o_a", "(a) inbox message 1 h ago"),
                             ("o_b", "(b) message 60 h ago, card 1 h ago"),
                             ("o_c", "(c) nothing for 60 h (refused)")):
            median, p99, is_open = time_window(url, openid, args.repeats)
            rows.append([case, "open" if is_open else "closed", f"{median:.2f}", f"{p99:.2f}"])
    print(Table(["subscriber", "window", "median ms", "p99 ms"], rows).render())


if __name__ == "__main__":
    main()
