"""Events: what subscribers did, one narrow ``event`` row each, for ``newsbot stats`` and the
console's charts. Each is written by the path that did the thing, in its transaction (the
webhook's fast path adds the card view to its claim statement: storage.fastpath), so an
event exists exactly when what it records happened."""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import insert
from sqlmodel import Session

from storage.models import Event, utcnow

# kind: what ``detail`` holds
CARD: Final = "card"  # an issue's card shown in the chat: -
EXCERPT: Final = "excerpt"  # the reader page opened without the full text: -
FULL: Final = "full"  # the reader page opened with the full text: -
UNLOCK: Final = "unlock"  # an issue unlocked: tokens | pass | code | gift (amount: tokens paid)
TOPUP: Final = "topup"  # tokens credited: operator | pay | code (amount: tokens)
CODE: Final = "code"  # a code redeemed: tokens | issue | pass | gift
PASS: Final = "pass"  # a pass bought with tokens: the pass id (amount: its price)
FOLLOW: Final = "follow"  # followed: the QR scene, if any
UNFOLLOW: Final = "unfollow"  # unfollowed: -
SCAN: Final = "scan"  # a follower scanned a parametric QR code: the scene
INBOX: Final = "inbox"  # an inbox message: text | human
KINDS: Final = frozenset({CARD, EXCERPT, FULL, UNLOCK, TOPUP, CODE, PASS, FOLLOW, UNFOLLOW,
                          SCAN, INBOX})

_TABLE = Event.__table__  # type: ignore[attr-defined]
_DETAIL_CHARS = _TABLE.c.detail.type.length


def row(kind: str, *, openid: str, at: datetime | None = None, issue_number: int | None = None,
        detail: str | None = None, amount: int | None = None) -> dict[str, object]:
    """The column values of one event (checked: an unknown kind is a bug, not data)."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    return {"at": at or utcnow(), "kind": kind, "openid": openid, "issue_number": issue_number,
            "detail": detail[:_DETAIL_CHARS] if detail else None, "amount": amount}


def record(session: Session, kind: str, *, openid: str, at: datetime | None = None,
           issue_number: int | None = None, detail: str | None = None,
           amount: int | None = None) -> None:
    """Add one event to the session's transaction (one INSERT, no ORM object)."""
    session.connection().execute(insert(_TABLE), [row(
        kind, openid=openid, at=at, issue_number=issue_number, detail=detail, amount=amount)])


def record_many(session: Session, rows: list[dict[str, object]]) -> None:
    if rows:
        session.connection().execute(insert(_TABLE), rows)
