"""The purchase page: ``GET /pay/`` for the holder of a signed pay link, the order endpoint
``POST /pay/orders`` its script calls, and ``GET /pay/orders/<out_trade_no>`` that it polls.

The link (``u``, ``e``, ``s``; ``bot.web.links.PayLinks``) names the subscriber; the page lists
``[[pay.packages]]`` and, when the link came from an issue the reader cannot afford, offers to
pay the difference and unlock it in one step. Inside WeChat it pays with the JSAPI sheet,
elsewhere with a Native QR code. An order is written (``creating``) and committed before
WeChat is called, so a call that times out leaves a row the settle job can query; the page
says 到账 only when the bot's own order says ``paid`` (the notify endpoint or the job credited
it), never on the sheet's word.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from string import Template
from typing import Any, Final, Literal

import bottle
import segno
from sqlalchemy import Engine
from sqlmodel import Session

from bot.pay.client import PayApiError, PayClient, PayError, PayTransientError
from bot.settings import PayPackage, PaySettings, Settings
from bot.web.links import PAY_PAGE_PATH, BadLink, PayLinks, ReaderLinks, check_fields
from bot.web.reader import (
    link_params,
    mask_openid,
    render_notice,
    security_headers,
    single,
)
from handlers.numbers import parse_int
from storage import payments
from storage.db import read_only, transaction
from storage.errors import UnknownIssue
from storage.issues import IssuePreview, get_issue
from storage.models import PayOrder, utcnow
from storage.payments import yuan
from storage.subscribers import Standing, standing

log = logging.getLogger(__name__)

ORDERS_PATH: Final = "/pay/orders"
NOTIFY_PATH: Final = "/pay/notify"
MAX_BODY_BYTES: Final = 4096
MAX_ISSUE_NUMBER: Final = 10**9
# A link holder may place this many orders per window; each one is a call to WeChat Pay.
ORDER_BURST: Final = 10
ORDER_BURST_WINDOW: Final = timedelta(minutes=10)
OrderKind = Literal["jsapi", "native"]

LINK_INVALID: Final = "支付链接无效，请回到公众号对话回复「充值」获取新链接。"
LINK_EXPIRED: Final = "支付链接已过期，请回到公众号对话回复「充值」获取新链接。"
MALFORMED: Final = "请求格式有误，请刷新页面重试。"
BUSY: Final = "微信支付暂时繁忙，没有扣款，请稍后再试。"
SERVER_ERROR: Final = "服务器出错了，请稍后再试。"

_ASSETS = resources.files("bot.pay")
_SCRIPT = (_ASSETS / "page.js").read_text(encoding="utf-8")
_STYLE = ((resources.files("bot.web") / "reader.css").read_text(encoding="utf-8")
          + (_ASSETS / "page.css").read_text(encoding="utf-8"))
_TEMPLATE = Template((_ASSETS / "page.html").read_text(encoding="utf-8"))
# The one script is inline and allowed by its hash; it may fetch only from this site.
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
PAGE_CSP: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_JSON_HEADERS: Final = {
    "Content-Type": "application/json; charset=utf-8",
    "Cache-Control": "private, no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

# What the settle step's unlock outcome means to the reader (storage.payments.UnlockOutcome).
_UNLOCK_REASONS: Final = {
    "short": "余额仍不够", "no_issue": "这一期已不可解锁", "free": "本期已改为免费",
    "pass": "会员卡已包含本期", "already": "你已解锁过本期",
}


class Refusal(Exception):
    """An answer of the order endpoints other than success: status, code and Chinese text."""

    def __init__(self, status: int, code: str, message: str, detail: str = "") -> None:
        super().__init__(f"{status} {code}: {detail or message}")
        self.status, self.code, self.message, self.detail = status, code, message, detail


def in_wechat(user_agent: str) -> bool:
    """WeChat's in-app browser (phone or desktop) says MicroMessenger; the JSAPI sheet exists
    only there."""
    return "micromessenger" in user_agent.lower()


def qr_data_uri(text: str) -> str:
    """``text`` as a QR code, an SVG data: URI (the page's CSP allows images only as data:)."""
    return str(segno.make(text, error="m").svg_data_uri(scale=4, border=4))


def covering_package(packages: list[PayPackage], shortfall: int) -> PayPackage | None:
    """The cheapest package with at least ``shortfall`` tokens (fewest tokens on a tie)."""
    fits = [p for p in packages if p.tokens >= shortfall]
    return min(fits, key=lambda p: (p.price_fen, p.tokens)) if fits else None


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


@dataclass(frozen=True)
class Offer:
    """What the page says about the issue the link came from."""

    kind: Literal["none", "unknown", "free", "owned", "affordable", "buy", "too_big"]
    issue: IssuePreview | None = None
    shortfall: int = 0
    package: PayPackage | None = None


class PayPage:
    def __init__(self, *, settings: Settings, engine: Engine, pay: PaySettings,
                 client: PayClient) -> None:
        self.settings = settings
        self.pay = pay
        self.engine = engine
        self.client = client
        self.links = PayLinks(settings)
        self.reader_links = ReaderLinks(settings)
        self.unit = settings.tokens.name
        self.publication = settings.content.publication
        self.notify_url = settings.server.public_url + NOTIFY_PATH
        self.free_percent = settings.content.free_percent
        self.page_headers = {**security_headers(), "Content-Security-Policy": PAGE_CSP}
        self.notice_headers = security_headers()

    # ---------------------------------------------------------------- the page

    def _notice(self, status: int, **kw: Any) -> Any:
        body = render_notice(publication=self.publication, code=status, **kw)
        return bottle.HTTPResponse(body=body, status=status, headers=dict(self.notice_headers))

    def _bad_link(self, problem: str) -> Any:
        if problem == "expired":
            return self._notice(403, heading="链接已过期", icon="clock",
                                paragraphs=["为保护你的账户，支付链接发出一段时间后失效。"],
                                reply="充值", small="即可收到新的支付链接。")
        return self._notice(403, heading="链接无效", icon="link",
                            paragraphs=["这个支付链接不完整或已被改动，无法打开。"],
                            reply="充值", small="即可收到属于你的支付链接。")

    def redirect(self) -> Any:
        """``/pay`` → ``/pay/``: WeChat opens the pay sheet only from pages inside the
        registered 支付授权目录, which is public_url + /pay/."""
        query = bottle.request.environ.get("QUERY_STRING", "")
        return bottle.HTTPResponse(status=302, headers={
            "Location": PAY_PAGE_PATH + (f"?{query}" if query else ""),
            "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})

    def page(self) -> Any:
        try:
            openid, expires, sig = link_params(bottle.request.query)
        except BadLink as exc:
            log.info("pay link refused: %s", exc)
            return self._bad_link("invalid")
        problem = self.links.verify(openid=openid, expires=expires, sig=sig)
        if problem is not None:
            log.info("pay link of %s refused: %s", mask_openid(openid), problem)
            return self._bad_link(problem)
        number = self._issue_param(bottle.request.query)
        with read_only(self.engine) as session:
            held = standing(session, openid=openid, issue_number=number)
            offer = self._offer(session, held, number)
        kind: OrderKind = ("jsapi" if in_wechat(bottle.request.get_header("User-Agent", ""))
                           else "native")
        log.info("pay page for %s (%s, offer %s)", mask_openid(openid), kind, offer.kind)
        body = self._render(openid=openid, expires=expires, sig=sig, held=held, offer=offer,
                            kind=kind)
        return bottle.HTTPResponse(body=body, status=200, headers=dict(self.page_headers))

    @staticmethod
    def _issue_param(query: Any) -> int | None:
        """``issue`` when it names a possible issue number; anything else is ignored (it is
        not signed: it only picks what the page offers)."""
        if "issue" not in query:
            return None
        try:
            raw = single(query, "issue")
        except BadLink:
            return None
        number = parse_int(raw)
        return number if number is not None and 0 < number <= MAX_ISSUE_NUMBER else None

    def _offer(self, session: Session, held: Standing, number: int | None) -> Offer:
        if number is None:
            return Offer("none")
        try:
            issue = get_issue(session, number=number, default_free_percent=self.free_percent)
        except UnknownIssue:
            return Offer("unknown")
        if issue.is_free:
            return Offer("free", issue)
        if held.unlocked:
            return Offer("owned", issue)
        shortfall = issue.price - held.balance
        if shortfall <= 0:
            return Offer("affordable", issue)
        package = covering_package(self.pay.packages, shortfall)
        return Offer("buy" if package else "too_big", issue, shortfall, package)

    def _package_button(self, package: PayPackage, *, issue: int | None = None,
                        main: bool = False, label: str | None = None) -> str:
        extra = f' data-issue="{_e(issue)}"' if issue is not None else ""
        tokens = (f'<span class="tokens">到账 {_e(package.tokens)} {_e(self.unit)}</span>'
                  if not main else "")
        return (f'<button type="button" class="pkg{" main" if main else ""}" '
                f'data-package="{_e(package.id)}"{extra}>'
                f'<span class="label">{_e(label or package.label)}</span>{tokens}'
                f'<span class="price">¥{_e(yuan(package.price_fen))}</span></button>')

    def _offer_html(self, offer: Offer, openid: str, expires: int) -> str:
        issue, unit = offer.issue, _e(self.unit)
        if offer.kind == "none":
            return ""
        if offer.kind == "unknown" or issue is None:
            return '<p class="note">没有找到这一期，可以先充值，再回到对话查看各期。</p>'
        n = _e(issue.number)
        read = _e(self.reader_links.path_until(openid, issue.number, expires))
        if offer.kind == "free":
            return f'<p class="note">第 {n} 期免费阅读，无需付费：<a href="{read}">阅读全文</a></p>'
        if offer.kind == "owned":
            return (f'<p class="note">你已可以阅读第 {n} 期全文，无需再付费：'
                    f'<a href="{read}">阅读全文</a></p>')
        if offer.kind == "affordable":
            return (f'<p class="note">你的余额已够解锁第 {n} 期（{_e(issue.price)} {unit}）：'
                    f"回到公众号对话，回复「兑换 {n}」即可。</p>")
        head = (f"第 {n} 期《{_e(issue.title)}》需 {_e(issue.price)} {unit}，"
                f"你还差 {_e(offer.shortfall)} {unit}。")
        if offer.kind == "too_big" or offer.package is None:
            return (f'<p class="note">{head}差额超过最大的套餐，请先充值，'
                    f"再回到对话回复「兑换 {n}」。</p>")
        left = offer.package.tokens - offer.shortfall
        return (f'<section class="offer"><h2>补差价并解锁第 {n} 期</h2>'
                f"<p>{head}购买{_e(offer.package.label)}，付款后自动解锁本期，"
                f"解锁后余额 {_e(left)} {unit}。</p>"
                + self._package_button(offer.package, issue=issue.number, main=True,
                                       label=f"补差价并解锁第 {issue.number} 期")
                + "</section>")

    def _render(self, *, openid: str, expires: int, sig: str, held: Standing, offer: Offer,
                kind: OrderKind) -> str:
        packages = "".join(f"<li>{self._package_button(p)}</li>" for p in self.pay.packages)
        tip = ("" if kind == "jsapi" else
               '<p class="small">在手机上？请在微信里打开公众号对话中的链接，直接用微信支付。</p>')
        return _TEMPLATE.substitute(
            title=_e(f"充值 · {self.publication}"),
            style=_STYLE,
            script=_SCRIPT,
            publication=_e(self.publication),
            unit=_e(self.unit),
            u=_e(openid), e=_e(expires), s=_e(sig), kind=kind,
            ttl=_e(self.pay.order_ttl_minutes * 60),
            account=_e(mask_openid(openid)),
            balance=_e(held.balance),
            offer=self._offer_html(offer, openid, expires),
            packages=packages,
            tip=tip,
        )

    # ---------------------------------------------------------------- the order endpoints

    def _json(self, status: int, payload: dict[str, Any]) -> Any:
        return bottle.HTTPResponse(body=json.dumps(payload, ensure_ascii=False), status=status,
                                   headers=dict(_JSON_HEADERS))

    def _guarded(self, what: str, fn: Callable[[], dict[str, Any]]) -> Any:
        try:
            return self._json(200, fn())
        except Refusal as refusal:
            log.info("%s refused: %s %s", what, refusal.code, refusal.detail or refusal.message)
            return self._json(refusal.status, {"code": refusal.code, "message": refusal.message})
        except Exception:
            log.exception("%s failed", what)
            return self._json(500, {"code": "SERVER_ERROR", "message": SERVER_ERROR})

    def _verified(self, openid: Any, expires: Any, sig: Any) -> str:
        """The openid of a good link, else a Refusal (403)."""
        if not all(isinstance(v, str | int) and not isinstance(v, bool)
                   for v in (openid, expires, sig)):
            raise Refusal(403, "LINK_INVALID", LINK_INVALID, "u, e or s missing")
        try:
            who, until, mac = check_fields(str(openid), str(expires), str(sig))
        except BadLink as exc:
            raise Refusal(403, "LINK_INVALID", LINK_INVALID, str(exc)) from None
        problem = self.links.verify(openid=who, expires=until, sig=mac)
        if problem == "expired":
            raise Refusal(403, "LINK_EXPIRED", LINK_EXPIRED)
        if problem is not None:
            raise Refusal(403, "LINK_INVALID", LINK_INVALID,
                          f"signature of {mask_openid(who)}")
        return who

    def create(self) -> Any:
        return self._guarded("pay order", self._create)

    def _request_json(self) -> dict[str, Any]:
        length = bottle.request.content_length
        if length > MAX_BODY_BYTES:
            raise Refusal(413, "TOO_LARGE", "请求内容过大。")
        raw = bottle.request.body.read(MAX_BODY_BYTES + 1)
        if len(raw) > MAX_BODY_BYTES:
            raise Refusal(413, "TOO_LARGE", "请求内容过大。")
        try:
            body = json.loads(raw)
        except ValueError:
            raise Refusal(400, "BAD_REQUEST", MALFORMED, "not JSON") from None
        if not isinstance(body, dict):
            raise Refusal(400, "BAD_REQUEST", MALFORMED, "not an object")
        return body

    def _create(self) -> dict[str, Any]:
        body = self._request_json()
        openid = self._verified(body.get("u"), body.get("e"), body.get("s"))
        package = (self.pay.package(body["package"])
                   if isinstance(body.get("package"), str) else None)
        if package is None:
            raise Refusal(400, "UNKNOWN_PACKAGE", "没有这个套餐，请刷新页面后重新选择。",
                          f"package {str(body.get('package'))[:40]!r}")
        kind = body.get("kind")
        if kind not in ("jsapi", "native"):
            raise Refusal(400, "BAD_REQUEST", MALFORMED, f"kind {kind!r}")
        issue = body.get("issue")
        if issue is not None and (not isinstance(issue, int) or isinstance(issue, bool)
                                  or not 0 < issue <= MAX_ISSUE_NUMBER):
            raise Refusal(404, "UNKNOWN_ISSUE", "没有找到这一期。", f"issue {str(issue)[:20]!r}")
        with transaction(self.engine) as session:
            if issue is not None:
                description = self._check_unlock(session, openid, issue, package)
            else:
                description = f"{self.publication} {package.label}"
            self._check_burst(session, openid)
            order = payments.new_order(
                session, openid=openid, package=package, kind=kind, issue_number=issue,
                app_id=self.pay.app_id, mch_id=self.pay.mch_id, notify_url=self.notify_url,
                ttl=timedelta(minutes=self.pay.order_ttl_minutes), description=description)
            no, request = order.out_trade_no, order.request_json
        log.info("pay order %s for %s: %s %s%s", no, mask_openid(openid), kind, package.id,
                 f" + unlock {issue}" if issue is not None else "")
        prepay = self._place(no, kind, request)
        answer: dict[str, Any] = {"out_trade_no": no, "tokens": package.tokens,
                                  "price": yuan(package.price_fen)}
        if kind == "jsapi":
            answer["jsapi"] = self.client.jsapi_params(prepay)
        else:
            answer["code_url"] = prepay
            answer["qr"] = qr_data_uri(prepay)
            if self.pay.on_loopback:  # the fake's own page that "pays" it (newsbot demo)
                answer["demo_pay_url"] = f"{self.pay.api_base}/pay/{no}"
        return answer

    def _check_unlock(self, session: Session, openid: str, number: int,
                      package: PayPackage) -> str:
        try:
            issue = get_issue(session, number=number, default_free_percent=self.free_percent)
        except UnknownIssue:
            raise Refusal(404, "UNKNOWN_ISSUE", f"没有找到第 {number} 期。") from None
        held = standing(session, openid=openid, issue_number=number)
        if issue.is_free:
            raise Refusal(409, "ALREADY_OWNED", f"第 {number} 期免费阅读，无需付费。")
        if held.unlocked:
            raise Refusal(409, "ALREADY_OWNED", f"你已可以阅读第 {number} 期，无需再付费。")
        if held.balance + package.tokens < issue.price:
            raise Refusal(400, "PACKAGE_TOO_SMALL",
                          f"这个套餐不够解锁第 {number} 期，请选择更大的套餐。")
        return f"{self.publication} {package.label} 解锁第{number}期"

    def _check_burst(self, session: Session, openid: str) -> None:
        recent = payments.list_orders(session, openid=openid, limit=ORDER_BURST)
        since = utcnow() - ORDER_BURST_WINDOW
        if len(recent) >= ORDER_BURST and all(o.created_at > since for o in recent):
            raise Refusal(429, "TOO_MANY_ORDERS", "下单太频繁，请过几分钟再试。",
                          f"{ORDER_BURST} orders within {ORDER_BURST_WINDOW}")

    def _place(self, no: str, kind: OrderKind, request_json: str) -> str:
        """Create the order at WeChat from its stored body (the same bytes on every retry);
        the prepay_id or code_url. On failure the order is marked failed when WeChat surely
        did not make it, and left ``creating`` (for the settle job to query) when it may
        have."""
        try:
            prepay = self.client.submit_order(kind, request_json)
        except PayTransientError as exc:
            if not exc.maybe_processed:
                self._mark_failed(no, exc)
            log.warning("pay order %s: WeChat Pay unavailable (%s)%s", no, exc,
                        "; left for the settle job" if exc.maybe_processed else "")
            raise Refusal(503, "PAY_UNAVAILABLE", BUSY,
                          str(exc)) from None
        except PayApiError as exc:
            self._mark_failed(no, exc)
            raise Refusal(502, "PAY_REFUSED", "微信支付没有受理这笔订单，没有扣款，请稍后再试。",
                          str(exc)) from None
        except PayError as exc:  # an answer we could not trust or read: it may exist
            log.warning("pay order %s: unusable answer (%s); left for the settle job", no, exc)
            raise Refusal(502, "PAY_UNAVAILABLE", BUSY,
                          str(exc)) from None
        with transaction(self.engine) as session:
            if kind == "jsapi":
                payments.mark_created(session, out_trade_no=no, prepay_id=prepay)
            else:
                payments.mark_created(session, out_trade_no=no, code_url=prepay)
        return prepay

    def _mark_failed(self, no: str, exc: PayError) -> None:
        with transaction(self.engine) as session:
            payments.mark_failed(session, out_trade_no=no, error=str(exc))

    def state(self, out_trade_no: str) -> Any:
        return self._guarded("pay order state", lambda: self._state(out_trade_no))

    def _state(self, out_trade_no: str) -> dict[str, Any]:
        try:
            openid, expires, sig = link_params(bottle.request.query)
        except BadLink as exc:
            raise Refusal(403, "LINK_INVALID", LINK_INVALID, str(exc)) from None
        openid = self._verified(openid, expires, sig)
        missing = Refusal(404, "UNKNOWN_ORDER", "没有找到这笔订单。",
                          f"{out_trade_no[:40]!r} for {mask_openid(openid)}")
        if not payments.OUT_TRADE_NO_RE.fullmatch(out_trade_no):
            raise missing
        with read_only(self.engine) as session:
            order = payments.order_state_for(session, out_trade_no=out_trade_no, openid=openid)
            if order is None:
                raise missing
            balance = (standing(session, openid=openid, issue_number=None).balance
                       if order.status == "paid" else None)
            return self._order_json(order, openid, expires, balance)

    def _order_json(self, order: PayOrder, openid: str, expires: int,
                    balance: int | None) -> dict[str, Any]:
        paid = order.status == "paid"
        unlocked = paid and order.unlock_entry_id is not None
        answer: dict[str, Any] = {
            "out_trade_no": order.out_trade_no, "status": order.status,
            "tokens": order.tokens, "price": yuan(order.amount_fen),
            "issue": order.issue_number, "unlocked": unlocked,
        }
        if balance is not None:
            answer["balance"] = balance
        if paid and order.issue_number is not None:
            if unlocked or order.unlock_note in ("already", "pass", "free"):
                answer["unlocked"] = True
                answer["read_url"] = self.reader_links.path_until(openid, order.issue_number,
                                                                  expires)
            else:
                answer["unlock_reason"] = _UNLOCK_REASONS.get(order.unlock_note or "",
                                                              "请稍后再试")
        return answer


def install(app: bottle.Bottle, *, settings: Settings, engine: Engine,
            client: PayClient | None = None) -> PayClient | None:
    """Add the pay page and its order endpoints when ``[pay]`` is set (else nothing: /pay is
    a 404 like any unknown path). Returns the client the routes use."""
    if settings.pay is None:
        return None
    client = client or PayClient.from_settings(settings.pay)
    page = PayPage(settings=settings, engine=engine, pay=settings.pay, client=client)
    app.route("/pay", method="GET", callback=page.redirect)
    app.route(PAY_PAGE_PATH, method="GET", callback=page.page)
    app.route(ORDERS_PATH, method="POST", callback=page.create)
    app.route(f"{ORDERS_PATH}/<out_trade_no>", method="GET", callback=page.state)
    return client
