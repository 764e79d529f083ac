"""Typed settings: one TOML file plus ``NEWSBOT_<SECTION>__<KEY>`` environment overrides."""

from __future__ import annotations

import json
import os
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bot.pay.keys import (
    PUBLIC_KEY_ID_PREFIX,
    KeyFileError,
    load_certificates,
    load_private_key,
    load_public_key,
)
from handlers.config import ChatConfig, CodeRules, PassOffer, PayPackageOffer

PLACEHOLDER_PREFIX = "CHANGE-ME"
ENV_PREFIX = "NEWSBOT_"
# A DNS name as it may appear in a CSP host source: lowercase labels, at least one dot.
_HOSTNAME_RE = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+"
                          r"[a-z][a-z0-9-]{0,61}[a-z0-9]")


class SettingsError(Exception):
    """The configuration cannot be used; the message names the key and the fix."""


class ConfigNotFound(SettingsError):
    """No config file was given and none was found where newsbot looks for one."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    public_url: str = "http://127.0.0.1:8080"
    webhook_path: str = "/wechat"
    max_clock_skew_s: int = Field(300, ge=1)
    workers: int = Field(1, ge=1, le=64)
    threads: int = Field(8, ge=1, le=256)
    log_format: Literal["text", "json"] = "text"

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("webhook_path")
    @classmethod
    def _leading_slash(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with /")
        return v


class WechatSettings(_Section):
    token: str = ""
    app_id: str = ""
    app_secret: str = ""
    encoding_aes_key: str = ""
    previous_encoding_aes_key: str = ""  # the old key while a rotation settles; then remove
    accept_plain: bool = False
    api_base: str = "https://api.weixin.qq.com"
    connect_timeout_s: float = Field(3.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0)


class DatabaseSettings(_Section):
    url: str = "sqlite:///newsbot.db"


class ReaderSettings(_Section):
    secret: str = ""
    previous_secrets: list[str] = []
    link_ttl_hours: int = Field(168, ge=1)
    # Hosts whose https:// images issues may show; they join the pages' CSP img-src.
    image_hosts: list[str] = []

    @field_validator("image_hosts")
    @classmethod
    def _bare_hosts(cls, v: list[str]) -> list[str]:
        for host in v:
            if not _HOSTNAME_RE.fullmatch(host):
                raise ValueError(f"{host!r} is not a host name; write bare lowercase names "
                                 "such as img.example.com (no https://, path, port or *)")
        return v


class TokenSettings(_Section):
    name: str = "豆"
    max_topup: int = Field(100_000, ge=1)
    how_to_get: str = "如需充值，请联系编辑部（在本对话中留言即可）。"


class ContentSettings(_Section):
    free_percent: int = Field(10, ge=0, le=100)
    # The newsletter's name, shown in cards, page titles and the reader's masthead.
    publication: str = Field("会员通讯", min_length=1, max_length=40)


class OperatorSettings(_Section):
    openids: list[str] = []


class ConsoleSettings(_Section):
    """``[console]``: the operators' web console (links from ``#console`` or
    ``newsbot console-link``; the HMAC key is ``[reader] secret``)."""

    link_minutes: int = Field(15, ge=1, le=1440)  # how long a link may be opened (once)
    session_hours: int = Field(10, ge=1, le=72)  # how long the session it starts lasts


class InboxSettings(_Section):
    """``[inbox]``: free text subscribers send, kept for the operators to answer."""

    # Operators get a chat notice of new messages at most once per this many minutes.
    notify_every_minutes: int = Field(30, ge=1, le=10080)
    keep_days: int = Field(180, ge=1, le=3650)  # messages and their replies
    max_chars: int = Field(2000, ge=1, le=20000)  # longer messages are stored cut


class RetentionSettings(_Section):
    """``[retention]``: how long delivery records are kept (storage.retention)."""

    # Stored replies answer WeChat's retries, which come within 15 seconds: a day is ample.
    replies_hours: int = Field(24, ge=1, le=24 * 90)
    reply_max_bytes: int = Field(4096, ge=512, le=65536)  # a stored reply is cut to this
    purge_batch: int = Field(1000, ge=10, le=100_000)  # rows per DELETE
    purge_every_minutes: int = Field(10, ge=1, le=1440)  # the scheduled purge


class PassSettings(_Section):
    """One ``[[passes]]`` entry: a time pass (会员卡) sold for tokens."""

    # Lower-case so subscribers may type it in any case (chat text is case-folded).
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    name: str = Field(min_length=1, max_length=20)
    days: int = Field(ge=1, le=3660)
    price: int = Field(ge=1, le=10**9)


class CodeSettings(_Section):
    """``[codes]``: redemption codes (兑换码) and gift codes."""

    # Key of the HMAC that codes are stored under. Empty: codes and gifts are off.
    secret: str = ""
    # Failed code attempts allowed per subscriber within the window before a freeze.
    max_failures: int = Field(5, ge=1, le=1000)
    failure_window_minutes: int = Field(10, ge=1, le=10080)
    freeze_minutes: int = Field(60, ge=1, le=10080)

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, v: str) -> str:
        if v and not v.startswith(PLACEHOLDER_PREFIX) and len(v) < 16:
            raise ValueError("use at least 16 random characters (or leave it empty: no codes)")
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.secret) and not self.secret.startswith(PLACEHOLDER_PREFIX)


class MenuButton(_Section):
    name: str
    type: Literal["click", "view"] | None = None
    key: str | None = None
    url: str | None = None
    sub_buttons: list[MenuButton] = []


class MenuSettings(_Section):
    buttons: list[MenuButton] = []


class BroadcastSettings(_Section):
    mode: Literal["sendall", "openids", "off"] = "off"
    cron: str = "0 8 * * 1"
    timezone: str = "Asia/Shanghai"
    preview_openids: list[str] = []
    tag_id: int | None = None
    monthly_cap: int = Field(4, ge=1)
    batch_size: int = Field(10_000, ge=2, le=10_000)
    scheduler: bool = True
    misfire_grace_s: int = Field(6 * 3600, ge=1)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown time zone; use an IANA name such as Asia/Shanghai") from None
        return v

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger(**cron_fields(v))
        except ValueError as exc:
            raise ValueError(f"not a valid crontab expression: {exc}") from None
        return v


_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def cron_fields(cron: str) -> dict[str, str]:
    """A 5-field crontab line as APScheduler CronTrigger arguments. Crontab counts weekdays
    from Sunday = 0 (or 7), APScheduler from Monday = 0; names mean the same to both, so the
    weekday numbers are translated to names."""
    fields = cron.split()
    if len(fields) != 5:
        raise ValueError("needs 5 fields: minute hour day month weekday")
    minute, hour, day, month, weekday = fields
    weekday = re.sub(r"(?<![/\d])([0-7])(?!\d)", lambda m: _WEEKDAYS[int(m.group(1))], weekday)
    return {"minute": minute, "hour": hour, "day": day, "month": month, "day_of_week": weekday}


_WEEKDAY_NAMES = {"mon": "一", "tue": "二", "wed": "三", "thu": "四", "fri": "五", "sat": "六",
                  "sun": "日"}


def describe_cron(cron: str) -> str:
    """The push schedule in words for subscribers (每周一 08:00), or a neutral phrase when the
    crontab line is not a simple weekly or daily time."""
    try:
        fields = cron_fields(cron)
    except ValueError:
        return "按计划"
    minute, hour, weekday = fields["minute"], fields["hour"], fields["day_of_week"]
    if not (minute.isdigit() and hour.isdigit()) or fields["day"] != "*" or fields["month"] != "*":
        return "按计划"
    at = f"{int(hour):02d}:{int(minute):02d}"
    if weekday == "*":
        return f"每天 {at}"
    days = weekday.lower().split(",")
    if all(d in _WEEKDAY_NAMES for d in days):
        return "每周" + "、".join(_WEEKDAY_NAMES[d] for d in days) + f" {at}"
    return "按计划"


# -- [pay]: WeChat Pay API v3 (docs/pay.md) --------------------------------------------------

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class PayPackage(_Section):
    """One ``[[pay.packages]]`` entry: tokens sold for money."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    tokens: int = Field(ge=1, le=10**9)
    price_fen: int = Field(ge=1, le=10**9)  # 分: 990 is ¥9.90
    label: str = Field(min_length=1, max_length=40)


# Set by `newsbot pay certificates` only: it fills platform_certificates_dir, so it must be able
# to start from an empty one. Everything else keeps refusing a directory with no valid key.
EMPTY_CERTIFICATES_DIR_OK: ContextVar[bool] = ContextVar("empty_certificates_dir_ok",
                                                         default=False)


class PaySettings(_Section):
    """``[pay]``: a WeChat Pay merchant. Without this section payments are off."""

    mch_id: str
    app_id: str = Field("", validate_default=True)  # empty: [wechat] app_id
    apiv3_key: str = Field(repr=False)
    merchant_serial_no: str
    merchant_private_key_file: Path
    # "WeChat Pay public key" mode (merchants since late 2024): the key and its id.
    wechatpay_public_key_file: Path | None = None
    wechatpay_public_key_id: str = ""
    # Platform-certificate mode (older merchants): a directory of certificate *.pem files.
    # Both modes may be set at once during WeChat's transition; Wechatpay-Serial picks the key.
    platform_certificates_dir: Path | None = None
    api_base: str = "https://api.mch.weixin.qq.com"
    # WeChat's prepay_id and code_url last 2 hours; an order cannot outlive them.
    order_ttl_minutes: int = Field(30, ge=5, le=120)
    packages: list[PayPackage] = []

    @field_validator("mch_id")
    @classmethod
    def _digits(cls, v: str) -> str:
        if not (v.isascii() and v.isdigit() and 6 <= len(v) <= 32):
            raise ValueError("must be the merchant number (商户号), digits only")
        return v

    @field_validator("apiv3_key")
    @classmethod
    def _thirty_two_bytes(cls, v: str) -> str:
        if v.startswith(PLACEHOLDER_PREFIX):
            raise ValueError("still holds the example placeholder: set the APIv3 key (APIv3密钥) "
                             "from the merchant platform, or $NEWSBOT_PAY__APIV3_KEY")
        if len(v.encode("utf-8")) != 32:
            raise ValueError(f"must be exactly 32 bytes (got {len(v.encode('utf-8'))}); it is "
                             "the APIv3 key set under 账户中心 → API安全")
        return v

    @field_validator("app_id")
    @classmethod
    def _app_id(cls, v: str) -> str:
        if not v:
            raise ValueError("empty, and [wechat] app_id is empty too: set one of them")
        return v

    @field_validator("merchant_serial_no")
    @classmethod
    def _hex_serial(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9A-Fa-f]{8,40}", v):
            raise ValueError("must be the hex serial number of the merchant API certificate")
        return v.upper()

    @field_validator("wechatpay_public_key_id")
    @classmethod
    def _key_id(cls, v: str) -> str:
        if v and not v.startswith(PUBLIC_KEY_ID_PREFIX):
            raise ValueError(f"must start with {PUBLIC_KEY_ID_PREFIX} as shown beside the "
                             "public key on the merchant platform")
        return v

    @field_validator("merchant_private_key_file")
    @classmethod
    def _private_key(cls, v: Path) -> Path:
        try:
            load_private_key(v)
        except KeyFileError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("wechatpay_public_key_file")
    @classmethod
    def _public_key(cls, v: Path | None) -> Path | None:
        if v is not None:
            try:
                load_public_key(v)
            except KeyFileError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("platform_certificates_dir")
    @classmethod
    def _certificates(cls, v: Path | None) -> Path | None:
        if v is not None:
            try:
                found = load_certificates(v)
            except KeyFileError as exc:
                raise ValueError(str(exc)) from None
            if not found and not EMPTY_CERTIFICATES_DIR_OK.get():
                raise ValueError(f"{v} holds no platform certificate valid today (*.pem); "
                                 "`newsbot pay certificates` downloads them")
        return v

    @field_validator("api_base")
    @classmethod
    def _https_base(cls, v: str) -> str:
        v = v.rstrip("/")
        loopback = v.startswith(tuple(f"http://{h}" for h in _LOOPBACK_HOSTS))
        if not v.startswith("https://") and not loopback:
            raise ValueError("must start with https:// (http:// only for a loopback fake)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PaySettings:
        if bool(self.wechatpay_public_key_file) != bool(self.wechatpay_public_key_id):
            raise ValueError("wechatpay_public_key_file and wechatpay_public_key_id go "
                             "together: set both or neither")
        if self.wechatpay_public_key_file is None and self.platform_certificates_dir is None:
            raise ValueError("no key to verify WeChat Pay with: set wechatpay_public_key_file "
                             "and wechatpay_public_key_id, or platform_certificates_dir")
        if not self.packages:
            raise ValueError("packages: add at least one [[pay.packages]] to sell")
        ids = [p.id for p in self.packages]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"packages: id {twice[0]!r} names two packages; ids must be unique")
        return self

    @property
    def on_loopback(self) -> bool:
        return self.api_base.startswith("http://")

    def package(self, package_id: str) -> PayPackage | None:
        return next((p for p in self.packages if p.id == package_id), None)


def _pay_app_id_default(data: Any) -> Any:
    """[pay] app_id defaults to [wechat] app_id; filled in before validation so the check
    that one of them is set can name the key."""
    if isinstance(data, dict) and isinstance(data.get("pay"), dict):
        wechat = data.get("wechat")
        if not data["pay"].get("app_id") and isinstance(wechat, dict) and wechat.get("app_id"):
            data = {**data, "pay": {**data["pay"], "app_id": wechat["app_id"]}}
    return data


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    wechat: WechatSettings = WechatSettings()
    database: DatabaseSettings = DatabaseSettings()
    reader: ReaderSettings = ReaderSettings()
    tokens: TokenSettings = TokenSettings()
    content: ContentSettings = ContentSettings()
    operators: OperatorSettings = OperatorSettings()
    broadcast: BroadcastSettings = BroadcastSettings()
    menu: MenuSettings = MenuSettings()
    passes: list[PassSettings] = []
    codes: CodeSettings = CodeSettings()
    pay: PaySettings | None = None  # no [pay]: payments off
    console: ConsoleSettings = ConsoleSettings()
    inbox: InboxSettings = InboxSettings()
    retention: RetentionSettings = RetentionSettings()

    source: str | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _pay_defaults(cls, data: Any) -> Any:
        return _pay_app_id_default(data)

    @model_validator(mode="after")
    def _pay_notify_https(self) -> Settings:
        # WeChat Pay refuses a notify_url that is not HTTPS or that has a query.
        url = self.server.public_url
        if (self.pay is not None and not self.pay.on_loopback
                and (not url.startswith("https://") or "?" in url)):
            raise ValueError("[server] public_url must be an https:// URL without a query "
                                 "when [pay] is set: WeChat Pay posts notifications to "
                                 "public_url + /pay/notify")
        return self

    @model_validator(mode="after")
    def _distinct_passes(self) -> Settings:
        seen: set[str] = set()
        for item in self.passes:
            for word in {item.id, item.name.lower()}:
                if word in seen:
                    raise ValueError(f"[[passes]]: {word!r} names two passes; ids and names "
                                     "must be unique")
                seen.add(word)
        return self

    def is_operator(self, openid: str) -> bool:
        return openid in self.operators.openids

    def pass_by_id(self, pass_id: str) -> PassSettings | None:
        return next((p for p in self.passes if p.id == pass_id), None)

    def chat_config(self) -> ChatConfig:
        """The slice of these settings that chat handlers read."""
        return ChatConfig(
            unit=self.tokens.name, max_topup=self.tokens.max_topup,
            how_to_get=self.tokens.how_to_get, free_percent=self.content.free_percent,
            push_mode=self.broadcast.mode, link_ttl_hours=self.reader.link_ttl_hours,
            operators=frozenset(self.operators.openids), publication=self.content.publication,
            schedule=describe_cron(self.broadcast.cron), timezone=self.broadcast.timezone,
            passes=tuple(PassOffer(p.id, p.name, p.days, p.price) for p in self.passes),
            codes=CodeRules(
                secret=self.codes.secret.encode() if self.codes.enabled else b"",
                max_failures=self.codes.max_failures,
                window_minutes=self.codes.failure_window_minutes,
                freeze_minutes=self.codes.freeze_minutes),
            pay_packages=tuple(PayPackageOffer(p.id, p.label, p.tokens, p.price_fen)
                               for p in (self.pay.packages if self.pay is not None else ())),
            inbox_max_chars=self.inbox.max_chars,
            console_link_minutes=self.console.link_minutes,
            console_session_hours=self.console.session_hours)

    def missing_secrets(self, *, need_api: bool = False) -> list[str]:
        """Keys that must be set before serving, each with a hint on how to set it."""
        required = {"wechat.token": self.wechat.token, "reader.secret": self.reader.secret}
        if need_api:
            required["wechat.app_id"] = self.wechat.app_id
            required["wechat.app_secret"] = self.wechat.app_secret
        problems = []
        for key, value in required.items():
            section, name = key.split(".")
            env = f"{ENV_PREFIX}{section.upper()}__{name.upper()}"
            if not value or value.startswith(PLACEHOLDER_PREFIX):
                state = "is missing" if not value else "still holds the example placeholder"
                problems.append(
                    f"[{section}] {name} {state}: set it in the config file or in ${env}")
        if self.reader.secret and len(self.reader.secret) < 16 and not problems:
            problems.append("[reader] secret is too short: use at least 16 random characters")
        if self.codes.secret.startswith(PLACEHOLDER_PREFIX):
            # Codes would be silently off: say so rather than let a copied example sell none.
            problems.append("[codes] secret still holds the example placeholder: set at least "
                            "16 random characters (or \"\" to turn codes and gifts off), in the "
                            f"config file or in ${ENV_PREFIX}CODES__SECRET")
        return problems


def resolve_config_path(explicit: str | Path | None) -> Path | None:
    """--config, else $NEWSBOT_CONFIG, else ./config.toml if present."""
    return _resolve(explicit, dict(os.environ))


def _env_value(raw: str) -> Any:
    # Lists and tables can be given as JSON; everything else stays a string for pydantic to coerce.
    stripped = raw.strip()
    if stripped.startswith(("[", "{")):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return raw
    return raw


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        section, key = section.lower(), key.lower()
        if section not in Settings.model_fields or section == "source" or not key:
            raise SettingsError(f"{name}: unknown setting [{section}] {key}")
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise SettingsError(f"{name}: [{section}] is not a table in the config file")
        table[key] = _env_value(raw)


_SECRET_NAME = re.compile(r"(?:secret|_key)$")


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = f"[{loc[0]}] {'.'.join(loc[1:])}" if len(loc) > 1 else f"[{loc[0]}]" if loc else ""
        if e["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key {key}")
            continue
        where = f"{origin}: {key}: " if key else f"{origin}: "
        # A whole section as input would repeat every value, secrets included; so would a
        # rejected key or secret.
        quiet = isinstance(e.get("input"), dict) or (loc and _SECRET_NAME.search(loc[-1]))
        got = "" if quiet else f" (got {e.get('input')!r})"
        lines.append(f"{where}{e['msg']}{got}")
    return "\n".join(lines)


def load_settings(
    path: str | Path | None = None,
    *,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Build the settings from the resolved file, env overrides and explicit overrides."""
    environ = dict(os.environ) if environ is None else environ
    resolved = _resolve(path, environ)
    if resolved is None:
        # Defaults alone would quietly create ./newsbot.db: a wrong folder or a forgotten
        # --config must be an error, not a new empty database.
        raise ConfigNotFound(
            "no config file found: tried --config (not given), $NEWSBOT_CONFIG (not set), "
            f"./config.toml (not in {Path.cwd()}).\n"
            f"Make one: {_copy_example('config.toml')}, then fill in [wechat] token and "
            "[reader] secret; or pass --config PATH.\n"
            "To try newsbot without a config: newsbot demo")
    origin = str(resolved)
    if not resolved.is_file():
        given = "--config" if path else "$NEWSBOT_CONFIG"
        if resolved.exists():
            raise ConfigNotFound(f"config file {resolved} (from {given}) is not a file: give "
                                 "the path of the config file itself")
        raise ConfigNotFound(
            f"config file {resolved} (from {given}) does not exist.\n"
            f"Make it: {_copy_example(str(resolved))}, then fill in [wechat] token and "
            "[reader] secret.")
    try:
        data: dict[str, Any] = tomllib.loads(resolved.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{resolved}: not valid TOML: {exc}") from exc
    _apply_env(data, environ)
    for section, table in (overrides or {}).items():
        data.setdefault(section, {}).update(table)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(_format_errors(exc, origin)) from None
    settings.source = str(resolved)
    return settings


def _copy_example(target: str) -> str:
    """The command that makes a config from the commented example, which sits beside the
    package in a source checkout but is not part of the wheel."""
    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    if example.is_file():
        return f"cp {example} {target}"
    return (f"copy config.example.toml from the newsbot source (next to its README.md) to "
            f"{target}")


def _resolve(path: str | Path | None, environ: dict[str, str]) -> Path | None:
    if path:  # --config
        return Path(path)
    if environ.get("NEWSBOT_CONFIG"):
        return Path(environ["NEWSBOT_CONFIG"])
    default = Path("config.toml")
    return default if default.exists() else None
