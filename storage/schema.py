"""The database schema: Alembic migrations driven from code.

The revisions live in ``storage/migrations/versions`` and ship inside the package; there is no
alembic.ini. :func:`upgrade` brings a database to the newest revision (``newsbot db upgrade``),
:func:`check_current` tells whether the code and the database agree (``newsbot serve`` refuses
to start otherwise).

A database made before migrations existed (tables created directly from the models, no
``alembic_version`` table) is adopted by :func:`upgrade` when its tables and columns are exactly
those of the baseline revision: it is stamped with that revision, then upgraded normally.

Adding a revision (development): change ``storage/models.py``, then run
``python -c "from storage.schema import new_revision; new_revision('what changed')"``, which
autogenerates the next numbered script against a scratch database at head. Review it before
committing: Alembic does not see renames, CHECK constraints or data changes.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, inspect, text
from sqlmodel import SQLModel

from storage.db import READ_ONLY, make_engine, write_gate

log = logging.getLogger("newsbot.schema")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BASELINE_REVISION = "0001"
VERSION_TABLE = "alembic_version"
# pg_advisory_xact_lock key: concurrent upgrades of one PostgreSQL database run one at a time
# (SQLite gets the same from the write lock its transactions take up front).
_PG_LOCK_KEY = 0x6E657773626F74  # "newsbot"
UPGRADE_HINT = "run `newsbot db upgrade` (with the same --config) to bring it up to date"


class SchemaError(Exception):
    """The database schema cannot be used or upgraded as it is."""


class SchemaOutOfDate(SchemaError):
    """The database is not at the revision this code needs.

    ``state`` is ``empty`` (no newsbot tables at all), ``unversioned`` (tables made before
    migrations existed), ``behind`` (an older revision) or ``unknown`` (a revision this code
    does not have, e.g. written by a newer newsbot; upgrading the database cannot fix that)."""

    def __init__(self, *, current: str | None, head: str, state: str) -> None:
        self.current = current
        self.head = head
        self.state = state
        what = {
            "empty": "the database has no newsbot schema yet",
            "unversioned": "the database was created before schema migrations (no revision "
                           "recorded)",
            "behind": f"the database schema is at revision {current}",
            "unknown": f"the database schema is at revision {current}, which this version of "
                       "newsbot does not know (was it upgraded by a newer newsbot?)",
        }[state]
        hint = ("install the newsbot version that upgraded it" if state == "unknown"
                else UPGRADE_HINT)
        super().__init__(f"{what}; this newsbot needs revision {head}: {hint}")


class SchemaMismatch(SchemaError):
    """Pre-migration tables that do not match the baseline, so they cannot be adopted."""


def alembic_config(*, connection: Connection | None = None, url: str | None = None,
                   migrations: Path = MIGRATIONS) -> Config:
    """An Alembic configuration built in code. Commands run on ``connection`` (inside its
    transaction) or, failing that, open ``url``."""
    cfg = Config()
    # Config values go through configparser interpolation: a literal % is written %%.
    cfg.set_main_option("script_location", str(migrations).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if connection is not None:
        cfg.attributes["connection"] = connection
    if url is not None:
        cfg.attributes["url"] = url
    return cfg


@cache
def _scripts(migrations: Path = MIGRATIONS) -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(migrations=migrations))


def head_revision() -> str:
    """The newest revision this code knows."""
    head = _scripts().get_current_head()
    if head is None:
        raise SchemaError(f"no migration scripts in {MIGRATIONS}")
    return head


@contextmanager
def _reading(engine: Engine) -> Iterator[Connection]:
    # Read-only: on SQLite a plain BEGIN, not the write lock every other transaction takes.
    with engine.execution_options(**{READ_ONLY: True}).connect() as conn:
        try:
            yield conn
        finally:
            conn.rollback()


def _revision(conn: Connection) -> str | None:
    # Read directly rather than through Alembic's MigrationContext, which logs its dialect
    # set-up at INFO: `newsbot serve` checks the revision on every start.
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    found = list(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
    if len(found) > 1:
        raise SchemaError(f"the database records several revisions ({', '.join(sorted(found))})"
                          "; newsbot's migrations are a single line, so these are not its own")
    return found[0] if found else None


def _is_empty(conn: Connection) -> bool:
    ours = {*SQLModel.metadata.tables, VERSION_TABLE}
    return not ours.intersection(inspect(conn).get_table_names())


def current_revision(engine: Engine) -> str | None:
    """The database's revision; None when it has none (empty, or made before migrations)."""
    with _reading(engine) as conn:
        return _revision(conn)


def is_empty(engine: Engine) -> bool:
    """No newsbot table and no revision: a database nobody has set up yet. Tables of other
    applications (in a shared PostgreSQL schema) do not count."""
    with _reading(engine) as conn:
        return _is_empty(conn)


def is_current(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()


def check_current(engine: Engine) -> None:
    """Raise :class:`SchemaOutOfDate` unless the database is at :func:`head_revision`."""
    with _reading(engine) as conn:
        current = _revision(conn)
        empty = current is None and _is_empty(conn)
    head = head_revision()
    if current == head:
        return
    if current is None:
        state = "empty" if empty else "unversioned"
    else:
        state = "behind" if _known(current) else "unknown"
    raise SchemaOutOfDate(current=current, head=head, state=state)


def _known(revision: str) -> bool:
    return any(script.revision == revision for script in _scripts().walk_revisions())


def upgrade(target: Engine | str) -> None:
    """Bring the database to the newest revision, in one transaction; a no-op when it is
    there already. Safe to run from several processes at once."""
    if isinstance(target, str):
        engine = make_engine(target, pooled=False)
        try:
            _upgrade(engine)
        finally:
            engine.dispose()
    else:
        _upgrade(target)


def _upgrade(engine: Engine) -> None:
    # On SQLite, concurrent upgraders queue on the write gate like every writer: left to
    # SQLite, switching a new file to WAL can fail at once with "database is locked".
    with write_gate(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        before = _revision(conn)
        if before is not None and not _known(before):
            raise SchemaOutOfDate(current=before, head=head_revision(), state="unknown")
        if before is None and not _is_empty(conn):
            _adopt(conn)
        command.upgrade(alembic_config(connection=conn), "head")
        after = _revision(conn)
    if after != before:
        log.info("database schema upgraded from %s to %s", before or "nothing", after)


def _adopt(conn: Connection) -> None:
    """Stamp a pre-migration database with the baseline, after checking that it has exactly
    the baseline's tables and columns (anything else needs a person to look at it)."""
    expected = _baseline_columns()
    insp = inspect(conn)
    present = set(insp.get_table_names())
    problems: list[str] = []
    for table, columns in sorted(expected.items()):
        if table not in present:
            problems.append(f"table {table} is missing")
            continue
        found = {c["name"] for c in insp.get_columns(table)}
        problems += [f"column {table}.{c} is missing" for c in sorted(columns - found)]
        problems += [f"column {table}.{c} is unexpected" for c in sorted(found - columns)]
    if problems:
        raise SchemaMismatch(
            "the database has newsbot tables but no recorded revision, and they do not match "
            f"revision {BASELINE_REVISION}, so they cannot be adopted: " + "; ".join(problems))
    command.stamp(alembic_config(connection=conn), BASELINE_REVISION)
    log.warning("adopted a database created before migrations as revision %s",
                BASELINE_REVISION)


@cache
def _baseline_columns() -> dict[str, frozenset[str]]:
    """Table → column names of the baseline revision, from a scratch in-memory database."""
    scratch = create_engine("sqlite://")
    try:
        with scratch.begin() as conn:
            command.upgrade(alembic_config(connection=conn), BASELINE_REVISION)
            insp = inspect(conn)
            return {t: frozenset(c["name"] for c in insp.get_columns(t))
                    for t in insp.get_table_names() if t != VERSION_TABLE}
    finally:
        scratch.dispose()


def stamp_head(engine: Engine) -> None:
    """Record the newest revision without running anything: for a schema just made from the
    models with ``create_schema`` (the tests do that, it is faster), which the migration tests
    prove identical to the migrated one."""
    with engine.begin() as conn:
        command.stamp(alembic_config(connection=conn), "head")


def new_revision(message: str, *, migrations: Path = MIGRATIONS) -> Path:
    """Autogenerate the next numbered revision from the difference between the models and a
    scratch database at head; returns the new script's path (development only)."""
    scripts = ScriptDirectory.from_config(alembic_config(migrations=migrations))
    head = scripts.get_current_head()
    rev_id = f"{int(head) + 1:04d}" if head and head.isdigit() else None
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/scratch.db", pooled=False)
        try:
            with engine.begin() as conn:
                command.upgrade(alembic_config(connection=conn, migrations=migrations), "head")
                script = command.revision(
                    alembic_config(connection=conn, migrations=migrations), message=message,
                    autogenerate=True, rev_id=rev_id)
        finally:
            engine.dispose()
    _scripts.cache_clear()
    if script is None or isinstance(script, list):
        raise SchemaError("alembic did not write exactly one revision")
    log.info("wrote %s; review it before committing", script.path)
    return Path(script.path)
