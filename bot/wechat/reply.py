"""Answer a subscriber's inbox message with a customer-service message (``message/custom/send``):
the one path `newsbot reply` and the console's reply form share.

WeChat delivers such a message only inside the window the subscriber opened (48 hours after
their last message), and only from a verified account. The window is checked here first, so
an operator learns why before anything is sent; WeChat's own refusals (48001 unverified,
45015 window closed, 45047 too many) are recorded the same way. Every attempt is stored beside
the question: ``sending`` before the call (a crash mid-call leaves that trace), then ``sent``,
``refused`` or ``failed``. No transaction is held during the call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal, Protocol

from sqlalchemy import Engine

from bot.wechat.api import (
    ERRCODE_API_UNAUTHORIZED,
    ERRCODE_OUT_OF_TIME,
    ERRCODE_RESPONSE_COUNT,
    WeChatError,
)
from storage import mailbox, subscribers
from storage.db import transaction
from storage.mailbox import Window
from storage.models import utcnow

# WeChat's limit on a text message (shared/wechat-platform.md §2); longer is refused (45002).
REPLY_MAX_BYTES: Final = 2048
ERRCODE_INVALID_OPENID: Final = 40003
# The same text to the same subscriber again this soon is a double submit, not a new answer.
RESEND_GAP: Final = timedelta(minutes=2)

Why = Literal["sent", "window", "unfollowed", "unauthorized", "out_of_time", "count",
              "not_follower", "failed"]


class CustomSender(Protocol):
    """The part of the WeChat client a customer-service message needs."""

    def send_custom_text(self, openid: str, content: str) -> None: ...


class BadReply(ValueError):
    """The reply cannot be sent as given (nothing was written): ``reason`` says what to fix,
    ``code`` which problem it is (empty, too_long, unknown, repeat)."""

    def __init__(self, code: Literal["empty", "too_long", "unknown", "repeat"],
                 reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Outcome:
    why: Why
    reply_id: int
    window: Window
    error: str | None = None  # WeChat's errcode and errmsg, or the network failure

    @property
    def sent(self) -> bool:
        return self.why == "sent"


def check_text(text: str) -> str:
    """The reply as it will be sent, or BadReply: not empty, within WeChat's size."""
    text = text.strip()
    if not text:
        raise BadReply("empty", "the reply is empty")
    size = len(text.encode("utf-8"))
    if size > REPLY_MAX_BYTES:
        raise BadReply("too_long", f"the reply is {size} bytes of UTF-8; WeChat takes at most "
                       f"{REPLY_MAX_BYTES} (about {REPLY_MAX_BYTES // 3} Chinese characters)")
    return text


def send_reply(engine: Engine, sender: CustomSender, *,
               openid: str, text: str, operator: str,
               now: Callable[[], datetime] = utcnow) -> Outcome:
    """Check, send and record one reply. BadReply (nothing written) for an empty or oversized
    text or an openid we do not know; otherwise the outcome, stored whatever it is."""
    text = check_text(text)
    at = now()
    with transaction(engine) as s:
        if subscribers.get_subscriber(s, openid=openid) is None:
            raise BadReply("unknown", f"no subscriber with openid {openid!r}")
        # One reply to a subscriber is decided at a time (their row's lock), so a form sent
        # twice, or two operators pressing at once, cannot both send the same text.
        subscribers.lock_subscriber(s, openid=openid)
        earlier = mailbox.recent_same_reply(s, openid=openid, text=text, since=at - RESEND_GAP)
        if earlier is not None:
            seconds = max(0, int((at - earlier).total_seconds()))
            raise BadReply("repeat", f"the same reply went to {openid} {seconds} s ago; "
                                     "not sent again")
        win = mailbox.window(s, openid, at)
        if not win.open:
            why: Why = "unfollowed" if win.unfollowed else "window"
            error = _window_error(win)
            reply_id = mailbox.record_reply(s, openid=openid, text=text, operator=operator,
                                            at=at, status="refused", error=error)
            return Outcome(why, reply_id, win, error)
        reply_id = mailbox.record_reply(s, openid=openid, text=text, operator=operator, at=at,
                                        status="sending")
    try:
        sender.send_custom_text(openid, text)
    except WeChatError as exc:
        error = f"{exc.errcode} {exc.errmsg}"
        why = _REFUSALS.get(exc.errcode, "failed")
        with transaction(engine) as s:
            mailbox.finish_reply(s, reply_id=reply_id, at=now(), error=error,
                                 status="failed" if why == "failed" else "refused")
        return Outcome(why, reply_id, win, error)
    with transaction(engine) as s:
        mailbox.finish_reply(s, reply_id=reply_id, status="sent", at=now())
    return Outcome("sent", reply_id, win)


_REFUSALS: Final[dict[int, Why]] = {
    ERRCODE_API_UNAUTHORIZED: "unauthorized", ERRCODE_OUT_OF_TIME: "out_of_time",
    ERRCODE_RESPONSE_COUNT: "count", ERRCODE_INVALID_OPENID: "not_follower"}


def _window_error(win: Window) -> str:
    if win.unfollowed:
        return "refused here: the subscriber has unfollowed the account"
    if win.closes_at is None:
        return "refused here: no message from the subscriber in the last 48 hours"
    closed = win.closes_at.isoformat(timespec='minutes')
    return f"refused here: the 48-hour window closed at {closed}"
