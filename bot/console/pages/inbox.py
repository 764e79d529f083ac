"""留言: the conversations subscribers started (unread first), one conversation with the
replies beside the questions, and the reply form. A reply goes through bot.wechat.reply, the
same path as `newsbot reply`: the 48-hour window is checked first and a refusal is explained
here in plain words (and stored, like every attempt)."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from bot.console.core import Console, ConsoleRequest, Done, Refused, esc
from bot.console.pages.pagekit import hidden, local, table, zone
from bot.wechat.api import WeChatClient
from bot.wechat.reply import REPLY_MAX_BYTES, BadReply, Outcome, send_reply
from storage import mailbox
from storage.mailbox import Message, Window

PATH = "/inbox"
_OPENID = "<openid:re:[A-Za-z0-9_-]{1,64}>"
_PREVIEW_CHARS = 60
_WHEN = "%m-%d %H:%M"
_MAX_CHARS = REPLY_MAX_BYTES // 3  # the form's hint; the byte limit is checked on the server
_KINDS = {"human": "请求人工", "text": "留言"}
_STATUS = {"sent": "已发送", "refused": "未发送", "failed": "发送失败", "sending": "发送中"}


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _PREVIEW_CHARS else flat[:_PREVIEW_CHARS] + "…"


def explain(outcome: Outcome, tz: ZoneInfo) -> str:
    """Why a reply did not go out, for the operator, in Chinese."""
    win = outcome.window
    if outcome.why == "window":
        if win.closes_at is None:
            return ("没有发送：对方 48 小时内没有和公众号互动，微信不允许发客服消息。"
                    "等对方再发消息后即可回复。")
        closed = local(win.closes_at, tz, _WHEN)
        return (f"没有发送：已超过微信的 48 小时客服消息窗口（已于 {closed} 关闭）。"
                "等对方再发消息后即可回复。")
    return {
        "unfollowed": "没有发送：对方已取消关注公众号。",
        "unauthorized": "没有发送：微信拒绝（48001）：本公众号没有客服消息权限，"
                        "需要先完成微信认证。",
        "out_of_time": "没有发送：微信拒绝（45015）：对方 48 小时内没有发消息，窗口已关闭。",
        "count": "没有发送：微信拒绝（45047）：这次窗口内的客服消息条数已用完，"
                 "等对方再发消息。",
        "not_follower": "没有发送：微信不认识这位关注者（40003）。",
    }.get(outcome.why, f"没有发送：连接微信失败（{outcome.error}），请稍后重试。")


def _window_line(win: Window, tz: ZoneInfo) -> str:
    if win.open:
        closes = esc(local(win.closes_at, tz, _WHEN))
        return f"<p class=muted>可以回复：微信的客服消息窗口到 {closes} 关闭。</p>"
    if win.unfollowed:
        return "<p class=\"flash error\">对方已取消关注，无法回复。</p>"
    closed = f"（已于 {esc(local(win.closes_at, tz, _WHEN))} 关闭）" if win.closes_at else ""
    return (f"<p class=\"flash error\">超过 48 小时没有互动{closed}，微信不允许发客服消息；"
            "等对方再发消息后才能回复。</p>")


def install(console: Console) -> None:
    @console.page(PATH, title="留言", nav="留言", order=60)
    def threads(req: ConsoleRequest) -> str:
        tz = zone(req)
        with req.reading() as session:
            found = mailbox.threads(session, limit=200)
            unread = mailbox.unread_count(session)
        if not found:
            return "<p class=empty>还没有留言。读者发来的、没有被指令接住的文字会出现在这里。</p>"
        rows = [[
            f"<a href=\"{esc(console_path(t.openid))}\">…{esc(t.openid[-8:])}</a>",
            esc(local(t.last_at, tz, _WHEN)),
            ("<span class=badge>人工</span> " if t.human else "")
            + (f"<strong>{esc(_short(t.last_text))}</strong>" if t.unread
               else esc(_short(t.last_text))),
            str(t.unread or ""), "待回复" if t.unanswered else "已回复",
        ] for t in found]
        return (f"<p>未读 <strong>{unread}</strong> 条。</p>"
                + table(["读者", "最近", "最新留言", "未读", "状态"], rows,
                        numeric=frozenset({3}), wrap=frozenset({2})))

    @console.page(f"{PATH}/{_OPENID}", title="留言对话")
    def conversation(req: ConsoleRequest) -> str:
        openid = str(req.args["openid"])
        tz = zone(req)
        with req.reading() as session:
            talk = mailbox.thread(session, openid=openid)
            win = mailbox.window(session, openid, req.now)
        if not talk.items:
            return "<p class=empty>这位读者没有留言。</p>" + _back_link()
        items = "".join(_item(item, tz) for item in talk.items)
        here = console_path(openid)
        back = hidden("next", here)
        read_form = (req.form_tag(f"{here}/read") + back
                     + "<button type=submit class=secondary>标为已读</button></form>"
                     if talk.unread else "")
        reply_form = (req.form_tag(f"{here}/reply", extra="class=stack")
                      + back
                      + "<label>回复（以客服消息发到对方的微信）"
                      f"<textarea name=text rows=4 required maxlength={_MAX_CHARS}></textarea>"
                      "</label>"
                      "<button type=submit>发送回复</button></form>") if win.open else ""
        return (f"<p class=muted>读者 <code>{esc(openid)}</code></p>"
                f"<div class=thread>{items}</div>{_window_line(win, tz)}{reply_form}"
                f"{read_form}{_back_link()}")

    @console.action(f"{PATH}/{_OPENID}/reply", name="inbox.reply")
    def reply(req: ConsoleRequest) -> Done:
        openid = str(req.args["openid"])
        if [p for p in req.settings.missing_secrets(need_api=True) if "wechat" in p]:
            raise Refused("没有发送：没有配置 [wechat] app_id 和 app_secret，无法调用微信接口。",
                          target=openid)
        with WeChatClient(req.settings.wechat, req.engine) as client:
            try:
                outcome = send_reply(req.engine, client, openid=openid, text=req.get("text"),
                                     operator=req.operator, now=lambda: req.now)
            except BadReply as exc:
                raise Refused(_bad_reply(exc), target=openid) from None
        if not outcome.sent:
            raise Refused(explain(outcome, zone(req)), target=openid)
        return Done("回复已发送。", target=openid, redirect=console_path(openid),
                    detail={"reply_id": outcome.reply_id})

    @console.action(f"{PATH}/{_OPENID}/read", name="inbox.read")
    def mark_read(req: ConsoleRequest) -> Done:
        openid = str(req.args["openid"])
        with req.transaction() as session:
            count = mailbox.mark_read(session, openid=openid, now=req.now)
        return Done(f"已将 {count} 条留言标为已读。", target=openid,
                    redirect=console_path(openid), detail={"count": count})


def console_path(openid: str) -> str:
    return f"/console{PATH}/{openid}"


def _back_link() -> str:
    return f'<p><a href="/console{PATH}">← 全部留言</a></p>'


def _bad_reply(exc: BadReply) -> str:
    return {
        "empty": "回复是空的，没有发送。",
        "unknown": "没有这位读者，没有发送。",
        "repeat": "同样的回复刚刚已经发给这位读者，没有再发一次。",
    }.get(exc.code, f"回复太长，没有发送：微信最多 {REPLY_MAX_BYTES} 字节"
                    f"（约 {REPLY_MAX_BYTES // 3} 个汉字）。")


def _item(item: Message | mailbox.Reply, tz: ZoneInfo) -> str:
    when = esc(local(item.at, tz, _WHEN))
    if isinstance(item, Message):
        kind = _KINDS.get(item.kind, item.kind)
        state = "" if item.read_at else " <span class=badge>未读</span>"
        return (f"<div class=\"msg {'unread' if not item.read_at else ''}\">"
                f"<div class=meta>{when} · {esc(kind)}{state}</div>"
                f"<div class=body>{esc(item.text)}</div></div>")
    status = _STATUS.get(item.status, item.status)
    error = f"：{esc(item.error)}" if item.error and item.status != "sent" else ""
    return (f"<div class=\"msg reply {esc(item.status)}\"><div class=meta>{when} · "
            f"…{esc(item.operator[-6:])} · {esc(status)}{error}</div>"
            f"<div class=body>{esc(item.text)}</div></div>")
