"""`newsbot qr create|list`: parametric QR codes (verified 服务号). A follow through one carries
its scene, which `stats` credits with the follows, payers and revenue it brought (first touch).
Imported by ``bot.cli``, which registers the group on the root app."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import segno
import typer
from rich.table import Table

from bot.cli.base import (
    ConfigOpt,
    JsonOpt,
    _database,
    _dump,
    _fail,
    _header,
    _iso,
    _local,
    _settings,
    _when,
    _zone,
    app,
    err,
    out,
    whole_number,
)
from bot.wechat.api import (
    ERRCODE_QR_PERMANENT_LIMIT,
    ERRCODE_UNAUTHORIZED,
    QR_PERMANENT_LIMIT,
    QR_TEMPORARY_MAX_S,
    WeChatClient,
    WeChatError,
    check_qr_scene,
)
from storage import qr
from storage.db import transaction
from storage.models import utcnow

qr_app = typer.Typer(
    help="Parametric QR codes (verified 服务号 only): a follow through one is attributed to "
    "its scene, and `stats` shows the follows, payers and revenue of each scene.",
    no_args_is_help=True)
app.add_typer(qr_app, name="qr")

MAX_DAYS = QR_TEMPORARY_MAX_S // 86400  # 30
_FILE_SAFE = re.compile(r"[^A-Za-z0-9_-]")


@qr_app.command("create")
def qr_create(
    ctx: typer.Context,
    scene: Annotated[str, typer.Argument(
        metavar="SCENE",
        help="What the code is for (e.g. poster-2026-12): 1-64 characters, no spaces.")],
    days: Annotated[int | None, typer.Option(
        "--days", parser=whole_number(1), metavar="N",
        help=f"Days the code works: 1-{MAX_DAYS} (default {MAX_DAYS}, WeChat's longest).",
        show_default=False)] = None,
    permanent: Annotated[bool, typer.Option(
        "--permanent", help="A code that never expires. WeChat allows an account "
        f"{QR_PERMANENT_LIMIT:,} of them, ever.")] = False,
    out_file: Annotated[Path | None, typer.Option(
        "--out", metavar="FILE.png",
        help="Where to save the PNG (default: ./qr-SCENE.png).", show_default=False)] = None,
    config: ConfigOpt = None,
) -> None:
    """Create a QR code at WeChat and save it as a PNG.

    Temporary for 30 days unless --days or --permanent says otherwise. Following the account
    through it (or a follower scanning it) credits SCENE, first touch: a subscriber stays with
    the scene that brought them. No reward is given for following or sharing: WeChat's
    operating rules forbid it (诱导关注/诱导分享)."""
    problem = check_qr_scene(scene)
    if problem is not None:
        _fail(f"SCENE: {problem}; nothing created", 2)
    if permanent and days is not None:
        _fail("--days and --permanent exclude each other: a permanent code never expires", 2)
    if days is not None and days > MAX_DAYS:
        _fail(f"--days {days}: WeChat's temporary codes last at most {MAX_DAYS} days "
              "(use --permanent for one that never expires); nothing created", 2)
    path = out_file if out_file is not None else Path(f"qr-{_FILE_SAFE.sub('_', scene)}.png")
    if path.suffix.lower() != ".png":
        _fail(f"--out {path}: the file name must end in .png", 2)
    if not path.parent.is_dir():
        _fail(f"--out {path}: the folder {path.parent} does not exist; nothing created", 2)
    settings = _settings(ctx, config)
    problems = [p for p in settings.missing_secrets(need_api=True) if "wechat" in p]
    if problems:
        _fail("\n".join(problems), 2)
    zone = _zone(settings)
    expire_s = None if permanent else (days or MAX_DAYS) * 86400
    with _database(settings) as engine:
        if permanent:
            with transaction(engine) as s:
                made = qr.count_permanent(s)
            err.print(f"permanent codes made so far: {made:,} of WeChat's {QR_PERMANENT_LIMIT:,}"
                      " per account (they are never given back)", markup=False)
        now = utcnow()
        with WeChatClient(settings.wechat, engine) as client:
            try:
                ticket = client.create_qrcode(scene, expire_seconds=expire_s)
            except WeChatError as exc:
                _fail(_refusal(exc), 1)
        expires_at = (None if expire_s is None
                      else now + timedelta(seconds=ticket.expire_seconds or expire_s))
        try:
            # Drawn from the URL the code encodes: no download from WeChat needed.
            segno.make(ticket.url, error="m").save(str(path), scale=10, border=4)
        except OSError as exc:
            _fail(f"WeChat made the code ({ticket.url}) but {path} cannot be written: "
                  f"{exc.strerror or exc}; nothing stored", 1)
        with transaction(engine) as s:
            qr.add_code(s, scene=scene, ticket=ticket.ticket, url=ticket.url,
                        expires_at=expires_at, now=now)
    until = "never expires" if expires_at is None else f"expires {_when(expires_at, zone)}"
    out.print(f"saved {path}\nscene {scene}: {'permanent' if permanent else 'temporary'}, "
              f"{until}", markup=False, soft_wrap=True)


def _refusal(exc: WeChatError) -> str:
    if exc.errcode == ERRCODE_UNAUTHORIZED:
        return ("WeChat refused (48001): only a verified 服务号 may create QR codes; "
                "nothing created")
    if exc.errcode == ERRCODE_QR_PERMANENT_LIMIT:
        return (f"WeChat refused (45029): this account has used all its "
                f"{QR_PERMANENT_LIMIT:,} permanent codes; make temporary ones (--days)")
    return f"WeChat refused: {exc.errcode} {exc.errmsg}; nothing created"


@qr_app.command("list")
def qr_list(ctx: typer.Context, json_out: JsonOpt = False, config: ConfigOpt = None) -> None:
    """The QR codes made with `qr create`, newest first."""
    settings = _settings(ctx, config)
    zone = _zone(settings)
    now = utcnow()
    with _database(settings) as engine, transaction(engine) as s:
        codes = qr.list_codes(s)
    if json_out:
        _dump([{"scene": c.scene, "permanent": c.permanent,
                "expires_at": _iso(c.expires_at, zone), "created_at": _iso(c.created_at, zone),
                "expired": c.expires_at is not None and c.expires_at <= now,
                "url": c.url} for c in codes])
        return
    if not codes:
        out.print("no QR codes yet: `newsbot qr create SCENE`", markup=False)
        return
    table = Table()
    for column in ("scene", "kind", _header("expires", zone), _header("created", zone), "url"):
        table.add_column(column)
    for c in codes:
        expired = c.expires_at is not None and c.expires_at <= now
        table.add_row(c.scene, "permanent" if c.permanent else "temporary",
                      "never" if c.expires_at is None else
                      _local(c.expires_at, zone) + (" (expired)" if expired else ""),
                      _local(c.created_at, zone), c.url)
    out.print(table)
