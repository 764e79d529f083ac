"""Reader pages: ``GET /read/<number>`` serves one issue to the holder of a signed link.

The link names the reader (``u``), its expiry (``e``) and an HMAC (``s``, see ``bot.web.links``).
Every request is answered with a self-contained HTML page: the full text when the reader is
entitled (or the issue is free), otherwise only the stored free excerpt followed by how to
unlock. Refusals (bad or expired link, unknown issue) get a friendly page too; input is checked
before it reaches anything that could raise, so a stack trace is never shown.
"""

from __future__ import annotations

import html
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from importlib import resources
from string import Template
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import bottle
from sqlalchemy import Engine

from bot.settings import Settings
from bot.web.links import READER_PREFIX, BadLink, ReaderLinks, check_fields
from handlers.numbers import parse_int
from storage import events
from storage.content import render_html
from storage.db import read_only, run_in_transaction
from storage.errors import UnknownIssue
from storage.images import image_allowed
from storage.issues import IssuePreview, IssueReading, neighbours, read_issue

log = logging.getLogger(__name__)

# Issue numbers are positive and far below what any database integer column holds; anything
# else cannot name an issue and must not reach the query.
MAX_ISSUE_NUMBER = 10**9
_FALLBACK_TZ = timezone(timedelta(hours=8), "Asia/Shanghai")

# No scripts, fonts, frames or requests of any kind beyond the page itself; images only as
# data: (the watermark) and from the https:// hosts of ``[reader] image_hosts``.
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src {img}; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
CONTENT_SECURITY_POLICY = _CSP.format(img="data:")


def content_security_policy(image_hosts: Sequence[str] = ()) -> str:
    """The reader's CSP, with ``image_hosts`` (bare names, checked by the settings) allowed."""
    return _CSP.format(img=" ".join(["data:", *(f"https://{h}" for h in image_hosts)]))


def security_headers(image_hosts: Sequence[str] = ()) -> dict[str, str]:
    return {
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "private, no-store",
        "Pragma": "no-cache",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": content_security_policy(image_hosts),
        "X-Frame-Options": "DENY",
        "X-Robots-Tag": "noindex, nofollow",
    }


SECURITY_HEADERS: dict[str, str] = security_headers()

# Reading speed assumed for the meta line's 约 N 分钟: ~400 字 a minute, a common figure for
# attentive reading of Chinese prose (numbers and tables make real pages a little slower).
CHARS_PER_MINUTE = 400

# One tile of the watermark: the masked openid, rotated, in a grey faint enough for both the
# light and the dark theme. Tiled by CSS over the whole viewport; as a data: URI it is allowed
# by ``img-src data:`` and makes no request.
_WATERMARK_SVG = Template(
    "<svg xmlns='http://www.w3.org/2000/svg' width='240' height='150'>"
    "<text x='120' y='80' text-anchor='middle' transform='rotate(-24 120 75)' "
    "font-family='sans-serif' font-size='15' fill='#808080' fill-opacity='0.16'>$text</text>"
    "</svg>"
)

_STYLE = (resources.files("bot.web") / "reader.css").read_text(encoding="utf-8")

_PAGE = Template(
    """<!DOCTYPE html>
<html lang="zh-CN">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1, viewport-fit=cover">
<meta name="color-scheme" content="light dark">
<meta name="referrer" content="no-referrer">
<meta name="robots" content="noindex, nofollow">
<title>$title</title>
<style>$style</style>
</head>
<body>
<main class="page">
<header class="masthead"><span class="pub">$publication</span>$edition</header>
$content
</main>
$watermark
</body>
</html>
"""
)

_ISSUE = Template(
    """<header class="head">
<h1>$title</h1>
<p class="meta"><span class="pub">$publication</span>$date<span>$minutes</span></p>
</header>
$summary
$topics
$note
<article class="$article_class">
$body
</article>
$unlock
$pager
<footer class="foot">
<p>回到公众号对话，回复「往期」查看各期。</p>
<p>本页链接仅供你本人阅读，请勿转发。</p>
<p class="brand">$publication</p>
</footer>"""
)

_UNLOCK = Template(
    """<section class="unlock">
<h2>免费试读到此结束</h2>
<p>全文约 $chars 字，读完约 $minutes 分钟。<br>
解锁本期需要 <span class="price">$price $unit</span>。</p>
<div class="reply"><span class="label">在公众号对话中发送</span>
<span class="cmd">兑换 $number</span></div>
<p>解锁后刷新本页，即可阅读全文。</p>
<p class="small">回复「余额」查看你的$unit余额。</p>
</section>"""
)

_NOTICE = Template(
    """<section class="notice">
$icon
<h1>$heading</h1>
$paragraphs
$reply
$small
<p class="code">$code</p>
</section>"""
)

# Line icons for the notices, drawn inline (markup, not a request).
_ICONS = {
    "clock": '<circle cx="24" cy="24" r="18"/><path d="M24 14v11l7 4"/>',
    "link": '<path d="M20 28l8-8"/><path d="M22 15l3-3a7 7 0 0 1 10 10l-3 3"/>'
            '<path d="M26 33l-3 3a7 7 0 0 1-10-10l3-3"/><path d="M10 10l28 28"/>',
    "search": '<circle cx="21" cy="21" r="12"/><path d="M30 30l9 9"/>',
    "alert": '<circle cx="24" cy="24" r="18"/><path d="M24 15v12"/><path d="M24 32.5v.5"/>',
}


def _icon(name: str) -> str:
    return (
        '<svg class="icon" viewBox="0 0 48 48" fill="none" stroke="currentColor" '
        f'stroke-width="2.6" stroke-linecap="round" aria-hidden="true">{_ICONS[name]}</svg>'
    )


def mask_openid(openid: str) -> str:
    """First and last four characters around ``****`` (fewer for short ids), so a screenshot
    can be traced without the page spelling out the whole openid."""
    keep = min(4, len(openid) // 4)
    if keep == 0:
        return "****"
    return f"{openid[:keep]}****{openid[-keep:]}"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _watermark(openid: str | None) -> str:
    """A fixed, click-through layer tiled with the masked openid. The SVG text is XML-escaped,
    then the whole SVG is percent-encoded (``*`` kept for legibility), so nothing in it can end
    the CSS string or the HTML attribute."""
    if not openid:
        return ""
    svg = _WATERMARK_SVG.substitute(text=_e(mask_openid(openid)))
    uri = "data:image/svg+xml," + quote(svg, safe="*")
    return f'<div class="wm" aria-hidden="true" style="background-image:url(\'{_e(uri)}\')"></div>'


def _page(*, title: str, publication: str, content: str, edition: str = "",
          openid: str | None = None) -> str:
    return _PAGE.substitute(
        title=_e(f"{title} · {publication}"),
        style=_STYLE,
        publication=_e(publication),
        edition=f'<span class="no">{_e(edition)}</span>' if edition else "",
        content=content,
        watermark=_watermark(openid),
    )


def render_notice(*, publication: str, heading: str, paragraphs: Sequence[str], icon: str,
                  code: int, reply: str = "", small: str = "") -> str:
    """A small page for refusals and errors: what happened, and the reply to send in the chat
    (``reply``, shown as a bubble). All arguments are plain text, escaped here."""
    reply_html = (
        '<div class="reply"><span class="label">回到公众号对话，发送</span>'
        f'<span class="cmd">{_e(reply)}</span></div>'
        if reply else ""
    )
    content = _NOTICE.substitute(
        icon=_icon(icon),
        heading=_e(heading),
        paragraphs="\n".join(f"<p>{_e(p)}</p>" for p in paragraphs),
        reply=reply_html,
        small=f'<p class="small">{_e(small)}</p>' if small else "",
        code=_e(f"错误代码 {code}"),
    )
    return _page(title=heading, publication=publication, content=content)


def _local_tz(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ValueError, KeyError, OSError):  # unknown key or no tzdata on the host
        return _FALLBACK_TZ


def _date(dt: datetime | None, tz: tzinfo) -> str:
    if dt is None:
        return ""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    local = dt.astimezone(tz)
    return f"{local.year}年{local.month}月{local.day}日"


def reading_minutes(chars: int) -> int:
    """Minutes to read ``chars`` 字 at ``CHARS_PER_MINUTE``, at least 1."""
    return max(1, math.ceil(chars / CHARS_PER_MINUTE))


def _topics_html(preview: IssuePreview) -> str:
    """The topics, collapsed to one line so the article starts on the first screen."""
    if not preview.topics:
        return ""
    items = []
    for topic in preview.topics:
        questions = "".join(f"<li>{_e(q)}</li>" for q in topic.questions)
        sub = f"<ul>{questions}</ul>" if questions else ""
        items.append(f"<li><strong>{_e(topic.title)}</strong>{sub}</li>")
    return (
        '<details class="topics">\n<summary><span class="label">本期话题'
        f'<span class="count">{len(preview.topics)} 个</span></span></summary>\n'
        f"<ol>{''.join(items)}</ol>\n</details>"
    )


# markdown-it's own output (raw HTML in issues is escaped, so these tags come from it alone).
_IMG_RE = re.compile(r'<img src="([^"]*)" alt="([^"]*)"((?: title="[^"]*")?) />')


def _article_html(markdown: str, image_hosts: Sequence[str]) -> str:
    """The body as reader HTML: tables in a sideways-scrolling box, images loaded lazily, and
    an image the CSP would block (its host no longer listed) shown as its alt text instead of
    a broken picture."""

    def image(m: re.Match[str]) -> str:
        src, alt, title = m[1], m[2], m[3]
        if not image_allowed(html.unescape(src), image_hosts):
            return f'<span class="img-gone">［图片：{alt or "未显示"}］</span>'
        return f'<img src="{src}" alt="{alt}"{title} loading="lazy" decoding="async">'

    out = _IMG_RE.sub(image, render_html(markdown))
    return out.replace("<table>", '<div class="table"><table>').replace(
        "</table>", "</table></div>"
    )


@dataclass(frozen=True)
class PagerLink:
    """A neighbouring issue on the reader page: its number, title and signed path."""

    number: int
    title: str
    href: str


def _pager_html(prev: PagerLink | None, next_: PagerLink | None) -> str:
    def cell(link: PagerLink | None, cls: str, label: str, none: str) -> str:
        if link is None:
            return f'<span class="{cls} none">{none}</span>'
        rel = "prev" if cls == "prev" else "next"
        return (
            f'<a class="{cls}" rel="{rel}" href="{_e(link.href)}">'
            f'<span class="dir">{label}</span>'
            f'<span class="t">第 {_e(link.number)} 期｜{_e(link.title)}</span></a>'
        )

    if prev is None and next_ is None:
        return ""
    return (
        '<nav class="pager" aria-label="上一期和下一期">'
        + cell(prev, "prev", "‹ 上一期", "已是第一期")
        + cell(next_, "next", "下一期 ›", "已是最新一期")
        + "</nav>"
    )


def render_issue_page(
    reading: IssueReading,
    *,
    openid: str,
    unit: str,
    tz: tzinfo,
    publication: str = "会员通讯",
    prev: PagerLink | None = None,
    next_: PagerLink | None = None,
    image_hosts: Sequence[str] = (),
) -> str:
    """The reader page for ``reading``: the full body when unlocked, else the excerpt and the
    unlock card. Only ``reading.text_md`` is rendered, and for a locked issue it holds the
    excerpt alone, so the locked text cannot end up here."""
    p = reading.preview
    text = reading.text_md.strip()
    minutes = reading_minutes(p.char_count)
    if reading.unlocked:
        note = (
            '<p class="status">本期免费阅读</p>'
            if p.is_free
            else '<p class="status">你已解锁本期 · 以下为全文</p>'
        )
        unlock = ""
        article_class = "body"
        body = _article_html(text, image_hosts) if text else '<p class="empty">本期暂无正文。</p>'
        reading_time = f"约 {minutes} 分钟"
    else:
        note = (
            f'<p class="status">免费试读 · 约 {_e(f"{p.excerpt_char_count:,}")} 字</p>'
            if text else ""
        )
        article_class = "body excerpt" if text else "body"
        body = (
            _article_html(text, image_hosts) if text
            else '<p class="empty">本期没有免费试读部分。</p>'
        )
        unlock = _UNLOCK.substitute(
            chars=_e(f"{p.char_count:,}"),
            minutes=_e(minutes),
            price=_e(p.price),
            unit=_e(unit),
            number=_e(p.number),
        )
        reading_time = f"全文约 {minutes} 分钟"
    date = _date(p.published_at, tz)
    content = _ISSUE.substitute(
        title=_e(p.title),
        publication=_e(publication),
        date=f"<span>{_e(date)}</span>" if date else "",
        minutes=_e(reading_time),
        summary=f'<p class="lede">{_e(p.summary)}</p>' if p.summary else "",
        topics=_topics_html(p),
        note=note,
        article_class=article_class,
        body=body,
        unlock=unlock,
        pager=_pager_html(prev, next_),
    )
    return _page(
        title=f"第{p.number}期｜{p.title}",
        publication=publication,
        edition=f"第 {p.number} 期",
        content=content,
        openid=openid,
    )


def single(query: Any, name: str) -> str:
    """The one value of ``name`` as text; missing, repeated or undecodable is a bad link."""
    values = query.getall(name)
    if len(values) != 1:
        raise BadLink(f"{name}: {len(values)} values")
    value = query.getunicode(name)
    if not isinstance(value, str) or not value:
        raise BadLink(f"{name}: empty or not UTF-8")
    return value


def link_params(query: Any) -> tuple[str, int, str]:
    """``u``, ``e`` and ``s`` of a signed link's query, checked for shape (not signature)."""
    return check_fields(single(query, "u"), single(query, "e"), single(query, "s"))


class _ReaderApp:
    def __init__(self, *, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.links = ReaderLinks(settings)
        self.unit = settings.tokens.name
        self.publication = settings.content.publication
        self.image_hosts = tuple(settings.reader.image_hosts)
        self.headers = security_headers(self.image_hosts)
        self.tz = _local_tz(settings.broadcast.timezone)

    # ---------------------------------------------------------------- pages

    def _notice(self, **kw: Any) -> str:
        return render_notice(publication=self.publication, **kw)

    def invalid(self, number: int | None) -> str:
        return self._notice(
            heading="链接无效",
            icon="link",
            code=403,
            paragraphs=["这个阅读链接不完整或已被改动，无法打开。"],
            reply=f"全文 {number}" if number is not None else "往期",
            small=f"即可收到属于你的新链接。还没解锁？回复「试读 {number}」先读免费部分。"
            if number is not None else "即可看到各期，再回复期号查看。",
        )

    def expired(self, number: int) -> str:
        hours = self.settings.reader.link_ttl_hours
        ttl = f"{hours // 24} 天" if hours % 24 == 0 else f"{hours} 小时"
        return self._notice(
            heading="链接已过期",
            icon="clock",
            code=403,
            paragraphs=[f"为保护你的阅读权益，阅读链接发出 {ttl}后失效。"],
            reply=f"全文 {number}",
            small=f"即可收到新的链接。还没解锁？回复「试读 {number}」先读免费部分。",
        )

    def not_found(self, number: int | None) -> str:
        what = f"第 {number} 期" if number is not None else "这一期"
        return self._notice(
            heading="没有找到这一期",
            icon="search",
            code=404,
            paragraphs=[f"{what}不存在或尚未发布。"],
            reply="往期",
            small="即可看到已发布的各期；回复「本周」查看最新一期。",
        )

    def server_error(self) -> str:
        return self._notice(
            heading="页面暂时无法打开",
            icon="alert",
            code=500,
            paragraphs=["服务器开了个小差，请稍后刷新重试。"],
            small="如果一直打不开，请在公众号对话中留言告诉我们。",
        )

    # ---------------------------------------------------------------- routes

    def _respond(self, status: int, body: str) -> Any:
        return bottle.HTTPResponse(body=body, status=status, headers=dict(self.headers))

    def read(self, raw_number: str) -> Any:
        # The chat's digit rule (handlers.numbers): bottle's int filter would read /read/%D9%A6
        # as 6. Anything else can name no issue, so no signature matches it: 链接无效, as for
        # any edited link.
        strict = parse_int(raw_number)
        number = -1 if strict is None else strict
        try:
            return self._read(number)
        except Exception:
            log.exception("reader page for issue %s failed", number)
            return self._respond(500, self.server_error())

    def _read(self, number: int) -> Any:
        known = number if 0 < number <= MAX_ISSUE_NUMBER else None
        try:
            openid, expires, sig = link_params(bottle.request.query)
        except BadLink as exc:
            log.info("reader link refused for issue %s: %s", number, exc)
            return self._respond(403, self.invalid(known))
        who = mask_openid(openid)
        problem = self.links.verify(openid=openid, issue=number, expires=expires, sig=sig)
        if problem == "expired":
            log.info("reader link for issue %s by %s expired at %s", number, who, expires)
            return self._respond(403, self.expired(number))
        if problem is not None:
            log.info("reader link for issue %s by %s refused: %s", number, who, problem)
            return self._respond(403, self.invalid(known))
        if not 0 < number <= MAX_ISSUE_NUMBER:
            return self._respond(404, self.not_found(None))
        free_percent = self.settings.content.free_percent
        try:
            with read_only(self.engine) as session:
                reading = read_issue(
                    session, number=number, openid=openid, default_free_percent=free_percent
                )
                before, after = neighbours(
                    session, number=number, default_free_percent=free_percent
                )
        except UnknownIssue:
            log.info("reader asked by %s for unknown or unpublished issue %s", who, number)
            return self._respond(404, self.not_found(number))
        log.info(
            "reader page issue %s for %s: %s",
            number,
            who,
            "full text" if reading.unlocked else "excerpt",
        )
        self._record(openid, number, full=reading.unlocked)
        # Neighbours are linked with this link's own expiry, so browsing never extends it.
        def pager(issue: IssuePreview | None) -> PagerLink | None:
            if issue is None:
                return None
            href = self.links.path_until(openid, issue.number, expires)
            return PagerLink(issue.number, issue.title, href)

        page = render_issue_page(
            reading,
            openid=openid,
            unit=self.unit,
            tz=self.tz,
            publication=self.publication,
            prev=pager(before),
            next_=pager(after),
            image_hosts=self.image_hosts,
        )
        return self._respond(200, page)

    def _record(self, openid: str, number: int, *, full: bool) -> None:
        """The page opened, as an event for ``newsbot stats`` (one INSERT of its own: the page
        itself only reads). Counting is not worth a reader's page: a failure is logged."""
        kind = events.FULL if full else events.EXCERPT
        try:
            run_in_transaction(self.engine, lambda s: events.record(
                s, kind, openid=openid, issue_number=number))
        except Exception:
            log.warning("recording the %s event of issue %s failed", kind, number,
                        exc_info=True)

    def not_a_path(self, rest: str = "") -> Any:
        return self._respond(404, self.not_found(None))


def install(app: bottle.Bottle, *, settings: Settings, engine: Engine) -> None:
    """Add ``GET /read/<number>`` (and a friendly 404 for any other ``/read`` path) to ``app``."""
    reader = _ReaderApp(settings=settings, engine=engine)
    routes: list[tuple[str, Callable[..., Any]]] = [
        # Routed like bottle's <n:int> (-?\d+, any script), parsed strictly in ``read``.
        (f"{READER_PREFIX}/<raw_number:re:-?\\d+>", reader.read),
        (READER_PREFIX, reader.not_a_path),
        (f"{READER_PREFIX}/", reader.not_a_path),
        (f"{READER_PREFIX}/<rest:path>", reader.not_a_path),
    ]
    for path, callback in routes:
        app.route(path, method="GET", callback=callback)
