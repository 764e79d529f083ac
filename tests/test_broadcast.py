"""The weekly push against the fake WeChat API over real HTTP: batches, guards, resume,
mode "off", the MASSSENDJOBFINISH report and the scheduler."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import Engine

from bot.app import create_app
from bot.jobs.broadcast import Broadcaster, Progress
from bot.jobs.scheduler import WeeklyScheduler, latest_fire_time, weekly_trigger
from bot.jobs.weekly import run_weekly_job
from bot.settings import Settings
from bot.wechat.api import WeChatClient, WeChatError
from bot.wechat.fake import FakeWeChat
from storage import broadcasts, issues, subscribers
from storage.db import transaction
from storage.errors import BroadcastRefused, UnknownIssue
from tests.conftest import SAMPLE_DRAFT, SAMPLE_ISSUE, WeChatUser, import_issue, make_settings

SHANGHAI = ZoneInfo("Asia/Shanghai")


@pytest.fixture
def fake() -> Iterator[FakeWeChat]:
    with FakeWeChat(app_id="wx_test", app_secret="secret-test") as f:
        FOLLOWING.append(f)
        yield f
        FOLLOWING.remove(f)


# Fakes whose follower list mirrors the subscribers the test creates (WeChat filters
# mass sends to non-followers).
FOLLOWING: list[FakeWeChat] = []


def settings_for(fake: FakeWeChat, **broadcast: Any) -> Settings:
    return make_settings(
        wechat={"app_id": "wx_test", "app_secret": "secret-test", "api_base": fake.base_url},
        broadcast={"mode": "openids", **broadcast})


def add_subscribers(engine: Engine, count: int, prefix: str = "o_sub_") -> list[str]:
    openids = [f"{prefix}{i:07d}" for i in range(count)]
    with transaction(engine) as s:
        for start in range(0, count, 10_000):
            subscribers.add_followers(s, openids=openids[start:start + 10_000])
    for f in FOLLOWING:
        f.followers = [*f.followers, *openids]
    return openids


def broadcaster(settings: Settings, engine: Engine, **kw: Any) -> tuple[Broadcaster, WeChatClient]:
    client = WeChatClient(settings.wechat, engine, sleep=lambda _s: None)
    return Broadcaster(settings, engine, client, **kw), client


def test_openids_mode_25000_subscribers_three_batches_one_message_each(
        fake: FakeWeChat, engine: Engine) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    openids = add_subscribers(engine, 25_000)
    settings = settings_for(fake)
    progress: list[Progress] = []
    b, client = broadcaster(settings, engine, on_progress=progress.append)
    with client:
        record = b.start(1)
    assert record.status == "done" and record.batches_sent == 3 and record.recipients == 25_000
    sizes = [m.total_count for m in fake.mass_sends]
    assert sizes == [10_000, 10_000, 5_000]
    assert len(fake.deliveries) == 25_000
    assert set(fake.deliveries) == set(openids)
    assert set(fake.deliveries.values()) == {1}
    assert [p.batch for p in progress] == [1, 2, 3]
    assert progress[-1].recipients == 25_000
    with transaction(engine) as s:
        ids = [bt.clientmsgid for bt in broadcasts.batches(s, broadcast_id=record.id or 0)]
    assert len(set(ids)) == 3 and all(i.startswith("newsbot-1-") for i in ids)


def test_message_is_the_issue_card_within_the_limit(fake: FakeWeChat, engine: Engine) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    add_subscribers(engine, 3)
    b, client = broadcaster(settings_for(fake), engine)
    with client:
        b.start(1)
    text = fake.mass_sends[0].content
    assert "第1期｜AI客服的真实账本" in text and "引入AI客服之后，成本究竟省在了哪里？" in text
    assert "回复「第1期」" in text and "回复「试读 1」" in text and "回复「兑换 1」" in text
    assert len(text.encode()) <= 2048


def test_never_leaves_a_lone_subscriber_for_the_last_batch(
        fake: FakeWeChat, engine: Engine) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    add_subscribers(engine, 11)
    b, client = broadcaster(settings_for(fake, batch_size=5), engine)
    with client:
        b.start(1)
    sizes = [m.total_count for m in fake.mass_sends]
    assert sum(sizes) == 11 and min(sizes) >= 2


def test_already_broadcast_is_refused_with_its_record(fake: FakeWeChat, engine: Engine) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    add_subscribers(engine, 4)
    b, client = broadcaster(settings_for(fake), engine)
    with client:
        b.start(1)
        with pytest.raises(BroadcastRefused, match=r"already broadcast.*4 recipients"):
            b.start(1)
        with pytest.raises(BroadcastRefused, match="already broadcast"):
            b.start(1, force=True)
    assert len(fake.mass_sends) == 1


def _past_broadcasts(engine: Engine, *when: datetime) -> None:
    with transaction(engine) as s:
        for i, at in enumerate(when):
            broadcasts.create_broadcast(s, issue_number=900 + i, mode="openids", text="x",
                                        tag_id=None, forced=False, at=at)


def test_monthly_cap_refuses_unless_forced(fake: FakeWeChat, engine: Engine) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    add_subscribers(engine, 4)
    _past_broadcasts(engine, datetime(2026, 12, 1, 9, tzinfo=SHANGHAI),
                     datetime(2026, 12, 8, 9, tzinfo=SHANGHAI))
    settings = settings_for(fake, monthly_cap=2)
    b, client = broadcaster(settings, engine,
                            now=lambda: datetime(2026, 12, 20, 9, tzinfo=SHANGHAI))
    with client:
        with pytest.raises(BroadcastRefused, match=r"monthly_cap = 2.*--force"):
            b.start(1)
        assert fake.mass_sends == []
        record = b.start(1, force=True)
    assert record.status == "done" and record.forced


def test_monthly_cap_counts_calendar_months_in_the_configured_timezone(
        fake: FakeWeChat, engine: Engine) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    add_subscribers(engine, 4)
    # Two broadcasts late on 30 November in Shanghai; "now" is 02:00 on 1 December there,
    # which is still 30 November in UTC.
    _past_broadcasts(engine, datetime(2026, 11, 30, 21, tzinfo=SHANGHAI),
                     datetime(2026, 11, 30, 22, tzinfo=SHANGHAI))
    b, client = broadcaster(settings_for(fake, monthly_cap=2), engine,
                            now=lambda: datetime(2026, 12, 1, 2, tzinfo=SHANGHAI))
    with client:
        assert b.start(1).status == "done"


def test_sendall_once_per_day(fake: FakeWeChat, engine: Engine) -> None:
    fake.followers = [f"o_{i}" for i in range(5)]
    import_issue(engine, SAMPLE_ISSUE)
    import_issue(engine, SAMPLE_DRAFT)
    settings = settings_for(fake, mode="sendall")
    b, client = broadcaster(settings, engine)
    with client:
        record = b.start(1)
        assert record.status == "done" and record.mode == "sendall"
        with pytest.raises(BroadcastRefused, match="one per day"):
            b.start(2)
    assert len(fake.mass_sends) == 1 and len(fake.deliveries) == 5


def test_draft_cannot_be_broadcast(fake: FakeWeChat, engine: Engine) -> None:
    import_issue(engine, SAMPLE_DRAFT, publish=False)
    b, client = broadcaster(settings_for(fake), engine)
    with client, pytest.raises(BroadcastRefused, match="not published"):
        b.start(2)
    with client, pytest.raises(UnknownIssue):
        b.start(42)


def test_failure_is_recorded_and_resume_finishes_without_duplicates(
        fake: FakeWeChat, engine: Engine) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    openids = add_subscribers(engine, 30)
    settings = settings_for(fake, batch_size=10)
    b, client = broadcaster(settings, engine)
    with client:
        fake.fail_next(45028, path="/cgi-bin/message/mass/send")  # quota: not retried
        # The first batch goes out, then the second call fails.
        original = client.send_to_openids_text
        calls = {"n": 0}

        def flaky(ids: Any, content: str, *, clientmsgid: str | None = None) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                fake._faults.clear()  # let the first through
            elif calls["n"] == 2:
                fake.fail_next(45028, path="/cgi-bin/message/mass/send")
            return original(ids, content, clientmsgid=clientmsgid)

        client.send_to_openids_text = flaky  # type: ignore[method-assign]
        with pytest.raises(WeChatError):
            b.start(1)
        with transaction(engine) as s:
            record = broadcasts.get_broadcast(s, issue_number=1)
            assert record is not None and record.status == "failed"
            assert record.batches_sent == 1 and "45028" in (record.error or "")
        with pytest.raises(BroadcastRefused, match="resume"):
            b.start(1)
        done = b.resume(1)
    assert done.status == "done" and done.recipients == 30
    assert set(fake.deliveries) == set(openids) and set(fake.deliveries.values()) == {1}


def test_crash_after_wechat_accepted_a_batch_is_not_resent(
        fake: FakeWeChat, engine: Engine) -> None:
    """WeChat accepted the batch but the process died before recording it: the resume re-sends
    the same batch with the same clientmsgid, WeChat answers 45065, nobody gets it twice."""
    import_issue(engine, SAMPLE_ISSUE)
    openids = add_subscribers(engine, 30)
    settings = settings_for(fake, batch_size=10)
    b, client = broadcaster(settings, engine)
    original = client.send_to_openids_text
    calls = {"n": 0}

    def dies_after_second(ids: Any, content: str, *, clientmsgid: str | None = None) -> Any:
        result = original(ids, content, clientmsgid=clientmsgid)
        calls["n"] += 1
        if calls["n"] == 2:
            raise SystemExit("killed")  # after WeChat's confirmation, before our checkpoint
        return result

    client.send_to_openids_text = dies_after_second  # type: ignore[method-assign]
    with client:
        with pytest.raises(SystemExit):
            b.start(1)
        client.send_to_openids_text = original  # type: ignore[method-assign]
        done = b.resume(1)
    assert done.status == "done"
    assert set(fake.deliveries) == set(openids) and set(fake.deliveries.values()) == {1}
    with transaction(engine) as s:
        batches = broadcasts.batches(s, broadcast_id=done.id or 0)
    assert [bt.already_sent for bt in batches] == [False, True, False]


def test_mass_send_job_finish_is_recorded(engine: Engine) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    add_subscribers(engine, 3)
    with FakeWeChat(app_id="wx_test", app_secret="secret-test") as bare:
        settings = settings_for(bare)
        b, client = broadcaster(settings, engine)
        with client:
            record = b.start(1)
    with transaction(engine) as s:
        batch = broadcasts.batches(s, broadcast_id=record.id or 0)[0]
    assert batch.msg_id is not None
    app = create_app(settings, engine)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        system = WeChatUser(http, "o_wechat_system")
        xml = (f"<xml><ToUserName><![CDATA[gh_test]]></ToUserName>"
               f"<FromUserName><![CDATA[o_wechat_system]]></FromUserName>"
               f"<CreateTime>1700000000</CreateTime><MsgType><![CDATA[event]]></MsgType>"
               f"<Event><![CDATA[MASSSENDJOBFINISH]]></Event><MsgID>{batch.msg_id}</MsgID>"
               f"<Status><![CDATA[send success]]></Status><TotalCount>3</TotalCount>"
               f"<FilterCount>3</FilterCount><SentCount>3</SentCount><ErrorCount>0</ErrorCount>"
               f"</xml>")
        assert system.post_xml(xml).text == "success"
    with transaction(engine) as s:
        batch = broadcasts.batches(s, broadcast_id=record.id or 0)[0]
        assert (batch.job_status, batch.total_count, batch.sent_count, batch.error_count) == (
            "send success", 3, 3, 0)
        assert subscribers.get_subscriber(s, openid="o_wechat_system") is None


def test_fake_calls_back_the_webhook_with_the_job_report(engine: Engine) -> None:
    """End to end over real HTTP: the fake posts MASSSENDJOBFINISH to a running bot."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import_issue(engine, SAMPLE_ISSUE)
    openids = add_subscribers(engine, 4)

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    base = make_settings()
    app = create_app(base, engine)
    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/wechat"
        with FakeWeChat(app_id="wx_test", app_secret="secret-test", webhook_url=url,
                        webhook_token=base.wechat.token, followers=openids) as f:
            b, client = broadcaster(settings_for(f), engine)
            with client:
                record = b.start(1)
        # FakeWeChat.stop() waits for its callbacks to be delivered.
        assert f.webhook_results == [200]
    finally:
        server.shutdown()
        server.server_close()
    with transaction(engine) as s:
        batch = broadcasts.batches(s, broadcast_id=record.id or 0)[0]
        assert batch.sent_count == 4 and batch.job_status


@pytest.mark.parametrize("report_first", [False, True])
def test_job_report_racing_the_batch_confirmation_is_applied(
        engine: Engine, report_first: bool) -> None:
    """The webhook stores MASSSENDJOBFINISH while the broadcaster's confirmation is still open
    (and the other way round): whichever commits second must see the first."""
    import_issue(engine, SAMPLE_ISSUE)
    with transaction(engine) as s:
        record = broadcasts.create_broadcast(s, issue_number=1, mode="openids", text="x",
                                             tag_id=None, forced=False)
        assert record is not None and record.id is not None
        batch = broadcasts.plan_batch(s, broadcast_id=record.id, seq=1, clientmsgid="c-1",
                                      first_id=1, last_id=4)
        broadcast_id, batch_id = record.id, batch.id or 0
    msg_id = 3_000_000_123

    def confirm(s: Any) -> None:
        broadcasts.confirm_batch(s, batch_id=batch_id, broadcast_id=broadcast_id, msg_id=msg_id,
                                 msg_data_id=None, already_sent=False, recipients=4)

    def report(s: Any) -> None:
        broadcasts.record_job_finish(s, msg_id=msg_id, status="send success", total=4,
                                     filtered=4, sent=4, errors=0)

    first, second = (report, confirm) if report_first else (confirm, report)
    first_open, release = threading.Event(), threading.Event()

    def hold_first_open() -> None:
        with transaction(engine) as s:
            first(s)
            first_open.set()
            release.wait(timeout=10)

    def run_second() -> None:
        with transaction(engine) as s:
            second(s)

    holder = threading.Thread(target=hold_first_open)
    holder.start()
    assert first_open.wait(timeout=10)
    other = threading.Thread(target=run_second)
    other.start()
    other.join(timeout=0.3)  # time for the second to run its statements (or block on the lock)
    release.set()
    for t in (holder, other):
        t.join(timeout=10)
        assert not t.is_alive()
    with transaction(engine) as s:
        (stored,) = broadcasts.batches(s, broadcast_id=broadcast_id)
        assert (stored.status, stored.job_status, stored.sent_count) == (
            "sent", "send success", 4)


# --- mode "off" ----------------------------------------------------------------------------------

def test_mode_off_shows_the_new_issue_note_once_per_subscriber(
        engine: Engine) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    settings = make_settings(broadcast={"mode": "off"})
    app = create_app(settings, engine)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
        alice, bob = WeChatUser(http, "o_alice"), WeChatUser(http, "o_bob")
        first = alice.send("余额")["content"]
        assert first.startswith("🆕 新一期已发布：第1期｜")
        assert "新一期已发布" not in alice.send("余额")["content"]
        assert bob.send("帮助")["content"].startswith("🆕 新一期已发布")
        import_issue(engine, SAMPLE_DRAFT)  # next week's issue comes out
        assert alice.send("余额")["content"].startswith("🆕 新一期已发布：第2期｜")
        assert "新一期已发布" not in alice.send("帮助")["content"]


def test_broadcast_refused_in_mode_off(engine: Engine, fake: FakeWeChat) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    settings = settings_for(fake, mode="off")
    b, client = broadcaster(settings, engine)
    with client, pytest.raises(BroadcastRefused, match="off"):
        b.start(1)


# --- the weekly job and the scheduler -----------------------------------------------------------

def test_weekly_job_publishes_lowest_draft_and_broadcasts_once(
        fake: FakeWeChat, engine: Engine) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    import_issue(engine, SAMPLE_DRAFT, publish=False)
    add_subscribers(engine, 5)
    settings = settings_for(fake)
    monday = datetime(2026, 11, 30, 0, 0, tzinfo=UTC)  # 08:00 in Shanghai

    def factory() -> WeChatClient:
        return WeChatClient(settings.wechat, engine, sleep=lambda _s: None)

    outcome = run_weekly_job(settings, engine, scheduled_for=monday, messenger_factory=factory)
    assert outcome is not None and outcome.published == 2 and outcome.broadcast == 2
    # The same fire again (double fire, second process, catch-up) does nothing.
    assert run_weekly_job(settings, engine, scheduled_for=monday,
                          messenger_factory=factory) is None
    assert len(fake.mass_sends) == 1
    with transaction(engine) as s:
        current = issues.current_issue(s, default_free_percent=10)
        assert current is not None and current.number == 2
        assert broadcasts.recent_weekly_runs(s)[0].status == "done"


def test_cron_time_is_in_the_configured_timezone() -> None:
    trigger = weekly_trigger(make_settings(broadcast={"cron": "0 8 * * 1",
                                                      "timezone": "Asia/Shanghai"}))
    sunday_night = datetime(2026, 11, 29, 23, 0, tzinfo=SHANGHAI)
    fire = trigger.get_next_fire_time(None, sunday_night)
    assert fire == datetime(2026, 11, 30, 8, 0, tzinfo=SHANGHAI)
    assert fire.astimezone(UTC) == datetime(2026, 11, 30, 0, 0, tzinfo=UTC)
    assert latest_fire_time(trigger, fire + timedelta(hours=2), timedelta(hours=6)) == fire
    assert latest_fire_time(trigger, fire + timedelta(hours=7), timedelta(hours=6)) is None


def test_scheduler_fires_at_the_cron_time(engine: Engine, fake: FakeWeChat) -> None:
    """Drive the real APScheduler through Monday 08:00 Shanghai with a travelling clock."""
    time_machine = pytest.importorskip("time_machine")
    import_issue(engine, SAMPLE_ISSUE)
    import_issue(engine, SAMPLE_DRAFT, publish=False)
    add_subscribers(engine, 3)
    settings = settings_for(fake)
    ran = threading.Event()
    with time_machine.travel(datetime(2026, 11, 30, 7, 59, 58, tzinfo=SHANGHAI), tick=True):
        sched = WeeklyScheduler(
            settings, engine,
            lambda: WeChatClient(settings.wechat, engine, sleep=lambda _s: None))
        original = sched.run_for

        def run_for(scheduled: datetime) -> None:
            original(scheduled)
            ran.set()

        sched.run_for = run_for  # type: ignore[method-assign]
        sched.start()
        try:
            assert sched.next_fire_time() == datetime(2026, 11, 30, 8, 0, tzinfo=SHANGHAI)
            assert ran.wait(10), "the weekly job did not fire at 08:00"
        finally:
            sched.shutdown()
    with transaction(engine) as s:
        run = broadcasts.recent_weekly_runs(s)[0]
        assert run.scheduled_for == datetime(2026, 11, 30, 0, 0, tzinfo=UTC)
        assert run.published_issue == 2 and run.broadcast_issue == 2
    assert len(fake.mass_sends) == 1


def test_missed_run_is_caught_up_within_grace(engine: Engine, fake: FakeWeChat) -> None:
    import_issue(engine, SAMPLE_ISSUE)
    import_issue(engine, SAMPLE_DRAFT, publish=False)
    settings = settings_for(fake, mode="off", misfire_grace_s=3 * 3600)
    at_ten = datetime(2026, 11, 30, 10, 0, tzinfo=SHANGHAI)
    sched = WeeklyScheduler(settings, engine, lambda: None,  # type: ignore[arg-type,return-value]
                            now=lambda: at_ten)
    sched.catch_up()
    with transaction(engine) as s:
        current = issues.current_issue(s, default_free_percent=10, now=at_ten)
        assert current is not None and current.number == 2
    too_late = WeeklyScheduler(settings, engine, lambda: None,  # type: ignore[arg-type,return-value]
                               now=lambda: at_ten + timedelta(hours=2))
    too_late.catch_up()  # 12:00 is past the 3 h grace: nothing (and it already ran anyway)
    with transaction(engine) as s:
        assert len(broadcasts.recent_weekly_runs(s)) == 1
