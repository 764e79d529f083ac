"""试读: a taste of the free excerpt (its first paragraph, at most ~120 字) and a link to the
whole excerpt on the reader page; the bubble stays about one phone screen."""

from __future__ import annotations

import re

from handlers.format import REPLY_LIMIT_BYTES, byte_len, fit_bytes, issue_heading
from handlers.router import Context, Incoming, Reply, Router, Text, issue_arg, reads_only
from storage import issues
from storage.content import plain_text
from storage.errors import UnknownIssue

router = Router("preview")

# Length of the taste in 字 (non-space characters): about four lines of a chat bubble.
TASTE_CHARS = 120
_SENTENCE_ENDS = frozenset("。！？!?；;")
_CLOSERS = frozenset("”’」』）)》\"'")


def _chars(text: str) -> int:
    return sum(not ch.isspace() for ch in text)


def taste(excerpt_md: str, limit: int = TASTE_CHARS) -> str:
    """The excerpt's first paragraph as plain text, cut at the last sentence end within
    ``limit`` 字 when longer (mid-sentence only if no sentence ends early enough); "…" marks
    that the excerpt goes on."""
    paragraphs = [p.strip() for p in plain_text(excerpt_md).split("\n\n") if p.strip()]
    first = paragraphs.pop(0) if paragraphs else ""
    while paragraphs and _chars(first) < limit // 3:  # a heading or a short line leads
        first += "\n" + paragraphs.pop(0)
    count, cut = 0, 0
    for i, ch in enumerate(first):
        count += not ch.isspace()
        if count > limit:
            break
        if ch in _SENTENCE_ENDS:
            cut = i + 1
            while cut < len(first) and first[cut] in _CLOSERS:  # keep 。」 together
                cut += 1
    else:
        return first + ("…" if paragraphs else "")
    hard = i
    # A sentence end in the last third of the budget reads better than a cut mid-sentence.
    end = cut if _chars(first[:cut]) >= limit // 3 else hard
    return first[:end].rstrip() + "…"


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
    body = taste(item.excerpt_md) if item.excerpt_md else "本期没有免费试读部分。"
    foot = (
        f"\n\n阅读完整试读（约 {item.excerpt_char_count:,} 字）：\n{link}"
        if item.excerpt_md or item.is_free else f"\n\n{link}"
    )
    if not item.is_free:
        foot += f"\n\n解锁全文：回复「兑换 {item.number}」（{item.price} {ctx.unit}）"
    room = REPLY_LIMIT_BYTES - byte_len(head) - byte_len(foot) - 2
    return Text(f"{head}\n\n{fit_bytes(body, room)}{foot}")
