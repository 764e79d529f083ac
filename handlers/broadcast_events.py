"""WeChat's report on a finished mass send, and the 新一期已发布 note for accounts that cannot
push (broadcast mode "off")."""

from __future__ import annotations

import re

from handlers.format import issue_heading
from handlers.router import Context, Incoming, News, Reply, Router, Silent, Text
from storage import broadcasts

router = Router("broadcast_events")


def _int(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


@router.event("masssendjobfinish")
def mass_send_finished(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Reply:
    msg_id = _int(msg.fields.get("MsgID") or msg.fields.get("MsgId"))
    if msg_id is not None:
        broadcasts.record_job_finish(
            ctx.session, msg_id=msg_id, status=msg.fields.get("Status", ""),
            total=_int(msg.fields.get("TotalCount")), filtered=_int(msg.fields.get("FilterCount")),
            sent=_int(msg.fields.get("SentCount")), errors=_int(msg.fields.get("ErrorCount")))
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
