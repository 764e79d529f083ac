"""Broadcast records, their batches, the mode-off notices and the weekly-run claims."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func
from sqlmodel import Session, col, select, update

from storage.models import (
    Broadcast,
    BroadcastBatch,
    IssueNotice,
    MassJobReport,
    Subscriber,
    WeeklyRun,
    utcnow,
)
from storage.sql import LOCK_MASS_JOB, insert_ignore, lock_for_transaction

# What the columns of a MASSSENDJOBFINISH report hold: msg_id is a signed BIGINT, the counts
# are INTEGER, the status a varchar(64). Larger values would fail on PostgreSQL only.
MAX_MSG_ID = 2**63 - 1
MAX_COUNT = 2**31 - 1
MAX_STATUS_CHARS = 64


def get_broadcast(session: Session, *, issue_number: int) -> Broadcast | None:
    return session.exec(select(Broadcast).where(Broadcast.issue_number == issue_number)).first()


def list_broadcasts(session: Session, *, limit: int = 20) -> list[Broadcast]:
    return list(session.exec(
        select(Broadcast).order_by(col(Broadcast.started_at).desc()).limit(limit)).all())


def create_broadcast(session: Session, *, issue_number: int, mode: str, text: str,
                     tag_id: int | None, forced: bool,
                     at: datetime | None = None) -> Broadcast | None:
    """The new record, or None if this issue already has one (unique per issue)."""
    inserted = insert_ignore(session, Broadcast, {
        "issue_number": issue_number, "mode": mode, "status": "sending", "text": text,
        "tag_id": tag_id, "forced": forced, "batches_sent": 0, "recipients": 0,
        "started_at": at or utcnow()})
    return get_broadcast(session, issue_number=issue_number) if inserted else None


def count_started_between(session: Session, *, mode: str, start: datetime, end: datetime) -> int:
    return int(session.exec(
        select(func.count()).select_from(Broadcast).where(
            Broadcast.mode == mode, col(Broadcast.started_at) >= start,
            col(Broadcast.started_at) < end)).one())


def batches(session: Session, *, broadcast_id: int) -> list[BroadcastBatch]:
    return list(session.exec(
        select(BroadcastBatch).where(BroadcastBatch.broadcast_id == broadcast_id)
        .order_by(col(BroadcastBatch.seq))).all())


def planned_batch(session: Session, *, broadcast_id: int) -> BroadcastBatch | None:
    return session.exec(
        select(BroadcastBatch).where(BroadcastBatch.broadcast_id == broadcast_id,
                                     BroadcastBatch.status == "planned")
        .order_by(col(BroadcastBatch.seq)).limit(1)).first()


def next_seq_and_cursor(session: Session, *, broadcast_id: int) -> tuple[int, int]:
    """(next batch number, last subscriber id already covered by a batch)."""
    row = session.exec(
        select(func.max(BroadcastBatch.seq), func.max(BroadcastBatch.last_subscriber_id))
        .where(BroadcastBatch.broadcast_id == broadcast_id)).one()
    return int(row[0] or 0) + 1, int(row[1] or 0)


def next_range(session: Session, *, after_id: int, batch_size: int) -> tuple[int, int] | None:
    """The id range of the next batch of active subscribers after ``after_id``. A lone
    subscriber is never left for a final batch: WeChat's mass/send needs at least two."""
    ids = list(session.exec(
        select(Subscriber.id).where(col(Subscriber.subscribed).is_(True),
                                    col(Subscriber.id) > after_id)
        .order_by(col(Subscriber.id)).limit(batch_size + 2)).all())
    if not ids:
        return None
    take = batch_size
    if len(ids) == batch_size + 1:
        take = batch_size - 1
    chosen = ids[:take]
    return int(chosen[0] or 0), int(chosen[-1] or 0)


def openids_in_range(session: Session, *, first_id: int, last_id: int) -> list[str]:
    return list(session.exec(
        select(Subscriber.openid).where(col(Subscriber.subscribed).is_(True),
                                        col(Subscriber.id) >= first_id,
                                        col(Subscriber.id) <= last_id)
        .order_by(col(Subscriber.id))).all())


def plan_batch(session: Session, *, broadcast_id: int, seq: int, clientmsgid: str,
               first_id: int | None, last_id: int | None) -> BroadcastBatch:
    batch = BroadcastBatch(broadcast_id=broadcast_id, seq=seq, clientmsgid=clientmsgid,
                           first_subscriber_id=first_id, last_subscriber_id=last_id)
    session.add(batch)
    session.flush()
    return batch


def confirm_batch(session: Session, *, batch_id: int, broadcast_id: int, msg_id: int | None,
                  msg_data_id: int | None, already_sent: bool, recipients: int) -> None:
    """Move the checkpoint: only called after WeChat accepted the batch."""
    if msg_id is not None:
        # WeChat's MASSSENDJOBFINISH may be stored by the webhook while this runs.
        lock_for_transaction(session, LOCK_MASS_JOB, msg_id)
    session.execute(update(BroadcastBatch).where(col(BroadcastBatch.id) == batch_id).values(
        status="sent", msg_id=msg_id, msg_data_id=msg_data_id, already_sent=already_sent,
        recipients=recipients, sent_at=utcnow()))
    session.execute(update(Broadcast).where(col(Broadcast.id) == broadcast_id).values(
        batches_sent=col(Broadcast.batches_sent) + 1,
        recipients=col(Broadcast.recipients) + recipients))
    if msg_id is not None:
        report = session.exec(select(MassJobReport).where(MassJobReport.msg_id == msg_id)).first()
        if report is not None:
            _apply_report(session, report)


def _apply_report(session: Session, report: MassJobReport) -> None:
    session.execute(update(BroadcastBatch).where(col(BroadcastBatch.msg_id) == report.msg_id)
                    .values(job_status=report.status, total_count=report.total_count,
                            filter_count=report.filter_count, sent_count=report.sent_count,
                            error_count=report.error_count, finished_at=report.received_at))


def finish_broadcast(session: Session, *, broadcast_id: int, status: str,
                     error: str | None = None) -> None:
    session.execute(update(Broadcast).where(col(Broadcast.id) == broadcast_id).values(
        status=status, error=error, finished_at=utcnow() if status == "done" else None))


def record_job_finish(session: Session, *, msg_id: int, status: str, total: int | None,
                      filtered: int | None, sent: int | None, errors: int | None) -> bool:
    """Store WeChat's MASSSENDJOBFINISH report; True when it is new."""
    # Without the lock, a batch confirmed concurrently and this report would each miss the other.
    lock_for_transaction(session, LOCK_MASS_JOB, msg_id)
    inserted = insert_ignore(session, MassJobReport, {
        "msg_id": msg_id, "status": status, "total_count": total, "filter_count": filtered,
        "sent_count": sent, "error_count": errors, "received_at": utcnow()})
    report = session.exec(select(MassJobReport).where(MassJobReport.msg_id == msg_id)).one()
    _apply_report(session, report)
    return inserted


def mark_notified(session: Session, *, openid: str, issue_number: int) -> bool:
    """True the first time only: the subscriber has now been told issue N is out."""
    return insert_ignore(session, IssueNotice, {"openid": openid, "issue_number": issue_number,
                                                "created_at": utcnow()})


def claim_weekly_run(session: Session, *, scheduled_for: datetime, runner: str) -> bool:
    return insert_ignore(session, WeeklyRun, {"scheduled_for": scheduled_for, "runner": runner,
                                              "status": "running", "started_at": utcnow()})


def finish_weekly_run(session: Session, *, scheduled_for: datetime, status: str,
                      published_issue: int | None, broadcast_issue: int | None,
                      note: str | None) -> None:
    session.execute(update(WeeklyRun).where(col(WeeklyRun.scheduled_for) == scheduled_for)
                    .values(status=status, published_issue=published_issue,
                            broadcast_issue=broadcast_issue, note=note, finished_at=utcnow()))


def recent_weekly_runs(session: Session, *, limit: int = 10) -> list[WeeklyRun]:
    return list(session.exec(
        select(WeeklyRun).order_by(col(WeeklyRun.scheduled_for).desc()).limit(limit)).all())
