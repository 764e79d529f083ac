"""Subscribers. Unsubscribing only marks the row inactive: balance and unlocks are financial
records and stay, so a returning reader finds everything as they left it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select, update

from storage import events
from storage.coverage import COVERED_SQL
from storage.errors import UnknownSubscriber
from storage.models import Subscriber, utcnow
from storage.sql import insert_ignore


def ensure_subscriber(session: Session, *, openid: str, at: datetime | None = None) -> bool:
    """Create the subscriber if new (active). True when created by this call."""
    now = at or utcnow()
    return insert_ignore(
        session,
        Subscriber,
        {"openid": openid, "subscribed": True, "balance": 0, "created_at": now,
         "subscribed_at": now},
    )


def get_subscriber(session: Session, *, openid: str) -> Subscriber | None:
    return session.exec(select(Subscriber).where(Subscriber.openid == openid)).first()


def require_subscriber(session: Session, *, openid: str) -> Subscriber:
    sub = get_subscriber(session, openid=openid)
    if sub is None:
        raise UnknownSubscriber(openid)
    return sub


def lock_subscriber(session: Session, *, openid: str) -> int:
    """Take this subscriber's row lock until COMMIT (PostgreSQL; SQLite's writers run one at a
    time anyway) and return their balance. Redeem takes the same lock, so a pass granted, a
    code used and an unlock of one reader are decided one after another."""
    if session.autoflush:
        session.flush()
    balance = session.connection().execute(
        select(Subscriber.balance).where(Subscriber.openid == openid).with_for_update()
    ).scalar()
    if balance is None:
        raise UnknownSubscriber(openid)
    return int(balance)


def set_subscribed(session: Session, *, openid: str, subscribed: bool,
                   at: datetime | None = None) -> None:
    now = at or utcnow()
    ensure_subscriber(session, openid=openid, at=now)
    values: dict[str, object] = {"subscribed": subscribed}
    values["subscribed_at" if subscribed else "unsubscribed_at"] = now
    session.execute(update(Subscriber).where(col(Subscriber.openid) == openid).values(**values))
    if not subscribed:  # a follow records itself (follow), with its scene
        events.record(session, events.UNFOLLOW, openid=openid, at=now)


def follow(session: Session, *, openid: str, at: datetime | None = None,
           scene: str | None = None) -> bool:
    """Mark ``openid`` as following (recording the follow, with the QR scene that brought
    them, if any). True when they are a returning follower: they had followed before and left
    (their balance and unlocks are still here)."""
    sub = get_subscriber(session, openid=openid)
    returning = sub is not None and (not sub.subscribed or sub.unsubscribed_at is not None)
    set_subscribed(session, openid=openid, subscribed=True, at=at)
    if scene:
        attribute(session, openid=openid, scene=scene)
    events.record(session, events.FOLLOW, openid=openid, at=at, detail=scene or None)
    return returning


def attribute(session: Session, *, openid: str, scene: str) -> None:
    """Credit ``scene`` with this subscriber unless an earlier scene already brought them
    (first touch: the code that won them keeps them)."""
    session.execute(update(Subscriber)
                    .where(col(Subscriber.openid) == openid, col(Subscriber.scene).is_(None))
                    .values(scene=scene[:64]))


def list_subscribers(
    session: Session, *, limit: int = 100, offset: int = 0, active_only: bool = False
) -> list[Subscriber]:
    stmt = select(Subscriber).order_by(col(Subscriber.id)).offset(offset).limit(limit)
    if active_only:
        stmt = stmt.where(col(Subscriber.subscribed).is_(True))
    return list(session.exec(stmt).all())


def count_subscribers(session: Session, *, active_only: bool = False) -> int:
    stmt = select(func.count()).select_from(Subscriber)
    if active_only:
        stmt = stmt.where(col(Subscriber.subscribed).is_(True))
    return int(session.exec(stmt).one())


def add_followers(session: Session, *, openids: list[str], at: datetime | None = None) -> int:
    """Insert followers pulled from WeChat as active subscribers (one multi-row statement per
    page) and reactivate known ones; returns how many were new."""
    if not openids:
        return 0
    now = at or utcnow()
    before = count_subscribers(session)
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    rows = [{"openid": o, "subscribed": True, "balance": 0, "created_at": now,
             "subscribed_at": now} for o in openids]
    session.execute(module.insert(Subscriber).on_conflict_do_nothing(), rows)
    # WeChat's follower list is the truth: anyone on it is following now.
    session.execute(update(Subscriber).where(col(Subscriber.openid).in_(openids),
                                             col(Subscriber.subscribed).is_(False))
                    .values(subscribed=True, subscribed_at=now))
    return count_subscribers(session) - before


@dataclass(frozen=True)
class Standing:
    """What a reply needs to know about its reader, relative to one issue."""

    known: bool  # has a subscriber row (and so a balance)
    balance: int
    unlocked: bool  # holds the entitlement to the issue, or a pass covers it
    notified: bool  # has been told the issue is out (broadcast mode "off")
    covered: bool = False  # a pass covers the issue (storage.passes)
    pass_until: datetime | None = None  # when the reader's last pass period ends


# One statement instead of three: it runs on nearly every message. Plain SQL with :name
# parameters, so storage.fastpath runs the very same text on the driver.
STANDING_SQL = (
    "SELECT (SELECT balance FROM subscriber WHERE openid = :openid),"
    " EXISTS (SELECT 1 FROM entitlement WHERE openid = :openid AND issue_number = :issue),"
    " EXISTS (SELECT 1 FROM issue_notice WHERE openid = :openid AND issue_number = :issue),"
    " " + COVERED_SQL + ","
    " (SELECT MAX(COALESCE(cut_at, ends_at)) FROM pass_period WHERE openid = :openid)"
)
_STANDING = text(STANDING_SQL)


def standing_params(openid: str, issue_number: int | None) -> dict[str, object]:
    return {"openid": openid, "issue": -1 if issue_number is None else issue_number}


def standing_from_row(row: Any) -> Standing:
    balance, entitled, notified, covered, until = row
    return Standing(known=balance is not None, balance=int(balance or 0),
                    unlocked=bool(entitled or covered), notified=bool(notified),
                    covered=bool(covered), pass_until=_utc(until))


def _utc(value: datetime | str | None) -> datetime | None:
    """A timestamp read on the driver: SQLite hands back its stored text, without a zone."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value is None or value.tzinfo is not None else value.replace(tzinfo=UTC)


def standing(session: Session, *, openid: str, issue_number: int | None) -> Standing:
    return standing_from_row(session.connection().execute(
        _STANDING, standing_params(openid, issue_number)).one())
