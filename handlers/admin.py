"""Operator commands, only for the openids in ``[operators] openids``; from anyone else a
``#…`` message is ordinary unknown text and falls through to the hint."""

from __future__ import annotations

import re

from handlers.format import ledger_line
from handlers.numbers import parse_int
from handlers.router import Context, Incoming, Reply, Router, Text, normalize
from storage import ledger, subscribers
from storage.errors import InsufficientBalance, UnknownSubscriber
from storage.ledger import CreditKind

router = Router("admin")

USAGE = (
    "用法：\n#topup OPENID 数量 原因\n#adjust OPENID 增减量 原因\n#user OPENID\n"
    "#console（打开运营后台）"
)


def _args(msg: Incoming) -> list[str]:
    # Openids are case-sensitive: parse the original text, not the lower-cased command.
    return normalize(msg.raw_text, fold_case=False).split(maxsplit=3)


def _credit(ctx: Context, msg: Incoming, kind: CreditKind) -> Reply:
    args = _args(msg)
    if len(args) < 4:
        return Text(f"参数不全。\n{USAGE}")
    _, openid, raw_amount, reason = args
    amount = parse_int(raw_amount, signed=True)
    if amount is None:
        return Text(f"数量必须是整数（只用数字 0-9，减少用 -，不加 +），收到「{raw_amount}」，"
                    f"未执行。\n{USAGE}")
    try:
        result = ledger.credit(
            ctx.session, openid=openid, amount=amount, kind=kind, key=ctx.key, reason=reason,
            operator=msg.openid, max_topup=ctx.config.max_topup,
        )
    except InsufficientBalance as err:
        # Name the subscriber: the operator is not the one whose balance this is.
        return Text(f"余额不足，未执行：{openid} 的余额：{err.balance} {ctx.unit}，"
                    f"调整 {amount:+d} {ctx.unit}会使余额低于 0。")
    verb = "充值" if kind == "topup" else "调整"
    again = "（重复指令，未再次执行）" if result.replayed else ""
    return Text(
        f"✅ 已为 {openid} {verb} {result.entry.amount:+d} {ctx.unit}{again}\n"
        f"{openid} 的当前余额 {result.balance} {ctx.unit}\n原因：{result.entry.reason}"
    )


@router.command(r"#topup\b.*", operators=True)
def topup(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    return _credit(ctx, msg, "topup")


@router.command(r"#adjust\b.*", operators=True)
def adjust(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    return _credit(ctx, msg, "adjust")


@router.command(r"#user\b.*", operators=True)
def user(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    args = _args(msg)
    if len(args) != 2:
        return Text(f"参数有误。\n{USAGE}")
    openid = args[1]
    sub = subscribers.get_subscriber(ctx.session, openid=openid)
    if sub is None:
        raise UnknownSubscriber(openid)
    unlocked = sorted(ledger.unlocked_issues(ctx.session, openid=openid))
    lines = [
        f"用户 {openid}",
        f"状态：{'已关注' if sub.subscribed else '已取消关注'}",
        f"余额：{sub.balance} {ctx.unit}",
        f"已解锁：{', '.join(f'第{n}期' for n in unlocked) or '无'}",
    ]
    entries = ledger.recent_entries(ctx.session, openid=openid, limit=5)
    if entries:
        lines.append("最近记录：")
        lines += [ledger_line(e, ctx.unit) for e in entries]
    return Text("\n".join(lines))


@router.command(r"#console\s*", operators=True)
def console(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    """A one-time link to the web console, bound to the operator who asked for it."""
    if ctx.console_link is None:
        return Text("运营后台在这里不可用（未启用网页后台），请在服务器上用 newsbot 命令操作。")
    link = ctx.console_link(msg.openid)
    minutes = ctx.config.console_link_minutes
    hours = ctx.config.console_session_hours
    return Text(f"运营后台登录链接（仅限本人使用）：\n{link}\n\n"
                f"链接只能打开一次，{minutes} 分钟内有效；打开后登录保持 {hours} 小时。"
                "请勿转发。过期后再发送 #console 获取新链接。")


@router.command(r"#.*", operators=True)
def usage(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    return Text(f"未知的运营指令。\n{USAGE}")
