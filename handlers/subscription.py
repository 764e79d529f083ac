"""Follow and unfollow. Unfollowing keeps balance and unlocks (they are financial records); a
returning follower finds them intact."""

from __future__ import annotations

import re

from handlers.issue import card_for
from handlers.router import Context, Incoming, Reply, Router, Silent, Text
from storage import subscribers
from storage.errors import UnknownIssue

router = Router("subscription")

WELCOME = "欢迎订阅！每周一早上更新一期会员通讯，回复「帮助」查看全部指令。"


@router.event("subscribe")
def on_subscribe(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    subscribers.set_subscribed(ctx.session, openid=msg.openid, subscribed=True, at=ctx.now)
    try:
        return Text(card_for(ctx, msg.openid, None, lead=WELCOME + "\n"))
    except UnknownIssue:
        return Text(WELCOME)


@router.event("unsubscribe")
def on_unsubscribe(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    subscribers.set_subscribed(ctx.session, openid=msg.openid, subscribed=False, at=ctx.now)
    return Silent()
