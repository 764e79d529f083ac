"""The scheduled purge (every ``[retention] purge_every_minutes``) and ``newsbot db purge``:
storage.retention with the settings that say how long each kind of row is needed."""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import Engine

from bot.settings import Settings
from storage import retention

log = logging.getLogger("newsbot.purge")


def policy_for(settings: Settings) -> retention.Policy:
    return retention.Policy(
        replies_hours=settings.retention.replies_hours,
        max_clock_skew_s=settings.server.max_clock_skew_s,
        failure_window_minutes=settings.codes.failure_window_minutes,
        inbox_keep_days=settings.inbox.keep_days,
        console_link_minutes=settings.console.link_minutes,
        batch=settings.retention.purge_batch,
    )


def run_purge(settings: Settings, engine: Engine, *,
              now: datetime | None = None) -> dict[str, int]:
    """Purge once; every table's count is logged when anything went."""
    deleted = retention.purge(engine, policy_for(settings), now=now)
    if any(deleted.values()):
        log.info("purged %s", " ".join(f"{t}={n}" for t, n in deleted.items()))
    return deleted
