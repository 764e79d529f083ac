"""`newsbot stats` and storage.stats: every figure equals a count this test makes itself, in
plain Python, from the events it inserted (a seeded random mix over several subscribers, issues
and weeks), through compute() and through the real CLI's --json; distinct readers; --issue and
--since; ISO weeks cut at midnight in Asia/Shanghai (and in a zone with summer time); new and
repeat payers; revenue net of refunds; bad options exit 2. Runs on PostgreSQL with
NEWSBOT_TEST_DATABASE_URL (the week bucketing is per dialect)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import Engine, insert
from sqlmodel import Session

from bot.settings import Settings
from bot.web.links import ReaderLinks
from storage import events, stats
from storage.db import transaction
from storage.models import Event, LedgerEntry, QrCode, Subscriber
from tests.conftest import WeChatUser
from tests.test_money_cli import cli, write_config
from tests.test_webhook import add_issue

SHANGHAI = ZoneInfo("Asia/Shanghai")
NOW = datetime(2026, 12, 1, 4, 0, tzinfo=UTC)  # Tuesday 12:00 in Shanghai, week 2026-W49
START = datetime(2026, 10, 25, 16, 0, tzinfo=UTC)  # Monday 2026-10-26 00:00 in Shanghai
SCENES = ("poster", "talk", "friend")
ISSUES = (1, 2, 3)


@dataclass
class Mix:
    """What the test inserted: the event rows and the subscribers (balance, scene)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    subs: dict[str, tuple[int, str | None, bool]] = field(default_factory=dict)


def monday(at: datetime, zone: ZoneInfo = SHANGHAI) -> date:
    day = at.astimezone(zone).date()
    return day - timedelta(days=day.weekday())


def generate(seed: int = 7, readers: int = 30) -> Mix:
    rnd = random.Random(seed)
    mix = Mix()
    span = int((NOW - START).total_seconds())
    # Instants a second either side of each Shanghai midnight that starts a week, plus random.
    edges = [START + timedelta(weeks=w) + timedelta(seconds=d) for w in range(1, 5)
             for d in (-1, 0)]

    def when() -> datetime:
        if rnd.random() < 0.15:
            return rnd.choice(edges)
        return START + timedelta(seconds=rnd.randrange(span))

    for n in range(readers):
        openid = f"o_stats_{n:04d}"
        scene = rnd.choice((*SCENES, None, None))
        mix.subs[openid] = (rnd.randrange(0, 200), scene, rnd.random() < 0.8)
        add = mix.rows.append
        add(events.row(events.FOLLOW, openid=openid, at=when(), detail=scene))
        for _ in range(rnd.randrange(1, 25)):
            kind = rnd.choice((events.CARD, events.CARD, events.CARD, events.EXCERPT,
                               events.FULL, events.UNLOCK, events.TOPUP, events.PASS,
                               events.UNFOLLOW, events.FOLLOW, events.SCAN, events.INBOX,
                               events.CODE))
            issue = rnd.choice(ISSUES) if kind in (events.CARD, events.EXCERPT, events.FULL,
                                                   events.UNLOCK) else None
            detail: str | None = None
            amount: int | None = None
            if kind == events.UNLOCK:
                detail = rnd.choice(("tokens", "tokens", "pass", "code", "gift"))
                amount = rnd.choice((20, 30)) if detail == "tokens" else None
            elif kind == events.TOPUP:
                detail = rnd.choice(("operator", "pay", "code"))
                amount = rnd.choice((10, 50, 100))
            elif kind == events.PASS:
                detail, amount = "month", 60
            elif kind in (events.FOLLOW, events.SCAN):
                detail = rnd.choice((*SCENES, None))
            elif kind == events.INBOX:
                detail = "text"
            elif kind == events.CODE:
                detail = "tokens"
            add(events.row(kind, openid=openid, at=when(), issue_number=issue, detail=detail,
                           amount=amount))
    return mix


def roll_up(engine: Engine, timezone: str = "Asia/Shanghai", **kw: Any) -> int:
    with transaction(engine) as s:
        return stats.roll_up(s, timezone=timezone, **kw)


def store(engine: Engine, mix: Mix, rolled: str = "never") -> None:
    """Insert the mix; ``rolled``: roll_up never, after half of the events, or after all."""
    half = len(mix.rows) // 2
    with transaction(engine) as s:
        for openid, (bal, scene, following) in mix.subs.items():
            s.add(Subscriber(openid=openid, balance=bal, scene=scene, subscribed=following))
        s.flush()
        events.record_many(s, mix.rows[:half])
    if rolled == "half":
        assert roll_up(engine) > 0
    with transaction(engine) as s:
        events.record_many(s, mix.rows[half:])
    if rolled == "all":
        assert roll_up(engine) > 0


# --------------------------------------------------------------------------- the expectation


def paying(r: dict[str, Any]) -> bool:
    return ((r["kind"] in (events.UNLOCK, events.PASS) and (r["amount"] or 0) > 0)
            or (r["kind"] == events.TOPUP and r["detail"] == "pay"))


def spent(r: dict[str, Any]) -> int:
    return int(r["amount"] or 0) if r["kind"] in (events.UNLOCK, events.PASS) else 0


def expected(mix: Mix, *, since: datetime | None = None, issue: int | None = None,
             zone: ZoneInfo = SHANGHAI, now: datetime = NOW) -> dict[str, Any]:
    """The --json document, worked out row by row from what was inserted."""
    rows = [r for r in mix.rows if since is None or r["at"] >= since]
    numbers = sorted({*ISSUES} if issue is None else {issue}, reverse=True)
    issues = []
    for n in numbers:
        def readers(kind: str, n: int = n) -> int:
            return len({r["openid"] for r in rows if r["kind"] == kind
                        and r["issue_number"] == n})
        cards, unlocks = readers(events.CARD), readers(events.UNLOCK)
        issues.append({"number": n, "title": f"测试第{n}期", "card_views": cards,
                       "excerpt_opens": readers(events.EXCERPT), "unlocks": unlocks,
                       "full_reads": readers(events.FULL),
                       "revenue_tokens": sum(spent(r) for r in rows if r["kind"] == events.UNLOCK
                                             and r["issue_number"] == n),
                       "conversion": unlocks / cards if cards else None})
    first_paid: dict[str, date] = {}
    for r in mix.rows:  # all time: a payer before the window is a repeat payer in it
        if paying(r):
            w = monday(r["at"], zone)
            first_paid[r["openid"]] = min(first_paid.get(r["openid"], w), w)
    by_week: dict[date, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_week[monday(r["at"], zone)].append(r)
    first = min(by_week) if by_week else monday(now, zone)
    if since is not None:
        first = min(first, monday(since, zone))
    last = max([*by_week, monday(now, zone)])
    weeks = []
    w = first
    while w <= last:
        week = by_week.get(w, [])
        payers = {r["openid"] for r in week if paying(r)}

        def who(kind: str, week: list[dict[str, Any]] = week) -> int:
            return len({r["openid"] for r in week if r["kind"] == kind})
        weeks.append({
            "week": f"{w.isocalendar()[0]}-W{w.isocalendar()[1]:02d}", "monday": w.isoformat(),
            "follows": who(events.FOLLOW), "unfollows": who(events.UNFOLLOW),
            "active_readers": len({r["openid"] for r in week}),
            "new_payers": len({p for p in payers if first_paid[p] == w}),
            "repeat_payers": len({p for p in payers if first_paid[p] < w}),
            "revenue_tokens": sum(spent(r) for r in week),
            "topup_tokens": sum(r["amount"] for r in week if r["kind"] == events.TOPUP)})
        w += timedelta(weeks=1)
    scenes = []
    for scene in sorted({s for _, s, _ in mix.subs.values() if s}
                        | {r["detail"] for r in rows
                           if r["kind"] in (events.FOLLOW, events.SCAN) and r["detail"]}):
        brought = {o for o, (_, s, _) in mix.subs.items() if s == scene}
        mine = [r for r in rows if r["openid"] in brought]
        scenes.append({
            "scene": scene,
            "follows": len({r["openid"] for r in rows if r["kind"] == events.FOLLOW
                            and r["detail"] == scene}),
            "scans": len({r["openid"] for r in rows if r["kind"] == events.SCAN
                          and r["detail"] == scene}),
            "subscribers": len(brought),
            "payers": len({r["openid"] for r in mine if paying(r)}),
            "revenue_tokens": sum(spent(r) for r in mine)})
    return {
        "since": None if since is None else since.astimezone(zone).isoformat(),
        "timezone": zone.key, "issues": issues, "weeks": weeks, "scenes": scenes,
        "tokens_outstanding": sum(b for b, _, _ in mix.subs.values()),
        "subscribers": len(mix.subs),
        "followers": sum(1 for _, _, f in mix.subs.values() if f),
    }


# --------------------------------------------------------------------------- fixtures


ROLLED = ["never", "half", "all"]  # when storage.stats.roll_up ran: results must not differ


@pytest.fixture(params=ROLLED)
def rolled(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def mix(engine: Engine, rolled: str) -> Mix:
    for n in ISSUES:
        add_issue(engine, n)
    m = generate()
    store(engine, m, rolled)
    return m


@pytest.fixture
def config(tmp_path: Path, engine: Engine) -> Path:
    return write_config(tmp_path, engine)


def computed(engine: Engine, **kw: Any) -> dict[str, Any]:
    with transaction(engine) as s:
        return stats.compute(s, now=NOW, **kw).to_json()


def stats_json(config: Path, *args: str) -> dict[str, Any]:
    done = cli(config, "stats", "--json", *args)
    assert done.exit_code == 0, done.output
    data: dict[str, Any] = json.loads(done.stdout)
    return data


# --------------------------------------------------------------------------- tests


def test_every_figure_equals_the_tests_own_count(engine: Engine, mix: Mix) -> None:
    assert len(mix.rows) > 300
    want = expected(mix)
    assert [w["week"] for w in want["weeks"]] == [
        "2026-W44", "2026-W45", "2026-W46", "2026-W47", "2026-W48", "2026-W49"]
    got = computed(engine)
    assert got == want
    # The mix is not degenerate: each figure has something to count.
    assert all(i["card_views"] and i["unlocks"] and i["revenue_tokens"] for i in got["issues"])
    assert sum(w["new_payers"] for w in got["weeks"]) > 5
    assert sum(w["repeat_payers"] for w in got["weeks"]) > 5
    assert all(s["follows"] and s["payers"] for s in got["scenes"])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_other_seeds(engine: Engine, seed: int, rolled: str) -> None:
    for n in ISSUES:
        add_issue(engine, n)
    m = generate(seed, readers=12)
    store(engine, m, rolled)
    assert computed(engine) == expected(m)
    assert computed(engine, issue=2) == expected(m, issue=2)


def test_cli_json_is_compute(engine: Engine, mix: Mix, config: Path) -> None:
    got = stats_json(config)
    want = expected(mix, now=datetime.now(UTC))
    assert got == want
    for key in ("number", "card_views", "excerpt_opens", "unlocks", "full_reads",
                "revenue_tokens"):
        assert key in got["issues"][0]
    for key in ("week", "follows", "unfollows", "active_readers", "new_payers",
                "repeat_payers"):
        assert key in got["weeks"][0]


def test_since_and_issue_filters(engine: Engine, mix: Mix, config: Path) -> None:
    since = datetime(2026, 11, 12, tzinfo=SHANGHAI)  # a Thursday: its week is cut
    want = expected(mix, since=since, issue=2, now=datetime.now(UTC))
    got = stats_json(config, "--since", "2026-11-12", "--issue", "2")
    assert got == want
    assert [i["number"] for i in got["issues"]] == [2]
    assert got["weeks"][0]["week"] == "2026-W46"
    # Paid before the window: a repeat payer in it, never a new one again.
    assert got["weeks"] != expected(mix, now=datetime.now(UTC))["weeks"]
    assert computed(engine, since=since, issue=2) == expected(mix, since=since, issue=2)


def test_views_are_distinct_readers(engine: Engine) -> None:
    add_issue(engine, 5)
    at = datetime(2026, 11, 30, 2, tzinfo=UTC)
    rows = [events.row(events.CARD, openid="o_a", at=at, issue_number=5) for _ in range(10)]
    rows += [events.row(events.CARD, openid="o_b", at=at, issue_number=5),
             events.row(events.EXCERPT, openid="o_a", at=at, issue_number=5),
             events.row(events.EXCERPT, openid="o_a", at=at, issue_number=5),
             events.row(events.UNLOCK, openid="o_a", at=at, issue_number=5, detail="tokens",
                        amount=30),
             events.row(events.FULL, openid="o_a", at=at, issue_number=5),
             events.row(events.FULL, openid="o_a", at=at + timedelta(hours=1), issue_number=5),
             events.row(events.FOLLOW, openid="o_a", at=at),
             events.row(events.FOLLOW, openid="o_a", at=at)]
    with transaction(engine) as s:
        events.record_many(s, rows)
    with transaction(engine) as s:
        got = stats.compute(s, now=NOW)
    [five] = got.issues
    assert (five.card_views, five.excerpt_opens, five.unlocks, five.full_reads,
            five.revenue_tokens) == (2, 1, 1, 1, 30)
    assert five.conversion == 0.5
    week = next(w for w in got.weeks if w.week == "2026-W49")
    assert (week.follows, week.active_readers, week.new_payers) == (1, 2, 1)


def test_weeks_are_cut_at_midnight_in_the_configured_zone(engine: Engine) -> None:
    sunday_late = datetime(2026, 11, 29, 15, 59, 59, tzinfo=UTC)  # Sun 23:59:59 in Shanghai
    monday_midnight = sunday_late + timedelta(seconds=1)  # Mon 2026-11-30 00:00 there
    with transaction(engine) as s:
        events.record_many(s, [
            events.row(events.FOLLOW, openid="o_late", at=sunday_late),
            events.row(events.FOLLOW, openid="o_midnight", at=monday_midnight),
            events.row(events.FOLLOW, openid="o_utc_monday",
                       at=datetime(2026, 11, 30, 0, 30, tzinfo=UTC))])
    with transaction(engine) as s:
        weeks = {w.week: w.follows for w in stats.compute(s, now=NOW).weeks}
        utc = {w.week: w.follows for w in stats.compute(s, now=NOW, timezone="UTC").weeks}
    assert weeks == {"2026-W48": 1, "2026-W49": 2}
    assert utc == {"2026-W48": 2, "2026-W49": 1}


def test_weeks_follow_summer_time(engine: Engine) -> None:
    """Berlin's clocks go back on 2026-10-25 at 03:00 CEST (01:00 UTC): the week starting Monday
    the 26th begins at 23:00 UTC on the 25th, where it began at 22:00 UTC a week before."""
    berlin = ZoneInfo("Europe/Berlin")
    instants = [datetime(2026, 10, 18, 21, 59, 59, tzinfo=UTC),
                datetime(2026, 10, 18, 22, 0, tzinfo=UTC),
                datetime(2026, 10, 25, 22, 59, 59, tzinfo=UTC),
                datetime(2026, 10, 25, 23, 0, tzinfo=UTC),
                datetime(2027, 3, 28, 0, 59, 59, tzinfo=UTC),  # the spring change, a Sunday
                datetime(2027, 3, 28, 22, 0, tzinfo=UTC)]
    with transaction(engine) as s:
        events.record_many(s, [events.row(events.FOLLOW, openid=f"o_{i}", at=at)
                               for i, at in enumerate(instants)])
    with transaction(engine) as s:
        weeks = stats.compute(s, now=instants[-1], timezone="Europe/Berlin").weeks
    counts = {w.week: w.follows for w in weeks if w.follows}
    want: dict[str, int] = defaultdict(int)
    for at in instants:
        want[stats.iso_week(monday(at, berlin))] += 1
    assert counts == dict(want)
    assert counts == {"2026-W42": 1, "2026-W43": 2, "2026-W44": 1, "2027-W12": 1,
                      "2027-W13": 1}


def test_new_then_repeat_payers(engine: Engine) -> None:
    w1 = datetime(2026, 11, 17, 2, tzinfo=UTC)  # W47
    rows = [events.row(events.TOPUP, openid="o_p", at=w1, detail="pay", amount=100),
            events.row(events.UNLOCK, openid="o_p", at=w1, issue_number=1, detail="tokens",
                        amount=30),
            # An operator's top-up and a code are not payments; an unlock by pass costs nothing.
            events.row(events.TOPUP, openid="o_q", at=w1, detail="operator", amount=50),
            events.row(events.UNLOCK, openid="o_q", at=w1, issue_number=1, detail="pass"),
            events.row(events.UNLOCK, openid="o_p", at=w1 + timedelta(weeks=1), issue_number=2,
                       detail="tokens", amount=30),
            events.row(events.PASS, openid="o_q", at=w1 + timedelta(weeks=1), detail="month",
                       amount=60)]
    with transaction(engine) as s:
        events.record_many(s, rows)
    with transaction(engine) as s:
        weeks = {w.week: w for w in stats.compute(s, now=NOW).weeks}
        late = {w.week: w for w in stats.compute(
            s, now=NOW, since=w1 + timedelta(days=3)).weeks}
    assert (weeks["2026-W47"].new_payers, weeks["2026-W47"].repeat_payers) == (1, 0)
    assert (weeks["2026-W48"].new_payers, weeks["2026-W48"].repeat_payers) == (1, 1)
    assert weeks["2026-W47"].revenue_tokens == 30 and weeks["2026-W48"].revenue_tokens == 90
    assert weeks["2026-W47"].topup_tokens == 150
    assert (late["2026-W48"].new_payers, late["2026-W48"].repeat_payers) == (1, 1)
    assert late["2026-W47"].active_readers == 0


def _entry(s: Session, **values: Any) -> int:
    entry = LedgerEntry(idempotency_key=f"test:{values['kind']}:{values['amount']}",
                        reason="test", balance_after=100, **values)
    s.add(entry)
    s.flush()
    assert entry.id is not None
    return entry.id


def test_revenue_is_net_of_refunds(engine: Engine) -> None:
    add_issue(engine, 1)
    bought = datetime(2026, 11, 17, 2, tzinfo=UTC)
    refunded = bought + timedelta(weeks=1)
    with transaction(engine) as s:
        s.add(Subscriber(openid="o_r", balance=100, scene="poster"))
        s.add(QrCode(scene="unused", ticket="t", url="u"))
        s.flush()
        redeem = _entry(s, openid="o_r", amount=-30, kind="redeem", issue_number=1,
                        created_at=bought)
        _entry(s, openid="o_r", amount=30, kind="refund", issue_number=1, refers_to=redeem,
               created_at=refunded)
        s.connection().execute(insert(Event.__table__), [  # type: ignore[attr-defined]
            events.row(events.UNLOCK, openid="o_r", at=bought, issue_number=1,
                       detail="tokens", amount=30),
            events.row(events.UNLOCK, openid="o_s", at=bought, issue_number=1,
                       detail="tokens", amount=20)])
    with transaction(engine) as s:
        got = stats.compute(s, now=NOW)
        after = stats.compute(s, now=NOW, since=refunded)
    assert got.issues[0].revenue_tokens == 20
    weeks = {w.week: w.revenue_tokens for w in got.weeks}
    assert (weeks["2026-W47"], weeks["2026-W48"]) == (50, -30)
    scenes = {s.scene: s for s in got.scenes}
    assert scenes["poster"].revenue_tokens == 0 and scenes["poster"].payers == 1
    assert scenes["unused"] == stats.SceneStats("unused", 0, 0, 0)
    assert after.issues[0].revenue_tokens == -30  # the refund falls in the window, not the sale


def test_an_empty_database(engine: Engine, config: Path) -> None:
    with transaction(engine) as s:
        got = stats.compute(s, now=NOW)
    assert got == stats.Stats(issues=[], weeks=[], scenes=[], tokens_outstanding=0,
                              subscribers=0, followers=0)
    done = cli(config, "stats")
    assert done.exit_code == 0, done.output
    assert "tokens outstanding now: 0" in done.stdout


def test_human_output_has_the_funnel_and_conversion(engine: Engine, config: Path) -> None:
    add_issue(engine, 1)
    at = datetime.now(UTC) - timedelta(hours=1)
    with transaction(engine) as s:
        s.add(Subscriber(openid="o_h1", balance=70, scene="poster"))
        s.flush()
        events.record_many(s, [
            *(events.row(events.CARD, openid=f"o_h{i}", at=at, issue_number=1)
              for i in range(8)),
            *(events.row(events.EXCERPT, openid=f"o_h{i}", at=at, issue_number=1)
              for i in range(4)),
            events.row(events.UNLOCK, openid="o_h1", at=at, issue_number=1, detail="tokens",
                       amount=30),
            events.row(events.FOLLOW, openid="o_h1", at=at, detail="poster")])
    done = cli(config, "stats")
    assert done.exit_code == 0, done.output
    out = done.stdout
    assert "Issues: card → excerpt → unlock" in out
    row = next(line for line in out.splitlines() if "│ #1" in line)
    assert [c.strip() for c in row.split("│")[2:8]] == ["8", "4", "1", "12.5%", "0", "30"]
    assert "Weeks (Asia/Shanghai)" in out and "QR scenes" in out and "poster" in out
    assert "tokens outstanding now: 70 豆" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "2026-13-01"], "--since must be a date like 2026-12-01"),
    (["--since", "last week"], "--since must be a date like 2026-12-01"),
    (["--issue", "abc"], "not a whole number"),
    (["--issue", "-3"], "not a whole number"),
    (["--issue", "99"], "there is no issue #99"),
])
def test_bad_options_exit_2_saying_what_to_fix(engine: Engine, config: Path, args: list[str],
                                               message: str) -> None:
    add_issue(engine, 1)
    done = cli(config, "stats", *args)
    assert done.exit_code == 2, done.output
    assert message in done.output
    assert done.stdout == "" or "Usage" in done.output


def test_an_issue_known_only_from_its_events_is_accepted(engine: Engine, config: Path) -> None:
    with transaction(engine) as s:
        events.record(s, events.CARD, openid="o_x", issue_number=7)
    got = stats_json(config, "--issue", "7")
    assert got["issues"] == [{"number": 7, "title": "", "card_views": 1, "excerpt_opens": 0,
                              "unlocks": 0, "full_reads": 0, "revenue_tokens": 0,
                              "conversion": 0.0}]


def test_zone_offsets_are_found_to_the_second() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    pieces = stats._offsets(berlin, datetime(2026, 1, 1, tzinfo=UTC),
                            datetime(2027, 1, 1, tzinfo=UTC))
    assert [(at, off) for at, off in pieces[1:]] == [
        (datetime(2026, 3, 29, 1, 0, tzinfo=UTC), 7200),
        (datetime(2026, 10, 25, 1, 0, tzinfo=UTC), 3600)]
    assert stats._offsets(SHANGHAI, datetime(2026, 1, 1, tzinfo=UTC),
                          datetime(2030, 1, 1, tzinfo=UTC))[1:] == []


# --------------------------------------------------------------------------- end to end


def test_stats_of_real_signed_messages(engine: Engine, settings: Settings,
                                       app_client: httpx.Client, operator: WeChatUser,
                                       config: Path) -> None:
    """Three readers and an operator talk to the real app; stats counts what they did."""
    add_issue(engine, 1, price=30)
    alice, bob, carol = (WeChatUser(app_client, o) for o in ("o_e2e_alice", "o_e2e_bob",
                                                              "o_e2e_carol"))
    for reader in (alice, bob, carol):
        assert "测试第1期" in reader.event("subscribe")["content"]  # the greeting's card
    for _ in range(2):
        assert "测试第1期" in alice.send("本周")["content"]
    assert "测试第1期" in bob.send("本周")["content"]
    assert "100" in operator.send(f"#topup {alice.openid} 100 活动")["content"]
    unlocked = alice.send("兑换 1")  # a news reply: the full text's link
    assert unlocked["type"] == "news" and "测试第1期" in unlocked["title"], unlocked
    reader = ReaderLinks(settings)
    assert app_client.get(reader.path_until(alice.openid, 1, 2_000_000_000)).status_code == 200
    assert app_client.get(reader.path_until(bob.openid, 1, 2_000_000_000)).status_code == 200
    bob.event("unsubscribe")

    got = stats_json(config)
    assert got["issues"] == [{"number": 1, "title": "测试第1期", "card_views": 3,
                              "excerpt_opens": 1, "unlocks": 1, "full_reads": 1,
                              "revenue_tokens": 30, "conversion": 1 / 3}]
    this_week = got["weeks"][-1]
    assert this_week["week"] == stats.iso_week(monday(datetime.now(UTC)))
    assert {k: this_week[k] for k in ("follows", "unfollows", "active_readers", "new_payers",
                                      "repeat_payers", "revenue_tokens", "topup_tokens")} == {
        "follows": 3, "unfollows": 1, "active_readers": 3, "new_payers": 1,
        "repeat_payers": 0, "revenue_tokens": 30, "topup_tokens": 100}
    assert got["tokens_outstanding"] == 70
    assert got["followers"] == got["subscribers"] - 1  # bob left


def test_the_benchmark_runs() -> None:
    """bench/stats.py --quick: its own checks of compute() and the CLI pass (no speed asserted)."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "bench" / "stats.py"), "--quick",
                           "--no-pg"], cwd=root, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SQLite" in done.stdout and " OK " in done.stdout, done.stdout
