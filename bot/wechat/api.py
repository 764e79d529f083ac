"""Synchronous WeChat Official Account API client: stable access token shared through the
database, typed errors, bounded retries."""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final

import httpx
from sqlalchemy import Engine

from bot.settings import WechatSettings
from storage.db import transaction
from storage.tokens import get_cached_token, store_token

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]

# Renew this long before expiry; stable_token itself hands out a new token in the last 5 min.
RENEW_MARGIN_S: Final = 300.0
# WeChat refuses force_refresh more often than every 30 s (and allows only 20 a day).
FORCE_REFRESH_INTERVAL_S: Final = 30.0
BACKOFF_BASE_S: Final = 0.5
BACKOFF_CAP_S: Final = 30.0
RATE_LIMIT_WAIT_S: Final = 60.0
RATE_LIMIT_CAP_S: Final = 300.0
RATE_LIMIT_MAX_RETRIES: Final = 2
CLIENTMSGID_WAIT_S: Final = 60.0
MASS_SEND_MIN_OPENIDS: Final = 2
MASS_SEND_MAX_OPENIDS: Final = 10_000
CLIENTMSGID_MAX_BYTES: Final = 64

# Local errcodes for failures that never got a WeChat answer; WeChat's own are >= -1.
ERRCODE_NETWORK: Final = -2
ERRCODE_HTTP_STATUS: Final = -3
ERRCODE_BAD_RESPONSE: Final = -4

TOKEN_REJECTED_CODES: Final = frozenset({40001, 40014, 42001})
AUTH_CODES: Final = TOKEN_REJECTED_CODES | {40013, 40125, 40164, 40243, 41001, 41002, 41004}
RATE_LIMIT_CODES: Final = frozenset({45009, 45011, 45066})
ERRCODE_SYSTEM_BUSY: Final = -1
ERRCODE_CLIENTMSGID_EXISTS: Final = 45065
ERRCODE_CLIENTMSGID_TOO_FAST: Final = 45066
ERRCODE_MASS_QUOTA: Final = 45028
# Customer-service messages (message/custom/send): the account may not send them (unverified),
# the subscriber's window has closed (or they unfollowed), the window's count is used up.
ERRCODE_API_UNAUTHORIZED: Final = 48001
ERRCODE_OUT_OF_TIME: Final = 45015
ERRCODE_RESPONSE_COUNT: Final = 45047


class WeChatError(Exception):
    """WeChat answered with a non-zero errcode, or the call could not be completed."""

    def __init__(self, errcode: int, errmsg: str, payload: Mapping[str, Any] | None = None):
        super().__init__(f"WeChat errcode {errcode}: {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg
        self.payload: Mapping[str, Any] = payload or {}


class WeChatAuthError(WeChatError):
    """Credentials or access token rejected (bad secret, IP not whitelisted, token invalid)."""


class WeChatRateLimited(WeChatError):
    """Frequency or daily call limit reached (45009, 45011) or clientmsgid reused too fast."""


class WeChatTransientError(WeChatError):
    """WeChat busy (-1), HTTP 5xx, or a network failure; worth retrying later.

    ``maybe_processed`` is True when the request may have reached WeChat and taken effect
    (read timeout, 5xx, dropped connection), so replaying a non-idempotent send is unsafe."""

    def __init__(
        self,
        errcode: int,
        errmsg: str,
        payload: Mapping[str, Any] | None = None,
        *,
        maybe_processed: bool = False,
        status_code: int | None = None,
    ):
        super().__init__(errcode, errmsg, payload)
        self.maybe_processed = maybe_processed
        self.status_code = status_code


class WeChatAlreadySent(WeChatError):
    """The clientmsgid was already used within 24 h (45065); ``msg_id`` is the earlier send."""

    def __init__(self, errcode: int, errmsg: str, payload: Mapping[str, Any] | None = None):
        super().__init__(errcode, errmsg, payload)
        self.msg_id = _optional_int(self.payload.get("msg_id"))


class WeChatQuotaExceeded(WeChatError):
    """No mass-send quota left for this period (45028); retrying cannot help."""


def error_for(errcode: int, errmsg: str, payload: Mapping[str, Any] | None = None) -> WeChatError:
    """The typed exception for a WeChat errcode."""
    if errcode in AUTH_CODES:
        return WeChatAuthError(errcode, errmsg, payload)
    if errcode in RATE_LIMIT_CODES:
        return WeChatRateLimited(errcode, errmsg, payload)
    if errcode == ERRCODE_SYSTEM_BUSY:
        return WeChatTransientError(errcode, errmsg, payload)
    if errcode == ERRCODE_CLIENTMSGID_EXISTS:
        return WeChatAlreadySent(errcode, errmsg, payload)
    if errcode == ERRCODE_MASS_QUOTA:
        return WeChatQuotaExceeded(errcode, errmsg, payload)
    return WeChatError(errcode, errmsg, payload)


@dataclass(frozen=True)
class FollowerPage:
    total: int
    count: int
    openids: list[str]
    next_openid: str | None


@dataclass(frozen=True)
class MassSendResult:
    """A submitted mass send. ``already_sent`` means WeChat had this clientmsgid already;
    ``msg_id`` is then the earlier send's id, or 0 if WeChat did not return it."""

    msg_id: int
    msg_data_id: int | None
    already_sent: bool = False


class _RedactAccessToken(logging.Filter):
    """httpx logs every request URL at INFO; the access token travels in that URL."""

    _pattern = re.compile(r"(access_token=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "access_token=" in message:
            record.msg = self._pattern.sub(r"\1***", message)
            record.args = None
        return True


def _install_redaction() -> None:
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactAccessToken) for f in logger.filters):
            logger.addFilter(_RedactAccessToken())


_install_redaction()


class WeChatClient:
    """One client per process is enough; it is thread-safe."""

    def __init__(
        self,
        settings: WechatSettings,
        engine: Engine,
        *,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        max_retries: int = 4,
        rng: random.Random | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self._app_id = settings.app_id
        self._app_secret = settings.app_secret
        self._base = settings.api_base.rstrip("/")
        self._engine = engine
        self._timeout = httpx.Timeout(
            connect=settings.connect_timeout_s,
            read=settings.read_timeout_s,
            write=settings.read_timeout_s,
            pool=settings.connect_timeout_s,
        )
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=self._timeout)
        self._clock = clock
        self._sleep = sleep
        self._max_retries = max_retries
        self._rng = rng or random.Random()
        self._token_lock = threading.Lock()
        # Per process: a second process forcing within 30 s just gets 45009 from WeChat.
        self._last_forced_at: float | None = None

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> WeChatClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- endpoints -------------------------------------------------------------------------

    def fetch_stable_token(self, force_refresh: bool = False) -> tuple[str, int]:
        """Ask WeChat for the stable access token; does not touch the database cache."""
        body = {
            "grant_type": "client_credential",
            "appid": self._app_id,
            "secret": self._app_secret,
            "force_refresh": force_refresh,
        }
        # A replayed force would invalidate the token it just issued and spend the daily quota.
        payload = self._call(
            "POST",
            "/cgi-bin/stable_token",
            body=body,
            auth=False,
            replay_safe=not force_refresh,
            rate_retries=0 if force_refresh else RATE_LIMIT_MAX_RETRIES,
        )
        token = payload.get("access_token")
        expires_in = _optional_int(payload.get("expires_in"))
        if not isinstance(token, str) or not token or expires_in is None:
            raise WeChatError(ERRCODE_BAD_RESPONSE, "stable_token answer lacks a token", {})
        return token, expires_in

    def get_followers(self, next_openid: str | None = None) -> FollowerPage:
        params = {"next_openid": next_openid} if next_openid else {}
        payload = self._call("GET", "/cgi-bin/user/get", params=params)
        data = payload.get("data")
        openids = data.get("openid", []) if isinstance(data, dict) else []
        return FollowerPage(
            total=_optional_int(payload.get("total")) or 0,
            count=_optional_int(payload.get("count")) or 0,
            openids=[str(o) for o in openids],
            next_openid=str(payload.get("next_openid") or "") or None,
        )

    def iter_followers(self) -> Iterator[list[str]]:
        """Every follower openid, one WeChat page (up to 10,000) at a time."""
        cursor: str | None = None
        while True:
            page = self.get_followers(cursor)
            if not page.openids:
                return
            yield page.openids
            # A repeated cursor would page forever; WeChat should never send one, but stop.
            if not page.next_openid or page.next_openid == cursor:
                return
            cursor = page.next_openid

    def send_all_text(
        self, content: str, *, tag_id: int | None = None, clientmsgid: str | None = None
    ) -> MassSendResult:
        """Mass-send text to every follower, or to one tag."""
        filter_: JSONDict = (
            {"is_to_all": True} if tag_id is None else {"is_to_all": False, "tag_id": tag_id}
        )
        body: JSONDict = {"filter": filter_, "text": {"content": content}, "msgtype": "text"}
        return self._mass_send("/cgi-bin/message/mass/sendall", body, clientmsgid)

    def send_to_openids_text(
        self, openids: Sequence[str], content: str, *, clientmsgid: str | None = None
    ) -> MassSendResult:
        """Mass-send text to 2–10,000 openids (verified service accounts only)."""
        if not MASS_SEND_MIN_OPENIDS <= len(openids) <= MASS_SEND_MAX_OPENIDS:
            raise ValueError(
                f"mass/send takes {MASS_SEND_MIN_OPENIDS}–{MASS_SEND_MAX_OPENIDS} openids, "
                f"got {len(openids)}"
            )
        body: JSONDict = {"touser": list(openids), "msgtype": "text", "text": {"content": content}}
        return self._mass_send("/cgi-bin/message/mass/send", body, clientmsgid)

    def preview_text(self, openid: str, content: str) -> None:
        body = {"touser": openid, "msgtype": "text", "text": {"content": content}}
        self._call("POST", "/cgi-bin/message/mass/preview", body=body, replay_safe=False)

    def send_custom_text(self, openid: str, content: str) -> None:
        body = {"touser": openid, "msgtype": "text", "text": {"content": content}}
        self._call("POST", "/cgi-bin/message/custom/send", body=body, replay_safe=False)

    def create_menu(self, menu: dict[str, Any]) -> None:
        # Creating the same menu twice is harmless, so replays are fine.
        self._call("POST", "/cgi-bin/menu/create", body=menu)

    # -- internals -------------------------------------------------------------------------

    def _mass_send(self, path: str, body: JSONDict, clientmsgid: str | None) -> MassSendResult:
        if clientmsgid is not None:
            if not clientmsgid or len(clientmsgid.encode("utf-8")) > CLIENTMSGID_MAX_BYTES:
                raise ValueError(f"clientmsgid must be 1–{CLIENTMSGID_MAX_BYTES} bytes")
            body["clientmsgid"] = clientmsgid
        try:
            # Only a clientmsgid lets WeChat drop a replayed send, so only then replay
            # after an answer that may have been lost.
            payload = self._call("POST", path, body=body, replay_safe=clientmsgid is not None)
        except WeChatAlreadySent as exc:
            log.info("mass send %s: clientmsgid already used, msg_id=%s", path, exc.msg_id)
            return MassSendResult(msg_id=exc.msg_id or 0, msg_data_id=None, already_sent=True)
        msg_id = _optional_int(payload.get("msg_id"))
        if msg_id is None:
            raise WeChatError(ERRCODE_BAD_RESPONSE, "mass send answer lacks msg_id", payload)
        return MassSendResult(msg_id=msg_id, msg_data_id=_optional_int(payload.get("msg_data_id")))

    def _access_token(self) -> str:
        with self._token_lock:
            now = self._clock()
            with transaction(self._engine) as session:
                row = get_cached_token(session, app_id=self._app_id)
                if row is not None and row.expires_at.timestamp() - now >= RENEW_MARGIN_S:
                    return row.token
            # Outside the transaction: stable_token without force returns the same token to
            # every process, so concurrent fetches agree and the lock is not held over HTTP.
            token, expires_in = self.fetch_stable_token()
            self._store(token, expires_in)
            log.info("fetched access token for %s, expires in %d s", self._app_id, expires_in)
            return token

    def _renew_rejected(self, failed: str, error: WeChatAuthError) -> None:
        """Replace a token WeChat just rejected, forcing a new one only if WeChat keeps
        handing out the rejected one."""
        with self._token_lock:
            now = self._clock()
            with transaction(self._engine) as session:
                row = get_cached_token(session, app_id=self._app_id)
                if (
                    row is not None
                    and row.token != failed
                    and row.expires_at.timestamp() - now >= RENEW_MARGIN_S
                ):
                    return  # another thread or process already replaced it
            token, expires_in = self.fetch_stable_token()
            if token == failed:
                last = self._last_forced_at
                if last is not None and now - last < FORCE_REFRESH_INTERVAL_S:
                    log.error(
                        "access token rejected again within %.0f s of a forced refresh",
                        FORCE_REFRESH_INTERVAL_S,
                    )
                    raise error
                self._last_forced_at = now
                log.warning("WeChat keeps returning a rejected token; forcing a refresh")
                token, expires_in = self.fetch_stable_token(force_refresh=True)
            self._store(token, expires_in)

    def _store(self, token: str, expires_in: int) -> None:
        now = self._clock()
        with transaction(self._engine) as session:
            store_token(
                session,
                app_id=self._app_id,
                token=token,
                expires_at=datetime.fromtimestamp(now + expires_in, UTC),
                fetched_at=datetime.fromtimestamp(now, UTC),
            )

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: JSONDict | None = None,
        auth: bool = True,
        replay_safe: bool = True,
        rate_retries: int = RATE_LIMIT_MAX_RETRIES,
    ) -> JSONDict:
        """One API call with bounded retries; every retry kind has its own small budget."""
        transient_tries = 0
        rate_tries = 0
        waited_for_clientmsgid = False
        renewed_token = False
        while True:
            token = self._access_token() if auth else None
            try:
                return self._request(method, path, params, body, token)
            except WeChatAuthError as exc:
                if token is None or renewed_token or exc.errcode not in TOKEN_REJECTED_CODES:
                    raise
                renewed_token = True
                log.warning(
                    "%s: access token rejected (%d), renewing and retrying once", path, exc.errcode
                )
                self._renew_rejected(token, exc)
            except WeChatRateLimited as exc:
                if exc.errcode == ERRCODE_CLIENTMSGID_TOO_FAST:
                    if waited_for_clientmsgid or self._max_retries == 0:
                        raise
                    waited_for_clientmsgid = True
                    wait = CLIENTMSGID_WAIT_S
                else:
                    if rate_tries >= min(rate_retries, self._max_retries):
                        raise
                    rate_tries += 1
                    wait = min(RATE_LIMIT_CAP_S, RATE_LIMIT_WAIT_S * rate_tries)
                log.warning("%s: rate limited (%d), retrying in %.1f s", path, exc.errcode, wait)
                self._sleep(wait)
            except WeChatTransientError as exc:
                if transient_tries >= self._max_retries or (
                    exc.maybe_processed and not replay_safe
                ):
                    raise
                transient_tries += 1
                # Full jitter: spread simultaneous retries from many workers.
                ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (transient_tries - 1))
                wait = self._rng.uniform(0, ceiling)
                log.warning(
                    "%s: %s; retry %d/%d in %.2f s",
                    path,
                    exc,
                    transient_tries,
                    self._max_retries,
                    wait,
                )
                self._sleep(wait)

    def _request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: JSONDict | None,
        token: str | None,
    ) -> JSONDict:
        query = dict(params or {})
        if token is not None:
            query["access_token"] = token
        content: bytes | None = None
        headers: dict[str, str] = {}
        if body is not None:
            # ensure_ascii=False: WeChat shows \uXXXX escapes literally instead of decoding them.
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            headers["Content-Type"] = "application/json; charset=utf-8"
        try:
            response = self._http.request(
                method,
                self._base + path,
                params=query,
                content=content,
                headers=headers,
                timeout=self._timeout,
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise WeChatTransientError(
                ERRCODE_NETWORK, f"{type(exc).__name__}: {exc}", maybe_processed=False
            ) from exc
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise WeChatTransientError(
                ERRCODE_NETWORK, f"{type(exc).__name__}: {exc}", maybe_processed=True
            ) from exc
        status = response.status_code
        if status >= 500:
            raise WeChatTransientError(
                ERRCODE_HTTP_STATUS, f"HTTP {status}", maybe_processed=True, status_code=status
            )
        if status != 200:
            raise WeChatError(ERRCODE_HTTP_STATUS, f"HTTP {status}")
        try:
            payload = json.loads(response.content)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise WeChatTransientError(
                ERRCODE_BAD_RESPONSE, "answer is not a JSON object", maybe_processed=True
            )
        errcode = _optional_int(payload.get("errcode")) or 0
        if errcode != 0:
            raise error_for(errcode, str(payload.get("errmsg", "")), payload)
        return payload


def _optional_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
