"""The dashboard (the console's first page)."""

from __future__ import annotations

from bot.console.core import Console, ConsoleRequest, esc
from storage import subscribers


def install(console: Console) -> None:
    @console.page("/", title="概览", nav="概览", order=10)
    def dashboard(req: ConsoleRequest) -> str:
        with req.reading() as session:
            followers = subscribers.count_subscribers(session, active_only=True)
        return f"<p>关注者 <strong>{esc(followers)}</strong></p>"
