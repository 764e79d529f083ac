"""Follow, unfollow, a follower scanning a QR code, and what 订阅 / 退订 mean here.
Unfollowing keeps balance and unlocks (they are financial records); a returning follower finds
them intact and is welcomed back with their balance."""

from __future__ import annotations

import re

from handlers.config import ChatConfig
from handlers.issue import card_for
from handlers.router import Context, Incoming, Reply, Router, Silent, Text, reads_only
from storage import events, subscribers
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


QR_FOLLOW_PREFIX = "qrscene_"  # a follow through a parametric QR code (newsbot qr create)


def _scene(key: str) -> str | None:
    """The QR scene a push carries, cut to what the column holds; None when there is none."""
    return key.strip()[:64] or None


@router.event("subscribe")
def on_subscribe(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    # A plain follow has an empty EventKey; only the qrscene_ prefix marks a QR code's scene.
    key = msg.event_key.strip()
    scene = _scene(key[len(QR_FOLLOW_PREFIX):]) if key.startswith(QR_FOLLOW_PREFIX) else None
    returning = subscribers.follow(ctx.session, openid=msg.openid, at=ctx.now, scene=scene)
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
def on_scan(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    """A follower scanned one of the account's QR codes (EventKey is its bare scene): record
    the scan, credit the scene if none brought them yet, and show them this week's card. No
    reward for scanning, following or sharing: WeChat's rules forbid it."""
    scene = _scene(msg.event_key)
    if scene is not None:
        events.record(ctx.session, events.SCAN, openid=msg.openid, at=ctx.now, detail=scene)
        subscribers.attribute(ctx.session, openid=msg.openid, scene=scene)
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
