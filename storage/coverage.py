"""Which issues a pass covers, as SQL: shared by storage.passes, the redeem statements in
storage.ledger and the standing query of the webhook's fast path (storage.subscribers)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Table, and_, exists, func, or_

from storage.models import Issue, PassPeriod

_PERIOD: Table = PassPeriod.__table__  # type: ignore[attr-defined]
_ISSUE: Table = Issue.__table__  # type: ignore[attr-defined]

# "Does a period of :openid cover issue :issue" as plain SQL, for the fast path's standing
# query (storage.subscribers.STANDING_SQL) which runs on the driver. A period covers the issue
# current when it started and every issue published in [starts_at, end), end being cut_at
# once refunded; a period refunded whole (cut at its start) covers nothing.
COVERED_SQL = (
    "EXISTS (SELECT 1 FROM pass_period p JOIN issue i ON i.number = :issue"
    " WHERE p.openid = :openid AND p.starts_at < COALESCE(p.cut_at, p.ends_at)"
    " AND (p.first_issue = :issue OR (i.published_at IS NOT NULL"
    " AND i.published_at >= p.starts_at AND i.published_at < COALESCE(p.cut_at, p.ends_at))))"
)


def period_end() -> ColumnElement[Any]:
    return func.coalesce(_PERIOD.c.cut_at, _PERIOD.c.ends_at)


def covered_clause(openid: Any, issue_number: Any) -> ColumnElement[bool]:
    """COVERED_SQL as a Core expression over bind parameters or columns (for redeem)."""
    return exists().where(
        _ISSUE.c.number == issue_number,
        _PERIOD.c.openid == openid,
        _PERIOD.c.starts_at < period_end(),
        or_(_PERIOD.c.first_issue == issue_number,
            and_(_ISSUE.c.published_at.is_not(None),
                 _ISSUE.c.published_at >= _PERIOD.c.starts_at,
                 _ISSUE.c.published_at < period_end())),
    )


