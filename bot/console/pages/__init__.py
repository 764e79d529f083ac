"""The console's pages, one module per area. Each has ``install(console)``, registering its
pages and actions with ``Console.page`` / ``Console.action``; their order here is not the menu's
(each page gives its own ``order``)."""

from __future__ import annotations

from types import ModuleType

from bot.console.pages import audit, broadcasts, codes, home, inbox, issues, subscribers

MODULES: tuple[ModuleType, ...] = (home, audit, issues, subscribers, codes, broadcasts, inbox)
