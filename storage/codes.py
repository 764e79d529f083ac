"""Redemption codes (兑换码): making batches, and redeeming a code exactly once per subscriber.

A code is 15 random symbols of ``ALPHABET`` (31**15 ≈ 2**74) and one check symbol, shown as
``XXXX-XXXX-XXXX-XXXX``. The check symbol is the sum of the symbols' values weighted 1..15,
mod 31: as 31 is prime and every weight (and every distance between two weights, and the
check's own place) is below it, any single wrong symbol and any swap of two symbols changes
the sum, so a mistyped code is told apart from a wrong one without a look-up.

Only an HMAC of the canonical code under ``[codes] secret`` is stored: a dump of the database
gives away no code that can still be used.

Redeeming takes the subscriber's row lock, then claims one use with a conditional UPDATE
(``used < uses``) and records the subscriber's use under a unique (code, subscriber) key,
together with the grant itself (one statement for a tokens code on PostgreSQL, else one
savepoint), so a code is never used more than its uses, never twice by one subscriber, and
never used without its grant. Every failed attempt is a row of its own,
counted per subscriber; too many in the window freeze that subscriber's attempts, and a frozen
subscriber's text is not even looked at, so a real code sent meanwhile stays unused.
"""

from __future__ import annotations

import hmac
import re
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    Table,
    bindparam,
    case,
    exists,
    false,
    func,
    insert,
    literal,
    or_,
    true,
)
from sqlalchemy import select as sa_select
from sqlalchemy import update as sa_update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import configure_mappers
from sqlalchemy.orm.instrumentation import manager_of_class
from sqlmodel import Session, col, select

from storage import events, ledger, passes
from storage.coverage import covered_clause
from storage.errors import DomainError, IdempotencyConflict, UnknownSubscriber
from storage.models import (
    CodeBatch,
    CodeFailure,
    CodeFreeze,
    CodeRedemption,
    Entitlement,
    Event,
    Issue,
    LedgerEntry,
    PassPeriod,
    RedemptionCode,
    Subscriber,
    utcnow,
)

ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"  # 31 symbols, no 0/O/1/I/L; 31 is prime
BASE = len(ALPHABET)
RANDOM_SYMBOLS = 15
CODE_LENGTH = RANDOM_SYMBOLS + 1
_VALUE = {ch: i for i, ch in enumerate(ALPHABET)}
# What people type between groups: spaces and every dash a phone keyboard offers.
SEPARATORS = " \t\u3000-‐‑‒–—―ー_"
_STRIP = str.maketrans("", "", SEPARATORS)
_SHAPE = re.compile(f"[{ALPHABET}]{{{CODE_LENGTH}}}")
# A batch larger than this is a typo (or a disk filled for nothing): make several.
MAX_COUNT = 1_000_000

BatchKind = Literal["tokens", "issue", "pass"]
Status = Literal["granted", "already_owned", "own_gift", "typo", "malformed", "unknown",
                 "used_up", "already_used", "expired", "revoked", "frozen", "disabled"]
# Refusals that count towards the freeze (own_gift and already_owned are no guesses).
FAILURES: frozenset[str] = frozenset(
    {"typo", "malformed", "unknown", "used_up", "already_used", "expired", "revoked"})

_BATCH: Table = CodeBatch.__table__  # type: ignore[attr-defined]
_CODE: Table = RedemptionCode.__table__  # type: ignore[attr-defined]
_USE: Table = CodeRedemption.__table__  # type: ignore[attr-defined]
_FAILURE: Table = CodeFailure.__table__  # type: ignore[attr-defined]
_FREEZE: Table = CodeFreeze.__table__  # type: ignore[attr-defined]
_ENT: Table = Entitlement.__table__  # type: ignore[attr-defined]
_SUB: Table = Subscriber.__table__  # type: ignore[attr-defined]
_ENTRY: Table = LedgerEntry.__table__  # type: ignore[attr-defined]
_EVENT: Table = Event.__table__  # type: ignore[attr-defined]


class InvalidBatch(DomainError):
    """``create_batch`` refused its arguments; ``field`` names the one at fault."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


# --------------------------------------------------------------------------- the code itself


def _check_symbol(body: str) -> str:
    return ALPHABET[sum(w * _VALUE[ch] for w, ch in enumerate(body, start=1)) % BASE]


def canonical(text: str) -> str | None:
    """The code in ``text`` as stored-and-hashed: full-width to ASCII, spaces and dashes
    removed, upper case. None when that is not 16 symbols of ``ALPHABET``."""
    code = unicodedata.normalize("NFKC", text).translate(_STRIP).upper()
    return code if _SHAPE.fullmatch(code) else None


def check_ok(code: str) -> bool:
    """Whether a canonical code's last symbol is its check symbol (False: a typo)."""
    return _check_symbol(code[:RANDOM_SYMBOLS]) == code[RANDOM_SYMBOLS]


def display(code: str) -> str:
    """XXXX-XXXX-XXXX-XXXX."""
    return f"{code[:4]}-{code[4:8]}-{code[8:12]}-{code[12:]}"


def digest(secret: bytes, code: str) -> str:
    """HMAC-SHA256 (hex) of the canonical code: the only form of a code that is stored."""
    return hmac.digest(secret, code.encode("ascii"), "sha256").hex()


# Codes are made three symbols at a time (a batch of 100,000 is 1.5 million symbols): entry i
# of these tables is the number i < 31**3 as three symbols, and its share of the check sum at
# each of the five places a group of three takes (weights 1-3, 4-6, … 13-15).
_CHUNK = BASE ** 3
_TRIPLES = [a + b + c for a in ALPHABET for b in ALPHABET for c in ALPHABET]
_SHARES = [[sum((offset + i + 1) * _VALUE[ch] for i, ch in enumerate(t)) for t in _TRIPLES]
           for offset in (0, 3, 6, 9, 12)]
_RANGE = BASE ** RANDOM_SYMBOLS
# 80 random bits below the largest multiple of 31**15 under 2**80, reduced mod 31**15, are a
# uniform number below 31**15 (99.6 % of draws are kept).
_DRAW_BYTES = 10
_ACCEPT = (2 ** (8 * _DRAW_BYTES) // _RANGE) * _RANGE


def _from_number(n: int) -> str:
    """The code whose 15 random symbols spell ``n`` (below 31**15) in base 31: each symbol
    uniform and independent when ``n`` is, as fifteen ``secrets.choice(ALPHABET)`` would be."""
    n, a = divmod(n, _CHUNK)
    n, b = divmod(n, _CHUNK)
    n, c = divmod(n, _CHUNK)
    e, d = divmod(n, _CHUNK)
    s1, s2, s3, s4, s5 = _SHARES
    t = _TRIPLES
    return (t[a] + t[b] + t[c] + t[d] + t[e]
            + ALPHABET[(s1[a] + s2[b] + s3[c] + s4[d] + s5[e]) % BASE])


def new_code() -> str:
    """A fresh random canonical code (74 random bits and the check symbol)."""
    return _from_number(secrets.randbelow(_RANGE))


def new_codes(count: int) -> list[str]:
    """``count`` distinct fresh codes, the random bytes drawn in bulk."""
    found: set[str] = set()
    while len(found) < count:
        need = count - len(found)
        pool = secrets.token_bytes(_DRAW_BYTES * (need + need // 100 + 8))
        for i in range(0, len(pool), _DRAW_BYTES):
            n = int.from_bytes(pool[i:i + _DRAW_BYTES], "big")
            if n < _ACCEPT:
                found.add(_from_number(n % _RANGE))
                if len(found) == count:
                    break
    return list(found)


def derived_code(secret: bytes, label: str) -> str:
    """A canonical code computed from ``secret`` and ``label`` (a gift's ledger key), so the
    same label always gives the same code back (see storage.gifts for the trade-off)."""
    n = int.from_bytes(hmac.digest(secret, label.encode("utf-8"), "sha256"), "big")
    return _from_number(n % _RANGE)  # 256 bits reduced mod about 2**74: no visible bias


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class NewBatch:
    batch: CodeBatch
    codes: list[str]  # display form, shown once: only their digests are kept


def _validate(*, kind: str, count: int, uses: int, tokens: int | None,
              issue_number: int | None, pass_id: str | None, pass_days: int | None,
              expires_at: datetime | None, now: datetime) -> None:
    if not 1 <= count <= MAX_COUNT:
        raise InvalidBatch(f"count must be between 1 and {MAX_COUNT:,}, got {count:,}",
                           field="count")
    if uses < 1:
        raise InvalidBatch(f"uses must be at least 1, got {uses}", field="uses")
    given = {"tokens": tokens, "issue": issue_number, "pass": pass_id}
    if kind not in given:
        raise InvalidBatch(f"unknown batch kind {kind!r}", field="kind")
    extra = [k for k, v in given.items() if v is not None and k != kind]
    if given[kind] is None or extra:
        raise InvalidBatch(f"a {kind} batch grants exactly one thing", field="kind")
    if kind == "tokens" and (tokens is None or not 1 <= tokens <= ledger.MAX_ABS_AMOUNT):
        raise InvalidBatch(f"tokens must be a positive whole number, got {tokens}",
                           field="tokens")
    if kind == "pass" and (pass_days is None or pass_days < 1):
        raise InvalidBatch(f"a pass batch needs its days (>= 1), got {pass_days}",
                           field="pass_days")
    if expires_at is not None and expires_at <= now:
        raise InvalidBatch(f"the expiry {expires_at.isoformat()} is in the past",
                           field="expires_at")


def create_batch(
    session: Session,
    *,
    secret: bytes,
    kind: BatchKind,
    count: int,
    uses: int = 1,
    tokens: int | None = None,
    issue_number: int | None = None,
    pass_id: str | None = None,
    pass_days: int | None = None,
    expires_at: datetime | None = None,
    label: str = "",
    giver: str | None = None,
    gift_entry_id: int | None = None,
    created_by: str | None = None,
    now: datetime | None = None,
    codes: list[str] | None = None,
) -> NewBatch:
    """One batch of ``count`` new codes, each usable by ``uses`` different subscribers.

    Raises InvalidBatch (nothing written) for a bad count, uses, grant or expiry, and for an
    issue that does not exist. ``codes`` (canonical, for gifts) replaces the random ones.
    The codes go in with one executemany, so 100,000 take about a second."""
    now = now or utcnow()
    if not secret:
        raise InvalidBatch("codes are off: set [codes] secret", field="secret")
    _validate(kind=kind, count=count, uses=uses, tokens=tokens, issue_number=issue_number,
              pass_id=pass_id, pass_days=pass_days, expires_at=expires_at, now=now)
    if kind == "issue" and session.connection().execute(
            sa_select(Issue.__table__.c.id)  # type: ignore[attr-defined]
            .where(Issue.__table__.c.number == issue_number)).first() is None:  # type: ignore[attr-defined]
        raise InvalidBatch(f"there is no issue {issue_number}", field="issue_number")
    if codes is None:
        codes = new_codes(count)
    elif len(codes) != count or len(set(codes)) != count:
        raise InvalidBatch("codes must be count distinct codes", field="codes")
    batch = CodeBatch(kind=kind, tokens=tokens, issue_number=issue_number, pass_id=pass_id,
                      pass_days=pass_days if kind == "pass" else None, count=count, uses=uses,
                      label=label, expires_at=expires_at, giver=giver,
                      gift_entry_id=gift_entry_id, created_by=created_by, created_at=now)
    with session.begin_nested():  # a clash of digests (never seen) leaves no half batch
        session.add(batch)
        session.flush()
        assert batch.id is not None
        _insert_codes(session, batch.id, uses, sorted(digest(secret, c) for c in codes))
    return NewBatch(batch, [display(c) for c in codes])


def _insert_codes(session: Session, batch_id: int, uses: int, digests: list[str]) -> None:
    """Bulk insert, in digest order so the unique index grows at its end instead of all over:
    COPY on PostgreSQL, one executemany on SQLite's driver (Core would process each row's
    parameters again). 100,000 codes take a few seconds either way."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        cursor: Any = conn.connection.cursor()  # psycopg's, in this very transaction
        with cursor.copy("COPY redemption_code (batch_id, digest, uses, used) FROM STDIN") as copy:
            for d in digests:
                copy.write_row((batch_id, d, uses, 0))
        return
    conn.exec_driver_sql(
        "INSERT INTO redemption_code (batch_id, digest, uses, used) VALUES (?, ?, ?, 0)",
        [(batch_id, d, uses) for d in digests])


# --------------------------------------------------------------------------- redeeming


@dataclass(frozen=True)
class CodeOutcome:
    status: Status
    balance: int
    batch: CodeBatch | None = None
    tokens: int | None = None  # granted
    issue_number: int | None = None  # granted, or already owned
    period: PassPeriod | None = None  # granted
    frozen_until: datetime | None = None  # frozen, or frozen by this very failure
    failures_left: int | None = None  # failures: attempts left before the freeze


@dataclass(frozen=True)
class _Found:
    code_id: int
    used: int
    uses: int
    revoked_at: datetime | None
    used_by_me: bool
    batch: CodeBatch


@dataclass(frozen=True)
class _State:
    """Everything a redemption decides on, read in one statement under the row lock."""

    balance: int
    frozen_until: datetime | None
    key_used: bool  # the delivery's key is on a ledger entry already
    found: _Found | None  # None: no code with this digest
    readable: bool  # an issue code: the subscriber may read its issue already


# Bind parameters of the statements below, which are built once: a call only binds values.
_P_OPENID = bindparam("p_openid", type_=String())
_P_DIGEST = bindparam("p_digest", type_=String())
_P_KEY = bindparam("p_key", type_=String())
_P_NOW = bindparam("p_now", type_=_FREEZE.c.until.type)
_P_CODE = bindparam("p_code", type_=Integer())
_P_BATCH = bindparam("p_batch", type_=Integer())
_P_TOKENS = bindparam("p_tokens", type_=BigInteger())
_P_REASON = bindparam("p_reason", type_=String())

_BATCH_COLUMNS = [c.label(f"b_{c.name}") for c in _BATCH.c]
_MINE = exists().where(_USE.c.code_id == _CODE.c.id, _USE.c.openid == _P_OPENID)
_READABLE = case(
    (_BATCH.c.kind == "issue",
     exists().where(_ENT.c.openid == _P_OPENID, _ENT.c.issue_number == _BATCH.c.issue_number)
     | covered_clause(_P_OPENID, _BATCH.c.issue_number)),
    else_=false())
_NEW_BATCH = manager_of_class(CodeBatch).new_instance


def _batch_from(row: Any) -> CodeBatch:
    """The batch from the read's b_* columns, as a transient CodeBatch. Filled in the way the
    ORM fills a loaded object (CodeBatch(**values) costs twenty times as much: it validates)."""
    configure_mappers()  # as a query or CodeBatch() would: until then attributes have no impl
    batch: CodeBatch = _NEW_BATCH()
    batch.__dict__.update({c.name: row[f"b_{c.name}"] for c in _BATCH.c})
    return batch


# The subscriber's row FOR UPDATE (PostgreSQL; SQLite's writers run one at a time), the
# freeze, whether the key is taken, and the code with its batch, whether this subscriber used
# it and, for an issue code, whether they may read the issue already. No code matches the
# digest "" (a malformed or mistyped code).
_READ = (
    sa_select(_SUB.c.balance,
              sa_select(_FREEZE.c.until).where(_FREEZE.c.openid == _P_OPENID)
              .scalar_subquery().label("frozen_until"),
              exists().where(_ENTRY.c.idempotency_key == _P_KEY).label("key_used"),
              _CODE.c.id.label("code_id"), _CODE.c.used, _CODE.c.uses,
              _CODE.c.revoked_at.label("code_revoked_at"), _MINE.label("mine"),
              _READABLE.label("readable"), *_BATCH_COLUMNS)
    .select_from(_SUB.outerjoin(_CODE, _CODE.c.digest == _P_DIGEST)
                 .outerjoin(_BATCH, _BATCH.c.id == _CODE.c.batch_id))
    .where(_SUB.c.openid == _P_OPENID)
    .with_for_update(of=_SUB)
)


def _read(session: Session, params: dict[str, Any]) -> _State:
    """One round trip, taking the subscriber's row lock until COMMIT (the lock redeem and pass
    grants take too: one reader's unlocks, codes and passes are decided one after another).

    On PostgreSQL, when the lock had to be waited for, everything but the subscriber's own row
    is as it was when the statement started, before the transaction we waited for committed;
    a read made once the lock is held sees it all."""
    row = session.connection().execute(_READ, params).first()
    if row is None:
        raise UnknownSubscriber(params["p_openid"])
    found = None
    if row.code_id is not None:
        batch = _batch_from(row._mapping)
        found = _Found(int(row.code_id), int(row.used), int(row.uses), row.code_revoked_at,
                       bool(row.mine), batch)
    return _State(int(row.balance), row.frozen_until, bool(row.key_used), found,
                  bool(row.readable))


# PostgreSQL, a tokens code: claim the use, write the credit entry, record the use and move the
# balance in ONE statement. The claim goes first: its conditions re-check, on the current
# rows, everything the read decided on that another transaction may have changed since (the
# code used up or revoked by other subscribers; the freeze, the subscriber's own use and the
# key, committed by the transaction whose lock we waited for), so a lost race writes nothing
# and returns no row. The other writes hang off the claim's RETURNING row; their ON CONFLICT
# DO NOTHING can only fire for a row still in flight that the claim could not see (a key
# another subscriber is writing), and the caller refuses to go on without all four.
_PG_CLAIM = (
    sa_update(_CODE)
    .where(_CODE.c.id == _P_CODE, _CODE.c.used < _CODE.c.uses, _CODE.c.revoked_at.is_(None),
           exists().where(_BATCH.c.id == _P_BATCH, _BATCH.c.revoked_at.is_(None),
                          or_(_BATCH.c.expires_at.is_(None), _BATCH.c.expires_at > _P_NOW)),
           ~exists().where(_USE.c.code_id == _P_CODE, _USE.c.openid == _P_OPENID),
           ~exists().where(_ENTRY.c.idempotency_key == _P_KEY),
           ~exists().where(_FREEZE.c.openid == _P_OPENID, _FREEZE.c.until > _P_NOW))
    .values(used=_CODE.c.used + 1)
    .returning(_CODE.c.id)
    .cte("claim")
)
_PG_ENTRY = (
    postgresql.insert(_ENTRY)
    .from_select(
        ["openid", "amount", "kind", "idempotency_key", "reason", "balance_after",
         "created_at", "code_batch_id"],
        sa_select(_SUB.c.openid, _P_TOKENS, literal("code", String()), _P_KEY, _P_REASON,
                  _SUB.c.balance + _P_TOKENS, _P_NOW, _P_BATCH)
        .select_from(_SUB.join(_PG_CLAIM, true()))
        .where(_SUB.c.openid == _P_OPENID))
    .on_conflict_do_nothing(index_elements=["idempotency_key"])
    .returning(_ENTRY.c.id, _ENTRY.c.balance_after)
    .cte("entry")
)
_PG_USE = (
    postgresql.insert(_USE)
    .from_select(["code_id", "batch_id", "openid", "ledger_entry_id", "created_at"],
                 sa_select(_PG_CLAIM.c.id, _P_BATCH, _P_OPENID, _PG_ENTRY.c.id, _P_NOW)
                 .select_from(_PG_CLAIM.join(_PG_ENTRY, true())))
    .on_conflict_do_nothing(index_elements=["code_id", "openid"])
    .returning(_USE.c.id)
    .cte("use")
)
_PG_CREDIT = (
    sa_update(_SUB)
    .where(_SUB.c.openid == _P_OPENID, sa_select(_PG_USE.c.id).exists())
    .values(balance=_SUB.c.balance + _P_TOKENS)
    .returning(_SUB.c.id, _SUB.c.balance)
    .cte("credit")
)


def _pg_event(name: str, kind: str, detail: str) -> Any:
    """The redemption's event (storage.events), written only with the use."""
    values = {"at": _P_NOW, "kind": literal(kind, String()), "openid": _P_OPENID,
              "detail": literal(detail, String()), "amount": _P_TOKENS}
    return (insert(_EVENT).from_select(list(values),
                                       sa_select(*values.values()).select_from(_PG_USE))
            .cte(name))


# Outer joins: a claim whose entry, use or credit went missing must show up, not vanish. The
# events' CTEs are not selected from: PostgreSQL runs a writing CTE all the same.
_PG_REDEEM = (
    sa_select(_PG_CLAIM.c.id, _PG_ENTRY.c.id.label("entry_id"), _PG_ENTRY.c.balance_after,
              _PG_USE.c.id.label("use_id"), _PG_CREDIT.c.id.label("sub_id"),
              _PG_CREDIT.c.balance)
    .select_from(_PG_CLAIM.outerjoin(_PG_ENTRY, true()).outerjoin(_PG_USE, true())
                 .outerjoin(_PG_CREDIT, true()))
    .add_cte(_pg_event("code_event", events.CODE, "tokens"),
             _pg_event("topup_event", events.TOPUP, "code"))
)


def _pg_credit(session: Session, state: _State, params: dict[str, Any]) -> CodeOutcome | None:
    """A tokens code on PostgreSQL in one statement; None when it wrote nothing (a race lost
    or a read that predates the lock: the caller reads again)."""
    assert state.found is not None
    batch = state.found.batch
    assert batch.id is not None and batch.tokens is not None
    row = session.connection().execute(_PG_REDEEM, params | {
        "p_code": state.found.code_id, "p_batch": batch.id, "p_tokens": batch.tokens,
        "p_reason": _reason(batch)}).first()
    if row is None:
        return None
    if (row.entry_id is None or row.use_id is None or row.sub_id is None
            or int(row.balance) != int(row.balance_after)):
        # Only a row in flight the claim could not see gets here; never let a claim be
        # committed without its credit, or a credit without its use.
        raise RuntimeError(f"code {state.found.code_id} for {params['p_openid']!r}: claimed "
                           "without its whole credit; roll the transaction back")
    ledger.sync_balance(session, int(row.sub_id), int(row.balance))
    return CodeOutcome("granted", int(row.balance), batch=batch, tokens=batch.tokens)


def _refusal(found: _Found, *, openid: str, now: datetime) -> Status | None:
    """Why this code cannot be used by ``openid`` now, from what was read; None: it can."""
    batch = found.batch
    if found.revoked_at is not None or batch.revoked_at is not None:
        return "revoked"
    if batch.expires_at is not None and batch.expires_at <= now:
        return "expired"
    if found.used_by_me:
        return "already_used"
    if found.used >= found.uses:
        return "used_up"
    if batch.giver is not None and batch.giver == openid:
        return "own_gift"
    return None


def _record_failure(session: Session, *, openid: str, reason: Status, now: datetime,
                    rules: _Rules, last_freeze: datetime | None) -> tuple[int, datetime | None]:
    """Count the failure; freeze when it is the last one allowed. Returns (attempts left,
    the freeze's end if this failure froze the subscriber). Runs under the subscriber's lock."""
    conn = session.connection()
    conn.execute(insert(_FAILURE).values(openid=openid, reason=reason, at=now))
    since = now - rules.window
    if last_freeze is not None and last_freeze > since:
        since = last_freeze  # failures before a served freeze are paid for
    failures = int(conn.execute(
        sa_select(func.count()).select_from(_FAILURE)
        .where(_FAILURE.c.openid == openid, _FAILURE.c.at >= since)).scalar_one())
    if failures < rules.max_failures:
        return rules.max_failures - failures, None
    until = now + rules.freeze
    module = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = module.insert(_FREEZE).values(openid=openid, since=now, until=until,
                                         failures=failures)
    conn.execute(stmt.on_conflict_do_update(
        index_elements=["openid"], set_={"since": now, "until": until, "failures": failures}))
    return 0, until


@dataclass(frozen=True)
class _Rules:
    max_failures: int
    window: timedelta
    freeze: timedelta


class _Lost(Exception):
    """The conditional claim of a use found the code used up or revoked meanwhile."""


def redeem_code(
    session: Session,
    *,
    openid: str,
    text: str,
    secret: bytes,
    key: str,
    max_failures: int = 5,
    window: timedelta = timedelta(minutes=10),
    freeze: timedelta = timedelta(hours=1),
    now: datetime | None = None,
) -> CodeOutcome:
    """Redeem the code in ``text`` for ``openid``; ``key`` is the delivery's idempotency key
    (a tokens credit is written under it).

    Every refusal is an outcome, never an exception, so the caller's transaction commits the
    failure that counts towards the freeze. Raises only UnknownSubscriber and what the grant
    itself may raise (then nothing of the redemption is written).

    A tokens code on PostgreSQL is two statements (the locking read, then one statement that
    claims, credits and records the use); every other outcome is decided on a second read,
    made with the lock held, and written as before (docs/benchmarks.md, "Codes")."""
    now = now or utcnow()
    if not secret:
        return CodeOutcome("disabled", ledger.get_balance(session, openid=openid))
    if session.autoflush:  # as an ORM query would: our Core statements must see pending objects
        session.flush()
    code = canonical(text)
    params: dict[str, Any] = {
        "p_openid": openid, "p_key": key, "p_now": now,
        "p_digest": digest(secret, code) if code is not None and check_ok(code) else ""}
    state = _read(session, params)
    if session.connection().dialect.name == "postgresql":
        found = state.found
        if (found is not None and found.batch.kind == "tokens" and not state.key_used
                and (state.frozen_until is None or state.frozen_until <= now)
                and _refusal(found, openid=openid, now=now) is None):
            granted = _pg_credit(session, state, params)
            if granted is not None:
                return granted
        # Decide on a read that sees everything committed before our lock was granted.
        state = _read(session, params)
    return _decide(session, state, params, code=code,
                   rules=_Rules(max_failures, window, freeze))


def _decide(session: Session, state: _State, params: dict[str, Any], *, code: str | None,
            rules: _Rules) -> CodeOutcome:
    """The outcome from a current read, with its writes (savepoint, statement by statement)."""
    openid, key, now = params["p_openid"], params["p_key"], params["p_now"]
    balance, until = state.balance, state.frozen_until
    if until is not None and until > now:  # the text is not even looked at: it stays unused
        return CodeOutcome("frozen", balance, frozen_until=until)

    def fail(status: Status, batch: CodeBatch | None = None) -> CodeOutcome:
        left, frozen = _record_failure(session, openid=openid, reason=status, now=now,
                                       rules=rules, last_freeze=until)
        return CodeOutcome(status, balance, batch=batch, failures_left=left,
                           frozen_until=frozen,
                           issue_number=batch.issue_number if batch is not None else None)

    if code is None:
        return fail("malformed")
    if not check_ok(code):
        return fail("typo")
    found = state.found
    if found is None:
        return fail("unknown")
    batch = found.batch
    refusal = _refusal(found, openid=openid, now=now)
    if refusal == "own_gift":
        return CodeOutcome("own_gift", balance, batch=batch, issue_number=batch.issue_number)
    if refusal is not None:
        return fail(refusal, batch)
    if batch.kind == "issue" and batch.issue_number is not None and state.readable:
        return CodeOutcome("already_owned", balance, batch=batch,
                           issue_number=batch.issue_number)
    try:
        return _grant(session, openid=openid, found=found, key=key, now=now, balance=balance)
    except _Lost:
        # Used up or revoked between our read and the claim (another subscriber won).
        again = _read(session, params).found
        assert again is not None
        return fail(_refusal(again, openid=openid, now=now) or "used_up", batch)
    except IntegrityError:
        # uq_code_redemption: this subscriber's use was committed meanwhile (cannot happen
        # under the row lock, but the unique key, not the lock, is the guarantee).
        return fail("already_used", batch)


def _grant(session: Session, *, openid: str, found: _Found, key: str, now: datetime,
           balance: int) -> CodeOutcome:
    """Claim one use, record it and grant, in one savepoint: all of it or none."""
    batch = found.batch
    assert batch.id is not None
    with session.begin_nested():
        # Asked for inside the block: the session emits the SAVEPOINT only then.
        conn = session.connection()
        claimed = conn.execute(
            sa_update(_CODE)
            .where(_CODE.c.id == found.code_id, _CODE.c.used < _CODE.c.uses,
                   _CODE.c.revoked_at.is_(None))
            .values(used=_CODE.c.used + 1).returning(_CODE.c.used)).first()
        if claimed is None:
            raise _Lost
        use: dict[str, Any] = {"code_id": found.code_id, "batch_id": batch.id,
                               "openid": openid, "created_at": now}
        if batch.kind == "tokens":
            assert batch.tokens is not None
            credit = ledger.post(session, openid=openid, amount=batch.tokens, kind="code",
                                 key=key, reason=_reason(batch), code_batch_id=batch.id)
            if credit.replayed:  # the key credited another code already: undo this claim
                raise IdempotencyConflict(key, f"code credit #{credit.entry.id}")
            conn.execute(insert(_USE).values(**use, ledger_entry_id=credit.entry.id))
            _record(session, batch, openid=openid, now=now)
            return CodeOutcome("granted", credit.balance, batch=batch, tokens=batch.tokens)
        use_id = int(conn.execute(insert(_USE).values(**use).returning(_USE.c.id)).scalar_one())
        _record(session, batch, openid=openid, now=now)
        if batch.kind == "issue":
            conn.execute(insert(_ENT).values(openid=openid, issue_number=batch.issue_number,
                                             ledger_entry_id=None, code_redemption_id=use_id,
                                             created_at=now))
            return CodeOutcome("granted", balance, batch=batch, issue_number=batch.issue_number)
        assert batch.pass_id is not None and batch.pass_days is not None
        granted = passes.grant(session, openid=openid, pass_id=batch.pass_id,
                               days=batch.pass_days,
                               source="gift" if batch.giver else "code", key=f"code:{use_id}",
                               now=now, code_redemption_id=use_id, reason=_reason(batch))
        return CodeOutcome("granted", balance, batch=batch, period=granted.period)


def _record(session: Session, batch: CodeBatch, *, openid: str, now: datetime) -> None:
    """The redemption's events, in its savepoint: the code, and the unlock or top-up it gave
    (a gift's pass is only the code: storage.events has no event for a pass not bought)."""
    how = "gift" if batch.giver else "code"
    rows = [events.row(events.CODE, openid=openid, at=now, issue_number=batch.issue_number,
                       detail="gift" if batch.giver else batch.kind, amount=batch.tokens)]
    if batch.kind == "tokens":
        rows.append(events.row(events.TOPUP, openid=openid, at=now, detail=how,
                               amount=batch.tokens))
    elif batch.kind == "issue":
        rows.append(events.row(events.UNLOCK, openid=openid, at=now,
                               issue_number=batch.issue_number, detail=how))
    events.record_many(session, rows)


def _reason(batch: CodeBatch) -> str:
    # Shown to the subscriber in 余额 (handlers.format.ledger_line): no operator's label.
    return f"{'礼品码' if batch.giver else '兑换码'} #{batch.id}"


# --------------------------------------------------------------------------- operators


@dataclass(frozen=True)
class BatchSummary:
    batch: CodeBatch
    redeemed: int  # uses taken, over all codes
    codes_used: int  # codes with at least one use
    codes_revoked: int
    tokens_granted: int

    @property
    def capacity(self) -> int:
        return self.batch.count * self.batch.uses

    def expired(self, now: datetime) -> bool:
        return self.batch.expires_at is not None and self.batch.expires_at <= now


def _summaries(session: Session, batch_filter: Any = None) -> list[BatchSummary]:
    stmt = select(CodeBatch).order_by(col(CodeBatch.id))
    if batch_filter is not None:
        stmt = stmt.where(batch_filter)
    batches = list(session.exec(stmt).all())
    if not batches:
        return []
    ids = [b.id for b in batches]
    stats = {int(r.batch_id): r for r in session.connection().execute(
        sa_select(_CODE.c.batch_id, func.coalesce(func.sum(_CODE.c.used), 0).label("used"),
                  func.count().filter(_CODE.c.used > 0).label("codes_used"),
                  func.count().filter(_CODE.c.revoked_at.is_not(None)).label("revoked"))
        .where(_CODE.c.batch_id.in_(ids)).group_by(_CODE.c.batch_id)).all()}
    out = []
    for b in batches:
        assert b.id is not None
        r = stats.get(b.id)
        used = int(r.used) if r else 0
        out.append(BatchSummary(
            b, redeemed=used, codes_used=int(r.codes_used) if r else 0,
            codes_revoked=b.count if b.revoked_at is not None else int(r.revoked) if r else 0,
            tokens_granted=used * (b.tokens or 0) if b.kind == "tokens" else 0))
    return out


def list_batches(session: Session, *, gifts: bool = True) -> list[BatchSummary]:
    """Every batch with its counts, oldest first (gift batches too unless ``gifts`` is off)."""
    return _summaries(session, None if gifts else col(CodeBatch.giver).is_(None))


def batch_summary(session: Session, *, batch_id: int) -> BatchSummary | None:
    found = _summaries(session, col(CodeBatch.id) == batch_id)
    return found[0] if found else None


@dataclass(frozen=True)
class CodeInfo:
    code_id: int
    uses: int
    used: int
    revoked_at: datetime | None
    batch: CodeBatch
    redeemed_by: list[tuple[str, datetime]]  # (openid, when), oldest first


def find_code(session: Session, *, secret: bytes, code: str) -> CodeInfo | None:
    """The stored code whose canonical form is ``code`` (an operator looking one up)."""
    row = session.exec(select(RedemptionCode).where(
        RedemptionCode.digest == digest(secret, code))).first()
    if row is None:
        return None
    assert row.id is not None
    batch = session.get(CodeBatch, row.batch_id)
    assert batch is not None
    uses = session.connection().execute(
        sa_select(_USE.c.openid, _USE.c.created_at).where(_USE.c.code_id == row.id)
        .order_by(_USE.c.id)).all()
    return CodeInfo(row.id, row.uses, row.used, row.revoked_at, batch,
                    [(str(o), t) for o, t in uses])


def revoke_code(session: Session, *, secret: bytes, code: str,
                now: datetime | None = None) -> CodeInfo | None:
    """Revoke one code (uses already made stay made); None when there is no such code.
    Revoking a revoked code changes nothing."""
    info = find_code(session, secret=secret, code=code)
    if info is None or info.revoked_at is not None:
        return info
    at = now or utcnow()
    session.connection().execute(
        sa_update(_CODE).where(_CODE.c.id == info.code_id).values(revoked_at=at))
    return CodeInfo(info.code_id, info.uses, info.used, at, info.batch, info.redeemed_by)


def revoke_batch(session: Session, *, batch_id: int,
                 now: datetime | None = None) -> CodeBatch | None:
    """Revoke every code of a batch at once; None when there is no such batch."""
    batch = session.get(CodeBatch, batch_id)
    if batch is None or batch.revoked_at is not None:
        return batch
    batch.revoked_at = now or utcnow()
    session.add(batch)
    session.flush()
    return batch


def frozen(session: Session, *, now: datetime | None = None) -> list[CodeFreeze]:
    """Subscribers whose code attempts are refused right now, the longest frozen first."""
    return list(session.exec(select(CodeFreeze).where(col(CodeFreeze.until) > (now or utcnow()))
                             .order_by(col(CodeFreeze.until).desc())).all())
