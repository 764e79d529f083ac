"""期刊: the issues, importing issue files by upload and publishing.

An upload goes through exactly what ``newsbot issue import`` runs (storage.content's parser,
storage.images' checks, storage.issues' import plan): every problem of every file is listed,
and nothing is written unless all files pass. A change to an issue readers have paid for is
refused unless "强制" is ticked, as ``--force``; "改回草稿" is ``--unpublish``. The messages are
the CLI's, in Chinese (storage words them in English for the terminal)."""

from __future__ import annotations

import os
import re
from datetime import datetime
from zoneinfo import ZoneInfo

from bot.console.core import Console, ConsoleRequest, Done, Refused, esc
from bot.console.pages.pagekit import hidden, local, table, whole, zone
from bot.settings import Settings
from storage.content import (
    IssueFileError,
    IssueProblem,
    ParsedIssue,
    TextDiff,
    duplicate_numbers,
    parse_issue_text,
)
from storage.errors import UnknownIssue
from storage.images import IMAGE_HOSTS_KEY, image_problems
from storage.issues import (
    ImportPlan,
    IssuePreview,
    apply_import,
    count_buyers,
    get_issue,
    list_issues,
    plan_import,
    publish_issue,
)

PATH = "/issues"
MAX_FILES = 20
# The refusal travels in the redirect's URL (the flash): keep it well inside a request head.
_MAX_MESSAGE_CHARS = 1800

_FIELDS = {"front matter": "头部", "body": "正文", "file": "文件", "number": "期号",
           "title": "标题", "price": "价格", "free_percent": "免费比例", "summary": "摘要",
           "published": "发布时间", "topics": "话题"}
_CHANGED = {"title": "标题", "summary": "摘要", "price": "价格", "free_percent": "免费比例",
            "published": "发布时间", "topics": "话题", "text": "正文"}
_WHY_IMAGE = [
    (r"is not a valid URL", "不是有效的网址"),
    (r"is not https", "不是 https"),
    (r"is not an https:// URL", "不是 https:// 网址"),
    (r"is on host (\S+), which is not listed", r"所在主机 \1 不在列表中"),
    (r"carries a user name", "网址里带有用户名"),
    (r"uses port (\d+) \(only the default https port can be allowed\)",
     r"使用端口 \1（只能允许 https 默认端口）"),
]
# storage.content's messages (and storage.images'), each as a pattern and its Chinese.
_MESSAGES = [
    (r"required", "必填，但没有写"),
    (r"unknown key \(expected one of: (.*)\)", r"未知的键（可用的键：\1）"),
    (r"unknown key", "未知的键"),
    (r"must be an integer from 0 to 100, got (.*)", r"必须是 0 到 100 的整数，实际是 \1"),
    (r"must be an integer, got (.*)", r"必须是整数，实际是 \1"),
    (r"must be an integer ≥ (\S+), got (.*)", r"必须是不小于 \1 的整数，实际是 \2"),
    (r"must be an integer ≤ (\S+), got (.*)", r"必须是不大于 \1 的整数，实际是 \2"),
    (r"must be a string, got (.*)", r"必须是字符串，实际是 \1"),
    (r"must not be empty", "不能为空"),
    (r"at least one \[\[topics\]\] table is required", "至少需要一个 [[topics]] 话题表"),
    (r"must be an array of tables \(\[\[topics\]\]\), got (.*)",
     r"必须是 [[topics]] 表的数组，实际是 \1"),
    (r"must be an array, got (.*)", r"必须是数组，实际是 \1"),
    (r"must be a table, got (.*)", r"必须是表，实际是 \1"),
    (r"must be a TOML date or date-time, got (.*)", r"必须是 TOML 日期或日期时间，实际是 \1"),
    (r"invalid value (.*)", r"无效的值 \1"),
    (r"not valid TOML: (.*)", r"不是有效的 TOML（\1）"),
    (r"missing: the file must start with a \+\+\+ line", "缺少：文件必须以一行 +++ 开头"),
    (r"missing the closing \+\+\+ line.*", "缺少结束头部的 +++ 行（TOML 头部必须以一行 +++ 结束）"),
    (r"empty: the issue needs Markdown text.*",
     "是空的：结束头部的 +++ 行之后需要 Markdown 正文"),
    (r"has no text \(only images, rules or markup\).*",
     "正文没有文字（只有图片、分隔线或标记），读者什么也看不到"),
    (r".* is given twice", "同一个文件上传了两次"),
    (r"issue (\d+) is also in (.*): import one file per issue number at a time",
     r"第 \1 期也在 \2 里：每个期号一次只导入一个文件"),
]


def _compiled() -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile(p, re.DOTALL), zh) for p, zh in _MESSAGES]


_PATTERNS = _compiled()
_IMAGE = re.compile(r"image (\S+) (.+?): reader pages show only .*\(listed: (.*?)\);.*",
                    re.DOTALL)


def _message_zh(message: str) -> str:
    image = _IMAGE.fullmatch(message)
    if image:
        src, why, listed = image.groups()
        for why_en, why_zh in _WHY_IMAGE:
            if re.fullmatch(why_en, why):
                why = re.sub(why_en, why_zh, why)
                break
        return (f"图片 {src} {why}：阅读页只显示 {IMAGE_HOSTS_KEY} 中列出的主机上的 https:// "
                f"图片（已列出：{'无' if listed == 'none' else listed}）；把图片放到这样的主机上"
                "并列入配置，或删去这张图片")
    for compiled, zh in _PATTERNS:
        if compiled.fullmatch(message):
            return compiled.sub(zh, message)
    return message  # a message this table does not know yet: shown as storage words it


def problem_zh(problem: IssueProblem) -> str:
    """One problem of an uploaded file, in Chinese: file, line, field, what is wrong."""
    head = problem.field.split(".")[0].split("[")[0]
    field = _FIELDS.get(problem.field, problem.field if head not in _FIELDS
                        else f"{_FIELDS[head]} {problem.field}")
    where = f"{problem.file} 第 {problem.line} 行" if problem.line else problem.file
    return f"{where}，{field}：{_message_zh(problem.message)}"


def _toml_time(dt: datetime, tz: ZoneInfo) -> str:
    return dt.astimezone(tz).isoformat(timespec="seconds")


def _text_change(diff: TextDiff) -> str:
    if not diff.added and not diff.removed:
        return "只改了格式，没有改字"
    return f"增加 {diff.added:,} 字、删去 {diff.removed:,} 字"


def _refusals_zh(plan: ImportPlan, tz: ZoneInfo, unit: str) -> list[str]:
    """The plan's refusals, each saying what to change or which box to tick."""
    p, before = plan.parsed, plan.before
    if before is None:
        return []
    n = p.number
    sold = f"第 {n} 期已有 {plan.buyers} 位读者购买"
    lines = []
    for refusal in plan.refusals:
        if refusal == "published_missing" and before.published_at is not None:
            lines.append(
                f"{p.file}：第 {n} 期已于 {local(before.published_at, tz)} 发布（或定时发布），"
                "但文件里没有 published（不写即为草稿）。要保持原样，请在头部加上 "
                f"published = {_toml_time(before.published_at, tz)}；要改回草稿，请勾选“改回草稿”"
                + ("并勾选“强制”（草稿对已购读者不可见）" if plan.buyers else ""))
        elif refusal == "sold_price":
            lines.append(f"{p.file}：{sold}，价格将从 {before.price} 变为 {p.price} {unit}。"
                         f"请保留 price = {before.price}，或勾选“强制”（已购读者保留解锁）")
        elif refusal == "sold_text" and plan.text is not None:
            lines.append(f"{p.file}：{sold}，他们付费的正文将被修改（{_text_change(plan.text)}）。"
                         "请保留原正文，或勾选“强制”替换（已购读者将看到新正文）")
        elif refusal == "sold_hidden":
            what = ("改回草稿" if plan.published_at is None
                    else f"推迟到 {local(plan.published_at, tz)} 发布")
            lines.append(f"{p.file}：{sold}，{what}会让他们看不到这一期。请保留原发布时间，"
                         "或勾选“强制”")
    return lines


def _refuse(lines: list[str], hint: str) -> Refused:
    """One refusal listing every problem (as many as fit in the flash)."""
    head = f"没有导入任何内容：共 {len(lines)} 处问题，{hint}"
    shown: list[str] = []
    size = len(head)
    for line in lines:
        if size + len(line) > _MAX_MESSAGE_CHARS:
            break
        shown.append(f"· {line}")
        size += len(line) + 3
    rest = len(lines) - len(shown)
    tail = [f"……另有 {rest} 处问题未列出，修正上面的问题后再上传即可看到。"] if rest else []
    return Refused("\n".join([head, *shown, *tail]), target=f"{len(lines)} problems")


def _upload_name(raw: str) -> str:
    """The uploaded file's own name (bottle reads the part headers as latin-1)."""
    try:
        name = raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        name = raw
    name = os.path.basename(name.replace("\\", "/")).strip()
    return "".join(ch for ch in name if ch.isprintable())[:80] or "上传的文件"


def _parse_upload(name: str, data: bytes, settings: Settings) -> ParsedIssue | list[str]:
    """The parsed file, or its problems in Chinese."""
    if not data:
        return [f"{name}：文件是空的"]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return [f"{name} 第 {line} 行：不是有效的 UTF-8 文本（第 {exc.start} 个字节出错），"
                "请把文件存为 UTF-8"]
    try:
        issue = parse_issue_text(text, file=name,
                                 default_free_percent=settings.content.free_percent)
    except IssueFileError as exc:
        return [problem_zh(q) for q in exc.problems]
    images = image_problems(issue.body_md, file=name, hosts=settings.reader.image_hosts)
    return [problem_zh(q) for q in images] or issue


def _state(published_at: datetime | None, now: datetime, tz: ZoneInfo) -> str:
    if published_at is None:
        return "草稿"
    word = "已发布" if published_at <= now else "定时发布"
    return f"{word} {local(published_at, tz)}"


def _done_line(plan: ImportPlan, now: datetime, tz: ZoneInfo) -> str:
    p = plan.parsed
    if plan.status == "unchanged":
        return f"#{p.number}《{p.title}》与已存的文件相同，没有变化"
    verb = "新建" if plan.status == "created" else "更新"
    changed = "、".join(_CHANGED.get(c, c) for c in plan.changed) or "只有文件格式不同"
    what = "" if plan.status == "created" else f"（改动：{changed}）"
    return (f"{verb} #{p.number}《{p.title}》：{p.char_count:,} 字，免费 "
            f"{p.excerpt_char_count:,} 字（{p.effective_free_percent}%），"
            f"{_state(plan.published_at, now, tz)}{what}")


def _row(i: IssuePreview, now: datetime, tz: ZoneInfo, unit: str) -> list[str]:
    return [f'<a href="/console{PATH}/{i.number}">#{i.number}</a>',
            f'<a href="/console{PATH}/{i.number}">{esc(i.title)}</a>',
            esc(f"{i.price} {unit}"), esc(f"{i.free_percent}%"),
            esc(_state(i.published_at, now, tz)), esc(f"{i.char_count:,}")]


def install(console: Console) -> None:
    @console.page(PATH, title="期刊", nav="期刊", order=20)
    def issues_page(req: ConsoleRequest) -> str:
        tz = zone(req)
        with req.reading() as session:
            items = list_issues(session, default_free_percent=req.settings.content.free_percent,
                                include_drafts=True)
        unit = req.settings.tokens.name
        listing = table(["期号", "标题", "价格", "免费", "状态", "字数"],
                        (_row(i, req.now, tz, unit) for i in items), numeric=frozenset({5}),
                        wrap=frozenset({1}),
                        empty="还没有期刊：在下面上传第一期的文件。")
        upload = (
            "<h2>导入期刊文件</h2>"
            + req.form_tag(f"/console{PATH}/import", multipart=True, extra='class="stack"')
            + '<label>期刊文件（TOML 头部 + Markdown 正文，UTF-8）'
            '<input type="file" name="file" accept=".md,.markdown,.txt,text/markdown,text/plain"'
            " multiple required></label>"
            '<label class=check><input type="checkbox" name="dry_run" value="1"> 只检查，不导入'
            "</label>"
            '<label class=check><input type="checkbox" name="force" value="1"> 强制：允许修改'
            "已售出期刊的价格或正文，或让已购读者看不到它</label>"
            '<label class=check><input type="checkbox" name="unpublish" value="1"> 改回草稿：'
            "已发布的期刊，文件里没有 published 时</label>"
            "<button type=submit>上传并导入</button>"
            "<p class=muted>与 <code>newsbot issue import</code> 相同的检查：有任何问题就一个"
            "都不导入，并列出所有问题。</p></form>")
        return listing + upload

    @console.page(PATH + "/<number:int>", title="期刊详情")
    def issue_page(req: ConsoleRequest) -> str:
        number = int(req.args["number"])
        tz = zone(req)
        with req.reading() as session:
            try:
                issue = get_issue(session, number=number, include_drafts=True,
                                  default_free_percent=req.settings.content.free_percent)
            except UnknownIssue:
                return f"<p class=empty>没有第 {number} 期。<a href='/console{PATH}'>返回</a></p>"
            buyers = count_buyers(session, number=number)
        unit = req.settings.tokens.name
        facts = [("状态", _state(issue.published_at, req.now, tz)),
                 ("价格", f"{issue.price} {unit}"),
                 ("字数", f"{issue.char_count:,} 字，免费 {issue.excerpt_char_count:,} 字"
                         f"（{issue.free_percent}%）"),
                 ("已购读者", f"{buyers:,}"), ("摘要", issue.summary or "—")]
        dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
        topics = "".join(
            f"<li>{esc(t.title)}<ul>{''.join(f'<li>{esc(q)}</li>' for q in t.questions)}</ul></li>"
            for t in issue.topics)
        publish = ""
        if issue.published_at is None or issue.published_at > req.now:
            publish = (req.form_tag(f"/console{PATH}/publish", extra='class="stack"')
                       + hidden("number", number) + hidden("next", f"/console{PATH}/{number}")
                       + "<p>立即发布：这一期马上成为当前期"
                       + ("（原定时间提前）" if issue.published_at else "") + "。</p>"
                       "<button type=submit>立即发布</button></form>")
        excerpt = esc(issue.excerpt_md) if issue.excerpt_md else "（没有免费部分）"
        return (f"<h2>#{number}《{esc(issue.title)}》</h2><dl class=facts>{dl}</dl>{publish}"
                f"<h2>话题</h2><ul>{topics}</ul>"
                f"<h2>免费部分</h2><pre class=excerpt>{excerpt}</pre>"
                f"<p><a href='/console{PATH}'>‹ 全部期刊</a></p>")

    @console.action(PATH + "/import", name="issue.import")
    def import_files(req: ConsoleRequest) -> Done:
        uploads = req.files.getall("file")
        if not uploads:
            raise Refused("请选择要上传的期刊文件。")
        if len(uploads) > MAX_FILES:
            raise Refused(f"一次最多上传 {MAX_FILES} 个文件，收到 {len(uploads)} 个。")
        settings = req.settings
        parsed: list[ParsedIssue] = []
        problems: list[str] = []
        for upload in uploads:
            result = _parse_upload(_upload_name(upload.raw_filename), upload.file.read(),
                                   settings)
            if isinstance(result, list):
                problems += result
            else:
                parsed.append(result)
        problems += [problem_zh(q) for q in duplicate_numbers(parsed)]
        if problems:  # before the database is even opened, as the CLI does
            raise _refuse(problems, "请修正后重新上传。")
        force, unpublish = bool(req.get("force")), bool(req.get("unpublish"))
        dry_run = bool(req.get("dry_run"))
        tz, unit = zone(req), settings.tokens.name
        with req.transaction() as session:
            plans = [plan_import(session, parsed=p, now=req.now, force=force,
                                 unpublish=unpublish,
                                 default_free_percent=settings.content.free_percent)
                     for p in parsed]
            refusals = [line for plan in plans for line in _refusals_zh(plan, tz, unit)]
            if refusals:
                raise _refuse(refusals, "请修改文件，或勾选上面提到的选项。")
            if not dry_run:
                for plan in plans:
                    apply_import(session, plan=plan)
        lines = [_done_line(plan, req.now, tz) for plan in plans]
        head = "检查通过（只检查，没有写入）：" if dry_run else "已导入："
        numbers = ",".join(str(p.parsed.number) for p in plans)
        return Done(head + "；".join(lines), target=f"issue {numbers}",
                    detail={"files": [p.parsed.file for p in plans],
                            "status": [p.status for p in plans], "force": force,
                            "unpublish": unpublish, "dry_run": dry_run})

    @console.action(PATH + "/publish", name="issue.publish")
    def publish(req: ConsoleRequest) -> Done:
        number = whole(req.get("number"), "期号", minimum=1)
        tz = zone(req)
        with req.transaction() as session:
            try:
                before = get_issue(session, number=number, include_drafts=True,
                                   default_free_percent=req.settings.content.free_percent)
            except UnknownIssue:
                raise Refused(f"没有第 {number} 期：请先导入它的文件。",
                              target=f"issue {number}") from None
            issue = publish_issue(session, number=number, at=req.now)
        when = local(issue.published_at, tz)
        if before.published_at is not None and before.published_at <= req.now:
            return Done(f"#{number}《{before.title}》早已在 {when} 发布，没有更改。",
                        target=f"issue {number}", detail="already published")
        return Done(f"已发布 #{number}《{before.title}》（{when}）。", target=f"issue {number}",
                    detail={"published_at": when})
