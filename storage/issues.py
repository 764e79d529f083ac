"""Newsletter issues. Everything that leaves this module for a free reply is an ``IssuePreview``,
which has no field for the locked text; ``read_issue`` is the one door to the full body and it
checks the entitlement itself."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, Engine, bindparam, text
from sqlalchemy import select as sa_select
from sqlalchemy.orm import defer
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from storage.content import ParsedIssue, Topic, topics_from_json, topics_to_json
from storage.errors import UnknownIssue
from storage.ledger import has_entitlement
from storage.models import Issue, UTCDateTime, utcnow


@dataclass(frozen=True)
class IssuePreview:
    number: int
    title: str
    summary: str
    price: int
    free_percent: int
    published_at: datetime | None
    topics: tuple[Topic, ...]
    excerpt_md: str
    char_count: int
    excerpt_char_count: int

    @property
    def is_free(self) -> bool:
        return self.price == 0


@dataclass(frozen=True)
class IssueReading:
    preview: IssuePreview
    unlocked: bool
    text_md: str  # the full body when unlocked, else the free excerpt


_ISSUE = Issue.__table__.c  # type: ignore[attr-defined]
_PREVIEW_COLUMNS = [c for c in _ISSUE if c.name != "body_md"]
# Topic lists are parsed once per distinct JSON text, not on every card.
_topics = functools.lru_cache(maxsize=256)(topics_from_json)


def _preview(issue: Any, default_free_percent: int) -> IssuePreview:
    return IssuePreview(
        number=issue.number,
        title=issue.title,
        summary=issue.summary,
        price=issue.price,
        free_percent=issue.free_percent if issue.free_percent is not None
        else default_free_percent,
        published_at=issue.published_at,
        topics=_topics(issue.topics_json),
        excerpt_md=issue.excerpt_md,
        char_count=issue.char_count,
        excerpt_char_count=issue.excerpt_char_count,
    )


def upsert_issue(
    session: Session, *, parsed: ParsedIssue, default_free_percent: int
) -> Literal["created", "updated", "unchanged"]:
    """Store an imported issue; re-importing the same number replaces its content."""
    existing = session.exec(select(Issue).where(Issue.number == parsed.number)).first()
    if existing is not None and existing.source_sha256 == parsed.source_sha256:
        return "unchanged"
    issue = existing or Issue(number=parsed.number, price=parsed.price, title=parsed.title,
                              topics_json="[]", body_md="", excerpt_md="", source_sha256="")
    issue.title = parsed.title
    issue.summary = parsed.summary
    issue.price = parsed.price
    issue.free_percent = parsed.free_percent
    if parsed.published is not None or existing is None:
        # A file without `published` does not un-publish an issue that went out via the CLI.
        issue.published_at = parsed.published
    issue.topics_json = topics_to_json(parsed.topics)
    issue.body_md = parsed.body_md
    issue.excerpt_md = parsed.excerpt_md
    issue.char_count = parsed.char_count
    issue.excerpt_char_count = parsed.excerpt_char_count
    issue.source_sha256 = parsed.source_sha256
    issue.updated_at = utcnow()
    session.add(issue)
    session.flush()
    return "created" if existing is None else "updated"


def publish_issue(session: Session, *, number: int, at: datetime | None = None) -> Issue:
    issue = session.exec(select(Issue).where(Issue.number == number)).first()
    if issue is None:
        raise UnknownIssue(number)
    if issue.published_at is None or issue.published_at > (at or utcnow()):
        issue.published_at = at or utcnow()
        issue.updated_at = utcnow()
        session.add(issue)
        session.flush()
    return issue


def _previews() -> SelectOfScalar[Issue]:
    # The locked body is never loaded for a preview; it is also the bulk of the row.
    return select(Issue).options(defer(Issue.body_md))  # type: ignore[arg-type]


def _published(now: datetime | None = None) -> ColumnElement[bool]:
    return col(Issue.published_at).is_not(None) & (col(Issue.published_at) <= (now or utcnow()))


# The hot-path query: which issue is current, and a version of it, without its texts. Plain
# SQL with :name parameters, so storage.fastpath runs the very same text on the driver.
CURRENT_SQL = (
    "SELECT number, updated_at, published_at, source_sha256 FROM issue"
    " WHERE published_at IS NOT NULL AND published_at <= :now"
    " ORDER BY published_at DESC, number DESC LIMIT 1"
)
_CURRENT = text(CURRENT_SQL).bindparams(bindparam("now", type_=UTCDateTime()))
_BY_NUMBER = sa_select(*_PREVIEW_COLUMNS).where(_ISSUE.number == bindparam("number"))
# Previews of the current issue, per process, keyed by everything that changes when the issue
# does (re-import: content hash and updated_at; publish: published_at), so no process can serve
# a stale one. Tiny: a new key appears only when an operator changes an issue.
_current_cache: dict[tuple[Any, ...], IssuePreview] = {}


def current_issue(session: Session, *, default_free_percent: int,
                  now: datetime | None = None) -> IssuePreview | None:
    """The most recently published issue (publication time, then number): one small indexed
    query, the preview itself from the cache."""
    conn = session.connection()
    row = conn.execute(_CURRENT, {"now": now or utcnow()}).first()
    if row is None:
        return None
    return preview_by_number(conn, version=(*row, default_free_percent), number=int(row[0]),
                             default_free_percent=default_free_percent)


def preview_by_number(db: Engine | Connection, *, version: tuple[Any, ...], number: int,
                      default_free_percent: int) -> IssuePreview | None:
    """The preview of issue ``number`` as of ``version`` (see ``_current_cache``), loaded
    through ``db`` when this process has not seen that version yet."""
    preview = _current_cache.get(version)
    if preview is None:
        if isinstance(db, Engine):
            with db.connect() as conn:
                full = conn.execute(_BY_NUMBER, {"number": number}).first()
        else:
            full = db.execute(_BY_NUMBER, {"number": number}).first()
        if full is None:  # deleted since the version was read: nothing to show
            return None
        preview = _preview(full, default_free_percent)
        if len(_current_cache) > 32:
            _current_cache.clear()
        _current_cache[version] = preview
    return preview


def get_issue(session: Session, *, number: int, default_free_percent: int,
              include_drafts: bool = False) -> IssuePreview:
    """A published issue's preview (drafts only for operators); UnknownIssue otherwise."""
    stmt = _previews().where(Issue.number == number)
    if not include_drafts:
        stmt = stmt.where(_published())
    row = session.exec(stmt).first()
    if row is None:
        raise UnknownIssue(number)
    return _preview(row, default_free_percent)


def list_issues(session: Session, *, default_free_percent: int,
                include_drafts: bool = False) -> list[IssuePreview]:
    """Newest first."""
    stmt = _previews().order_by(col(Issue.number).desc())
    if not include_drafts:
        stmt = stmt.where(_published())
    return [_preview(r, default_free_percent) for r in session.exec(stmt).all()]


def lowest_draft_number(session: Session) -> int | None:
    row = session.exec(
        select(Issue.number).where(col(Issue.published_at).is_(None))
        .order_by(col(Issue.number)).limit(1)
    ).first()
    return None if row is None else int(row)


def read_issue(session: Session, *, number: int, openid: str,
               default_free_percent: int) -> IssueReading:
    """What ``openid`` may read of a published issue: full text only with an entitlement
    (or when the issue is free), otherwise the free excerpt."""
    row = session.exec(select(Issue).where(Issue.number == number, _published())).first()
    if row is None:
        raise UnknownIssue(number)
    preview = _preview(row, default_free_percent)
    unlocked = row.price == 0 or has_entitlement(session, openid=openid, issue_number=number)
    return IssueReading(preview, unlocked, row.body_md if unlocked else row.excerpt_md)


def neighbours(session: Session, *, number: int, default_free_percent: int
               ) -> tuple[IssuePreview | None, IssuePreview | None]:
    """The published issues just before and just after ``number`` (by number), for a reader
    page's previous/next links."""
    before = session.exec(_previews().where(_published(), Issue.number < number)
                          .order_by(col(Issue.number).desc()).limit(1)).first()
    after = session.exec(_previews().where(_published(), Issue.number > number)
                         .order_by(col(Issue.number)).limit(1)).first()
    return (None if before is None else _preview(before, default_free_percent),
            None if after is None else _preview(after, default_free_percent))
