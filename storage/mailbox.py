"""The inbox: free text subscribers send that no command takes, the operators' replies beside
it, and the notices telling operators that something new came in. (storage.inbox is another
thing: the de-duplication of WeChat's deliveries.)

Every message is stored under its delivery's key, so a delivery stores at most one message
however often it arrives. A reply goes out as a customer-service message, which WeChat only
delivers inside a window opened by the subscriber (``window``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from sqlalchemy import Integer, func, select, update
from sqlmodel import Session

from storage import events
from storage.models import Event, InboundMessage, InboxMessage, InboxNotice, InboxReply, Subscriber
from storage.sql import insert_ignore

Kind = Literal["text", "human"]
KINDS: Final = ("text", "human")
# WeChat delivers a customer-service message for 48 hours after the subscriber's last message
# (or payment); what else opens it opens it for less (shared/wechat-platform.md §5), so this
# is an upper bound and WeChat's 45015 has the last word.
WINDOW: Final = timedelta(hours=48)
# sending: written before the call, so a crash in the middle leaves a trace; sent; refused: we
# or WeChat refused it (``error`` says why); failed: WeChat could not be reached.
ReplyStatus = Literal["sending", "sent", "refused", "failed"]

_MSG = InboxMessage.__table__  # type: ignore[attr-defined]
_REPLY = InboxReply.__table__  # type: ignore[attr-defined]
_NOTICE = InboxNotice.__table__  # type: ignore[attr-defined]
_EVENT = Event.__table__  # type: ignore[attr-defined]
_INBOUND = InboundMessage.__table__  # type: ignore[attr-defined]
_SUB = Subscriber.__table__  # type: ignore[attr-defined]
_ERROR_CHARS: Final = _REPLY.c.error.type.length
_INT = Integer()  # booleans summed as 0/1


def store(session: Session, *, openid: str, text: str, kind: Kind, key: str, at: datetime,
          max_chars: int, read: bool = False) -> bool:
    """Keep one message (cut to ``max_chars``) and its INBOX event; True when stored by this
    call, False when this delivery's message is already there. ``read``: stored as read
    (a courtesy like 谢谢 needs no answer and no notice)."""
    if kind not in KINDS:
        raise ValueError(f"unknown inbox message kind {kind!r}")
    stored = insert_ignore(session, InboxMessage, {
        "openid": openid, "at": at, "kind": kind, "text": text[:max_chars],
        "dedupe_key": key[:_MSG.c.dedupe_key.type.length], "read_at": at if read else None})
    if stored:
        events.record(session, events.INBOX, openid=openid, at=at, detail=kind)
    return stored


@dataclass(frozen=True)
class Reply:
    id: int
    openid: str
    message_id: int | None
    text: str
    operator: str
    at: datetime
    status: str
    error: str | None


@dataclass(frozen=True)
class Message:
    id: int
    openid: str
    at: datetime
    kind: str
    text: str
    read_at: datetime | None
    answered_at: datetime | None
    replies: tuple[Reply, ...] = ()  # the replies that answered it (message_id), oldest first


def _message(row: Any, replies: tuple[Reply, ...] = ()) -> Message:
    return Message(row.id, row.openid, row.at, row.kind, row.text, row.read_at,
                   row.answered_at, replies)


def _reply(row: Any) -> Reply:
    return Reply(row.id, row.openid, row.message_id, row.text, row.operator, row.at,
                 row.status, row.error)


def messages(session: Session, *, unread: bool = False, openid: str | None = None,
             limit: int = 200) -> list[Message]:
    """Newest first, each with the replies stored beside it."""
    stmt = select(_MSG).order_by(_MSG.c.id.desc()).limit(limit)
    if unread:
        stmt = stmt.where(_MSG.c.read_at.is_(None))
    if openid is not None:
        stmt = stmt.where(_MSG.c.openid == openid)
    rows = session.connection().execute(stmt).all()
    by_message: dict[int, list[Reply]] = {}
    if rows:
        found = session.connection().execute(
            select(_REPLY).where(_REPLY.c.message_id.in_([r.id for r in rows]))
            .order_by(_REPLY.c.id)).all()
        for r in found:
            by_message.setdefault(r.message_id, []).append(_reply(r))
    return [_message(r, tuple(by_message.get(r.id, ()))) for r in rows]


@dataclass(frozen=True)
class Thread:
    """One subscriber's conversation, oldest first: messages and replies interleaved."""

    openid: str
    items: tuple[Message | Reply, ...]
    unread: int


def thread(session: Session, *, openid: str, limit: int = 500) -> Thread:
    conn = session.connection()
    msgs = conn.execute(select(_MSG).where(_MSG.c.openid == openid)
                        .order_by(_MSG.c.id.desc()).limit(limit)).all()
    replies = conn.execute(select(_REPLY).where(_REPLY.c.openid == openid)
                           .order_by(_REPLY.c.id.desc()).limit(limit)).all()
    items: list[Message | Reply] = [_message(m) for m in msgs] + [_reply(r) for r in replies]
    # A reply sits after the message it answered, even when their clocks disagree.
    items.sort(key=lambda i: (i.at, isinstance(i, Reply)))
    return Thread(openid, tuple(items), sum(1 for m in msgs if m.read_at is None))


@dataclass(frozen=True)
class ThreadSummary:
    openid: str
    last_at: datetime
    last_text: str
    messages: int
    unread: int
    unanswered: int
    human: bool  # asked for a person and not answered yet


def threads(session: Session, *, limit: int = 100) -> list[ThreadSummary]:
    """One line per subscriber who wrote: those with unread messages first, then newest."""
    unread = func.sum(_MSG.c.read_at.is_(None).cast(_INT))
    unanswered = func.sum(_MSG.c.answered_at.is_(None).cast(_INT))
    human = func.max(((_MSG.c.kind == "human") & _MSG.c.answered_at.is_(None)).cast(_INT))
    last_id = func.max(_MSG.c.id)
    grouped = (select(_MSG.c.openid, last_id.label("last_id"), func.count().label("n"),
                      unread.label("unread"), unanswered.label("unanswered"),
                      human.label("human"))
               .group_by(_MSG.c.openid)
               .order_by((unread > 0).desc(), last_id.desc()).limit(limit)).subquery()
    rows = session.connection().execute(
        select(grouped, _MSG.c.at, _MSG.c.text).join(_MSG, _MSG.c.id == grouped.c.last_id)
        .order_by((grouped.c.unread > 0).desc(), grouped.c.last_id.desc())).all()
    return [ThreadSummary(r.openid, r.at, r.text, int(r.n), int(r.unread or 0),
                          int(r.unanswered or 0), bool(r.human)) for r in rows]


def mark_read(session: Session, *, openid: str, now: datetime,
              up_to: int | None = None) -> int:
    """Mark this subscriber's unread messages (up to message ``up_to``) read; how many."""
    stmt = (update(_MSG).where(_MSG.c.openid == openid, _MSG.c.read_at.is_(None))
            .values(read_at=now))
    if up_to is not None:
        stmt = stmt.where(_MSG.c.id <= up_to)
    return int(session.connection().execute(stmt).rowcount or 0)


def unread_count(session: Session) -> int:
    return int(session.connection().execute(
        select(func.count()).select_from(_MSG).where(_MSG.c.read_at.is_(None))).scalar() or 0)


def latest_message_id(session: Session, *, openid: str) -> int | None:
    found = session.connection().execute(
        select(func.max(_MSG.c.id)).where(_MSG.c.openid == openid)).scalar()
    return None if found is None else int(found)


# --- replies --------------------------------------------------------------------------------

def record_reply(session: Session, *, openid: str, text: str, operator: str, at: datetime,
                 status: ReplyStatus, error: str | None = None,
                 message_id: int | None = None) -> int:
    """Store an attempt to answer ``openid`` beside the message it answers (by default their
    latest); a sent one marks the messages up to it answered and read. Returns its id."""
    if message_id is None:
        message_id = latest_message_id(session, openid=openid)
    reply_id = session.connection().execute(_REPLY.insert().values(
        openid=openid, message_id=message_id, text=text, operator=operator[:64], at=at,
        status=status, error=error[:_ERROR_CHARS] if error else None)
        .returning(_REPLY.c.id)).scalar_one()
    if status == "sent":
        _answered(session, openid=openid, up_to=message_id, at=at)
    return int(reply_id)


def recent_same_reply(session: Session, *, openid: str, text: str,
                      since: datetime) -> Any:
    """When this very text was last sent (or is being sent) to ``openid`` after ``since``
    (an aware datetime), or None."""
    found = session.connection().execute(
        select(func.max(_REPLY.c.at)).where(
            _REPLY.c.openid == openid, _REPLY.c.text == text, _REPLY.c.at >= since,
            _REPLY.c.status.in_(("sending", "sent")))).scalar()
    return found


def finish_reply(session: Session, *, reply_id: int, status: ReplyStatus, at: datetime,
                 error: str | None = None) -> None:
    """The outcome of an attempt recorded as ``sending``."""
    row = session.connection().execute(
        update(_REPLY).where(_REPLY.c.id == reply_id, _REPLY.c.status == "sending")
        .values(status=status, error=error[:_ERROR_CHARS] if error else None)
        .returning(_REPLY.c.openid, _REPLY.c.message_id)).first()
    if row is not None and status == "sent":
        _answered(session, openid=row.openid, up_to=row.message_id, at=at)


def _answered(session: Session, *, openid: str, up_to: int | None, at: datetime) -> None:
    if up_to is None:
        return
    conn = session.connection()
    conn.execute(update(_MSG).where(_MSG.c.openid == openid, _MSG.c.id <= up_to,
                                    _MSG.c.answered_at.is_(None)).values(answered_at=at))
    mark_read(session, openid=openid, now=at, up_to=up_to)


# --- the 48-hour window ---------------------------------------------------------------------

@dataclass(frozen=True)
class Window:
    """Whether a customer-service message may reach the subscriber now. ``last``: their last
    interaction we know of (None: none we know of in the window, nor any inbox message)."""

    open: bool
    last: datetime | None
    unfollowed: bool = False
    closes_at: datetime | None = field(default=None)


def window(session: Session, openid: str, now: datetime) -> Window:
    """The subscriber's last interaction: the latest of their inbox messages, their events
    (card views, unlocks, follows, payments…) and their deliveries. Cheapest first, and the
    last two only looked up within the window (their tables have no index by subscriber; the
    event table's index on time keeps that a range, the deliveries are kept a day)."""
    conn = session.connection()
    sub = conn.execute(select(_SUB.c.subscribed, _SUB.c.unsubscribed_at)
                       .where(_SUB.c.openid == openid)).first()
    last = conn.execute(select(func.max(_MSG.c.at)).where(_MSG.c.openid == openid)).scalar()
    since = now - WINDOW
    if last is None or last < since:
        for stmt in (select(func.max(_EVENT.c.at)).where(
                         _EVENT.c.at >= since, _EVENT.c.openid == openid,
                         _EVENT.c.kind.notin_(_NOT_INTERACTIONS)),
                     select(func.max(_INBOUND.c.created_at)).where(
                         _INBOUND.c.created_at >= since, _INBOUND.c.openid == openid)):
            found = conn.execute(stmt).scalar()
            if found is not None:
                last = found
                break
    if sub is not None and not sub.subscribed:
        return Window(False, last, unfollowed=True)
    if last is None:
        return Window(False, None)
    closes = last + WINDOW
    return Window(closes > now, last, closes_at=closes)


# Reader pages opened in a browser and unfollows are not messages to the account.
_NOT_INTERACTIONS: Final = (events.EXCERPT, events.FULL, events.UNFOLLOW)


# --- operator notices -----------------------------------------------------------------------

@dataclass(frozen=True)
class Notice:
    slot: int
    count: int  # new since the last notice
    human: int  # of which asked for a person
    unread: int  # all unread
    latest: str  # the newest message's text


def new_since_notice(session: Session) -> int:
    """Unread messages newer than the last notice: what the next notice would count."""
    conn = session.connection()
    after = conn.execute(select(_NOTICE.c.last_message_id).order_by(_NOTICE.c.slot.desc())
                         .limit(1)).scalar() or 0
    return int(conn.execute(select(func.count()).select_from(_MSG).where(
        _MSG.c.id > after, _MSG.c.read_at.is_(None))).scalar() or 0)


def claim_notice(session: Session, *, now: datetime, every: timedelta) -> Notice | None:
    """Claim the next notice if one is due: there are unread messages newer than the last
    notice's, and that notice is at least ``every`` old. ``slot`` is the last notice's plus
    one, so two processes deciding at once claim the same unique slot and only one of them
    gets it (slots from the clock would differ across a slot boundary and both send)."""
    conn = session.connection()
    last = conn.execute(select(_NOTICE).order_by(_NOTICE.c.slot.desc()).limit(1)).first()
    if last is not None and last.sent_at > now - every:
        return None
    after = last.last_message_id if last is not None else 0
    new = (_MSG.c.id > after) & _MSG.c.read_at.is_(None)
    row = conn.execute(select(func.count(), func.max(_MSG.c.id),
                              func.sum((_MSG.c.kind == "human").cast(_INT))).where(new)).first()
    if row is None or not row[0]:
        return None
    count, newest, human = int(row[0]), int(row[1]), int(row[2] or 0)
    slot = (int(last.slot) + 1) if last is not None else 1
    if not insert_ignore(session, InboxNotice, {"slot": slot, "sent_at": now, "count": count,
                                                "last_message_id": newest}):
        return None
    latest = conn.execute(select(_MSG.c.text).where(_MSG.c.id == newest)).scalar_one()
    return Notice(slot, count, human, unread_count(session), str(latest))


def release_notice(session: Session, *, slot: int) -> None:
    """Give a claimed notice back (none of it reached anyone): the next run claims it again."""
    session.connection().execute(_NOTICE.delete().where(_NOTICE.c.slot == slot))

