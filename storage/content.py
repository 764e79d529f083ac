"""Issue files: TOML front matter + Markdown body, safe rendering, 字 counting, free excerpt.

The excerpt is what non-paying readers get, so its construction is deliberately conservative:
it is always a prefix of the body's source made of whole top-level blocks (or, for an oversized
first paragraph, a prefix cut at a sentence end), and every candidate is re-rendered on its own
and checked against the body's rendering before it is accepted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import UTC, date, datetime, time, timedelta, timezone
from difflib import SequenceMatcher
from pathlib import Path
from typing import Annotated, Any

from markdown_it import MarkdownIt
from markdown_it.token import Token
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

log = logging.getLogger(__name__)

__all__ = [
    "IssueFileError",
    "IssueProblem",
    "ParsedIssue",
    "TextDiff",
    "Topic",
    "count_chars",
    "diff_text",
    "duplicate_numbers",
    "make_excerpt",
    "parse_issue_file",
    "parse_issue_text",
    "plain_text",
    "render_html",
    "topics_from_json",
    "topics_to_json",
]

# html=False: raw HTML in an issue is shown as text, never passed through to readers.
_md = MarkdownIt("commonmark", {"html": False}).enable(
    ["table", "strikethrough"], ignoreInvalid=True
)

# China has had no DST since 1991, so a fixed +08:00 is exact for any publish date and does not
# depend on the host having tzdata installed.
_SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")

_SENTENCE_ENDS = frozenset("。！？!?；;.")
# Closing quotes/brackets/emphasis markers that may follow a sentence end; a cut may extend over
# them so that "。」" or "。**" is not split from its sentence.
_CLOSERS = frozenset("”’」』）】》〉\"')*_~`")
_FENCE = "+++"


@dataclass(frozen=True)
class IssueProblem:
    """One thing to fix in an issue file: where (file, 1-based line when known), which field
    (``price``, ``topics[1].title``, ``front matter``, ``body``, ``file``…) and what is wrong.
    Parsing collects every problem it can find instead of stopping at the first."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}"


class IssueFileError(ValueError):
    """An issue file is unusable; ``problems`` lists everything that is wrong with it (at
    least one). ``file``, ``field`` and ``message`` are those of the first problem."""

    def __init__(self, problems: Sequence[IssueProblem]) -> None:
        if not problems:
            raise ValueError("IssueFileError needs at least one problem")
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def file(self) -> str:
        return self.problems[0].file

    @property
    def field(self) -> str:
        return self.problems[0].field

    @property
    def message(self) -> str:
        return self.problems[0].message


@dataclass(frozen=True)
class Topic:
    title: str
    questions: tuple[str, ...]


@dataclass(frozen=True)
class ParsedIssue:
    number: int
    title: str
    summary: str
    price: int
    free_percent: int | None  # as written in the file (None = use the default)
    effective_free_percent: int  # what the excerpt was computed with
    published: datetime | None  # aware UTC; None = draft
    topics: tuple[Topic, ...]
    body_md: str
    excerpt_md: str
    char_count: int
    excerpt_char_count: int
    source_sha256: str
    file: str = ""  # where it was read from, for messages
    # 1-based file lines of the front-matter keys ("price", "topics[0].title") and of the
    # "body", for messages.
    lines: dict[str, int] = dc_field(default_factory=dict, compare=False)


# --------------------------------------------------------------------------- front matter

_NonEmptyStr = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class _TopicModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    title: _NonEmptyStr
    questions: Annotated[list[_NonEmptyStr], Field(min_length=1)]


class _FrontMatter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    number: Annotated[int, Field(ge=1)]
    title: _NonEmptyStr
    price: Annotated[int, Field(ge=0)]
    free_percent: Annotated[int, Field(ge=0, le=100)] | None = None
    summary: Annotated[str, StringConstraints(strip_whitespace=True)] = ""
    published: datetime | None = None
    topics: Annotated[list[_TopicModel], Field(min_length=1)]

    @field_validator("published", mode="before")
    @classmethod
    def _to_utc(cls, value: object) -> object:
        # TOML hands us date, datetime (naive or aware) or time; only the first two make sense.
        if isinstance(value, datetime):
            local = value if value.tzinfo is not None else value.replace(tzinfo=_SHANGHAI)
            return local.astimezone(UTC)
        if isinstance(value, date):
            return datetime.combine(value, time(0, 0), tzinfo=_SHANGHAI).astimezone(UTC)
        raise PydanticCustomError(
            "published_type",
            "must be a TOML date or date-time, got {got}",
            {"got": _describe(value)},
        )


_FIELDS = {
    (): tuple(_FrontMatter.model_fields),
    ("topics",): tuple(_TopicModel.model_fields),
}


def _describe(value: object) -> str:
    """A short, TOML-flavoured description of a bad value for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return json.dumps(shown, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, datetime | date | time):
        return f"{type(value).__name__} {value.isoformat()}"
    return repr(value)


def _field_path(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def _error_message(err: Any) -> str:
    """Turn one pydantic error into a short message; pydantic's own text is too verbose."""
    kind: str = err["type"]
    ctx: dict[str, Any] = err.get("ctx") or {}
    loc = tuple(err["loc"])
    got = _describe(err.get("input"))
    names = tuple(p for p in loc if isinstance(p, str))
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        allowed = _FIELDS.get(names[:-1], ())
        return "unknown key" + (f" (expected one of: {', '.join(allowed)})" if allowed else "")
    if names == ("free_percent",) and kind in {"greater_than_equal", "less_than_equal"}:
        return f"must be an integer from 0 to 100, got {got}"
    if kind in {"int_type", "int_parsing", "int_from_float"}:
        return f"must be an integer, got {got}"
    if kind == "greater_than_equal":
        return f"must be an integer ≥ {ctx.get('ge')}, got {got}"
    if kind == "less_than_equal":
        return f"must be an integer ≤ {ctx.get('le')}, got {got}"
    if kind == "string_type":
        return f"must be a string, got {got}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "too_short":
        if names == ("topics",):
            return "at least one [[topics]] table is required"
        return "must not be empty"
    if kind == "list_type":
        if names == ("topics",):
            return f"must be an array of tables ([[topics]]), got {got}"
        return f"must be an array, got {got}"
    if kind in {"model_type", "dict_type", "model_attributes_type"}:
        return f"must be a table, got {got}"
    if kind == "published_type":
        return str(err["msg"])
    return f"invalid value {got}"


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    return _field_path(err["loc"]) or "front matter", _error_message(err)


_KEY_LINE = re.compile(r"""\s*([A-Za-z0-9_-]+|"[^"]*"|'[^']*')\s*=""")
_TABLE_LINE = re.compile(r"\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]")


def _key_lines(toml_text: str, first_line: int) -> dict[str, int]:
    """Where each key of the front matter is written, as field paths like those of
    ``_field_path`` ("price", "topics[1]", "topics[1].title") → 1-based file lines. A
    line-oriented scan, good for the plain TOML issue files use; what it cannot place (keys
    inside inline tables, multi-line strings) simply has no line."""
    lines: dict[str, int] = {}
    table = ""
    counts: dict[str, int] = {}
    in_multiline = False
    for n, line in enumerate(toml_text.split("\n")):
        inside = in_multiline
        if line.count('"""') % 2 or line.count("'''") % 2:
            in_multiline = not in_multiline
        if inside:
            continue
        header = _TABLE_LINE.match(line)
        if header and not _KEY_LINE.match(line):
            name = header.group(2)
            if header.group(1) == "[[":
                index = counts.get(name, 0)
                counts[name] = index + 1
                table = f"{name}[{index}]"
            else:
                table = name
            lines.setdefault(table, first_line + n)
            continue
        key = _KEY_LINE.match(line)
        if key:
            name = key.group(1).strip("\"'")
            lines.setdefault(f"{table}.{name}" if table else name, first_line + n)
    return lines


def _line_of(path: str, lines: dict[str, int]) -> int | None:
    """The line of a field path, else of the nearest enclosing one that is written down."""
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return None


def _front_matter_problems(exc: ValidationError, file: str,
                           lines: dict[str, int]) -> list[IssueProblem]:
    """Every pydantic error as a problem, in file order (those without a line last)."""
    problems = []
    for err in exc.errors():
        path = _field_path(err["loc"]) or "front matter"
        problems.append(IssueProblem(file, _line_of(path, lines), path, _error_message(err)))
    return sorted(problems, key=lambda p: (p.line is None, p.line or 0))


def _split_front_matter(text: str, file: str) -> tuple[str, str, int]:
    """Return (toml, body, file line of the body's first line) or raise IssueFileError."""
    lines = text.split("\n")
    if lines[0].rstrip() != _FENCE:
        raise IssueFileError([IssueProblem(
            file, 1, "front matter", "missing: the file must start with a +++ line")])
    for i in range(1, len(lines)):
        if lines[i].rstrip() == _FENCE:
            return "\n".join(lines[1:i]), "\n".join(lines[i + 1 :]), i + 2
    raise IssueFileError([IssueProblem(
        file, None, "front matter",
        "missing the closing +++ line (the TOML front matter must end with a line of +++)")])


def _normalise_body(body: str) -> str:
    """Drop leading blank lines (not leading spaces: they can make an indented code block)."""
    lines = body.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines).rstrip()


def _leading_blank_lines(body: str) -> int:
    lines = body.split("\n")
    return next((i for i, line in enumerate(lines) if line.strip()), len(lines))


def _body_problems(body_md: str, *, file: str, first_line: int) -> list[IssueProblem]:
    """What is wrong with the Markdown body. ``first_line`` is the file line of the body's
    first line, so a token's ``map[0]`` is at file line ``first_line + map[0]``. New body
    checks go here and append problems (field "body")."""
    if not body_md:
        return [IssueProblem(file, first_line, "body",
                             "empty: the issue needs Markdown text after the closing +++ line")]
    if count_chars(body_md) == 0:
        return [IssueProblem(file, first_line, "body",
                             "has no text (only images, rules or markup): readers would see "
                             "nothing; write the issue's text after the closing +++ line")]
    return []


def _parse(text: str, *, file: str, default_free_percent: int, sha256: str) -> ParsedIssue:
    if not 0 <= default_free_percent <= 100:
        raise ValueError(f"default_free_percent must be 0..100, got {default_free_percent}")
    # A BOM and CRLF line ends are editor artefacts, not content.
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    toml_text, body, body_line = _split_front_matter(text, file)
    problems: list[IssueProblem] = []
    lines = _key_lines(toml_text, 2)
    fm: _FrontMatter | None = None
    try:
        raw = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib counts lines from the start of the front matter; report file lines instead.
        at = re.search(r"at line (\d+)", str(exc))
        msg = re.sub(r"at line (\d+)", lambda m: f"at line {int(m.group(1)) + 1}", str(exc))
        problems.append(IssueProblem(file, int(at.group(1)) + 1 if at else None,
                                     "front matter", f"not valid TOML: {msg}"))
    else:
        try:
            fm = _FrontMatter.model_validate(raw)
        except ValidationError as exc:
            problems += _front_matter_problems(exc, file, lines)

    body_md = _normalise_body(body)
    # An empty body is reported at the closing +++ line, the place to write after.
    first_line = body_line + _leading_blank_lines(body) if body_md else body_line - 1
    problems += _body_problems(body_md, file=file, first_line=first_line)
    if problems or fm is None:
        raise IssueFileError(problems)
    percent = fm.free_percent if fm.free_percent is not None else default_free_percent
    excerpt_md, excerpt_chars = make_excerpt(body_md, percent)
    return ParsedIssue(
        number=fm.number,
        title=fm.title,
        summary=fm.summary,
        price=fm.price,
        free_percent=fm.free_percent,
        effective_free_percent=percent,
        published=fm.published,
        topics=tuple(Topic(t.title, tuple(t.questions)) for t in fm.topics),
        body_md=body_md,
        excerpt_md=excerpt_md,
        char_count=count_chars(body_md),
        excerpt_char_count=excerpt_chars,
        source_sha256=sha256,
        file=file,
        lines={**lines, "body": first_line},
    )


def parse_issue_text(text: str, *, file: str, default_free_percent: int) -> ParsedIssue:
    """Parse an issue from text; ``source_sha256`` is over its UTF-8 encoding. Raises
    IssueFileError listing every problem found."""
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return _parse(text, file=file, default_free_percent=default_free_percent, sha256=sha)


def parse_issue_file(path: Path, *, default_free_percent: int) -> ParsedIssue:
    """Parse an issue file; ``source_sha256`` is over the file's bytes. Raises IssueFileError
    listing every problem found."""
    file = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IssueFileError([IssueProblem(
            file, None, "file", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise IssueFileError([IssueProblem(
            file, line, "file",
            f"not valid UTF-8 (bad byte at offset {exc.start}); save the file as UTF-8")]) from None
    sha = hashlib.sha256(data).hexdigest()
    return _parse(text, file=file, default_free_percent=default_free_percent, sha256=sha)


def duplicate_numbers(issues: Sequence[ParsedIssue]) -> list[IssueProblem]:
    """One problem per file whose issue number an earlier file of the same run already has:
    which one should win is the operator's call, not the argument order's."""
    first: dict[int, ParsedIssue] = {}
    problems = []
    for issue in issues:
        seen = first.setdefault(issue.number, issue)
        if seen is issue:
            continue
        message = (f"{issue.file} is given twice" if seen.file == issue.file else
                   f"issue {issue.number} is also in {seen.file}: import one file per issue "
                   "number at a time")
        problems.append(IssueProblem(issue.file, issue.lines.get("number"), "number", message))
    return problems


# --------------------------------------------------------------------------- topics JSON


def topics_to_json(topics: Sequence[Topic]) -> str:
    return json.dumps(
        [{"title": t.title, "questions": list(t.questions)} for t in topics], ensure_ascii=False
    )


def topics_from_json(s: str) -> tuple[Topic, ...]:
    """Inverse of topics_to_json; raises ValueError on anything else."""
    try:
        data = json.loads(s)
    except json.JSONDecodeError as exc:
        raise ValueError(f"topics JSON: not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ValueError("topics JSON: must be an array")
    topics: list[Topic] = []
    for i, item in enumerate(data):
        try:
            model = _TopicModel.model_validate(item)
        except ValidationError as exc:
            field, message = _first_error(exc)
            raise ValueError(f"topics JSON: [{i}].{field}: {message}") from None
        topics.append(Topic(model.title, tuple(model.questions)))
    return tuple(topics)


# --------------------------------------------------------------------------- rendering


def render_html(markdown: str) -> str:
    """Reader-safe HTML: raw HTML is escaped and unsafe link schemes are dropped by markdown-it."""
    html: str = _md.render(markdown)
    return html


def _inline_text(children: Sequence[Token]) -> str:
    parts: list[str] = []
    for tok in children:
        if tok.type in {"text", "text_special", "code_inline", "html_inline"}:
            parts.append(tok.content)
        elif tok.type in {"softbreak", "hardbreak"}:
            parts.append("\n")
        elif tok.type == "image":
            parts.append(_inline_text(tok.children or []))  # alt text stands in for the image
    return "".join(parts)


def _tokens_text(tokens: Sequence[Token]) -> str:
    """Plain text of a token stream: one chunk per leaf block, chunks separated by blank lines."""
    chunks: list[str] = []
    row: list[str] | None = None
    rows: list[str] = []
    for tok in tokens:
        if tok.type == "tr_open":
            row = []
        elif tok.type == "tr_close" and row is not None:
            rows.append("\t".join(row))
            row = None
        elif tok.type == "table_close":
            chunks.append("\n".join(rows))
            rows = []
        elif tok.type == "inline":
            text = _inline_text(tok.children or [])
            if row is not None:
                row.append(text)
            else:
                chunks.append(text)
        elif tok.type in {"fence", "code_block", "html_block"}:
            chunks.append(tok.content.rstrip("\n"))
    return "\n\n".join(c for c in chunks if c)


def plain_text(markdown: str) -> str:
    """What a reader sees, without markup; blocks are separated by blank lines."""
    return _tokens_text(_md.parse(markdown))


def _nonspace(text: str) -> int:
    return sum(1 for ch in text if not ch.isspace())


def count_chars(markdown: str) -> int:
    """字: non-whitespace characters of the rendered plain text."""
    return _nonspace(plain_text(markdown))


# --------------------------------------------------------------------------- excerpt


@dataclass(frozen=True)
class _Block:
    kind: str  # the token type, e.g. "paragraph_open", "fence"
    start: int  # first source line
    end: int  # one past the last source line
    text: str  # plain text, as rendered in the context of the whole body
    html: str  # HTML, as rendered in the context of the whole body

    @property
    def chars(self) -> int:
        return _nonspace(self.text)


def _blocks(body_md: str) -> list[_Block]:
    """Top-level blocks with their source line ranges and in-context text, HTML and 字.

    Working from the whole document's tokens (rather than re-parsing each block) keeps
    reference-style links counted and rendered as the reader of the full text sees them.
    """
    env: dict[str, Any] = {}
    tokens = _md.parse(body_md, env)
    blocks: list[_Block] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.level != 0 or tok.nesting == -1 or tok.map is None:
            i += 1
            continue
        j = i
        if tok.nesting == 1:
            while not (tokens[j].level == 0 and tokens[j].nesting == -1):
                j += 1
        part = tokens[i : j + 1]
        html = str(_md.renderer.render(part, _md.options, env))
        blocks.append(_Block(tok.type, tok.map[0], tok.map[1], _tokens_text(part), html))
        i = j + 1
    return blocks


def _squash(text: str) -> str:
    return "".join(text.split())


def _shows_prefix(excerpt: str, full_plain: str, full_html: str, *, cut: bool) -> bool:
    """Whether the excerpt, rendered on its own, shows exactly the start of the full text.

    Both the plain text (markup characters included) and the HTML must be prefixes: the plain
    text catches a dangling "**" or "`", the HTML catches emphasis that pairs up differently
    once the rest of the paragraph is gone. A cut paragraph is still open in the full HTML,
    hence its "</p>" is not compared.
    """
    html = render_html(excerpt)
    if cut:
        html = html.removesuffix("</p>\n")
    return full_html.startswith(html) and _squash(full_plain).startswith(
        _squash(plain_text(excerpt))
    )


def _cut_points(src: str) -> list[int]:
    """Offsets just after a sentence end (optionally extended over closers), rightmost first."""
    points: set[int] = set()
    for i, ch in enumerate(src):
        if ch in _SENTENCE_ENDS:
            j = i + 1
            points.add(j)
            while j < len(src) and src[j] in _CLOSERS:
                j += 1
                points.add(j)
    return sorted(points, reverse=True)


def _ends_sentence(text: str) -> bool:
    stripped = text.rstrip().rstrip("".join(_CLOSERS)).rstrip()
    return bool(stripped) and stripped[-1] in _SENTENCE_ENDS


def _hideable(src: str) -> list[bool]:
    """Characters that some rendering might not show: link destinations, titles and reference
    labels. Over-marking only costs speed, so anything unusual marks the rest of the text."""
    hidden = [False] * len(src)
    for opener, closer in (("](", ")"), ("][", "]")):
        at = src.find(opener)
        while at != -1:
            stop = src.find(closer, at + 2)
            # Titles, <destinations>, nested parentheses and escapes can hide a closer.
            if stop == -1 or any(c in src[at + 2 : stop] for c in "\"'(<\\"):
                stop = len(src)
            hidden[at : stop + 1] = [True] * (min(stop + 1, len(src)) - at)
            if stop == len(src):
                break
            at = src.find(opener, at + 2)
    return hidden


def _surely_over(src: str, budget: int) -> list[bool]:
    """For each prefix length, whether that prefix certainly renders to more than ``budget`` 字.

    Outside link destinations, titles and reference labels every non-ASCII, non-space
    character of the source is shown, so their number is a lower bound on the count. This
    lets long paragraphs skip re-rendering hopeless cut points; it never changes the result.
    """
    hidden = _hideable(src)
    over = [False]
    shown = 0
    for ch, masked in zip(src, hidden, strict=True):
        if not masked and not ch.isascii() and not ch.isspace():
            shown += 1
        over.append(shown > budget)
    return over


def _cut_paragraph(src: str, budget: int, para: _Block) -> tuple[str, int] | None:
    """Longest sentence-end prefix of a paragraph that fits and renders as a true prefix."""
    over = _surely_over(src, budget)
    for point in _cut_points(src):
        if over[point]:
            continue
        prefix = src[:point].rstrip()
        if not prefix:
            continue
        tokens = _md.parse(prefix)
        if [t.type for t in tokens] != ["paragraph_open", "inline", "paragraph_close"]:
            continue
        text = _tokens_text(tokens)
        chars = _nonspace(text)
        # An unclosed **, ` or [ renders differently from the full paragraph; the prefix tests
        # reject exactly those cuts. The sentence-end test rejects e.g. the ";" of "&amp;".
        if (
            chars <= budget
            and para.text.startswith(text)
            and _ends_sentence(text)
            and _shows_prefix(prefix, para.text, para.html, cut=True)
        ):
            return prefix, chars
    return None


def make_excerpt(body_md: str, free_percent: int) -> tuple[str, int]:
    """The free part of ``body_md`` and its 字 count.

    budget = floor(total 字 * free_percent / 100). The excerpt is the longest run of whole
    leading top-level blocks within the budget, as their exact source lines (trailing blocks
    without any 字, such as an image, and trailing headings are left out). If the first block
    alone is over budget and is a paragraph, it is cut at the last sentence end that fits and
    renders as a true prefix of the paragraph; otherwise the excerpt is empty.
    """
    if not 0 <= free_percent <= 100:
        raise ValueError(f"free_percent must be 0..100, got {free_percent}")
    if free_percent == 0:
        return "", 0
    if free_percent == 100:
        whole = _normalise_body(body_md)
        return whole, count_chars(whole)

    blocks = _blocks(body_md)
    total = sum(b.chars for b in blocks)
    budget = math.floor(total * free_percent / 100)
    lines = body_md.split("\n")
    body_plain = "".join(b.text for b in blocks)
    body_html = "".join(b.html for b in blocks)

    used = 0
    k = 0
    while k < len(blocks) and used + blocks[k].chars <= budget:
        used += blocks[k].chars
        k += 1

    while k > 0:
        # Blocks without any 字 (an image, a rule) at the end of the run would be given away for
        # nothing; they are only free when free text follows them.
        # Likewise a heading whose section is all locked reads as a cliff-hanger with no text.
        while k > 0 and (blocks[k - 1].chars == 0 or blocks[k - 1].kind == "heading_open"):
            k -= 1
        if k == 0:
            break
        excerpt = "\n".join(lines[blocks[0].start : blocks[k - 1].end]).rstrip()
        chars = count_chars(excerpt)
        if chars <= budget and _shows_prefix(excerpt, body_plain, body_html, cut=False):
            return excerpt, chars
        # Rendered alone it differs from the body (e.g. a reference link defined further down).
        log.debug("excerpt of %d blocks does not stand alone; trying fewer", k)
        k -= 1

    if blocks and blocks[0].kind == "paragraph_open" and blocks[0].chars > budget:
        src = "\n".join(lines[blocks[0].start : blocks[0].end])
        cut = _cut_paragraph(src, budget, blocks[0])
        if cut is not None:
            return cut
    return "", 0


# --------------------------------------------------------------------------- text diff

# Above this many character pairs in one changed run, 字 are counted as all removed and all
# added rather than aligned: a rewrite is a rewrite, and alignment is quadratic.
_ALIGN_LIMIT = 4_000_000


@dataclass(frozen=True)
class TextDiff:
    """How the text readers see changes between two bodies."""

    added: int  # 字 that are new
    removed: int  # 字 that are gone
    blocks_changed: int  # top-level blocks (paragraphs, headings, lists…) added, gone or edited
    blocks_before: int
    blocks_after: int
    rendering_changed: bool  # the HTML differs (a formatting-only edit has no 字 changes)


def diff_text(old_md: str, new_md: str) -> TextDiff:
    """Compare two bodies block by block, then 字 by 字 inside the blocks that differ."""
    old = _blocks(old_md)
    new = _blocks(new_md)
    matcher = SequenceMatcher(None, [b.html for b in old], [b.html for b in new],
                              autojunk=False)
    added = removed = changed = 0
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        changed += max(i2 - i1, j2 - j1)
        before = "".join(_squash(b.text) for b in old[i1:i2])
        after = "".join(_squash(b.text) for b in new[j1:j2])
        if len(before) * len(after) > _ALIGN_LIMIT:
            same = 0
        else:
            chars = SequenceMatcher(None, before, after, autojunk=False)
            same = sum(m.size for m in chars.get_matching_blocks())
        removed += len(before) - same
        added += len(after) - same
    return TextDiff(added=added, removed=removed, blocks_changed=changed,
                    blocks_before=len(old), blocks_after=len(new),
                    rendering_changed=render_html(old_md) != render_html(new_md))
