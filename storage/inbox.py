"""Deduplication of WeChat deliveries. WeChat retries a message up to three times when the
reply is slow; each retry must get the first reply and must not run the handler again.

The claim is inserted in the same transaction as the handler's side effects and its reply, so
the row is only ever visible as ``done``: a concurrent duplicate blocks on the unique key until
the first delivery commits (or rolls back, leaving no claim for it to find)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy import bindparam, literal_column
from sqlalchemy.dialects import postgresql, sqlite
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


def record(session: Session, *, key: str, openid: str, reply_json: str) -> None:
    """Store a reply given outside the normal path (the error reply), unless one exists."""
    if claim(session, key=key, openid=openid).state == "new":
        finish(session, key=key, reply_json=reply_json)


# Prebuilt per dialect: the read path's single write.
_DONE_CLAIMS = {
    name: module.insert(_INBOX).values(
        # Bind names differ from the column names, which SQLAlchemy reserves in VALUES.
        dedupe_key=bindparam("b_key"), openid=bindparam("b_openid"), status="done",
        reply_json=bindparam("b_reply"), created_at=bindparam("b_now"),
        finished_at=bindparam("b_now"),
    ).on_conflict_do_nothing().returning(literal_column("1"))
    for name, module in (("sqlite", sqlite), ("postgresql", postgresql))
}


def claim_done(session: Session, *, key: str, openid: str, reply_json: str) -> Claim:
    """Claim a delivery whose reply was computed before the claim (a handler that only reads):
    ``new`` when this call stored it, else the first delivery's reply."""
    conn = session.connection()
    now = utcnow()
    if conn.execute(_DONE_CLAIMS[conn.dialect.name], {
            "b_key": key, "b_openid": openid, "b_reply": reply_json, "b_now": now}).first():
        return Claim("new")
    reply = conn.execute(
        select(_INBOX.c.reply_json).where(_INBOX.c.dedupe_key == key)).scalar()
    return Claim("done", reply)
