"""Issue files, rendering, 字 counting and the free excerpt (storage.content)."""

from __future__ import annotations

import hashlib
import re
import string
from datetime import UTC, datetime
from pathlib import Path
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from storage import content
from storage.content import (
    IssueFileError,
    IssueProblem,
    Topic,
    count_chars,
    make_excerpt,
    parse_issue_file,
    parse_issue_text,
    plain_text,
    render_html,
    topics_from_json,
    topics_to_json,
)

FRONT = """\
number = 7
title = "第七期：芯片与电价"
price = 30
free_percent = 20
summary = "本周要点"
published = 2026-11-23

[[topics]]
title = "芯片"
questions = ["谁在买？", "价格会跌吗？"]

[[topics]]
title = "电价"
questions = ["冬天会涨吗？"]
"""

BODY = "第一段文字。\n\n第二段文字。\n\n## 小标题\n\n第三段文字。\n"


def issue(front: str = FRONT, body: str = BODY) -> str:
    return f"+++\n{front}+++\n\n{body}"


def squash(text: str) -> str:
    return "".join(text.split())


# --------------------------------------------------------------------------- parsing


def test_parse_valid_issue_has_every_field() -> None:
    text = issue()
    parsed = parse_issue_text(text, file="007.md", default_free_percent=10)

    assert parsed.number == 7
    assert parsed.title == "第七期：芯片与电价"
    assert parsed.summary == "本周要点"
    assert parsed.price == 30
    assert parsed.free_percent == 20
    assert parsed.effective_free_percent == 20
    # A bare date is midnight in Shanghai, i.e. 16:00 UTC the day before.
    assert parsed.published == datetime(2026, 11, 22, 16, 0, tzinfo=UTC)
    assert parsed.published is not None and parsed.published.utcoffset() is not None
    assert parsed.topics == (
        Topic("芯片", ("谁在买？", "价格会跌吗？")),
        Topic("电价", ("冬天会涨吗？",)),
    )
    assert parsed.body_md == BODY.strip()
    assert parsed.char_count == count_chars(BODY) == 6 + 6 + 3 + 6
    # 20 % of 21 字 = 4 字: the first paragraph (6) does not fit and has no earlier sentence end.
    assert parsed.excerpt_md == ""
    assert parsed.excerpt_char_count == 0
    assert parsed.source_sha256 == hashlib.sha256(text.encode()).hexdigest()


def test_parse_uses_default_free_percent_and_computes_excerpt() -> None:
    front = FRONT.replace("free_percent = 20\n", "")
    parsed = parse_issue_text(issue(front), file="x.md", default_free_percent=60)
    assert parsed.free_percent is None
    assert parsed.effective_free_percent == 60
    # budget = floor(21 * 0.6) = 12: the first two paragraphs, not the heading after them.
    assert parsed.excerpt_md == "第一段文字。\n\n第二段文字。"
    assert parsed.excerpt_char_count == 12


@pytest.mark.parametrize(
    ("published", "expected"),
    [
        ("2026-11-23", datetime(2026, 11, 22, 16, 0, tzinfo=UTC)),
        ("2026-11-23T08:30:00", datetime(2026, 11, 23, 0, 30, tzinfo=UTC)),
        ("2026-11-23 08:30:00", datetime(2026, 11, 23, 0, 30, tzinfo=UTC)),
        ("2026-11-23T08:30:00Z", datetime(2026, 11, 23, 8, 30, tzinfo=UTC)),
        ("2026-11-23T08:30:00-05:00", datetime(2026, 11, 23, 13, 30, tzinfo=UTC)),
    ],
)
def test_published_is_stored_as_aware_utc(published: str, expected: datetime) -> None:
    front = FRONT.replace("published = 2026-11-23", f"published = {published}")
    parsed = parse_issue_text(issue(front), file="x.md", default_free_percent=10)
    assert parsed.published == expected
    assert parsed.published is not None and parsed.published.tzinfo is not None
    assert parsed.published.utcoffset() == UTC.utcoffset(None)


def test_absent_published_is_a_draft() -> None:
    front = FRONT.replace("published = 2026-11-23\n", "")
    assert parse_issue_text(issue(front), file="x.md", default_free_percent=10).published is None


def test_parse_file_reads_utf8_and_hashes_bytes(tmp_path: Path) -> None:
    path = tmp_path / "007.md"
    data = ("\ufeff" + issue()).replace("\n", "\r\n").encode("utf-8")  # BOM + CRLF editor
    path.write_bytes(data)
    parsed = parse_issue_file(path, default_free_percent=10)
    assert parsed.number == 7
    assert parsed.body_md == BODY.strip()
    assert "\r" not in parsed.body_md
    assert parsed.source_sha256 == hashlib.sha256(data).hexdigest()


def test_issue_file_error_carries_file_field_and_message() -> None:
    err = IssueFileError([IssueProblem("a.md", 4, "price", "required"),
                          IssueProblem("a.md", None, "title", "required")])
    assert (err.file, err.field, err.message) == ("a.md", "price", "required")
    assert str(err) == "a.md:4: price: required\na.md: title: required"
    assert isinstance(err, ValueError)


def _drop_line(prefix: str) -> str:
    return "".join(line for line in FRONT.splitlines(True) if not line.startswith(prefix))


def _replace(old: str, new: str) -> str:
    assert old in FRONT
    return FRONT.replace(old, new)


BAD_FRONT = [
    (_drop_line("number"), "number", "required"),
    (_drop_line('title = "第七期'), "title", "required"),
    (_drop_line("price"), "price", "required"),
    (FRONT.split("[[topics]]")[0], "topics", "required"),
    (_replace("number = 7", 'number = "7"'), "number", 'must be an integer, got "7"'),
    (_replace("number = 7", "number = 1.5"), "number", "must be an integer"),
    (_replace("number = 7", "number = 0"), "number", "≥ 1, got 0"),
    (_replace("price = 30", "price = -3"), "price", "must be an integer ≥ 0, got -3"),
    (_replace("price = 30", "price = true"), "price", "must be an integer, got true"),
    (_replace('title = "第七期：芯片与电价"', "title = 5"), "title", "must be a string, got 5"),
    (_replace('title = "第七期：芯片与电价"', 'title = "  "'), "title", "must not be empty"),
    (_replace('summary = "本周要点"', "summary = []"), "summary", "must be a string"),
    (_replace("free_percent = 20", "free_percent = 101"), "free_percent", "0 to 100, got 101"),
    (_replace("free_percent = 20", "free_percent = -1"), "free_percent", "0 to 100, got -1"),
    (_replace('questions = ["冬天会涨吗？"]', "questions = []"), "topics[1].questions", "empty"),
    (
        _replace('questions = ["冬天会涨吗？"]', 'questions = ["好", ""]'),
        "topics[1].questions[1]",
        "must not be empty",
    ),
    (_replace('questions = ["冬天会涨吗？"]', 'questions = "x"'), "topics[1].questions", "array"),
    (_replace('title = "电价"\n', ""), "topics[1].title", "required"),
    (_replace('title = "电价"', "title = 3"), "topics[1].title", "must be a string"),
    (_replace('title = "电价"', 'title = "电价"\nmood = "ok"'), "topics[1].mood", "unknown key"),
    (FRONT.split("[[topics]]")[0] + 'topics = "x"\n', "topics", "array of tables"),
    (FRONT.split("[[topics]]")[0] + "topics = []\n", "topics", "at least one"),
    ("colour = 1\n" + FRONT, "colour", "unknown key"),
    (_replace("published = 2026-11-23", "published = 08:00:00"), "published", "date"),
    (_replace("published = 2026-11-23", 'published = "2026-11-23"'), "published", "date"),
    ("number = = 7\n" + FRONT, "front matter", "not valid TOML"),
    (FRONT + "title = 'twice'\n", "front matter", "not valid TOML"),
]


@pytest.mark.parametrize(("front", "field", "message"), BAD_FRONT)
def test_bad_front_matter_names_file_and_field(front: str, field: str, message: str) -> None:
    with pytest.raises(IssueFileError) as info:
        parse_issue_text(issue(front), file="issues/007.md", default_free_percent=10)
    err = info.value
    assert err.file == "issues/007.md"
    assert err.field == field
    assert message in err.message
    assert re.match(rf"issues/007\.md(:\d+)?: {re.escape(field)}: ", str(err))
    assert "pydantic" not in str(err) and "errors.pydantic.dev" not in str(err)


def test_unknown_key_lists_the_allowed_keys() -> None:
    with pytest.raises(IssueFileError) as info:
        parse_issue_text(issue("prcie = 1\n" + FRONT), file="x.md", default_free_percent=10)
    assert "price" in info.value.message


def test_toml_error_line_counts_from_the_file_start() -> None:
    with pytest.raises(IssueFileError) as info:
        parse_issue_text(issue("number = = 7\n" + FRONT), file="x.md", default_free_percent=10)
    assert "line 2" in info.value.message  # line 1 of the file is the opening +++


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("number = 7\n+++\n\nbody", "front matter", "must start with a +++"),
        ("# 只有正文\n\n没有前言。", "front matter", "must start with a +++"),
        (f"+++\n{FRONT}\n正文。", "front matter", "missing the closing +++ line"),
        (issue(body=""), "body", "empty"),
        (issue(body="\n  \n\t\n"), "body", "empty"),
    ],
)
def test_bad_layout_names_file_and_field(text: str, field: str, message: str) -> None:
    with pytest.raises(IssueFileError) as info:
        parse_issue_text(text, file="x.md", default_free_percent=10)
    assert (info.value.file, info.value.field) == ("x.md", field)
    assert message in info.value.message


def test_non_utf8_file_is_a_file_error(tmp_path: Path) -> None:
    path = tmp_path / "gbk.md"
    path.write_bytes(issue().encode("gbk"))
    with pytest.raises(IssueFileError) as info:
        parse_issue_file(path, default_free_percent=10)
    assert (info.value.file, info.value.field) == (str(path), "file")
    assert "UTF-8" in info.value.message


def test_missing_file_is_a_file_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.md"
    with pytest.raises(IssueFileError) as info:
        parse_issue_file(path, default_free_percent=10)
    assert (info.value.file, info.value.field) == (str(path), "file")


def test_bad_default_free_percent_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="default_free_percent") as info:
        parse_issue_text(issue(), file="x.md", default_free_percent=101)
    assert not isinstance(info.value, IssueFileError)


# --------------------------------------------------------------------------- topics JSON


def test_topics_json_round_trip_keeps_chinese_readable() -> None:
    topics = (Topic("芯片", ("谁在买？", "价格会跌吗？")), Topic("电价", ("冬天？",)))
    encoded = topics_to_json(topics)
    assert "芯片" in encoded
    assert topics_from_json(encoded) == topics
    assert topics_from_json(topics_to_json(())) == ()


@pytest.mark.parametrize(
    "bad",
    ["nope", "{}", '[{"title": "t"}]', '[{"title": "", "questions": ["q"]}]', '[{"title": 1}]'],
)
def test_topics_from_json_rejects_bad_input(bad: str) -> None:
    with pytest.raises(ValueError, match="topics JSON"):
        topics_from_json(bad)


# --------------------------------------------------------------------------- rendering


def test_render_html_escapes_raw_html() -> None:
    html = render_html("前言 <script>alert(1)</script>\n\n<div onclick='x()'>块</div>\n")
    assert "<script>" not in html and "<div" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;div onclick='x()'&gt;" in html


def test_render_html_drops_javascript_links() -> None:
    html = render_html("[点我](javascript:alert(1)) [好](https://e.x/a)")
    assert 'href="javascript' not in html
    assert '<a href="https://e.x/a">好</a>' in html


def test_render_html_supports_tables_and_strikethrough() -> None:
    html = render_html("| a | b |\n|---|---|\n| 1 | 2 |\n\n~~删~~")
    assert "<table>" in html and "<td>2</td>" in html
    assert "<s>删</s>" in html


def test_plain_text_drops_markup_and_separates_blocks() -> None:
    md = "# 标题\n\n**粗** 和 [链接](http://x.y) `代码`\n\n- 一\n- 二\n\n> 引用"
    assert plain_text(md) == "标题\n\n粗 和 链接 代码\n\n一\n\n二\n\n引用"


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("**加粗** 文字", 4),
        ("[链接](http://x.y)", 2),
        ("# 标题", 2),
        ("`a b`", 2),  # code content counts, its spaces do not
        ("```python\nx = 1\n```", 3),  # the info string is not content
        ("甲\u3000乙\n\n丙", 3),  # the ideographic space is whitespace
        ("AT&amp;T", 4),  # entities count as the character they show
        ("\\*不是强调\\*", 6),
        ("| 甲 | 乙 |\n|---|---|\n| 丙 | 丁 |", 4),
        ("![图](http://x.y/p.png)", 1),  # an image counts as its alt text
        ("---", 0),
        ("<b>粗</b>", 8),  # raw HTML is shown as text, so it counts as text
        ("", 0),
    ],
)
def test_count_chars(markdown: str, expected: int) -> None:
    assert count_chars(markdown) == expected


# --------------------------------------------------------------------------- excerpt examples

PARAS = "甲乙丙丁。\n\n戊己庚辛。\n\n壬癸子丑。\n\n寅卯辰巳。"  # 4 paragraphs of 5 字


@pytest.mark.parametrize(
    ("percent", "expected"),
    [
        (25, "甲乙丙丁。"),
        (50, "甲乙丙丁。\n\n戊己庚辛。"),
        (74, "甲乙丙丁。\n\n戊己庚辛。"),
        (75, "甲乙丙丁。\n\n戊己庚辛。\n\n壬癸子丑。"),
    ],
)
def test_excerpt_takes_whole_paragraphs(percent: int, expected: str) -> None:
    assert make_excerpt(PARAS, percent) == (expected, count_chars(expected))


def test_excerpt_is_exact_source_lines_of_whole_blocks() -> None:
    body = "# 标题\n段落  一。\n第二行。\n\n- 项一\n- 项二\n\n```\n代码\n```\n\n尾巴很长很长很长。"
    # 16 字 of blocks, then 9: budget floor(25 * 0.7) = 17.
    excerpt, chars = make_excerpt(body, 70)
    assert excerpt == "# 标题\n段落  一。\n第二行。\n\n- 项一\n- 项二\n\n```\n代码\n```"
    assert chars == 2 + 4 + 4 + 2 + 2 + 2


def test_excerpt_zero_and_hundred_percent() -> None:
    assert make_excerpt(PARAS, 0) == ("", 0)
    assert make_excerpt(PARAS + "\n\n\n", 100) == (PARAS, 20)


def test_excerpt_rejects_out_of_range_percent() -> None:
    with pytest.raises(ValueError):
        make_excerpt(PARAS, 101)


def test_first_paragraph_is_cut_at_last_sentence_end_within_budget() -> None:
    body = "一二三。四五六！七八九？十。\n\n第二段。"  # 14 + 4 字
    # budget floor(18 * 0.5) = 9: the cut after "！" (8 字) is the last that fits.
    assert make_excerpt(body, 50) == ("一二三。四五六！", 8)
    # budget 3: not even the first sentence fits.
    assert make_excerpt(body, 20) == ("", 0)


def test_cut_can_fall_at_a_line_end_and_takes_a_closing_quote_along() -> None:
    body = "他说：“好。”\n然后走了。后面还有很多很多。"  # 7 + 5 + 8 字
    assert make_excerpt(body, 60) == ("他说：“好。”\n然后走了。", 12)
    assert make_excerpt(body, 35) == ("他说：“好。”", 7)


def test_cut_inside_bold_is_refused() -> None:
    plain = "一二三。四五六七八九。"  # 11 字, budget at 60 % = 6
    assert make_excerpt(plain, 60) == ("一二三。", 4)
    # The same cut inside **…** would show a dangling "**" that the full text never shows.
    assert make_excerpt("**一二三。四五六**七八九。", 60) == ("", 0)


@pytest.mark.parametrize(
    "body",
    [
        "[一二三。四五六](http://e.x)七八九。",
        "`一二三。四五六`七八九。",
        "~~一二三。四五六~~七八九。",
    ],
)
def test_cut_inside_other_constructs_is_refused(body: str) -> None:
    assert make_excerpt(body, 60) == ("", 0)


def test_cut_after_a_closed_bold_sentence_is_allowed() -> None:
    assert make_excerpt("**一二三。** 四五六七八九。", 50) == ("**一二三。**", 4)


def test_unclosed_looking_bold_that_the_body_shows_literally_may_be_cut() -> None:
    # "。**四" cannot close emphasis, so the full text itself shows the asterisks.
    assert plain_text("**一二三。**四五六七八九。") == "**一二三。**四五六七八九。"
    assert make_excerpt("**一二三。**四五六七八九。", 50) == ("**一二三。", 6)


def test_cut_never_turns_the_paragraph_into_a_link_definition() -> None:
    # "[a]: http://e.x。" alone is a link reference definition, which shows nothing.
    body = "[a]: http://e.x。 后面的字很多很多很多。"
    assert plain_text(body).startswith("[a]:")
    assert make_excerpt(body, 50) == ("", 0)


def test_semicolon_of_an_entity_is_not_a_sentence_end() -> None:
    # "AT&amp;" would render as "AT&" (3 字) and fit a budget of 3, but it ends no sentence.
    assert make_excerpt("AT&amp;T。后面很多很多字。", 30) == ("", 0)


@pytest.mark.parametrize(
    "body",
    [
        "## 一个很长的标题。还有更多的字\n\n正文。",
        "- 列表项一。列表项二。列表项三\n\n正文。",
        "```\n代码一。代码二。代码三\n```\n\n正文。",
        "> 引用一。引用二。引用三。\n\n正文。",
    ],
)
def test_first_block_over_budget_and_not_a_paragraph_gives_nothing(body: str) -> None:
    assert make_excerpt(body, 40) == ("", 0)


def test_trailing_image_is_not_given_away() -> None:
    body = "甲乙丙丁。\n\n![](http://e.x/locked.png)\n\n戊己庚辛。"
    assert make_excerpt(body, 50) == ("甲乙丙丁。", 5)
    assert make_excerpt(body, 100)[0] == body  # …but it is free when text after it is free


def test_reference_link_defined_below_the_excerpt_does_not_leak_markup() -> None:
    body = "看[这里][r]。\n\n第二段文字。\n\n第三段文字。\n\n[r]: http://e.x"
    excerpt, chars = make_excerpt(body, 50)
    assert "[r]" not in excerpt or "[r]:" in excerpt
    assert squash(plain_text(body)).startswith(squash(plain_text(excerpt)))
    assert chars <= count_chars(body) // 2


# --------------------------------------------------------------------------- excerpt properties

CJK = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去"
ENDS = "。！？!?；;."
_md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])

words = st.text(alphabet=CJK + string.ascii_letters + string.digits, min_size=1, max_size=6)
sentences = st.builds(
    lambda ws, sep, end: sep.join(ws) + end,
    st.lists(words, min_size=1, max_size=4),
    st.sampled_from(["", " "]),
    st.sampled_from(ENDS),
)
pieces = st.one_of(
    sentences,
    sentences,
    st.builds(lambda a, b: f"**{a}{b}**", sentences, sentences),
    st.builds(lambda a: f"**{a}**", sentences),
    st.builds(lambda a: f"`{a}`", sentences),
    st.builds(lambda a: f"[{a}](http://e.x)", sentences),
    st.builds(lambda a, t: f'[{a}](http://e.x "){t}")', sentences, sentences),
)
lines = st.builds(
    lambda ps, sep: sep.join(ps),
    st.lists(pieces, min_size=1, max_size=4),
    st.sampled_from(["", " "]),
)
paragraphs = st.lists(lines, min_size=1, max_size=3).map("\n".join)
blocks = st.one_of(
    paragraphs,
    paragraphs,
    paragraphs,
    st.builds(lambda n, s: "#" * n + " " + s, st.integers(1, 3), sentences),
    st.lists(sentences, min_size=1, max_size=3).map(lambda xs: "\n".join(f"- {x}" for x in xs)),
    st.lists(sentences, min_size=1, max_size=3).map(lambda xs: "```\n" + "\n".join(xs) + "\n```"),
    lines.map(lambda s: f"> {s}"),
)
# A long leading paragraph makes the sentence-end cut (the riskiest path) common.
long_paragraphs = st.lists(
    st.lists(pieces, min_size=2, max_size=8).map("".join), min_size=1, max_size=3
).map("\n".join)
bodies = st.builds(
    lambda first, rest: "\n\n".join([first, *rest]),
    st.one_of(blocks, long_paragraphs),
    st.lists(blocks, min_size=0, max_size=5),
)


def top_blocks(src: str) -> list[tuple[str, int, int]]:
    """(token type, first line, end line) of each top-level block, straight from markdown-it."""
    return [
        (t.type, t.map[0], t.map[1])
        for t in _md.parse(src)
        if t.level == 0 and t.nesting != -1 and t.map is not None
    ]


@settings(max_examples=200, deadline=None)
@given(body=bodies, percent=st.integers(0, 100))
def test_excerpt_properties(body: str, percent: int) -> None:
    excerpt, chars = make_excerpt(body, percent)
    total = count_chars(body)
    budget = total * percent // 100
    src_lines = body.split("\n")
    body_blocks = top_blocks(body)

    # (1) within budget, and the reported count is the excerpt's own count.
    assert chars == count_chars(excerpt)
    assert chars <= budget
    # (2) readers of the excerpt see exactly the start of what the full text shows, markup
    # characters included, so no dangling "**", "`" or "](" can appear.
    assert squash(plain_text(body)).startswith(squash(plain_text(excerpt)))
    # The excerpt is always a prefix of the source, trimmed of trailing whitespace.
    assert body.startswith(excerpt)
    assert excerpt == excerpt.rstrip()

    if percent == 100:
        assert excerpt == body.rstrip()
        return
    if percent == 0:
        assert excerpt == ""
        return

    prefixes = ["\n".join(src_lines[:end]).rstrip() for _, _, end in body_blocks]
    if excerpt == "" or excerpt in prefixes:
        # (3) whole blocks: each block of the excerpt is a block of the body, verbatim, and it
        # renders as the start of the body's HTML.
        k = 0 if excerpt == "" else prefixes.index(excerpt) + 1
        ex_lines = excerpt.split("\n")
        for _, start, end in top_blocks(excerpt):
            assert "\n".join(ex_lines[start:end]).rstrip() in body
        assert render_html(body).startswith(render_html(excerpt))
        # (4) maximal: the next block (the next with any 字 that is not a heading, since
        # trailing headings are left out) would break the budget.
        nxt = k
        while nxt < len(body_blocks) and (
            count_chars(prefixes[nxt]) == count_chars(excerpt)
            or body_blocks[nxt][0] == "heading_open"
        ):
            nxt += 1
        if nxt < len(body_blocks):
            assert count_chars(prefixes[nxt]) > budget
        if excerpt == "" and body_blocks:
            assert body_blocks[0][0] != "paragraph_open" or count_chars(prefixes[0]) > budget
    else:
        # (3) a cut: only ever of a leading paragraph that is over budget, at a sentence end,
        # leaving a single paragraph whose HTML is the start of the body's HTML.
        kind, start, end = body_blocks[0]
        assert kind == "paragraph_open"
        assert count_chars(prefixes[0]) > budget
        assert "\n".join(src_lines[start:end]).startswith(excerpt)
        assert [t.type for t in _md.parse(excerpt)] == [
            "paragraph_open",
            "inline",
            "paragraph_close",
        ]
        assert excerpt.rstrip("”’」』）】》〉\"')*_~`")[-1] in ENDS
        assert render_html(body).startswith(render_html(excerpt).removesuffix("</p>\n"))


@settings(max_examples=100, deadline=None)
@given(body=bodies, percent=st.integers(0, 100))
def test_parsed_issue_counts_match_the_text(body: str, percent: int) -> None:
    front = FRONT.replace("free_percent = 20", f"free_percent = {percent}")
    parsed = parse_issue_text(issue(front, body), file="x.md", default_free_percent=10)
    assert parsed.body_md == body.rstrip()
    assert parsed.char_count == count_chars(body)
    assert (parsed.excerpt_md, parsed.excerpt_char_count) == make_excerpt(body, percent)
    assert parsed.excerpt_char_count <= parsed.char_count * percent // 100


# Leading paragraphs rich in links whose destination or title holds CJK text that is not shown.
hidden_cjk = st.text(alphabet=CJK, min_size=2, max_size=12)
linky_paragraphs = st.lists(
    st.one_of(
        sentences,
        st.builds(lambda a, t: f"[{a}](http://e.x/{t})", sentences, hidden_cjk),
        st.builds(lambda a, t: f'[{a}](http://e.x "){t}。")', sentences, hidden_cjk),
        st.builds(lambda a, t: f"[{a}][{t}]", sentences, hidden_cjk),
    ),
    min_size=3,
    max_size=12,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(body=linky_paragraphs, percent=st.integers(1, 99))
def test_skipping_hopeless_cut_points_never_changes_the_excerpt(body: str, percent: int) -> None:
    fast = make_excerpt(body, percent)
    with patch.object(content, "_surely_over", lambda src, budget: [False] * (len(src) + 1)):
        assert make_excerpt(body, percent) == fast


def test_long_paragraph_is_cut_exactly() -> None:
    sentence = "字" * 20 + "。"
    body = sentence * 3000 + "\n\n尾。"
    # budget floor(63002 * 0.1) = 6300 = exactly 300 sentences.
    assert make_excerpt(body, 10) == (sentence * 300, 6300)


def test_trailing_heading_is_left_out_of_the_excerpt() -> None:
    body = "第一段有十个字的内容。\n\n## 下一节标题\n\n" + "锁定的正文内容。" * 20 + "\n"
    excerpt, chars = make_excerpt(body, 30)
    assert excerpt == "第一段有十个字的内容。"
    assert chars == 11
