"""Tell the operators in the chat that subscribers left messages: at most once per
``[inbox] notify_every_minutes``, only when something new and unread came in since the last
notice, one customer-service text to each ``[operators] openids``.

The notice is claimed first (storage.mailbox.claim_notice: a unique slot, committed before
anything is sent), so any number of scheduler processes send it once. WeChat only delivers to
an operator who wrote to the account in the last 48 hours (45015 otherwise), like to anyone:
that is logged with what to do. If no operator could be reached because WeChat could not be
reached at all, the claim is given back and the next run tries again."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import Engine

from bot.settings import Settings
from bot.wechat.api import (
    ERRCODE_API_UNAUTHORIZED,
    ERRCODE_OUT_OF_TIME,
    WeChatError,
    WeChatTransientError,
)
from bot.wechat.reply import CustomSender
from storage import mailbox
from storage.db import run_in_transaction
from storage.mailbox import Notice
from storage.models import utcnow

log = logging.getLogger("newsbot.inbox")

PREVIEW_CHARS: Final = 30


def notice_text(notice: Notice) -> str:
    lines = [f"📬 有 {notice.count} 条新留言"
             + (f"（其中 {notice.human} 条请求人工）" if notice.human else "")
             + (f"，未读共 {notice.unread} 条" if notice.unread > notice.count else "") + "。"]
    preview = " ".join(notice.latest.split())
    if len(preview) > PREVIEW_CHARS:
        preview = preview[:PREVIEW_CHARS] + "…"
    lines.append(f"最新一条：「{preview}」")
    lines.append("回复 #console 打开后台，或运行 newsbot inbox 查看。")
    return "\n".join(lines)


@dataclass(frozen=True)
class NoticeRun:
    notice: Notice
    reached: tuple[str, ...]
    failed: tuple[str, ...]


class InboxNoticeJob:
    """What the scheduler runs every minute when operators are configured."""

    def __init__(self, settings: Settings, engine: Engine,
                 sender_factory: Callable[[], CustomSender], *,
                 now: Callable[[], datetime] = utcnow) -> None:
        self.operators = tuple(settings.operators.openids)
        self.every = timedelta(minutes=settings.inbox.notify_every_minutes)
        self.engine = engine
        self.sender_factory = sender_factory
        self.now = now

    def run(self) -> NoticeRun | None:
        if not self.operators:
            return None
        notice = run_in_transaction(self.engine, lambda s: mailbox.claim_notice(
            s, now=self.now(), every=self.every))
        if notice is None:
            return None
        text = notice_text(notice)
        reached: list[str] = []
        failed: list[str] = []
        transient = 0  # network, 5xx, system busy: worth another try in a minute
        sender = self.sender_factory()
        try:
            for openid in self.operators:
                try:
                    sender.send_custom_text(openid, text)
                    reached.append(openid)
                except WeChatError as exc:
                    failed.append(openid)
                    transient += isinstance(exc, WeChatTransientError)
                    log.warning("inbox notice to operator %s failed: %s%s", openid, exc,
                                _hint(exc.errcode))
        finally:
            close = getattr(sender, "close", None)
            if callable(close):
                close()
        if not reached and transient == len(failed):
            run_in_transaction(self.engine, lambda s: mailbox.release_notice(s, slot=notice.slot))
        else:
            log.info("inbox notice %d: %d new messages, told %d of %d operators", notice.slot,
                     notice.count, len(reached), len(self.operators))
        return NoticeRun(notice, tuple(reached), tuple(failed))


def _hint(errcode: int) -> str:
    if errcode == ERRCODE_OUT_OF_TIME:
        return (" (WeChat only delivers to someone who wrote to the account in the last 48 "
                "hours: send the account any message, e.g. #console, to get notices)")
    if errcode == ERRCODE_API_UNAUTHORIZED:
        return " (this account may not send customer-service messages: only verified ones can)"
    return ""
