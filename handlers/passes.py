"""会员卡: the passes on offer, buying one with tokens (开通 / 购买 / 续费 …), and the pass
lines other replies show (余额, the issue card). With no ``[[passes]]`` configured every route
here steps aside and no reply mentions passes."""

from __future__ import annotations

import re
from datetime import datetime
from zoneinfo import ZoneInfo

from handlers.config import ChatConfig, PassOffer
from handlers.numbers import ISSUE_NUMBER
from handlers.router import Context, Incoming, Reply, Router, Text, reads_only
from handlers.selling import pass_line, shortfall_line, ways_for
from storage import ledger, passes
from storage.errors import InsufficientBalance
from storage.passes import PassPurchase
from storage.subscribers import Standing

router = Router("passes")

# Words that mean "the passes", not one of them: 开通会员 lists what there is to open.
_ANY_PASS = {"", "会员", "会员卡", "vip", "pass", "passes"}
_ISSUE_WORDS = re.compile(rf"第?\s*(?:{ISSUE_NUMBER})\s*期?")


def until_text(config: ChatConfig, moment: datetime) -> str:
    """A pass's end in the configured time zone, e.g. ``2027-01-01 08:00（北京时间）``."""
    zone = config.timezone
    label = "北京时间" if zone in ("Asia/Shanghai", "Asia/Chongqing", "PRC") else zone
    return f"{moment.astimezone(ZoneInfo(zone)):%Y-%m-%d %H:%M}（{label}）"


def pass_name(config: ChatConfig, pass_id: str) -> str:
    offer = next((p for p in config.passes if p.id == pass_id), None)
    return offer.name if offer is not None else pass_id


def _running(ctx: Context, openid: str) -> str | None:
    """The reader's running pass: its name and until when."""
    held = passes.status(ctx.session, openid=openid, now=ctx.now)
    if held is None:
        return None
    return f"{pass_name(ctx.config, held.pass_id)}，有效至 {until_text(ctx.config, held.until)}"


def status_lines(ctx: Context, openid: str) -> list[str]:
    """The reader's running pass for 余额; nothing without one (or with passes off)."""
    running = _running(ctx, openid) if ctx.config.passes else None
    return [] if running is None else [f"🎫 会员卡：{running}"]


def covering_note(ctx: Context, standing: Standing) -> str | None:
    """For the card of an issue a pass covers (``standing.covered``): until when the reader's
    pass runs. None with passes off."""
    if not ctx.config.passes or not standing.covered:
        return None
    if standing.pass_until is None or standing.pass_until <= ctx.now:
        return "本期在你的会员卡有效期内，已包含"  # the pass has run out; the issue stays theirs
    return f"会员卡有效至 {until_text(ctx.config, standing.pass_until)}，本期已包含"


def _offers(config: ChatConfig) -> list[str]:
    return [f"· {pass_line(offer, config.unit)}" for offer in config.passes]


@router.command(r"会员卡|会员卡列表|我的会员卡|月卡|季卡|半年卡|年卡|周卡|passes|pass")
@router.click("PASSES")
@reads_only
def list_passes(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply | None:
    if not ctx.config.passes:
        return None
    lines = ["🎫 会员卡：有效期内每期全文直接阅读，不用逐期兑换。", *_offers(ctx.config)]
    standing = ctx.standing(msg.openid, None)
    running = _running(ctx, msg.openid) if standing.known else None
    if running is not None:
        lines += ["", f"你的会员卡：{running}", "再次开通从到期时间起顺延。"]
    lines += ["", f"你的余额：{standing.balance} {ctx.unit}"]
    return Text("\n".join(lines))


# 购买, 买豆 and buy alone are the buying conversation's (handlers.balance): only with a word.
@router.command(r"(?:开通|续费|续订)\s*(?P<word>.*)")
@router.command(r"(?:购买|买)\s*(?P<word>.+)")
@router.command(r"buy\s+(?P<word>.+)")
def buy_pass(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply | None:
    if not ctx.config.passes or match is None:
        return None
    word = match["word"].strip()
    if _ISSUE_WORDS.fullmatch(word):  # 买 3, 购买第3期: an issue, not a pass
        return None
    if word in _ANY_PASS:
        return list_passes(ctx, msg, None)
    offer = ctx.config.find_pass(word) or ctx.config.find_pass(word.removesuffix("会员卡"))
    if offer is None:
        return Text("\n".join([f"没有名为「{word}」的会员卡。可以开通：",
                               *_offers(ctx.config)]))
    try:
        bought = passes.buy(ctx.session, openid=msg.openid, pass_id=offer.id, days=offer.days,
                            price=offer.price, key=ctx.key, now=ctx.now,
                            reason=f"{offer.name} {offer.days} 天")
    except InsufficientBalance as err:
        return Text(_shortfall(ctx, msg.openid, offer, balance=err.balance))
    return Text(_bought(ctx, offer, bought))


def _bought(ctx: Context, offer: PassOffer, bought: PassPurchase) -> str:
    unit = ctx.unit
    held = passes.status(ctx.session, openid=bought.period.openid, now=ctx.now)
    until = until_text(ctx.config, held.until if held is not None else bought.period.ends_at)
    extended = bought.period.starts_at > bought.period.created_at
    lines = [
        f"✅ {offer.name}已续期 {offer.days} 天，有效至 {until}。" if extended else
        f"✅ 已开通{offer.name}（{offer.days} 天），有效至 {until}。",
        f"扣除 {-bought.entry.amount} {unit}，余额 {bought.balance} {unit}。",
        "有效期内发布的每一期（以及开通时的本期）都可直接阅读全文。",
    ]
    current = ctx.current_issue()
    if current is not None and not current.is_free and ledger.may_read(
            ctx.session, openid=bought.period.openid, issue_number=current.number):
        lines.append(f"回复「全文 {current.number}」阅读本期全文")
    return "\n".join(lines)


def _shortfall(ctx: Context, openid: str, offer: PassOffer, *, balance: int) -> str:
    return "\n".join([
        f"余额不足，未开通{offer.name}："
        + shortfall_line(needed=offer.price, balance=balance, unit=ctx.unit),
        ways_for(ctx, openid),
        f"{ctx.unit}够了之后回复「开通 {offer.name}」",
    ])
