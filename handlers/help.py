"""帮助, and the fallback that makes sure no message is met with silence (人工 and free text
are handlers.inbox's, tried just before)."""

from __future__ import annotations

import re

from handlers.config import ChatConfig
from handlers.router import Context, Incoming, Reply, Router, Silent, Text, reads_only

router = Router("help")
# Tried last, after handlers.inbox has taken the free text: what is left gets the hint.
fallback_router = Router("help-fallback")

HELP = """📮 可用指令
本周 — 本期话题与价格
试读 [期号] — 免费试读
兑换 [期号] — 用{unit}解锁全文
全文 [期号] — 获取全文链接
往期 [页码] — 往期目录
3 / 第3期 / 第三期 — 查看某一期
余额 — {unit}余额与最近记录
充值 / 购买 — 获取{unit}的方式
{selling}订阅 / 退订 — 订阅与退订说明
人工 — 找编辑
帮助 — 显示本说明

期号可省略，默认本期。"""


def selling_lines(config: ChatConfig) -> str:
    """The help lines of the selling features that are on: codes need [codes] secret, passes
    need [[passes]], gifts are codes (of an issue, or of a pass when passes are on)."""
    lines = []
    if config.codes.enabled:
        lines.append("兑换码 — 直接发送兑换码（可带横线）即可兑换")
    if config.passes:
        first = config.passes[0].name
        lines.append("会员卡 — 查看会员卡：有效期内每期全文")
        lines.append(f"开通 {first} — 用{config.unit}开通或续期会员卡")
    if config.codes.enabled:
        gift = f"赠送 [期号] / 赠送 {config.passes[0].name}" if config.passes else "赠送 [期号]"
        lines.append(f"{gift} — 买给朋友，得到一个兑换码转发给 TA")
    return "".join(line + "\n" for line in lines)


HINT = "没太明白你的意思 🙂 回复「帮助」查看可用指令，回复「本周」看本期内容。"


@router.command(r"帮助|help|\?|菜单|menu|h")
@router.click("HELP")
@reads_only
def show_help(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    return Text(HELP.format(unit=ctx.unit, selling=selling_lines(ctx.config)))


@fallback_router.message()
@reads_only
def fallback(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    if msg.msg_type == "event" and msg.event not in ("click", "scan"):
        # View clicks, location reports and other pushes expect no answer.
        return Silent()
    return Text(HINT)
