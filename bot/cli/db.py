"""`newsbot db upgrade`: the database schema; `newsbot db purge`: delete what is no longer
needed (README "What is kept, and for how long")."""

from __future__ import annotations

from typing import Annotated

import typer
from sqlalchemy.exc import DBAPIError

from bot.cli.base import (
    ConfigOpt,
    JsonOpt,
    _database,
    _db_label,
    _dump,
    _engine,
    _fail,
    _settings,
    db_app,
    out,
)
from bot.jobs.purge import policy_for, run_purge
from storage import retention, schema


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


@db_app.command("purge")
def db_purge(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Count what would be deleted; delete nothing.")] = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Delete old delivery replies, code failures, inbox messages and ended console sessions
    now, as the scheduled job does every [retention] purge_every_minutes.

    Deletes [retention] purge_batch rows per statement, each in its own transaction, so a
    running webhook is not held up. Events, the ledger, unlocks and passes are never deleted."""
    settings = _settings(ctx, config)
    with _database(settings) as engine:
        try:
            counts = (retention.count_purgeable(engine, policy_for(settings)) if dry_run
                      else run_purge(settings, engine))
        except DBAPIError as exc:
            _fail(f"cannot purge {_db_label(settings)!r}: {exc.orig}", 1)
    if json_out:
        _dump({"dry_run": dry_run, "rows": counts})
        return
    verb = "would delete" if dry_run else "deleted"
    width = max(map(len, counts))
    for table, n in counts.items():
        out.print(f"{table:<{width}}  {n:>10,} rows {verb}", markup=False)
