"""storage.retention: what the purge deletes, what it must keep (the boundaries, the rows a
freeze or a replay still needs) and that it deletes in small batches, each its own
transaction. The webhook and the CLI around it: tests/test_retention_cli.py."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

from sqlalchemy import Engine, func, insert, select

from storage import codes, events, retention, subscribers
from storage.db import transaction
from storage.models import (
    CodeFailure,
    ConsoleSession,
    Event,
    InboundMessage,
    InboxMessage,
    InboxReply,
    utcnow,
)
from storage.retention import MARGIN, Policy

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=utcnow().tzinfo)
READER = "o_reader_0001"


def policy(**kw: int) -> Policy:
    values = {"replies_hours": 24, "max_clock_skew_s": 300, "failure_window_minutes": 10,
              "inbox_keep_days": 30, "console_link_minutes": 15, "batch": 1000} | kw
    return Policy(**values)


def add_inbound(engine: Engine, ages: list[timedelta], *, now: datetime = NOW) -> None:
    rows = [{"dedupe_key": f"k{i}-{age.total_seconds()}", "openid": READER, "status": "done",
             "reply_json": '{"type": "silent"}', "created_at": now - age}
            for i, age in enumerate(ages)]
    with transaction(engine) as s:
        s.connection().execute(insert(InboundMessage.__table__), rows)  # type: ignore[attr-defined]


def count(engine: Engine, model: type) -> int:
    with transaction(engine) as s:
        return int(s.connection().execute(
            select(func.count()).select_from(model.__table__)).scalar_one())  # type: ignore[attr-defined]


def keys(engine: Engine) -> set[str]:
    with transaction(engine) as s:
        return set(s.connection().execute(select(InboundMessage.dedupe_key)).scalars())


# --- inbound_message --------------------------------------------------------------------------

def test_replies_go_after_replies_hours_and_not_a_second_before(engine: Engine) -> None:
    day = timedelta(hours=24)
    add_inbound(engine, [day + timedelta(seconds=1), day, day - timedelta(seconds=1),
                         timedelta(seconds=5)])
    deleted = retention.purge(engine, policy(), now=NOW)
    assert deleted["inbound_message"] == 1
    assert keys(engine) == {"k1-86400.0", "k2-86399.0", "k3-5.0"}


def test_replies_stay_while_a_signed_delivery_could_still_be_replayed(engine: Engine) -> None:
    # Two hours of clock skew accepted: a delivery may come back up to 4 h after it was first
    # seen, and only its stored reply stops it from running again.
    p = policy(replies_hours=1, max_clock_skew_s=7200)
    assert p.replies == timedelta(hours=4) + MARGIN
    add_inbound(engine, [timedelta(hours=3), timedelta(hours=5)])
    assert retention.purge(engine, p, now=NOW)["inbound_message"] == 1
    assert keys(engine) == {"k0-10800.0"}


def test_inbound_is_deleted_in_batches_of_purge_batch(engine: Engine) -> None:
    add_inbound(engine, [timedelta(days=3)] * 2500 + [timedelta(minutes=1)] * 10)
    batches: list[tuple[str, int]] = []
    deleted = retention.purge(engine, policy(batch=1000), now=NOW,
                              on_batch=lambda t, n: batches.append((t, n)))
    assert deleted["inbound_message"] == 2500
    sizes = [n for t, n in batches if t == "inbound_message"]
    assert sizes == [1000, 1000, 500]
    assert count(engine, InboundMessage) == 10


def test_each_batch_commits_so_a_writer_gets_in_between(engine: Engine) -> None:
    """A webhook writer started between two batches finishes before the next one: the purge
    holds no transaction (on SQLite: the write lock) across batches."""
    add_inbound(engine, [timedelta(days=3)] * 30)
    finished: list[bool] = []

    def writer() -> None:
        with transaction(engine) as s:
            events.record(s, events.CARD, openid=READER, at=NOW)
        finished.append(True)

    def between(table: str, n: int) -> None:
        if table != "inbound_message" or not n:
            return
        t = threading.Thread(target=writer)
        t.start()
        t.join(timeout=10)
        assert not t.is_alive(), "a writer waited for the purge to end"

    assert retention.purge(engine, policy(batch=10), now=NOW,
                           on_batch=between)["inbound_message"] == 30
    assert len(finished) == 3


def test_walk_stops_at_the_first_range_with_nothing_old(engine: Engine) -> None:
    """Old rows behind the first young range are left for the next purge (they are the
    stragglers of slow requests), so a purge never scans the day of rows it keeps."""
    add_inbound(engine, [timedelta(days=2)] * 5 + [timedelta(minutes=1)] * 20
                + [timedelta(days=2)] * 3)
    batches: list[int] = []
    deleted = retention.purge(engine, policy(batch=10), now=NOW,
                              on_batch=lambda t, n: batches.append(n)
                              if t == "inbound_message" else None)
    assert deleted["inbound_message"] == 5
    assert batches == [5, 0]


# --- code_failure: what the freeze rule still counts -------------------------------------------

def fail_code(engine: Engine, at: datetime, *, max_failures: int = 3) -> codes.CodeOutcome:
    with transaction(engine) as s:
        return codes.redeem_code(s, openid=READER, text="NOT-A-CODE", secret=b"s" * 20,
                                 key=f"k-{at.timestamp()}", max_failures=max_failures,
                                 window=timedelta(minutes=10), freeze=timedelta(hours=1),
                                 now=at)


def test_a_purge_inside_the_window_keeps_the_failures_the_freeze_will_count(
        engine: Engine) -> None:
    with transaction(engine) as s:
        subscribers.ensure_subscriber(s, openid=READER, at=NOW)
    fail_code(engine, NOW)
    fail_code(engine, NOW + timedelta(minutes=8))
    retention.purge(engine, policy(failure_window_minutes=10), now=NOW + timedelta(minutes=9))
    third = fail_code(engine, NOW + timedelta(minutes=9))
    assert third.frozen_until == NOW + timedelta(minutes=9, hours=1)


def test_failures_go_once_the_window_and_margin_are_past(engine: Engine) -> None:
    keep = timedelta(minutes=10) + MARGIN
    rows = [{"openid": READER, "reason": "typo", "at": NOW - keep - timedelta(seconds=1)},
            {"openid": READER, "reason": "typo", "at": NOW - keep},
            {"openid": READER, "reason": "typo", "at": NOW}]
    with transaction(engine) as s:
        s.connection().execute(insert(CodeFailure.__table__), rows)  # type: ignore[attr-defined]
    assert retention.purge(engine, policy(), now=NOW)["code_failure"] == 1
    assert count(engine, CodeFailure) == 2


# --- inbox ------------------------------------------------------------------------------------

def test_inbox_messages_and_replies_are_kept_keep_days(engine: Engine) -> None:
    keep = timedelta(days=30)
    with transaction(engine) as s:
        conn = s.connection()
        for i, age in enumerate([keep + timedelta(seconds=1), keep, timedelta(0)]):
            conn.execute(insert(InboxMessage.__table__).values(  # type: ignore[attr-defined]
                openid=READER, at=NOW - age, kind="text", text="你好", dedupe_key=f"m{i}"))
            conn.execute(insert(InboxReply.__table__).values(  # type: ignore[attr-defined]
                openid=READER, message_id=i + 1, text="收到", operator="op", at=NOW - age,
                status="sent"))
    deleted = retention.purge(engine, policy(inbox_keep_days=30), now=NOW)
    assert (deleted["inbox_message"], deleted["inbox_reply"]) == (1, 1)
    assert (count(engine, InboxMessage), count(engine, InboxReply)) == (2, 2)


def test_inbox_is_deleted_in_batches(engine: Engine) -> None:
    with transaction(engine) as s:
        s.connection().execute(insert(InboxMessage.__table__), [  # type: ignore[attr-defined]
            {"openid": READER, "at": NOW - timedelta(days=400), "kind": "text", "text": "x",
             "dedupe_key": f"m{i}"} for i in range(25)])
    batches: list[int] = []
    retention.purge(engine, policy(batch=10), now=NOW,
                    on_batch=lambda t, n: batches.append(n) if t == "inbox_message" else None)
    assert batches == [10, 10, 5]
    assert count(engine, InboxMessage) == 0


# --- console sessions -------------------------------------------------------------------------

def test_console_sessions_go_when_over_and_their_link_is_dead(engine: Engine) -> None:
    link = timedelta(minutes=15) + MARGIN
    hour = timedelta(hours=1)
    sessions = {
        # ended a minute after it began: its link could still be opened, so the row (and its
        # nonce, which makes the link single-use) stays
        "ended-link-alive": (NOW - timedelta(minutes=2), NOW + 10 * hour, NOW - hour / 60),
        "ended-link-dead": (NOW - link - timedelta(seconds=1), NOW + 10 * hour, NOW),
        "expired": (NOW - 11 * hour, NOW - hour, None),
        "active": (NOW - 9 * hour, NOW + hour, None),
    }
    with transaction(engine) as s:
        s.connection().execute(insert(ConsoleSession.__table__), [  # type: ignore[attr-defined]
            {"token_sha256": name, "grant_nonce": name, "openid": "op", "csrf": "c",
             "created_at": created, "expires_at": expires, "ended_at": ended}
            for name, (created, expires, ended) in sessions.items()])
    assert retention.purge(engine, policy(), now=NOW)["console_session"] == 2
    with transaction(engine) as s:
        left = set(s.connection().execute(select(ConsoleSession.token_sha256)).scalars())
    assert left == {"ended-link-alive", "active"}


# --- what stays, and the dry run ----------------------------------------------------------------

def test_events_stay_and_the_dry_run_counts_what_the_purge_deletes(engine: Engine) -> None:
    add_inbound(engine, [timedelta(days=3)] * 7 + [timedelta(minutes=1)])
    with transaction(engine) as s:
        events.record(s, events.FOLLOW, openid=READER, at=NOW - timedelta(days=900))
    p = policy(batch=3)
    would = retention.count_purgeable(engine, p, now=NOW)
    assert would == {"inbound_message": 7, "code_failure": 0, "inbox_message": 0,
                     "inbox_reply": 0, "console_session": 0}
    assert count(engine, InboundMessage) == 8  # the dry run deleted nothing
    assert retention.purge(engine, p, now=NOW) == would
    assert count(engine, Event) == 1
    assert retention.purge(engine, p, now=NOW) == dict.fromkeys(retention.TABLES, 0)
