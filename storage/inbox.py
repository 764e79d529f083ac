"""Deduplication of WeChat deliveries. WeChat retries a message up to three times when the
reply is slow; each retry must get the first reply and must not run the handler again.

The claim is inserted in the same transaction as the handler's side effects and its reply, so
the row is only ever visible as ``done``: a concurrent duplicate blocks on the unique key until
the first delivery commits (or rolls back, leaving no claim for it to find)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlmodel import Session, select, update

from storage.models import InboundMessage, utcnow
from storage.sql import insert_ignore


@dataclass(frozen=True)
class Claim:
    state: Literal["new", "done"]
    reply_json: str | None = None


def claim(session: Session, *, key: str, openid: str) -> Claim:
    """Insert the delivery under its unique key, or return the reply of the first one."""
    if insert_ignore(session, InboundMessage,
                     {"dedupe_key": key, "openid": openid, "status": "pending",
                      "created_at": utcnow()}):
        return Claim("new")
    reply = session.connection().execute(
        select(_INBOX.c.reply_json).where(_INBOX.c.dedupe_key == key)).scalar()
    return Claim("done", reply)


_INBOX = InboundMessage.__table__  # type: ignore[attr-defined]


def finish(session: Session, *, key: str, reply_json: str) -> None:
    session.connection().execute(
        update(_INBOX).where(_INBOX.c.dedupe_key == key)
        .values(status="done", reply_json=reply_json, finished_at=utcnow())
    )

