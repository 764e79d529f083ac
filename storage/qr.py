"""Parametric QR codes made with ``newsbot qr create``: the ticket WeChat handed out, its scene
and when it stops working. Follows and scans are attributed to a scene by storage.subscribers
(first touch); this table only says which codes exist."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func
from sqlmodel import Session, col, select

from storage.models import QrCode, utcnow


def add_code(session: Session, *, scene: str, ticket: str, url: str,
             expires_at: datetime | None, created_by: str | None = None,
             now: datetime | None = None) -> QrCode:
    """Record a code WeChat created (``expires_at`` None: permanent)."""
    code = QrCode(scene=scene, permanent=expires_at is None, expires_at=expires_at,
                  ticket=ticket, url=url, created_by=created_by, created_at=now or utcnow())
    session.add(code)
    session.flush()
    return code


def list_codes(session: Session) -> list[QrCode]:
    """Every code, newest first."""
    return list(session.exec(select(QrCode).order_by(col(QrCode.id).desc())).all())


def count_permanent(session: Session) -> int:
    """Permanent codes made so far (WeChat allows an account 100,000, ever)."""
    return int(session.exec(select(func.count()).select_from(QrCode)
                            .where(col(QrCode.permanent).is_(True))).one())
