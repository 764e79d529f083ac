"""Signed reader links: HMAC-SHA256 over openid, issue and expiry, so a link can be neither
edited nor extended. Older secrets still verify, which makes rotating the secret painless."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import urlencode

from bot.settings import Settings

READER_PREFIX = "/read"


def _mac(secret: str, openid: str, issue: int, expires: int) -> str:
    msg = f"v1\n{openid}\n{issue}\n{expires}".encode()
    digest = hmac.new(secret.encode(), msg, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True)
class ReaderLinks:
    settings: Settings

    def path(self, openid: str, issue: int, *, now: float | None = None) -> str:
        expires = int((now if now is not None else time.time())
                      + self.settings.reader.link_ttl_hours * 3600)
        return self.path_until(openid, issue, expires)

    def path_until(self, openid: str, issue: int, expires: int) -> str:
        """A link that expires at ``expires``: a page links to other issues with its own
        expiry, so following links never makes a link last longer."""
        sig = _mac(self.settings.reader.secret, openid, issue, expires)
        query = urlencode({"u": openid, "e": expires, "s": sig})
        return f"{READER_PREFIX}/{issue}?{query}"

    def url(self, openid: str, issue: int, *, now: float | None = None) -> str:
        return self.settings.server.public_url + self.path(openid, issue, now=now)

    def __call__(self, openid: str, issue_number: int) -> str:
        return self.url(openid, issue_number)

    def verify(self, *, openid: str, issue: int, expires: int, sig: str,
               now: float | None = None) -> str | None:
        """None when the link is good, else the reason it is refused ("expired"/"invalid")."""
        secrets = [self.settings.reader.secret, *self.settings.reader.previous_secrets]
        good = any(hmac.compare_digest(_mac(s, openid, issue, expires), sig)
                   for s in secrets if s)
        if not good:
            return "invalid"
        if expires < (now if now is not None else time.time()):
            return "expired"
        return None
