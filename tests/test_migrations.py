"""Schema migrations: the migrated schema is exactly the models' on SQLite and PostgreSQL,
`newsbot db upgrade` is idempotent and adopts pre-migration databases, and `newsbot serve`
refuses a database whose schema is not current."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    CheckConstraint,
    Column,
    Engine,
    Index,
    MetaData,
    String,
    UniqueConstraint,
    inspect,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel
from typer.testing import CliRunner

from bot.cli import app
from storage import schema
from storage.db import create_schema, make_engine, transaction
from storage.models import LedgerEntry, Subscriber
from tests.conftest import ROOT, TOKEN, postgres_schema

HEAD = schema.head_revision()
TABLES = set(SQLModel.metadata.tables)


@pytest.fixture(params=["sqlite", "postgresql"])
def two_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two empty databases of one backend (PostgreSQL: two schemas; skipped without it)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
        return
    admin = request.getfixturevalue("pg_admin")
    with postgres_schema(admin) as a, postgres_schema(admin) as b:
        yield a, b


@pytest.fixture
def engines(two_urls: tuple[str, str]) -> Iterator[tuple[Engine, Engine]]:
    a, b = make_engine(two_urls[0]), make_engine(two_urls[1])
    yield a, b
    a.dispose()
    b.dispose()


def _sql(value: Any) -> str:
    return re.sub(r"[\s()\"]", "", str(value)).lower()


def create_pre_migration_schema(engine: Engine) -> None:
    """What newsbot did before migrations existed: the baseline's tables, from the models."""
    baseline = schema._baseline_columns()
    # The models as they were then: columns added by later revisions left out.
    then = MetaData()
    for table in SQLModel.metadata.sorted_tables:
        if table.name in baseline:
            old = table.to_metadata(then)
            for column in list(old.columns):
                if column.name not in baseline[table.name]:
                    old._columns.remove(column)
    then.create_all(engine)


def model_diff(engine: Engine, metadata: MetaData = SQLModel.metadata) -> list[Any]:
    """Alembic's autogenerate comparison (tables, columns with types and nullability, server
    defaults, indexes, unique constraints), plus what it leaves out: unique constraints the
    models lack (unnamed ones are skipped on SQLite) and CHECK constraints."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                     "compare_server_default": True})
        diffs: list[Any] = list(compare_metadata(ctx, metadata))
        insp = inspect(conn)
        for name, table in sorted(metadata.tables.items()):
            if not insp.has_table(name):
                continue  # reported above
            uniques = {tuple(c.columns.keys()) for c in table.constraints
                       if isinstance(c, UniqueConstraint)}
            db_uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints(name)}
            if uniques != db_uniques:
                diffs.append(("unique constraints", name, sorted(uniques), sorted(db_uniques)))
            checks = {(c.name, _sql(c.sqltext)) for c in table.constraints
                      if isinstance(c, CheckConstraint)}
            db_checks = {(c["name"], _sql(c["sqltext"]))
                         for c in insp.get_check_constraints(name)}
            if checks != db_checks:
                diffs.append(("check constraints", name, sorted(checks), sorted(db_checks)))
    return diffs


def described(engine: Engine) -> dict[str, Any]:
    """Everything the inspector reports about our tables, in comparable form: what autogenerate
    leaves out (CHECK constraints, primary keys, foreign keys) included."""
    insp = inspect(engine)
    out: dict[str, Any] = {}
    for table in sorted(set(insp.get_table_names()) - {schema.VERSION_TABLE}):
        out[table] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"], c.get("default"))
                        for c in insp.get_columns(table)],
            "pk": insp.get_pk_constraint(table)["constrained_columns"],
            "fks": insp.get_foreign_keys(table),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in insp.get_indexes(table)),
            "uniques": sorted(tuple(u["column_names"])
                              for u in insp.get_unique_constraints(table)),
            "checks": sorted((c["name"], _sql(c["sqltext"]))
                             for c in insp.get_check_constraints(table)),
        }
    return out


# --------------------------------------------------------------------------- the schema


def test_upgrade_from_empty_gives_exactly_the_models_schema(
        engines: tuple[Engine, Engine]) -> None:
    migrated, created = engines
    assert schema.is_empty(migrated) and schema.current_revision(migrated) is None
    schema.upgrade(migrated)
    assert schema.current_revision(migrated) == HEAD and schema.is_current(migrated)
    assert set(inspect(migrated).get_table_names()) == TABLES | {schema.VERSION_TABLE}

    assert model_diff(migrated) == []
    # The tests build their databases with create_all: it must give the very same schema.
    create_schema(created)
    assert described(migrated) == described(created)

    checks = described(migrated)
    assert [c[0] for c in checks["subscriber"]["checks"]] == ["ck_subscriber_balance_nonneg"]
    assert [c[0] for c in checks["ledger_entry"]["checks"]] == [
        "ck_ledger_balance_after_nonneg"]
    assert ("ix_ledger_openid_id", ("openid", "id"), False) in checks["ledger_entry"]["indexes"]


def test_migrated_database_enforces_the_check_constraints(
        engines: tuple[Engine, Engine]) -> None:
    engine = engines[0]
    schema.upgrade(engine)
    with pytest.raises(IntegrityError), transaction(engine) as s:
        s.add(Subscriber(openid="o_neg", balance=-1))
    with pytest.raises(IntegrityError), transaction(engine) as s:
        s.add(LedgerEntry(openid="o_neg", amount=-1, kind="adjust", idempotency_key="k",
                          balance_after=-1))
    with transaction(engine) as s:
        s.add(Subscriber(openid="o_zero", balance=0))


def _mutated(change: str) -> MetaData:
    md = MetaData()
    for table in SQLModel.metadata.sorted_tables:
        table.to_metadata(md)
    sub = md.tables["subscriber"]
    if change == "type":
        sub.c.openid.type = String(length=65)
    elif change == "nullable":
        sub.c.subscribed_at.nullable = False
    elif change == "index":
        sub.indexes.discard(next(i for i in sub.indexes if i.name == "ix_subscriber_subscribed"))
    elif change == "new_index":
        Index("ix_subscriber_balance", sub.c.balance)
    elif change == "unique":
        ledger = md.tables["ledger_entry"]
        ledger.constraints = {c for c in ledger.constraints if not (
            isinstance(c, UniqueConstraint) and list(c.columns.keys()) == ["idempotency_key"])}
    elif change == "new_unique":
        UniqueConstraint(sub.c.openid, sub.c.balance)
    elif change == "check":
        next(c for c in sub.constraints if isinstance(c, CheckConstraint)).sqltext = text(
            "balance > 0")
    elif change == "no_check":
        sub.constraints = {c for c in sub.constraints if not isinstance(c, CheckConstraint)}
    elif change == "column":
        sub.append_column(Column("nickname", String(40), nullable=True))
    elif change == "integer":
        sub.c.balance.type = String(length=10)
    return md


@pytest.mark.parametrize("change", ["type", "nullable", "index", "new_index", "unique",
                                    "new_unique", "check", "no_check", "column", "integer"])
def test_the_comparison_sees_differences(tmp_path: Path, change: str) -> None:
    """The model check is not vacuous: each kind of drift is reported."""
    engine = make_engine(f"sqlite:///{tmp_path}/drift.db")
    try:
        schema.upgrade(engine)
        assert model_diff(engine) == []
        assert model_diff(engine, _mutated(change)) != []
    finally:
        engine.dispose()


def test_autogenerate_finds_nothing_to_migrate(tmp_path: Path) -> None:
    """What a developer gets from `new_revision` while the models are unchanged: an empty
    script numbered after the head."""
    migrations = tmp_path / "migrations"
    shutil.copytree(schema.MIGRATIONS, migrations,
                    ignore=shutil.ignore_patterns("__pycache__"))
    path = schema.new_revision("nothing changed", migrations=migrations)
    code = path.read_text(encoding="utf-8")
    assert path.name == f"{int(HEAD) + 1:04d}_nothing_changed.py"
    assert f"down_revision: str | None = {HEAD!r}" in code
    upgrade_body = code.split("def upgrade() -> None:", 1)[1].split("def downgrade", 1)[0]
    assert "op." not in upgrade_body, upgrade_body


# --------------------------------------------------------------------------- upgrade


def test_concurrent_upgrades_of_an_empty_database(db_url: str) -> None:
    errors: list[BaseException] = []

    def go() -> None:
        engine = make_engine(db_url, pooled=False)
        try:
            schema.upgrade(engine)
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine = make_engine(db_url)
    try:
        assert schema.is_current(engine) and model_diff(engine) == []
    finally:
        engine.dispose()


def test_a_pre_migration_database_is_adopted_with_its_data(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        create_pre_migration_schema(engine)
        with transaction(engine) as s:  # the columns of then: the model has grown since
            s.connection().execute(text(
                "INSERT INTO subscriber (openid, subscribed, balance, created_at)"
                " VALUES ('o_kept', true, 7, '2024-01-01 00:00:00+00:00')"))
        with pytest.raises(schema.SchemaOutOfDate) as refused:
            schema.check_current(engine)
        assert refused.value.state == "unversioned"
        assert "newsbot db upgrade" in str(refused.value)

        schema.upgrade(engine)
        assert schema.is_current(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT balance FROM subscriber")).scalar_one() == 7
    finally:
        engine.dispose()


def test_unknown_tables_are_not_adopted(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE subscriber (id INTEGER PRIMARY KEY, openid TEXT)"))
        assert not schema.is_empty(engine)
        with pytest.raises(schema.SchemaMismatch, match=r"column subscriber\.balance is missing"):
            schema.upgrade(engine)
        # Nothing was written: still no revision, no other table.
        assert schema.current_revision(engine) is None
        assert set(inspect(engine).get_table_names()) == {"subscriber"}
    finally:
        engine.dispose()


def test_tables_of_other_applications_do_not_count(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE someone_else (id INTEGER PRIMARY KEY)"))
        assert schema.is_empty(engine)
        schema.upgrade(engine)
        assert schema.is_current(engine)
    finally:
        engine.dispose()


def _set_revision(engine: Engine, revision: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})


def test_a_database_from_a_newer_newsbot_is_refused(engine: Engine) -> None:
    _set_revision(engine, "9999")
    with pytest.raises(schema.SchemaOutOfDate) as refused:
        schema.check_current(engine)
    assert refused.value.state == "unknown" and "newer newsbot" in str(refused.value)
    with pytest.raises(schema.SchemaOutOfDate):
        schema.upgrade(engine)
    assert schema.current_revision(engine) == "9999"


def test_several_recorded_revisions_are_refused(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {schema.VERSION_TABLE} VALUES ('elsewhere')"))
    with pytest.raises(schema.SchemaError, match="several revisions"):
        schema.check_current(engine)
    with pytest.raises(schema.SchemaError, match="several revisions"):
        schema.upgrade(engine)


# --------------------------------------------------------------------------- the CLI


def write_config(path: Path, db_url: str) -> Path:
    path.write_text(f'[wechat]\ntoken = "{TOKEN}"\n[reader]\nsecret = "migrations-secret-0123'
                    f'456789"\n[database]\nurl = "{db_url}"\n', encoding="utf-8")
    return path


@pytest.fixture
def config(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("NEWSBOT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return write_config(tmp_path / "config.toml", db_url)


def newsbot(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSBOT_")}
    env |= {"PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], capture_output=True,
                          text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)


def test_serve_refuses_an_empty_database(config: Path, db_url: str) -> None:
    proc = newsbot("serve", "--config", str(config))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no newsbot schema yet" in proc.stderr and "newsbot db upgrade" in proc.stderr
    engine = make_engine(db_url)
    try:
        assert schema.is_empty(engine)  # serve changed nothing
    finally:
        engine.dispose()


def test_serve_refuses_an_out_of_date_database(config: Path, engine: Engine) -> None:
    with engine.begin() as conn:  # as if created before migrations existed
        conn.execute(text(f"DROP TABLE {schema.VERSION_TABLE}"))
    proc = newsbot("serve", "--config", str(config))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "before schema migrations" in proc.stderr and "newsbot db upgrade" in proc.stderr


def test_db_upgrade_is_idempotent(config: Path, db_url: str) -> None:
    runner = CliRunner()
    first = runner.invoke(app, ["db", "upgrade", "--config", str(config)])
    assert first.exit_code == 0, first.output
    assert f"upgraded empty → {HEAD}" in first.stdout
    again = runner.invoke(app, ["db", "upgrade", "--config", str(config)])
    assert again.exit_code == 0, again.output
    assert f"already at revision {HEAD}, nothing to do" in again.stdout
    engine = make_engine(db_url)
    try:
        assert schema.is_current(engine) and model_diff(engine) == []
    finally:
        engine.dispose()


def test_db_upgrade_adopts_then_serve_accepts(config: Path, db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        create_pre_migration_schema(engine)
    finally:
        engine.dispose()
    result = CliRunner().invoke(app, ["db", "upgrade", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert f"no revision (made before migrations) → {HEAD}" in result.stdout
    listed = CliRunner().invoke(app, ["user", "list", "--config", str(config)])
    assert listed.exit_code == 0, listed.output


def test_db_upgrade_refuses_a_newer_database(config: Path, engine: Engine) -> None:
    _set_revision(engine, "9999")
    result = CliRunner().invoke(app, ["db", "upgrade", "--config", str(config)])
    assert result.exit_code == 2
    assert "newer newsbot" in result.stderr


def test_other_commands_set_up_an_empty_database(config: Path, db_url: str) -> None:
    result = CliRunner().invoke(app, ["user", "list", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert f"created the schema (revision {HEAD})" in result.stderr
    engine = make_engine(db_url)
    try:
        assert schema.is_current(engine)
    finally:
        engine.dispose()


def test_other_commands_refuse_an_out_of_date_database(config: Path, db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        create_pre_migration_schema(engine)
    finally:
        engine.dispose()
    for args in (["user", "list"], ["ledger", "check"], ["issue", "list"]):
        result = CliRunner().invoke(app, [*args, "--config", str(config)])
        assert result.exit_code == 2, (args, result.output)
        assert "newsbot db upgrade" in result.stderr


def test_cannot_open_the_database_exits_1(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-directory.db").mkdir()
    cfg = write_config(tmp_path / "bad.toml", f"sqlite:///{tmp_path / 'a-directory.db'}")
    for args in (["db", "upgrade"], ["user", "list"]):
        result = CliRunner().invoke(app, [*args, "--config", str(cfg)])
        assert result.exit_code == 1, (args, result.output)
        assert "cannot open the database" in result.stderr


def test_migrations_ship_with_the_package() -> None:
    """pyproject's package data covers everything Alembic needs at runtime."""
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = data["tool"]["setuptools"]["package-data"]["storage"]
    storage = ROOT / "storage"
    needed = {p.relative_to(storage) for p in schema.MIGRATIONS.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    shipped = {p.relative_to(storage) for pattern in patterns for p in storage.glob(pattern)}
    assert needed and needed <= shipped, needed - shipped
    assert (schema.MIGRATIONS / "script.py.mako").is_file()

