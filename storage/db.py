"""Engine and transactions. Callers own the transaction; storage functions never commit."""

from __future__ import annotations

import fcntl
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool
from sqlmodel import Session, SQLModel, create_engine

from storage import models  # noqa: F401  (registers the tables on SQLModel.metadata)

T = TypeVar("T")
READ_ONLY = "newsbot_read_only"
_READ_ONLY_ATTR = "_newsbot_read_only"


def make_engine(url: str, *, pool_size: int = 10, pooled: bool = True) -> Engine:
    """Create an engine tuned per backend: SQLite gets WAL, a busy timeout and write-locking
    transactions; PostgreSQL gets a checked pool. ``pooled=False`` keeps no idle connections
    (for a process that forks, like the gunicorn master)."""
    parsed = make_url(url)
    # Statement parameters hold openids and reply texts: keep them out of error messages,
    # which end up in the logs.
    extra: dict[str, Any] = {"hide_parameters": True}
    if not pooled:
        extra["poolclass"] = NullPool
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **extra)
        _tune_sqlite(engine)
        if parsed.database and parsed.database != ":memory:":
            _GATES[engine] = _WriteGate(str(Path(parsed.database).resolve()))
            # Read-only transactions get connections of their own, opened with query_only, so
            # a pooled connection never has to be switched between the two kinds.
            readers = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}, **extra)
            _tune_sqlite(readers, query_only=True)
            _attach_readers(engine, readers)
        return engine
    if pooled:
        # No pre-ping round trip per checkout (it cost 12 % of a webhook request): stale
        # connections are recycled, and a dropped one fails once and is retried (see
        # run_in_transaction), after SQLAlchemy has invalidated the pool.
        extra |= {"pool_size": pool_size, "max_overflow": pool_size, "pool_recycle": 1800}
    engine = create_engine(url, **extra)
    # Readers: autocommit (a lone SELECT needs no BEGIN/ROLLBACK round trips) and refused
    # any write by the server itself. Added to the URL's own libpq options, if any.
    options = " ".join(filter(None, [str(parsed.query.get("options") or ""),
                                     "-c default_transaction_read_only=on"]))
    readers = create_engine(parsed.update_query_dict({"options": options}),
                            isolation_level="AUTOCOMMIT", **extra)
    _attach_readers(engine, readers)
    return engine


def _attach_readers(engine: Engine, readers: Engine) -> None:
    setattr(engine, _READ_ONLY_ATTR, readers)
    event.listen(engine, "engine_disposed", lambda _engine: readers.dispose())


def _tune_sqlite(engine: Engine, *, query_only: bool = False) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so BEGIN IMMEDIATE below is honoured.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        if query_only:  # the database refuses any write made through this engine
            cur.execute("PRAGMA query_only=1")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writing transactions take the write lock up front: concurrent writers queue on the
        # busy timeout instead of failing with "database is locked" on a lock upgrade.
        # Read-only ones (reader pages) need no lock at all under WAL.
        read_only = query_only or conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def create_schema(engine: Engine) -> None:
    SQLModel.metadata.create_all(engine)


class _WriteGate:
    """SQLite has one writer at a time, and a writer that finds the lock taken waits in SQLite's
    busy handler, which sleeps in steps of up to 100 ms and is not woken when the lock frees:
    under load most of a request's time went to those sleeps. Writers instead queue here — a
    thread lock within the process and flock() on ``<db>.lock`` across processes (gunicorn
    workers, the CLI, the scheduler) — and the next one starts the moment the last one ends."""

    def __init__(self, db_path: str) -> None:
        self._path = db_path + ".lock"
        self._thread_lock = threading.Lock()
        self._local = threading.local()

    @contextmanager
    def hold(self) -> Iterator[None]:
        if getattr(self._local, "held", False):  # a nested unit of work in the same thread
            yield
            return
        with self._thread_lock:
            # Opened per use, never kept: a descriptor inherited across fork() would share
            # its lock with the parent instead of excluding it.
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._local.held = True
                try:
                    yield
                finally:
                    self._local.held = False
            finally:
                os.close(fd)  # releases the flock


_GATES: weakref.WeakKeyDictionary[Engine, _WriteGate] = weakref.WeakKeyDictionary()


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    gate = _GATES.get(engine)
    with gate.hold() if gate is not None else nullcontext(), \
            Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def read_only(engine: Engine) -> Iterator[Session]:
    """A transaction that only reads; it is rolled back at the end, never committed. The
    database refuses writes in it (SQLite query_only, PostgreSQL READ ONLY), and on SQLite it
    takes no write lock, so it never waits for writers."""
    with Session(read_only_engine(engine)) as session:
        try:
            yield session
        finally:
            session.rollback()


def write_gate(engine: Engine) -> AbstractContextManager[None]:
    """Queue behind the other writers of a SQLite file (nothing to do on PostgreSQL)."""
    gate = _GATES.get(engine)
    return gate.hold() if gate is not None else nullcontext()


def read_only_engine(engine: Engine) -> Engine:
    """Where read-only work runs: the readers engine made with it (a SQLite file's query_only
    twin, PostgreSQL's read-only autocommit pool), else the engine with read-only options."""
    ro: Engine | None = getattr(engine, _READ_ONLY_ATTR, None)
    if ro is None:
        ro = engine.execution_options(**{READ_ONLY: True})
        setattr(engine, _READ_ONLY_ATTR, ro)
    return ro


def run_in_transaction(engine: Engine, fn: Callable[[Session], T], *, attempts: int = 3) -> T:
    """Run ``fn`` in a fresh transaction, retrying transient lock/serialization failures."""
    for attempt in range(attempts):
        try:
            with transaction(engine) as session:
                return fn(session)
        except OperationalError as exc:
            if attempt == attempts - 1 or not _is_transient(exc):
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _is_transient(exc: OperationalError) -> bool:
    if exc.connection_invalidated:  # the server dropped the connection; the pool is renewed
        return True
    text = str(exc.orig).lower()
    return "locked" in text or "deadlock" in text or "could not serialize" in text
