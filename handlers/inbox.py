"""留言: text no command takes is kept for the editors (storage.mailbox) and acknowledged;
人工 / 客服 asks for a person explicitly. Tried just before help, so every command keeps its
words and only what would have met help's hint lands here.

What is kept: every non-empty text, emoji-only and one-word messages included. A short noise
message costs an editor a glance; a question thrown away costs a reader an answer. Two
exceptions: a courtesy alone (谢谢, 好的, 👍) is kept as already read (part of the
conversation, but it needs no answer and wakes no operator), and a short command with a number
commands do not read (兑换 ٣, ①: handlers.router.normalize) is a command, not a message, so it
gets help's hint. Operators' own text is not kept: they answer the inbox, and their tests must
not notify each other.

Images, voice and other non-text messages are not kept (the table holds text): their sender
is asked to write instead."""

from __future__ import annotations

import re
import unicodedata

from handlers.router import Context, Incoming, Reply, Router, Text, reads_only
from storage import mailbox

router = Router("inbox")

ACK = "收到，编辑会尽快回复。\n（想查看可用指令，回复「帮助」。）"
COURTESY_ACK = "不客气 🙂 有问题随时在这里留言。"
HUMAN = ("好的，已转给编辑。编辑看到后会在这里回复你，一般在一个工作日内。"
         "请把你的问题直接写下来（一条说清楚最好）。")
HUMAN_WITH_TEXT = "好的，已转给编辑。编辑看到后会在这里回复你，一般在一个工作日内。"
OPERATOR_NOTE = ("没有这条指令。运营账号发的文字不进留言箱。回复「帮助」看读者指令，"
                 "发送「#」看运营指令。")
TEXT_ONLY = ("暂时只能收文字留言：请把你的问题用文字发给我们，编辑会尽快回复。"
             "回复「帮助」查看可用指令。")

# 人工 / 转人工 / 找客服 / 联系编辑部 …, alone or followed by the question itself.
_PERSON = r"(?:转|找|联系|要)?(?:人工|真人|客服|编辑|编辑部)(?:客服|服务)?"
_COURTESY = frozenset({"谢谢", "谢谢你", "谢谢您", "多谢", "感谢", "好的", "好", "好滴", "嗯",
                       "嗯嗯", "收到", "ok", "okay", "thanks", "thank you", "thx", "👍", "🙏",
                       "谢啦", "知道了", "明白了", "了解"})
_TRAILING = re.compile(r"[\s!！~～。.，,😊🙂]+$")
NON_TEXT = ("image", "voice", "video", "shortvideo", "location", "link", "file")


@router.command(rf"{_PERSON}[?!.。~？！]*|human|(?P<p>{_PERSON})[\s,，:：。!！]+(?P<rest>.+)")
def ask_for_a_person(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    rest = match.group("rest") if match is not None and match.group("p") else None
    if ctx.config.is_operator(msg.openid):
        return Text(OPERATOR_NOTE)
    # The question as they wrote it: the raw text, case and all, after the 人工 word.
    text = _after_person(msg.raw_text) if rest else msg.raw_text
    _store(ctx, msg, text.strip() or msg.raw_text.strip(), "human")
    return Text(HUMAN_WITH_TEXT if rest else HUMAN)


@router.message("text")
def leave_a_message(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply | None:
    text = msg.raw_text.strip()
    if not text or _command_with_foreign_number(msg.text):
        return None  # help's hint
    if ctx.config.is_operator(msg.openid):
        return Text(OPERATOR_NOTE)
    courtesy = _TRAILING.sub("", msg.text) in _COURTESY
    _store(ctx, msg, text, "text", read=courtesy)
    return Text(COURTESY_ACK if courtesy else ACK)


@router.message(*NON_TEXT)
@reads_only
def not_text(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    return Text(TEXT_ONLY)


def _store(ctx: Context, msg: Incoming, text: str, kind: mailbox.Kind, *,
           read: bool = False) -> None:
    # The delivery's key: WeChat's retry of this message never stores it twice.
    mailbox.store(ctx.session, openid=msg.openid, text=text, kind=kind, key=ctx.key,
                  at=ctx.now, max_chars=ctx.config.inbox_max_chars, read=read)


_PERSON_PREFIX = re.compile(rf"\s*{_PERSON}[\s,，:：。!！]+")
_COMMAND_CHARS = 12
_ASCII_DIGITS = frozenset("0123456789０１２３４５６７８９")


def _after_person(raw: str) -> str:
    """``人工：我的充值没到账`` → ``我的充值没到账``, as they wrote it (line breaks too)."""
    found = _PERSON_PREFIX.match(raw)
    return raw[found.end():] if found else raw


def _command_with_foreign_number(text: str) -> bool:
    """``兑换 ٣``, ``试读 ²``, ``①``: short, with a numeral the commands refuse to read."""
    return len(text) <= _COMMAND_CHARS and any(
        unicodedata.category(ch) in ("Nd", "No", "Nl") and ch not in _ASCII_DIGITS
        for ch in text)
