"""Reply text building: the issue card and WeChat's byte limit."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from zoneinfo import ZoneInfo

from storage.issues import IssuePreview
from storage.models import LedgerEntry

# WeChat drops text replies over 2048 bytes of UTF-8; one report says 2047, so stay a bit under.
REPLY_LIMIT_BYTES = 2000
LOCAL_TZ = ZoneInfo("Asia/Shanghai")

_CHINESE_ORDINALS = "一二三四五六七八九十"
# Characters that glue onto the previous one inside a single visible symbol (emoji sequences,
# skin tones, variation selectors, combining marks): never end a cut right before one of them.
_JOINERS = {"\u200d", "\ufe0f", "\ufe0e", "\u20e3"}


def _extends_previous(ch: str) -> bool:
    return (
        ch in _JOINERS
        or 0x1F3FB <= ord(ch) <= 0x1F3FF
        or 0xE0020 <= ord(ch) <= 0xE007F
        or unicodedata.category(ch) in ("Mn", "Me", "Mc")
    )


def fit_bytes(text: str, limit: int = REPLY_LIMIT_BYTES, ellipsis: str = "…") -> str:
    """Cut ``text`` to at most ``limit`` UTF-8 bytes on a character boundary without splitting
    an emoji sequence; appends ``ellipsis`` when something was cut."""
    if len(text.encode("utf-8")) <= limit:
        return text
    budget = limit - len(ellipsis.encode("utf-8"))
    cut = text.encode("utf-8")[: max(budget, 0)].decode("utf-8", "ignore")
    rest = text[len(cut) :]
    # Back off while the cut falls inside a multi-codepoint symbol.
    while cut and (
        (rest and _extends_previous(rest[0])) or cut[-1] == "\u200d" or _is_lone_flag(cut, rest)
    ):
        rest = cut[-1] + rest
        cut = cut[:-1]
    return cut.rstrip() + ellipsis


def _is_lone_flag(cut: str, rest: str) -> bool:
    # Regional indicators pair up into flags; an odd run at the end of the cut is half a flag.
    def ri(c: str) -> bool:
        return 0x1F1E6 <= ord(c) <= 0x1F1FF

    if not cut or not ri(cut[-1]) or not rest or not ri(rest[0]):
        return False
    run = len(cut) - len(cut.rstrip("".join(chr(c) for c in range(0x1F1E6, 0x1F200))))
    return run % 2 == 1


def byte_len(text: str) -> int:
    return len(text.encode("utf-8"))


def ordinal(i: int) -> str:
    return _CHINESE_ORDINALS[i] if i < len(_CHINESE_ORDINALS) else str(i + 1)


def local_date(dt: datetime | None) -> str:
    return dt.astimezone(LOCAL_TZ).strftime("%Y-%m-%d") if dt else "未发布"


def issue_heading(issue: IssuePreview) -> str:
    return f"第{issue.number}期｜{issue.title}"


def issue_card(
    issue: IssuePreview, *, unit: str, balance: int, unlocked: bool, lead: str = "",
    link: str | None = None, how_to_get: str = "", pass_note: str | None = None,
) -> str:
    """Title, summary, topics with their questions, price, balance and what this reader can
    do next: read (free, unlocked or covered by a pass), unlock (enough tokens) or get tokens
    (too few). ``link`` is the reader's full-text link, shown for a free issue; ``pass_note``
    says which pass covers it, shown instead of the price. Questions, then topics are dropped
    if the whole card would not fit one reply."""
    n = issue.number
    head = [lead] if lead else []
    head.append(f"📰 {issue_heading(issue)}")
    if issue.summary:
        head.append(issue.summary)
    size = f"全文约 {issue.char_count:,} 字"
    if issue.is_free:
        tail = ["", f"🎁 本期免费｜{size}"]
        tail.append(f"阅读全文：{link}" if link else f"回复「全文 {n}」免费阅读全文")
        more = f"回复「全文 {n}」查看"
    elif pass_note:
        tail = ["", f"🎫 {pass_note}｜{size}", f"回复「全文 {n}」阅读全部内容"]
        more = f"回复「全文 {n}」查看"
    elif unlocked:
        tail = ["", f"✅ 你已解锁本期｜{size}｜余额 {balance} {unit}",
                f"回复「全文 {n}」阅读全部内容"]
        more = f"回复「全文 {n}」查看"
    else:
        more = f"回复「试读 {n}」查看" if has_excerpt(issue) else f"回复「兑换 {n}」解锁后查看"
        taste = ([f"回复「试读 {n}」免费读前 {issue.free_percent}%"] if has_excerpt(issue)
                 else [])
        if balance >= issue.price:
            tail = ["", f"{size}｜价格 {issue.price} {unit}｜你的余额 {balance} {unit}",
                    *taste, f"回复「兑换 {n}」用 {issue.price} {unit}解锁全文"]
        else:
            short = issue.price - balance
            tail = ["", f"{size}｜价格 {issue.price} {unit}｜你的余额 {balance} {unit}"
                        f"（还差 {short} {unit}）",
                    *taste, how_to_get or f"回复「充值」了解如何获取{unit}",
                    f"{unit}够了之后回复「兑换 {n}」解锁全文"]
    return _with_topics(issue, head, tail, heading="本期话题", more=more)


def has_excerpt(issue: IssuePreview) -> bool:
    """Whether a paid issue has a free part to offer (free_percent can be 0)."""
    return bool(issue.excerpt_md.strip())


# A topic title longer than this (about 80 字) is cut so one topic cannot crowd out the rest.
_TOPIC_TITLE_BYTES = 240


def _with_topics(issue: IssuePreview, head: list[str], tail: list[str], *, heading: str,
                 more: str) -> str:
    """head, the topics with their questions, tail. When that would not fit one message the
    questions go first, then topics from the end (saying how many more there are and ``more``,
    how to see them), so the price and next steps always survive."""
    titles = [fit_bytes(t.title, _TOPIC_TITLE_BYTES) for t in issue.topics]
    # An overlong summary is cut to leave room for the tail and a few topics.
    fixed = byte_len("\n".join([*head[:-1], *tail])) + 300
    if issue.summary and head and head[-1] == issue.summary:
        head = [*head[:-1], fit_bytes(issue.summary, max(REPLY_LIMIT_BYTES - fixed, 0))]
    top = ["", heading] if heading else [""]

    def compose(body: list[str]) -> str | None:
        text = "\n".join(head + body + tail)
        return text if byte_len(text) <= REPLY_LIMIT_BYTES else None

    with_questions: list[str] = []
    for i, (title, topic) in enumerate(zip(titles, issue.topics, strict=True)):
        with_questions.append(f"{ordinal(i)}、{title}")
        with_questions += [f"  · {q}" for q in topic.questions]
    found = compose(top + with_questions) or compose(
        top + [f"{ordinal(i)}、{t}" for i, t in enumerate(titles)])
    for shown in range(len(titles) - 1, -1, -1):
        if found is not None:
            break
        hidden = len(titles) - shown
        note = (f"……还有 {hidden} 个话题，{more}" if shown
                else f"本期共 {hidden} 个话题，{more}")
        found = compose(top + [f"{ordinal(i)}、{t}" for i, t in enumerate(titles[:shown])]
                        + [note])
    return found if found is not None else fit_bytes("\n".join(head + tail))


_KIND_LABELS = {"topup": "充值", "adjust": "调整", "redeem": "兑换", "code": "兑换码",
                "gift": "赠送", "pass": "会员卡", "refund": "退款"}


def ledger_line(entry: LedgerEntry, unit: str) -> str:
    label = _KIND_LABELS.get(entry.kind, entry.kind)
    what = f"第{entry.issue_number}期" if entry.issue_number is not None else entry.reason
    when = entry.created_at.astimezone(LOCAL_TZ).strftime("%m-%d %H:%M")
    return f"{when} {label} {entry.amount:+d} {unit}（{what}）"


def broadcast_text(issue: IssuePreview, *, unit: str, publication: str = "会员通讯") -> str:
    """The weekly push: title, topics with their questions, and how to read. Every command
    names the issue, so answering an older push is about that push's issue. Questions are
    dropped (topics kept) if the message would pass WeChat's text limit."""
    n = issue.number
    head = [f"📰 《{publication}》新一期：{issue_heading(issue)}"]
    if issue.summary:
        head.append(issue.summary)
    if issue.is_free:
        tail = ["", f"🎁 本期免费：回复「全文 {n}」阅读全文"]
        more = f"回复「全文 {n}」查看"
    else:
        tail = ["", f"回复「第{n}期」查看本期详情与你的余额"]
        if has_excerpt(issue):
            tail.append(f"回复「试读 {n}」免费阅读开头部分")
        tail.append(f"回复「兑换 {n}」用 {issue.price} {unit}解锁全文")
        more = f"回复「第{n}期」查看"
    return _with_topics(issue, head, tail, heading="", more=more)
