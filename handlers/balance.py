"""余额: the balance and the latest ledger entries; 充值 / 购买 / 会员: how to get tokens."""

from __future__ import annotations

import re

from handlers import gifts
from handlers.format import ledger_line
from handlers.passes import status_lines
from handlers.router import Context, Incoming, Reply, Router, Text, reads_only
from handlers.selling import ways_for
from storage import ledger

router = Router("balance")


@router.command(r"余额|balance|账户|我的")
@router.click("BALANCE")
@reads_only
def balance(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    amount = ledger.get_balance(ctx.session, openid=msg.openid)
    entries = ledger.recent_entries(ctx.session, openid=msg.openid, limit=5)
    lines = [f"💰 你的余额：{amount} {ctx.unit}", *status_lines(ctx, msg.openid)]
    if entries:
        lines.append("")
        lines.append("最近记录：")
        lines += [ledger_line(e, ctx.unit) for e in entries]
    else:
        lines.append("还没有任何记录。")
    lines += gifts.status_lines(ctx, msg.openid)
    lines.append("")
    lines.append(ctx.config.how_to_get)
    return Text("\n".join(lines))


# 充值 and its kin, 购买 / 会员 alone (购买 X and 会员卡 are handlers.passes'), in Chinese and
# English; a question mark or a polite tail is fine.
_BUYING = (r"(?:怎么|如何|怎样|我要|我想|想|在哪|在哪里|哪里)?"
           r"(?:充值|买豆|购买|充钱|付费|买|成为会员|开会员|买会员|办会员|加入会员|会员)"
           r"(?:方式|方法|渠道)?"
           r"|top ?up|recharge|buy(?: tokens)?|how to (?:buy|pay|top ?up)|pricing|prices?"
           r"|members?(?:hip)?")


@router.command(rf"(?:{_BUYING})[?？!！.。~～]*")
@router.click("TOPUP")
@reads_only
def how_to_top_up(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    """The balance and every way to get tokens (and passes); writes nothing."""
    amount = ctx.standing(msg.openid, None).balance
    return Text(f"💰 你的余额：{amount} {ctx.unit}\n\n{ways_for(ctx, msg.openid)}\n"
                f"到账后回复「余额」查看。")
