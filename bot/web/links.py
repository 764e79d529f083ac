"""Signed links: HMAC-SHA256 over openid, expiry and what the link opens (an issue, or the
pay page), so a link can be neither edited nor extended. Older secrets still verify, which
makes rotating the secret painless."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode

from bot.settings import Settings

READER_PREFIX = "/read"
# The pay page lives in a directory of its own: WeChat opens the JSAPI pay sheet only from
# pages under a registered 支付授权目录 (public_url + /pay/).
PAY_PAGE_PATH = "/pay/"

MAX_OPENID_LEN = 128
# Unix seconds, digits only (int() would also take "+1", " 1", "1_0" or non-ASCII digits).
_EXPIRES_RE = re.compile(r"[0-9]{1,12}")
# urlsafe base64 of a SHA-256 digest is 43 characters; a little slack, ASCII only, because
# hmac.compare_digest refuses non-ASCII str.
_SIG_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")

LinkProblem = Literal["expired", "invalid"]


class BadLink(Exception):
    """The link's fields cannot be a link we issued (checked before any HMAC)."""


def check_fields(openid: str, raw_expires: str, sig: str) -> tuple[str, int, str]:
    """The fields of a link as (openid, expires, sig), or BadLink when one is malformed."""
    if not openid or len(openid) > MAX_OPENID_LEN or not openid.isprintable():
        raise BadLink("u: malformed")
    if not _EXPIRES_RE.fullmatch(raw_expires):
        raise BadLink("e: not a unix time")
    if not _SIG_RE.fullmatch(sig):
        raise BadLink("s: malformed")
    return openid, int(raw_expires), sig


def _mac(secret: str, *fields: str) -> str:
    msg = "\n".join(fields).encode()
    digest = hmac.new(secret.encode(), msg, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _reader_fields(openid: str, issue: int, expires: int) -> tuple[str, ...]:
    return ("v1", openid, str(issue), str(expires))


def _pay_fields(openid: str, expires: int) -> tuple[str, ...]:
    # Its own first field: a pay link's signature can never pass as a reader link's.
    return ("pay1", openid, str(expires))


@dataclass(frozen=True)
class _Signer:
    settings: Settings

    def _expires(self, now: float | None) -> int:
        return int((now if now is not None else time.time())
                   + self.settings.reader.link_ttl_hours * 3600)

    def _sign(self, fields: tuple[str, ...]) -> str:
        return _mac(self.settings.reader.secret, *fields)

    def _check(self, fields: tuple[str, ...], *, expires: int, sig: str,
               now: float | None) -> LinkProblem | None:
        secrets = [self.settings.reader.secret, *self.settings.reader.previous_secrets]
        good = any(hmac.compare_digest(_mac(s, *fields), sig) for s in secrets if s)
        if not good:
            return "invalid"
        if expires < (now if now is not None else time.time()):
            return "expired"
        return None


@dataclass(frozen=True)
class ReaderLinks(_Signer):
    def path(self, openid: str, issue: int, *, now: float | None = None) -> str:
        return self.path_until(openid, issue, self._expires(now))

    def path_until(self, openid: str, issue: int, expires: int) -> str:
        """A link that expires at ``expires``: a page links to other issues with its own
        expiry, so following links never makes a link last longer."""
        sig = self._sign(_reader_fields(openid, issue, expires))
        query = urlencode({"u": openid, "e": expires, "s": sig})
        return f"{READER_PREFIX}/{issue}?{query}"

    def url(self, openid: str, issue: int, *, now: float | None = None) -> str:
        return self.settings.server.public_url + self.path(openid, issue, now=now)

    def __call__(self, openid: str, issue_number: int) -> str:
        return self.url(openid, issue_number)

    def verify(self, *, openid: str, issue: int, expires: int, sig: str,
               now: float | None = None) -> LinkProblem | None:
        """None when the link is good, else the reason it is refused ("expired"/"invalid")."""
        return self._check(_reader_fields(openid, issue, expires), expires=expires, sig=sig,
                           now=now)


@dataclass(frozen=True)
class PayLinks(_Signer):
    """Links to a subscriber's own pay page: same secret and lifetime as reader links. The
    optional ``issue`` (buy-and-unlock) is not signed: it only chooses what the page offers,
    and the order endpoint checks it against the subscriber's own standing."""

    def path(self, openid: str, issue: int | None = None, *, now: float | None = None) -> str:
        return self.path_until(openid, self._expires(now), issue)

    def path_until(self, openid: str, expires: int, issue: int | None = None) -> str:
        params: dict[str, str | int] = {"u": openid, "e": expires,
                                        "s": self._sign(_pay_fields(openid, expires))}
        if issue is not None:
            params["issue"] = issue
        return f"{PAY_PAGE_PATH}?{urlencode(params)}"

    def url(self, openid: str, issue: int | None = None, *, now: float | None = None) -> str:
        return self.settings.server.public_url + self.path(openid, issue, now=now)

    def __call__(self, openid: str, issue_number: int | None = None) -> str:
        return self.url(openid, issue_number)

    def verify(self, *, openid: str, expires: int, sig: str,
               now: float | None = None) -> LinkProblem | None:
        return self._check(_pay_fields(openid, expires), expires=expires, sig=sig, now=now)
