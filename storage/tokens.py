"""WeChat access-token cache shared by every process through the database."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm.util import identity_key
from sqlmodel import Session

from storage.models import AccessToken, utcnow


def get_cached_token(session: Session, *, app_id: str) -> AccessToken | None:
    """The cached token row for ``app_id``, expired or not; None if never stored."""
    return session.get(AccessToken, app_id)


def store_token(
    session: Session,
    *,
    app_id: str,
    token: str,
    expires_at: datetime,
    fetched_at: datetime | None = None,
) -> None:
    """Insert or replace the cached token for ``app_id``."""
    values: dict[str, Any] = {
        "app_id": app_id,
        "token": token,
        "expires_at": expires_at,
        "fetched_at": fetched_at or utcnow(),
    }
    dialect = session.get_bind().dialect.name
    if dialect not in ("sqlite", "postgresql"):
        session.merge(AccessToken(**values))
        session.flush()
        return
    # A native upsert: two processes storing the first token at once must not collide on the
    # primary key (a read-then-insert would raise IntegrityError on PostgreSQL).
    insert = sqlite_insert if dialect == "sqlite" else pg_insert
    stmt = insert(AccessToken).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["app_id"],
        set_={name: stmt.excluded[name] for name in ("token", "expires_at", "fetched_at")},
    )
    session.exec(stmt)
    # The statement bypasses the ORM, so refresh a row this session already holds.
    loaded = session.identity_map.get(identity_key(AccessToken, app_id))
    if loaded is not None:
        session.refresh(loaded)
