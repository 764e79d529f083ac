"""This week's issue card, any issue's card by number, and the archive."""

from __future__ import annotations

import re

from handlers import passes
from handlers.format import fit_bytes, issue_card, issue_heading
from handlers.numbers import ISSUE_NUMBER
from handlers.router import Context, Incoming, Reply, Router, Text, issue_arg, reads_only
from handlers.selling import ways_for
from storage import events, issues, ledger
from storage.errors import UnknownIssue, UnknownSubscriber

router = Router("issue")

ARCHIVE_PAGE_SIZE = 10


def card_for(ctx: Context, openid: str, number: int | None, *, lead: str = "") -> str:
    """The card of issue ``number`` (None = current) as seen by ``openid``, noted as a card
    view (stored with the delivery: a retry of the message adds none)."""
    if number is None:
        preview = ctx.current_issue()
        if preview is None:
            raise UnknownIssue(None)
    else:
        preview = issues.get_issue(ctx.session, number=number,
                                   default_free_percent=ctx.free_percent)
    standing = ctx.standing(openid, preview.number)
    if not standing.known:
        raise UnknownSubscriber(openid)
    card = issue_card(preview, unit=ctx.unit, balance=standing.balance,
                      unlocked=standing.unlocked, lead=lead,
                      link=ctx.make_link(openid, preview.number) if preview.is_free else None,
                      how_to_get=ways_for(ctx, openid, preview.number),
                      pass_note=None if preview.is_free else passes.covering_note(ctx, standing))
    ctx.note_event(events.CARD, openid=openid, issue_number=preview.number)
    return card


@router.command(r"本周|最新|latest|本期|this week")
@router.click("LATEST")
@reads_only
def latest(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    return Text(card_for(ctx, msg.openid, None))


@router.command(rf"(?:第\s*(?P<a>{ISSUE_NUMBER})\s*期|w\s*(?P<b>[0-9]{{1,6}})"
                rf"|week\s*(?P<c>[0-9]{{1,6}})|(?P<d>[0-9]{{1,6}}))")
@reads_only
def by_number(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    assert match is not None
    group = next(name for name, value in match.groupdict().items() if value)
    return Text(card_for(ctx, msg.openid, issue_arg(match, group)))


@router.command(r"(?:往期|list|archive)(?:\s*第?\s*(?P<n>[0-9]{1,4})\s*页?)?")
@router.click("ARCHIVE")
@reads_only
def archive(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    asked = issue_arg(match) or 1
    all_issues = issues.list_issues(ctx.session, default_free_percent=ctx.free_percent)
    if not all_issues:
        raise UnknownIssue(None)
    pages = (len(all_issues) + ARCHIVE_PAGE_SIZE - 1) // ARCHIVE_PAGE_SIZE
    page = min(max(asked, 1), pages)
    # Past the end (or page 0): say so, then show the nearest page rather than silently another.
    missing = [f"没有第 {asked} 页，往期目录共 {pages} 页，下面是第 {page} 页。", ""] \
        if page != asked else []
    unlocked = ledger.unlocked_issues(ctx.session, openid=msg.openid)
    chunk = all_issues[(page - 1) * ARCHIVE_PAGE_SIZE : page * ARCHIVE_PAGE_SIZE]
    lines = [*missing, f"往期目录（第 {page}/{pages} 页，共 {len(all_issues)} 期）"]
    for item in chunk:
        mark = "✅已解锁" if item.number in unlocked else ("免费" if item.is_free else "")
        lines.append(f"{issue_heading(item)} {mark}".rstrip())
    lines.append("")
    lines.append("回复期号（如「3」或「第3期」）查看该期话题")
    if page < pages:
        lines.append(f"回复「往期 {page + 1}」看下一页")
    if page > 1:
        lines.append(f"回复「往期 {page - 1}」看上一页")
    return Text(fit_bytes("\n".join(lines)))
