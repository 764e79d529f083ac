"""Small dialect-aware statement helpers shared by the storage modules."""

from __future__ import annotations

from typing import Any

from sqlalchemy import literal_column, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session


def insert_ignore(session: Session, model: type[Any], values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING; True when the row was inserted by this call."""
    conn = session.connection()
    module = postgresql if conn.dialect.name == "postgresql" else sqlite
    # A Core statement on the table (the ORM-enabled form costs several times more per call on
    # the webhook's hot path), and RETURNING rather than rowcount, which psycopg may report as
    # -1 whether or not a row went in. Callers flush pending ORM objects themselves.
    stmt = (module.insert(model.__table__).values(**values).on_conflict_do_nothing()
            .returning(literal_column("1")))
    return conn.execute(stmt).first() is not None


def scalar(session: Session, stmt: Any) -> Any:
    """One value from a Core statement, without the ORM's per-call overhead."""
    return session.connection().execute(stmt).scalar()


# Namespaces for transaction-scoped advisory locks (the first int of the two-int form).
LOCK_MASS_JOB = 0x6E62_0001


def lock_for_transaction(session: Session, namespace: int, key: int) -> None:
    """Serialise this transaction with any other that locks the same (namespace, key).

    Needed where two transactions each write one row and read the other's, which READ
    COMMITTED lets both miss. On SQLite every write transaction already runs alone
    (BEGIN IMMEDIATE), so there is nothing to do. A hash collision only costs a wait.
    """
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:ns, :key)"),
                     {"ns": namespace, "key": (key % 0xFFFF_FFFF) - 0x7FFF_FFFF})
