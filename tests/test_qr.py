"""QR attribution: qrcode/create against the fake WeChat API (with WeChat's errcodes), `newsbot
qr create|list` and its refusals, and follows and scans carrying a scene, posted as signed XML
through the real WSGI app: first touch, one SCAN event per delivery, the card, no reward."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from typer.testing import CliRunner

from bot.app import create_app
from bot.cli import app as cli_app
from bot.settings import WechatSettings
from bot.wechat.api import QR_TEMPORARY_MAX_S, WeChatClient, WeChatError
from bot.wechat.fake import QR_URL_PREFIX, FakeWeChat
from storage import events
from storage.db import transaction
from storage.models import Event, LedgerEntry, QrCode, Subscriber
from tests.conftest import TOKEN, WeChatUser, make_settings, parse_reply
from tests.pay_orders_support import loopback_server
from tests.test_webhook import add_issue

READER = "o_reader_0001"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def fake() -> Iterator[FakeWeChat]:
    with FakeWeChat(app_id="wx_qr", app_secret="qr-secret") as f:
        yield f


@pytest.fixture
def client(fake: FakeWeChat, engine: Engine) -> Iterator[WeChatClient]:
    settings = WechatSettings(app_id="wx_qr", app_secret="qr-secret", api_base=fake.base_url)
    with WeChatClient(settings, engine, sleep=lambda _s: None) as c:
        yield c


def qr_calls(fake: FakeWeChat) -> list[object]:
    return [c.body for c in fake.calls if c.path == "/cgi-bin/qrcode/create"]


# --- the API and the fake ----------------------------------------------------------------------

def test_a_temporary_code_comes_back_with_its_ticket_url_and_lifetime(
        client: WeChatClient, fake: FakeWeChat) -> None:
    ticket = client.create_qrcode("poster-12", expire_seconds=3600)
    assert ticket.url.startswith(QR_URL_PREFIX) and ticket.ticket
    assert ticket.expire_seconds == 3600
    assert qr_calls(fake) == [{"action_name": "QR_STR_SCENE", "expire_seconds": 3600,
                               "action_info": {"scene": {"scene_str": "poster-12"}}}]


def test_a_permanent_code_never_expires_and_is_the_same_for_its_scene(
        client: WeChatClient, fake: FakeWeChat) -> None:
    first = client.create_qrcode("shop-door", expire_seconds=None)
    again = client.create_qrcode("shop-door", expire_seconds=None)
    assert first.expire_seconds is None and again.ticket == first.ticket
    assert qr_calls(fake)[0] == {"action_name": "QR_LIMIT_STR_SCENE",
                                 "action_info": {"scene": {"scene_str": "shop-door"}}}


def test_wechat_refusals_have_their_errcodes(client: WeChatClient, fake: FakeWeChat) -> None:
    fake.permanent_qr_limit = 1
    client.create_qrcode("one", expire_seconds=None)
    with pytest.raises(WeChatError) as full:
        client.create_qrcode("two", expire_seconds=None)
    assert full.value.errcode == 45029
    fake.qrcode_allowed = False  # an unverified account, or a 订阅号
    with pytest.raises(WeChatError) as denied:
        client.create_qrcode("three", expire_seconds=60)
    assert denied.value.errcode == 48001


@pytest.mark.parametrize("body", [
    {"action_name": "QR_STR_SCENE", "expire_seconds": QR_TEMPORARY_MAX_S + 1,
     "action_info": {"scene": {"scene_str": "x"}}},
    {"action_name": "QR_STR_SCENE", "expire_seconds": 60,
     "action_info": {"scene": {"scene_str": "x" * 65}}},
    {"action_name": "QR_STR_SCENE", "action_info": {"scene": {"scene_str": ""}}},
    {"action_name": "QR_NO_SUCH", "action_info": {"scene": {"scene_str": "x"}}},
    {"action_name": "QR_STR_SCENE"},
])
def test_the_fake_refuses_bad_arguments_as_wechat_does(
        client: WeChatClient, fake: FakeWeChat, body: dict[str, object]) -> None:
    with pytest.raises(WeChatError) as refused:
        client._call("POST", "/cgi-bin/qrcode/create", body=body)
    assert refused.value.errcode == 40097


@pytest.mark.parametrize(("scene", "expire"), [
    ("", 60), ("x" * 65, 60), ("a\x07b", 60), ("two words", 60), ("ok", 0),
    ("ok", QR_TEMPORARY_MAX_S + 1)])
def test_the_client_refuses_a_bad_code_before_calling(
        client: WeChatClient, fake: FakeWeChat, scene: str, expire: int) -> None:
    with pytest.raises(ValueError):
        client.create_qrcode(scene, expire_seconds=expire)
    assert fake.calls == []


def test_a_scan_push_carries_the_scene_and_an_expired_code_pushes_nothing(
        client: WeChatClient, fake: FakeWeChat) -> None:
    ticket = client.create_qrcode("expo", expire_seconds=60).ticket
    first = fake.scan_xml(ticket, "o_new")
    assert "<Event><![CDATA[subscribe]]></Event>" in first and "qrscene_expo" in first
    second = fake.scan_xml(ticket, "o_new")  # following now: a scan
    assert "<Event><![CDATA[SCAN]]></Event>" in second and "[CDATA[expo]]" in second
    fake.qrcodes[ticket] = replace(fake.qrcodes[ticket], expires_at=0.0)
    with pytest.raises(ValueError):
        fake.scan_xml(ticket, "o_other")


# --- newsbot qr create / list -------------------------------------------------------------------

@pytest.fixture
def config(tmp_path: Path, fake: FakeWeChat, db_url: str, engine: Engine) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[wechat]\ntoken = "{TOKEN}"\napp_id = "wx_qr"\napp_secret = "qr-secret"\n'
                    f'api_base = "{fake.base_url}"\n[reader]\nsecret = "qr-reader-secret-0123456"\n'
                    f'[database]\nurl = "{db_url}"\n', encoding="utf-8")
    return path


def newsbot(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, ["--config", str(config), *args])
    return result.exit_code, result.output


def codes(engine: Engine) -> list[QrCode]:
    with transaction(engine) as s:
        return list(s.exec(select(QrCode)).scalars())  # type: ignore[call-overload]


def test_qr_create_saves_a_png_of_the_url_and_stores_the_code(
        config: Path, fake: FakeWeChat, engine: Engine, tmp_path: Path) -> None:
    out = tmp_path / "poster.png"
    code, output = newsbot(config, "qr", "create", "poster-12", "--days", "7", "--out", str(out))
    assert code == 0, output
    assert out.read_bytes().startswith(PNG)
    [row] = codes(engine)
    assert row.scene == "poster-12" and not row.permanent and row.url.startswith(QR_URL_PREFIX)
    assert row.expires_at is not None
    assert abs((row.expires_at - row.created_at).total_seconds() - 7 * 86400) < 5
    assert str(out) in output and "poster-12" in output and "expires" in output
    assert qr_calls(fake)[0]["expire_seconds"] == 7 * 86400  # type: ignore[index]
    # No download of showqrcode: the PNG is drawn from the URL.
    assert [c.path for c in fake.calls if "showqrcode" in c.path] == []


def test_qr_create_defaults_to_30_days_and_permanent_needs_the_flag(
        config: Path, fake: FakeWeChat, engine: Engine, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = newsbot(config, "qr", "create", "expo")
    assert code == 0, output and (tmp_path / "qr-expo.png").exists()
    assert qr_calls(fake)[0]["expire_seconds"] == 30 * 86400  # type: ignore[index]
    code, output = newsbot(config, "qr", "create", "door", "--permanent")
    assert code == 0, output
    assert "never expires" in output and "100,000" in output
    assert [(c.scene, c.permanent, c.expires_at) for c in codes(engine)][1] == \
        ("door", True, None)
    code, listing = newsbot(config, "qr", "list", "--json")
    assert code == 0
    assert [(c["scene"], c["permanent"]) for c in json.loads(listing)] == \
        [("door", True), ("expo", False)]
    code, table = newsbot(config, "qr", "list")
    assert code == 0 and "door" in table and "permanent" in table and "never" in table


@pytest.mark.parametrize("args", [
    [""], ["x" * 65], ["a\tb"], ["a\x1bb"], ["ok", "--days", "0"], ["ok", "--days", "31"],
    ["ok", "--days", "seven"], ["ok", "--days", "3", "--permanent"], ["ok", "--out", "x.jpg"],
    ["ok", "--out", "/nonexistent-dir/x.png"]])
def test_qr_create_refuses_bad_input_with_exit_2_writing_and_calling_nothing(
        config: Path, fake: FakeWeChat, engine: Engine, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = newsbot(config, "qr", "create", *args)
    assert code == 2, output
    assert fake.calls == [] and codes(engine) == []
    assert list(tmp_path.glob("*.png")) == []


def test_qr_create_on_an_account_that_may_not_make_codes(
        config: Path, fake: FakeWeChat, engine: Engine, tmp_path: Path) -> None:
    fake.qrcode_allowed = False
    code, output = newsbot(config, "qr", "create", "expo", "--out", str(tmp_path / "x.png"))
    assert code == 1 and "48001" in output and "服务号" in output
    assert codes(engine) == [] and not (tmp_path / "x.png").exists()


# --- follows and scans through the webhook ------------------------------------------------------

def scene_of(engine: Engine, openid: str = READER) -> str | None:
    with transaction(engine) as s:
        return s.connection().execute(
            select(Subscriber.scene).where(Subscriber.openid == openid)).scalar()


def events_of(engine: Engine, kind: str) -> list[str | None]:
    with transaction(engine) as s:
        return list(s.connection().execute(
            select(Event.detail).where(Event.kind == kind).order_by(Event.id)).scalars())


def post(user: WeChatUser, xml: str) -> dict[str, str]:
    resp = user.post_xml(xml)
    assert resp.status_code == 200, resp.text
    return parse_reply(resp.text)


def test_a_follow_through_a_code_credits_its_scene_first_touch(
        user: WeChatUser, engine: Engine, client: WeChatClient, fake: FakeWeChat) -> None:
    add_issue(engine, 1)
    expo = client.create_qrcode("expo", expire_seconds=600).ticket
    poster = client.create_qrcode("poster", expire_seconds=600).ticket
    welcome = post(user, fake.scan_xml(expo, READER, create_time=1_700_000_001))
    assert "欢迎订阅" in welcome["content"] and "第1期" in welcome["content"]
    assert scene_of(engine) == "expo"
    # They leave and come back through another code: the first scene keeps them.
    user.event("unsubscribe")
    fake.followers = []
    post(user, fake.scan_xml(poster, READER, create_time=1_700_000_002))
    assert scene_of(engine) == "expo"
    assert events_of(engine, events.FOLLOW) == ["expo", "poster"]


def test_a_plain_follow_has_no_scene(user: WeChatUser, engine: Engine) -> None:
    user.event("subscribe")
    assert scene_of(engine) is None and events_of(engine, events.FOLLOW) == [None]


def test_a_scan_by_a_follower_records_it_attributes_once_and_shows_the_card(
        user: WeChatUser, engine: Engine, client: WeChatClient, fake: FakeWeChat) -> None:
    add_issue(engine, 1)
    user.event("subscribe")  # followed before any code: no scene yet
    fake.followers = [READER]
    ticket = client.create_qrcode("flyer", expire_seconds=600).ticket
    xml = fake.scan_xml(ticket, READER, create_time=1_700_000_010)
    reply = post(user, xml)
    assert reply["content"].startswith("📰 第1期")
    assert post(user, xml) == reply  # WeChat's retry: answered again, recorded once
    assert events_of(engine, events.SCAN) == ["flyer"]
    assert scene_of(engine) == "flyer"
    other = client.create_qrcode("other", expire_seconds=600).ticket
    post(user, fake.scan_xml(other, READER, create_time=1_700_000_011))
    assert scene_of(engine) == "flyer"  # first touch
    assert events_of(engine, events.SCAN) == ["flyer", "other"]


def test_following_and_scanning_earn_nothing(
        user: WeChatUser, engine: Engine, client: WeChatClient, fake: FakeWeChat) -> None:
    """WeChat's operating rules forbid rewarding a follow or a share (诱导关注/诱导分享)."""
    ticket = client.create_qrcode("expo", expire_seconds=600).ticket
    post(user, fake.scan_xml(ticket, READER, create_time=1_700_000_020))
    post(user, fake.scan_xml(ticket, READER, create_time=1_700_000_021))
    with transaction(engine) as s:
        conn = s.connection()
        assert conn.execute(select(Subscriber.balance)
                            .where(Subscriber.openid == READER)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(
            LedgerEntry.__table__)).scalar() == 0  # type: ignore[attr-defined]


def test_a_scene_is_cut_to_the_column_and_an_empty_scan_key_is_ignored(
        user: WeChatUser, engine: Engine) -> None:
    add_issue(engine, 1)
    user.event("subscribe", "qrscene_" + "s" * 80)
    assert scene_of(engine) == "s" * 64
    assert user.event("SCAN", "")["type"] == "text"
    assert events_of(engine, events.SCAN) == []


def test_the_fake_pushes_a_signed_scan_to_a_running_webhook(engine: Engine) -> None:
    """scan() signs and posts the push like WeChat, to the app served on loopback."""
    add_issue(engine, 1)
    with loopback_server() as server:
        server.serve(create_app(make_settings(), engine))
        with FakeWeChat(webhook_url=server.url + "/wechat", webhook_token=TOKEN) as f:
            ticket = f._new_qrcode("expo", None).ticket
            resp = f.scan(ticket, READER)
    assert resp.status_code == 200 and "第1期" in parse_reply(resp.text)["content"]
    assert scene_of(engine) == "expo"
