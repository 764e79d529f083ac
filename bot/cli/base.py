"""What every CLI command group shares: the root Typer app, the consoles, the --config and
--json options, loading settings and opening the database.

Exit codes: the table in ``bot.cli``'s docstring (and README "CLI reference").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, time
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, NoReturn
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer
from rich.console import Console
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from bot.settings import ConfigNotFound, Settings, SettingsError, load_settings
from handlers.numbers import parse_int
from storage import ledger, schema
from storage.db import make_engine
from storage.issues import IssuePreview
from storage.models import LedgerEntry

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

app = typer.Typer(
    name="newsbot",
    help="WeChat newsletter bot: run the server, manage issues, users and tokens.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain Click help: Rich markup would eat "[server]"-style names and show flags as <bool>.
    rich_markup_mode=None,
    context_settings={"max_content_width": 100},
)
issue_app = typer.Typer(help="Import, list, show and publish issues.", no_args_is_help=True)
user_app = typer.Typer(help="Subscribers and their balances.", no_args_is_help=True)
ledger_app = typer.Typer(help="The token ledger.", no_args_is_help=True)
db_app = typer.Typer(
    help="The database schema. `serve` refuses to start unless the schema is current; the "
    "other commands set up a database that holds no newsbot tables yet (a first run) and "
    "refuse any other out-of-date schema. Run `newsbot db upgrade` after installing a new "
    "newsbot version.",
    short_help="The database schema: `db upgrade` after installing a new version.",
    no_args_is_help=True,
)
app.add_typer(issue_app, name="issue")
app.add_typer(user_app, name="user")
app.add_typer(ledger_app, name="ledger")
app.add_typer(db_app, name="db")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (default: $NEWSBOT_CONFIG, then "
                 "./config.toml).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

MAX_ABS_AMOUNT = ledger.MAX_ABS_AMOUNT  # the one bound on amounts, chat and CLI alike


def whole_number(minimum: int = 0) -> Callable[[str], int]:
    """A typer ``parser``: a whole number in ASCII or full-width digits, as in chat and reader
    URLs (click's INT would take "+3", " 3", "3_0" and any script's digits)."""

    def parse(value: str | int) -> int:
        if isinstance(value, int):  # a default
            return value
        number = parse_int(value)
        if number is None:
            raise typer.BadParameter(f"{value!r} is not a whole number (digits 0-9 only)")
        if number < minimum:
            raise typer.BadParameter(f"{number} is below the minimum {minimum}")
        return number

    return parse


WHOLE_NUMBER = whole_number()


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


# --------------------------------------------------------------------------- helpers

# The CLI's keys live in a namespace of their own, so no key given here can ever be the key of a
# chat action (wechat:OPENID:MSGID) and block it, or find its result.
CLI_KEY_PREFIX = "cli:"
_MAX_KEY_CHARS = LedgerEntry.__table__.c.idempotency_key.type.length  # type: ignore[attr-defined]


def cli_key(given: str, *, reserve: int = 0) -> str:
    """The stored key for ``--key``: ``X`` becomes ``cli:X``; a key the CLI printed (already
    ``cli:…``) is itself, so it can be given back as it was printed. ``reserve``: characters
    the command appends to it (one key per row it writes)."""
    key = given if given.startswith(CLI_KEY_PREFIX) else CLI_KEY_PREFIX + given
    if len(key) > _MAX_KEY_CHARS - reserve:
        _fail(f"--key is too long (at most {_MAX_KEY_CHARS - reserve - len(CLI_KEY_PREFIX)} "
              "characters); nothing written", 2)
    return key


def _fail(message: str, code: int) -> NoReturn:
    err.print(message, style="red", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def version() -> str:
    """The installed distribution's version, else (run from a checkout) the package's own."""
    try:
        return metadata.version("newsbot")
    except metadata.PackageNotFoundError:
        import bot

        return bot.__version__


def _print_version(value: bool) -> None:
    if value:
        out.print(f"newsbot {version()}", markup=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    ctx: typer.Context,
    config: ConfigOpt = None,
    _version: Annotated[bool, typer.Option(
        "--version", help="Print the version and exit.", is_eager=True,
        callback=_print_version)] = False,
) -> None:
    """WeChat newsletter bot: run the server, manage issues, users and tokens."""
    ctx.obj = {"config": config}


def _config_path(ctx: typer.Context, config: Path | None) -> Path | None:
    if config is not None:
        return config
    root = ctx.find_root().obj
    return root.get("config") if isinstance(root, dict) else None


def _settings(ctx: typer.Context, config: Path | None,
              overrides: dict[str, Any] | None = None, *, no_config_hint: str = "") -> Settings:
    """The settings, or exit 2 saying what is wrong: a command never runs on defaults alone
    (they would create ./newsbot.db wherever it was started)."""
    try:
        return load_settings(_config_path(ctx, config), overrides=overrides)
    except ConfigNotFound as exc:
        _fail(f"{exc}\n{no_config_hint}" if no_config_hint else str(exc), 2)
    except SettingsError as exc:
        _fail(str(exc), 2)


def _db_label(settings: Settings) -> str:
    return make_url(settings.database.url).render_as_string(hide_password=True)


def _engine(settings: Settings) -> Engine:
    try:
        return make_engine(settings.database.url)
    except OSError as exc:  # a SQLite file whose folder cannot be made
        _fail(f"cannot open the database {_db_label(settings)!r}: {exc.strerror or exc}", 1)


@contextmanager
def _database(settings: Settings, *, set_up_empty: bool = True) -> Iterator[Engine]:
    """The configured database, which must be at the current schema revision (exit 2 with
    the `newsbot db upgrade` hint otherwise). A database with no newsbot tables at all is what
    a first run finds: unless ``set_up_empty`` is false (``serve``), it is upgraded here."""
    engine = _engine(settings)
    try:
        try:
            if set_up_empty and schema.is_empty(engine):
                schema.upgrade(engine)
                err.print(f"new database: created the schema (revision "
                          f"{schema.head_revision()})", style="dim", markup=False)
            schema.check_current(engine)
        except schema.SchemaError as exc:  # out of date, or tables that cannot be adopted
            _fail(f"{_db_label(settings)}: {exc}", 2)
        except DBAPIError as exc:
            _fail(f"cannot open the database {_db_label(settings)!r}: {exc.orig}", 1)
        yield engine
    finally:
        engine.dispose()


# Times the operator reads are in [broadcast] timezone, the zone the weekly job runs in, and
# always say so: a table names the zone in its header, a sentence after the time. JSON gives
# ISO 8601 with that zone's offset.


def _zone(settings: Settings) -> ZoneInfo:
    try:
        return ZoneInfo(settings.broadcast.timezone)
    except (ZoneInfoNotFoundError, ValueError):  # the settings validator rules this out
        return ZoneInfo("UTC")


def _since(raw: str | None, zone: ZoneInfo) -> datetime | None:
    """``--since DATE``: the start of that day in ``zone``, or exit 2 saying what to give."""
    if raw is None:
        return None
    try:
        day = date.fromisoformat(raw.strip())
    except ValueError:
        _fail(f"--since must be a date like 2026-12-01, got {raw!r}", 2)
    return datetime.combine(day, time(0), tzinfo=zone)


def _iso(dt: datetime | None, zone: ZoneInfo) -> str | None:
    return None if dt is None else dt.astimezone(zone).isoformat(timespec="seconds")


def _local(dt: datetime | None, zone: ZoneInfo, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """For a table column whose header carries the zone (see ``_header``)."""
    return "" if dt is None else dt.astimezone(zone).strftime(fmt)


def _header(name: str, zone: ZoneInfo) -> str:
    return f"{name} ({zone.key})"


def _when(dt: datetime | None, zone: ZoneInfo, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """A time in a sentence: 2026-11-30 08:00 (Asia/Shanghai)."""
    return "" if dt is None else f"{_local(dt, zone, fmt)} ({zone.key})"


def _plural(n: int, word: str, plural: str | None = None) -> str:
    """``1 batch``, ``2 batches``: a count and its noun, in agreement."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _status(issue: IssuePreview, now: datetime) -> str:
    if issue.published_at is None:
        return "draft"
    return "published" if issue.published_at <= now else "scheduled"


def _dump(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))
