"""兑换 (unlock an issue with tokens), the menu's unlock button (asks, never spends) and 全文
(the full-text link)."""

from __future__ import annotations

import re

from handlers.format import has_excerpt, issue_heading
from handlers.numbers import ISSUE_NUMBER
from handlers.router import Context, Incoming, News, Reply, Router, Text, issue_arg, reads_only
from handlers.selling import not_enough, ways_for
from storage import issues, ledger
from storage.errors import InsufficientBalance, UnknownIssue
from storage.issues import IssuePreview

router = Router("redeem")


def _target(ctx: Context, number: int | None) -> IssuePreview:
    if number is None:
        current = ctx.current_issue()
        if current is None:
            raise UnknownIssue(None)
        return current
    return issues.get_issue(ctx.session, number=number, default_free_percent=ctx.free_percent)


def _ttl_note(ctx: Context) -> str:
    hours = ctx.config.link_ttl_hours
    return f"链接 {hours // 24} 天内有效" if hours % 24 == 0 else f"链接 {hours} 小时内有效"


def _full_text_news(ctx: Context, openid: str, item: IssuePreview, note: str) -> News:
    return News(
        title=f"全文｜{issue_heading(item)}",
        description=f"{note}\n点击阅读全文（{_ttl_note(ctx)}，过期回复「全文 {item.number}」再取）",
        url=ctx.make_link(openid, item.number),
    )


@router.command(rf"(?:兑换|解锁|unlock|redeem)(?:\s*(?:第\s*)?(?P<n>{ISSUE_NUMBER})\s*期?)?")
def unlock(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    """Typed 兑换: spends at once (the words are the confirmation)."""
    item = _target(ctx, issue_arg(match))
    if item.is_free:  # nothing to charge, nothing to write: just the link
        return _full_text_news(ctx, msg.openid, item, f"本期免费，无需兑换，不扣{ctx.unit}。")
    try:
        result = ledger.redeem(ctx.session, openid=msg.openid, issue_number=item.number,
                               price=item.price, key=ctx.key)
    except InsufficientBalance as err:
        return Text(_shortfall(ctx, msg.openid, item, balance=err.balance))
    if result.status == "free":
        return _full_text_news(ctx, msg.openid, item, "本期免费，无需兑换。")
    if result.status == "pass":
        return _full_text_news(ctx, msg.openid, item,
                               f"你的会员卡包含本期，无需兑换，未扣{ctx.unit}。")
    if result.status == "already":
        return _full_text_news(ctx, msg.openid, item,
                               f"你已解锁过本期，未重复扣费。余额 {result.balance} {ctx.unit}。")
    return _full_text_news(
        ctx, msg.openid, item,
        f"兑换成功：扣除 {item.price} {ctx.unit}，余额 {result.balance} {ctx.unit}。",
    )


@router.click("UNLOCK")
@reads_only
def confirm_unlock(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    """The menu's unlock button never spends (a tap is easily a mistake, and WeChat gives a
    click no text to confirm with): it shows the price and the balance and asks for 「兑换 N」;
    an issue the reader may already read gets its link."""
    item = _target(ctx, None)
    if item.is_free:
        return _full_text_news(ctx, msg.openid, item, f"本期免费，无需兑换，不扣{ctx.unit}。")
    standing = ctx.standing(msg.openid, item.number)
    if standing.unlocked:
        return _full_text_news(ctx, msg.openid, item,
                               f"你已可阅读本期全文（已解锁或会员卡包含），无需兑换，未扣{ctx.unit}。")
    if standing.balance < item.price:
        return Text(_shortfall(ctx, msg.openid, item, balance=standing.balance))
    lines = [
        f"解锁 {issue_heading(item)}：价格 {item.price} {ctx.unit}，"
        f"你的余额 {standing.balance} {ctx.unit}。",
        f"确认解锁请回复「兑换 {item.number}」（扣 {item.price} {ctx.unit}，"
        f"余额将为 {standing.balance - item.price} {ctx.unit}）。",
    ]
    if has_excerpt(item):
        lines.append(f"想先看看？回复「试读 {item.number}」")
    return Text("\n".join(lines))


@router.command(rf"(?:全文|阅读|read)(?:\s*(?:第\s*)?(?P<n>{ISSUE_NUMBER})\s*期?)?")
@router.click("READ")
@reads_only
def read(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    item = _target(ctx, issue_arg(match))
    if item.is_free:
        return _full_text_news(ctx, msg.openid, item, "本期免费阅读。")
    standing = ctx.standing(msg.openid, item.number)
    if standing.unlocked:
        return _full_text_news(ctx, msg.openid, item,
                               "你的会员卡包含本期。" if standing.covered else "你已解锁本期。")
    balance = standing.balance
    lines = [
        f"{issue_heading(item)} 尚未解锁。",
        f"价格 {item.price} {ctx.unit}｜你的余额 {balance} {ctx.unit}",
    ]
    if balance >= item.price:
        lines.append(f"回复「兑换 {item.number}」立即解锁全文")
    else:
        lines.append(f"还差 {item.price - balance} {ctx.unit}。")
        lines.append(ways_for(ctx, msg.openid, item.number))
        lines.append(f"{ctx.unit}够了之后回复「兑换 {item.number}」解锁全文")
    if has_excerpt(item):
        lines.append(f"回复「试读 {item.number}」先读免费部分")
    return Text("\n".join(lines))


def _shortfall(ctx: Context, openid: str, item: IssuePreview, *, balance: int) -> str:
    """Too few tokens for 兑换: the numbers, every way to get tokens, and what to reply then."""
    lines = [
        not_enough(ctx, openid, what=f"{issue_heading(item)} ", needed=item.price,
                   balance=balance, issue_number=item.number),
        f"{ctx.unit}够了之后回复「兑换 {item.number}」解锁全文",
    ]
    if has_excerpt(item):
        lines.append(f"现在可以先回复「试读 {item.number}」免费读开头")
    return "\n".join(lines)
