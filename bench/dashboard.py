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
from zoneinfo import ZoneInfo

import _common
from _common import Table, note, percentile, verdict

TARGET_MS = 200.0
SEED_PAGE = 10_000
OPERATOR = "o_bench_operator"
# Event kinds and their share of the events (what a selling account sees: many card views,
# fewer opens, a few unlocks and top-ups, follows and unfollows).
MIX = (("card", 45), ("excerpt", 20), ("full", 6), ("unlock", 6), ("topup", 3),
       ("follow", 12), ("unfollow", 4), ("inbox", 4))


@dataclass
class Result:
    backend: str
    seed_s: float
    rows: list[tuple[str, list[float], list[float]]]  # (label, request ms, compute ms)


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
        for start in range(0, events, 50_000):
            batch = [row() for _ in range(min(50_000, events - start))]
            with engine.begin() as conn:
                conn.execute(insert(table), batch)
    finally:
        engine.dispose()
    return time.perf_counter() - began


def measure(backend: str, url: str, *, rounds: int, seed_s: float) -> Result:
    import httpx

    from bot.app import create_app
    from bot.console.links import ConsoleLinks
    from bot.console.pages.home import window_start
    from bot.settings import Settings
    from storage import stats
    from storage.db import make_engine, read_only

    settings = Settings.model_validate({
        "wechat": {"token": _common.TOKEN}, "reader": {"secret": _common.READER_SECRET},
        "server": {"public_url": "http://bench"}, "database": {"url": url},
        "operators": {"openids": [OPERATOR]}, "broadcast": {"scheduler": False}})
    engine = make_engine(url)
    result = Result(backend, seed_s, [])
    try:
        app = create_app(settings, engine)
        with httpx.Client(transport=httpx.WSGITransport(app=app),
                          base_url="http://bench") as client:
            link = ConsoleLinks(settings).url(OPERATOR).removeprefix("http://bench")
            opened = client.get(link)
            assert opened.status_code == 303, opened.text
            for label, query, weeks in (("dashboard, 12 weeks", "", 12),
                                        ("?weeks=52 (every event)", "?weeks=52", 52)):
                zone = settings.broadcast.timezone
                requests, computes = [], []
                for i in range(rounds + 2):  # two warm-ups
                    t0 = time.perf_counter()
                    page = client.get(f"/console/{query}")
                    t1 = time.perf_counter()
                    assert page.status_code == 200 and "<svg" in page.text, page.text[:500]
                    since = window_start(datetime.now(UTC), ZoneInfo(zone), weeks)
                    t2 = time.perf_counter()
                    with read_only(engine) as session:
                        stats.compute(session, since=since, timezone=zone)
                    t3 = time.perf_counter()
                    if i >= 2:
                        requests.append((t1 - t0) * 1000)
                        computes.append((t3 - t2) * 1000)
                result.rows.append((label, sorted(requests), sorted(computes)))
    finally:
        engine.dispose()
    return result


def report(results: list[Result], sizes: str) -> int:
    print()
    table = Table(["database", "page", "request median ms", "request p95 ms",
                   "stats.compute median ms", "compute p95 ms", "seed s (untimed)"], [])
    for r in results:
        for label, req, comp in r.rows:
            table.rows.append([r.backend, label, f"{statistics.median(req):.1f}",
                               f"{percentile(req, 95):.1f}", f"{statistics.median(comp):.1f}",
                               f"{percentile(comp, 95):.1f}", f"{r.seed_s:.0f}"])
    print(table.render())
    print()
    for r in results:
        label, req, _ = r.rows[0]
        med = statistics.median(req)
        print(f"{r.backend}: {label} median {med:.0f} ms, p95 {percentile(req, 95):.0f} ms "
              f"(target ≤ {TARGET_MS:g} ms): {verdict(percentile(req, 95) <= TARGET_MS)}")
    print(f"sizes: {sizes}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The console dashboard's response time.")
    parser.add_argument("--subscribers", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--issues", type=int, default=30, help="one a week, over as many weeks")
    parser.add_argument("--rounds", type=int, default=20, help="requests measured per page")
    parser.add_argument("--no-sqlite", action="store_true", help="skip SQLite")
    _common.add_run_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.subscribers, args.events, args.issues, args.rounds = 500, 5_000, 5, 3
        args.quiet_wait = 0
    pg_admin, pg_note = _common.pg_for(args)
    print(_common.machine_line(pg_admin))
    sizes = (f"{args.subscribers:,} subscribers, {args.events:,} events over {args.issues} "
             f"weeks, {args.issues} issues, {args.rounds} requests per page after 2 warm-ups")
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
                results.append(measure(backend, url, rounds=args.rounds, seed_s=seed_s))
    return report(results, sizes)


if __name__ == "__main__":
    sys.exit(main())
