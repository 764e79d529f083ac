"""The chat features, in the order they are tried. Operator commands come first so a ``#…``
from an operator is never mistaken for ordinary text; the inbox takes the free text no command
took, and the help module's fallback comes last so every message gets an answer."""

from __future__ import annotations

from handlers import (
    admin,
    balance,
    broadcast_events,
    codes,
    gifts,
    help,
    inbox,
    issue,
    passes,
    preview,
    redeem,
    subscription,
)
from handlers.config import ChatConfig
from handlers.errors import explain
from handlers.router import Context, Incoming, Reply, Router, Text, reads_only_route
from handlers.selling import ways_for
from storage.errors import DomainError

ROUTERS: tuple[Router, ...] = (
    broadcast_events.router,
    admin.router,
    subscription.router,
    issue.router,
    preview.router,
    redeem.router,
    codes.router,  # after redeem: 兑换 3 is an unlock, 兑换 XXXX-… a code
    gifts.router,
    balance.router,
    passes.router,
    help.router,
    inbox.router,  # free text no command took
    help.fallback_router,  # the hint for what is left (non-text, events)
)


def click_keys(routers: tuple[Router, ...] = ROUTERS) -> frozenset[str]:
    """The menu CLICK keys some handler answers (bot.wechat.menu accepts only these)."""
    return frozenset(route.click_key for router in routers for route in router.routes
                     if route.click_key is not None)


def first_route_writes(config: ChatConfig, msg: Incoming,
                       routers: tuple[Router, ...] = ROUTERS) -> bool:
    """Whether the first handler to take ``msg`` writes: then the webhook's fast path would
    only end in NeedsWrite, so it skips the reads it would have made first."""
    for router in routers:
        for route, _match in router.matching(config, msg):
            return not reads_only_route(route)
    return False


def dispatch(ctx: Context, msg: Incoming, routers: tuple[Router, ...] = ROUTERS) -> Reply:
    """Run the first matching handler. Domain refusals become polite text here; any other
    exception propagates so the webhook can log it and roll the transaction back."""
    reply: Reply = Text(help.HINT)
    try:
        for router in routers:
            handled = router.handle(ctx, msg)
            if handled is not None:
                reply = handled
                break
    except DomainError as err:
        reply = Text(explain(err, unit=ctx.unit, topup_hint=ways_for(ctx, msg.openid)))
    return broadcast_events.with_new_issue_note(ctx, msg, reply)
