"""Redemption codes: `code create/list/show/revoke/frozen`.

`code create` writes its codes once, to a CSV: only their HMACs stay in the database. The CSV
goes to a temporary file beside --out first and is moved into place only after the batch is
committed, so a failure leaves neither a batch without its file nor a file of codes that do
not exist.
"""

from __future__ import annotations

import csv
import getpass
import os
import tempfile
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer
from rich.table import Table
from rich.text import Text

from bot.cli.base import (
    ConfigOpt,
    JsonOpt,
    _database,
    _dump,
    _fail,
    _header,
    _iso,
    _local,
    _plural,
    _settings,
    _when,
    _zone,
    app,
    out,
    whole_number,
)
from bot.settings import ENV_PREFIX, Settings
from handlers.numbers import parse_int
from storage import codes
from storage.codes import BatchKind, BatchSummary, CodeInfo
from storage.db import transaction
from storage.models import CodeBatch, utcnow

code_app = typer.Typer(help="Redemption codes (兑换码): create batches, look up, revoke; see "
                       "who is frozen for guessing.", no_args_is_help=True)
app.add_typer(code_app, name="code")


def _secret(settings: Settings) -> bytes:
    if not settings.codes.enabled:
        _fail(f"codes are off: set [codes] secret (at least 16 random characters) in the "
              f"config file or ${ENV_PREFIX}CODES__SECRET; nothing written", 2)
    return settings.codes.secret.encode()


def _grants(batch: CodeBatch, unit: str = "tokens") -> str:
    if batch.kind == "tokens":
        return f"{batch.tokens} {unit}"
    if batch.kind == "issue":
        return f"issue {batch.issue_number}"
    return f"pass {batch.pass_id} ({batch.pass_days} days)"


def _end_of_day(raw: str, zone: ZoneInfo) -> datetime:
    """--expires YYYY-MM-DD: the code works until the end of that day in [broadcast] timezone."""
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        _fail(f"--expires must be a date like 2026-12-31, got {raw!r}; nothing written", 2)
    if len(raw) != 10:
        _fail(f"--expires must be a date like 2026-12-31, got {raw!r}; nothing written", 2)
    return datetime.combine(day + timedelta(days=1), time(), tzinfo=zone)


def _check_out(path: Path) -> None:
    if path.exists():
        _fail(f"{path} exists: codes are written once, to a new file; nothing written", 2)
    if not path.parent.is_dir():
        _fail(f"no folder {path.parent} for --out; nothing written", 2)


def _write_csv(path: Path, codes_: list[str], batch: CodeBatch, zone: ZoneInfo) -> Path:
    """The CSV in a temporary file beside ``path`` (same file system, so it can be linked)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    grants = (f"tokens:{batch.tokens}" if batch.kind == "tokens"
              else f"issue:{batch.issue_number}" if batch.kind == "issue"
              else f"pass:{batch.pass_id}")
    expires = _iso(batch.expires_at, zone) or ""
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["code", "batch", "grants", "expires"])
            writer.writerows([c, batch.id, grants, expires] for c in codes_)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


@code_app.command("create")
def code_create(
    ctx: typer.Context,
    count: Annotated[int, typer.Option("--count", parser=whole_number(),
                                       help=f"How many codes (1 to {codes.MAX_COUNT:,}).",
                                       show_default=False)],
    out_file: Annotated[Path, typer.Option("--out", help="New CSV file for the codes "
                                           "(code,batch,grants,expires); never overwritten.",
                                           show_default=False)],
    tokens: Annotated[int | None, typer.Option("--tokens", parser=whole_number(),
                                               help="Each code credits this many tokens.")]
    = None,
    issue: Annotated[int | None, typer.Option("--issue", parser=whole_number(),
                                              help="Each code unlocks this issue.")] = None,
    pass_id: Annotated[str | None, typer.Option("--pass", help="Each code grants this pass "
                                                "(an id from [[passes]]).")] = None,
    expires: Annotated[str | None, typer.Option(
        "--expires", help="Last day the codes work (YYYY-MM-DD, to the end of that day in "
        "[broadcast] timezone).")] = None,
    label: Annotated[str, typer.Option("--label", help="A note for operators (where the "
                                       "batch is sold).")] = "",
    uses: Annotated[int, typer.Option("--uses", parser=whole_number(1),
                                      help="Distinct subscribers per code (a conference "
                                      "code).")] = 1,
    config: ConfigOpt = None,
) -> None:
    """Create one batch of codes and write them, once, to --out."""
    settings = _settings(ctx, config)
    secret = _secret(settings)
    zone = _zone(settings)
    given = [name for name, v in (("--tokens", tokens), ("--issue", issue), ("--pass", pass_id))
             if v is not None]
    if len(given) != 1:
        _fail("give exactly one of --tokens, --issue, --pass "
              f"({'none' if not given else ' and '.join(given)} given); nothing written", 2)
    if not 1 <= count <= codes.MAX_COUNT:
        _fail(f"--count must be between 1 and {codes.MAX_COUNT:,}, got {count:,}; "
              "nothing written", 2)
    if tokens is not None and not 1 <= tokens <= settings.tokens.max_topup:
        _fail(f"--tokens must be between 1 and {settings.tokens.max_topup:,} ([tokens] "
              f"max_topup), got {tokens:,}; nothing written", 2)
    offer = None
    if pass_id is not None:
        offer = settings.pass_by_id(pass_id)
        if offer is None:
            known = ", ".join(p.id for p in settings.passes) or "none configured"
            _fail(f"no pass {pass_id!r} in [[passes]] (known: {known}); nothing written", 2)
    expires_at = _end_of_day(expires, zone) if expires is not None else None
    if expires_at is not None and expires_at <= utcnow():
        _fail(f"--expires {expires} is in the past; nothing written", 2)
    _check_out(out_file)
    kind: BatchKind = ("tokens" if tokens is not None else "issue" if issue is not None
                       else "pass")
    tmp: Path | None = None
    committed = False
    try:
        with _database(settings) as engine, transaction(engine) as session:
            try:
                made = codes.create_batch(
                    session, secret=secret, kind=kind, count=count, uses=uses, tokens=tokens,
                    issue_number=issue, pass_id=pass_id,
                    pass_days=offer.days if offer is not None else None,
                    expires_at=expires_at, label=label, created_by=f"cli:{_os_user()}")
            except codes.InvalidBatch as exc:
                _fail(f"{exc}; nothing written", 2)
            tmp = _write_csv(out_file, made.codes, made.batch, zone)
        committed = True
    finally:
        if tmp is not None and not committed:
            tmp.unlink(missing_ok=True)
    assert tmp is not None
    try:  # a link never replaces a file that appeared meanwhile, as a rename would
        os.link(tmp, out_file)
    except OSError as exc:
        _fail(f"batch #{made.batch.id} was created but {out_file} could not be written "
              f"({exc.strerror or exc}); its codes are in {tmp}", 1)
    tmp.unlink()
    batch = made.batch
    expiry = f", until {_when(batch.expires_at, zone)}" if batch.expires_at else ""
    each = f", each for {_plural(uses, 'subscriber')}" if uses > 1 else ""
    out.print(f"batch #{batch.id}: {_plural(count, 'code')} granting "
              f"{_grants(batch, settings.tokens.name)}{each}{expiry}, written to {out_file}",
              markup=False, soft_wrap=True)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def _summary_json(s: BatchSummary, zone: ZoneInfo, now: datetime) -> dict[str, Any]:
    b = s.batch
    return {
        "batch": b.id, "kind": b.kind, "tokens": b.tokens, "issue_number": b.issue_number,
        "pass_id": b.pass_id, "pass_days": b.pass_days, "count": b.count, "uses": b.uses,
        "label": b.label, "gift_of": b.giver, "created_at": _iso(b.created_at, zone),
        "created_by": b.created_by, "expires_at": _iso(b.expires_at, zone),
        "expired": s.expired(now), "revoked_at": _iso(b.revoked_at, zone),
        "redeemed": s.redeemed, "codes_used": s.codes_used, "codes_revoked": s.codes_revoked,
        "tokens_granted": s.tokens_granted,
    }


@code_app.command("list")
def code_list(ctx: typer.Context, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every batch (gifts too): what it grants, how many codes were redeemed, revoked,
    whether it expired, and the tokens it granted."""
    settings = _settings(ctx, config)
    with _database(settings) as engine, transaction(engine) as session:
        found = codes.list_batches(session)
    zone, now = _zone(settings), utcnow()
    if as_json:
        _dump([_summary_json(s, zone, now) for s in found])
        return
    table = Table("batch", _header("created", zone), "grants", "codes", "redeemed", "revoked",
                  _header("expires", zone), "tokens granted", "label")
    for s in found:
        b = s.batch
        expires = _local(b.expires_at, zone) + (" (expired)" if s.expired(now) else "")
        table.add_row(str(b.id), _local(b.created_at, zone), _grants(b, settings.tokens.name),
                      f"{b.count:,}" + (f" × {b.uses}" if b.uses > 1 else ""),
                      f"{s.redeemed:,}", "all" if b.revoked_at else f"{s.codes_revoked:,}",
                      expires or "never", f"{s.tokens_granted:,}",
                      Text(b.label + (f" (gift of {b.giver})" if b.giver else "")))
    out.print(table)
    out.print(_plural(len(found), "batch", "batches"), markup=False)


def _batch_id(raw: str) -> int | None:
    number = parse_int(raw.removeprefix("#"))
    return number if number is not None and len(raw) <= 10 else None


def _code_json(info: CodeInfo, zone: ZoneInfo) -> dict[str, Any]:
    return {"batch": info.batch.id, "uses": info.uses, "used": info.used,
            "revoked_at": _iso(info.revoked_at or info.batch.revoked_at, zone),
            "expires_at": _iso(info.batch.expires_at, zone),
            "redeemed_by": [{"openid": o, "at": _iso(t, zone)} for o, t in info.redeemed_by]}


def _canonical_or_fail(raw: str) -> str:
    code = codes.canonical(raw)
    if code is None:
        _fail(f"{raw!r} is not a code: 16 symbols of {codes.ALPHABET} (dashes and spaces "
              "allowed); nothing done", 2)
    if not codes.check_ok(code):
        _fail(f"{raw!r} fails its check symbol: a symbol is mistyped; nothing done", 2)
    return code


@code_app.command("show")
def code_show(
    ctx: typer.Context,
    which: Annotated[str, typer.Argument(metavar="CODE_OR_BATCH")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One batch (by number) or one code: what it grants, its uses, and who redeemed it."""
    settings = _settings(ctx, config)
    zone, now = _zone(settings), utcnow()
    batch_id = _batch_id(which)
    if batch_id is not None:
        with _database(settings) as engine, transaction(engine) as session:
            summary = codes.batch_summary(session, batch_id=batch_id)
        if summary is None:
            _fail(f"no batch #{batch_id}", 1)
        if as_json:
            _dump(_summary_json(summary, zone, now))
            return
        b = summary.batch
        state = ("revoked " + _when(b.revoked_at, zone) if b.revoked_at
                 else "expired" if summary.expired(now) else "active")
        out.print(f"batch #{b.id} ({state}): {_plural(b.count, 'code')} granting "
                  f"{_grants(b, settings.tokens.name)}, {b.uses} use(s) each; created "
                  f"{_when(b.created_at, zone)} by {b.created_by or '?'}; expires "
                  f"{_when(b.expires_at, zone) or 'never'}; redeemed {summary.redeemed:,} of "
                  f"{summary.capacity:,}; codes revoked {summary.codes_revoked:,}; tokens "
                  f"granted {summary.tokens_granted:,}"
                  + (f"; label {b.label!r}" if b.label else "")
                  + (f"; gift of {b.giver}" if b.giver else ""), markup=False, soft_wrap=True)
        return
    code = _canonical_or_fail(which)
    secret = _secret(settings)
    with _database(settings) as engine, transaction(engine) as session:
        info = codes.find_code(session, secret=secret, code=code)
    if info is None:
        _fail(f"no code {codes.display(code)}", 1)
    if as_json:
        _dump({"code": codes.display(code), **_code_json(info, zone)})
        return
    revoked = info.revoked_at or info.batch.revoked_at
    out.print(f"{codes.display(code)}: batch #{info.batch.id}, grants "
              f"{_grants(info.batch, settings.tokens.name)}; used {info.used} of {info.uses}"
              + (f"; revoked {_when(revoked, zone)}" if revoked else "")
              + (f"; expires {_when(info.batch.expires_at, zone)}"
                 if info.batch.expires_at else ""), markup=False, soft_wrap=True)
    for openid, at in info.redeemed_by:
        out.print(f"  redeemed by {openid} at {_when(at, zone)}", markup=False)


@code_app.command("revoke")
def code_revoke(
    ctx: typer.Context,
    code: Annotated[str | None, typer.Argument(metavar="CODE", show_default=False)] = None,
    batch: Annotated[str | None, typer.Option("--batch", help="Revoke every code of this "
                                              "batch instead.", show_default=False)] = None,
    config: ConfigOpt = None,
) -> None:
    """Stop a code (or a whole batch) from being redeemed; uses already made stay made."""
    settings = _settings(ctx, config)
    zone = _zone(settings)
    if (code is None) == (batch is None):
        _fail("give a CODE or --batch BATCH (one of them); nothing written", 2)
    if batch is not None:
        batch_id = _batch_id(batch)
        if batch_id is None:
            _fail(f"--batch takes a batch number, got {batch!r}; nothing written", 2)
        with _database(settings) as engine, transaction(engine) as session:
            before = session.get(CodeBatch, batch_id)
            was_revoked = before is not None and before.revoked_at is not None
            done = codes.revoke_batch(session, batch_id=batch_id)
        if done is None:
            _fail(f"no batch #{batch_id}; nothing written", 2)
        if was_revoked:
            out.print(f"batch #{batch_id} was already revoked at {_when(done.revoked_at, zone)}"
                      "; nothing changed", markup=False)
        else:
            out.print(f"batch #{batch_id} revoked: its {_plural(done.count, 'code')} can no "
                      "longer be redeemed", markup=False)
        return
    assert code is not None
    canonical = _canonical_or_fail(code)
    secret = _secret(settings)
    with _database(settings) as engine, transaction(engine) as session:
        found = codes.find_code(session, secret=secret, code=canonical)
        info = codes.revoke_code(session, secret=secret, code=canonical)
    if info is None or found is None:
        _fail(f"no code {codes.display(canonical)}; nothing written", 2)
    if found.revoked_at is not None:
        out.print(f"{codes.display(canonical)} was already revoked at "
                  f"{_when(found.revoked_at, zone)}; nothing changed", markup=False)
    else:
        out.print(f"{codes.display(canonical)} revoked (batch #{info.batch.id}; used "
                  f"{info.used} of {info.uses})", markup=False)


@code_app.command("frozen")
def code_frozen(ctx: typer.Context, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Subscribers whose code attempts are refused for now (too many failed attempts)."""
    settings = _settings(ctx, config)
    with _database(settings) as engine, transaction(engine) as session:
        rows = codes.frozen(session)
    zone = _zone(settings)
    if as_json:
        _dump([{"openid": f.openid, "since": _iso(f.since, zone), "until": _iso(f.until, zone),
                "failures": f.failures} for f in rows])
        return
    table = Table("openid", _header("since", zone), _header("until", zone), "failures")
    for f in rows:
        table.add_row(Text(f.openid), _local(f.since, zone), _local(f.until, zone),
                      str(f.failures))
    out.print(table)
    out.print(f"{_plural(len(rows), 'subscriber')} frozen", markup=False)
