"""Domain errors to polite replies, in one place."""

from __future__ import annotations

from storage.errors import (
    DomainError,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidAmount,
    UnknownIssue,
    UnknownSubscriber,
)

BUSY = "系统繁忙，请稍后再试"


def explain(err: DomainError, *, unit: str, topup_hint: str) -> str:
    if isinstance(err, UnknownIssue):
        if err.number is None:
            return "本刊还没有发布任何一期，敬请期待。"
        return f"没有找到第{err.number}期。回复「往期」查看全部期数。"
    if isinstance(err, InsufficientBalance):
        return (
            f"余额不足：需要 {err.needed} {unit}，你的余额 {err.balance} {unit}，"
            f"还差 {err.shortfall} {unit}。\n{topup_hint}"
        )
    if isinstance(err, UnknownSubscriber):
        return f"找不到用户 {err.openid}。"
    if isinstance(err, InvalidAmount):
        return f"金额有误：{err}"
    if isinstance(err, IdempotencyConflict):
        return "这条指令与之前的一条冲突，未执行。"
    return BUSY
