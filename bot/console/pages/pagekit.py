"""What the issues, subscribers, codes and broadcasts pages share: local times, numbers typed
into forms, one-time form keys, tables and page links."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from sqlmodel import Session

from bot.console.core import ConsoleRequest, Refused, esc
from handlers.numbers import parse_int
from storage.ledger import MAX_ABS_AMOUNT

# A form key is made when the form is drawn, so a double submit or a browser retry of that
# form carries the same key: the ledger's unique key then writes it once.
_FORM_KEY = re.compile(r"[A-Za-z0-9_-]{22,64}")
# Full-width minus and the minus sign, as a Chinese keyboard types them.
_MINUS = str.maketrans({"－": "-", "−": "-"})


@contextmanager
def snapshot(req: ConsoleRequest) -> Iterator[Session]:
    """A read-only session whose rows stay readable after it ends (the read-only session rolls
    back, which would expire them; detached first, they keep what was loaded)."""
    with req.reading() as session:
        yield session
        session.expunge_all()


def zone(req: ConsoleRequest) -> ZoneInfo:
    return ZoneInfo(req.settings.broadcast.timezone)


def local(dt: datetime | None, tz: ZoneInfo, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """``dt`` in [broadcast] timezone; "" for None."""
    return "" if dt is None else dt.astimezone(tz).strftime(fmt)


def new_form_key() -> str:
    return secrets.token_urlsafe(24)


def form_key(req: ConsoleRequest) -> str:
    """The form's key, refused unless it is one this console drew."""
    key = req.get("key")
    if not _FORM_KEY.fullmatch(key):
        raise Refused("表单缺少有效的提交编号，请刷新页面后重新填写。")
    return key


def whole(raw: str, label: str, *, minimum: int | None = None, maximum: int = MAX_ABS_AMOUNT,
          signed: bool = False) -> int:
    """A whole number typed into a form (ASCII or full-width digits; a leading minus when
    ``signed``), within [minimum, maximum], else Refused with a Chinese message."""
    text = raw.strip().translate(_MINUS) if signed else raw.strip()
    number = parse_int(text, signed=signed)
    if number is None:
        sign = "（减少时在前面加 -）" if signed else ""
        raise Refused(f"{label}必须是整数，只用数字 0-9{sign}，收到的是「{raw[:20]}」；"
                      "没有做任何更改。")
    if minimum is not None and number < minimum:
        raise Refused(f"{label}不能小于 {minimum:,}，收到的是 {number:,}；没有做任何更改。")
    if abs(number) > maximum:
        raise Refused(f"{label}不能超过 {maximum:,}，收到的是 {number:,}；没有做任何更改。")
    return number


def optional_whole(raw: str, label: str, *, minimum: int | None = None,
                   maximum: int = MAX_ABS_AMOUNT) -> int | None:
    """``whole`` for a field that may be left empty (None)."""
    return None if not raw.strip() else whole(raw, label, minimum=minimum, maximum=maximum)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *,
          numeric: frozenset[int] = frozenset(), wrap: frozenset[int] = frozenset(),
          empty: str = "没有记录。") -> str:
    """A table in .table-wrap, which scrolls sideways on a phone: cells stay on one line
    (Chinese text would otherwise break after every character in a narrow column) except
    the ``wrap`` columns. Cells are HTML already."""
    def cls(i: int) -> str:
        names = [n for n, on in (("num", i in numeric), ("wrap", i in wrap)) if on]
        return f' class="{" ".join(names)}"' if names else ""

    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>"
        for row in rows)
    if not body:
        return f"<p class=empty>{esc(empty)}</p>"
    head = "".join(f"<th{' class=num' if i in numeric else ''}>{esc(h)}</th>"
                   for i, h in enumerate(headers))
    return (f"<div class=table-wrap><table class=lines><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def page_number(req: ConsoleRequest) -> int:
    """?page=N (1 when absent or not a small whole number)."""
    number = parse_int(req.get("page", "1"))
    return number if number is not None and 1 <= number <= 100_000 else 1


def pager(path: str, params: dict[str, str], page: int, *, has_next: bool) -> str:
    """Previous / next links keeping the other query parameters."""
    def link(n: int, label: str) -> str:
        query = urlencode({**{k: v for k, v in params.items() if v}, "page": str(n)})
        return f'<a href="{esc(path)}?{esc(query)}">{esc(label)}</a>'

    parts = []
    if page > 1:
        parts.append(link(page - 1, "‹ 上一页"))
    if has_next:
        parts.append(link(page + 1, "下一页 ›"))
    return f"<p class=pager>{' '.join(parts)}</p>" if parts else ""


def hidden(name: str, value: object) -> str:
    return f'<input type="hidden" name="{esc(name)}" value="{esc(value)}">'
