"""Typed settings: one TOML file plus ``NEWSBOT_<SECTION>__<KEY>`` environment overrides."""

from __future__ import annotations

import json
import os
import re
import tomllib
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

from handlers.config import ChatConfig, CodeRules, PassOffer

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

    source: str | None = Field(default=None, exclude=True)

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
                freeze_minutes=self.codes.freeze_minutes))

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


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = f"[{loc[0]}] {'.'.join(loc[1:])}" if len(loc) > 1 else loc[0] if loc else "?"
        if e["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key {key}")
        else:
            lines.append(f"{origin}: {key}: {e['msg']} (got {e.get('input')!r})")
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
