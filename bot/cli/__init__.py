"""The operator CLI (Typer + Rich), one module per command group. Each module registers its
commands on the root app of ``bot.cli.base``; importing them here assembles the program.

Exit codes, the same for every command (README "CLI reference" has the same table):
0 done. 1 the command ran but the answer is no, or something outside the request failed: a
look-up found nothing (`issue show`, `user show`, `broadcast status N`, `code show`), `ledger
check` found differences, the database, the server or WeChat could not be reached or refused a
call (`reply` outside the 48-hour window too: the refused attempt is stored).
2 the request cannot be carried out as given, and nothing was written: a wrong argument or
option, bad configuration or missing secrets, a schema that needs `db upgrade`, a bad issue
file (every problem of every file is listed), or a write the stored data refuses (a bad amount,
an unknown subscriber, a reused idempotency key, an unknown issue to publish or broadcast, a
broadcast guard, a change to a sold issue without --force, a code batch the rules refuse, a
malformed or unknown code to revoke, an unknown pass to grant, nothing left to refund). Money
commands never write anything when they exit non-zero; an interrupted broadcast (exit 1) keeps
the batches WeChat accepted, for `broadcast resume`.
"""

from __future__ import annotations

from bot.cli import (
    codes,
    console,
    content,
    db,
    inbox,
    money,
    passes,
    pay,
    refunds,
    revenue,
    run,
    stats,
    wechat,
)
from bot.cli.base import app
from bot.logs import setup_logging

__all__ = ["app", "codes", "console", "content", "db", "inbox", "main", "money", "passes",
           "pay", "refunds", "revenue", "run", "stats", "wechat"]


def main() -> None:
    setup_logging("WARNING")
    app(prog_name="newsbot")
