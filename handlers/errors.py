"""Domain errors to polite replies, in one place. Storage words its errors in English for logs
and the CLI; a reply never shows that text, only the Chinese below, built from the error's
fields."""

from __future__ import annotations

from handlers.numbers import BadIssueNumber
from handlers.selling import shortfall_line
from storage.codes import InvalidBatch
from storage.errors import (
    BroadcastRefused,
    DomainError,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidAmount,
    UnknownIssue,
    UnknownSubscriber,
)

BUSY = "系统繁忙，请稍后再试"
# A refusal this module has no words for yet: still Chinese, still says nothing was done.
NOT_DONE = "抱歉，这项操作没有完成，也没有做任何更改。回复「帮助」查看可用指令。"


def explain(err: DomainError, *, unit: str, topup_hint: str) -> str:
    if isinstance(err, UnknownIssue):
        if err.number is None:
            return "本刊还没有发布任何一期，敬请期待。"
        return f"没有找到第{err.number}期。回复「往期」查看全部期数。"
    if isinstance(err, BadIssueNumber):
        return (f"没看懂期号「{err.text}」。请写数字，如「第3期」「兑换 3」，"
                "或回复「往期」查看全部期数。")
    if isinstance(err, InsufficientBalance):
        # topup_hint is handlers.selling.ways_to_get: every way to get tokens, passes too.
        short = shortfall_line(needed=err.needed, balance=err.balance, unit=unit)
        return f"余额不足，未扣费：{short}\n{topup_hint}"
    if isinstance(err, UnknownSubscriber):
        return f"找不到用户 {err.openid}（对方需要先给公众号发过消息）。"
    if isinstance(err, InvalidAmount):
        return "金额有误，未执行：" + _amount_problem(err, unit)
    if isinstance(err, IdempotencyConflict):
        return "这条指令与之前的一条冲突，未执行。"
    if isinstance(err, InvalidBatch):  # a gift's code could not be made
        return "礼品码没有生成，也没有扣费。请稍后再试，或回复「人工」联系编辑。"
    if isinstance(err, BroadcastRefused):
        return "推送未执行。请在命令行用 newsbot broadcast status 查看原因。"
    return NOT_DONE


def _amount_problem(err: InvalidAmount, unit: str) -> str:
    amount = "" if err.amount is None else f"{err.amount:+d} {unit}"
    if err.problem == "not_positive":
        return f"充值数量必须是正整数，收到 {amount}。减少余额请用 #adjust。"
    if err.problem == "zero":
        return "调整数量为 0，余额不会变化。请给出非零的增减量。"
    if err.problem == "over_limit":
        return (f"{amount} 超过单次上限 {err.limit or 0} {unit}（配置项 [tokens] max_topup）。"
                "请分几次操作，或调高上限。")
    if err.problem == "too_large":
        return f"数量过大：绝对值不能超过 {err.limit or 0:,} {unit}。"
    if err.problem == "no_reason":
        return "请写明原因，例如「#topup OPENID 50 线下转账」。"
    return "数量不符合要求。"
