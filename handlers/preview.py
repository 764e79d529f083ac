"""试读: a taste of the free excerpt (its first paragraph, at most ~120 字) and a link to the
whole excerpt on the reader page, so the bubble stays about one phone screen. A free or already
unlocked issue needs no 试读: the reply says so and links to the full text."""

from __future__ import annotations

import re

from handlers.format import REPLY_LIMIT_BYTES, byte_len, fit_bytes, has_excerpt, issue_heading
from handlers.numbers import ISSUE_NUMBER
from handlers.router import Context, Incoming, Reply, Router, Text, issue_arg, reads_only
from handlers.selling import ways_for
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


@router.command(rf"(?:试读|preview)(?:\s*(?:第\s*)?(?P<n>{ISSUE_NUMBER})\s*期?)?")
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
    link = ctx.make_link(msg.openid, item.number)
    size = f"约 {item.char_count:,} 字"
    if item.is_free:
        return Text(f"📖 {issue_heading(item)}\n\n🎁 本期全部免费，无需试读，可直接阅读全文"
                    f"（{size}）：\n{link}")
    standing = ctx.standing(msg.openid, item.number)
    if standing.unlocked:
        return Text(f"📖 {issue_heading(item)}\n\n✅ 你已解锁本期，可直接阅读全文（{size}）：\n"
                    f"{link}")
    head = f"📖 试读｜{issue_heading(item)}"
    if has_excerpt(item):
        body = taste(item.excerpt_md)
        foot = f"\n\n阅读完整试读（约 {item.excerpt_char_count:,} 字）：\n{link}"
    else:
        body = f"本期没有免费试读部分，回复「第{item.number}期」查看本期话题。"
        foot = f"\n\n本期介绍：\n{link}"
    if standing.balance >= item.price:
        foot += f"\n\n解锁全文：回复「兑换 {item.number}」（{item.price} {ctx.unit}）"
    else:
        short = item.price - standing.balance
        foot += (f"\n\n解锁全文需 {item.price} {ctx.unit}，你的余额 {standing.balance} {ctx.unit}"
                 f"，还差 {short} {ctx.unit}。\n{ways_for(ctx, msg.openid, item.number)}\n"
                 f"{ctx.unit}够了之后回复「兑换 {item.number}」解锁全文")
    room = REPLY_LIMIT_BYTES - byte_len(head) - byte_len(foot) - 2
    return Text(f"{head}\n\n{fit_bytes(body, room)}{foot}")
