"""余额: the balance and the latest ledger entries; 充值: how to get tokens."""

from __future__ import annotations

import re

from handlers import gifts
from handlers.format import ledger_line
from handlers.passes import status_lines
from handlers.router import Context, Incoming, Reply, Router, Text, reads_only
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


@router.command(r"(?:怎么|如何|怎样|我要|我想|在哪)?(?:充值|买豆|购买|充钱)(?:方式|方法)?[?!.。~]*"
                r"|top ?up|recharge")
@router.click("TOPUP")
@reads_only
def how_to_top_up(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    amount = ctx.standing(msg.openid, None).balance
    return Text(f"💰 你的余额：{amount} {ctx.unit}\n\n{ctx.config.how_to_get}\n"
                f"到账后回复「余额」查看。")
