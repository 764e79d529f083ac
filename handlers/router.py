"""The pieces every handler module shares: the incoming message, the context, the reply types
and a small router. Each feature module exports one ``router``; ``handlers/__init__.py`` puts
them in order."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from sqlmodel import Session

from handlers.config import ChatConfig
from handlers.numbers import BadIssueNumber, issue_number
from storage import events, issues, subscribers
from storage.issues import IssuePreview
from storage.subscribers import Standing


@dataclass(frozen=True)
class Text:
    content: str


@dataclass(frozen=True)
class News:
    """A one-article 图文 reply (WeChat shows only one article in reply to a user message)."""

    title: str
    description: str
    url: str
    pic_url: str = ""


@dataclass(frozen=True)
class Silent:
    """Acknowledge without a message (WeChat expects the body ``success``)."""


Reply = Text | News | Silent


@dataclass(frozen=True)
class Incoming:
    openid: str
    msg_type: str  # text | image | voice | location | event | …
    text: str = ""  # normalised command text (NFKC, trimmed, lower-case)
    raw_text: str = ""
    event: str = ""  # lower-case event name for msg_type == "event"
    event_key: str = ""
    fields: dict[str, str] = field(default_factory=dict)  # everything else WeChat sent


class LinkMaker(Protocol):
    def __call__(self, openid: str, issue_number: int) -> str: ...


class PayLinkMaker(Protocol):
    """The subscriber's own pay page; with an issue it offers to pay the difference and
    unlock it in one step."""

    def __call__(self, openid: str, issue_number: int | None = None) -> str: ...


class NeedsWrite(Exception):
    """The message needs a handler that writes: answer it on the write path instead."""


class FastReads(Protocol):
    """The per-message reads of the webhook's fast path (storage.fastpath.Reads)."""

    def current_issue(self, *, now: datetime,
                      default_free_percent: int) -> IssuePreview | None: ...

    def standing(self, *, openid: str, issue_number: int | None) -> Standing: ...


@dataclass
class Context:
    """What a handler may use: the transaction's session (for storage calls only), its config,
    a reader-link signer (and a pay-link signer when payments are on) and the idempotency key
    of this delivery.

    ``read_only`` is the webhook's fast path: only handlers marked ``@reads_only`` may run,
    the current issue and the reader's standing come from ``fast``, a read-only session is
    opened only if a handler asks for ``session``, and the one write such a reply may need
    (the new-issue notice) is left in ``deferred_notice`` for the webhook to store with the
    delivery's claim."""

    config: ChatConfig
    make_link: LinkMaker
    key: str
    now: datetime
    pay_link: PayLinkMaker | None = None  # None: payments are off ([pay] not set)
    db: Session | None = None
    read_only: bool = False
    fast: FastReads | None = None
    open_session: Callable[[], AbstractContextManager[Session]] | None = None
    deferred_notice: int | None = None
    # An operator's one-time console link (bot.console); None where the console is not served.
    console_link: Callable[[str], str] | None = None
    # Events a handler noted (card views): the webhook records them with the delivery's claim,
    # in the same statement on the fast path, so a retry of the message adds none.
    events: list[dict[str, object]] = field(default_factory=list)
    _opened: tuple[AbstractContextManager[Session], Session] | None = field(
        default=None, repr=False)
    _current: IssuePreview | Literal[False] | None = field(default=False, repr=False)
    _standing: dict[tuple[str, int | None], Standing] = field(default_factory=dict, repr=False)

    @property
    def session(self) -> Session:
        if self.db is not None:
            return self.db
        if self._opened is None:
            assert self.open_session is not None, "a Context needs db or open_session"
            manager = self.open_session()
            self._opened = (manager, manager.__enter__())
        return self._opened[1]

    def close(self) -> None:
        """End the session opened on demand, if any."""
        if self._opened is not None:
            manager, self._opened = self._opened[0], None
            manager.__exit__(None, None, None)

    def current_issue(self) -> IssuePreview | None:
        """The most recently published issue, looked up once per message."""
        if self._current is False:
            self._current = (
                self.fast.current_issue(now=self.now, default_free_percent=self.free_percent)
                if self.fast is not None else
                issues.current_issue(self.session, default_free_percent=self.free_percent,
                                     now=self.now))
        return self._current

    def standing(self, openid: str, issue_number: int | None) -> Standing:
        """Balance, unlock and notice of ``openid`` for one issue, looked up once per message."""
        key = (openid, issue_number)
        found = self._standing.get(key)
        if found is None:
            found = self._standing[key] = (
                self.fast.standing(openid=openid, issue_number=issue_number)
                if self.fast is not None else
                subscribers.standing(self.session, openid=openid, issue_number=issue_number))
        return found

    def note_event(self, kind: str, *, openid: str, issue_number: int | None = None,
                   detail: str | None = None, amount: int | None = None) -> None:
        """Record an event (storage.events) with this delivery, whichever path answers it."""
        self.events.append(events.row(kind, openid=openid, at=self.now,
                                      issue_number=issue_number, detail=detail, amount=amount))

    @property
    def unit(self) -> str:
        return self.config.unit

    @property
    def free_percent(self) -> int:
        return self.config.free_percent


Handler = Callable[[Context, Incoming, "re.Match[str] | None"], Reply | None]

_READS_ONLY = "_newsbot_reads_only"
# Unicode digits, superscripts, circled numbers, Roman numerals…
_NUMERAL_CATEGORIES = frozenset({"Nd", "No", "Nl"})


def reads_only(fn: Handler) -> Handler:
    """Mark a handler that only reads, so the webhook may answer it without taking a write
    lock. Put it nearest the ``def`` (below the route decorators)."""
    setattr(fn, _READS_ONLY, True)
    return fn


def _foreign_numeral(ch: str) -> bool:
    return unicodedata.category(ch) in _NUMERAL_CATEGORIES and not ("0" <= ch <= "9"
                                                                    or "０" <= ch <= "９")


def normalize(text: str, *, fold_case: bool = True) -> str:
    """Full-width digits and letters to ASCII (NFKC), case folded, whitespace collapsed.

    Numerals other than ASCII and full-width digits are kept as they are: NFKC would turn
    ``²`` and ``①`` into ``2`` and ``1``, and a command must not read a number the sender
    did not type (handlers.numbers)."""
    parts = [
        run if _foreign_numeral(run[0]) else unicodedata.normalize("NFKC", run)
        for run in _split_numerals(text)
    ]
    text = " ".join("".join(parts).split())
    return text.lower() if fold_case else text


def _split_numerals(text: str) -> list[str]:
    """``text`` cut into runs, each either all foreign numerals or none."""
    runs: list[str] = []
    for ch in text:
        if runs and _foreign_numeral(ch) == _foreign_numeral(runs[-1][0]):
            runs[-1] += ch
        else:
            runs.append(ch)
    return runs


@dataclass
class _Route:
    handler: Handler
    pattern: re.Pattern[str] | None = None
    event: str | None = None
    click_key: str | None = None
    msg_types: frozenset[str] = frozenset()
    only_operators: bool = False


class Router:
    """Routes are tried in the order they were declared; the first non-None reply wins."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.routes: list[_Route] = []

    def command(self, pattern: str, *, operators: bool = False) -> Callable[[Handler], Handler]:
        compiled = re.compile(pattern)

        def register(fn: Handler) -> Handler:
            self.routes.append(_Route(fn, pattern=compiled, only_operators=operators))
            return fn

        return register

    def event(self, name: str) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self.routes.append(_Route(fn, event=name))
            return fn

        return register

    def click(self, key: str) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self.routes.append(_Route(fn, click_key=key.upper()))
            return fn

        return register

    def message(self, *msg_types: str) -> Callable[[Handler], Handler]:
        """Any message of these types (empty = every type): used by the fallback."""

        def register(fn: Handler) -> Handler:
            self.routes.append(_Route(fn, msg_types=frozenset(msg_types)))
            return fn

        return register

    def matching(self, config: ChatConfig,
                 msg: Incoming) -> Iterator[tuple[_Route, re.Match[str] | None]]:
        """The routes that take ``msg``, in order, with their pattern's match."""
        for route in self.routes:
            match: re.Match[str] | None = None
            if route.pattern is not None:
                if msg.msg_type != "text":
                    continue
                if route.only_operators and not config.is_operator(msg.openid):
                    continue
                match = route.pattern.fullmatch(msg.text)
                if match is None:
                    continue
            elif route.event is not None:
                if msg.msg_type != "event" or msg.event != route.event:
                    continue
            elif route.click_key is not None:
                if msg.event != "click" or msg.event_key.upper() != route.click_key:
                    continue
            elif route.msg_types and msg.msg_type not in route.msg_types:
                continue
            yield route, match

    def handle(self, ctx: Context, msg: Incoming) -> Reply | None:
        for route, match in self.matching(ctx.config, msg):
            if ctx.read_only and not reads_only_route(route):
                raise NeedsWrite(route.handler.__name__)
            reply = route.handler(ctx, msg, match)
            if reply is not None:
                return reply
        return None


def reads_only_route(route: _Route) -> bool:
    return bool(getattr(route.handler, _READS_ONLY, False))


def issue_arg(match: re.Match[str] | None, group: str = "n") -> int | None:
    """The optional issue number captured by a command pattern (digits or Chinese numerals:
    patterns capture ``handlers.numbers.ISSUE_NUMBER``)."""
    if match is None:
        return None
    value = match.groupdict().get(group)
    if not value:
        return None
    number = issue_number(value)
    if number is None:  # 一二三: never fall back to the current issue (兑换 would charge it)
        raise BadIssueNumber(value)
    return number
