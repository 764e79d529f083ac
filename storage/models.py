"""Tables. Money columns are integers in the configured token unit; times are timezone-aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import text as sql_text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC and always returns aware datetimes (SQLite would hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ts(nullable: bool = False) -> Any:
    return Column(UTCDateTime(), nullable=nullable)


class Subscriber(SQLModel, table=True):
    """A follower of the account. ``balance`` caches the sum of the ledger, updated in the same
    transaction as each entry and guarded by a CHECK so it can never go negative."""

    __table_args__ = (CheckConstraint("balance >= 0", name="ck_subscriber_balance_nonneg"),)

    id: int | None = Field(default=None, primary_key=True)
    openid: str = Field(max_length=64, unique=True, index=True)
    subscribed: bool = Field(default=True, index=True)
    balance: int = Field(default=0, sa_type=BigInteger)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    subscribed_at: datetime | None = Field(default=None, sa_column=_ts(True))
    unsubscribed_at: datetime | None = Field(default=None, sa_column=_ts(True))
    # The QR scene (``newsbot qr create``) that first brought this subscriber, if any: stats
    # attribute their payments to it. Set once, by the first follow or scan that carries one.
    scene: str | None = Field(default=None, max_length=64)


class Issue(SQLModel, table=True):
    """One weekly newsletter issue. ``body_md`` is the locked full text: only
    ``storage.issues.full_text`` hands it out, after checking the entitlement."""

    id: int | None = Field(default=None, primary_key=True)
    number: int = Field(unique=True, index=True)
    title: str = Field(max_length=200)
    summary: str = ""
    price: int = Field(ge=0)
    free_percent: int | None = None
    published_at: datetime | None = Field(default=None, sa_column=_ts(True))
    topics_json: str = Field(sa_column=Column(Text, nullable=False))
    body_md: str = Field(sa_column=Column(Text, nullable=False))
    excerpt_md: str = Field(sa_column=Column(Text, nullable=False))
    char_count: int = 0
    excerpt_char_count: int = 0
    source_sha256: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class LedgerEntry(SQLModel, table=True):
    """Append-only. Rows are never updated or deleted; mistakes are fixed by new ``adjust`` rows."""

    __tablename__ = "ledger_entry"
    __table_args__ = (
        CheckConstraint("balance_after >= 0", name="ck_ledger_balance_after_nonneg"),
        Index("ix_ledger_openid_id", "openid", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    openid: str = Field(max_length=64)
    amount: int = Field(sa_type=BigInteger)
    # topup | adjust (operator) · redeem (issue unlock) · code (a code's tokens) · pass (a pass
    # bought) · gift (a gift bought for someone else) · refund (reverses the entry refers_to)
    # · pay (tokens bought with WeChat Pay; the pay_order says which) · pay_refund (tokens taken
    # back by a WeChat Pay refund, refers_to the pay entry; positive when a refund is undone)
    kind: str = Field(max_length=16)
    issue_number: int | None = None
    idempotency_key: str = Field(max_length=128, unique=True)
    operator: str | None = Field(default=None, max_length=64)
    reason: str = ""
    balance_after: int = Field(sa_type=BigInteger)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    pass_id: str | None = Field(default=None, max_length=32)  # kind pass, gift of a pass
    code_batch_id: int | None = None  # kind code: the batch whose code credited it
    refers_to: int | None = None  # kind refund: the entry it reverses


class Entitlement(SQLModel, table=True):
    """The right to read one issue in full; at most one per (subscriber, issue)."""

    __table_args__ = (UniqueConstraint("openid", "issue_number", name="uq_entitlement"),)

    id: int | None = Field(default=None, primary_key=True)
    openid: str = Field(max_length=64, index=True)
    issue_number: int
    ledger_entry_id: int | None = None  # the redeem charge, or None for one from a code
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    code_redemption_id: int | None = None  # the code (or gift) that granted it


class CodeBatch(SQLModel, table=True):
    """One ``code create`` (or one gift): what each of its codes grants, and for how long.
    Exactly one of tokens, issue_number, pass_id is set (``kind`` says which)."""

    __tablename__ = "code_batch"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=8)  # tokens | issue | pass
    tokens: int | None = Field(default=None, sa_type=BigInteger)
    issue_number: int | None = None
    pass_id: str | None = Field(default=None, max_length=32)
    pass_days: int | None = None  # fixed when the batch is made: config may change later
    count: int
    uses: int = 1  # distinct subscribers per code
    label: str = ""
    expires_at: datetime | None = Field(default=None, sa_column=_ts(True))
    giver: str | None = Field(default=None, max_length=64, index=True)  # a gift's buyer
    gift_entry_id: int | None = None  # the giver's ledger entry that paid for the gift
    created_by: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    revoked_at: datetime | None = Field(default=None, sa_column=_ts(True))


class RedemptionCode(SQLModel, table=True):
    """A code, stored only as an HMAC of its canonical form under ``[codes] secret``: a dump
    of this table gives away no code that can still be used."""

    __tablename__ = "redemption_code"
    __table_args__ = (CheckConstraint("used >= 0 AND used <= uses", name="ck_code_uses"),)

    id: int | None = Field(default=None, primary_key=True)
    batch_id: int = Field(index=True)
    digest: str = Field(max_length=64, unique=True)
    uses: int = 1
    used: int = 0
    revoked_at: datetime | None = Field(default=None, sa_column=_ts(True))


class CodeRedemption(SQLModel, table=True):
    """One subscriber's use of one code: at most one per (code, subscriber)."""

    __tablename__ = "code_redemption"
    __table_args__ = (UniqueConstraint("code_id", "openid", name="uq_code_redemption"),)

    id: int | None = Field(default=None, primary_key=True)
    code_id: int = Field(index=True)
    batch_id: int = Field(index=True)
    openid: str = Field(max_length=64, index=True)
    ledger_entry_id: int | None = None  # kind tokens: the credit
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class CodeFailure(SQLModel, table=True):
    """A code attempt that granted nothing (typo, unknown, used up, expired, revoked): counted
    per subscriber to freeze guessing."""

    __tablename__ = "code_failure"
    __table_args__ = (Index("ix_code_failure_openid_at", "openid", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    openid: str = Field(max_length=64)
    reason: str = Field(max_length=16)
    at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class CodeFreeze(SQLModel, table=True):
    """A subscriber whose code attempts are refused until ``until``, unseen."""

    __tablename__ = "code_freeze"

    openid: str = Field(primary_key=True, max_length=64)
    since: datetime = Field(sa_column=_ts())
    until: datetime = Field(sa_column=_ts())
    failures: int = 0


class PassPeriod(SQLModel, table=True):
    """A span of time during which a subscriber reads every issue published, plus the issue
    that was current when it started (``first_issue``). A refund shortens it with ``cut_at``;
    the row itself, like the ledger, is never deleted."""

    __tablename__ = "pass_period"
    __table_args__ = (Index("ix_pass_period_openid_ends", "openid", "ends_at"),)

    id: int | None = Field(default=None, primary_key=True)
    openid: str = Field(max_length=64)
    pass_id: str = Field(max_length=32)
    days: int
    starts_at: datetime = Field(sa_column=_ts())
    ends_at: datetime = Field(sa_column=_ts())
    first_issue: int | None = None
    source: str = Field(max_length=16)  # purchase | code | gift | grant
    ledger_entry_id: int | None = None  # purchase: the debit
    code_redemption_id: int | None = None  # code | gift
    idempotency_key: str = Field(max_length=128, unique=True)
    operator: str | None = Field(default=None, max_length=64)
    reason: str = ""
    cut_at: datetime | None = Field(default=None, sa_column=_ts(True))
    refund_entry_id: int | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class InboundMessage(SQLModel, table=True):
    """Deduplication of WeChat deliveries: claimed before any side effect, finished with the
    reply, so a retry gets the very same answer and never runs the handler twice."""

    __tablename__ = "inbound_message"

    id: int | None = Field(default=None, primary_key=True)
    dedupe_key: str = Field(max_length=200, unique=True)
    openid: str = Field(max_length=64)
    status: str = Field(default="pending", max_length=16)  # pending | done
    reply_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    finished_at: datetime | None = Field(default=None, sa_column=_ts(True))


class SignedRequest(SQLModel, table=True):
    """A (timestamp, nonce) pair WeChat signed, with a hash of the message it came with. The
    plain-mode signature does not cover the body, so a captured URL could otherwise carry any
    body while its timestamp is fresh: the pair is kept for that window (then purged) and only
    ever accepted again with the same message, which is WeChat retrying."""

    __tablename__ = "signed_request"

    # The signed timestamp leads the key, so purging old pairs is a range delete on it.
    timestamp: int = Field(primary_key=True, sa_type=BigInteger)
    nonce: str = Field(primary_key=True, max_length=128)
    body_sha256: str = Field(max_length=64)


class AccessToken(SQLModel, table=True):
    """WeChat access tokens shared by every process through the database."""

    __tablename__ = "access_token"

    app_id: str = Field(primary_key=True, max_length=64)
    token: str = Field(sa_column=Column(Text, nullable=False))
    expires_at: datetime = Field(sa_column=_ts())
    fetched_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class Broadcast(SQLModel, table=True):
    """The push of one issue to subscribers; at most one per issue."""

    id: int | None = Field(default=None, primary_key=True)
    issue_number: int = Field(unique=True)
    mode: str = Field(max_length=16)  # sendall | openids
    status: str = Field(default="sending", max_length=16)  # sending | done | failed
    text: str = Field(sa_column=Column(Text, nullable=False))
    tag_id: int | None = None
    forced: bool = False
    batches_sent: int = 0
    recipients: int = 0  # openids confirmed by WeChat (openids mode)
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    started_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    finished_at: datetime | None = Field(default=None, sa_column=_ts(True))


class BroadcastBatch(SQLModel, table=True):
    """One mass-send call. Planned (status ``planned``) before the call with its exact
    subscriber-id range and clientmsgid, confirmed (``sent``) only after WeChat accepted it, so a
    resume re-sends the very same batch and WeChat's clientmsgid check stops a duplicate."""

    __tablename__ = "broadcast_batch"
    __table_args__ = (UniqueConstraint("broadcast_id", "seq", name="uq_batch_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    broadcast_id: int = Field(index=True)
    seq: int
    clientmsgid: str = Field(max_length=64, unique=True)
    first_subscriber_id: int | None = None
    last_subscriber_id: int | None = None
    recipients: int = 0
    status: str = Field(default="planned", max_length=16)  # planned | sent
    # WeChat's ids outgrow 32 bits.
    msg_id: int | None = Field(default=None, index=True, sa_type=BigInteger)
    msg_data_id: int | None = Field(default=None, sa_type=BigInteger)
    already_sent: bool = False
    sent_at: datetime | None = Field(default=None, sa_column=_ts(True))
    # From the MASSSENDJOBFINISH event:
    job_status: str | None = Field(default=None, max_length=64)
    total_count: int | None = None
    filter_count: int | None = None
    sent_count: int | None = None
    error_count: int | None = None
    finished_at: datetime | None = Field(default=None, sa_column=_ts(True))


class IssueNotice(SQLModel, table=True):
    """A subscriber was told that issue N is out (broadcast mode "off")."""

    __tablename__ = "issue_notice"
    __table_args__ = (UniqueConstraint("openid", "issue_number", name="uq_issue_notice"),)

    id: int | None = Field(default=None, primary_key=True)
    openid: str = Field(max_length=64)
    issue_number: int
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class WeeklyRun(SQLModel, table=True):
    """One row per scheduled fire time: whoever inserts it runs the weekly job, so a double
    fire, a catch-up after downtime or many processes still run it once."""

    __tablename__ = "weekly_run"

    id: int | None = Field(default=None, primary_key=True)
    scheduled_for: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, unique=True))
    runner: str = Field(max_length=128)
    status: str = Field(default="running", max_length=16)  # running | done | failed
    published_issue: int | None = None
    broadcast_issue: int | None = None
    note: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    started_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    finished_at: datetime | None = Field(default=None, sa_column=_ts(True))


class MassJobReport(SQLModel, table=True):
    """WeChat's MASSSENDJOBFINISH report, kept by msg_id: it may arrive before the batch that
    sent it has been recorded, so it is stored on its own and joined when either side lands."""

    __tablename__ = "mass_job_report"

    id: int | None = Field(default=None, primary_key=True)
    msg_id: int = Field(unique=True, sa_type=BigInteger)
    status: str = Field(max_length=64)
    total_count: int | None = None
    filter_count: int | None = None
    sent_count: int | None = None
    error_count: int | None = None
    received_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class PayOrder(SQLModel, table=True):
    """One WeChat Pay order (a top-up, or a top-up that also unlocks ``issue_number``).

    The row is written (status ``creating``) before WeChat is called, with the exact request
    body, so a retry resends the same bytes and an order whose create call timed out can still
    be queried and settled. ``status`` moves creating → pending → paid (or closed / failed);
    ``paid`` is claimed by one conditional UPDATE, which is what makes the credit happen once.
    A full refund marks it ``refunded``; each refund is a ``pay_refund`` row."""

    __tablename__ = "pay_order"
    __table_args__ = (
        CheckConstraint("amount_fen > 0 AND tokens > 0", name="ck_pay_order_positive"),
        Index("ix_pay_order_status_created", "status", "created_at"),
    )

    out_trade_no: str = Field(primary_key=True, max_length=32)
    openid: str = Field(max_length=64, index=True)
    package_id: str = Field(max_length=32)
    tokens: int = Field(sa_type=BigInteger)
    amount_fen: int = Field(sa_type=BigInteger)
    issue_number: int | None = None  # buy-and-unlock: the issue to unlock once paid
    kind: str = Field(max_length=8)  # jsapi | native
    status: str = Field(default="creating", max_length=16)
    mch_id: str = Field(max_length=32)
    app_id: str = Field(max_length=64)
    description: str = Field(max_length=127)
    request_json: str = Field(sa_column=Column(Text, nullable=False))
    prepay_id: str | None = Field(default=None, max_length=64)
    code_url: str | None = Field(default=None, max_length=256)
    transaction_id: str | None = Field(default=None, max_length=64)
    payer_openid: str | None = Field(default=None, max_length=128)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    expires_at: datetime = Field(sa_column=_ts())
    paid_at: datetime | None = Field(default=None, sa_column=_ts(True))
    closed_at: datetime | None = Field(default=None, sa_column=_ts(True))
    last_query_at: datetime | None = Field(default=None, sa_column=_ts(True))
    credit_entry_id: int | None = None  # the kind "pay" ledger entry
    unlock_entry_id: int | None = None  # buy-and-unlock: the redeem entry
    unlock_note: str | None = Field(default=None, max_length=16)  # why no unlock, if none
    refunded_fen: int = Field(default=0, sa_type=BigInteger)  # refunds requested so far
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class PayRefund(SQLModel, table=True):
    """One refund of a pay_order. Written, together with the debit of its tokens, before
    WeChat is asked, so a retry reuses ``out_refund_no`` and the books never show money
    returned without its tokens taken back."""

    __tablename__ = "pay_refund"
    __table_args__ = (CheckConstraint("amount_fen > 0 AND tokens >= 0",
                                      name="ck_pay_refund_amounts"),)

    out_refund_no: str = Field(primary_key=True, max_length=64)
    out_trade_no: str = Field(max_length=32, index=True)
    amount_fen: int = Field(sa_type=BigInteger)
    tokens: int = Field(sa_type=BigInteger)  # debited with this refund
    status: str = Field(default="requested", max_length=16)  # requested | processing |
    # success | abnormal | closed | refused (WeChat said no: the debit was given back)
    debit_entry_id: int | None = None
    reason: str = Field(max_length=80)
    forced: bool = False
    operator: str | None = Field(default=None, max_length=64)
    refund_id: str | None = Field(default=None, max_length=64)
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    finished_at: datetime | None = Field(default=None, sa_column=_ts(True))


# A 64-bit id that is still SQLite's rowid (a BIGINT primary key would not autoincrement there).
_BIG_ID = BigInteger().with_variant(Integer(), "sqlite")


# The kinds ix_event_rare_kind_at covers: storage.events.KINDS less card, excerpt and full
# (tests/test_stats.py checks the two agree). A literal, for the index and the queries alike.
EVENT_RARE_KINDS = ("code", "follow", "inbox", "pass", "scan", "topup", "unfollow", "unlock")
EVENT_RARE_KINDS_SQL = "kind IN ({})".format(", ".join(f"'{k}'" for k in EVENT_RARE_KINDS))


class Event(SQLModel, table=True):
    """One thing a subscriber did, for ``newsbot stats`` and the console: a narrow row written
    by the path that did it (same transaction, or on the webhook's fast path the same
    statement as the delivery's claim). Kept for stats when the deliveries are purged.

    ``kind`` is one of storage.events.KINDS; ``detail`` qualifies it (how an issue was
    unlocked, where a top-up came from, the QR scene of a follow or scan, an inbox message's
    kind); ``amount`` is the tokens involved, when any."""

    __tablename__ = "event"
    __table_args__ = (
        Index("ix_event_at", "at"),
        # Every kind but the bulk (card, excerpt, full: the webhook's fast path writes cards),
        # for the stats' weekly figures and scenes; those rows pay nothing for it. Queries must
        # repeat this exact predicate (storage.stats._rare()) for SQLite to use it.
        Index("ix_event_rare_kind_at", "kind", "at",
              sqlite_where=sql_text(EVENT_RARE_KINDS_SQL),
              postgresql_where=sql_text(EVENT_RARE_KINDS_SQL)),
    )

    id: int | None = Field(default=None, sa_column=Column(_BIG_ID, primary_key=True))
    at: datetime = Field(sa_column=_ts())
    kind: str = Field(max_length=12)
    openid: str = Field(max_length=64)
    issue_number: int | None = None
    detail: str | None = Field(default=None, max_length=64)
    amount: int | None = Field(default=None, sa_type=BigInteger)


class InboxMessage(SQLModel, table=True):
    """Free text a subscriber sent that no command took (or an explicit 人工), kept for the
    operators for ``[inbox] keep_days``. ``answered_at`` is set by the first reply sent."""

    __tablename__ = "inbox_message"
    __table_args__ = (Index("ix_inbox_message_openid_id", "openid", "id"),
                      Index("ix_inbox_message_at", "at"))

    id: int | None = Field(default=None, primary_key=True)
    openid: str = Field(max_length=64)
    at: datetime = Field(sa_column=_ts())
    kind: str = Field(default="text", max_length=8)  # text | human (asked for a person)
    text: str = Field(sa_column=Column(Text, nullable=False))
    dedupe_key: str = Field(max_length=200, unique=True)  # the delivery: stored once
    read_at: datetime | None = Field(default=None, sa_column=_ts(True))
    answered_at: datetime | None = Field(default=None, sa_column=_ts(True))


class InboxReply(SQLModel, table=True):
    """An operator's answer, sent as a customer-service message, stored beside the question
    it answers (``message_id``: the subscriber's latest message when it was sent)."""

    __tablename__ = "inbox_reply"

    id: int | None = Field(default=None, primary_key=True)
    openid: str = Field(max_length=64, index=True)
    message_id: int | None = Field(default=None, index=True)
    text: str = Field(sa_column=Column(Text, nullable=False))
    operator: str = Field(max_length=64)
    at: datetime = Field(sa_column=_ts())
    status: str = Field(max_length=16)  # sent | refused (never sent: why is in error)
    error: str | None = Field(default=None, max_length=200)


class InboxNotice(SQLModel, table=True):
    """One chat notice to the operators about new inbox messages. ``slot`` is the previous
    notice's slot + 1 and unique, so of many schedulers racing for the next notice one wins
    (a slot from the clock would let two on either side of a boundary both send)."""

    __tablename__ = "inbox_notice"

    id: int | None = Field(default=None, primary_key=True)
    slot: int = Field(unique=True, sa_type=BigInteger)
    sent_at: datetime = Field(sa_column=_ts())
    count: int = 0
    last_message_id: int = 0  # messages after this one are new for the next notice


class QrCode(SQLModel, table=True):
    """A parametric QR code made by ``newsbot qr create``: follows and scans carrying its
    scene are attributed to it."""

    __tablename__ = "qr_code"

    id: int | None = Field(default=None, primary_key=True)
    scene: str = Field(max_length=64, index=True)
    permanent: bool = False
    expires_at: datetime | None = Field(default=None, sa_column=_ts(True))
    ticket: str = Field(max_length=200)
    url: str = Field(max_length=200)
    created_by: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class ConsoleSession(SQLModel, table=True):
    """An operator's console session, started by opening a signed link once (``grant_nonce`` is
    that link's nonce, unique: a link starts one session). Only a hash of the cookie is
    stored, so a dump of this table lets no one in."""

    __tablename__ = "console_session"

    token_sha256: str = Field(primary_key=True, max_length=64)
    grant_nonce: str = Field(max_length=64, unique=True)
    openid: str = Field(max_length=64)
    csrf: str = Field(max_length=64)
    created_at: datetime = Field(sa_column=_ts())
    expires_at: datetime = Field(sa_column=_ts())
    ended_at: datetime | None = Field(default=None, sa_column=_ts(True))


class OperatorAction(SQLModel, table=True):
    """The audit trail of the console: every state-changing action, refused ones too."""

    __tablename__ = "operator_action"
    __table_args__ = (Index("ix_operator_action_at", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(sa_column=_ts())
    operator: str = Field(max_length=64)
    action: str = Field(max_length=40)
    target: str = Field(default="", max_length=128)
    result: str = Field(max_length=16)  # ok | refused | error
    detail: str = Field(default="", sa_column=Column(Text, nullable=False))


class IssueReader(SQLModel, table=True):
    """A distinct (issue, funnel kind, reader) seen in ``event``, folded in by
    storage.stats.roll_up so the funnel's distinct counts are COUNT(*) here plus the tail."""

    __tablename__ = "issue_reader"

    issue_number: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    kind: str = Field(primary_key=True, max_length=12)
    openid: str = Field(primary_key=True, max_length=64)


class WeekReader(SQLModel, table=True):
    """A distinct (week, reader) with any event; ``week`` counts weeks from Monday 1970-01-05
    in ``stats_rollup.timezone`` (storage.stats). Rebuilt when that timezone changes."""

    __tablename__ = "week_reader"

    week: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    openid: str = Field(primary_key=True, max_length=64)


class StatsRollup(SQLModel, table=True):
    """How far storage.stats.roll_up has folded ``event`` into issue_reader and week_reader."""

    __tablename__ = "stats_rollup"

    name: str = Field(primary_key=True, max_length=16)
    last_event_id: int = Field(default=0, sa_type=BigInteger)
    timezone: str = Field(max_length=64)
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
