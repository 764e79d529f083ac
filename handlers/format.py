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
    issue: IssuePreview, *, unit: str, balance: int, unlocked: bool, lead: str = ""
) -> str:
    """Title, summary, topics with their questions, price, balance and what to reply next.
    Questions are dropped (topics kept) if the whole card would not fit one reply."""
    head = [lead] if lead else []
    head.append(f"📰 {issue_heading(issue)}")
    if issue.summary:
        head.append(issue.summary)
    tail = ["", f"全文约 {issue.char_count:,} 字，免费试读约 {issue.free_percent}%。"]
    if issue.is_free:
        tail += ["本期免费阅读。", "回复「全文」阅读全部内容"]
    elif unlocked:
        tail += [f"你已解锁本期｜余额 {balance} {unit}", f"回复「全文 {issue.number}」阅读全部内容"]
    else:
        tail += [
            f"价格 {issue.price} {unit}｜你的余额 {balance} {unit}",
            f"回复「试读 {issue.number}」免费读前 {issue.free_percent}%",
            f"回复「兑换 {issue.number}」用 {issue.price} {unit}解锁全文",
        ]
    return _with_topics(issue, head, tail, heading="本期话题")


def _with_topics(issue: IssuePreview, head: list[str], tail: list[str], *, heading: str) -> str:
    """head, the topics with their questions, tail — dropping the questions, then the topics,
    when the text would not fit one message, so the price and next steps always survive."""
    for with_questions in (True, False):
        body = ["", heading] if heading else [""]
        for i, topic in enumerate(issue.topics):
            body.append(f"{ordinal(i)}、{topic.title}")
            if with_questions:
                body += [f"  · {q}" for q in topic.questions]
        text = "\n".join(head + body + tail)
        if byte_len(text) <= REPLY_LIMIT_BYTES:
            return text
    return fit_bytes("\n".join(head + tail))


_KIND_LABELS = {"topup": "充值", "adjust": "调整", "redeem": "兑换"}


def ledger_line(entry: LedgerEntry, unit: str) -> str:
    label = _KIND_LABELS.get(entry.kind, entry.kind)
    what = f"第{entry.issue_number}期" if entry.issue_number is not None else entry.reason
    when = entry.created_at.astimezone(LOCAL_TZ).strftime("%m-%d %H:%M")
    return f"{when} {label} {entry.amount:+d} {unit}（{what}）"


def broadcast_text(issue: IssuePreview, *, unit: str) -> str:
    """The weekly push: title, topics with their questions, and how to read. Questions are
    dropped (topics kept) if the message would pass WeChat's text limit."""
    head = [f"📰 新一期会员通讯：{issue_heading(issue)}"]
    if issue.summary:
        head.append(issue.summary)
    tail = ["", "回复「本周」查看本期，回复「试读」免费阅读开头部分"]
    if not issue.is_free:
        tail.append(f"回复「兑换」用 {issue.price} {unit}解锁全文")
    return _with_topics(issue, head, tail, heading="")
