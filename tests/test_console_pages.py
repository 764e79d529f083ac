"""The console's issues, subscribers, codes and broadcasts pages, through the real WSGI app
with a logged-in client: what they show, and that their actions write what the CLI would
(or nothing, with a Chinese reason)."""

from __future__ import annotations

import csv
import io
import re
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import col, select

from bot.app import create_app
from bot.settings import Settings
from storage import broadcasts, codes, ledger, subscribers
from storage.db import transaction
from storage.models import (
    CodeBatch,
    Entitlement,
    Issue,
    LedgerEntry,
    OperatorAction,
    PassPeriod,
    utcnow,
)
from tests.conftest import (
    CODES_SECRET,
    OPERATOR,
    SAMPLE_DRAFT,
    SAMPLE_ISSUE,
    client_for,
    import_issue,
    make_settings,
)
from tests.console_support import login

READER = "o_reader_00000000000000000001"
_KEY = re.compile(r'name="key" value="([^"]+)"')


class Console:
    """A logged-in operator's browser."""

    def __init__(self, client: httpx.Client, csrf: str) -> None:
        self.client = client
        self.csrf = csrf

    def get(self, path: str, **params: str) -> httpx.Response:
        page = self.client.get(path, params=params) if params else self.client.get(path)
        assert page.status_code == 200, page.text
        return page

    def post(self, path: str, data: dict[str, Any], **kw: Any) -> httpx.Response:
        return self.client.post(path, data={"csrf": self.csrf, **data}, **kw)

    def act(self, path: str, data: dict[str, Any], **kw: Any) -> tuple[bool, str]:
        """POST an action and read the flash message on the page it redirects to."""
        done = self.post(path, data, **kw)
        assert done.status_code == 303, done.text
        page = self.get(done.headers["location"]).text
        found = re.search(r'<p class="flash (ok|error)" role="\w+">(.*?)</p>', page, re.DOTALL)
        assert found, "no flash message on the page"
        return found.group(1) == "ok", found.group(2)


@pytest.fixture
def page_settings() -> Settings:
    return make_settings(tokens={"max_topup": 1000},
                         passes=[{"id": "month", "name": "月卡", "days": 30, "price": 30}])


@pytest.fixture
def console(page_settings: Settings, engine: Engine) -> Iterator[Console]:
    with client_for(create_app(page_settings, engine)) as client:
        yield Console(client, login(client, page_settings, OPERATOR))


@pytest.fixture
def reader(engine: Engine) -> str:
    with transaction(engine) as s:
        subscribers.ensure_subscriber(s, openid=READER)
    return READER


def _rows(engine: Engine, model: Any) -> list[Any]:
    with transaction(engine) as s:
        return list(s.exec(select(model).order_by(col(model.id))))


def _audit(engine: Engine) -> list[tuple[str, str]]:
    return [(a.action, a.result) for a in _rows(engine, OperatorAction)]


# --------------------------------------------------------------------------- pages render


def test_every_page_renders_in_the_menu_order(console: Console, engine: Engine,
                                              reader: str) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    home = console.get("/console/").text
    menu = re.findall(r'<a href="/console/(\w*)"', home.split("<nav>")[1].split("</nav>")[0])
    assert menu[:5] == ["", "issues", "subscribers", "codes", "broadcasts"]
    for path, words in [("/console/issues", ["期刊", "AI客服的真实账本", "上传并导入"]),
                        ("/console/issues/1", ["已发布", "免费部分", "话题"]),
                        ("/console/subscribers", ["订阅者", READER]),
                        (f"/console/subscribers/{READER}", ["余额", "充值", "调整余额", "账本"]),
                        ("/console/codes", ["兑换码", "创建并下载 CSV"]),
                        ("/console/broadcasts", ["群发", "还没有群发过"])]:
        page = console.get(path).text
        for word in words:
            assert word in page, (path, word)
        assert 'name="viewport"' in page or "name=viewport" in page


# --------------------------------------------------------------------------- issues


def _upload(console: Console, name: str, content: bytes | str,
            **flags: str) -> tuple[bool, str]:
    data = content.encode() if isinstance(content, str) else content
    return console.act("/console/issues/import", flags,
                       files={"file": (name, data, "text/markdown")})


def test_a_good_file_is_imported_and_listed(console: Console, engine: Engine) -> None:
    ok, message = _upload(console, "第二期.md", SAMPLE_DRAFT.read_bytes())
    assert ok and "新建 #2" in message and "草稿" in message, message
    [issue] = _rows(engine, Issue)
    assert issue.number == 2 and issue.published_at is None
    assert "手机里的大模型" in console.get("/console/issues").text
    # The same file again changes nothing.
    ok, message = _upload(console, "第二期.md", SAMPLE_DRAFT.read_bytes())
    assert ok and "没有变化" in message
    assert _audit(engine)[-2:] == [("issue.import", "ok"), ("issue.import", "ok")]


BAD = """+++
number = 3
price = "abc"
free_percent = 120
colour = "red"

[[topics]]
title = "一个话题"
questions = []
+++
"""


def test_a_bad_file_lists_every_problem_in_chinese_and_writes_nothing(
        console: Console, engine: Engine) -> None:
    ok, message = _upload(console, "坏文件.md", BAD)
    assert not ok
    assert "没有导入任何内容：共 6 处问题" in message, message
    for expected in ["坏文件.md 第 3 行，价格：必须是整数，实际是 &quot;abc&quot;",
                     "第 4 行，免费比例：必须是 0 到 100 的整数，实际是 120",
                     "第 5 行，colour：未知的键", "标题：必填，但没有写",
                     "questions：不能为空", "正文：是空的"]:
        assert expected in message, (expected, message)
    assert "must" not in message and "required" not in message
    assert _rows(engine, Issue) == []
    assert _audit(engine) == [("issue.import", "refused")]


def test_bad_bytes_images_and_duplicates_are_refused(console: Console, engine: Engine) -> None:
    ok, message = _upload(console, "x.md", b"+++\nnumber = 1\n\xff\xfe")
    assert not ok and "不是有效的 UTF-8" in message
    ok, message = _upload(console, "empty.md", b"")
    assert not ok and "文件是空的" in message
    head, body = SAMPLE_DRAFT.read_text().rsplit("+++\n", 1)
    image = f"{head}+++\n![图](http://evil.example/a.png)\n{body}"
    ok, message = _upload(console, "img.md", image)
    assert not ok and "图片 http://evil.example/a.png 不是 https" in message, message
    two = console.post("/console/issues/import", {}, files=[
        ("file", ("a.md", SAMPLE_DRAFT.read_bytes(), "text/markdown")),
        ("file", ("b.md", SAMPLE_DRAFT.read_bytes(), "text/markdown"))])
    assert "第 2 期也在 a.md 里" in console.get(two.headers["location"]).text
    ok, message = console.act("/console/issues/import", {})
    assert not ok and "请选择要上传的期刊文件" in message
    assert _rows(engine, Issue) == []


def test_changing_a_sold_issue_needs_force(console: Console, engine: Engine,
                                          reader: str) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    with transaction(engine) as s:
        s.add(Entitlement(openid=reader, issue_number=1))
    dearer = SAMPLE_ISSUE.read_text().replace("price = 99", "price = 199")
    ok, message = _upload(console, "issue-001.md", dearer)
    assert not ok and "已有 1 位读者购买，价格将从 99 变为 199 豆" in message, message
    assert "勾选“强制”" in message
    assert _rows(engine, Issue)[0].price == 99
    ok, message = _upload(console, "issue-001.md", dearer, dry_run="1", force="1")
    assert ok and "只检查，没有写入" in message and _rows(engine, Issue)[0].price == 99
    ok, message = _upload(console, "issue-001.md", dearer, force="1")
    assert ok and "改动：价格" in message, message
    assert _rows(engine, Issue)[0].price == 199


def test_a_published_issue_re_imported_without_published_is_refused(
        console: Console, engine: Engine) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    undated = SAMPLE_ISSUE.read_text().replace("published = 2026-11-23\n", "")
    ok, message = _upload(console, "issue-001.md", undated.replace("创刊号", "第一期"))
    assert not ok and "文件里没有 published" in message and "改回草稿" in message, message
    ok, message = _upload(console, "issue-001.md", undated.replace("创刊号", "第一期"),
                          unpublish="1")
    assert ok and _rows(engine, Issue)[0].published_at is None


def test_publish(console: Console, engine: Engine) -> None:
    import_issue(engine, SAMPLE_DRAFT, publish=False)
    assert "立即发布" in console.get("/console/issues/2").text
    ok, message = console.act("/console/issues/publish", {"number": "２", "next":
                                                          "/console/issues/2"})
    assert ok and "已发布 #2" in message, message
    assert _rows(engine, Issue)[0].published_at is not None
    ok, message = console.act("/console/issues/publish", {"number": "2"})
    assert ok and "早已" in message
    ok, message = console.act("/console/issues/publish", {"number": "9"})
    assert not ok and "没有第 9 期" in message
    ok, message = console.act("/console/issues/publish", {"number": "1e3"})
    assert not ok and "期号必须是整数" in message
    assert [a for a in _audit(engine)] == [("issue.publish", "ok"), ("issue.publish", "ok"),
                                           ("issue.publish", "refused"),
                                           ("issue.publish", "refused")]


# --------------------------------------------------------------------------- subscribers


def _form_keys(console: Console, openid: str) -> list[str]:
    return _KEY.findall(console.get(f"/console/subscribers/{openid}").text)


def _entries(engine: Engine) -> list[LedgerEntry]:
    return list(_rows(engine, LedgerEntry))


def test_a_double_submitted_top_up_credits_once(console: Console, engine: Engine,
                                               reader: str) -> None:
    topup_key, adjust_key = _form_keys(console, reader)
    assert topup_key != adjust_key
    form = {"openid": reader, "amount": "１００", "reason": "线下转账", "key": topup_key,
            "next": f"/console/subscribers/{reader}"}
    ok, message = console.act("/console/subscribers/topup", form)
    assert ok and "已充值 +100 豆：余额 100 豆" in message, message
    ok, message = console.act("/console/subscribers/topup", form)  # a double click, a retry
    assert ok and "已经入账过" in message, message
    [entry] = _entries(engine)
    assert (entry.amount, entry.kind, entry.idempotency_key, entry.operator) == (
        100, "topup", f"console:{topup_key}", f"console:{OPERATOR}")
    # The same form with another amount is not the same action: refused, not credited.
    ok, message = console.act("/console/subscribers/topup", {**form, "amount": "200"})
    assert not ok and "已经提交过另一笔操作" in message
    # A new form (the page after the redirect) has a new key: a second top-up.
    new_key = _form_keys(console, reader)[0]
    assert new_key != topup_key
    ok, _ = console.act("/console/subscribers/topup", {**form, "key": new_key})
    assert ok and [e.amount for e in _entries(engine)] == [100, 100]
    page = console.get(f"/console/subscribers/{reader}").text
    assert "200 豆" in page and "线下转账" in page


@pytest.mark.parametrize(("amount", "reason", "words"), [
    ("1e3", "r", "必须是整数"), ("-5", "r", "必须是整数"), ("0", "r", "不能小于 1"),
    ("+5", "r", "必须是整数"), ("1001", "r", "超过单次上限 1,000 豆"),
    ("10000000000000", "r", "不能超过"), ("٣", "r", "必须是整数"), ("5", " ", "请填写原因"),
])
def test_a_bad_top_up_is_refused_and_writes_nothing(console: Console, engine: Engine,
                                                    reader: str, amount: str, reason: str,
                                                    words: str) -> None:
    key = _form_keys(console, reader)[0]
    ok, message = console.act("/console/subscribers/topup", {
        "openid": reader, "amount": amount, "reason": reason, "key": key})
    assert not ok and words in message and "没有做任何更改" in message, message
    assert _entries(engine) == []
    assert _audit(engine) == [("user.topup", "refused")]


def test_adjust_up_and_down_never_below_zero(console: Console, engine: Engine,
                                            reader: str) -> None:
    def adjust(amount: str) -> tuple[bool, str]:
        key = _form_keys(console, reader)[1]
        return console.act("/console/subscribers/adjust", {
            "openid": reader, "amount": amount, "reason": "更正", "key": key})

    assert adjust("50")[0]
    ok, message = adjust("－20")  # full-width minus
    assert ok and "-20" in message and "余额 30 豆" in message, message
    ok, message = adjust("-31")
    assert not ok and "余额只有 30 豆" in message
    ok, message = adjust("0")
    assert not ok and "调整 0" in message
    assert [e.amount for e in _entries(engine)] == [50, -20]
    ok, message = console.act("/console/subscribers/adjust", {
        "openid": reader, "amount": "5", "reason": "更正", "key": "short"})
    assert not ok and "提交编号" in message
    ok, message = console.act("/console/subscribers/adjust", {
        "openid": "o_nobody", "amount": "5", "reason": "更正", "key": "k" * 32})
    assert not ok and "没有这个订阅者" in message
    assert len(_entries(engine)) == 2


def test_search_and_the_subscriber_page(console: Console, engine: Engine, reader: str) -> None:
    with transaction(engine) as s:
        subscribers.ensure_subscriber(s, openid="o_other_100%_x")
        ledger.credit(s, openid=reader, amount=40, kind="topup", key="t1", reason="r")
        s.add(PassPeriod(openid=reader, pass_id="month", days=30, starts_at=utcnow(),
                         ends_at=utcnow() + timedelta(days=30), source="grant",
                         idempotency_key="p1"))
    found = console.get("/console/subscribers", q="reader").text
    assert READER in found and "o_other" not in found
    assert "o_other_100%_x" in console.get("/console/subscribers", q="100%").text
    assert READER not in console.get("/console/subscribers", q="100%").text
    rich = console.get("/console/subscribers", min_balance="10").text
    assert READER in rich and "o_other" not in rich
    assert "最低余额必须是整数" in console.get("/console/subscribers", min_balance="x").text
    page = console.get(f"/console/subscribers/{reader}").text
    assert "40 豆" in page and "月卡，到" in page and "赠送" in page
    assert "没有订阅者" in console.get("/console/subscribers/o_nobody").text


def test_the_ledger_is_paginated_newest_first(console: Console, engine: Engine,
                                             reader: str) -> None:
    with transaction(engine) as s:
        for n in range(1, 56):
            ledger.credit(s, openid=reader, amount=n, kind="topup", key=f"k{n}", reason=f"第{n}笔")
    first = console.get(f"/console/subscribers/{reader}").text
    assert "第55笔" in first and "第6笔" in first and "第5笔" not in first
    assert "下一页" in first
    second = console.get(f"/console/subscribers/{reader}", page="2").text
    assert "第5笔" in second and "第1笔" in second and "第6笔" not in second


def test_a_post_without_the_csrf_token_is_refused(console: Console, engine: Engine,
                                                  reader: str) -> None:
    key = _form_keys(console, reader)[0]
    refused = console.client.post("/console/subscribers/topup", data={
        "openid": reader, "amount": "5", "reason": "r", "key": key})
    assert refused.status_code == 403 and "表单已失效" in refused.text
    assert _entries(engine) == []


# --------------------------------------------------------------------------- codes


def _csv_rows(response: httpx.Response) -> list[list[str]]:
    return list(csv.reader(io.StringIO(response.text)))


def test_create_downloads_the_codes_once_and_revoke_stops_them(console: Console,
                                                               engine: Engine) -> None:
    made = console.post("/console/codes/create", {
        "kind": "tokens", "tokens": "20", "count": "３", "uses": "1", "expires": "2099-12-31",
        "label": "书展"})
    assert made.status_code == 200, made.text
    assert made.headers["content-type"].startswith("text/csv")
    [batch] = _rows(engine, CodeBatch)
    assert f'filename="codes-batch-{batch.id}.csv"' in made.headers["content-disposition"]
    assert made.headers["cache-control"] == "no-store"
    header, *rows = _csv_rows(made)
    assert header == ["code", "batch", "grants", "expires"]
    assert len(rows) == 3 and {r[1] for r in rows} == {str(batch.id)}
    assert rows[0][2] == "tokens:20" and rows[0][3].startswith("2100-01-01T00:00:00+08:00")
    assert (batch.count, batch.tokens, batch.label, batch.created_by) == (
        3, 20, "书展", f"console:{OPERATOR}")
    secret = CODES_SECRET.encode()
    with transaction(engine) as s:  # the downloaded codes are the stored ones
        for row in rows:
            code = codes.canonical(row[0])
            assert code is not None and codes.find_code(s, secret=secret, code=code)
    assert _audit(engine) == [("code.create", "ok")]
    listing = console.get("/console/codes").text
    assert "书展" in listing and rows[0][0] not in listing  # never shown again

    ok, message = console.act("/console/codes/revoke", {"code": rows[0][0].lower()})
    assert ok and "已作废这个码" in message and rows[0][0] not in message
    ok, message = console.act("/console/codes/revoke", {"code": rows[0][0]})
    assert ok and "早已作废" in message
    with transaction(engine) as s:
        code = codes.canonical(rows[0][0])
        assert code is not None
        info = codes.find_code(s, secret=secret, code=code)
        assert info is not None and info.revoked_at is not None
    ok, message = console.act("/console/codes/revoke", {"batch": str(batch.id)})
    assert ok and "已作废第" in message
    assert _rows(engine, CodeBatch)[0].revoked_at is not None
    ok, message = console.act("/console/codes/revoke", {"batch": "99"})
    assert not ok and "没有第 99 批" in message
    ok, message = console.act("/console/codes/revoke", {"code": "AAAA-AAAA-AAAA-AAAB"})
    assert not ok


@pytest.mark.parametrize(("form", "words"), [
    ({"kind": "tokens", "tokens": "20", "count": "0"}, "数量不能小于 1"),
    ({"kind": "tokens", "tokens": "20", "count": "100001"}, "数量不能超过 100,000"),
    ({"kind": "tokens", "tokens": "1001", "count": "1"}, "豆数不能超过 1,000"),
    ({"kind": "tokens", "tokens": "", "count": "1"}, "豆数必须是整数"),
    ({"kind": "issue", "issue": "7", "count": "1"}, "没有第 7 期"),
    ({"kind": "pass", "pass": "year", "count": "1"}, "没有会员卡「year」"),
    ({"kind": "tokens", "tokens": "5", "count": "1", "expires": "2020-01-01"}, "已经过去"),
    ({"kind": "tokens", "tokens": "5", "count": "1", "expires": "明天"}, "有效期必须是日期"),
    ({"kind": "gold", "count": "1"}, "请选择每个码给什么"),
])
def test_a_bad_batch_is_refused_and_writes_nothing(console: Console, engine: Engine,
                                                   form: dict[str, str], words: str) -> None:
    ok, message = console.act("/console/codes/create", form)
    assert not ok and words in message, message
    assert _rows(engine, CodeBatch) == []


def test_issue_and_pass_batches(console: Console, engine: Engine) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    made = console.post("/console/codes/create", {"kind": "issue", "issue": "1", "count": "2",
                                                  "uses": "5", "tokens": "ignored"})
    assert made.status_code == 200 and _csv_rows(made)[1][2] == "issue:1"
    made = console.post("/console/codes/create", {"kind": "pass", "pass": "month",
                                                  "count": "1"})
    assert made.status_code == 200 and _csv_rows(made)[1][2] == "pass:month"
    kinds = [(b.kind, b.issue_number, b.pass_id, b.pass_days, b.uses)
             for b in _rows(engine, CodeBatch)]
    assert kinds == [("issue", 1, None, None, 5), ("pass", None, "month", 30, 1)]
    assert "会员卡 month（30 天）" in console.get("/console/codes").text


def test_codes_off_without_a_secret(engine: Engine) -> None:
    settings = make_settings(codes={"secret": ""})
    with client_for(create_app(settings, engine)) as client:
        page = Console(client, login(client, settings, OPERATOR))
        assert "兑换码未启用" in page.get("/console/codes").text
        ok, message = page.act("/console/codes/create", {"kind": "tokens", "tokens": "1",
                                                         "count": "1"})
        assert not ok and "未启用" in message


# --------------------------------------------------------------------------- broadcasts


def test_the_broadcasts_page_shows_batches_and_wechat_reports(console: Console,
                                                              engine: Engine) -> None:
    with transaction(engine) as s:
        record = broadcasts.create_broadcast(s, issue_number=1, mode="openids", text="t",
                                             tag_id=None, forced=False)
        assert record is not None and record.id is not None
        batch = broadcasts.plan_batch(s, broadcast_id=record.id, seq=1, clientmsgid="c1",
                                      first_id=1, last_id=2)
        assert batch.id is not None
        broadcasts.confirm_batch(s, batch_id=batch.id, broadcast_id=record.id, msg_id=1000123,
                                 msg_data_id=None, already_sent=False, recipients=2)
        broadcasts.record_job_finish(s, msg_id=1000123, status="send success", total=2,
                                     filtered=2, sent=2, errors=0)
        broadcasts.plan_batch(s, broadcast_id=record.id, seq=2, clientmsgid="c2",
                              first_id=3, last_id=4)
    page = console.get("/console/broadcasts").text
    assert "第 1 期：发送中" in page and "1 批，2 位收件人" in page
    assert "1000123" in page and "send success：2 / 2 送达" in page and "待发送" in page


def test_a_file_with_many_problems_lists_what_fits_in_a_redirect(console: Console,
                                                                 engine: Engine) -> None:
    keys = "".join(f"unknown_key_{n} = {n}\n" for n in range(200))
    done = console.post("/console/issues/import", {}, files={
        "file": ("很多问题.md", f"+++\n{keys}+++\n正文。", "text/markdown")})
    assert done.status_code == 303 and len(done.headers["location"]) < 24 * 1024
    message = console.get(done.headers["location"]).text
    assert "共 204 处问题" in message and "另有" in message and "处问题未列出" in message
    assert "第 2 行，unknown_key_0：未知的键" in message
    assert _rows(engine, Issue) == []


def test_two_submits_of_one_form_at_once_credit_once(console: Console, engine: Engine,
                                                     reader: str) -> None:
    key = _form_keys(console, reader)[0]
    form = {"csrf": console.csrf, "openid": reader, "amount": "7", "reason": "同时提交",
            "key": key}
    transport = console.client._transport
    start = threading.Barrier(2)
    statuses: list[int] = []

    def submit() -> None:
        with httpx.Client(transport=transport, base_url="http://testserver",
                          cookies=console.client.cookies) as tab:
            start.wait()
            statuses.append(tab.post("/console/subscribers/topup", data=form).status_code)

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [303, 303]
    assert [(e.amount, e.idempotency_key) for e in _entries(engine)] == [(7, f"console:{key}")]
    with transaction(engine) as s:
        assert ledger.get_balance(s, openid=reader) == 7
