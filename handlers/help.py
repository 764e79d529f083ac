"""帮助, and the fallback that makes sure no message is met with silence."""

from __future__ import annotations

import re

from handlers.router import Context, Incoming, Reply, Router, Silent, Text, reads_only

router = Router("help")

HELP = """📮 可用指令
本周 — 本期话题与价格
试读 [期号] — 免费试读
兑换 [期号] — 用{unit}解锁全文
全文 [期号] — 获取全文链接
往期 — 往期目录
3 / 第3期 — 查看某一期
余额 — {unit}余额与最近记录
帮助 — 显示本说明

期号可省略，默认本期。"""

HINT = "没太明白你的意思 🙂 回复「帮助」查看可用指令，回复「本周」看本期内容。"


@router.command(r"帮助|help|\?|菜单|menu|h")
@router.click("HELP")
@reads_only
def show_help(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    return Text(HELP.format(unit=ctx.unit))


@router.message()
@reads_only
def fallback(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    if msg.msg_type == "event" and msg.event not in ("click", "scan"):
        # View clicks, location reports and other pushes expect no answer.
        return Silent()
    return Text(HINT)
