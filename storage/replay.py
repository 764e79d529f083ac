"""Replay protection for signed requests. WeChat's plain-mode signature covers the token, the
timestamp and the nonce, not the body, so anyone holding one accepted URL (a proxy or access
log, a browser history) could post any message with it while its timestamp is fresh. Each pair
is therefore recorded with a hash of its message: the same pair with the same message again is
WeChat retrying, the same pair with another message is refused.

The pair goes in with the delivery's claim: in the write path's transaction here, on the fast
path in the same statement or transaction as the claim (storage.fastpath). Its unique key
decides between concurrent requests in every process: exactly one message per pair gets in.
Rows older than the freshness window can never match an accepted request again and are
purged in the background of the webhook (``purge``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Table, delete
from sqlmodel import Session

from storage.models import SignedRequest

_T: Table = SignedRequest.__table__  # type: ignore[attr-defined]
# Accepted timestamps may be this far behind the clock of the process that purges, and the
# processes' clocks may differ by a little.
PURGE_MARGIN_S = 60


class Replayed(Exception):
    """The signed (timestamp, nonce) came before with another message."""


@dataclass(frozen=True)
class Seal:
    """What one signed request must not be reused for: its pair and its message's hash."""

    timestamp: int
    nonce: str
    body_sha256: str


# Plain SQL, shared with storage.fastpath: on the write path a Core insert cost ~3× as much
# as the same statement given to the driver (measured in docs/benchmarks.md).
SEAL_SQL = ("INSERT INTO signed_request (timestamp, nonce, body_sha256)"
            " VALUES (:ts, :nonce, :body) ON CONFLICT DO NOTHING RETURNING 1")
SEALED_BODY_SQL = "SELECT body_sha256 FROM signed_request WHERE timestamp = :ts AND nonce = :nonce"
_NAMED = re.compile(r":(\w+)")


def driver_sql(sql: str, dialect: str) -> str:
    """``sql`` in the driver's parameter style (psycopg: %(name)s; sqlite3 takes :name)."""
    return _NAMED.sub(r"%(\1)s", sql) if dialect == "postgresql" else sql


def record(session: Session, seal: Seal) -> None:
    """Record the pair in the caller's transaction; Replayed when it came with another message
    (a concurrent holder of the pair is waited for on its unique key, then compared)."""
    conn = session.connection()
    dialect = conn.dialect.name
    params = {"ts": seal.timestamp, "nonce": seal.nonce, "body": seal.body_sha256}
    if conn.exec_driver_sql(driver_sql(SEAL_SQL, dialect), params).first() is not None:
        return
    seen = conn.exec_driver_sql(driver_sql(SEALED_BODY_SQL, dialect), params).scalar()
    if seen != seal.body_sha256:
        raise Replayed


def cutoff(now: float, max_skew_s: int) -> int:
    """Pairs with a timestamp below this can no longer pass the freshness check."""
    return int(now) - max_skew_s - PURGE_MARGIN_S


def purge(session: Session, *, before: int) -> int:
    """Delete the pairs older than ``before`` (a range on the key's leading column)."""
    result = session.connection().execute(delete(_T).where(_T.c.timestamp < before))
    return int(result.rowcount or 0)
