"""The health check's write probe: can the database take the write every delivery makes?"""

from __future__ import annotations

import secrets

from sqlalchemy import Engine, delete, insert, text

from storage.db import transaction
from storage.models import InboundMessage, utcnow

# More than a SQLite page (4 KiB) and PostgreSQL's TOAST threshold (2 KiB), so the probe needs
# pages beyond the row's own: from the free list, else by growing the file. A database that
# cannot grow (disk full, SQLITE_FULL) fails it once the free pages are gone, as deliveries
# then fail too, and even while an update in place would still fit. Random: incompressible.
PROBE_BYTES = 5 * 1024


class ProbeFailed(Exception):
    """The database answered but refused the write; ``stage`` says how far the probe got."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {type(cause).__name__}")
        self.stage = stage
        self.cause = cause


def probe_write(engine: Engine) -> None:
    """Insert a delivery-shaped row into ``inbound_message`` and delete it again, committed.

    The table and path every webhook message writes through (the write lock on SQLite, the
    unique index, TOAST on PostgreSQL), and a real commit: a write that is rolled back is never
    flushed to the WAL, so it cannot notice a full disk. Nothing remains afterwards, and the
    ``health:`` key can match no delivery. Raises ProbeFailed("connect" | "write", …)."""
    key = f"health:{secrets.token_hex(8)}"
    table = InboundMessage.__table__  # type: ignore[attr-defined]
    stage = "connect"
    try:
        with transaction(engine) as session:
            conn = session.connection()
            conn.execute(text("SELECT 1"))
            stage = "write"
            conn.execute(insert(table).values(
                dedupe_key=key, openid="-", status="pending", created_at=utcnow(),
                reply_json=secrets.token_hex(PROBE_BYTES // 2)))
            conn.execute(delete(table).where(table.c.dedupe_key == key))
            stage = "commit"
    except Exception as exc:
        raise ProbeFailed(stage, exc) from exc
