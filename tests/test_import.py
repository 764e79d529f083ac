"""`newsbot issue import` through the real CLI: every problem of every file is reported before
anything is stored, a run stores all files or none, a sold issue keeps its price and text
without --force, "absent = draft" holds for issues that are already published, and --dry-run
shows the diff without writing."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from typer.testing import CliRunner, Result

from bot.cli import app
from storage.content import IssueFileError, parse_issue_text
from storage.db import transaction
from storage.issues import read_issue
from storage.ledger import credit, redeem
from storage.subscribers import ensure_subscriber
from tests.conftest import TOKEN

Run = Callable[..., Result]
BUYER = "o_import_buyer"

BODY = "第一段：芯片的故事从这里开始。\n\n第二段：价格与供需。\n\n## 小结\n\n第三段：冬天会涨价吗？"


def issue_text(number: int = 5, *, title: str = "第五期：芯片与电价", price: int = 30,
               published: str | None = "2026-11-23", body: str = BODY,
               topics: str = '[[topics]]\ntitle = "芯片"\nquestions = ["谁在买？"]\n',
               extra: str = "") -> str:
    pub = f"published = {published}\n" if published else ""
    return (f'+++\nnumber = {number}\ntitle = "{title}"\nprice = {price}\n{pub}{extra}\n'
            f"{topics}+++\n\n{body}\n")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("NEWSBOT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def run(tmp_path: Path, db_url: str, engine: Engine) -> Run:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[wechat]\ntoken = "{TOKEN}"\n\n[database]\nurl = "{db_url}"\n\n'
        '[reader]\nsecret = "import-test-reader-secret-0123456789"\n', encoding="utf-8")
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(app, ["--config", str(config), *args])

    return invoke


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def rows(engine: Engine) -> list[dict[str, Any]]:
    """The whole issue table, to prove a refused run left it exactly as it was."""
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text("SELECT * FROM issue ORDER BY number"))]


def sell(engine: Engine, number: int, price: int) -> None:
    with transaction(engine) as s:
        ensure_subscriber(s, openid=BUYER)
        credit(s, openid=BUYER, amount=price + 10, kind="topup", key="test:topup",
               reason="test", operator="test")
        redeem(s, openid=BUYER, issue_number=number, price=price, key="test:redeem")


# --------------------------------------------------------------------------- all or nothing


def test_every_problem_of_every_file_is_listed_and_nothing_is_written(
        run: Run, engine: Engine, tmp_path: Path) -> None:
    stored = write(tmp_path, "005.md", issue_text())
    assert run("issue", "import", str(stored)).exit_code == 0
    before = rows(engine)

    updated = write(tmp_path, "005-new.md", issue_text(title="改过的标题"))
    new = write(tmp_path, "006.md", issue_text(6))
    many = write(tmp_path, "bad-front.md", issue_text(
        7, price=-1, title="",
        topics='[[topics]]\nquestions = ["一"]\n\n[[topics]]\ntitle = "二"\nquestions = []\n',
        extra='colour = "red"\n'))
    no_body = write(tmp_path, "no-body.md", issue_text(8, body=""))
    bad_toml = write(tmp_path, "bad-toml.md", issue_text(9).replace("price = 30", "price = = 3"))
    gbk = write(tmp_path, "gbk.md", issue_text(10).encode("gbk"))
    missing = tmp_path / "missing.md"

    result = run("issue", "import", str(updated), str(new), str(many), str(no_body),
                 str(bad_toml), str(gbk), str(missing))
    assert result.exit_code == 2, result.output
    err = result.stderr
    for expected in (
        f"{many}:3: title: must not be empty",
        f"{many}:4: price: must be an integer ≥ 0, got -1",
        f"{many}:6: colour: unknown key",
        f"{many}:8: topics[0].title: required",
        f"{many}:13: topics[1].questions: must not be empty",
        f"{no_body}:10: body: empty",
        f"{bad_toml}:4: front matter: not valid TOML",
        f"{gbk}:3: file: not valid UTF-8",
        f"{missing}: file: cannot read",
    ):
        assert expected in err, (expected, err)
    assert "nothing imported: 9 problems in 5 files" in err
    assert str(updated) not in err and str(new) not in err
    assert result.stdout == ""
    assert rows(engine) == before  # neither the good new file nor the good update was stored


def test_a_body_without_text_is_reported_with_the_front_matter_problems() -> None:
    with pytest.raises(IssueFileError) as info:
        parse_issue_text(issue_text(price=-5, body="---\n\n![](https://example.com/a.png)"),
                         file="x.md", default_free_percent=10)
    assert [(p.line, p.field) for p in info.value.problems] == [(4, "price"), (12, "body")]
    assert "readers would see nothing" in info.value.problems[1].message


def test_two_files_with_one_number_are_refused(run: Run, engine: Engine, tmp_path: Path) -> None:
    a = write(tmp_path, "a.md", issue_text(5))
    b = write(tmp_path, "b.md", issue_text(5, title="另一个第五期"))
    result = run("issue", "import", str(a), str(b))
    assert result.exit_code == 2
    assert f"{b}:2: number: issue 5 is also in {a}" in result.stderr
    assert rows(engine) == []

    twice = run("issue", "import", str(a), str(a))
    assert twice.exit_code == 2 and f"{a} is given twice" in twice.stderr
    assert rows(engine) == []


def test_a_good_run_stores_every_file_and_says_what_it_did(run: Run, engine: Engine,
                                                          tmp_path: Path) -> None:
    a = write(tmp_path, "a.md", issue_text(5))
    b = write(tmp_path, "b.md", issue_text(6, published=None))
    result = run("issue", "import", str(a), str(b))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.match(r"created: #5 第五期：芯片与电价 — 38 字, free excerpt 0 字 \(10%\), "
                    r"published 2026-11-23 00:00 \(Asia/Shanghai\)", lines[0]), lines[0]
    assert lines[1].startswith("created: #6 ") and ", draft (" in lines[1]
    assert lines[-1] == "imported 2 files: 2 created"
    assert [r["number"] for r in rows(engine)] == [5, 6]

    again = run("issue", "import", str(a), str(b))
    assert again.exit_code == 0
    assert "unchanged: #5 " in again.stdout and "imported 2 files: 2 unchanged" in again.stdout


# --------------------------------------------------------------------------- sold issues


def test_sold_issue_keeps_price_and_text_without_force(run: Run, engine: Engine,
                                                       tmp_path: Path) -> None:
    path = write(tmp_path, "005.md", issue_text())
    assert run("issue", "import", str(path)).exit_code == 0
    sell(engine, 5, 30)
    before = rows(engine)

    write(tmp_path, "005.md", issue_text(
        title="第五期（修订）", price=20,
        body=BODY.replace("价格与供需。", "价格、供需与库存。") + "\n\n新增的第四段。"))
    refused = run("issue", "import", str(path))
    assert refused.exit_code == 2, refused.output
    assert (f"{path}:4: price: issue 5 has been sold (1 buyer): the price would change "
            "30 → 20 豆. Keep `price = 30`, or pass --force") in refused.stderr
    assert (f"{path}:12: body: issue 5 has been sold (1 buyer): the text they paid for "
            "would change (+11/−1 字 in 2 of 5 blocks") in refused.stderr
    # What would have changed is shown too.
    assert "would update: #5 第五期（修订）" in refused.stdout
    assert "  title: 「第五期：芯片与电价」 → 「第五期（修订）」" in refused.stdout
    assert "  price: 30 → 20 豆" in refused.stdout
    assert "  text: +11/−1 字 in 2 of 5 blocks (paragraphs, headings…); 38 → 48 字" \
        in refused.stdout
    assert rows(engine) == before

    forced = run("issue", "import", "--force", str(path))
    assert forced.exit_code == 0, forced.output
    assert "updated: #5 第五期（修订）" in forced.stdout and "  price: 30 → 20 豆" in forced.stdout
    [row] = rows(engine)
    assert (row["title"], row["price"]) == ("第五期（修订）", 20)
    with transaction(engine) as s:  # the buyer keeps the unlock and reads the new text
        reading = read_issue(s, number=5, openid=BUYER, default_free_percent=10)
    assert reading.unlocked and "新增的第四段。" in reading.text_md


def test_sold_issue_title_and_topics_may_change(run: Run, engine: Engine,
                                               tmp_path: Path) -> None:
    path = write(tmp_path, "005.md", issue_text())
    assert run("issue", "import", str(path)).exit_code == 0
    sell(engine, 5, 30)
    write(tmp_path, "005.md", issue_text(
        title="新标题", extra='summary = "加了摘要"\nfree_percent = 50\n',
        topics='[[topics]]\ntitle = "芯片"\nquestions = ["谁在买？", "谁在卖？"]\n\n'
               '[[topics]]\ntitle = "电价"\nquestions = ["涨吗？"]\n'))
    result = run("issue", "import", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1:] == [
        "  title: 「第五期：芯片与电价」 → 「新标题」",
        "  summary: 「」 → 「加了摘要」",
        "  free excerpt: 10% → 50%",
        "  topics: 1 → 2: +「电价」; questions changed in 「芯片」",
    ]


def test_unsold_issue_changes_freely(run: Run, engine: Engine, tmp_path: Path) -> None:
    path = write(tmp_path, "005.md", issue_text())
    assert run("issue", "import", str(path)).exit_code == 0
    write(tmp_path, "005.md", issue_text(price=10, body=BODY + "\n\n多一段。"))
    result = run("issue", "import", str(path))
    assert result.exit_code == 0, result.output
    assert "  price: 30 → 10 豆" in result.stdout and "  text: +4/−0 字" in result.stdout
    assert rows(engine)[0]["price"] == 10


def test_sold_issue_is_not_hidden_from_its_buyers(run: Run, engine: Engine,
                                                  tmp_path: Path) -> None:
    path = write(tmp_path, "005.md", issue_text())
    assert run("issue", "import", str(path)).exit_code == 0
    sell(engine, 5, 30)
    before = rows(engine)

    write(tmp_path, "005.md", issue_text(published="2099-01-01"))
    later = run("issue", "import", str(path))
    assert later.exit_code == 2
    assert (f"{path}:5: published: issue 5 has been sold (1 buyer): publishing it only at "
            "2099-01-01 00:00 (Asia/Shanghai) would hide it from its buyers. Keep "
            "`published = 2026-11-23T00:00:00+08:00`, or pass --force") in later.stderr

    write(tmp_path, "005.md", issue_text(published=None))
    absent = run("issue", "import", "--unpublish", str(path))
    assert absent.exit_code == 2
    assert "unpublishing it would hide it from its buyers" in absent.stderr
    assert rows(engine) == before

    forced = run("issue", "import", "--unpublish", "--force", str(path))
    assert forced.exit_code == 0, forced.output
    assert "  published: 2026-11-23 00:00 (Asia/Shanghai) → draft" in forced.stdout
    assert rows(engine)[0]["published_at"] is None


# --------------------------------------------------------------------------- absent = draft


def test_published_issue_file_without_published_is_refused(run: Run, engine: Engine,
                                                           tmp_path: Path) -> None:
    path = write(tmp_path, "006.md", issue_text(6, published=None))
    assert run("issue", "import", str(path)).exit_code == 0
    assert run("issue", "publish", "6").exit_code == 0  # as the weekly job would
    published_at = rows(engine)[0]["published_at"]
    assert published_at is not None

    # The very file that is stored: nothing to do, nothing refused.
    same = run("issue", "import", str(path))
    assert same.exit_code == 0 and "unchanged: #6" in same.stdout

    write(tmp_path, "006.md", issue_text(6, published=None, body=BODY + "\n\n更正一句。"))
    refused = run("issue", "import", str(path))
    assert refused.exit_code == 2, refused.output
    match = re.search(r"add `published = ([0-9T:+-]+)` to the front matter; to make it a "
                      r"draft again, pass --unpublish", refused.stderr)
    assert match, refused.stderr
    assert f"{path}:2: published: issue 6 is published since " in refused.stderr
    assert "(absent = draft)" in refused.stderr
    assert rows(engine)[0]["published_at"] == published_at

    # The suggested line keeps it published, at the same time.
    write(tmp_path, "006.md", issue_text(6, published=match.group(1), body=BODY + "\n\n更正一句。"))
    kept = run("issue", "import", str(path))
    assert kept.exit_code == 0, kept.output
    assert "published:" not in kept.stdout and "  text: +5/−0 字" in kept.stdout
    assert rows(engine)[0]["published_at"] == published_at

    write(tmp_path, "006.md", issue_text(6, published=None))
    draft = run("issue", "import", "--unpublish", str(path))
    assert draft.exit_code == 0, draft.output
    assert "→ draft" in draft.stdout and rows(engine)[0]["published_at"] is None


# --------------------------------------------------------------------------- dry run and JSON


def test_dry_run_shows_the_diff_and_writes_nothing(run: Run, engine: Engine,
                                                   tmp_path: Path) -> None:
    path = write(tmp_path, "005.md", issue_text())
    assert run("issue", "import", str(path)).exit_code == 0
    before = rows(engine)
    write(tmp_path, "005.md", issue_text(title="新标题", price=40))
    other = write(tmp_path, "007.md", issue_text(7))

    result = run("issue", "import", "--dry-run", str(path), str(other))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "would update: #5 新标题 — 38 字, free excerpt 0 字 (10%), published 2026-11-23 00:00 "
        f"(Asia/Shanghai) ({path})",
        "  title: 「第五期：芯片与电价」 → 「新标题」",
        "  price: 30 → 40 豆",
        "would create: #7 第五期：芯片与电价 — 38 字, free excerpt 0 字 (10%), published "
        f"2026-11-23 00:00 (Asia/Shanghai) ({other})",
        "dry run: 1 created, 1 updated if imported; nothing written",
    ]
    assert rows(engine) == before

    sell(engine, 5, 30)
    refused = run("issue", "import", "--dry-run", str(path))
    assert refused.exit_code == 2 and "price would change 30 → 40" in refused.stderr
    assert rows(engine) == before


def test_json_lists_every_problem(run: Run, engine: Engine, tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.md", issue_text(price=-1, title=""))
    result = run("issue", "import", "--json", str(bad))
    assert result.exit_code == 2
    assert json.loads(result.stdout) == [
        {"file": str(bad), "status": "error", "line": 3, "field": "title",
         "message": "must not be empty"},
        {"file": str(bad), "status": "error", "line": 4, "field": "price",
         "message": "must be an integer ≥ 0, got -1"},
    ]
    good = write(tmp_path, "good.md", issue_text())
    [item] = json.loads(run("issue", "import", "--json", str(good)).stdout)
    assert item["status"] == "created" and item["changes"] == [] and item["draft"] is False
