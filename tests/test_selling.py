"""The buying conversation (issue 8 §5), through the real WSGI app with signed XML: 充值 and its
kin answer with the balance and every way to get tokens; every "not enough tokens" reply names
the exact shortfall and those ways; the menu's unlock button asks and never spends, while typed
兑换 still spends at once; 帮助 lists the selling features that are on, and only those."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import bottle
import httpx
import pytest
from sqlalchemy import Engine, text
from typer.testing import CliRunner

from bot.app import create_app
from bot.cli import app as cli_app
from bot.settings import Settings
from bot.web.links import READER_PREFIX
from bot.wechat.webhook import Webhook
from handlers import ROUTERS
from handlers.format import REPLY_LIMIT_BYTES
from handlers.router import Context, Incoming, Router, Text
from storage import passes
from storage.db import transaction
from storage.errors import InsufficientBalance
from tests.conftest import WeChatUser, client_for, make_settings
from tests.test_webhook import add_issue, balance, topup

READER = "o_reader_0001"
HOW_TO_GET = "转账后在本对话留言，编辑部会为你充值。"
CODES_LINE = "有兑换码？直接把兑换码发给我即可。"
PASSES = [{"id": "month", "name": "月卡", "days": 30, "price": 300},
          {"id": "year", "name": "年卡", "days": 365, "price": 2000}]
PASS_LINE = ("会员卡：「开通 月卡」30 天内每期全文，300 豆；「开通 年卡」365 天内每期全文，"
             "2000 豆")
WAYS = f"{HOW_TO_GET}\n{CODES_LINE}\n{PASS_LINE}"


def selling_settings(*, codes: bool = True, with_passes: bool = True) -> Settings:
    base = make_settings(tokens={"how_to_get": HOW_TO_GET},
                         codes={"secret": "test-codes-secret-0123456789" if codes else ""})
    return Settings.model_validate({**base.model_dump(exclude={"source"}),
                                    "passes": PASSES if with_passes else []})


@pytest.fixture
def settings() -> Settings:
    return selling_settings()


def reader(settings: Settings, engine: Engine) -> Iterator[WeChatUser]:
    with client_for(create_app(settings, engine)) as http:
        yield WeChatUser(http, READER)


def money_rows(engine: Engine) -> tuple[int, int, int]:
    """(ledger entries, entitlements, pass periods): what spending would change."""
    with transaction(engine) as s:
        return tuple(int(s.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
                     for t in ("ledger_entry", "entitlement", "pass_period"))  # type: ignore[return-value]


# --- 充值 / 购买 / 会员 ----------------------------------------------------------------------


@pytest.mark.parametrize("words", [
    "充值", "怎么充值", "怎么充值？", "如何充值", "充值方式", "购买", "买豆", "我想买", "会员",
    "会员？", "成为会员", "开会员", "top up", "Top Up", "topup", "recharge", "buy", "BUY",
    "buy tokens", "how to pay", "membership", "member", "pricing", "ｂｕｙ"])
def test_buying_words_answer_with_balance_and_every_way(
        words: str, user: WeChatUser, engine: Engine) -> None:
    topup(engine, READER, 12)
    before = money_rows(engine)
    reply = user.send(words)
    assert reply["content"] == f"💰 你的余额：12 豆\n\n{WAYS}\n到账后回复「余额」查看。"
    assert money_rows(engine) == before


def test_a_newcomer_asking_has_a_zero_balance(user: WeChatUser) -> None:
    assert user.send("充值")["content"].startswith("💰 你的余额：0 豆\n\n")


@pytest.mark.parametrize(("codes", "with_passes", "shown", "hidden"), [
    (False, False, [HOW_TO_GET], [CODES_LINE, "会员卡"]),
    (True, False, [HOW_TO_GET, CODES_LINE], ["会员卡"]),
    (False, True, [HOW_TO_GET, PASS_LINE], [CODES_LINE]),
])
def test_only_the_ways_that_are_on_are_offered(
        codes: bool, with_passes: bool, shown: list[str], hidden: list[str],
        engine: Engine) -> None:
    for user in reader(selling_settings(codes=codes, with_passes=with_passes), engine):
        content = user.send("充值")["content"]
    assert all(s in content for s in shown) and not any(h in content for h in hidden)


def test_buying_one_thing_is_not_the_buying_question(user: WeChatUser) -> None:
    """购买 X and 会员卡 belong to handlers.passes; 购买 alone is the question."""
    for words in ("购买 月卡", "会员卡", "买 3"):
        assert "到账后回复「余额」查看" not in user.send(words)["content"]


# --- every shortfall names the numbers and the ways ---------------------------------------------


def test_redeem_shortfall(user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 1, price=30, title="深度报道")
    topup(engine, READER, 10)
    before = money_rows(engine)
    content = user.send("兑换 1")["content"]
    assert content.startswith("余额不足，未扣费：第1期｜深度报道 需要 30 豆，你的余额 10 豆，"
                              f"还差 20 豆。\n{WAYS}\n豆够了之后回复「兑换 1」解锁全文")
    assert money_rows(engine) == before and balance(engine, READER) == 10


def test_full_text_of_a_locked_issue_names_the_shortfall(user: WeChatUser,
                                                          engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 10)
    content = user.send("全文 1")["content"]
    assert f"价格 30 豆｜你的余额 10 豆\n还差 20 豆。\n{WAYS}\n" in content
    assert "回复「兑换 1」解锁全文" in content


def test_the_card_names_the_shortfall(user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 10)
    content = user.send("本周")["content"]
    assert "价格 30 豆｜你的余额 10 豆（还差 20 豆）" in content and WAYS in content
    assert len(content.encode()) <= REPLY_LIMIT_BYTES


def test_the_preview_names_the_shortfall(user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 10)
    content = user.send("试读 1")["content"]
    assert f"解锁全文需 30 豆，你的余额 10 豆，还差 20 豆。\n{WAYS}\n" in content
    assert len(content.encode()) <= REPLY_LIMIT_BYTES


def test_any_other_shortfall_is_explained_with_the_ways(settings: Settings,
                                                        engine: Engine) -> None:
    """A refusal for too few tokens that its handler leaves to handlers.errors (a gift, a
    pass…) still gets the numbers and every way to get tokens."""
    spend = Router("spend")

    @spend.command(r"spend")
    def _spend(ctx: Context, msg: Incoming, match: re.Match[str] | None) -> Text:
        raise InsufficientBalance(needed=50, balance=10)

    topup(engine, READER, 10)
    app = bottle.Bottle()
    Webhook(settings, engine, routers=(spend, *ROUTERS)).install(app)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        content = WeChatUser(http, READER).send("spend")["content"]
    assert content == f"余额不足，未扣费：需要 50 豆，你的余额 10 豆，还差 40 豆。\n{WAYS}"


# --- the unlock button asks; typed 兑换 spends -------------------------------------------------


def test_the_unlock_click_never_spends_and_asks_for_the_words(
        user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 1, price=30, title="深度报道")
    topup(engine, READER, 100)
    before = money_rows(engine)
    for _ in range(3):  # three taps, three events: still nothing spent
        reply = user.event("CLICK", "UNLOCK")
        assert reply["type"] == "text"
        assert reply["content"].startswith(
            "解锁 第1期｜深度报道：价格 30 豆，你的余额 100 豆。\n"
            "确认解锁请回复「兑换 1」（扣 30 豆，余额将为 70 豆）。")
    assert money_rows(engine) == before and balance(engine, READER) == 100
    # The words the click asked for spend at once.
    done = user.send("兑换 1")
    assert done["type"] == "news" and "兑换成功：扣除 30 豆，余额 70 豆" in done["description"]
    assert balance(engine, READER) == 70


def test_the_unlock_click_with_too_few_tokens_names_the_shortfall(
        user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 1, price=30)
    topup(engine, READER, 10)
    before = money_rows(engine)
    content = user.event("CLICK", "UNLOCK")["content"]
    assert "需要 30 豆，你的余额 10 豆，还差 20 豆。" in content and WAYS in content
    assert "回复「兑换 1」" in content and money_rows(engine) == before


@pytest.mark.parametrize("how", ["unlocked", "pass", "free"])
def test_the_unlock_click_links_an_issue_already_readable(
        how: str, user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 1, price=0 if how == "free" else 30)
    topup(engine, READER, 100)
    if how == "unlocked":
        user.send("兑换 1")
    if how == "pass":
        with transaction(engine) as s:
            passes.grant(s, openid=READER, pass_id="month", days=30, source="grant",
                         key="test:grant", operator="test", reason="test")
    before, held = money_rows(engine), balance(engine, READER)
    reply = user.event("CLICK", "UNLOCK")
    assert reply["type"] == "news" and f"{READER_PREFIX}/1?" in reply["url"]
    assert "无需兑换" in reply["description"]
    assert money_rows(engine) == before and balance(engine, READER) == held


def test_the_unlock_click_is_answered_on_the_read_only_path(
        user: WeChatUser, engine: Engine) -> None:
    """It takes no write lock: marked @reads_only, like every reply that only reads."""
    from handlers import first_route_writes
    from handlers.config import ChatConfig

    click = Incoming(openid=READER, msg_type="event", event="click", event_key="UNLOCK")
    typed = Incoming(openid=READER, msg_type="text", text="兑换 1")
    assert not first_route_writes(ChatConfig(), click)
    assert first_route_writes(ChatConfig(), typed)


# --- 帮助 ----------------------------------------------------------------------------------------

SELLING_HELP = ["兑换码 — 直接发送兑换码", "会员卡 — 查看会员卡", "开通 月卡 — 用豆开通",
                "赠送 [期号] / 赠送 月卡 — 买给朋友"]


@pytest.mark.parametrize(("codes", "with_passes", "shown"), [
    (True, True, SELLING_HELP),
    (False, False, []),
    (True, False, ["兑换码 — 直接发送兑换码", "赠送 [期号] — 买给朋友"]),
    (False, True, ["会员卡 — 查看会员卡", "开通 月卡 — 用豆开通"]),
])
def test_help_lists_the_selling_features_that_are_on(
        codes: bool, with_passes: bool, shown: list[str], engine: Engine) -> None:
    for user in reader(selling_settings(codes=codes, with_passes=with_passes), engine):
        content = user.send("帮助")["content"]
    assert "充值 / 购买 — 获取豆的方式" in content
    assert [line for line in [*SELLING_HELP, "赠送 [期号] — 买给朋友"]
            if line in content] == shown
    assert ("兑换码" in content) == codes and ("会员卡" in content) == with_passes
    assert ("赠送" in content) == codes
    assert len(content.encode()) <= REPLY_LIMIT_BYTES


# --- configuration -------------------------------------------------------------------------------


def test_the_example_config_documents_passes_and_codes() -> None:
    from bot.settings import load_settings
    from tests.conftest import ROOT

    example = load_settings(ROOT / "config.example.toml")
    assert [(p.id, p.name, p.days) for p in example.passes] == [("month", "月卡", 30),
                                                                 ("year", "年卡", 365)]
    assert example.codes.secret.startswith("CHANGE-ME") and not example.codes.enabled
    assert (example.codes.max_failures, example.codes.failure_window_minutes,
            example.codes.freeze_minutes) == (5, 10, 60)


def test_serve_refuses_the_example_codes_secret(tmp_path: Path, db_url: str) -> None:
    """A copied example must not sell with codes silently off."""
    config = tmp_path / "config.toml"
    config.write_text(f'[wechat]\ntoken = "t"\n[database]\nurl = "{db_url}"\n[reader]\n'
                      'secret = "test-reader-secret-0123456789"\n[codes]\n'
                      'secret = "CHANGE-ME-codes-secret"\n', encoding="utf-8")
    done = CliRunner().invoke(cli_app, ["serve", "--config", str(config)])
    assert done.exit_code == 2
    assert "[codes] secret still holds the example placeholder" in done.stderr


# --- the demo ------------------------------------------------------------------------------------

_DEMO_CODE = re.compile(r"│\s+((?:[2-9A-Z]{4}-){3}[2-9A-Z]{4})\s+(\S+)")


def test_the_demo_ships_a_pass_and_codes_that_work(tmp_path: Path) -> None:
    import json
    import signal
    import subprocess
    import sys
    import tomllib

    from tests.conftest import child_env
    from tests.test_cli_ux import kill_group, start_demo, wait_for, wait_healthy

    workdir = tmp_path / "demo"
    proc, log, port = start_demo(tmp_path, workdir, "demo")
    try:
        wait_healthy(proc, port, log)
        printed = _DEMO_CODE.findall(wait_for(log, "What was sold"))
        assert [grants for _, grants in printed] == ["50", "50", "月卡（30"], printed
        config = workdir / "config.toml"
        token = tomllib.loads(config.read_text(encoding="utf-8"))["wechat"]["token"]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as http:
            user = WeChatUser(http, "o_demo_reader", token=token)
            assert "「开通 月卡」30 天内每期全文，100 豆" in user.send("充值")["content"]
            credited = user.send(printed[0][0].lower())["content"]  # any case works
            assert "50 豆" in credited and "170 豆" in credited, credited
            assert "月卡" in user.send(printed[2][0])["content"]
        revenue = subprocess.run(
            [sys.executable, "-m", "bot.cli", "--config", str(config), "revenue", "--json"],
            env=child_env(), capture_output=True, text=True, check=True)
        data = json.loads(revenue.stdout)
        assert data["in"]["codes"] == 50 and data["outstanding"] == 170
        assert [(b["kind"], b["redemptions"]) for b in data["codes"]] == [("tokens", 1),
                                                                         ("pass", 1)]
        check = subprocess.run(
            [sys.executable, "-m", "bot.cli", "--config", str(config), "ledger", "check"],
            env=child_env(), capture_output=True, text=True)
        assert check.returncode == 0 and "ledger OK" in check.stdout, check.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        kill_group(proc)


def test_the_menu_accepts_every_click_key_a_handler_answers() -> None:
    """TOPUP (the ways to get tokens) and PASSES are buttons too: the menu's keys are the
    handlers' own click registrations, not a second list to forget."""
    from bot.settings import MenuSettings
    from bot.wechat.menu import build_menu

    buttons = [{"name": "获取", "sub_buttons": [
        {"name": name, "type": "click", "key": key}
        for name, key in (("充值", "TOPUP"), ("会员卡", "PASSES"), ("解锁", "UNLOCK"))]}]
    menu = build_menu(MenuSettings.model_validate({"buttons": buttons}))
    assert [b["key"] for b in menu["button"][0]["sub_button"]] == ["TOPUP", "PASSES", "UNLOCK"]
