"""Alembic environment. :mod:`storage.schema` builds the configuration in code (there is no
alembic.ini) and hands over an open connection in ``config.attributes["connection"]``; the
caller owns that connection's transaction, so a whole upgrade commits or rolls back at once
(PostgreSQL; SQLite holds its write lock for the duration)."""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

from storage import models

config = context.config
target_metadata = SQLModel.metadata


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Autogenerate writes plain SQLAlchemy types, so revisions never import application code:
    ``UTCDateTime`` is a timezone-aware DateTime in the database, sqlmodel's ``AutoString`` a
    VARCHAR."""
    if type_ != "type":
        return False
    if isinstance(obj, models.UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if isinstance(obj, AutoString):
        return f"sa.String(length={obj.length})" if obj.length else "sa.String()"
    return False


def configure_options(dialect_name: str) -> dict[str, Any]:
    """Shared by migrations and by the test that compares the migrated schema to the models.
    SQLite alters tables by copying them (batch mode); types are compared, not just names."""
    return {
        "target_metadata": target_metadata,
        "render_as_batch": dialect_name == "sqlite",
        "render_item": render_item,
        "compare_type": True,
    }


def run_offline() -> None:
    """``alembic upgrade --sql``: the SQL for a URL's dialect, without connecting."""
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("offline migrations need config.attributes['url']")
    backend = str(url).split(":", 1)[0].split("+", 1)[0]
    context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"},
                      **configure_options(backend))
    with context.begin_transaction():
        context.run_migrations()


def run_online(connection: Connection) -> None:
    context.configure(connection=connection, **configure_options(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    if context.is_offline_mode():
        run_offline()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        run_online(connection)
        return
    # Reached only when somebody runs Alembic with a URL of their own.
    from storage.db import make_engine

    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: pass config.attributes['connection'] or ['url']")
    engine = make_engine(str(url), pooled=False)
    try:
        with engine.begin() as conn:
            run_online(conn)
    finally:
        engine.dispose()


main()
