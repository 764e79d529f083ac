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
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from string import Template
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import bottle
from sqlalchemy import Engine

from bot.settings import Settings
from bot.web.links import READER_PREFIX, ReaderLinks
from handlers.numbers import parse_int
from storage.content import render_html
from storage.db import read_only
from storage.errors import UnknownIssue
from storage.issues import IssuePreview, IssueReading, read_issue

log = logging.getLogger(__name__)

# Issue numbers are positive and far below what any database integer column holds; anything
# else cannot name an issue and must not reach the query.
MAX_ISSUE_NUMBER = 10**9
_MAX_OPENID_LEN = 128
# Unix seconds, digits only (int() would also take "+1", " 1", "1_0" or non-ASCII digits).
_EXPIRES_RE = re.compile(r"[0-9]{1,12}")
# urlsafe base64 of a SHA-256 digest is 43 characters; a little slack, ASCII only, because
# hmac.compare_digest refuses non-ASCII str.
_SIG_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")

_FALLBACK_TZ = timezone(timedelta(hours=8), "Asia/Shanghai")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

SECURITY_HEADERS: dict[str, str] = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "private, no-store",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Robots-Tag": "noindex, nofollow",
}

# One tile of the watermark: the masked openid, rotated, in a grey faint enough for both the
# light and the dark theme. Tiled by CSS over the whole viewport; as a data: URI it is allowed
# by ``img-src data:`` and makes no request.
_WATERMARK_SVG = Template(
    "<svg xmlns='http://www.w3.org/2000/svg' width='240' height='150'>"
    "<text x='120' y='80' text-anchor='middle' transform='rotate(-24 120 75)' "
    "font-family='sans-serif' font-size='15' fill='#808080' fill-opacity='0.16'>$text</text>"
    "</svg>"
)

_STYLE = """
:root {
  color-scheme: light dark;
  --bg: #fbfaf7; --fg: #1f2328; --muted: #656d76; --line: #e3e0d8;
  --accent: #0b6e4f; --panel: #f2efe8; --code: #efece4;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #16181c; --fg: #e4e6ea; --muted: #9aa3ad; --line: #2e333a;
    --accent: #5cc6a0; --panel: #1e2228; --code: #23282f;
  }
}
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; text-size-adjust: 100%; }
body {
  margin: 0; background: var(--bg); color: var(--fg);
  font-family: -apple-system, BlinkMacSystemFont, "PingFang SC", "Hiragino Sans GB",
    "Microsoft YaHei", "Noto Sans CJK SC", "Source Han Sans SC", "Helvetica Neue",
    Helvetica, Arial, sans-serif;
  font-size: 17px; line-height: 1.8; word-wrap: break-word; overflow-wrap: anywhere;
}
main { max-width: 42em; margin: 0 auto; padding: 1.25em 1.1em 3em; position: relative; }
header.issue { border-bottom: 1px solid var(--line); margin-bottom: 1.2em; padding-bottom: .8em; }
.kicker { color: var(--accent); font-size: .85em; letter-spacing: .08em; margin: 0; }
h1 { font-size: 1.5em; line-height: 1.4; margin: .2em 0 .3em; }
.meta { color: var(--muted); font-size: .85em; margin: 0; }
.summary { color: var(--muted); margin: .6em 0 0; }
details.topics {
  background: var(--panel); border-radius: .6em; padding: .6em 1em; margin: 0 0 1.5em;
}
details.topics summary { cursor: pointer; font-weight: 600; }
details.topics ol { margin: .5em 0 0; padding-left: 1.4em; }
details.topics ul { margin: .2em 0 .6em; padding-left: 1.1em; color: var(--muted);
  font-size: .92em; }
article h2 { font-size: 1.3em; line-height: 1.45; margin: 1.8em 0 .6em; }
article h3 { font-size: 1.1em; line-height: 1.5; margin: 1.5em 0 .5em; }
article p { margin: 0 0 1em; }
article a { color: var(--accent); }
article blockquote {
  margin: 1em 0; padding: .2em 1em; border-left: 3px solid var(--accent); color: var(--muted);
}
article code { background: var(--code); border-radius: .25em; padding: .1em .3em;
  font-size: .9em; }
article pre { background: var(--code); padding: .8em 1em; border-radius: .5em;
  overflow-x: auto; line-height: 1.5; }
article pre code { background: none; padding: 0; }
article table { border-collapse: collapse; display: block; overflow-x: auto; margin: 1em 0;
  font-size: .9em; line-height: 1.5; }
article th, article td { border: 1px solid var(--line); padding: .4em .6em; text-align: left; }
article th { background: var(--panel); }
article img { max-width: 100%; height: auto; }
article hr { border: 0; border-top: 1px solid var(--line); margin: 2em 0; }
.note { color: var(--muted); font-size: .85em; margin: 0 0 1.2em; }
.empty { color: var(--muted); font-style: italic; }
.unlock {
  margin: 2em 0 0; padding: 1em 1.2em; border-radius: .6em; background: var(--panel);
  border-top: 3px solid var(--accent);
}
.unlock h2 { font-size: 1.1em; margin: 0 0 .4em; }
.unlock p { margin: .3em 0; }
.unlock strong { color: var(--accent); }
.message { padding-top: 2.5em; }
.message h1 { font-size: 1.35em; }
.message p { margin: .8em 0; }
footer { color: var(--muted); font-size: .8em; margin-top: 3em; text-align: center; }
.wm {
  position: fixed; top: 0; right: 0; bottom: 0; left: 0; z-index: 10;
  pointer-events: none; user-select: none; -webkit-user-select: none;
  background-repeat: repeat; background-size: 240px 150px;
}
@media print { .wm { -webkit-print-color-adjust: exact; print-color-adjust: exact; } }
"""

_PAGE = Template(
    """<!DOCTYPE html>
<html lang="zh-CN">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1, viewport-fit=cover">
<meta name="referrer" content="no-referrer">
<meta name="robots" content="noindex, nofollow">
<title>$title</title>
<style>$style</style>
</head>
<body>
<main>
$content
</main>
$watermark
</body>
</html>
"""
)

_ISSUE = Template(
    """<header class="issue">
<p class="kicker">第 $number 期</p>
<h1>$title</h1>
<p class="meta">$date</p>
$summary
</header>
$topics
$note
<article>
$body
</article>
$unlock
<footer>本页链接仅供你本人阅读，请勿转发。</footer>"""
)

_UNLOCK = Template(
    """<section class="unlock">
<h2>免费试读到此结束</h2>
<p>全文约 $chars 字，解锁本期需要 <strong>$price $unit</strong>。</p>
<p>在公众号对话中回复「兑换 $number」解锁全文，解锁后刷新本页即可阅读。</p>
<p>回复「余额」查看你的$unit余额。</p>
</section>"""
)

_MESSAGE = Template(
    """<section class="message">
<h1>$heading</h1>
$paragraphs
</section>"""
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


def _page(*, title: str, content: str, openid: str | None = None) -> str:
    return _PAGE.substitute(
        title=_e(title), style=_STYLE, content=content, watermark=_watermark(openid)
    )


def _message_page(heading: str, *paragraphs: str) -> str:
    """A short page for refusals and errors; ``paragraphs`` are plain text (escaped here)."""
    body = "\n".join(f"<p>{_e(p)}</p>" for p in paragraphs)
    return _page(title=heading, content=_MESSAGE.substitute(heading=_e(heading), paragraphs=body))


def _response(status: int, body: str) -> Any:
    return bottle.HTTPResponse(body=body, status=status, headers=dict(SECURITY_HEADERS))


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


def _topics_html(preview: IssuePreview) -> str:
    if not preview.topics:
        return ""
    items = []
    for topic in preview.topics:
        questions = "".join(f"<li>{_e(q)}</li>" for q in topic.questions)
        sub = f"<ul>{questions}</ul>" if questions else ""
        items.append(f"<li><strong>{_e(topic.title)}</strong>{sub}</li>")
    return (
        '<details class="topics" open>\n<summary>本期话题</summary>\n'
        f"<ol>{''.join(items)}</ol>\n</details>"
    )


def render_issue_page(reading: IssueReading, *, openid: str, unit: str, tz: tzinfo) -> str:
    """The reader page for ``reading``: the full body when unlocked, else the excerpt and the
    unlock footer. Only ``reading.text_md`` is rendered, and for a locked issue it holds the
    excerpt alone, so the locked text cannot end up here."""
    p = reading.preview
    text = reading.text_md.strip()
    if reading.unlocked:
        note = (
            '<p class="note">本期免费阅读。</p>'
            if p.is_free
            else '<p class="note">你已解锁本期，以下为全文。</p>'
        )
        unlock = ""
        body = render_html(text) if text else '<p class="empty">本期暂无正文。</p>'
    else:
        note = f'<p class="note">免费试读（约 {_e(p.excerpt_char_count)} 字）</p>' if text else ""
        body = render_html(text) if text else '<p class="empty">本期没有免费试读部分。</p>'
        unlock = _UNLOCK.substitute(
            chars=_e(f"{p.char_count:,}"), price=_e(p.price), unit=_e(unit), number=_e(p.number)
        )
    date = _date(p.published_at, tz)
    content = _ISSUE.substitute(
        number=_e(p.number),
        title=_e(p.title),
        date=_e(date),
        summary=f'<p class="summary">{_e(p.summary)}</p>' if p.summary else "",
        topics=_topics_html(p),
        note=note,
        body=body,
        unlock=unlock,
    )
    return _page(title=f"第{p.number}期｜{p.title}", content=content, openid=openid)


class _BadLink(Exception):
    """The query string cannot be a link we issued."""


def _single(query: Any, name: str) -> str:
    """The one value of ``name`` as text; missing, repeated or undecodable is a bad link."""
    values = query.getall(name)
    if len(values) != 1:
        raise _BadLink(f"{name}: {len(values)} values")
    value = query.getunicode(name)
    if not isinstance(value, str) or not value:
        raise _BadLink(f"{name}: empty or not UTF-8")
    return value


def _link_params(query: Any) -> tuple[str, int, str]:
    openid = _single(query, "u")
    if len(openid) > _MAX_OPENID_LEN or not openid.isprintable():
        raise _BadLink("u: malformed")
    raw_expires = _single(query, "e")
    if not _EXPIRES_RE.fullmatch(raw_expires):
        raise _BadLink("e: not a unix time")
    sig = _single(query, "s")
    if not _SIG_RE.fullmatch(sig):
        raise _BadLink("s: malformed")
    return openid, int(raw_expires), sig


class _ReaderApp:
    def __init__(self, *, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.links = ReaderLinks(settings)
        self.unit = settings.tokens.name
        self.tz = _local_tz(settings.broadcast.timezone)

    # ---------------------------------------------------------------- pages

    def invalid(self, number: int | None) -> str:
        n = f" {number}" if number is not None else ""
        again = f"「全文{n}」或「试读{n}」"
        return _message_page(
            "链接无效",
            "这个阅读链接不完整或已被改动，无法打开。",
            f"请回到公众号对话中回复{again}，获取属于你的新链接。",
        )

    def expired(self, number: int) -> str:
        return _message_page(
            "链接已过期",
            f"为保护你的阅读权益，阅读链接 {self.settings.reader.link_ttl_hours} 小时后失效。",
            f"请回到公众号对话中回复「全文 {number}」或「试读 {number}」，获取新的链接。",
        )

    def not_found(self, number: int | None) -> str:
        what = f"第 {number} 期" if number is not None else "这一期"
        return _message_page(
            "没有找到这一期",
            f"{what}不存在或尚未发布。",
            "请回到公众号对话中回复「往期」查看已发布的各期，或回复「本周」看本期内容。",
        )

    def server_error(self) -> str:
        return _message_page(
            "页面暂时无法打开",
            "服务器开了个小差，请稍后刷新重试。",
            "如果一直打不开，请在公众号对话中留言告诉我们。",
        )

    # ---------------------------------------------------------------- routes

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
            return _response(500, self.server_error())

    def _read(self, number: int) -> Any:
        try:
            openid, expires, sig = _link_params(bottle.request.query)
        except _BadLink as exc:
            log.info("reader link refused for issue %s: %s", number, exc)
            return _response(403, self.invalid(number if 0 < number <= MAX_ISSUE_NUMBER else None))
        who = mask_openid(openid)
        problem = self.links.verify(openid=openid, issue=number, expires=expires, sig=sig)
        if problem == "expired":
            log.info("reader link for issue %s by %s expired at %s", number, who, expires)
            return _response(403, self.expired(number))
        if problem is not None:
            log.info("reader link for issue %s by %s refused: %s", number, who, problem)
            return _response(403, self.invalid(number if 0 < number <= MAX_ISSUE_NUMBER else None))
        if not 0 < number <= MAX_ISSUE_NUMBER:
            return _response(404, self.not_found(None))
        try:
            with read_only(self.engine) as session:
                reading = read_issue(
                    session,
                    number=number,
                    openid=openid,
                    default_free_percent=self.settings.content.free_percent,
                )
        except UnknownIssue:
            log.info("reader asked by %s for unknown or unpublished issue %s", who, number)
            return _response(404, self.not_found(number))
        log.info(
            "reader page issue %s for %s: %s",
            number,
            who,
            "full text" if reading.unlocked else "excerpt",
        )
        page = render_issue_page(reading, openid=openid, unit=self.unit, tz=self.tz)
        return _response(200, page)

    def not_a_path(self, rest: str = "") -> Any:
        return _response(404, self.not_found(None))


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
