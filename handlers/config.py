"""The settings chat handlers read. ``bot/`` builds one from its full settings at startup
(``bot.settings.Settings.chat_config``), so handlers need nothing from the layer above them
and a test can build one from a few keyword arguments."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PassOffer:
    """A ``[[passes]]`` entry: a pass subscribers can buy for ``price`` tokens."""

    id: str
    name: str
    days: int
    price: int


@dataclass(frozen=True)
class CodeRules:
    """``[codes]``: the key codes are hashed under (empty: codes are off) and the freeze."""

    secret: bytes = field(default=b"", repr=False)
    max_failures: int = 5
    window_minutes: int = 10
    freeze_minutes: int = 60

    @property
    def enabled(self) -> bool:
        return bool(self.secret)


@dataclass(frozen=True)
class PayPackageOffer:
    """A ``[[pay.packages]]`` entry: ``tokens`` sold for ``price_fen`` (分) by WeChat Pay."""

    id: str
    label: str
    tokens: int
    price_fen: int


@dataclass(frozen=True)
class ChatConfig:
    unit: str = "豆"  # [tokens] name
    max_topup: int = 100_000
    how_to_get: str = "如需充值，请联系编辑部（在本对话中留言即可）。"
    free_percent: int = 10  # [content] free_percent: the default for issues that set none
    push_mode: str = "off"  # [broadcast] mode
    link_ttl_hours: int = 168  # [reader] link_ttl_hours
    operators: frozenset[str] = field(default_factory=frozenset)
    publication: str = "会员通讯"  # [content] publication
    schedule: str = "每周一 08:00"  # [broadcast] cron in words (bot.settings.describe_cron)
    timezone: str = "Asia/Shanghai"  # [broadcast] timezone: how times are shown
    passes: tuple[PassOffer, ...] = ()  # [[passes]]
    codes: CodeRules = field(default_factory=CodeRules)  # [codes]
    # [[pay.packages]]; empty when [pay] is not set, and then no reply mentions payments.
    pay_packages: tuple[PayPackageOffer, ...] = ()
    inbox_max_chars: int = 2000  # [inbox] max_chars: a longer message is stored cut
    console_link_minutes: int = 15  # [console] link_minutes: what the #console reply says
    console_session_hours: int = 10  # [console] session_hours

    @property
    def pay_enabled(self) -> bool:
        return bool(self.pay_packages)

    def is_operator(self, openid: str) -> bool:
        return openid in self.operators

    def find_pass(self, word: str) -> PassOffer | None:
        """The pass a subscriber named, by id or name, in any case."""
        word = word.strip().lower()
        return next((p for p in self.passes if word in (p.id, p.name.lower())), None)
