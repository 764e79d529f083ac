"""兑换码: batches, creating one, revoking a code or a batch.

Only each code's HMAC is stored, so a batch's codes exist in readable form once, while it is
being created. ``newsbot code create`` writes them to a new file; here the create action's
response *is* the CSV (same columns as the CLI's: code,batch,grants,expires), downloaded by the
browser as the batch is committed. There is nothing to fetch later, so nothing is kept in
memory or on disk between requests, and any worker process can answer. If that download is
lost (the connection drops), the batch's codes are known to nobody: revoke it and create
another, as after the CLI's "could not be written"."""

from __future__ import annotations

import csv
import io
from datetime import date, datetime, time, timedelta

import bottle

from bot.console.core import Console, ConsoleRequest, Done, Refused, esc
from bot.console.pages.pagekit import hidden, local, snapshot, table, whole, zone
from storage import codes
from storage.codes import BatchKind, BatchSummary
from storage.models import CodeBatch

PATH = "/codes"
# One request builds the whole CSV in memory: bigger batches are the CLI's (codes.MAX_COUNT).
MAX_CONSOLE_COUNT = 100_000
MAX_USES = 1_000_000
_MAX_LABEL = 200
_KIND_NAMES = {"tokens": "豆", "issue": "解锁一期", "pass": "会员卡"}


def _grants(batch: CodeBatch, unit: str) -> str:
    if batch.kind == "tokens":
        return f"{batch.tokens:,} {unit}"
    if batch.kind == "issue":
        return f"解锁第 {batch.issue_number} 期"
    return f"会员卡 {batch.pass_id}（{batch.pass_days} 天）"


def _csv_grants(batch: CodeBatch) -> str:
    if batch.kind == "tokens":
        return f"tokens:{batch.tokens}"
    if batch.kind == "issue":
        return f"issue:{batch.issue_number}"
    return f"pass:{batch.pass_id}"


def _csv(made: codes.NewBatch, req: ConsoleRequest) -> bottle.HTTPResponse:
    batch = made.batch
    expires = batch.expires_at.astimezone(zone(req)).isoformat() if batch.expires_at else ""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["code", "batch", "grants", "expires"])
    grants = _csv_grants(batch)
    writer.writerows([code, batch.id, grants, expires] for code in made.codes)
    return bottle.HTTPResponse(body=buffer.getvalue().encode("utf-8"), status=200, headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="codes-batch-{batch.id}.csv"',
        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


def _expiry(raw: str, req: ConsoleRequest) -> datetime | None:
    """The last day the codes work, to the end of that day in [broadcast] timezone."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        day = None
    if day is None or len(raw) != 10:
        raise Refused(f"有效期必须是日期，例如 2026-12-31，收到的是「{raw[:20]}」；"
                      "没有做任何更改。")
    ends = datetime.combine(day + timedelta(days=1), time(), tzinfo=zone(req))
    if ends <= req.now:
        raise Refused(f"有效期 {raw} 已经过去；没有做任何更改。")
    return ends


def _state(s: BatchSummary, req: ConsoleRequest) -> str:
    if s.batch.revoked_at is not None:
        return f"已作废 {local(s.batch.revoked_at, zone(req))}"
    return "已过期" if s.expired(req.now) else "有效"


def _create_form(req: ConsoleRequest) -> str:
    unit = req.settings.tokens.name
    offers = "".join(f'<option value="{esc(p.id)}">{esc(p.name)}（{esc(p.id)}，{p.days} 天）'
                     "</option>" for p in req.settings.passes)
    pass_field = (f'<label>会员卡（类型为会员卡时）<select name="pass">{offers}</select></label>'
                  if offers else "")
    kinds = "".join(f'<option value="{k}">{esc(v if k != "tokens" else unit)}</option>'
                    for k, v in _KIND_NAMES.items() if k != "pass" or offers)
    return (
        "<h2>新建一批兑换码</h2>"
        + req.form_tag(f"/console{PATH}/create", extra='class="stack"')
        + f'<label>每个码给什么<select name="kind">{kinds}</select></label>'
        f'<label>{esc(unit)}数（类型为{esc(unit)}时；1 到 {req.settings.tokens.max_topup:,}）'
        '<input type="text" name="tokens" inputmode="numeric"></label>'
        '<label>期号（类型为解锁一期时）<input type="text" name="issue" inputmode="numeric">'
        f"</label>{pass_field}"
        f'<label>数量（1 到 {MAX_CONSOLE_COUNT:,} 个码）<input type="text" name="count" '
        'inputmode="numeric" required></label>'
        '<label>每个码可供几位订阅者使用<input type="text" name="uses" inputmode="numeric" '
        'value="1"></label>'
        '<label>最后有效日（可不填：不过期）<input type="date" name="expires"></label>'
        f'<label>备注（在哪里发放）<input type="text" name="label" maxlength="{_MAX_LABEL}">'
        "</label><button type=submit>创建并下载 CSV</button>"
        "<p class=muted>兑换码只在创建时出现一次：提交后浏览器会直接下载 CSV 文件，"
        "之后无法再次导出。请妥善保存。</p></form>")


def install(console: Console) -> None:
    @console.page(PATH, title="兑换码", nav="兑换码", order=40)
    def codes_page(req: ConsoleRequest) -> str:
        if not req.settings.codes.enabled:
            return ("<p class=empty>兑换码未启用：在配置文件的 [codes] 里设置 secret"
                    "（至少 16 个随机字符）后重启。</p>")
        tz, unit = zone(req), req.settings.tokens.name
        with snapshot(req) as session:
            batches = list(reversed(codes.list_batches(session)))
        rows = []
        for s in batches:
            b = s.batch
            revoke = "" if b.revoked_at is not None else (
                req.form_tag(f"/console{PATH}/revoke") + hidden("batch", b.id)
                + "<button type=submit class='secondary small'>作废整批</button></form>")
            rows.append([esc(b.id), esc(local(b.created_at, tz)), esc(_grants(b, unit)),
                         esc(f"{b.count:,}" + (f" × {b.uses}" if b.uses > 1 else "")),
                         esc(f"{s.redeemed:,}"), esc(_state(s, req)),
                         esc(local(b.expires_at, tz) or "不过期"),
                         esc(b.label + (f"（{b.giver} 的礼品）" if b.giver else "")), revoke])
        revoke_code = ("<h2>作废一个码</h2>" + req.form_tag(f"/console{PATH}/revoke",
                                                           extra='class="stack"')
                       + '<label>兑换码<input type="text" name="code" autocomplete="off" '
                       'required></label><button type=submit class=secondary>作废</button>'
                       "<p class=muted>已兑换的不受影响。</p></form>")
        return (table(["批次", "创建", "内容", "码数", "已兑换", "状态", "有效至", "备注", ""],
                      rows, numeric=frozenset({0, 3, 4}), wrap=frozenset({7}),
                      empty="还没有兑换码。")
                + _create_form(req) + revoke_code)

    @console.action(PATH + "/create", name="code.create")
    def create(req: ConsoleRequest) -> Done:
        settings = req.settings
        if not settings.codes.enabled:
            raise Refused("兑换码未启用：请先在 [codes] 里设置 secret。")
        kind = req.get("kind")
        if kind not in _KIND_NAMES:
            raise Refused("请选择每个码给什么（豆、解锁一期或会员卡）。")
        count = whole(req.get("count"), "数量", minimum=1, maximum=MAX_CONSOLE_COUNT)
        uses = whole(req.get("uses") or "1", "可用人数", minimum=1, maximum=MAX_USES)
        tokens = issue = None
        pass_id = None
        pass_days = None
        if kind == "tokens":
            tokens = whole(req.get("tokens"), f"{settings.tokens.name}数", minimum=1,
                           maximum=settings.tokens.max_topup)
        elif kind == "issue":
            issue = whole(req.get("issue"), "期号", minimum=1)
        else:
            offer = settings.pass_by_id(req.get("pass"))
            if offer is None:
                known = "、".join(p.id for p in settings.passes) or "没有配置"
                raise Refused(f"没有会员卡「{req.get('pass')[:32]}」（[[passes]] 里有：{known}）。")
            pass_id, pass_days = offer.id, offer.days
        expires_at = _expiry(req.get("expires"), req)
        label = req.get("label").strip()
        if len(label) > _MAX_LABEL:
            raise Refused(f"备注太长（最多 {_MAX_LABEL} 字）。")
        batch_kind: BatchKind = "tokens" if kind == "tokens" else \
            "issue" if kind == "issue" else "pass"
        try:
            with req.transaction() as session:
                made = codes.create_batch(
                    session, secret=settings.codes.secret.encode(), kind=batch_kind,
                    count=count, uses=uses, tokens=tokens, issue_number=issue, pass_id=pass_id,
                    pass_days=pass_days, expires_at=expires_at, label=label,
                    created_by=f"console:{req.operator}"[:64], now=req.now)
                # Built before the commit: a failure here leaves no batch without its codes.
                response = _csv(made, req)
        except codes.InvalidBatch as exc:
            why = f"没有第 {issue} 期" if exc.field == "issue_number" else str(exc)
            raise Refused(f"无法创建：{why}；没有做任何更改。") from None
        batch = made.batch
        return Done(f"已创建第 {batch.id} 批：{count:,} 个码", target=f"batch #{batch.id}",
                    detail={"kind": kind, "count": count, "uses": uses, "grants":
                            _csv_grants(batch), "expires": local(expires_at, zone(req)),
                            "label": label},
                    response=response)

    @console.action(PATH + "/revoke", name="code.revoke")
    def revoke(req: ConsoleRequest) -> Done:
        raw_batch, raw_code = req.get("batch").strip(), req.get("code").strip()
        if bool(raw_batch) == bool(raw_code):
            raise Refused("请给出一个兑换码或一个批次（只给一个）。")
        if raw_batch:
            batch_id = whole(raw_batch.removeprefix("#"), "批次", minimum=1)
            with req.transaction() as session:
                before = session.get(CodeBatch, batch_id)
                was_revoked = before is not None and before.revoked_at is not None
                done = codes.revoke_batch(session, batch_id=batch_id, now=req.now)
            if done is None:
                raise Refused(f"没有第 {batch_id} 批；没有做任何更改。",
                              target=f"batch #{batch_id}")
            if was_revoked:
                return Done(f"第 {batch_id} 批早已作废，没有更改。", target=f"batch #{batch_id}",
                            detail="already revoked")
            return Done(f"已作废第 {batch_id} 批：它的 {done.count:,} 个码不能再兑换"
                        "（已兑换的不受影响）。", target=f"batch #{batch_id}")
        code = codes.canonical(raw_code)
        if code is None or not codes.check_ok(code):
            raise Refused("这不是有效的兑换码（16 个字符，或有字符输错了）；没有做任何更改。")
        with req.transaction() as session:
            secret = req.settings.codes.secret.encode()
            found = codes.find_code(session, secret=secret, code=code)
            info = codes.revoke_code(session, secret=secret, code=code, now=req.now)
        if found is None or info is None:
            raise Refused("没有这个兑换码；没有做任何更改。")
        # The code itself stays out of the audit and of the flash (a URL): it may still work.
        target = f"code of batch #{info.batch.id}"
        if found.revoked_at is not None:
            return Done("这个码早已作废，没有更改。", target=target, detail="already revoked")
        return Done(f"已作废这个码（第 {info.batch.id} 批，已用 {info.used} / {info.uses}）。",
                    target=target)
