"""The ways to get tokens, worded once: every "not enough tokens" reply and every answer to
充值 / 购买 / 会员 ends with them, so a reader always learns every way in (WeChat Pay when
[pay] is set, operator top-up, a redemption code, a pass) and the exact words to reply."""

from __future__ import annotations

from handlers.config import ChatConfig, PassOffer
from handlers.router import Context
from storage.payments import yuan


def pass_line(offer: PassOffer, unit: str) -> str:
    return f"「开通 {offer.name}」{offer.days} 天内每期全文，{offer.price} {unit}"


def pay_line(config: ChatConfig, pay_url: str | None, *, issue_number: int | None) -> str:
    """The WeChat Pay way in: the reader's own pay page, or how to get it."""
    cheapest = min(p.price_fen for p in config.pay_packages)
    if pay_url is None:
        return f"微信支付充值（¥{yuan(cheapest)} 起）：回复「充值」获取你的支付链接。"
    if issue_number is not None:
        return f"微信支付补差价，付款后直接解锁第 {issue_number} 期：\n{pay_url}"
    return f"微信支付在线充值（¥{yuan(cheapest)} 起）：\n{pay_url}"


def ways_to_get(config: ChatConfig, *, pay_url: str | None = None,
                issue_number: int | None = None) -> str:
    """How to get tokens (and passes), one way per line: WeChat Pay when [pay] is set (the
    reader's own ``pay_url``, for ``issue_number`` when it offers buy-and-unlock), [tokens]
    how_to_get, then codes when [codes] is on, then the passes of [[passes]] with the words
    that buy them."""
    lines = [pay_line(config, pay_url, issue_number=issue_number)] if config.pay_enabled else []
    lines.append(config.how_to_get)
    if config.codes.enabled:
        lines.append("有兑换码？直接把兑换码发给我即可。")
    if config.passes:
        lines.append("会员卡：" + "；".join(pass_line(p, config.unit) for p in config.passes))
    return "\n".join(lines)


def ways_for(ctx: Context, openid: str, issue_number: int | None = None) -> str:
    """``ways_to_get`` with the reader's own pay link when payments are on."""
    link = ctx.pay_link(openid, issue_number) if ctx.pay_link is not None else None
    return ways_to_get(ctx.config, pay_url=link, issue_number=issue_number)


def shortfall_line(*, needed: int, balance: int, unit: str) -> str:
    """The exact numbers of a refusal for too few tokens."""
    return (f"需要 {needed} {unit}，你的余额 {balance} {unit}，"
            f"还差 {needed - balance} {unit}。")


def not_enough(ctx: Context, openid: str, *, what: str, needed: int, balance: int,
               issue_number: int | None = None) -> str:
    """A refusal for too few tokens: what was not done, the exact shortfall, and every way to
    get more. ``what`` says what was refused, e.g. 「第3期｜标题 」."""
    return (f"余额不足，未扣费：{what}"
            + shortfall_line(needed=needed, balance=balance, unit=ctx.unit)
            + "\n" + ways_for(ctx, openid, issue_number))
