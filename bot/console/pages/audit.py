"""The audit trail: every state-changing console action, newest first (``newsbot audit``
prints the same)."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from bot.console.core import Console, ConsoleRequest, esc
from storage import console as store

_RESULTS = {"ok": "完成", "refused": "被拒绝", "error": "出错"}


def install(console: Console) -> None:
    @console.page("/audit", title="操作记录", nav="操作记录", order=90)
    def audit_log(req: ConsoleRequest) -> str:
        zone = ZoneInfo(req.settings.broadcast.timezone)
        with req.reading() as session:
            actions = store.list_actions(session, limit=200)
        if not actions:
            return "<p class=empty>还没有任何操作。</p>"
        rows = "".join(
            f"<tr><td>{esc(a.at.astimezone(zone).strftime('%m-%d %H:%M:%S'))}</td>"
            f"<td>…{esc(a.operator[-6:])}</td><td>{esc(a.action)}</td><td>{esc(a.target)}</td>"
            f"<td class={esc(a.result)}>{esc(_RESULTS.get(a.result, a.result))}</td>"
            f"<td class=detail>{esc(a.detail)}</td></tr>"
            for a in actions)
        return ("<div class=table-wrap><table><thead><tr><th>时间</th><th>运营者</th>"
                "<th>操作</th><th>对象</th><th>结果</th><th>详情</th></tr></thead>"
                f"<tbody>{rows}</tbody></table></div>")
