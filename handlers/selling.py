"""The ways to get tokens, worded once: every "not enough tokens" reply and every answer to
充值 / 购买 / 会员 ends with them, so a reader always learns every way in (operator top-up, a
redemption code, a pass) and the exact words to reply."""

from __future__ import annotations

from handlers.config import ChatConfig, PassOffer


def pass_line(offer: PassOffer, unit: str) -> str:
    return f"「开通 {offer.name}」{offer.days} 天内每期全文，{offer.price} {unit}"


def ways_to_get(config: ChatConfig) -> str:
    """How to get tokens (and passes), one way per line: [tokens] how_to_get, then codes when
    [codes] is on, then the passes of [[passes]] with the words that buy them."""
    lines = [config.how_to_get]
    if config.codes.enabled:
        lines.append("有兑换码？直接把兑换码发给我即可。")
    if config.passes:
        lines.append("会员卡：" + "；".join(pass_line(p, config.unit) for p in config.passes))
    return "\n".join(lines)


def shortfall_line(*, needed: int, balance: int, unit: str) -> str:
    """The exact numbers of a refusal for too few tokens."""
    return (f"需要 {needed} {unit}，你的余额 {balance} {unit}，"
            f"还差 {needed - balance} {unit}。")


def not_enough(config: ChatConfig, *, what: str, needed: int, balance: int) -> str:
    """A refusal for too few tokens: what was not done, the exact shortfall, and every way to
    get more. ``what`` says what was refused, e.g. 「第3期｜标题 」."""
    return (f"余额不足，未扣费：{what}"
            + shortfall_line(needed=needed, balance=balance, unit=config.unit)
            + "\n" + ways_to_get(config))
