"""Console links: one-time, short-lived, signed with ``[reader] secret`` under a field of their
own, so neither a reader link nor a pay link can ever pass for one. The nonce makes each link
unique; storage.console lets each start one session only."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlencode

from bot.settings import Settings
from bot.web.links import BadLink, LinkProblem, _Signer, check_fields

OPEN_PATH = "/console/open"
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")


def _fields(openid: str, expires: int, nonce: str) -> tuple[str, ...]:
    return ("console1", openid, str(expires), nonce)


@dataclass(frozen=True)
class ConsoleLinks(_Signer):
    settings: Settings

    def url(self, openid: str, *, now: float | None = None) -> str:
        expires = int((now if now is not None else time.time())
                      + self.settings.console.link_minutes * 60)
        nonce = secrets.token_urlsafe(18)
        sig = self._sign(_fields(openid, expires, nonce))
        query = urlencode({"u": openid, "e": expires, "n": nonce, "s": sig})
        return f"{self.settings.server.public_url}{OPEN_PATH}?{query}"

    def __call__(self, openid: str) -> str:
        return self.url(openid)

    def verify(self, *, openid: str, raw_expires: str, nonce: str, sig: str,
               now: float | None = None) -> LinkProblem | None:
        try:
            openid, expires, sig = check_fields(openid, raw_expires, sig)
        except BadLink:
            return "invalid"
        if not _NONCE_RE.fullmatch(nonce):
            return "invalid"
        return self._check(_fields(openid, expires, nonce), expires=expires, sig=sig, now=now)
