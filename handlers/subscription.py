"""Follow, unfollow, a follower scanning a QR code, and what 订阅 / 退订 mean here.
Unfollowing keeps balance and unlocks (they are financial records); a returning follower finds
them intact and is welcomed back with their balance."""

from __future__ import annotations

import re

from handlers.config import ChatConfig
from handlers.issue import card_for
from handlers.router import Context, Incoming, Reply, Router, Silent, Text, reads_only
from storage import subscribers
from storage.errors import UnknownIssue

router = Router("subscription")

_END = r"[?!.。~]*"  # 怎么订阅？ / 退订！ (full-width marks are ASCII after normalize)


def schedule_sentence(config: ChatConfig) -> str:
    """When new issues come, worded truthfully for the push mode."""
    when = config.schedule if config.schedule != "按计划" else "定期"
    if when[-1] in "0123456789":  # 每周一 08:00 发布, not 08:00发布
        when += " "
    if config.push_mode == "off":
        return (f"新一期{when}发布。本号不主动推送：发布后你下次给我发消息时，回复的开头会"
                "提醒你新一期已发布。")
    return f"新一期{when}推送到这里。"


def welcome(config: ChatConfig) -> str:
    return (f"欢迎订阅《{config.publication}》！{schedule_sentence(config)}"
            "回复「帮助」查看全部指令。")


@router.event("subscribe")
def on_subscribe(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    returning = subscribers.follow(ctx.session, openid=msg.openid, at=ctx.now)
    if returning:
        balance = ctx.standing(msg.openid, None).balance
        lead = (f"欢迎回来！你在《{ctx.config.publication}》的余额 {balance} {ctx.unit}"
                "和已解锁的各期都还在。回复「帮助」查看全部指令。")
    else:
        lead = welcome(ctx.config)
    try:
        return Text(card_for(ctx, msg.openid, None, lead=lead + "\n"))
    except UnknownIssue:
        return Text(lead)


@router.event("unsubscribe")
def on_unsubscribe(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    subscribers.set_subscribed(ctx.session, openid=msg.openid, subscribed=False, at=ctx.now)
    return Silent()


@router.event("scan")
@reads_only
def on_scan(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    """A follower scanned one of the account's QR codes: show them this week's card."""
    return Text(card_for(ctx, msg.openid, None))


@router.command(rf"(?:怎么|如何|怎样)?订阅{_END}|subscribe")
@reads_only
def about_subscribing(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    return Text(
        f"你已关注本公众号，这就是订阅了《{ctx.config.publication}》，无需其他操作。\n"
        f"{schedule_sentence(ctx.config)}\n"
        f"每期都能免费试读开头部分、查看话题和问题，用{ctx.unit}解锁全文。"
        "回复「本周」看本期，回复「帮助」查看全部指令。")


@router.command(rf"(?:怎么|如何|怎样|我要|我想)?(?:退订|取消订阅|取消关注){_END}|unsubscribe")
@reads_only
def about_unsubscribing(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    balance = ctx.standing(msg.openid, None).balance
    quiet = ("本号不主动推送，平时不会打扰你。\n" if ctx.config.push_mode == "off" else
             "只想少些打扰：在公众号主页右上角「…」里打开「消息免打扰」，仍可随时来读。\n")
    return Text(
        "想退订：在公众号主页点右上角「…」，选「不再关注」即可。\n"
        f"{quiet}"
        f"退订后你的余额（{balance} {ctx.unit}）和已解锁的各期都会保留，重新关注即可恢复。")
