"""试读: the start of the free excerpt that fits one reply, and a link to all of it."""

from __future__ import annotations

import re

from handlers.format import REPLY_LIMIT_BYTES, byte_len, fit_bytes, issue_heading
from handlers.router import Context, Incoming, Reply, Router, Text, issue_arg, reads_only
from storage import issues
from storage.content import plain_text
from storage.errors import UnknownIssue

router = Router("preview")


@router.command(r"(?:试读|preview)(?:\s*(?:第\s*)?(?P<n>\d{1,6})\s*期?)?")
@router.click("PREVIEW")
@reads_only
def preview(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    number = issue_arg(match)
    if number is None:
        current = ctx.current_issue()
        if current is None:
            raise UnknownIssue(None)
        item = current
    else:
        item = issues.get_issue(ctx.session, number=number, default_free_percent=ctx.free_percent)
    head = f"📖 试读｜{issue_heading(item)}"
    link = ctx.make_link(msg.openid, item.number)
    body = plain_text(item.excerpt_md) if item.excerpt_md else "本期没有免费试读部分。"
    foot = (
        f"\n\n阅读完整试读（约 {item.excerpt_char_count:,} 字）：\n{link}"
        if item.excerpt_md or item.is_free else f"\n\n{link}"
    )
    if not item.is_free:
        foot += f"\n\n解锁全文：回复「兑换 {item.number}」（{item.price} {ctx.unit}）"
    room = REPLY_LIMIT_BYTES - byte_len(head) - byte_len(foot) - 2
    return Text(f"{head}\n\n{fit_bytes(body, room)}{foot}")
