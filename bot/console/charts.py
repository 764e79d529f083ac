"""Charts drawn by the server as inline SVG: no script, no request to anywhere (the console's
Content-Security-Policy forbids both), readable without colour and by a screen reader.

Every chart here is a horizontal bar chart: one row per label (an issue, a week), one bar per
series in that row, each bar followed by its number as text. Rows stack downwards, so a phone
375 px wide shows as many rows as a desktop, labels never collide and no number is hidden in a
tooltip. Bars are proportional to the largest value in the chart; each has a ``<title>`` naming
its row, series and value; the chart has a ``<title>`` and ``<desc>`` (``role=img``)."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

WIDTH = 360  # viewBox units: ≈ CSS px on a phone; the stylesheet caps the drawn width
FONT = 13
BAR = 15  # one bar's height
GAP = 3  # between the bars of one row
ROW_GAP = 9  # between rows
PAD = 6
EMPTY = "还没有数据"


@dataclass(frozen=True)
class Series:
    """One kind of bar: its name (in the legend and each bar's title) and its colour."""

    name: str
    colour: str


@dataclass(frozen=True)
class Row:
    label: str
    values: tuple[int, ...]  # one per series, in the chart's series order


# Distinguishable in grey too (light → dark), for card → excerpt → unlock and the like.
GREEN = "#07c160"
BLUE = "#2f6fde"
DARK = "#1d2129"
GREY = "#9aa3af"
RED = "#c81e1e"


def text_width(text: str, size: float = FONT) -> float:
    """About how wide ``text`` draws: wide (CJK) characters a full em, others ~0.6 em."""
    return sum(size if unicodedata.east_asian_width(ch) in "WF" else size * 0.6
               for ch in text)


def number(value: int) -> str:
    return f"{value:,}"


def _attrs(**values: object) -> str:
    return "".join(f" {name.rstrip('_').replace('_', '-')}={quoteattr(str(value))}"
                   for name, value in values.items())


def bar_chart(*, chart_id: str, title: str, desc: str, series: Sequence[Series],
              rows: Sequence[Row], unit: str = "") -> str:
    """A ``<figure>`` holding the chart (``title`` is also its caption); "还没有数据" in place
    of bars when there are no rows or every value is 0. ``chart_id`` must be unique on the
    page (it names the title and desc for aria-labelledby)."""
    series = list(series)
    rows = [r for r in rows if len(r.values) == len(series)]
    top = max((v for r in rows for v in r.values), default=0)
    legend_h = FONT + 2 * PAD if len(series) > 1 else 0
    parts: list[str] = []
    if legend_h:
        parts.append(_legend(series))
    if top <= 0:
        height: float = legend_h + 3 * FONT + 2 * PAD
        parts.append(f"<text{_attrs(x=WIDTH / 2, y=legend_h + 2 * FONT + PAD, font_size=FONT)}"
                     f' text-anchor="middle" class="empty">{EMPTY}</text>')
        desc = f"{desc}（{EMPTY}）"
    else:
        height = _bars(parts, series, rows, top, unit, y=legend_h + PAD)
    t_id, d_id = f"{chart_id}-t", f"{chart_id}-d"
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg"'
           f"{_attrs(viewBox=f'0 0 {WIDTH} {height:g}', role='img')}"
           f"{_attrs(aria_labelledby=f'{t_id} {d_id}', font_family='sans-serif')}>"
           f"<title{_attrs(id=t_id)}>{escape(title)}</title>"
           f"<desc{_attrs(id=d_id)}>{escape(desc)}</desc>{''.join(parts)}</svg>")
    return (f'<figure class="chart" id={quoteattr(chart_id)}><figcaption>{escape(title)}'
            f"</figcaption>{svg}</figure>")


def _legend(series: list[Series]) -> str:
    out, x = [], 0.0
    for s in series:
        out.append(f"<rect{_attrs(x=x, y=PAD, width=FONT, height=FONT, fill=s.colour)}/>"
                   f"<text{_attrs(x=x + FONT + 4, y=PAD + FONT - 2, font_size=FONT)}>"
                   f"{escape(s.name)}</text>")
        x += FONT + 4 + text_width(s.name) + 14
    return f'<g class="legend">{"".join(out)}</g>'


def _bars(parts: list[str], series: list[Series], rows: list[Row], top: int, unit: str, *,
          y: float) -> float:
    """Append the rows' bars from ``y`` down; the chart's height."""
    label_w = min(WIDTH * 0.35, max(text_width(r.label) for r in rows) + PAD)
    value_w = max(text_width(number(v)) for r in rows for v in r.values) + PAD
    room = WIDTH - label_w - value_w - PAD
    suffix = f" {unit}" if unit else ""
    for row in rows:
        row_h = len(series) * BAR + (len(series) - 1) * GAP
        label = _fit(row.label, label_w - PAD)
        out = [f"<text{_attrs(x=0, y=y + row_h / 2 + FONT * 0.35, font_size=FONT)}"
               f' class="label">{escape(label)}</text>']
        for i, (s, value) in enumerate(zip(series, row.values, strict=True)):
            by = y + i * (BAR + GAP)
            width = room * max(value, 0) / top
            tip = f"{row.label} · {s.name}：{number(value)}{suffix}"
            out.append(f"<rect{_attrs(x=label_w, y=by, width=f'{width:.1f}', height=BAR)}"
                       f"{_attrs(fill=s.colour, rx=2)}><title>{escape(tip)}</title></rect>"
                       f"<text{_attrs(x=f'{label_w + width + 4:.1f}', y=by + BAR - 3)}"
                       f'{_attrs(font_size=FONT - 1)} class="value">{number(value)}</text>')
        parts.append(f'<g class="row">{"".join(out)}</g>')
        y += row_h + ROW_GAP
    return y - ROW_GAP + PAD


def _fit(label: str, width: float) -> str:
    """``label`` cut with … to fit ``width`` (the bar's title keeps it whole)."""
    if text_width(label) <= width:
        return label
    while label and text_width(label + "…") > width:
        label = label[:-1]
    return label + "…"
