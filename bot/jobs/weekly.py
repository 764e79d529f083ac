"""The weekly job: publish the next draft, then push the current issue if it has not been."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from bot.jobs.broadcast import Broadcaster, Messenger
from bot.settings import Settings
from storage import broadcasts, issues
from storage.db import transaction
from storage.models import utcnow

log = logging.getLogger("newsbot.scheduler")


@dataclass(frozen=True)
class WeeklyOutcome:
    published: int | None
    broadcast: int | None
    note: str


def runner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_weekly_job(settings: Settings, engine: Engine, *, scheduled_for: datetime,
                   messenger_factory: Callable[[], Messenger],
                   now: Callable[[], datetime] = utcnow) -> WeeklyOutcome | None:
    """Run the job for one scheduled time; None when another process or an earlier fire
    already claimed it."""
    with transaction(engine) as s:
        if not broadcasts.claim_weekly_run(s, scheduled_for=scheduled_for, runner=runner_name()):
            log.info("weekly job for %s already claimed elsewhere; skipping", scheduled_for)
            return None
    published: int | None = None
    pushed: int | None = None
    try:
        with transaction(engine) as s:
            draft = issues.lowest_draft_number(s)
            if draft is not None:
                issues.publish_issue(s, number=draft, at=now())
                published = draft
            current = issues.current_issue(
                s, default_free_percent=settings.content.free_percent, now=now())
            existing = (broadcasts.get_broadcast(s, issue_number=current.number)
                        if current is not None else None)
        if published is not None:
            log.info("weekly job published issue %s", published)
        note = "nothing to broadcast"
        if settings.broadcast.mode == "off":
            note = "broadcast mode off: subscribers get a 新一期已发布 note on their next reply"
        elif current is not None and (existing is None or existing.status != "done"):
            messenger = messenger_factory()
            try:
                broadcaster = Broadcaster(settings, engine, messenger, now=now)
                if existing is None:
                    broadcaster.start(current.number)
                else:
                    broadcaster.resume(current.number)
            finally:
                close = getattr(messenger, "close", None)
                if close is not None:
                    close()
            pushed = current.number
            note = f"broadcast issue {current.number}"
        elif current is not None:
            note = f"issue {current.number} was already broadcast"
    except Exception as exc:
        log.exception("weekly job for %s failed", scheduled_for)
        with transaction(engine) as s:
            broadcasts.finish_weekly_run(s, scheduled_for=scheduled_for, status="failed",
                                         published_issue=published, broadcast_issue=pushed,
                                         note=f"{type(exc).__name__}: {exc}")
        raise
    with transaction(engine) as s:
        broadcasts.finish_weekly_run(s, scheduled_for=scheduled_for, status="done",
                                     published_issue=published, broadcast_issue=pushed,
                                     note=note)
    log.info("weekly job for %s done: %s", scheduled_for, note)
    return WeeklyOutcome(published, pushed, note)
