"""APScheduler 3 with an explicit timezone around the weekly job (and, with [pay], the
minutely WeChat Pay sync: bot.jobs.pay_sync; and the purge of old rows: bot.jobs.purge).

Each fire time is claimed with a unique row (``weekly_run``), so any number of processes may
run the scheduler: exactly one of them does the work. A fire missed while every process was down
is caught up at start-up if it is within ``misfire_grace_s``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Engine

from bot.jobs.broadcast import Messenger
from bot.jobs.inbox_notice import InboxNoticeJob
from bot.jobs.pay_sync import PaySyncJob
from bot.jobs.purge import run_purge
from bot.jobs.weekly import run_weekly_job
from bot.settings import Settings, cron_fields
from bot.wechat.api import WeChatClient
from bot.wechat.reply import CustomSender
from storage import stats
from storage.db import transaction
from storage.models import utcnow

log = logging.getLogger("newsbot.scheduler")

JOB_ID = "weekly"
PAY_SYNC_JOB_ID = "pay-sync"
PAY_SYNC_EVERY_S = 60
INBOX_NOTICE_JOB_ID = "inbox-notice"
INBOX_NOTICE_EVERY_S = 60  # how often it looks; the notice itself waits notify_every_minutes
PURGE_JOB_ID = "purge"
STATS_ROLLUP_JOB_ID = "stats-rollup"
STATS_ROLLUP_EVERY_S = 60


def weekly_trigger(settings: Settings) -> CronTrigger:
    return CronTrigger(**cron_fields(settings.broadcast.cron),
                       timezone=ZoneInfo(settings.broadcast.timezone))


def latest_fire_time(trigger: CronTrigger, now: datetime,
                     lookback: timedelta) -> datetime | None:
    """The most recent scheduled time in (now - lookback, now], if any."""
    t: datetime | None = trigger.get_next_fire_time(None, now - lookback)
    last = None
    while t is not None and t <= now:
        last = t
        t = trigger.get_next_fire_time(t, t + timedelta(microseconds=1))
    return last


class WeeklyScheduler:
    def __init__(self, settings: Settings, engine: Engine,
                 messenger_factory: Callable[[], Messenger], *, blocking: bool = False,
                 now: Callable[[], datetime] = utcnow,
                 notice_sender: Callable[[], CustomSender] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.messenger_factory = messenger_factory
        self.now = now
        self.trigger = weekly_trigger(settings)
        tz = ZoneInfo(settings.broadcast.timezone)
        self.scheduler: BaseScheduler = (BlockingScheduler if blocking else BackgroundScheduler)(
            timezone=tz)
        self.scheduler.add_listener(self._on_error, EVENT_JOB_ERROR)
        self.scheduler.add_job(self.fire, self.trigger, id=JOB_ID, coalesce=True,
                               max_instances=1,
                               misfire_grace_time=settings.broadcast.misfire_grace_s)
        # [pay]: orders whose notification did not come are asked about every minute.
        self.pay_sync = PaySyncJob(settings, engine) if settings.pay is not None else None
        if self.pay_sync is not None:
            self.scheduler.add_job(self.run_pay_sync, "interval", seconds=PAY_SYNC_EVERY_S,
                                   id=PAY_SYNC_JOB_ID, coalesce=True, max_instances=1)
        # [operators]: a chat notice of new inbox messages (it needs the API's app secret).
        self.inbox_notice = (
            InboxNoticeJob(settings, engine, notice_sender or (
                lambda: WeChatClient(settings.wechat, engine)), now=now)
            if settings.operators.openids and not settings.missing_secrets(need_api=True)
            else None)
        if self.inbox_notice is not None:
            self.scheduler.add_job(self.run_inbox_notice, "interval",
                                   seconds=INBOX_NOTICE_EVERY_S, id=INBOX_NOTICE_JOB_ID,
                                   coalesce=True, max_instances=1)
        self.scheduler.add_job(self.run_purge, "interval",
                               minutes=settings.retention.purge_every_minutes,
                               id=PURGE_JOB_ID, coalesce=True, max_instances=1)

        # Stats: fold new events into the distinct-reader pairs (storage.stats.roll_up), so
        # `newsbot stats` and the console's dashboard count pairs, not a million events.
        self.scheduler.add_job(self.run_stats_rollup, "interval", seconds=STATS_ROLLUP_EVERY_S,
                               id=STATS_ROLLUP_JOB_ID, coalesce=True, max_instances=1)

    def _on_error(self, event: JobExecutionEvent) -> None:
        log.error("scheduled job %s raised %r", event.job_id, event.exception)

    def fire(self) -> None:
        """Called by APScheduler at the cron time: run for the fire time just passed."""
        grace = timedelta(seconds=self.settings.broadcast.misfire_grace_s)
        scheduled = latest_fire_time(self.trigger, self.now(), grace)
        if scheduled is None:
            log.warning("weekly job fired with no scheduled time within the grace period")
            return
        self.run_for(scheduled)

    def run_for(self, scheduled: datetime) -> None:
        # Failures are logged with their traceback by the job; keep the scheduler alive.
        with contextlib.suppress(Exception):
            run_weekly_job(self.settings, self.engine, scheduled_for=scheduled,
                           messenger_factory=self.messenger_factory, now=self.now)

    def run_pay_sync(self) -> None:
        if self.pay_sync is None:
            return
        try:
            self.pay_sync.run()
        except Exception:  # logged; the next minute tries again
            log.exception("pay sync job failed")

    def run_stats_rollup(self) -> None:
        try:
            with transaction(self.engine) as session:
                added = stats.roll_up(session, timezone=self.settings.broadcast.timezone)
            log.debug("stats rollup: %d new pairs", added)
        except Exception:  # logged; the next minute tries again
            log.exception("stats rollup job failed")

    def run_inbox_notice(self) -> None:
        if self.inbox_notice is None:
            return
        try:
            self.inbox_notice.run()
        except Exception:  # logged; the next minute tries again
            log.exception("inbox notice job failed")
    def run_purge(self) -> None:
        try:
            run_purge(self.settings, self.engine, now=self.now())
        except Exception:  # logged; the next run deletes what this one left
            log.exception("purge job failed")

    def catch_up(self) -> None:
        """Run a fire missed while the process was down (within the grace time)."""
        grace = timedelta(seconds=self.settings.broadcast.misfire_grace_s)
        scheduled = latest_fire_time(self.trigger, self.now(), grace)
        if scheduled is not None:
            log.info("catching up the weekly job scheduled for %s", scheduled)
            self.run_for(scheduled)

    def next_fire_time(self) -> datetime | None:
        job = self.scheduler.get_job(JOB_ID)
        if job is None:
            return None
        upcoming: datetime | None = (
            job.next_run_time if self.scheduler.running
            else self.trigger.get_next_fire_time(None, self.now()))
        return upcoming

    def start(self) -> None:
        log.info("scheduler started: cron %r %s, next run %s", self.settings.broadcast.cron,
                 self.settings.broadcast.timezone, self.next_fire_time())
        # The catch-up runs as a one-off job on the scheduler's own thread: a long broadcast
        # must not hold up the gunicorn master (and so the webhook) while it starts.
        self.scheduler.add_job(self.catch_up, id="catch-up")
        self.scheduler.start()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self.pay_sync is not None:
            self.pay_sync.close()
