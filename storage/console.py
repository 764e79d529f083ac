"""Console sessions and the operators' audit trail (bot.console is the web side)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select, update

from storage.models import ConsoleSession, OperatorAction
from storage.sql import insert_ignore

MAX_TARGET_CHARS = 128
MAX_DETAIL_CHARS = 4000


def start_session(session: Session, *, openid: str, grant_nonce: str, token_sha256: str,
                  csrf: str, now: datetime, hours: int) -> bool:
    """Start the session a console link grants. False when that link already started one:
    a link opens once, so a forwarded or leaked link is worth nothing after its first use."""
    return insert_ignore(session, ConsoleSession, {
        "token_sha256": token_sha256, "grant_nonce": grant_nonce, "openid": openid,
        "csrf": csrf, "created_at": now, "expires_at": now + timedelta(hours=hours)})


@dataclass(frozen=True)
class Active:
    openid: str
    csrf: str
    expires_at: datetime


def active_session(session: Session, *, token_sha256: str, now: datetime) -> Active | None:
    """The session behind a cookie, if it has neither expired nor been ended."""
    found = session.get(ConsoleSession, token_sha256)
    if found is None or found.ended_at is not None or found.expires_at <= now:
        return None
    return Active(found.openid, found.csrf, found.expires_at)


def end_session(session: Session, *, token_sha256: str, now: datetime) -> None:
    session.execute(update(ConsoleSession)
                    .where(col(ConsoleSession.token_sha256) == token_sha256,
                           col(ConsoleSession.ended_at).is_(None))
                    .values(ended_at=now))


def audit(session: Session, *, operator: str, action: str, result: str, at: datetime,
          target: str = "", detail: str | dict[str, Any] = "") -> None:
    """Record one state-changing console action (refused and failed ones too)."""
    text = detail if isinstance(detail, str) else json.dumps(detail, ensure_ascii=False,
                                                             sort_keys=True, default=str)
    session.add(OperatorAction(at=at, operator=operator, action=action[:40],
                               target=target[:MAX_TARGET_CHARS], result=result,
                               detail=text[:MAX_DETAIL_CHARS]))
    session.flush()


def list_actions(session: Session, *, limit: int = 100, since: datetime | None = None,
                 operator: str | None = None) -> list[OperatorAction]:
    """Newest first."""
    query = select(OperatorAction)
    if since is not None:
        query = query.where(col(OperatorAction.at) >= since)
    if operator is not None:
        query = query.where(col(OperatorAction.operator) == operator)
    return list(session.exec(query.order_by(col(OperatorAction.id).desc()).limit(limit)))
