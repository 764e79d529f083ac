"""This week's issue card, any issue's card by number, and the archive."""

from __future__ import annotations

import re

from handlers.format import fit_bytes, issue_card, issue_heading
from handlers.router import Context, Incoming, Reply, Router, Text, issue_arg, reads_only
from storage import issues, ledger
from storage.errors import UnknownIssue, UnknownSubscriber

router = Router("issue")

ARCHIVE_PAGE_SIZE = 10


def card_for(ctx: Context, openid: str, number: int | None, *, lead: str = "") -> str:
    """The card of issue ``number`` (None = current) as seen by ``openid``."""
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
    return issue_card(preview, unit=ctx.unit, balance=standing.balance,
                      unlocked=standing.unlocked, lead=lead)


@router.command(r"本周|最新|latest|本期|this week")
@router.click("LATEST")
@reads_only
def latest(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    return Text(card_for(ctx, msg.openid, None))


@router.command(r"(?:第\s*(?P<a>\d{1,6})\s*期|w\s*(?P<b>\d{1,6})|week\s*(?P<c>\d{1,6})|(?P<d>\d{1,6}))")
@reads_only
def by_number(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    assert match is not None
    number = int(next(g for g in match.groups() if g))
    return Text(card_for(ctx, msg.openid, number))


@router.command(r"(?:往期|list|archive)(?:\s*(?P<n>\d{1,4}))?")
@router.click("ARCHIVE")
@reads_only
def archive(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    page = max(issue_arg(match) or 1, 1)
    all_issues = issues.list_issues(ctx.session, default_free_percent=ctx.free_percent)
    if not all_issues:
        raise UnknownIssue(None)
    pages = (len(all_issues) + ARCHIVE_PAGE_SIZE - 1) // ARCHIVE_PAGE_SIZE
    page = min(page, pages)
    unlocked = ledger.unlocked_issues(ctx.session, openid=msg.openid)
    chunk = all_issues[(page - 1) * ARCHIVE_PAGE_SIZE : page * ARCHIVE_PAGE_SIZE]
    lines = [f"往期目录（第 {page}/{pages} 页，共 {len(all_issues)} 期）"]
    for item in chunk:
        mark = "✅已解锁" if item.number in unlocked else ("免费" if item.is_free else "")
        lines.append(f"{issue_heading(item)} {mark}".rstrip())
    lines.append("")
    lines.append("回复期号（如「3」或「第3期」）查看该期话题")
    if page < pages:
        lines.append(f"回复「往期 {page + 1}」看下一页")
    return Text(fit_bytes("\n".join(lines)))
