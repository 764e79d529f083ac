"""The settings chat handlers read. ``bot/`` builds one from its full settings at startup
(``bot.settings.Settings.chat_config``), so handlers need nothing from the layer above them
and a test can build one from a few keyword arguments."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def is_operator(self, openid: str) -> bool:
        return openid in self.operators
