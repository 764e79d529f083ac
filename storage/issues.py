"""Newsletter issues. Everything that leaves this module for a free reply is an ``IssuePreview``,
which has no field for the locked text; ``read_issue`` is the one door to the full body and it
checks the entitlement itself."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, Engine, bindparam, func, text
from sqlalchemy import select as sa_select
from sqlalchemy.orm import defer
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from storage.content import (
    ParsedIssue,
    TextDiff,
    Topic,
    diff_text,
    topics_from_json,
    topics_to_json,
)
from storage.errors import UnknownIssue
from storage.ledger import may_read
from storage.models import Entitlement, Issue, LedgerEntry, UTCDateTime, utcnow
from storage.sql import scalar


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


def _store(session: Session, existing: Issue | None, parsed: ParsedIssue,
           published_at: datetime | None) -> None:
    issue = existing or Issue(number=parsed.number, price=parsed.price, title=parsed.title,
                              topics_json="[]", body_md="", excerpt_md="", source_sha256="")
    issue.title = parsed.title
    issue.summary = parsed.summary
    issue.price = parsed.price
    issue.free_percent = parsed.free_percent
    issue.published_at = published_at
    issue.topics_json = topics_to_json(parsed.topics)
    issue.body_md = parsed.body_md
    issue.excerpt_md = parsed.excerpt_md
    issue.char_count = parsed.char_count
    issue.excerpt_char_count = parsed.excerpt_char_count
    issue.source_sha256 = parsed.source_sha256
    issue.updated_at = utcnow()
    session.add(issue)
    session.flush()


def upsert_issue(
    session: Session, *, parsed: ParsedIssue, default_free_percent: int
) -> Literal["created", "updated", "unchanged"]:
    """Store an issue without the import checks (demo and test seeding); re-importing the same
    number replaces its content and a file without `published` keeps the stored publication.
    The operator's `issue import` goes through ``plan_import`` / ``apply_import`` instead."""
    existing = session.exec(select(Issue).where(Issue.number == parsed.number)).first()
    if existing is not None and existing.source_sha256 == parsed.source_sha256:
        return "unchanged"
    keep = existing is not None and parsed.published is None
    _store(session, existing, parsed,
           existing.published_at if keep and existing is not None else parsed.published)
    return "created" if existing is None else "updated"


# --------------------------------------------------------------------------- import plans

# Why an import of one file is refused (nothing is written for any file of the run):
# sold_price / sold_text: readers have paid for the issue and its price or text would change
# (allowed with force); sold_hidden: readers have paid and the import would unpublish the issue
# or move its publication into the future, hiding it from them (allowed with force);
# published_missing: the issue is published or scheduled but the file has no `published`
# (absent = draft), so the operator must say which they mean (`published = …` or unpublish).
Refusal = Literal["sold_price", "sold_text", "sold_hidden", "published_missing"]


@dataclass(frozen=True)
class StoredIssue:
    """The stored state of an issue an import would change, for the diff summary."""

    title: str
    summary: str
    price: int
    free_percent: int  # effective
    published_at: datetime | None
    topics: tuple[Topic, ...]
    char_count: int


@dataclass(frozen=True)
class ImportPlan:
    """What importing one parsed file would do; ``apply_import`` carries it out."""

    parsed: ParsedIssue
    status: Literal["created", "updated", "unchanged"]
    before: StoredIssue | None  # None when created
    published_at: datetime | None  # what will be stored
    buyers: int  # readers who paid for the issue (entitlements or redeem charges)
    changed: tuple[str, ...]  # title, summary, price, free_percent, published, topics, text
    text: TextDiff | None  # when the body differs
    refusals: tuple[Refusal, ...]

    @property
    def refused(self) -> bool:
        return bool(self.refusals)


def count_buyers(session: Session, *, number: int) -> int:
    """Readers holding an unlock of issue ``number`` or charged for it (normally the same)."""
    ent = Entitlement.__table__.c  # type: ignore[attr-defined]
    led = LedgerEntry.__table__.c  # type: ignore[attr-defined]
    unlocked = scalar(session, sa_select(func.count(func.distinct(ent.openid)))
                      .where(ent.issue_number == number)) or 0
    charged = scalar(session, sa_select(func.count(func.distinct(led.openid)))
                     .where(led.issue_number == number)) or 0
    return max(int(unlocked), int(charged))


def _same_time(a: datetime | None, b: datetime | None) -> bool:
    # Files carry whole seconds; `issue publish` stores microseconds.
    if a is None or b is None:
        return a is b
    return abs(a - b) < timedelta(seconds=1)


def _visible(at: datetime | None, now: datetime) -> bool:
    return at is not None and at <= now


def plan_import(session: Session, *, parsed: ParsedIssue, default_free_percent: int,
                now: datetime | None = None, force: bool = False,
                unpublish: bool = False) -> ImportPlan:
    """Compare a parsed file with the stored issue: what changes and whether it is allowed.
    Reads only. ``force`` allows changing a sold issue; ``unpublish`` makes a published issue
    whose file has no `published` a draft again."""
    now = now or utcnow()
    existing = session.exec(select(Issue).where(Issue.number == parsed.number)).first()
    if existing is None:
        return ImportPlan(parsed, "created", None, parsed.published, 0, (), None, ())
    before = StoredIssue(
        title=existing.title, summary=existing.summary, price=existing.price,
        free_percent=existing.free_percent if existing.free_percent is not None
        else default_free_percent,
        published_at=existing.published_at, topics=topics_from_json(existing.topics_json),
        char_count=existing.char_count)
    if existing.source_sha256 == parsed.source_sha256:
        # The very file that is stored: nothing to write, so nothing to refuse (an issue it
        # created as a draft may since have been published by `issue publish` or the job).
        return ImportPlan(parsed, "unchanged", before, existing.published_at, 0, (), None, ())

    refusals: list[Refusal] = []
    if parsed.published is not None:
        target = existing.published_at if _same_time(parsed.published, existing.published_at) \
            else parsed.published
    elif existing.published_at is None or unpublish:
        target = None
    else:
        target = existing.published_at
        refusals.append("published_missing")

    text = diff_text(existing.body_md, parsed.body_md) \
        if existing.body_md != parsed.body_md else None
    changed = [name for name, differs in (
        ("title", existing.title != parsed.title),
        ("summary", existing.summary != parsed.summary),
        ("price", existing.price != parsed.price),
        ("free_percent", before.free_percent != parsed.effective_free_percent),
        ("published", not _same_time(existing.published_at, target)),
        ("topics", before.topics != parsed.topics),
        ("text", text is not None and text.rendering_changed),
    ) if differs]

    buyers = count_buyers(session, number=parsed.number)
    if buyers and not force:
        if "price" in changed:
            refusals.append("sold_price")
        if "text" in changed:
            refusals.append("sold_text")
        if _visible(existing.published_at, now) and not _visible(target, now):
            refusals.append("sold_hidden")
    return ImportPlan(parsed, "updated", before, target, buyers, tuple(changed), text,
                      tuple(refusals))


def apply_import(session: Session, *, plan: ImportPlan) -> None:
    """Write what ``plan_import`` planned, in the caller's transaction."""
    if plan.refused:
        raise ValueError(f"import of issue {plan.parsed.number} was refused: {plan.refusals}")
    if plan.status == "unchanged":
        return
    existing = session.exec(select(Issue).where(Issue.number == plan.parsed.number)).first()
    if (existing is None) != (plan.status == "created"):
        raise ValueError(f"issue {plan.parsed.number} changed since it was planned")
    _store(session, existing, plan.parsed, plan.published_at)


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
    """What ``openid`` may read of a published issue: full text only with an entitlement or a
    pass that covers it (or when the issue is free), otherwise the free excerpt."""
    row = session.exec(select(Issue).where(Issue.number == number, _published())).first()
    if row is None:
        raise UnknownIssue(number)
    preview = _preview(row, default_free_percent)
    unlocked = row.price == 0 or may_read(session, openid=openid, issue_number=number)
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
