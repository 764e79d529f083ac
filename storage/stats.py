"""Stats: the funnel per issue, the business per week and per QR scene, read from ``event``.

Every figure is one SQL aggregate (GROUP BY, COUNT(DISTINCT)); Python only folds the few result
rows. Definitions (README "Stats" says the same):

- Views, opens, unlocks and full reads of an issue count distinct subscribers: ten cards shown
  to one reader are one card view.
- A *payer* in a week is a subscriber who, that week, spent tokens (an ``unlock`` or ``pass``
  event with an amount) or bought tokens with money (a ``topup`` from WeChat Pay). A *new*
  payer pays for the first time ever that week (ever: also before ``since``); a *repeat* payer
  had paid in an earlier week.
- Revenue is tokens spent on unlocks and passes (the events' amounts), less the refunds of
  those unlocks and purchases (ledger ``refund`` entries), counted when the refund was given.
  Gifts bought for a friend are in ``newsbot revenue`` (the ledger's full account), not here.
- Weeks are ISO weeks (Monday to Sunday) in ``[broadcast] timezone``, bucketed in SQL:
  PostgreSQL's ``AT TIME ZONE``; on SQLite the epoch seconds plus the zone's UTC offset, the
  offset changing at the zone's transitions (none for Asia/Shanghai since 1991).
- A scene's follows and scans are the distinct subscribers whose follow or scan event carried
  it; its payers and revenue those of the subscribers it brought first (``Subscriber.scene``).
- ``since`` limits the events counted; tokens outstanding and the subscriber counts are now.

Speed: the distinct counts over all time (the funnel, active readers per week) would sort the
whole table. ``roll_up`` (the scheduler's ``stats-rollup`` job every minute, and ``newsbot
stats`` before it computes) folds events into the distinct pairs ``issue_reader`` and
``week_reader`` up to a watermark; ``compute`` without ``since`` counts those rows plus the
events past the watermark that are not in them, so it is exact whether or not roll_up ran and
stays read-only. With ``since`` the funnel and active readers are counted from the events of
the window (a range of ``ix_event_at``). Every other figure reads only the rarer kinds, through
the partial index ``ix_event_rare_kind_at`` (card views, excerpt and full opens are not in it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    ColumnElement,
    Date,
    Integer,
    Table,
    and_,
    case,
    cast,
    distinct,
    exists,
    func,
    literal,
    literal_column,
    or_,
    true,
    update,
)
from sqlalchemy import delete as sa_delete
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased
from sqlmodel import Session

from storage import events
from storage.models import (
    EVENT_RARE_KINDS,
    Event,
    Issue,
    IssueReader,
    LedgerEntry,
    QrCode,
    StatsRollup,
    Subscriber,
    WeekReader,
    utcnow,
)

_EVENT: Table = Event.__table__  # type: ignore[attr-defined]
_ENTRY: Table = LedgerEntry.__table__  # type: ignore[attr-defined]
_SUB: Table = Subscriber.__table__  # type: ignore[attr-defined]
_ISSUE: Table = Issue.__table__  # type: ignore[attr-defined]
_QR: Table = QrCode.__table__  # type: ignore[attr-defined]
_ISSUE_READER: Table = IssueReader.__table__  # type: ignore[attr-defined]
_WEEK_READER: Table = WeekReader.__table__  # type: ignore[attr-defined]
_ROLLUP: Table = StatsRollup.__table__  # type: ignore[attr-defined]
_ROLLUP_NAME = "stats"
# Event ids below the watermark re-read by every roll_up (and, on PostgreSQL, by compute's
# tail): PostgreSQL hands out ids at INSERT but they become visible at COMMIT, so a row with a
# smaller id than one already folded may appear later. The pair tables are idempotent, so
# reading an id twice is harmless; 50,000 ids is minutes of a busy account's events.
RESCAN = 50_000

_FUNNEL = (events.CARD, events.EXCERPT, events.UNLOCK, events.FULL)
_SPEND = (events.UNLOCK, events.PASS)
_WEEKLY = (events.FOLLOW, events.UNFOLLOW, *_SPEND, events.TOPUP)  # the kinds _weeks sums
_WEEK_SECONDS = 7 * 86400
_MONDAY_EPOCH = 4 * 86400  # 1970-01-05, a Monday: SQLite's week numbers count from it
_MONDAY_ZERO = date(1970, 1, 5)


@dataclass(frozen=True)
class IssueStats:
    number: int
    title: str
    card_views: int  # distinct subscribers shown the card
    excerpt_opens: int  # … who opened the excerpt page
    unlocks: int  # … who unlocked it (tokens, pass, code or gift)
    full_reads: int  # … who opened the full text
    revenue_tokens: int  # tokens paid for its unlocks, less their refunds

    @property
    def conversion(self) -> float | None:
        """Card to unlock; None before any card was shown."""
        return self.unlocks / self.card_views if self.card_views else None


@dataclass(frozen=True)
class WeekStats:
    week: str  # ISO week, "2026-W48", in [broadcast] timezone
    follows: int  # distinct subscribers who followed
    unfollows: int
    active_readers: int  # distinct subscribers with any event
    new_payers: int
    repeat_payers: int
    revenue_tokens: int  # spent on unlocks and passes, less refunds given that week
    topup_tokens: int  # credited by top-ups of every source
    monday: date  # the week's first day, for charts

    @property
    def payers(self) -> int:
        return self.new_payers + self.repeat_payers


@dataclass(frozen=True)
class SceneStats:
    scene: str
    follows: int  # distinct subscribers whose follow carried the scene
    payers: int  # distinct subscribers it brought first who paid
    revenue_tokens: int  # what those subscribers spent, less refunds
    scans: int = 0  # distinct followers who scanned its code
    subscribers: int = 0  # subscribers it brought first, all time


@dataclass(frozen=True)
class Stats:
    issues: list[IssueStats]
    weeks: list[WeekStats]
    scenes: list[SceneStats]
    tokens_outstanding: int  # Σ balances now
    subscribers: int  # every subscriber row
    followers: int  # following now
    since: datetime | None = None
    timezone: str = "Asia/Shanghai"

    def to_json(self) -> dict[str, Any]:
        zone = ZoneInfo(self.timezone)
        return {
            "since": None if self.since is None
            else self.since.astimezone(zone).isoformat(timespec="seconds"),
            "timezone": self.timezone,
            "issues": [{"number": i.number, "title": i.title, "card_views": i.card_views,
                        "excerpt_opens": i.excerpt_opens, "unlocks": i.unlocks,
                        "full_reads": i.full_reads, "revenue_tokens": i.revenue_tokens,
                        "conversion": i.conversion} for i in self.issues],
            "weeks": [{"week": w.week, "monday": w.monday.isoformat(), "follows": w.follows,
                       "unfollows": w.unfollows, "active_readers": w.active_readers,
                       "new_payers": w.new_payers, "repeat_payers": w.repeat_payers,
                       "revenue_tokens": w.revenue_tokens, "topup_tokens": w.topup_tokens}
                      for w in self.weeks],
            "scenes": [{"scene": s.scene, "follows": s.follows, "scans": s.scans,
                        "subscribers": s.subscribers, "payers": s.payers,
                        "revenue_tokens": s.revenue_tokens} for s in self.scenes],
            "tokens_outstanding": self.tokens_outstanding,
            "subscribers": self.subscribers,
            "followers": self.followers,
        }


def known_issue(session: Session, number: int) -> bool:
    """An issue stats can speak of: imported, or named by an event (since deleted)."""
    conn = session.connection()
    return any(conn.execute(sa_select(literal(1)).where(table.c[column] == number).limit(1))
               .first() is not None
               for table, column in ((_ISSUE, "number"), (_EVENT, "issue_number")))


def iso_week(monday: date) -> str:
    year, week, _ = monday.isocalendar()
    return f"{year}-W{week:02d}"


# --------------------------------------------------------------------------- dialects


class _Sql:
    """What differs by dialect: the SQL expression of an instant's week (and its result back to
    that week's Monday), and distinct counts."""

    def __init__(self, session: Session, zone: ZoneInfo, lo: datetime, hi: datetime) -> None:
        self.zone = zone
        self.postgres = session.connection().dialect.name == "postgresql"
        # SQLite: the zone's offset is piecewise constant; its pieces over the data's span
        # (with a year's margin for ledger refunds outside it) make a small CASE.
        self.pieces = [] if self.postgres else _offsets(zone, lo - timedelta(days=366),
                                                         hi + timedelta(days=366))

    def of(self, at: Any) -> ColumnElement[Any]:
        if self.postgres:
            return cast(func.date_trunc("week", func.timezone(self.zone.key, at)), Date)
        first_offset = self.pieces[0][1]
        offset: ColumnElement[Any] = literal(first_offset)
        if len(self.pieces) > 1:
            offset = case(*((at < start, literal(prev)) for (start, _), (_, prev)
                            in zip(self.pieces[1:], self.pieces, strict=False)),
                          else_=literal(self.pieces[-1][1]))
        seconds = cast(func.strftime("%s", at), Integer)
        # Integer division truncates; every instant is after the epoch Monday, so it floors.
        return (seconds + offset - _MONDAY_EPOCH).self_group().op("/")(literal(_WEEK_SECONDS))

    def week_no(self, at: Any) -> ColumnElement[Any]:
        """The week as an integer, weeks since Monday 1970-01-05 (week_reader's key)."""
        if self.postgres:
            return (self.of(at).op("-")(literal_column("DATE '1970-01-05'"))
                    .self_group().op("/")(literal_column("7")))
        return self.of(at)

    def readers(self, openid: Any) -> ColumnElement[Any]:
        """COUNT(DISTINCT openid). On PostgreSQL compared bytewise (openids are ASCII): the
        sort behind it costs a fifth less than under the database's collation."""
        return func.count(distinct(openid.collate("C") if self.postgres else openid))

    def monday(self, value: Any) -> date:
        if isinstance(value, datetime):
            return value.date()
        if isinstance(value, date):
            return value
        return _MONDAY_ZERO + timedelta(weeks=int(value))


def _offset_s(zone: ZoneInfo, at: datetime) -> int:
    off = at.astimezone(zone).utcoffset()
    return int(off.total_seconds()) if off is not None else 0


def _offsets(zone: ZoneInfo, lo: datetime, hi: datetime) -> list[tuple[datetime, int]]:
    """[(from, offset seconds)]: the zone's UTC offset from each instant on, over [lo, hi].
    Found by stepping a day at a time and bisecting each change to the second."""
    pieces = [(lo, _offset_s(zone, lo))]
    day = timedelta(days=1)
    t = lo
    while t < hi:
        nxt = t + day
        if _offset_s(zone, nxt) != pieces[-1][1]:
            a, b = t, nxt  # offset(a) is the old one, offset(b) the new
            while b - a > timedelta(seconds=1):
                mid = a + (b - a) / 2
                if _offset_s(zone, mid) == pieces[-1][1]:
                    a = mid
                else:
                    b = mid
            b = b.replace(microsecond=0)
            pieces.append((b, _offset_s(zone, b)))
        t = nxt
    return pieces


# --------------------------------------------------------------------------- compute


def _window(since: datetime | None, column: Any) -> ColumnElement[bool]:
    return true() if since is None else column >= since


def _rare() -> ColumnElement[bool]:
    """storage.models.EVENT_RARE_KINDS_SQL as a query term, with the kinds as literals in the
    same order: SQLite uses a partial index only when its WHERE terms appear in the query's."""
    return _EVENT.c.kind.in_([literal_column(f"'{k}'") for k in EVENT_RARE_KINDS])


def _paying() -> ColumnElement[bool]:
    e = _EVENT.c
    # The IN first: an index range of the three kinds (the OR alone reads every rare row).
    return and_(e.kind.in_((*_SPEND, events.TOPUP)),
                or_(and_(e.kind.in_(_SPEND), e.amount > 0),
                    and_(e.kind == events.TOPUP, e.detail == "pay")))


def compute(session: Session, *, issue: int | None = None, since: datetime | None = None,
            timezone: str = "Asia/Shanghai", now: datetime | None = None) -> Stats:
    """Stats of the events since ``since`` (all when None); ``issue`` keeps only that issue's
    line in ``issues`` (weeks and scenes are the account's). Weeks run without gaps from the
    first one with events (or ``since``'s) to ``now``'s or the last one with events."""
    if session.autoflush:
        session.flush()
    zone = ZoneInfo(timezone)
    now = now or utcnow()
    conn = session.connection()
    sql = _span(session, zone, since, now)
    refunds = _refunds(session, since, sql)
    mark = _mark(session, sql, zone.key)
    balance, subscribers, followers = conn.execute(sa_select(
        func.coalesce(func.sum(_SUB.c.balance), 0), func.count(),
        func.count().filter(_SUB.c.subscribed.is_(True)))).one()
    return Stats(
        issues=_issues(session, issue, since, refunds, sql, mark),
        weeks=_weeks(session, since, now, sql, refunds, mark),
        scenes=_scenes(session, since, refunds, sql),
        tokens_outstanding=int(balance), subscribers=int(subscribers),
        followers=int(followers or 0), since=since, timezone=zone.key,
    )


@dataclass(frozen=True)
class _Mark:
    """Where the events not yet in the pair tables start (id > it); None: count the events."""

    funnel_from: int | None
    weeks_from: int | None  # None also when week_reader's weeks are of another timezone


def _mark(session: Session, sql: _Sql, timezone: str) -> _Mark:
    r = _ROLLUP.c
    state = session.connection().execute(
        sa_select(r.last_event_id, r.timezone).where(r.name == _ROLLUP_NAME)).first()
    if state is None:
        return _Mark(None, None)
    # PostgreSQL: ids below the watermark may still come (see RESCAN); count them too.
    tail = max(0, int(state[0]) - RESCAN) if sql.postgres else int(state[0])
    return _Mark(tail, tail if state[1] == timezone else None)


def _span(session: Session, zone: ZoneInfo, *also: datetime | None) -> _Sql:
    conn = session.connection()
    # Two statements: SQLite answers a lone min() or max() from the index, not both at once.
    lo = conn.execute(sa_select(func.min(_EVENT.c.at))).scalar()
    hi = conn.execute(sa_select(func.max(_EVENT.c.at))).scalar()
    return _Sql(session, zone, min(x for x in (lo, *also) if x is not None),
                max(x for x in (hi, *also[-1:]) if x is not None))


def roll_up(session: Session, *, timezone: str, batch: int = 50_000) -> int:
    """Fold the events past the watermark into issue_reader and week_reader and advance it;
    returns the pairs added. Idempotent: pairs are inserted ON CONFLICT DO NOTHING, so running
    it twice, or over ranges that overlap, changes no count. Each run starts RESCAN ids before
    the watermark (PostgreSQL's late commits). Concurrent runs: the first to move the
    watermark (a conditional UPDATE, which holds the row until it commits) does the work; the
    others find it moved and return 0. A new ``timezone`` empties week_reader and starts over
    from the first event (the funnel's pairs have no timezone, re-reading them is harmless)."""
    # rowcount of INSERT … SELECT: SQLAlchemy keeps it only when asked to (psycopg).
    conn = session.connection().execution_options(preserve_rowcount=True)
    r = _ROLLUP.c
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    state_q = sa_select(r.last_event_id, r.timezone).where(r.name == _ROLLUP_NAME)
    state = conn.execute(state_q).first()
    if state is None:
        conn.execute(insert(_ROLLUP).values(name=_ROLLUP_NAME, last_event_id=0,
                                            timezone=timezone, updated_at=utcnow())
                     .on_conflict_do_nothing())
        state = conn.execute(state_q).one()
    old, zone_was = int(state[0]), str(state[1])
    top = int(conn.execute(sa_select(func.max(_EVENT.c.id))).scalar() or 0)
    if top <= old and zone_was == timezone:
        return 0  # nothing new (a late commit below it is read by the next run's rescan)
    moved = conn.execute(update(_ROLLUP).where(r.name == _ROLLUP_NAME, r.last_event_id == old,
                                               r.timezone == zone_was)
                         .values(last_event_id=max(top, old), timezone=timezone,
                                 updated_at=utcnow())).rowcount
    if moved == 0:
        return 0  # another run moved it meanwhile: it has folded these events
    start = max(0, old - RESCAN)
    if zone_was != timezone:
        conn.execute(sa_delete(_WEEK_READER))
        start = 0
    e = _EVENT.c
    sql = _span(session, ZoneInfo(timezone), utcnow())
    added = 0
    for lo in range(start, top, batch):
        span = (e.id > lo, e.id <= min(lo + batch, top))
        # SQLite: the WHERE also settles its parser's ON (join) / ON CONFLICT ambiguity.
        added += conn.execute(insert(_ISSUE_READER).from_select(
            ["issue_number", "kind", "openid"],
            sa_select(e.issue_number, e.kind, e.openid).distinct()
            .where(*span, e.kind.in_(_FUNNEL), e.issue_number.is_not(None)))
            .on_conflict_do_nothing()).rowcount
        added += conn.execute(insert(_WEEK_READER).from_select(
            ["week", "openid"], sa_select(sql.week_no(e.at), e.openid).distinct().where(*span))
            .on_conflict_do_nothing()).rowcount
    return added


@dataclass(frozen=True)
class _Refund:
    issue_number: int | None
    monday: date
    scene: str | None
    tokens: int


def _refunds(session: Session, since: datetime | None, sql: _Sql) -> list[_Refund]:
    """Refunds given in the window of unlocks and pass purchases, by the unlocked issue, the
    week given and the refunded reader's scene (a few rows: refunds are rare)."""
    refund, original = _ENTRY, aliased(_ENTRY)
    week = sql.of(refund.c.created_at)
    rows = session.connection().execute(
        sa_select(original.c.issue_number, week, _SUB.c.scene, func.sum(refund.c.amount))
        .select_from(refund.join(original, original.c.id == refund.c.refers_to)
                     .outerjoin(_SUB, _SUB.c.openid == refund.c.openid))
        .where(refund.c.kind == "refund", original.c.kind.in_(("redeem", "pass")),
               _window(since, refund.c.created_at))
        .group_by(original.c.issue_number, week, _SUB.c.scene)).all()
    return [_Refund(issue_number=i, monday=sql.monday(w), scene=s, tokens=int(t or 0))
            for i, w, s, t in rows]


def _issues(session: Session, only: int | None, since: datetime | None,
            refunds: list[_Refund], sql: _Sql, mark: _Mark) -> list[IssueStats]:
    e, ir = _EVENT.c, _ISSUE_READER.c
    conn = session.connection()
    funnel: list[ColumnElement[bool]] = [e.kind.in_(_FUNNEL), e.issue_number.is_not(None)]
    if only is not None:
        funnel.append(e.issue_number == only)
    counts: dict[int, dict[str, int]] = {}

    def add(query: Any) -> None:
        for number, kind, readers in conn.execute(query).all():
            line = counts.setdefault(int(number), {})
            line[kind] = line.get(kind, 0) + int(readers)

    if since is not None or mark.funnel_from is None:
        add(sa_select(e.issue_number, e.kind, sql.readers(e.openid))
            .where(*funnel, _window(since, e.at)).group_by(e.issue_number, e.kind))
    else:  # the pairs folded, plus the tail's readers not among them
        add(sa_select(ir.issue_number, ir.kind, func.count())
            .where(true() if only is None else ir.issue_number == only)
            .group_by(ir.issue_number, ir.kind))
        known = exists().where(ir.issue_number == e.issue_number, ir.kind == e.kind,
                               ir.openid == e.openid)
        add(sa_select(e.issue_number, e.kind, sql.readers(e.openid))
            .where(e.id > mark.funnel_from, *funnel, ~known).group_by(e.issue_number, e.kind))
    paid = {int(n): int(t or 0) for n, t in conn.execute(
        sa_select(e.issue_number, func.sum(e.amount))
        .where(_rare(), e.kind == events.UNLOCK, *funnel[1:], _window(since, e.at))
        .group_by(e.issue_number)).all()}
    for r in refunds:
        if r.issue_number is not None and (only is None or r.issue_number == only):
            paid[r.issue_number] = paid.get(r.issue_number, 0) - r.tokens
    shown = (sa_select(_ISSUE.c.number, _ISSUE.c.title)
             .where(or_(_ISSUE.c.published_at.is_not(None), _ISSUE.c.number.in_(list(counts)))))
    if only is not None:
        shown = shown.where(_ISSUE.c.number == only)
    titles = {int(n): str(t) for n, t in session.connection().execute(shown).all()}
    numbers = sorted({*titles, *counts, *paid}, reverse=True)
    return [IssueStats(number=n, title=titles.get(n, ""),
                       card_views=counts.get(n, {}).get(events.CARD, 0),
                       excerpt_opens=counts.get(n, {}).get(events.EXCERPT, 0),
                       unlocks=counts.get(n, {}).get(events.UNLOCK, 0),
                       full_reads=counts.get(n, {}).get(events.FULL, 0),
                       revenue_tokens=paid.get(n, 0)) for n in numbers]


def _weeks(session: Session, since: datetime | None, now: datetime, sql: _Sql,
           refunds: list[_Refund], mark: _Mark) -> list[WeekStats]:
    e, wr = _EVENT.c, _WEEK_READER.c
    conn = session.connection()
    week = sql.of(e.at)
    rows: dict[date, list[int]] = {}
    for w, follows, unfollows, spent, topups in conn.execute(
            sa_select(week, sql.readers(case((e.kind == events.FOLLOW, e.openid))),
                      sql.readers(case((e.kind == events.UNFOLLOW, e.openid))),
                      func.sum(case((e.kind.in_(_SPEND), e.amount), else_=0)),
                      func.sum(case((e.kind == events.TOPUP, e.amount), else_=0)))
            .where(_rare(), e.kind.in_(_WEEKLY), _window(since, e.at)).group_by(week)).all():
        rows[sql.monday(w)] = [0, int(follows), int(unfollows), int(spent or 0),
                               int(topups or 0), 0, 0]
    # Active readers: any event, so every kind: from week_reader when it can serve.
    if since is not None or mark.weeks_from is None:
        actives = [conn.execute(sa_select(week, sql.readers(e.openid))
                                .where(_window(since, e.at)).group_by(week)).all()]
    else:
        key = sql.week_no(e.at)
        known = exists().where(wr.week == key, wr.openid == e.openid)
        actives = [conn.execute(sa_select(wr.week, func.count()).group_by(wr.week)).all(),
                   conn.execute(sa_select(key, sql.readers(e.openid))
                                .where(e.id > mark.weeks_from, ~known).group_by(key)).all()]
    for found in actives:
        for w, active in found:
            rows.setdefault(sql.monday(w), [0] * 7)[0] += int(active)
    # Payers: each subscriber's paying weeks over all time, their first one beside each.
    per_week = (sa_select(e.openid.label("openid"), week.label("week"),
                          func.max(e.at).label("last_at"))
                .where(_rare(), _paying()).group_by(e.openid, week).subquery())
    ranked = sa_select(per_week.c.week, per_week.c.last_at,
                       func.min(per_week.c.week).over(partition_by=per_week.c.openid)
                       .label("first")).subquery()
    for w, new, repeat in conn.execute(
            sa_select(ranked.c.week,
                      func.sum(case((ranked.c.week == ranked.c.first, 1), else_=0)),
                      func.sum(case((ranked.c.week > ranked.c.first, 1), else_=0)))
            .where(_window(since, ranked.c.last_at)).group_by(ranked.c.week)).all():
        line = rows.setdefault(sql.monday(w), [0] * 7)
        line[5], line[6] = int(new or 0), int(repeat or 0)
    for r in refunds:
        rows.setdefault(r.monday, [0] * 7)[3] -= r.tokens
    if not rows and since is None:
        return []
    local_now = now.astimezone(sql.zone).date()
    last = max([*rows, local_now - timedelta(days=local_now.weekday())])
    first = min(rows) if rows else last
    if since is not None:
        local_since = since.astimezone(sql.zone).date()
        first = min(first, local_since - timedelta(days=local_since.weekday()))
    out: list[WeekStats] = []
    monday = first
    while monday <= last:
        active, follows, unfollows, spent, topups, new, repeat = rows.get(monday, [0] * 7)
        out.append(WeekStats(week=iso_week(monday), follows=follows, unfollows=unfollows,
                             active_readers=active, new_payers=new, repeat_payers=repeat,
                             revenue_tokens=spent, topup_tokens=topups, monday=monday))
        monday += timedelta(weeks=1)
    return out


def _scenes(session: Session, since: datetime | None, refunds: list[_Refund],
            sql: _Sql) -> list[SceneStats]:
    e = _EVENT.c
    conn = session.connection()
    touched: dict[str, dict[str, int]] = {}
    for kind, scene, readers in conn.execute(
            sa_select(e.kind, e.detail, sql.readers(e.openid))
            .where(_rare(), e.kind.in_((events.FOLLOW, events.SCAN)), e.detail.is_not(None),
                   _window(since, e.at)).group_by(e.kind, e.detail)).all():
        touched.setdefault(str(scene), {})[kind] = int(readers)
    paid: dict[str, tuple[int, int]] = {}
    for scene, payers, spent in conn.execute(
            sa_select(_SUB.c.scene, sql.readers(e.openid),
                      func.sum(case((e.kind.in_(_SPEND), e.amount), else_=0)))
            .select_from(_EVENT.join(_SUB, _SUB.c.openid == e.openid))
            .where(_rare(), _paying(), _SUB.c.scene.is_not(None), _window(since, e.at))
            .group_by(_SUB.c.scene)).all():
        paid[str(scene)] = (int(payers), int(spent or 0))
    brought = {str(s): int(n) for s, n in conn.execute(
        sa_select(_SUB.c.scene, func.count()).where(_SUB.c.scene.is_not(None))
        .group_by(_SUB.c.scene)).all()}
    coded = {str(s) for s in conn.execute(sa_select(_QR.c.scene).distinct()).scalars()}
    given_back: dict[str, int] = {}
    for r in refunds:
        if r.scene is not None:
            given_back[r.scene] = given_back.get(r.scene, 0) + r.tokens
    return [SceneStats(scene=s, follows=touched.get(s, {}).get(events.FOLLOW, 0),
                       payers=paid.get(s, (0, 0))[0],
                       revenue_tokens=paid.get(s, (0, 0))[1] - given_back.get(s, 0),
                       scans=touched.get(s, {}).get(events.SCAN, 0),
                       subscribers=brought.get(s, 0))
            for s in sorted({*touched, *paid, *brought, *coded, *given_back})]

