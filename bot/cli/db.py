"""`newsbot db upgrade`: the database schema."""

from __future__ import annotations

import typer
from sqlalchemy.exc import DBAPIError

from bot.cli.base import (
    ConfigOpt,
    _db_label,
    _engine,
    _fail,
    _settings,
    db_app,
    out,
)
from storage import schema


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Bring the database to the current schema revision (a no-op when it is there).

    Creates the tables in an empty database, adopts one made before migrations existed and
    applies newer migrations, in one transaction. Run it after installing a new newsbot, before
    `serve`."""
    settings = _settings(ctx, config)
    label = _db_label(settings)
    engine = _engine(settings)
    try:
        before = schema.current_revision(engine)
        empty = before is None and schema.is_empty(engine)
        schema.upgrade(engine)
        after = schema.current_revision(engine)
    except schema.SchemaError as exc:
        _fail(f"{label}: {exc}", 2)
    except DBAPIError as exc:
        _fail(f"cannot open the database {label!r}: {exc.orig}", 1)
    finally:
        engine.dispose()
    if before == after:
        out.print(f"{label}: already at revision {after}, nothing to do", markup=False,
                  soft_wrap=True)
        return
    start = before or ("empty" if empty else "no revision (made before migrations)")
    out.print(f"{label}: upgraded {start} → {after}", markup=False, soft_wrap=True)
