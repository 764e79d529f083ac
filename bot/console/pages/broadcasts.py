"""群发: each issue's broadcast, its batches and WeChat's MASSSENDJOBFINISH reports, and the
weekly job's recent runs (what ``newsbot broadcast status`` prints). Read-only: a broadcast
is started by the weekly job or ``newsbot broadcast N``, whose guards (quota, preview, resume)
live there."""

from __future__ import annotations

from bot.console.core import Console, ConsoleRequest, esc
from bot.console.pages.pagekit import local, snapshot, table, zone
from storage import broadcasts
from storage.models import Broadcast, BroadcastBatch

PATH = "/broadcasts"
_STATUS = {"sending": "发送中", "done": "已完成", "failed": "失败", "planned": "待发送",
           "sent": "已发出", "running": "运行中"}
_MODES = {"sendall": "群发（全部或标签）", "openids": "按 openid 分批",
          "off": "不群发（读者下次发消息时提醒）"}


def _report(b: BroadcastBatch) -> str:
    if not b.job_status:
        return "—"
    return (f"{b.job_status}：{b.sent_count or 0:,} / {b.total_count or 0:,} 送达，"
            f"过滤 {b.filter_count or 0:,}，失败 {b.error_count or 0:,}")


def _section(record: Broadcast, rows: list[BroadcastBatch], req: ConsoleRequest) -> str:
    tz = zone(req)
    head = (f"第 {record.issue_number} 期：{_STATUS.get(record.status, record.status)}，"
            f"{_MODES.get(record.mode, record.mode)}，{record.batches_sent:,} 批，"
            f"{record.recipients:,} 位收件人；开始 {local(record.started_at, tz)}"
            + (f"，完成 {local(record.finished_at, tz)}" if record.finished_at else "")
            + ("（强制）" if record.forced else ""))
    batch_rows = [[esc(b.seq), esc(_STATUS.get(b.status, b.status))
                   + (" （微信判定已发过）" if b.already_sent else ""),
                   esc(f"{b.recipients:,}"), esc(local(b.sent_at, tz)), esc(b.msg_id or ""),
                   esc(_report(b))] for b in rows]
    error = f"<p class='flash error'>最近的错误：{esc(record.error)}</p>" if record.error else ""
    return (f"<h2>{esc(head)}</h2>{error}"
            + table(["批", "状态", "收件人", "发出", "msg_id", "微信报告"], batch_rows,
                    numeric=frozenset({0, 2}), wrap=frozenset({5}),
                    empty="还没有发出任何批次。"))


def install(console: Console) -> None:
    @console.page(PATH, title="群发", nav="群发", order=50)
    def broadcasts_page(req: ConsoleRequest) -> str:
        tz = zone(req)
        with snapshot(req) as session:
            records = broadcasts.list_broadcasts(session, limit=20)
            sections = [_section(r, broadcasts.batches(session, broadcast_id=r.id or 0), req)
                        for r in records]
            runs = broadcasts.recent_weekly_runs(session, limit=10)
        mode = req.settings.broadcast.mode
        intro = (f"<p class=muted>群发方式：{esc(mode)}；每周任务 cron "
                 f"<code>{esc(req.settings.broadcast.cron)}</code>（{esc(tz.key)}）。"
                 "在终端用 <code>newsbot broadcast N</code> 群发第 N 期。</p>")
        run_rows = [[esc(local(r.scheduled_for, tz)), esc(_STATUS.get(r.status, r.status)),
                     esc(r.published_issue or ""), esc(r.broadcast_issue or ""),
                     esc(r.note or "")] for r in runs]
        return (intro + ("".join(sections) or "<p class=empty>还没有群发过。</p>")
                + "<h2>每周任务</h2>"
                + table(["计划时间", "状态", "发布", "群发", "备注"], run_rows,
                        empty="每周任务还没有运行过。"))
