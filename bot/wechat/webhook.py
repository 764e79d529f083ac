"""The WeChat webhook. WeRoBot parses the XML into message objects and provides the reply
types; around it this module adds what WeRoBot lacks: constant-time signatures with a freshness
window, size and character checks, de-duplication of WeChat's retries before any side effect,
one transaction per message, errors logged instead of swallowed, XML-safe, size-capped
replies, safe mode (encrypted pushes and replies) decided per request rather than process-wide,
and one structured log line per request that never carries message text or secrets."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bottle
from sqlalchemy import Engine
from sqlmodel import Session
from werobot.parser import parse_xml, process_message
from werobot.replies import Article, ArticlesReply, TextReply

import handlers
from bot.console.links import ConsoleLinks
from bot.settings import Settings
from bot.web.links import PayLinks, ReaderLinks
from bot.wechat.crypto import CryptoError, WeChatCrypto
from handlers.errors import BUSY
from handlers.format import fit_bytes
from handlers.router import (
    Context,
    Incoming,
    NeedsWrite,
    News,
    Reply,
    Router,
    Silent,
    Text,
    normalize,
)
from storage import events, inbox, replay, subscribers
from storage.db import read_only, run_in_transaction
from storage.fastpath import FastPath, NoticeTaken
from storage.models import utcnow
from storage.replay import Replayed, Seal

log = logging.getLogger("newsbot.webhook")

MAX_BODY_BYTES = 64 * 1024
TEXT_LIMIT_BYTES = 2048
SYSTEM_EVENTS = frozenset({"masssendjobfinish", "templatesendjobfinish"})
# XML 1.0 forbids these; expat would choke on them and WeRoBot would answer with a 500.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
# What a logged message type may contain: WeChat's types and event names are short identifiers.
_LOG_TYPE = re.compile(r"[^a-z0-9_.:-]")
MAX_NONCE_CHARS = 128
_ECHOSTR = re.compile(r"[A-Za-z0-9._~-]{1,128}")  # URL-unreserved characters
# WeChat's deepest pushes (SendPicsInfo/PicList/item/PicMd5Sum, CopyrightCheckResult/…) nest 4
# elements inside <xml>; deeper is forged, and WeRoBot recurses on it (str() of nested dicts).
MAX_XML_DEPTH = 8
# openids are ~28 characters of [A-Za-z0-9_-], gh_ ids ~15; both land in varchar(64) columns.
_ACCOUNT_ID = re.compile(r"[\x21-\x7e]{1,64}")
# Fields that are text in every push WeChat sends, with the longest value we accept (EventKey
# carries a menu's URL in VIEW events, up to 1,024 bytes).
_SCALAR_FIELDS = {"ToUserName": 64, "FromUserName": 64, "CreateTime": 20, "MsgType": 32,
                  "Event": 64, "EventKey": 2048, "MsgId": 64, "MsgID": 64, "Content": None}
# How often each process deletes the signed pairs that have left the freshness window: often
# enough that each purge is a small range delete, not a pause.
PURGE_EVERY_S = 2.0


class BadRequest(Exception):
    """Refuse the request: ``reason`` is the response body, ``detail`` only goes to the log."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail or reason


def sign(token: str, timestamp: str, nonce: str, *extra: str) -> str:
    """WeChat's signature: SHA-1 of the sorted, concatenated parts."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, *extra])).encode()).hexdigest()


def cdata(text: str) -> str:
    """Make a value safe inside <![CDATA[…]]>: split any ``]]>`` across two sections."""
    return text.replace("]]>", "]]]]><![CDATA[>")


# --- reply serialisation (stored with the delivery so retries get the identical answer) ---

def reply_to_json(reply: Reply) -> str:
    if isinstance(reply, Text):
        return json.dumps({"type": "text", "content": reply.content}, ensure_ascii=False)
    if isinstance(reply, News):
        return json.dumps({"type": "news", "title": reply.title, "description": reply.description,
                           "url": reply.url, "pic_url": reply.pic_url}, ensure_ascii=False)
    return json.dumps({"type": "silent"})


def reply_from_json(raw: str | None) -> Reply:
    data: dict[str, str] = json.loads(raw) if raw else {"type": "silent"}
    if data["type"] == "text":
        return Text(data["content"])
    if data["type"] == "news":
        return News(data["title"], data["description"], data["url"], data.get("pic_url", ""))
    return Silent()


def render_reply(reply: Reply, *, to_user: str, from_user: str, now: int) -> str:
    """The passive-reply XML, or ``success`` for no message."""
    if isinstance(reply, Text):
        content = fit_bytes(reply.content, TEXT_LIMIT_BYTES)
        return str(TextReply(target=cdata(to_user), source=cdata(from_user), time=now,
                             content=cdata(content)).render())
    if isinstance(reply, News):
        articles = ArticlesReply(target=cdata(to_user), source=cdata(from_user), time=now)
        articles.add_article(Article(title=cdata(reply.title),
                                     description=cdata(reply.description),
                                     img=cdata(reply.pic_url), url=cdata(reply.url)))
        return str(articles.render())
    return "success"


# --- parsing ---

@dataclass(frozen=True)
class Delivery:
    incoming: Incoming
    to_user: str  # our account (gh_…), the From of our reply
    dedupe_key: str
    idempotency_key: str
    msg_type: str
    fields: dict[str, str]


def _parse_xml(body: bytes) -> tuple[str, dict[str, Any]]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(400, "body is not UTF-8") from None
    if _CONTROL.search(text):
        raise BadRequest(400, "control characters in body")
    try:
        raw = parse_xml(text)
    except Exception:  # expat and xmltodict raise a zoo of types on malformed XML
        raise BadRequest(400, "malformed XML") from None
    if not isinstance(raw, dict):
        raise BadRequest(400, "malformed XML")
    if _too_deep(raw, MAX_XML_DEPTH):
        raise BadRequest(400, "XML nested too deeply")
    return text, raw


def _too_deep(root: dict[str, Any], limit: int) -> bool:
    """Whether any element nests more than ``limit`` levels below <xml> (iterative: the point
    is not to recurse on hostile input)."""
    if all(isinstance(value, str) for value in root.values()):  # most pushes: flat
        return False
    stack: list[tuple[object, int]] = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):  # repeated elements: same level
            stack.extend((child, depth) for child in node)
    return False


def _check_fields(raw: dict[str, Any]) -> None:
    """Refuse shapes WeChat never sends before they reach WeRoBot or a bounded column: a text
    field holding elements (or repeated), overlong values, malformed ids and times."""
    for name, limit in _SCALAR_FIELDS.items():
        value = raw.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadRequest(400, "malformed XML", f"malformed XML: {name} is not text")
        if limit is not None and len(value) > limit:
            raise BadRequest(400, "malformed XML", f"malformed XML: {name} too long")
    for name in ("FromUserName", "ToUserName"):
        if name in raw and not _ACCOUNT_ID.fullmatch(raw[name]):
            raise BadRequest(400, "malformed XML", f"malformed XML: bad {name}")
    if "CreateTime" in raw and not raw["CreateTime"].isascii():
        raise BadRequest(400, "malformed XML", "malformed XML: bad CreateTime")


def parse_envelope(body: bytes) -> str:
    """The ``Encrypt`` value of a safe-mode push."""
    _, raw = _parse_xml(body)
    encrypt = raw.get("Encrypt")
    if not isinstance(encrypt, str) or not encrypt.strip():
        raise BadRequest(400, "missing Encrypt")
    return encrypt.strip()


def parse_delivery(body: bytes) -> Delivery:
    text, raw = _parse_xml(body)
    _check_fields(raw)
    try:
        fields = {k: v for k, v in raw.items() if isinstance(v, str) and k != "raw"}
        message = process_message(dict(raw))
        content = getattr(message, "content", "")
    except Exception:  # WeRoBot raises a zoo of types on unexpected shapes (RecursionError too)
        raise BadRequest(400, "malformed XML") from None
    openid = fields.get("FromUserName", "")
    to_user = fields.get("ToUserName", "")
    msg_type = fields.get("MsgType", "").lower()
    create_time = fields.get("CreateTime", "")
    if not openid or not to_user or not msg_type or not create_time.isdigit():
        raise BadRequest(400, "missing FromUserName, ToUserName, MsgType or CreateTime")
    event = fields.get("Event", "").lower()
    event_key = fields.get("EventKey", "") or ""
    msg_id = fields.get("MsgId") or fields.get("MsgID") or ""
    # Every key carries the sender: a MsgId is only unique per user, and another user's MsgId
    # must never find their stored reply (their balance and ledger) or their ledger key.
    if msg_type != "event" and msg_id:
        dedupe = f"msg:{openid}:{msg_id}"
    else:
        dedupe = f"evt:{openid}:{create_time}:{event}:{event_key}"
        if msg_type != "event":  # a message without MsgId: fall back to its content
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            dedupe = f"evt:{openid}:{create_time}:{msg_type}:{digest}"
    raw_text = content if msg_type == "text" and isinstance(content, str) else ""
    incoming = Incoming(openid=openid, msg_type=msg_type, text=normalize(raw_text or ""),
                        raw_text=raw_text or "", event=event, event_key=event_key, fields=fields)
    return Delivery(incoming, to_user, dedupe[:200], f"wechat:{dedupe[4:]}"[:128], msg_type,
                    fields)


# --- the endpoint ---

def crypto_from_settings(settings: Settings) -> WeChatCrypto | None:
    """Safe mode's keys, or ``None`` when no EncodingAESKey is configured. Raises ValueError
    naming the setting when the key is unusable, so a bad key stops the server at startup."""
    wechat = settings.wechat
    if not wechat.encoding_aes_key:
        return None
    # A rotation fallback, once settings carries it (``[wechat] previous_encoding_aes_key``).
    previous = wechat.previous_encoding_aes_key
    return WeChatCrypto(wechat.token, wechat.encoding_aes_key, wechat.app_id,
                        previous_aes_key=previous)


@dataclass
class RequestLog:
    """The one log line each webhook request gets. Only identifiers, timings and fixed reasons
    go in: never message text, signatures, tokens or keys."""

    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    msg_type: str = "-"
    encrypted: bool = False
    started: float = field(default_factory=time.perf_counter)

    def emit(self, outcome: str, status: int, reason: str = "") -> None:
        latency_ms = round((time.perf_counter() - self.started) * 1000, 1)
        fields: dict[str, object] = {
            "request_id": self.request_id, "msg_type": self.msg_type, "outcome": outcome,
            "status": status, "encrypted": self.encrypted, "latency_ms": latency_ms,
        }
        line = (f"webhook id={self.request_id} type={self.msg_type} outcome={outcome} "
                f"status={status} encrypted={'yes' if self.encrypted else 'no'} "
                f"ms={latency_ms:.1f}")
        if reason:
            fields["reason"] = reason
            line += f' reason="{reason}"'
        level = (logging.ERROR if status >= 500 else logging.WARNING
                 if outcome.startswith("refused") or outcome == "error" else logging.INFO)
        log.log(level, "%s", line, extra={"fields": fields})


def _log_type(delivery: Delivery) -> str:
    kind = f"event.{delivery.incoming.event}" if delivery.msg_type == "event" else delivery.msg_type
    return _LOG_TYPE.sub("", kind.lower())[:40] or "-"


class Webhook:
    def __init__(self, settings: Settings, engine: Engine, *,
                 clock: Callable[[], float] = time.time,
                 routers: tuple[Router, ...] = handlers.ROUTERS) -> None:
        self.settings = settings
        self.config = settings.chat_config()
        self.engine = engine
        self.clock = clock
        self.links = ReaderLinks(settings)
        self.pay_links = PayLinks(settings) if settings.pay is not None else None
        self.routers = routers
        self.crypto = crypto_from_settings(settings)
        self.fast = FastPath(engine)
        # Whenever plain messages are accepted their signature leaves the body open, so every
        # delivery's pair is recorded: encrypted ones too, because in compatible mode the
        # plain `signature` of an encrypted delivery's URL is just as valid for a plain body.
        # Safe mode alone needs none of it (msg_signature covers the ciphertext).
        self.remember_pairs = self.crypto is None or settings.wechat.accept_plain
        # What handlers noted (card views: storage.events) is stored with each delivery's
        # claim; only bench/webhook.py --events-cost turns it off, to measure what it costs.
        self.record_events = True
        self._purge_lock = threading.Lock()
        self._next_purge = 0.0

    def install(self, app: bottle.Bottle) -> None:
        path = self.settings.server.webhook_path
        app.route(path, "GET", self.handshake)
        app.route(path, "POST", self.receive)

    def _check_signature(self, query: Any) -> None:
        signature = query.get("signature", "")
        timestamp = query.get("timestamp", "")
        nonce = query.get("nonce", "")
        if not signature or not timestamp or not nonce:
            raise BadRequest(403, "missing signature")
        expected = sign(self.settings.wechat.token, timestamp, nonce)
        if not hmac.compare_digest(expected.encode(),
                                   signature.lower().encode("utf-8", "replace")):
            raise BadRequest(403, "bad signature")
        try:
            skew = abs(self.clock() - int(timestamp))
        except ValueError:
            raise BadRequest(403, "bad timestamp") from None
        if skew > self.settings.server.max_clock_skew_s:
            raise BadRequest(403, "stale timestamp")

    def handshake(self) -> str:
        req = RequestLog(msg_type="handshake")
        try:
            self._check_signature(bottle.request.query)
        except BadRequest as exc:
            return self._refuse(exc, req)
        echostr = str(bottle.request.query.get("echostr", ""))
        if not _ECHOSTR.fullmatch(echostr):  # it is reflected: WeChat's is a short number
            return self._refuse(BadRequest(400, "bad echostr"), req)
        bottle.response.content_type = "text/plain; charset=utf-8"
        bottle.response.set_header("X-Content-Type-Options", "nosniff")
        req.emit("ok", 200)
        return echostr

    def _refuse(self, exc: BadRequest, req: RequestLog) -> str:
        req.emit(f"refused-{exc.status}", exc.status, exc.detail)
        bottle.response.status = exc.status
        bottle.response.content_type = "text/plain; charset=utf-8"
        return exc.reason

    def _read_body(self) -> bytes:
        length = bottle.request.content_length
        if length > MAX_BODY_BYTES:
            raise BadRequest(413, "body too large")
        stream = bottle.request.environ["wsgi.input"]
        body: bytes = stream.read(length if length >= 0 else MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(413, "body too large")
        return body

    def _decrypt(self, query: Any, body: bytes) -> tuple[bytes, int]:
        """The inner XML of a safe-mode push, and which key opened it."""
        if self.crypto is None:
            raise BadRequest(400, "encrypted message but no encoding_aes_key is configured")
        signature = query.get("msg_signature", "")
        if not signature:
            raise BadRequest(403, "missing msg_signature")
        nonce = query.get("nonce", "")
        if len(nonce) > MAX_NONCE_CHARS or _CONTROL.search(nonce):
            raise BadRequest(400, "bad nonce")  # it is echoed into the encrypted reply
        encrypt = parse_envelope(body)
        # Authenticate the ciphertext before touching it: CBC alone would let a forger probe.
        if not self.crypto.check_msg_signature(signature, query.get("timestamp", ""), nonce,
                                               encrypt):
            raise BadRequest(403, "bad msg_signature")
        try:
            opened = self.crypto.decrypt_any(encrypt)
        except CryptoError as exc:
            raise BadRequest(400, "cannot decrypt", f"cannot decrypt: {exc}") from None
        return opened.xml.encode("utf-8"), opened.key_index

    def receive(self) -> str:
        req = RequestLog()
        query = bottle.request.query
        key_index: int | None = None
        try:
            self._check_signature(query)
            if str(query.get("encrypt_type", "")).lower() == "aes":
                req.encrypted = True
                body, key_index = self._decrypt(query, self._read_body())
            elif self.crypto is not None and not self.settings.wechat.accept_plain:
                raise BadRequest(403, "plain messages are refused in safe mode",
                                 "plain message in safe mode (accept_plain is off)")
            else:
                body = self._read_body()
            seal = self._seal(query, body) if self.remember_pairs else None
            try:
                delivery = parse_delivery(body)
            except BadRequest:
                self._remember(seal)  # the URL is spent, even though its message was refused
                raise
        except BadRequest as exc:
            return self._refuse(exc, req)
        req.msg_type = _log_type(delivery)
        try:
            try:
                reply, outcome = self._reply_for(delivery, req.request_id, seal)
            except Replayed:
                return self._refuse(BadRequest(
                    403, "replayed signature",
                    "signed timestamp and nonce seen before with another message"), req)
            self._purge_if_due()
            now = int(self.clock())
            xml = render_reply(reply, to_user=delivery.incoming.openid,
                               from_user=delivery.to_user, now=now)
            # Encrypted or not is this request's business alone; the bare ack may stay plain.
            if xml != "success" and key_index is not None and self.crypto is not None:
                xml = self.crypto.encrypt(xml, nonce=query.get("nonce", ""), timestamp=str(now),
                                          key_index=key_index)
        except Exception as exc:  # e.g. the database is down: still one line, then Bottle's 500
            req.emit("error", 500, f"unhandled {type(exc).__name__}")
            raise
        bottle.response.content_type = (
            "text/plain; charset=utf-8" if xml == "success" else "application/xml; charset=utf-8"
        )
        req.emit(outcome, 200)
        return xml

    def _seal(self, query: Any, body: bytes) -> Seal:
        """The signed pair and the hash of the message it carries (for an encrypted delivery
        the decrypted XML, so a retry WeChat encrypted afresh is still the same message)."""
        nonce = str(query.get("nonce", ""))
        if len(nonce) > MAX_NONCE_CHARS or _CONTROL.search(nonce):
            raise BadRequest(400, "bad nonce")
        return Seal(int(query.get("timestamp", "")), nonce, hashlib.sha256(body).hexdigest())

    def _remember(self, seal: Seal | None) -> None:
        """Record the pair of a request answered without a stored claim (refused, or its
        handler failed), so its URL cannot carry another message either; its own message may
        still come again (WeChat's retry). Nothing to do if the pair is already known."""
        if seal is None:
            return
        try:
            run_in_transaction(self.engine, lambda s: replay.record(s, seal))
        except Replayed:
            pass
        except Exception:
            log.warning("recording a signed request failed", exc_info=True)

    def _purge_if_due(self) -> None:
        """Delete the pairs no accepted request can match any more, every PURGE_EVERY_S in one
        thread of each process; a failure only means the next purge deletes more."""
        now = self.clock()
        if not self.remember_pairs or now < self._next_purge or \
                not self._purge_lock.acquire(blocking=False):
            return
        try:
            self._next_purge = now + PURGE_EVERY_S
            before = replay.cutoff(now, self.settings.server.max_clock_skew_s)
            run_in_transaction(self.engine, lambda s: replay.purge(s, before=before))
        except Exception:
            log.warning("purging old signed requests failed", exc_info=True)
        finally:
            self._purge_lock.release()

    def _reply_for(self, delivery: Delivery, request_id: str,
                   seal: Seal | None = None) -> tuple[Reply, str]:
        try:
            answered = self._answer_reading(delivery, seal)
        except (NeedsWrite, NoticeTaken):
            answered = None
        except Replayed:
            raise
        except Exception:
            # E.g. a write attempted by a handler marked @reads_only (the session refuses it).
            # The write path below answers correctly and reports real failures itself.
            log.warning("read path failed id=%s; answering on the write path", request_id,
                        exc_info=True)
            answered = None
        if answered is not None:
            return answered
        try:
            return run_in_transaction(self.engine, lambda s: self._handle(s, delivery, seal))
        except Replayed:
            raise
        except Exception:
            # Nothing is stored (the transaction rolled back): WeChat's retry of this message
            # runs the handler again instead of finding 系统繁忙, so a blink of the database
            # costs the reader one slow answer, not the message. A handler that fails every
            # time (a bug) fails each retry alike and still writes nothing.
            log.exception("handler failed id=%s key=%s", request_id, delivery.dedupe_key)
            self._remember(seal)
            return Text(BUSY), "error"

    def _answer_reading(self, delivery: Delivery,
                        seal: Seal | None = None) -> tuple[Reply, str] | None:
        """The fast path for messages whose handler only reads (本周, 余额, 试读, 帮助 …): the
        reply is computed from read-only connections, which on SQLite take no write lock,
        then the claim and the reply are stored with one INSERT (storage.fastpath), so a
        message holds the write lock for one statement instead of its whole handler. ``None``
        when the message needs the write path (its first handler writes, or the subscriber is
        not yet known); NeedsWrite or NoticeTaken when that turns out on the way."""
        msg = delivery.incoming
        if handlers.first_route_writes(self.config, msg, self.routers):
            return None  # 兑换, follow/unfollow, operator commands, WeChat's reports …
        with self.fast.reading() as reads:
            ctx = Context(config=self.config, make_link=self.links, pay_link=self.pay_links,
                          console_link=ConsoleLinks(self.settings),
                          key=delivery.idempotency_key, now=utcnow(), read_only=True,
                          fast=reads, open_session=lambda: read_only(self.engine))
            try:
                current = ctx.current_issue()
                if not ctx.standing(msg.openid, current.number if current else None).known:
                    return None  # the write path creates the subscriber first
                reply = handlers.dispatch(ctx, msg, self.routers)
            finally:
                ctx.close()
        claim = self.fast.store_reply(key=delivery.dedupe_key, openid=msg.openid,
                                      reply_json=reply_to_json(reply), now=ctx.now,
                                      notice_issue=ctx.deferred_notice, seal=seal,
                                      events=ctx.events if self.record_events else ())
        if claim.state == "done":  # WeChat's retry of a message answered before
            return reply_from_json(claim.reply_json), "duplicate"
        return reply, "ok"

    def _handle(self, session: Session, delivery: Delivery,
                seal: Seal | None = None) -> tuple[Reply, str]:
        """Signed pair, claim, side effects and the stored reply in one transaction, so a crash
        leaves none of them. A concurrent delivery of the same message waits on the claim's
        unique key until this commits (PostgreSQL row lock, SQLite write lock) and then finds
        the reply: the handler never runs twice and every delivery gets the same answer."""
        msg = delivery.incoming
        if seal is not None:
            replay.record(session, seal)  # Replayed rolls the transaction back
        claim = inbox.claim(session, key=delivery.dedupe_key, openid=msg.openid)
        if claim.state == "done":
            return reply_from_json(claim.reply_json), "duplicate"
        if msg.event not in SYSTEM_EVENTS:  # those come from WeChat itself, not a follower
            subscribers.ensure_subscriber(session, openid=msg.openid)
        ctx = Context(db=session, config=self.config, make_link=self.links,
                      pay_link=self.pay_links, console_link=ConsoleLinks(self.settings),
                      key=delivery.idempotency_key, now=utcnow())
        reply = handlers.dispatch(ctx, msg, self.routers)
        if self.record_events:
            events.record_many(session, ctx.events)  # with the claim: a retry adds none
        inbox.finish(session, key=delivery.dedupe_key, reply_json=reply_to_json(reply))
        return reply, "ok"
