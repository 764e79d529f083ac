"""The weekly push: one broadcast record per issue, sent in batches whose checkpoint moves only
after WeChat confirmed them.

Each batch is *planned* (its subscriber-id range and clientmsgid stored) before the call and
*confirmed* after it. A process killed in between leaves a planned batch; resuming re-sends that
same range with the same clientmsgid, and WeChat answers 45065 ("already sent") instead of
delivering twice. WeChat keeps clientmsgids for 24 hours, so resume an interrupted broadcast
within a day. Subscribers are read from the database batch by batch, never all at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from bot.settings import Settings
from bot.wechat.api import MassSendResult, WeChatError
from handlers.format import broadcast_text
from storage import broadcasts, issues, subscribers
from storage.db import transaction
from storage.errors import BroadcastRefused, UnknownIssue
from storage.issues import IssuePreview
from storage.models import Broadcast, utcnow

log = logging.getLogger("newsbot.broadcast")


class Messenger(Protocol):
    """The part of the WeChat client a broadcast needs."""

    def send_all_text(self, content: str, *, tag_id: int | None = None,
                      clientmsgid: str | None = None) -> MassSendResult: ...

    def send_to_openids_text(self, openids: Sequence[str], content: str, *,
                             clientmsgid: str | None = None) -> MassSendResult: ...

    def preview_text(self, openid: str, content: str) -> None: ...


@dataclass(frozen=True)
class Progress:
    batch: int
    recipients: int  # confirmed so far
    total: int  # active subscribers when the broadcast started (openids mode)


@dataclass(frozen=True)
class Plan:
    issue: IssuePreview
    mode: str
    text: str
    recipients: int  # active subscribers (openids mode) or -1 for "all followers" (sendall)
    batches: int


def clientmsgid(broadcast: Broadcast, seq: int) -> str:
    """Stable per broadcast and batch, so a resend hits WeChat's 24-hour duplicate check."""
    return f"newsbot-{broadcast.issue_number}-{broadcast.id}-{seq}"


class Broadcaster:
    def __init__(self, settings: Settings, engine: Engine, messenger: Messenger, *,
                 now: Callable[[], datetime] = utcnow,
                 on_progress: Callable[[Progress], None] | None = None) -> None:
        self.settings = settings
        self.cfg = settings.broadcast
        self.engine = engine
        self.messenger = messenger
        self.now = now
        self.on_progress = on_progress
        self.tz = ZoneInfo(self.cfg.timezone)

    # --- planning and guards ---

    def _issue(self, number: int) -> IssuePreview:
        with transaction(self.engine) as s:
            return issues.get_issue(s, number=number, include_drafts=True,
                                    default_free_percent=self.settings.content.free_percent)

    def plan(self, number: int) -> Plan:
        issue = self._issue(number)
        text = broadcast_text(issue, unit=self.settings.tokens.name,
                              publication=self.settings.content.publication)
        if self.cfg.mode == "openids":
            with transaction(self.engine) as s:
                count = subscribers.count_subscribers(s, active_only=True)
            size = self.cfg.batch_size
            return Plan(issue, "openids", text, count, (count + size - 1) // size if count else 0)
        return Plan(issue, self.cfg.mode, text, -1, 1 if self.cfg.mode == "sendall" else 0)

    def _local_bounds(self, unit: str) -> tuple[datetime, datetime]:
        local = self.now().astimezone(self.tz)
        if unit == "day":
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
            end = start + timedelta(days=1)
        else:
            start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            end = (start + timedelta(days=32)).replace(day=1)
        return start, end

    def check(self, number: int, *, force: bool = False, resume: bool = False,
              preview: bool = False) -> None:
        """Raise what start, resume or preview would refuse with (UnknownIssue or
        BroadcastRefused) without sending anything, so a caller can say so before it draws
        progress."""
        if preview:
            self._preview_openids()
            self._issue(number)
        elif resume:
            self._resumable(number)
        else:
            self._check_guards(number, force=force)

    def _check_guards(self, number: int, *, force: bool) -> None:
        if self.cfg.mode == "off":
            raise BroadcastRefused(
                "[broadcast] mode is \"off\": nothing is pushed; subscribers see a 新一期已发布 "
                "note on their next reply. Set mode to \"sendall\" or \"openids\" to push.")
        issue = self._issue(number)
        if issue.published_at is None or issue.published_at > self.now():
            raise BroadcastRefused(
                f"issue {number} is not published yet: run `newsbot issue publish {number}` "
                "first, or let the weekly job publish it")
        with transaction(self.engine) as s:
            existing = broadcasts.get_broadcast(s, issue_number=issue.number)
            if existing is not None:
                raise BroadcastRefused(describe_refusal(existing, self.tz))
            if self.cfg.mode == "sendall":
                start, end = self._local_bounds("day")
                if broadcasts.count_started_between(s, mode="sendall", start=start, end=end):
                    raise BroadcastRefused(
                        "a sendall broadcast already went out today "
                        f"({start.date()} {self.cfg.timezone}); WeChat allows one per day")
            else:
                start, end = self._local_bounds("month")
                used = broadcasts.count_started_between(s, mode="openids", start=start, end=end)
                if used >= self.cfg.monthly_cap and not force:
                    raise BroadcastRefused(
                        f"{used} broadcasts this month already reach [broadcast] monthly_cap = "
                        f"{self.cfg.monthly_cap} (WeChat delivers at most 4 per follower per "
                        "calendar month); use --force to send anyway")

    # --- sending ---

    def start(self, number: int, *, force: bool = False) -> Broadcast:
        """Create the broadcast record for a published issue and send it."""
        self._check_guards(number, force=force)
        plan = self.plan(number)
        with transaction(self.engine) as s:
            record = broadcasts.create_broadcast(
                s, issue_number=number, mode=self.cfg.mode, text=plan.text,
                tag_id=self.cfg.tag_id, forced=force, at=self.now())
        if record is None:  # another process created it between the guard and here
            with transaction(self.engine) as s:
                existing = broadcasts.get_broadcast(s, issue_number=number)
            assert existing is not None
            raise BroadcastRefused(describe_refusal(existing, self.tz))
        log.info("broadcast of issue %s started (%s)", number, record.mode)
        return self._run(record)

    def _resumable(self, number: int) -> Broadcast:
        with transaction(self.engine) as s:
            record = broadcasts.get_broadcast(s, issue_number=number)
        if record is None:
            raise BroadcastRefused(f"issue {number} has no broadcast to resume; start one with "
                                   f"`newsbot broadcast {number}`")
        if record.status == "done":
            raise BroadcastRefused(describe_refusal(record, self.tz))
        return record

    def resume(self, number: int) -> Broadcast:
        record = self._resumable(number)
        log.info("broadcast of issue %s resumed after %s batches", number, record.batches_sent)
        return self._run(record)

    def _run(self, record: Broadcast) -> Broadcast:
        assert record.id is not None
        try:
            if record.mode == "sendall":
                self._send_all(record)
            else:
                self._send_batches(record)
        except WeChatError as exc:
            with transaction(self.engine) as s:
                broadcasts.finish_broadcast(s, broadcast_id=record.id, status="failed",
                                            error=f"{exc.errcode}: {exc.errmsg}")
            log.error("broadcast of issue %s failed: %s %s", record.issue_number, exc.errcode,
                      exc.errmsg)
            raise
        with transaction(self.engine) as s:
            broadcasts.finish_broadcast(s, broadcast_id=record.id, status="done")
            final = broadcasts.get_broadcast(s, issue_number=record.issue_number)
        assert final is not None
        log.info("broadcast of issue %s done: %s batches, %s recipients", final.issue_number,
                 final.batches_sent, final.recipients)
        return final

    def _send_all(self, record: Broadcast) -> None:
        assert record.id is not None
        with transaction(self.engine) as s:
            done = [b for b in broadcasts.batches(s, broadcast_id=record.id) if b.status == "sent"]
            if done:
                return
            batch = broadcasts.planned_batch(s, broadcast_id=record.id) or broadcasts.plan_batch(
                s, broadcast_id=record.id, seq=1, clientmsgid=clientmsgid(record, 1),
                first_id=None, last_id=None)
        result = self.messenger.send_all_text(record.text, tag_id=record.tag_id,
                                              clientmsgid=batch.clientmsgid)
        assert batch.id is not None
        with transaction(self.engine) as s:
            broadcasts.confirm_batch(s, batch_id=batch.id, broadcast_id=record.id,
                                     msg_id=result.msg_id or None, msg_data_id=result.msg_data_id,
                                     already_sent=result.already_sent, recipients=0)
        self._progress(1, 0, 0)

    def _send_batches(self, record: Broadcast) -> None:
        assert record.id is not None
        with transaction(self.engine) as s:
            total = subscribers.count_subscribers(s, active_only=True)
        while True:
            with transaction(self.engine) as s:
                batch = broadcasts.planned_batch(s, broadcast_id=record.id)
                if batch is None:
                    seq, cursor = broadcasts.next_seq_and_cursor(s, broadcast_id=record.id)
                    span = broadcasts.next_range(s, after_id=cursor,
                                                 batch_size=self.cfg.batch_size)
                    if span is None:
                        return
                    batch = broadcasts.plan_batch(s, broadcast_id=record.id, seq=seq,
                                                  clientmsgid=clientmsgid(record, seq),
                                                  first_id=span[0], last_id=span[1])
            assert batch.id is not None and batch.first_subscriber_id is not None
            assert batch.last_subscriber_id is not None
            with transaction(self.engine) as s:
                openids = broadcasts.openids_in_range(s, first_id=batch.first_subscriber_id,
                                                      last_id=batch.last_subscriber_id)
            result: MassSendResult | None = None
            if len(openids) >= 2:
                result = self.messenger.send_to_openids_text(openids, record.text,
                                                             clientmsgid=batch.clientmsgid)
            elif openids:
                log.warning("batch %s of issue %s has a single recipient; WeChat's mass send "
                            "needs two, skipped", batch.seq, record.issue_number)
            with transaction(self.engine) as s:
                broadcasts.confirm_batch(
                    s, batch_id=batch.id, broadcast_id=record.id,
                    msg_id=(result.msg_id or None) if result else None,
                    msg_data_id=result.msg_data_id if result else None,
                    already_sent=bool(result and result.already_sent),
                    recipients=len(openids) if result else 0)
                current = broadcasts.get_broadcast(s, issue_number=record.issue_number)
            assert current is not None
            self._progress(batch.seq, current.recipients, total)

    def _progress(self, batch: int, recipients: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(batch, recipients, total))

    def preview(self, number: int) -> list[str]:
        """Send the broadcast text to ``preview_openids`` via mass/preview."""
        openids = self._preview_openids()
        text = self.plan(number).text
        for openid in openids:
            self.messenger.preview_text(openid, text)
        return openids

    def _preview_openids(self) -> list[str]:
        if not self.cfg.preview_openids:
            raise BroadcastRefused("[broadcast] preview_openids is empty: add your own openid")
        return list(self.cfg.preview_openids)


def describe_refusal(record: Broadcast, zone: ZoneInfo) -> str:
    """Why an issue cannot be broadcast again, its start time in ``zone`` (the configured one)."""
    when = f"{record.started_at.astimezone(zone):%Y-%m-%d %H:%M} ({zone.key})"
    batches = f"{record.batches_sent} batch{'' if record.batches_sent == 1 else 'es'}"
    recipients = f"{record.recipients} recipient{'' if record.recipients == 1 else 's'}"
    if record.status == "done":
        return (f"issue {record.issue_number} was already broadcast ({record.mode}, started "
                f"{when}, {batches}, {recipients}); see `newsbot broadcast status`")
    return (f"issue {record.issue_number} has an unfinished broadcast ({record.status}, started "
            f"{when}, {batches} confirmed); continue it with "
            f"`newsbot broadcast resume {record.issue_number}`")


__all__ = ["Broadcaster", "Messenger", "Plan", "Progress", "UnknownIssue", "describe_refusal"]
