"""兑换码: a code sent alone, or after 兑换码 / 礼品码 / code / 兑换, redeemed for tokens, an
issue or a pass (storage.codes). Not ``@reads_only``: even a refusal writes, since every failed
attempt counts towards the freeze."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from handlers.config import ChatConfig
from handlers.format import issue_heading
from handlers.passes import until_text
from handlers.redeem import _full_text_news
from handlers.router import Context, Incoming, Reply, Router, Text
from handlers.selling import ways_to_get
from storage import codes, issues
from storage.codes import SEPARATORS, CodeOutcome
from storage.errors import UnknownIssue

router = Router("codes")

# Chat text arrives NFKC-normalised and lower-case (handlers.router.normalize).
_SYMBOL = f"[{codes.ALPHABET.lower()}]"
_SEP = "[" + re.escape(SEPARATORS) + "]"
# A code on its own: 16 code symbols as one word, or four groups of four. Nothing else is
# taken for an attempt, so ordinary text never counts towards the freeze.
BARE_CODE = rf"{_SYMBOL}{{16}}|{_SYMBOL}{{4}}(?:{_SEP}?{_SYMBOL}{{4}}){{3}}"
_PREFIX = r"(?:兑换码|礼品码|礼物码|code(?=[\s:]|$))\s*:?\s*"
CODE_FORMAT = "兑换码共 16 位，形如 ABCD-EFGH-JKMN-PQRS，只含数字 2-9 和字母（没有 0、1、I、L、O）"


def local_time(config: ChatConfig, dt: datetime, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """A time as the reader reads it: in [broadcast] timezone."""
    return dt.astimezone(ZoneInfo(config.timezone)).strftime(fmt)


def _duration(minutes: int) -> str:
    if minutes % 1440 == 0:
        return f"{minutes // 1440} 天"
    return f"{minutes // 60} 小时" if minutes % 60 == 0 else f"{minutes} 分钟"


def _prose_not_code(msg: Incoming) -> bool:
    """Four lower-case words of four letters ("next week safe bets") are English, not a code:
    a code has a digit in 99% of cases, and is shown (and usually pasted) in upper case."""
    raw = msg.raw_text.strip()
    return " " in msg.text and not any(ch.isdigit() for ch in msg.text) and raw == raw.lower()


@router.command(BARE_CODE)
def bare_code(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply | None:
    if _prose_not_code(msg):
        return None
    return _redeem(ctx, msg, msg.text)


@router.command(rf"{_PREFIX}(?P<code>.*)")
def prefixed_code(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    assert match is not None
    text = match.group("code")
    if not text:
        return Text(_how_to(ctx.config))
    return _redeem(ctx, msg, text)


# 兑换 N is the unlock of issue N (handlers.redeem, tried first); what else follows 兑换 is a
# code when it is written in letters, digits and separators only (兑换 本期, 兑换 ٣ are not).
@router.command(rf"兑换\s*:?\s*(?P<code>[0-9a-z{re.escape(SEPARATORS)}]*[0-9a-z]"
                rf"[0-9a-z{re.escape(SEPARATORS)}]*)")
def redeem_word(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    assert match is not None
    return _redeem(ctx, msg, match.group("code"))


def _how_to(config: ChatConfig) -> str:
    if not config.codes.enabled:
        return "本号暂未开通兑换码。\n" + ways_to_get(config)
    return f"请把兑换码直接发给我，例如「兑换码 ABCD-EFGH-JKMN-PQRS」。\n{CODE_FORMAT}。"


def _redeem(ctx: Context, msg: Incoming, text: str) -> Reply:
    rules = ctx.config.codes
    outcome = codes.redeem_code(
        ctx.session, openid=msg.openid, text=text, secret=rules.secret, key=ctx.key,
        max_failures=rules.max_failures, window=timedelta(minutes=rules.window_minutes),
        freeze=timedelta(minutes=rules.freeze_minutes), now=ctx.now)
    if outcome.status == "granted" and outcome.issue_number is not None:
        return _issue_granted(ctx, msg, outcome)
    return Text(reply_text(ctx, outcome))


def _next_steps(ctx: Context) -> str:
    current = ctx.current_issue()
    if current is None:
        return "回复「余额」查看余额。"
    n = current.number
    return f"回复「第{n}期」看本期内容，「兑换 {n}」用{ctx.unit}解锁全文。"


def _issue_granted(ctx: Context, msg: Incoming, outcome: CodeOutcome) -> Reply:
    number = outcome.issue_number
    assert number is not None
    try:
        item = issues.get_issue(ctx.session, number=number, default_free_percent=ctx.free_percent)
    except UnknownIssue:  # a code sold ahead of the issue: it reads once published
        return Text(f"🎉 兑换成功：第{number}期已为你解锁，发布后回复「全文 {number}」即可阅读。"
                    f"\n余额 {outcome.balance} {ctx.unit}（未扣{ctx.unit}）。")
    return _full_text_news(ctx, msg.openid, item,
                           f"🎉 兑换成功：{issue_heading(item)} 已为你解锁，未扣{ctx.unit}，"
                           f"余额 {outcome.balance} {ctx.unit}。")


def reply_text(ctx: Context, outcome: CodeOutcome) -> str:
    """The reply to every outcome but an issue granted (a News with the link)."""
    unit, config, status = ctx.unit, ctx.config, outcome.status
    if status == "granted" and outcome.tokens is not None:
        return (f"🎉 兑换成功：+{outcome.tokens} {unit}，余额 {outcome.balance} {unit}。\n"
                + _next_steps(ctx))
    if status == "granted" and outcome.period is not None:
        period = outcome.period
        offer = next((p for p in config.passes if p.id == period.pass_id), None)
        name = offer.name if offer else period.pass_id
        return (f"🎉 兑换成功：{name}（{period.days} 天）已开通，有效期至 "
                f"{until_text(config, period.ends_at)}。期间发布的每一期都能读全文，"
                f"不扣{unit}。\n余额 {outcome.balance} {unit}。" + _read_current(ctx))
    if status == "already_owned":
        n = outcome.issue_number
        return (f"你已经可以阅读第{n}期全文，这个码没有被使用，仍可转送给朋友。\n"
                f"回复「全文 {n}」阅读。")
    if status == "own_gift":
        return ("这是你送出的礼品码，自己不能领取，码也没有被使用。"
                "把它转发给朋友，让朋友把这个码发给本公众号即可领取。")
    if status == "frozen":
        assert outcome.frozen_until is not None
        return (f"兑换码错误次数过多，兑换已暂停到 {local_time(config, outcome.frozen_until)}。"
                "暂停期间发来的码不会被查看，也不会被使用，请到时再发。")
    if status == "disabled":
        return "本号暂未开通兑换码。\n" + ways_to_get(config)
    return _failure(ctx, outcome) + _freeze_note(ctx, outcome)


def _read_current(ctx: Context) -> str:
    current = ctx.current_issue()
    return f"\n回复「全文 {current.number}」阅读本期。" if current is not None else ""


def _failure(ctx: Context, outcome: CodeOutcome) -> str:
    status, batch = outcome.status, outcome.batch
    if status == "typo":
        return f"这个兑换码好像输错了一位（校验位对不上），请对照原码再发一次。\n{CODE_FORMAT}。"
    if status == "malformed":
        return f"这不像是一个兑换码。{CODE_FORMAT}。"
    if status == "unknown":
        return "没有找到这个兑换码，请核对后再发。"
    if status == "used_up":
        if batch is not None and batch.uses > 1:
            return f"这个兑换码的 {batch.uses} 个名额已经用完了。"
        return "这个兑换码已经被使用过了。"
    if status == "already_used":
        return "你已经用过这个兑换码了，同一个码每人只能用一次。"
    if status == "expired":
        assert batch is not None and batch.expires_at is not None
        return f"这个兑换码已于 {local_time(ctx.config, batch.expires_at)} 过期。"
    return "这个兑换码已停用。如有疑问，回复「人工」联系编辑。"  # revoked


def _freeze_note(ctx: Context, outcome: CodeOutcome) -> str:
    rules = ctx.config.codes
    if outcome.frozen_until is not None:
        return (f"\n错误次数过多，兑换已暂停到 {local_time(ctx.config, outcome.frozen_until)}，"
                "期间发来的码不会被使用。")
    left = outcome.failures_left
    if left is None:
        return ""
    return (f"\n再错 {left} 次，兑换将暂停 {_duration(rules.freeze_minutes)}"
            f"（{rules.window_minutes} 分钟内最多错 {rules.max_failures} 次）。")
