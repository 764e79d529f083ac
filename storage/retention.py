"""Deleting what is no longer needed: stored replies once WeChat can no longer retry them, code
failures the freeze rule can no longer count, inbox messages after ``[inbox] keep_days``,
console sessions that are over. Events, the ledger, unlocks and passes are never purged.

Each DELETE removes at most ``batch`` rows in its own short transaction, so the webhook's
writers (on SQLite: the one write lock) wait for one small batch at most, never for the purge.
``inbound_message`` and ``code_failure`` have no index on their time column (one more index
on the webhook's hottest insert would cost every message); their rows are inserted in time
order, so they are walked by primary key from the oldest: each batch is a range of the key,
and the walk ends at the first batch with nothing old left in it (docs/benchmarks.md §10)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import ColumnElement, Engine, Table, and_, delete, func, or_, select

from storage.db import read_only, run_in_transaction
from storage.models import (
    CodeFailure,
    ConsoleSession,
    InboundMessage,
    InboxMessage,
    InboxReply,
    utcnow,
)

_INBOUND: Table = InboundMessage.__table__  # type: ignore[attr-defined]
_FAILURE: Table = CodeFailure.__table__  # type: ignore[attr-defined]
_INBOX: Table = InboxMessage.__table__  # type: ignore[attr-defined]
_INBOX_REPLY: Table = InboxReply.__table__  # type: ignore[attr-defined]
_SESSION: Table = ConsoleSession.__table__  # type: ignore[attr-defined]

# The tables purged, in the order they are purged and reported.
TABLES: Final = ("inbound_message", "code_failure", "inbox_message", "inbox_reply",
                 "console_session")
# Clocks of the processes differ a little and a freeze decision may be in flight: rows are kept
# this much longer than the rule that reads them strictly needs.
MARGIN: Final = timedelta(minutes=5)


@dataclass(frozen=True)
class Policy:
    """How long each kind of row must stay (from bot.settings: bot.jobs.purge builds it)."""

    replies_hours: int  # [retention] replies_hours
    max_clock_skew_s: int  # [server]: how long a signed delivery passes the freshness check
    failure_window_minutes: int  # [codes]: how far back the freeze rule counts failures
    inbox_keep_days: int  # [inbox] keep_days
    console_link_minutes: int  # [console]: how long a console link may be opened
    batch: int = 1000  # rows per DELETE

    @property
    def replies(self) -> timedelta:
        """A stored reply is what stops a delivery from running twice: keep it while a signed
        request carrying that delivery can still pass the freshness check (its timestamp may
        be up to the skew ahead of us when first seen and up to the skew behind on a replay),
        whatever ``replies_hours`` says."""
        return max(timedelta(hours=self.replies_hours),
                   timedelta(seconds=2 * self.max_clock_skew_s) + MARGIN)

    @property
    def failures(self) -> timedelta:
        """storage.codes counts the failures of the last window (never older: a freeze keeps
        its own count), so older ones can go."""
        return timedelta(minutes=self.failure_window_minutes) + MARGIN

    @property
    def inbox(self) -> timedelta:
        return timedelta(days=self.inbox_keep_days)

    @property
    def console_link(self) -> timedelta:
        """A session's row holds its link's nonce, which is what lets a link start only one
        session: it stays, even once the session is over, until the link itself has expired."""
        return timedelta(minutes=self.console_link_minutes) + MARGIN


def _predicates(policy: Policy, now: datetime) -> dict[str, ColumnElement[bool]]:
    """What makes a row of each table purgeable at ``now``."""
    s = _SESSION.c
    return {
        "inbound_message": _INBOUND.c.created_at < now - policy.replies,
        "code_failure": _FAILURE.c.at < now - policy.failures,
        "inbox_message": _INBOX.c.at < now - policy.inbox,
        "inbox_reply": _INBOX_REPLY.c.at < now - policy.inbox,
        "console_session": and_(or_(s.ended_at.is_not(None), s.expires_at < now),
                                s.created_at < now - policy.console_link),
    }


# Tables walked by primary key (no index on their time column); the others are small or have
# one, and delete by key from a LIMITed select on their predicate.
_WALKED: Final = {"inbound_message": _INBOUND, "code_failure": _FAILURE,
                  "inbox_reply": _INBOX_REPLY}
_BY_KEY: Final = {"inbox_message": (_INBOX, _INBOX.c.id),
                  "console_session": (_SESSION, _SESSION.c.token_sha256)}


def purge(engine: Engine, policy: Policy, *, now: datetime | None = None,
          on_batch: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Delete every purgeable row, batch by batch; returns the rows deleted per table.
    ``on_batch(table, rows)`` is called after each committed batch (for progress and tests)."""
    now = now or utcnow()
    predicates = _predicates(policy, now)
    deleted: dict[str, int] = {}
    for name in TABLES:
        if name in _WALKED:
            n = _walk_by_id(engine, _WALKED[name], predicates[name], policy.batch, name, on_batch)
        else:
            table, key = _BY_KEY[name]
            n = _delete_by_key(engine, table, key, predicates[name], policy.batch, name,
                               on_batch)
        deleted[name] = n
    return deleted


def count_purgeable(engine: Engine, policy: Policy, *,
                    now: datetime | None = None) -> dict[str, int]:
    """What ``purge`` would delete now (``db purge --dry-run``). Counting the tables without a
    time index scans them: this is an operator's question, not the scheduled job's."""
    now = now or utcnow()
    predicates = _predicates(policy, now)
    tables = {**_WALKED, **{name: table for name, (table, _key) in _BY_KEY.items()}}
    with read_only(engine) as session:
        conn = session.connection()
        return {name: int(conn.execute(select(func.count()).select_from(tables[name])
                                       .where(predicates[name])).scalar_one())
                for name in TABLES}


def _walk_by_id(engine: Engine, table: Table, old: ColumnElement[bool], batch: int,
                name: str, on_batch: Callable[[str, int], None] | None) -> int:
    """Delete old rows ``batch`` keys at a time from the lowest id up, stopping at the first
    range with no old row in it. Rows are inserted in time order (give or take the seconds a
    request takes), so that range is where the kept rows begin; an old row left behind a newer
    one by a slow request is deleted by the next purge."""
    ids = table.c.id
    total = 0
    after: int | None = None

    def one(session: Any) -> tuple[int | None, int]:
        conn = session.connection()
        window = select(ids).order_by(ids).limit(batch)
        if after is not None:
            window = window.where(ids > after)
        upto = conn.execute(select(func.max(window.subquery().c.id))).scalar()
        if upto is None:
            return None, 0
        in_range = ids <= upto if after is None else and_(ids > after, ids <= upto)
        return upto, int(conn.execute(delete(table).where(in_range, old)).rowcount or 0)

    while True:
        upto, n = run_in_transaction(engine, one)
        if upto is None:
            return total
        total += n
        if on_batch is not None:
            on_batch(name, n)
        if n == 0:
            return total
        after = upto


def _delete_by_key(engine: Engine, table: Table, key: Any, old: ColumnElement[bool],
                   batch: int, name: str,
                   on_batch: Callable[[str, int], None] | None) -> int:
    """Delete old rows ``batch`` at a time, each batch chosen by a LIMITed select (uses the
    time index where the table has one)."""
    total = 0

    def one(session: Any) -> int:
        chosen = select(key).where(old).limit(batch)
        return int(session.connection().execute(
            delete(table).where(key.in_(chosen))).rowcount or 0)

    while True:
        n = run_in_transaction(engine, one)
        total += n
        if on_batch is not None and n:
            on_batch(name, n)
        if n < batch:
            return total
