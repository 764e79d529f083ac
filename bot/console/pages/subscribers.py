"""订阅者: search, one subscriber's balance, ledger, unlocks and passes, and the operator's
top-up and adjustment.

Credits go through ``storage.ledger.credit`` with the CLI's limits (MAX_ABS_AMOUNT,
``[tokens] max_topup``, a reason). Each form carries a key drawn when the form was rendered,
stored as the entry's idempotency key (``console:KEY``), so a double click or a browser
retry of one form credits once; a new form (the page after the redirect) has a new key."""

from __future__ import annotations

from urllib.parse import quote

from sqlmodel import Session, col, func, select

from bot.console.core import Console, ConsoleRequest, Done, Refused, esc
from bot.console.pages.pagekit import (
    form_key,
    hidden,
    local,
    new_form_key,
    optional_whole,
    page_number,
    pager,
    snapshot,
    table,
    whole,
    zone,
)
from storage import ledger, passes, subscribers
from storage.errors import (
    IdempotencyConflict,
    InsufficientBalance,
    InvalidAmount,
    UnknownSubscriber,
)
from storage.ledger import CreditKind
from storage.models import LedgerEntry, Subscriber

PATH = "/subscribers"
PER_PAGE = 50
KEY_PREFIX = "console:"
_MAX_OPENID = 64
_MAX_REASON = 200
_KINDS = {"topup": "充值", "adjust": "调整", "redeem": "解锁", "code": "兑换码", "pass": "会员卡",
          "gift": "礼品", "refund": "退款", "pay": "微信支付", "pay_refund": "支付退款"}
_SOURCES = {"purchase": "购买", "code": "兑换码", "gift": "礼品", "grant": "赠送"}


def _like(fragment: str) -> str:
    """A LIKE pattern matching ``fragment`` literally anywhere (escape char \\)."""
    escaped = fragment.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _search(session: Session, *, fragment: str, min_balance: int | None, offset: int,
            limit: int) -> list[Subscriber]:
    stmt = select(Subscriber)
    if fragment:
        stmt = stmt.where(col(Subscriber.openid).like(_like(fragment), escape="\\"))
    if min_balance is not None:
        stmt = stmt.where(col(Subscriber.balance) >= min_balance)
    return list(session.exec(stmt.order_by(col(Subscriber.id).desc())
                             .offset(offset).limit(limit)).all())


def _entries(session: Session, *, openid: str, offset: int, limit: int) -> list[LedgerEntry]:
    return list(session.exec(select(LedgerEntry).where(LedgerEntry.openid == openid)
                             .order_by(col(LedgerEntry.id).desc())
                             .offset(offset).limit(limit)).all())


def _count_entries(session: Session, *, openid: str) -> int:
    return int(session.exec(select(func.count()).select_from(LedgerEntry)
                            .where(LedgerEntry.openid == openid)).one())


def _page(openid: str) -> str:
    return f"/console{PATH}/{quote(openid, safe='')}"


def _link(openid: str) -> str:
    return f'<a href="{esc(_page(openid))}">{esc(openid)}</a>'


def _credit_form(req: ConsoleRequest, openid: str, kind: CreditKind) -> str:
    unit = req.settings.tokens.name
    if kind == "topup":
        head, label, button = "充值", f"数量（{unit}，正整数）", "充值"
        note = f"单次最多 {req.settings.tokens.max_topup:,} {unit}（[tokens] max_topup）。"
    else:
        head, label, button = "调整余额", f"增减（{unit}，减少时前面加 -）", "调整"
        note = "余额不会低于零。"
    return (f"<h2>{head}</h2>" + req.form_tag(f"/console{PATH}/{kind}", extra='class="stack"')
            + hidden("openid", openid) + hidden("key", new_form_key())
            + hidden("next", _page(openid))
            + f'<label>{esc(label)}<input type="text" name="amount" inputmode="numeric" '
            'autocomplete="off" required></label>'
            '<label>原因（必填，记入账本）'
            f'<input type="text" name="reason" maxlength="{_MAX_REASON}" required></label>'
            f"<button type=submit>{button}</button><p class=muted>{esc(note)}</p></form>")


def _credit(req: ConsoleRequest, kind: CreditKind) -> Done:
    openid = req.get("openid").strip()
    if not openid or len(openid) > _MAX_OPENID:
        raise Refused("缺少订阅者的 openid。")
    label = "充值数量" if kind == "topup" else "调整数量"
    amount = whole(req.get("amount"), label, signed=kind == "adjust",
                   minimum=1 if kind == "topup" else None)
    if amount == 0:
        raise Refused("调整 0 不会改变任何东西，请填写非零的增减。", target=openid)
    reason = req.get("reason").strip()
    if not reason:
        raise Refused("请填写原因（记入账本，订阅者查余额时也能看到）；没有做任何更改。",
                      target=openid)
    if len(reason) > _MAX_REASON:
        raise Refused(f"原因太长（最多 {_MAX_REASON} 字）；没有做任何更改。", target=openid)
    key = KEY_PREFIX + form_key(req)
    unit = req.settings.tokens.name
    what = "充值" if kind == "topup" else "调整"
    try:
        with req.transaction() as session:
            result = ledger.credit(session, openid=openid, amount=amount, kind=kind, key=key,
                                   reason=reason, operator=f"console:{req.operator}"[:64],
                                   max_topup=req.settings.tokens.max_topup)
    except InvalidAmount as exc:
        if exc.problem == "over_limit":
            message = (f"{what}数量 {amount:,} 超过单次上限 {exc.limit:,} {unit}"
                       "（[tokens] max_topup）")
        elif exc.problem == "too_large":
            message = f"{what}数量 {amount:,} 大得不合理"
        elif exc.problem == "no_reason":
            message = "请填写原因"
        else:
            message = f"{what}数量必须是正整数"
        raise Refused(f"{message}；没有做任何更改。", target=openid) from None
    except InsufficientBalance as exc:
        raise Refused(f"余额只有 {exc.balance:,} {unit}，调整 {amount:+,} 会使余额低于零；"
                      "没有做任何更改。", target=openid) from None
    except UnknownSubscriber:
        raise Refused("没有这个订阅者（用户需要先给公众号发过消息，或从微信同步过关注者）；"
                      "没有做任何更改。", target=openid) from None
    except IdempotencyConflict:
        raise Refused("这份表单已经提交过另一笔操作，为防止重复入账没有执行。请刷新页面后重新"
                      "填写。", target=openid) from None
    entry = result.entry
    detail = {"amount": amount, "entry": entry.id, "key": key, "replayed": result.replayed}
    if result.replayed:
        return Done(f"这笔{what}已经入账过（同一表单重复提交），没有再次入账：条目 #{entry.id}，"
                    f"余额 {entry.balance_after:,} {unit}。", target=openid, detail=detail)
    return Done(f"已{what} {amount:+,} {unit}：余额 {entry.balance_after:,} {unit}"
                f"（条目 #{entry.id}）。", target=openid, detail=detail)


def install(console: Console) -> None:
    @console.page(PATH, title="订阅者", nav="订阅者", order=30)
    def search_page(req: ConsoleRequest) -> str:
        fragment = req.get("q").strip()[:_MAX_OPENID]
        raw_min = req.get("min_balance").strip()
        try:
            min_balance = optional_whole(raw_min, "最低余额")
        except Refused as refused:
            return f"<p class='flash error'>{esc(refused.message)}</p>"
        page = page_number(req)
        tz, unit = zone(req), req.settings.tokens.name
        with snapshot(req) as session:
            found = _search(session, fragment=fragment, min_balance=min_balance,
                            offset=(page - 1) * PER_PAGE, limit=PER_PAGE + 1)
            total = subscribers.count_subscribers(session)
        rows = [[_link(s.openid), esc(f"{s.balance:,} {unit}"),
                 "关注中" if s.subscribed else "已取关", esc(local(s.created_at, tz))]
                for s in found[:PER_PAGE]]
        form = ('<form method="get" action="/console/subscribers" class="stack search">'
                f'<label>openid（包含）<input type="search" name="q" value="{esc(fragment)}" '
                'autocomplete="off"></label>'
                f'<label>余额至少<input type="text" name="min_balance" inputmode="numeric" '
                f'value="{esc(raw_min)}"></label><button type=submit>搜索</button></form>')
        return (form + f"<p class=muted>共 {total:,} 位订阅者，新的在前。</p>"
                + table(["openid", "余额", "状态", "首次出现"], rows, numeric=frozenset({1}),
                        empty="没有符合条件的订阅者。")
                + pager(f"/console{PATH}", {"q": fragment, "min_balance": raw_min}, page,
                        has_next=len(found) > PER_PAGE))

    @console.page(PATH + "/<openid>", title="订阅者详情")
    def subscriber_page(req: ConsoleRequest) -> str:
        openid = str(req.args["openid"])
        page = page_number(req)
        tz, unit = zone(req), req.settings.tokens.name
        with snapshot(req) as session:
            sub = subscribers.get_subscriber(session, openid=openid)
            if sub is None:
                return (f"<p class=empty>没有订阅者 {esc(openid)}。"
                        f"<a href='/console{PATH}'>返回搜索</a></p>")
            unlocked = sorted(ledger.unlocked_issues(session, openid=openid))
            running = passes.status(session, openid=openid, now=req.now)
            periods = passes.periods(session, openid=openid)
            entries = _entries(session, openid=openid, offset=(page - 1) * PER_PAGE,
                               limit=PER_PAGE + 1)
            count = _count_entries(session, openid=openid)
        offers = {p.id: p.name for p in req.settings.passes}
        pass_text = "没有" if running is None else \
            f"{offers.get(running.pass_id, running.pass_id)}，到 {local(running.until, tz)}"
        state = "关注中" if sub.subscribed else f"已取关 {local(sub.unsubscribed_at, tz)}"
        facts = [("余额", f"{sub.balance:,} {unit}"), ("状态", state),
                 ("首次出现", local(sub.created_at, tz)), ("来源二维码", sub.scene or "—"),
                 ("会员卡", pass_text),
                 ("可读全文", "、".join(f"#{n}" for n in unlocked) or "没有")]
        dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
        ledger_rows = [[esc(e.id), esc(local(e.created_at, tz, "%Y-%m-%d %H:%M:%S")),
                        esc(f"{e.amount:+,}"), esc(_KINDS.get(e.kind, e.kind)),
                        esc(f"{e.balance_after:,}"), esc(e.reason), esc(e.operator or "")]
                       for e in entries[:PER_PAGE]]
        period_rows = [[esc(offers.get(p.pass_id, p.pass_id)), esc(p.days),
                        esc(local(p.starts_at, tz)), esc(local(passes.effective_end(p), tz))
                        + (" （退款截断）" if p.cut_at else ""),
                        esc(_SOURCES.get(p.source, p.source))] for p in reversed(periods)]
        return (f"<h2>{esc(openid)}</h2><dl class=facts>{dl}</dl>"
                f"<div class='grid two'>{_credit_form(req, openid, 'topup')}"
                f"{_credit_form(req, openid, 'adjust')}</div>"
                f"<h2>账本（共 {count:,} 条，新的在前）</h2>"
                + table(["#", "时间", "数量", "类型", "余额", "原因", "操作者"], ledger_rows,
                        numeric=frozenset({0, 2, 4}), wrap=frozenset({5}),
                        empty="还没有账本记录。")
                + pager(_page(openid), {}, page, has_next=len(entries) > PER_PAGE)
                + "<h2>会员卡</h2>"
                + table(["会员卡", "天数", "开始", "结束", "来源"], period_rows,
                        empty="没有会员卡。")
                + f"<p><a href='/console{PATH}'>‹ 搜索订阅者</a></p>")

    @console.action(PATH + "/topup", name="user.topup")
    def topup(req: ConsoleRequest) -> Done:
        return _credit(req, "topup")

    @console.action(PATH + "/adjust", name="user.adjust")
    def adjust(req: ConsoleRequest) -> Done:
        return _credit(req, "adjust")
