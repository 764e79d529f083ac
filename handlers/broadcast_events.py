"""WeChat's report on a finished mass send, and the 新一期已发布 note for accounts that cannot
push (broadcast mode "off")."""

from __future__ import annotations

import logging
import re

from handlers.format import issue_heading
from handlers.router import Context, Incoming, News, Reply, Router, Silent, Text
from storage import broadcasts

log = logging.getLogger("newsbot.handlers.broadcast_events")
router = Router("broadcast_events")
_DIGITS = re.compile(r"[0-9]{1,30}")


def _int(value: str | None, maximum: int) -> int | None:
    """An ASCII whole number that fits its column, else None (unknown)."""
    text = (value or "").strip()
    if not _DIGITS.fullmatch(text):
        return None
    number = int(text)
    return number if number <= maximum else None


@router.event("masssendjobfinish")
def mass_send_finished(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    raw_id = msg.fields.get("MsgID") or msg.fields.get("MsgId")
    msg_id = _int(raw_id, broadcasts.MAX_MSG_ID)
    status = msg.fields.get("Status", "").strip()
    if msg_id is None or msg_id == 0 or len(status) > broadcasts.MAX_STATUS_CHARS:
        # Not a report of any mass send of ours: acknowledged, never stored as a bogus number.
        log.warning("MASSSENDJOBFINISH ignored: MsgID %.40r or Status %.70r out of range",
                    raw_id, status)
        return Silent()
    counts = {name: msg.fields.get(name) for name in
              ("TotalCount", "FilterCount", "SentCount", "ErrorCount")}
    parsed = {name: _int(value, broadcasts.MAX_COUNT) for name, value in counts.items()}
    unusable = sorted(n for n, v in counts.items() if v is not None and parsed[n] is None)
    if unusable:
        log.warning("MASSSENDJOBFINISH for msg_id %s: %s not a count; stored as unknown",
                    msg_id, ", ".join(unusable))
    broadcasts.record_job_finish(
        ctx.session, msg_id=msg_id, status=status, total=parsed["TotalCount"],
        filtered=parsed["FilterCount"], sent=parsed["SentCount"], errors=parsed["ErrorCount"])
    return Silent()


def with_new_issue_note(ctx: Context, msg: Incoming, reply: Reply) -> Reply:
    """In mode "off", the first reply a subscriber gets after an issue is published starts with
    a one-line note about it (once per subscriber per issue)."""
    if ctx.config.push_mode != "off" or isinstance(reply, Silent):
        return reply
    if msg.msg_type == "event" and msg.event in ("unsubscribe", "masssendjobfinish"):
        return reply
    if msg.text.startswith("#") and ctx.config.is_operator(msg.openid):
        return reply  # operator commands get their result only
    current = ctx.current_issue()
    if current is None:
        return reply
    if msg.event == "subscribe":  # the welcome already shows the current issue
        broadcasts.mark_notified(ctx.session, openid=msg.openid, issue_number=current.number)
        return reply
    if ctx.read_only:
        # The fast path cannot write: the webhook stores the notice with the claim (and answers
        # on the write path if another message got there first).
        if ctx.standing(msg.openid, current.number).notified:
            return reply
        ctx.deferred_notice = current.number
    elif not broadcasts.mark_notified(ctx.session, openid=msg.openid,
                                      issue_number=current.number):
        return reply
    heading = issue_heading(current)
    note = f"🆕 新一期已发布：{heading}（回复「第{current.number}期」查看）"
    if isinstance(reply, Text):
        if heading in reply.content:  # the reply already is about the new issue
            return reply
        return Text(f"{note}\n\n{reply.content}")
    if isinstance(reply, News):
        return News(reply.title, f"{note}\n{reply.description}", reply.url, reply.pic_url)
    return reply
