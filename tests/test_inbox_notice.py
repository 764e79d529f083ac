"""The operators' chat notice of new inbox messages (issue 10 §3): at most once per
``notify_every_minutes``, only when something new came in, counted since the last notice, sent
once however many schedulers run it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from bot.jobs.inbox_notice import InboxNoticeJob
from bot.jobs.scheduler import INBOX_NOTICE_JOB_ID, WeeklyScheduler
from bot.settings import Settings
from bot.wechat.api import WeChatClient
from bot.wechat.fake import FakeWeChat
from storage import mailbox
from storage.db import create_schema, make_engine, transaction
from storage.models import InboxNotice
from tests.conftest import TOKEN, WeChatUser, make_settings

EDITOR = "o_operator_0001"
SECOND = "o_operator_0002"
CUSTOM_SEND = "/cgi-bin/message/custom/send"
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def fake() -> Iterator[FakeWeChat]:
    with FakeWeChat(app_id="wx_n", app_secret="n-secret", followers=[EDITOR, SECOND]) as f:
        yield f


@pytest.fixture
def settings(fake: FakeWeChat) -> Settings:
    return make_settings(operators={"openids": [EDITOR, SECOND]},
                         inbox={"notify_every_minutes": 30},
                         wechat={"token": TOKEN, "app_id": "wx_n", "app_secret": "n-secret",
                                 "api_base": fake.base_url})


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def job(settings: Settings, engine: Engine, clock: Clock) -> InboxNoticeJob:
    return InboxNoticeJob(settings, engine,
                          lambda: WeChatClient(settings.wechat, engine, sleep=lambda _s: None),
                          now=clock)


def leave(engine: Engine, n: int, *, kind: mailbox.Kind = "text", at: datetime = T0) -> None:
    with transaction(engine) as s:
        for i in range(n):
            mailbox.store(s, openid=f"o_r{i}", text=f"问题 {i}", kind=kind,
                          key=f"k:{kind}:{at.isoformat()}:{i}", at=at, max_chars=100)


def test_new_messages_from_the_chat_are_told_once(
        job: InboxNoticeJob, fake: FakeWeChat, user: WeChatUser, clock: Clock) -> None:
    user.send("请问支持开发票吗？")
    user.send("人工")
    clock.now = datetime.now(UTC)
    run = job.run()
    assert run is not None and run.reached == (EDITOR, SECOND)
    [(to1, text), (to2, same)] = fake.custom_messages
    assert (to1, to2) == (EDITOR, SECOND) and text == same
    assert text.startswith("📬 有 2 条新留言（其中 1 条请求人工）。")
    assert "最新一条：「人工」" in text and "#console" in text and "newsbot inbox" in text
    assert job.run() is None and len(fake.custom_messages) == 2  # nothing new


def test_at_most_once_per_interval_counting_what_is_new(
        job: InboxNoticeJob, fake: FakeWeChat, engine: Engine, clock: Clock) -> None:
    assert job.run() is None  # nothing at all
    leave(engine, 3)
    with transaction(engine) as s:
        assert mailbox.new_since_notice(s) == 3
    assert job.run() is not None and "有 3 条新留言。" in fake.custom_messages[-1][1]
    clock.now = T0 + timedelta(minutes=10)
    leave(engine, 2, at=clock.now)
    with transaction(engine) as s:
        assert (mailbox.new_since_notice(s), mailbox.unread_count(s)) == (2, 5)
    assert job.run() is None  # too soon: 10 of 30 minutes
    clock.now = T0 + timedelta(minutes=30)
    run = job.run()
    assert run is not None and (run.notice.count, run.notice.unread) == (2, 5)
    assert fake.custom_messages[-1][1].startswith("📬 有 2 条新留言，未读共 5 条。")
    clock.now = T0 + timedelta(hours=5)
    assert job.run() is None  # time enough, but nothing new
    assert len(fake.custom_messages) == 4


def test_an_unreachable_operator_does_not_stop_the_other(
        job: InboxNoticeJob, fake: FakeWeChat, engine: Engine,
        caplog: pytest.LogCaptureFixture) -> None:
    leave(engine, 1)
    fake.fail_next(45015, path=CUSTOM_SEND)  # the first operator has not written in 48 h
    run = job.run()
    assert run is not None and run.reached == (SECOND,) and run.failed == (EDITOR,)
    assert "send the account any message" in caplog.text
    assert job.run() is None  # the notice stands: no retry every minute


def test_wechat_unreachable_gives_the_notice_back(
        job: InboxNoticeJob, fake: FakeWeChat, engine: Engine) -> None:
    leave(engine, 1)
    fake.http_error_next(503, times=2, path=CUSTOM_SEND)
    run = job.run()
    assert run is not None and run.reached == ()
    with transaction(engine) as s:
        assert s.exec(select(InboxNotice)).all() == []
    again = job.run()  # the next minute
    assert again is not None and again.reached == (EDITOR, SECOND)


def test_the_scheduler_runs_it_every_minute(settings: Settings, engine: Engine) -> None:
    sched = WeeklyScheduler(settings, engine, lambda: None)  # type: ignore[arg-type,return-value]
    job = sched.scheduler.get_job(INBOX_NOTICE_JOB_ID)
    assert job is not None and job.trigger.interval == timedelta(minutes=1)
    quiet = WeeklyScheduler(make_settings(operators={"openids": []}), engine,
                            lambda: None)  # type: ignore[arg-type,return-value]
    assert quiet.scheduler.get_job(INBOX_NOTICE_JOB_ID) is None


def test_two_schedulers_deciding_at_once_send_one_notice(postgres_url: str) -> None:
    """On PostgreSQL two claims can read the same last notice; the slot they then insert is
    the same (last + 1), so the second waits on the unique key and gets nothing, even across
    a clock boundary (T0 + 29:59 and T0 + 30:00 here)."""
    engine = make_engine(postgres_url)
    create_schema(engine)
    try:
        leave(engine, 2)
        with transaction(engine) as s:
            s.add(InboxNotice(slot=7, sent_at=T0 - timedelta(hours=1), count=1,
                              last_message_id=0))
        every = timedelta(minutes=30)
        first = Session(engine)
        got_first = mailbox.claim_notice(first, now=T0 + timedelta(seconds=1799), every=every)
        assert got_first is not None
        result: list[mailbox.Notice | None] = []

        def second() -> None:
            with transaction(engine) as s:
                result.append(mailbox.claim_notice(s, now=T0 + timedelta(minutes=30),
                                                   every=every))

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # waiting on the unique slot
        first.commit()
        first.close()
        thread.join(10)
        assert result == [None]
        with transaction(engine) as s:
            assert [n.slot for n in s.exec(select(InboxNotice).order_by(InboxNotice.slot))] \
                == [7, 8]
    finally:
        engine.dispose()
