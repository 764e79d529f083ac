"""赠送: buy an issue or a pass for a friend with one's own tokens and get a single-use code to
forward (storage.gifts); and the giver's gift lines in 余额."""

from __future__ import annotations

import re

from handlers.codes import local_time
from handlers.config import ChatConfig, PassOffer
from handlers.format import issue_heading
from handlers.numbers import ISSUE_NUMBER
from handlers.router import Context, Incoming, Reply, Router, Text, issue_arg
from handlers.selling import shortfall_line, ways_for, ways_to_get
from storage import gifts, issues
from storage.errors import InsufficientBalance

router = Router("gifts")

_GIVE = r"(?:赠送|送给朋友|送|gift)"
FORWARD = "让朋友把这个码发给本公众号即可领取（只能领取一次）。回复「余额」可查看是否已被领取。"


def _disabled(config: ChatConfig) -> Text:
    return Text("本号暂未开通兑换码，暂时不能赠送。\n" + ways_to_get(config))


@router.command(rf"{_GIVE}\s*(?:第\s*)?(?P<n>{ISSUE_NUMBER})\s*期?")
def gift_issue(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    number = issue_arg(match)
    assert number is not None
    if not ctx.config.codes.enabled:
        return _disabled(ctx.config)
    item = issues.get_issue(ctx.session, number=number, default_free_percent=ctx.free_percent)
    if item.is_free:
        return Text(f"{issue_heading(item)} 是免费的，不用买：让朋友给本公众号回复「全文 {number}」"
                    "就能读。")
    try:
        gift = gifts.buy_gift(ctx.session, giver=msg.openid, secret=ctx.config.codes.secret,
                              key=ctx.key, issue_number=number, issue_price=item.price,
                              now=ctx.now)
    except InsufficientBalance as err:
        return Text(_shortfall(ctx, msg.openid, err, f"赠送 {number}",
                               f"赠送{issue_heading(item)}"))
    return Text(f"🎁 礼品码：{gift.code}\n送出：{issue_heading(item)} 全文，扣除 {item.price} "
                f"{ctx.unit}，余额 {gift.balance} {ctx.unit}。\n{FORWARD}")


def _gift_pass(ctx: Context, msg: Incoming, offer: PassOffer) -> Reply:
    if not ctx.config.codes.enabled:
        return _disabled(ctx.config)
    try:
        gift = gifts.buy_gift(ctx.session, giver=msg.openid, secret=ctx.config.codes.secret,
                              key=ctx.key, pass_id=offer.id, pass_days=offer.days,
                              pass_price=offer.price, now=ctx.now)
    except InsufficientBalance as err:
        return Text(_shortfall(ctx, msg.openid, err, f"赠送 {offer.name}", f"赠送{offer.name}"))
    return Text(f"🎁 礼品码：{gift.code}\n送出：{offer.name}（{offer.days} 天），扣除 "
                f"{offer.price} {ctx.unit}，余额 {gift.balance} {ctx.unit}。\n{FORWARD}")


def _shortfall(ctx: Context, openid: str, err: InsufficientBalance, command: str,
               what: str) -> str:
    return (f"余额不足，未扣费。{what}："
            + shortfall_line(needed=err.needed, balance=err.balance, unit=ctx.unit)
            + f"\n{ways_for(ctx, openid)}\n{ctx.unit}够了之后回复「{command}」。")


@router.command(r"(?:赠送\s*|gift\s+)(?P<what>\S.*)")
def gift_named(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    assert match is not None
    offer = ctx.config.find_pass(match.group("what"))
    if offer is None:
        return Text(f"没有找到可赠送的「{match.group('what')}」。\n" + _how_to(ctx))
    return _gift_pass(ctx, msg, offer)


# 送 is an everyday word: after it, only a pass's exact name is a gift (送你一朵花 is not).
@router.command(r"送\s*(?P<what>\S+)")
def gift_pass_short(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply | None:
    assert match is not None
    offer = ctx.config.find_pass(match.group("what"))
    return None if offer is None else _gift_pass(ctx, msg, offer)


@router.command(r"赠送|gift|送礼|礼物|怎么送(?:给朋友)?|如何赠送")
def how_to_give(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    return Text(_how_to(ctx))


def _how_to(ctx: Context) -> str:
    if not ctx.config.codes.enabled:
        return _disabled(ctx.config).content
    current = ctx.current_issue()
    n = current.number if current is not None else 3
    lines = [f"用你的{ctx.unit}给朋友买一期或一张会员卡，我会给你一个礼品码，转发给朋友即可。",
             f"回复「赠送 {n}」送第{n}期"]
    lines += [f"回复「赠送 {p.name}」送{p.name}（{p.days} 天，{p.price} {ctx.unit}）"
              for p in ctx.config.passes]
    return "\n".join(lines)


_SHORT = "%m-%d %H:%M"


def status_lines(ctx: Context, openid: str) -> list[str]:
    """The giver's latest gifts for 余额: what, when, and whether redeemed (the code again
    while it is not)."""
    found = gifts.given(ctx.session, giver=openid, secret=ctx.config.codes.secret)
    if not found:
        return []
    lines = ["", "我送出的礼物："]
    for g in found:
        b = g.batch
        what = f"第{b.issue_number}期" if b.issue_number is not None else _pass_name(ctx, b.pass_id)
        when = local_time(ctx.config, g.bought_at, _SHORT)
        if g.redeemed_at is not None:
            state = "已领取（" + local_time(ctx.config, g.redeemed_at, _SHORT) + "）"
        elif g.revoked:
            state = "已停用"
        else:
            state = "未领取" + (f"，礼品码 {g.code}" if g.code else "")
        lines.append(f"{when} {what}：{state}")
    return lines


def _pass_name(ctx: Context, pass_id: str | None) -> str:
    offer = next((p for p in ctx.config.passes if p.id == pass_id), None)
    return offer.name if offer is not None else f"会员卡 {pass_id}"
