"""The few statements nearly every chat message runs, on the DBAPI connection directly.

A 本周 from a known reader needs two reads (which issue is current, and the reader's balance,
unlock and notice for it) and one write (the delivery's claim with its reply, and, while plain
messages are accepted, its signed timestamp and nonce: see storage.replay). Through
SQLAlchemy those cost ~240 µs per message on SQLite, most of it building execution contexts
and transactions; on the driver they cost ~55 µs. On PostgreSQL each runs as its own
autocommitted statement, so a message makes 3 round trips instead of 7 (BEGIN, statements,
COMMIT/ROLLBACK for two transactions); the signed pair and the message's events (the card
shown: storage.events) join the claim's statement there (CTEs that only write when the claim
did) and its transaction on SQLite. Everything else in newsbot goes through SQLAlchemy.

Reads run on the engine's read-only twin (storage.db), which the database itself keeps from
writing; the claim runs on the writer engine, queued on SQLite's write gate like any writer.
The SQL is plain enough for both dialects; only the parameter style differs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.pool import PoolProxiedConnection

from storage import db as storage_db
from storage.inbox import Claim
from storage.issues import CURRENT_SQL, IssuePreview, preview_by_number
from storage.models import InboundMessage
from storage.replay import SEAL_SQL, SEALED_BODY_SQL, Replayed, Seal
from storage.subscribers import STANDING_SQL, Standing, standing_from_row, standing_params

# The reads are the storage modules' own statements; the writes exist only here.
_STATEMENTS = {
    "current": CURRENT_SQL,
    "standing": STANDING_SQL,
    "claim": "INSERT INTO inbound_message"
             " (dedupe_key, openid, status, reply_json, created_at, finished_at)"
             " VALUES (:key, :openid, 'done', :reply, :now, :now)"
             " ON CONFLICT DO NOTHING RETURNING 1",
    "stored_reply": "SELECT reply_json FROM inbound_message WHERE dedupe_key = :key",
    "notice": "INSERT INTO issue_notice (openid, issue_number, created_at)"
              " VALUES (:openid, :issue, :now) ON CONFLICT DO NOTHING RETURNING 1",
    # Replay protection (storage.replay): the signed pair with its message's hash.
    "seal": SEAL_SQL,
    "sealed_body": SEALED_BODY_SQL,
}
# PostgreSQL: the pair and the claim in one autocommitted statement, one round trip. The claim
# is only inserted if the pair was new; (pair new?, claimed?) tells the caller what happened.
# A concurrent holder of the pair is waited for on its unique key, as with any INSERT.
_PG_SEALED_CLAIM = (
    "WITH seal AS (" + _STATEMENTS["seal"] + "),"
    " claim AS (INSERT INTO inbound_message"
    " (dedupe_key, openid, status, reply_json, created_at, finished_at)"
    " SELECT :key, :openid, 'done', :reply, :now, :now WHERE EXISTS (SELECT 1 FROM seal)"
    " ON CONFLICT DO NOTHING RETURNING 1)"
    " SELECT EXISTS (SELECT 1 FROM seal), EXISTS (SELECT 1 FROM claim)"
)
_NAMED = re.compile(r":(\w+)")

# The message's events (storage.events rows), inserted only when the claim is new: a WeChat
# retry of the message finds it claimed and adds none. Event i binds e{i}_<column>; the casts
# type the NULLs PostgreSQL cannot infer through an INSERT … SELECT.
_EVENT_COLUMNS = ("at", "kind", "openid", "issue_number", "detail", "amount")
_PG_EVENT_VARIANTS = 5  # claim statements prepared for 0-4 events (a message notes one card)
_EVENT_INTO = "INSERT INTO event (" + ", ".join(_EVENT_COLUMNS) + ")"
_STATEMENTS["event"] = (_EVENT_INTO + " VALUES (:at, :kind, :openid,"
                        " CAST(:issue_number AS INTEGER), :detail, CAST(:amount AS BIGINT))")


def _event_ctes(count: int) -> str:
    """``, ev0 AS (…), ev1 AS (…)``: each event's INSERT, written only if ``claim`` was."""
    return "".join(
        f", ev{i} AS ({_EVENT_INTO} SELECT :e{i}_at, :e{i}_kind, :e{i}_openid,"
        f" CAST(:e{i}_issue_number AS INTEGER), :e{i}_detail, CAST(:e{i}_amount AS BIGINT)"
        " WHERE EXISTS (SELECT 1 FROM claim))" for i in range(count))


def _pg_claim_with_events(count: int) -> str:
    """PostgreSQL: the claim and its events in one autocommitted statement."""
    return _NAMED.sub(r"%(\1)s", "WITH claim AS (" + _STATEMENTS["claim"] + ")"
                      + _event_ctes(count) + " SELECT EXISTS (SELECT 1 FROM claim)")


def _pg_sealed_claim(count: int) -> str:
    """PostgreSQL: the signed pair, the claim and its events in one statement."""
    head, tail = _PG_SEALED_CLAIM.split(" SELECT EXISTS (SELECT 1 FROM seal), ")
    return _NAMED.sub(r"%(\1)s", head + _event_ctes(count)
                      + " SELECT EXISTS (SELECT 1 FROM seal), " + tail)


class NoticeTaken(Exception):
    """Another message of the same reader recorded the new-issue notice first."""


@dataclass(frozen=True)
class _Dialect:
    sql: dict[str, str]
    timestamp: Callable[[datetime], Any]  # a datetime as the column type stores it


def _dialect(engine: Engine) -> _Dialect:
    if engine.dialect.name == "postgresql":  # psycopg: %(name)s
        sql = {k: _NAMED.sub(r"%(\1)s", v) for k, v in _STATEMENTS.items()}
        for count in range(_PG_EVENT_VARIANTS):
            sql[f"sealed_claim/{count}"] = _pg_sealed_claim(count)
            sql[f"claim/{count}"] = _pg_claim_with_events(count)
    else:  # sqlite3 takes :name as it is
        sql = dict(_STATEMENTS)
    column_type = InboundMessage.__table__.c.created_at.type  # type: ignore[attr-defined]
    processor = column_type.bind_processor(engine.dialect)
    return _Dialect(sql, processor if processor is not None else (lambda value: value))


class FastPath:
    """The per-message reads and the claim, for one engine (made once per webhook)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.readers = storage_db.read_only_engine(engine)
        self._d = _dialect(engine)
        self._postgres = engine.dialect.name == "postgresql"
        self._driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error

    # -- reads -------------------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[Reads]:
        raw = self.readers.raw_connection()
        try:
            yield Reads(self, raw)
        except self._driver_error as exc:
            _discard(self.readers, raw, exc)
            raise
        finally:
            raw.close()

    # -- the write ---------------------------------------------------------------------------

    def store_reply(self, *, key: str, openid: str, reply_json: str, now: datetime,
                    notice_issue: int | None = None, seal: Seal | None = None,
                    events: Sequence[Mapping[str, object]] = ()) -> Claim:
        """Claim the delivery with its reply (and record the new-issue notice, the signed
        pair and the message's ``events`` (storage.events rows), atomically with it). ``done``
        with the first reply when WeChat's retry finds the message answered (its events are
        not recorded again); NoticeTaken (nothing stored) when a concurrent message recorded
        the notice first; Replayed (nothing stored) when the pair came with another message."""
        params = {"key": key, "openid": openid, "reply": reply_json,
                  "now": self._d.timestamp(now), "issue": notice_issue}
        if seal is not None:
            params |= {"ts": seal.timestamp, "nonce": seal.nonce, "body": seal.body_sha256}
        # On PostgreSQL the events ride in the claim's statement (one round trip) unless a
        # notice needs a transaction anyway, or a message noted more than we prepared for.
        in_statement = (self._postgres and notice_issue is None
                        and len(events) < _PG_EVENT_VARIANTS)
        if in_statement:
            params |= self._event_params(events)
        if seal is not None and in_statement:
            with self._writer(atomic=False) as cur:
                cur.execute(self._d.sql[f"sealed_claim/{len(events)}"], params)
                new_pair, claimed = cur.fetchone()
                if claimed:
                    return Claim("new")
                if new_pair:  # WeChat's retry under a new pair: the message was answered
                    return self._stored(cur, params)
                self._check_sealed(cur, params)  # an old pair: a retry, or refused
            seal = None  # the same message again: claim it (or find its reply) as usual
        if in_statement and events:
            with self._writer(atomic=False) as cur:
                cur.execute(self._d.sql[f"claim/{len(events)}"], params)
                if cur.fetchone()[0]:
                    return Claim("new")
                return self._stored(cur, params)
        separate = () if in_statement else events
        atomic = notice_issue is not None or seal is not None or bool(separate)
        with storage_db.write_gate(self.engine), self._writer(atomic=atomic) as cur:
            if seal is not None:
                cur.execute(self._d.sql["seal"], params)
                if cur.fetchone() is None:
                    self._check_sealed(cur, params)
            cur.execute(self._d.sql["claim"], params)
            if cur.fetchone() is None:
                return self._stored(cur, params)  # a retry: its events were recorded
            if notice_issue is not None:
                cur.execute(self._d.sql["notice"], params)
                if cur.fetchone() is None:
                    raise NoticeTaken
            if separate:
                cur.executemany(self._d.sql["event"], [self._event_row(e) for e in separate])
            return Claim("new")

    def _event_row(self, event: Mapping[str, object]) -> dict[str, object]:
        at = event["at"]
        assert isinstance(at, datetime)
        return {c: event.get(c) for c in _EVENT_COLUMNS} | {"at": self._d.timestamp(at)}

    def _event_params(self, events: Sequence[Mapping[str, object]]) -> dict[str, object]:
        return {f"e{i}_{c}": v for i, e in enumerate(events)
                for c, v in self._event_row(e).items()}

    def _stored(self, cur: Any, params: dict[str, Any]) -> Claim:
        cur.execute(self._d.sql["stored_reply"], params)
        row = cur.fetchone()
        return Claim("done", row[0] if row else None)

    def _check_sealed(self, cur: Any, params: dict[str, Any]) -> None:
        cur.execute(self._d.sql["sealed_body"], params)
        row = cur.fetchone()
        if row is None or row[0] != params["body"]:
            raise Replayed

    @contextmanager
    def _writer(self, *, atomic: bool) -> Iterator[Any]:
        """A cursor on a writer connection. One statement needs no transaction of its own
        (it is atomic, and on PostgreSQL that saves the BEGIN and COMMIT round trips); several
        run in one, committed on success and rolled back on any exception."""
        raw = self.engine.raw_connection()
        try:
            dbapi: Any = raw.dbapi_connection
            if self._postgres:
                dbapi.autocommit = not atomic
            cur = raw.cursor()
            try:
                if atomic and not self._postgres:
                    cur.execute("BEGIN IMMEDIATE")  # pysqlite runs in autocommit here
                try:
                    yield cur
                except BaseException:
                    if atomic:
                        dbapi.rollback() if self._postgres else cur.execute("ROLLBACK")
                    raise
                if atomic:
                    dbapi.commit() if self._postgres else cur.execute("COMMIT")
            finally:
                cur.close()
                if self._postgres:
                    dbapi.autocommit = False  # as SQLAlchemy expects its pooled connections
        except (NoticeTaken, Replayed):
            raise  # rolled back cleanly above: the connection is fine
        except BaseException as exc:
            _discard(self.engine, raw, exc)  # its state is unknown: never hand it on
            raise
        finally:
            raw.close()


def _discard(engine: Engine, raw: PoolProxiedConnection, exc: BaseException) -> None:
    """Drop a connection that failed. If the server went away (a restart, a failover), drop
    the whole pool too, as SQLAlchemy does for its own statements: the other pooled
    connections are dead as well, and each would otherwise fail one more message first."""
    error: Any = exc
    disconnected = isinstance(exc, engine.dialect.loaded_dbapi.Error) and \
        engine.dialect.is_disconnect(error, raw.dbapi_connection, None)
    raw.invalidate()
    if disconnected:
        engine.dispose()


class Reads:
    """The per-message reads on one read-only connection, each its own snapshot."""

    def __init__(self, path: FastPath, raw: PoolProxiedConnection) -> None:
        self._path = path
        self._raw = raw

    def _one(self, name: str, params: dict[str, Any]) -> Any:
        cur = self._raw.cursor()
        try:
            cur.execute(self._path._d.sql[name], params)
            return cur.fetchone()
        finally:
            cur.close()

    def current_issue(self, *, now: datetime, default_free_percent: int) -> IssuePreview | None:
        row = self._one("current", {"now": self._path._d.timestamp(now)})
        if row is None:
            return None
        return preview_by_number(self._path.readers, version=(*row, default_free_percent),
                                 number=int(row[0]), default_free_percent=default_free_percent)

    def standing(self, *, openid: str, issue_number: int | None) -> Standing:
        return standing_from_row(self._one("standing", standing_params(openid, issue_number)))
