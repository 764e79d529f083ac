"""storage.stats.roll_up: the distinct (issue, kind, reader) and (week, reader) pairs it folds
make compute() exact whether it ran or not (tests/test_stats.py runs each comparison never,
half-way and after); running it twice, over overlapping ranges, in small batches or from two
threads at once adds nothing twice; a row committed late below the watermark is still folded;
a new timezone rebuilds the weeks; compute reads only; the partial index's kinds and the
queries' predicate agree and the planners use the index."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select, text, update
from sqlmodel import Session

from bot.jobs.scheduler import STATS_ROLLUP_JOB_ID, WeeklyScheduler
from bot.settings import Settings
from storage import events, stats
from storage.db import read_only, transaction
from storage.models import (
    EVENT_RARE_KINDS,
    Event,
    IssueReader,
    StatsRollup,
    WeekReader,
)
from tests.test_stats import ISSUES, NOW, Mix, computed, expected, generate, monday, roll_up, store
from tests.test_webhook import add_issue

_EVENT = Event.__table__  # type: ignore[attr-defined]
_IR = IssueReader.__table__  # type: ignore[attr-defined]
_WR = WeekReader.__table__  # type: ignore[attr-defined]
_STATE = StatsRollup.__table__  # type: ignore[attr-defined]


def _mix(engine: Engine, seed: int = 5) -> Mix:
    for n in ISSUES:
        add_issue(engine, n)
    m = generate(seed, readers=20)
    store(engine, m)
    return m


def _pairs(engine: Engine) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]:
    with transaction(engine) as s:
        conn = s.connection()
        return ({tuple(r) for r in conn.execute(select(_IR)).all()},
                {tuple(r) for r in conn.execute(select(_WR)).all()})


def _funnel_pairs(mix: Mix) -> set[tuple[Any, ...]]:
    return {(r["issue_number"], r["kind"], r["openid"]) for r in mix.rows
            if r["kind"] in (events.CARD, events.EXCERPT, events.UNLOCK, events.FULL)}


def _watermark(engine: Engine, value: int) -> None:
    with transaction(engine) as s:
        s.connection().execute(update(_STATE).values(last_event_id=value))


def test_the_rare_kinds_are_every_kind_but_the_bulk() -> None:
    assert set(EVENT_RARE_KINDS) == events.KINDS - {events.CARD, events.EXCERPT, events.FULL}


def test_roll_up_twice_overlapping_or_in_batches_counts_the_same(engine: Engine) -> None:
    mix = _mix(engine)
    want = expected(mix)
    added = roll_up(engine)
    issue_pairs, week_pairs = _pairs(engine)
    assert issue_pairs == _funnel_pairs(mix)
    assert len(week_pairs) == len({(monday(r["at"]), r["openid"]) for r in mix.rows})
    assert added == len(issue_pairs) + len(week_pairs)
    assert roll_up(engine) == 0  # nothing new
    assert computed(engine) == want
    _watermark(engine, 0)  # overlapping: every event again
    assert roll_up(engine) == 0
    assert _pairs(engine) == (issue_pairs, week_pairs)
    assert computed(engine) == want
    with transaction(engine) as s:  # from scratch, in batches of 7 ids
        for table in (_IR, _WR, _STATE):
            s.connection().execute(delete(table))
    assert roll_up(engine, batch=7) == added
    assert _pairs(engine) == (issue_pairs, week_pairs)
    assert computed(engine) == want


def test_an_event_committed_late_below_the_watermark_is_folded(engine: Engine) -> None:
    """PostgreSQL: an id is taken at INSERT, visible at COMMIT; here the row with id 2 shows up
    after a roll_up that folded up to id 3."""
    add_issue(engine, 1)
    at = NOW - timedelta(days=1)
    rows = [events.row(events.CARD, openid=o, at=at, issue_number=1) for o in ("o_a", "o_b",
                                                                              "o_c")]
    with transaction(engine) as s:
        s.connection().execute(insert(_EVENT), rows)
        [late_id] = s.connection().execute(select(_EVENT.c.id).where(
            _EVENT.c.openid == "o_b")).scalars().all()
        s.connection().execute(delete(_EVENT).where(_EVENT.c.id == late_id))
    roll_up(engine)
    with transaction(engine) as s:
        s.connection().execute(insert(_EVENT), [{**rows[1], "id": late_id}])
        events.record(s, events.CARD, openid="o_d", issue_number=1, at=at)
    roll_up(engine)
    issue_pairs, _ = _pairs(engine)
    assert (1, events.CARD, "o_b") in issue_pairs
    assert computed(engine)["issues"][0]["card_views"] == 4


def test_a_new_timezone_rebuilds_the_weeks(engine: Engine) -> None:
    sunday_late = datetime(2026, 11, 29, 15, 59, 59, tzinfo=UTC)  # Sun 23:59:59 in Shanghai
    with transaction(engine) as s:
        events.record_many(s, [
            events.row(events.CARD, openid="o_late", at=sunday_late, issue_number=1),
            events.row(events.CARD, openid="o_midnight", at=sunday_late + timedelta(seconds=1),
                       issue_number=1),
            events.row(events.CARD, openid="o_utc_monday", issue_number=1,
                       at=datetime(2026, 11, 30, 0, 30, tzinfo=UTC))])

    def active(zone: str) -> dict[str, int]:
        return {w["week"]: w["active_readers"] for w in computed(engine, timezone=zone)["weeks"]
                if w["active_readers"]}

    shanghai, utc = {"2026-W48": 1, "2026-W49": 2}, {"2026-W48": 2, "2026-W49": 1}
    roll_up(engine)
    assert (active("Asia/Shanghai"), active("UTC")) == (shanghai, utc)
    roll_up(engine, timezone="UTC")
    _, weeks = _pairs(engine)
    assert sorted(w for w, _ in weeks) == [2968, 2968, 2969]  # UTC weeks from 1970-01-05
    assert (active("Asia/Shanghai"), active("UTC")) == (shanghai, utc)
    with transaction(engine) as s:
        [zone] = s.connection().execute(select(_STATE.c.timezone)).scalars().all()
    assert zone == "UTC"


def test_concurrent_roll_ups_count_the_same(engine: Engine) -> None:
    mix = _mix(engine, seed=6)
    want = expected(mix)
    gate = threading.Barrier(2)
    added: list[int] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            gate.wait(timeout=30)  # SQLite serialises the transactions; PostgreSQL runs both
            with transaction(engine) as s:
                added.append(stats.roll_up(s, timezone="Asia/Shanghai", batch=50))
        except BaseException as exc:  # reported below
            failed.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failed, failed
    issue_pairs, week_pairs = _pairs(engine)
    assert issue_pairs == _funnel_pairs(mix)
    assert sorted(added) == [0, len(issue_pairs) + len(week_pairs)]  # one did the work
    assert computed(engine) == want


def test_compute_reads_only_and_counts_the_tail(engine: Engine) -> None:
    mix = _mix(engine, seed=8)
    roll_up(engine)
    extra = [events.row(events.CARD, openid=f"o_tail{i}", at=NOW - timedelta(hours=i),
                        issue_number=1 + i % 3) for i in range(6)]
    extra.append(events.row(events.CARD, openid=mix.rows[0]["openid"], at=NOW, issue_number=2))
    with transaction(engine) as s:
        events.record_many(s, extra)
    mix.rows.extend(extra)
    with read_only(engine) as s:
        got = stats.compute(s, now=NOW).to_json()
        with_issue = stats.compute(s, now=NOW, issue=3).to_json()
    assert got == expected(mix)
    assert with_issue == expected(mix, issue=3)


def _plan(s: Session, query: Any) -> str:
    conn = s.connection()
    compiled = query.compile(conn, compile_kwargs={"literal_binds": True})
    if conn.dialect.name == "postgresql":
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        return "\n".join(conn.execute(text(f"EXPLAIN {compiled}")).scalars())
    return "\n".join(str(r[-1]) for r in conn.execute(text(f"EXPLAIN QUERY PLAN {compiled}")))


def test_the_rare_kinds_queries_use_the_partial_index(engine: Engine) -> None:
    e = _EVENT.c
    with transaction(engine) as s:
        since = NOW - timedelta(weeks=4)
        for where in ([stats._rare(), e.kind.in_((events.FOLLOW, events.SCAN))],
                      [stats._rare(), e.kind == events.UNLOCK, e.at >= since]):
            plan = _plan(s, select(e.kind, func.count()).where(*where).group_by(e.kind))
            assert "ix_event_rare_kind_at" in plan, plan
        if s.connection().dialect.name == "sqlite":
            # SQLite does not prove kind = 'follow' implies the index's IN (PostgreSQL does):
            # why the queries repeat the predicate.
            plan = _plan(s, select(func.count()).where(e.kind == events.FOLLOW))
            assert "ix_event_rare_kind_at" not in plan, plan


def test_the_scheduler_rolls_up_every_minute(settings: Settings, engine: Engine) -> None:
    sched = WeeklyScheduler(settings, engine, lambda: None)  # type: ignore[arg-type,return-value]
    job = sched.scheduler.get_job(STATS_ROLLUP_JOB_ID)
    assert job is not None and job.trigger.interval == timedelta(minutes=1)
    with transaction(engine) as s:
        events.record(s, events.CARD, openid="o_sched", issue_number=4)
    sched.run_stats_rollup()
    assert _pairs(engine)[0] == {(4, events.CARD, "o_sched")}
    with transaction(engine) as s:
        [zone] = s.connection().execute(select(_STATE.c.timezone)).scalars().all()
    assert zone == settings.broadcast.timezone
