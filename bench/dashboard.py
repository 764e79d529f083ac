"""The console's dashboard: GET /console/ through the real WSGI app (bot.app.create_app) with
a logged-in operator's session, on a database of 100,000 subscribers, 30 weekly issues and
1,000,000 events spread over those 30 weeks (SQLite and PostgreSQL).

Reported per database: median and p95 of the whole request (session check, storage.stats
over the last 12 weeks, the SVG charts and the page) and of ``storage.stats.compute`` alone,
for the default 12 weeks and for ``?weeks=52`` (every event). Target: ≤ 200 ms for the
default dashboard. Runs in one process, one request at a time (an operator's page, not a
load test).

    python bench/dashboard.py            # ~2–3 min, most of it seeding
    python bench/dashboard.py --quick    # tiny sizes, for CI
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import _common
from _common import Table, note, percentile, verdict

TARGET_MS = 200.0
SEED_PAGE = 10_000
OPERATOR = "o_bench_operator"
# Event kinds and their share of the events (what a selling account sees: many card views,
# fewer opens, a few unlocks and top-ups, follows and unfollows).
MIX = (("card", 45), ("excerpt", 20), ("full", 6), ("unlock", 6), ("topup", 3),
       ("follow", 12), ("unfollow", 4), ("inbox", 4))


PAGES = (("dashboard, 12 weeks", ""), ("?weeks=52 (every event)", "?weeks=52"))


@dataclass
class Result:
    backend: str
    seed_s: float
    rows: list[tuple[str, list[float], list[float]]]  # (page, first views ms, then ms)


def seed(url: str, *, subscribers: int, events: int, issues: int, weeks: int) -> float:
    """Subscribers, published issues and events over the last ``weeks`` weeks; seconds."""
    from sqlalchemy import insert

    from storage import subscribers as subs
    from storage.content import parse_issue_file
    from storage.db import make_engine, transaction
    from storage.issues import publish_issue, upsert_issue
    from storage.models import Event

    began = time.perf_counter()
    engine = make_engine(url)
    now = datetime.now(UTC)
    rng = random.Random(10)
    try:
        openids = [f"ofake{i:023d}" for i in range(subscribers)]
        for start in range(0, subscribers, SEED_PAGE):
            with transaction(engine) as s:
                subs.add_followers(s, openids=openids[start:start + SEED_PAGE])
        sample = parse_issue_file(_common.SAMPLE_ISSUE, default_free_percent=10)
        with transaction(engine) as s:
            for n in range(1, issues + 1):
                upsert_issue(s, parsed=replace(sample, number=n, title=f"第 {n} 期的标题"),
                             default_free_percent=10)
                publish_issue(s, number=n, at=now - timedelta(weeks=issues - n))
        kinds = [k for k, share in MIX for _ in range(share)]
        span = weeks * 7 * 86400

        def row() -> dict[str, Any]:
            kind = rng.choice(kinds)
            at = now - timedelta(seconds=rng.randrange(span))
            issue = None
            if kind in ("card", "excerpt", "full", "unlock"):
                # Mostly the issue of that week, sometimes an older one.
                newest = issues - int((now - at).days // 7)
                issue = max(1, min(issues, newest - (rng.randrange(4) if rng.random() < .3
                                                    else 0)))
            amount = 5 if kind == "unlock" else 50 if kind == "topup" else None
            detail = ("tokens" if kind == "unlock" else "pay" if kind == "topup" else
                      "text" if kind == "inbox" else None)
            return {"at": at, "kind": kind, "openid": openids[rng.randrange(subscribers)],
                    "issue_number": issue, "detail": detail, "amount": amount}

        table = Event.__table__  # type: ignore[attr-defined]
        columns = ("at", "kind", "openid", "issue_number", "detail", "amount")
        for start in range(0, events, 50_000):
            batch = [row() for _ in range(min(50_000, events - start))]
            if engine.dialect.name == "postgresql":  # COPY: minutes faster than INSERTs
                raw = engine.raw_connection()
                try:
                    with raw.cursor() as cur, cur.copy(  # type: ignore[attr-defined]
                            f"COPY event ({', '.join(columns)}) FROM STDIN") as copy:
                        for r in batch:
                            copy.write_row([r[c] for c in columns])
                    raw.commit()
                finally:
                    raw.close()
            else:
                with engine.begin() as conn:
                    conn.execute(insert(table), batch)
    finally:
        engine.dispose()
    return time.perf_counter() - began


def measure(backend: str, url: str, *, rounds: int, cold: int, seed_s: float) -> Result:
    """``cold`` times: a new app (nothing kept), log in, the first view of each page; then
    ``rounds`` views of each on the last app (the figures kept: bot/console/pages/home.py)."""
    import httpx

    from bot.app import create_app
    from bot.console.links import ConsoleLinks
    from bot.settings import Settings
    from storage.db import make_engine

    settings = Settings.model_validate({
        "wechat": {"token": _common.TOKEN}, "reader": {"secret": _common.READER_SECRET},
        "server": {"public_url": "http://bench"}, "database": {"url": url},
        "operators": {"openids": [OPERATOR]}, "broadcast": {"scheduler": False}})
    engine = make_engine(url)
    # What the scheduler's stats job does every minute in `newsbot serve`: fold the events
    # into the distinct-reader pairs the dashboard counts (storage.stats.roll_up).
    from storage import stats
    from storage.db import transaction

    t0 = time.perf_counter()
    with transaction(engine) as session:
        stats.roll_up(session, timezone=settings.broadcast.timezone)
    print(f"{backend}: roll_up of the seeded events {time.perf_counter() - t0:.1f} s (untimed "
          "in the views)", flush=True)
    firsts: dict[str, list[float]] = {label: [] for label, _ in PAGES}
    warm: dict[str, list[float]] = {label: [] for label, _ in PAGES}

    def view(client: httpx.Client, query: str) -> float:
        t0 = time.perf_counter()
        page = client.get(f"/console/{query}")
        elapsed = (time.perf_counter() - t0) * 1000
        assert page.status_code == 200 and "<svg" in page.text, page.text[:500]
        return elapsed

    try:
        for attempt in range(cold):
            app = create_app(settings, engine)
            with httpx.Client(transport=httpx.WSGITransport(app=app),
                              base_url="http://bench") as client:
                link = ConsoleLinks(settings).url(OPERATOR).removeprefix("http://bench")
                assert client.get(link).status_code == 303
                for label, query in PAGES:
                    firsts[label].append(view(client, query))
                if attempt == cold - 1:
                    for label, query in PAGES:
                        warm[label] = sorted(view(client, query) for _ in range(rounds))
    finally:
        engine.dispose()
    return Result(backend, seed_s, [(label, sorted(firsts[label]), warm[label])
                                    for label, _ in PAGES])


def report(results: list[Result], sizes: str) -> int:
    print()
    table = Table(["database", "page", "first view ms (each)", "then median ms", "then p95 ms",
                   "seed s (untimed)"], [])
    for r in results:
        for label, first, warm in r.rows:
            table.rows.append([r.backend, label, " / ".join(f"{v:.0f}" for v in first),
                               f"{statistics.median(warm):.1f}", f"{percentile(warm, 95):.1f}",
                               f"{r.seed_s:.0f}"])
    print(table.render())
    print()
    for r in results:
        label, first, warm = r.rows[0]
        p95 = percentile(warm, 95)
        print(f"{r.backend}: {label}: median {statistics.median(warm):.1f} ms, p95 {p95:.1f} ms "
              f"(target ≤ {TARGET_MS:g} ms): {verdict(p95 <= TARGET_MS)}; the first view "
              f"after a start computes the figures: {statistics.median(first):.0f} ms")
    print(f"sizes: {sizes}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The console dashboard's response time.")
    parser.add_argument("--subscribers", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--issues", type=int, default=30, help="one a week, over as many weeks")
    parser.add_argument("--rounds", type=int, default=20,
                        help="views measured per page once its figures are kept")
    parser.add_argument("--cold", type=int, default=2,
                        help="first views per page, each on a new app (default 2)")
    parser.add_argument("--no-sqlite", action="store_true", help="skip SQLite")
    _common.add_run_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.subscribers, args.events, args.issues, args.rounds, args.cold = (
            500, 5_000, 5, 3, 1)
        args.quiet_wait = 0
    pg_admin, pg_note = _common.pg_for(args)
    print(_common.machine_line(pg_admin))
    sizes = (f"{args.subscribers:,} subscribers, {args.events:,} events over {args.issues} "
             f"weeks, {args.issues} issues; per page {args.cold} first views (each on a new app) "
             f"and {args.rounds} views after")
    print(sizes)
    if pg_note:
        note(pg_note)
    backends = ([] if args.no_sqlite else ["SQLite"]) + (["PostgreSQL"] if pg_admin else [])
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="newsbot-bench-dashboard-") as tmp:
        for backend in backends:
            with _common.fresh_database(backend, pg_admin, Path(tmp), "dashboard",
                                        "newsbot_bench_dashboard") as url:
                print(f"  {backend}: seeding …", flush=True)
                seed_s = seed(url, subscribers=args.subscribers, events=args.events,
                              issues=args.issues, weeks=args.issues)
                _common.wait_until_quiet(args.quiet_wait)
                print(f"  {backend}: measuring …", flush=True)
                results.append(measure(backend, url, rounds=args.rounds, cold=args.cold,
                                       seed_s=seed_s))
    return report(results, sizes)


if __name__ == "__main__":
    sys.exit(main())
