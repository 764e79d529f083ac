"""The operator CLI (Typer + Rich), one module per command group. Each module registers its
commands on the root app of ``bot.cli.base``; importing them here assembles the program.

Exit codes: 0 done; 1 something was not found or did not check out (unknown issue or user, a
bad issue file, ledger mismatches, server unreachable); 2 the request itself is wrong (bad
configuration, missing secrets, a bad amount, a refused ledger write). Money commands never
write anything when they exit non-zero.
"""

from __future__ import annotations

from bot.cli import content, db, money, run, wechat
from bot.cli.base import app
from bot.logs import setup_logging

__all__ = ["app", "content", "db", "main", "money", "run", "wechat"]


def main() -> None:
    setup_logging("WARNING")
    app(prog_name="newsbot")
