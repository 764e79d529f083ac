"""The custom menu: ``[[menu.buttons]]`` checked against WeChat's limits before any call."""

from __future__ import annotations

from typing import Any

from bot.settings import MenuButton, MenuSettings
from handlers import click_keys

# CLICK keys the handlers understand: their @router.click registrations, so none is missed.
KNOWN_KEYS = click_keys()
MAX_TOP, MAX_SUB = 3, 5
TOP_NAME_BYTES, SUB_NAME_BYTES, KEY_BYTES = 16, 40, 128


class MenuError(ValueError):
    pass


def _leaf(button: MenuButton, where: str) -> dict[str, Any]:
    if button.type == "click":
        if not button.key:
            raise MenuError(f"{where}: a click button needs a key")
        if button.key.upper() not in KNOWN_KEYS:
            raise MenuError(f"{where}: unknown key {button.key!r}; use one of "
                            f"{', '.join(sorted(KNOWN_KEYS))}")
        if len(button.key.encode()) > KEY_BYTES:
            raise MenuError(f"{where}: key longer than {KEY_BYTES} bytes")
        return {"type": "click", "name": button.name, "key": button.key.upper()}
    if button.type == "view":
        if not button.url or not button.url.startswith(("http://", "https://")):
            raise MenuError(f"{where}: a view button needs an http(s) url")
        return {"type": "view", "name": button.name, "url": button.url}
    raise MenuError(f"{where}: set type = \"click\" or \"view\", or give sub_buttons")


def build_menu(menu: MenuSettings) -> dict[str, Any]:
    """The JSON body of menu/create, or MenuError naming the button at fault."""
    if not 1 <= len(menu.buttons) <= MAX_TOP:
        raise MenuError(f"need 1 to {MAX_TOP} top-level buttons, got {len(menu.buttons)}")
    out: list[dict[str, Any]] = []
    for i, top in enumerate(menu.buttons, 1):
        where = f"button {i} ({top.name!r})"
        if not top.name or len(top.name.encode()) > TOP_NAME_BYTES:
            raise MenuError(f"{where}: name must be 1 to {TOP_NAME_BYTES} bytes")
        if top.sub_buttons:
            if top.type is not None:
                raise MenuError(f"{where}: a button with sub_buttons cannot have a type")
            if len(top.sub_buttons) > MAX_SUB:
                raise MenuError(f"{where}: at most {MAX_SUB} sub_buttons")
            subs = []
            for j, sub in enumerate(top.sub_buttons, 1):
                sub_where = f"{where} sub-button {j} ({sub.name!r})"
                if sub.sub_buttons:
                    raise MenuError(f"{sub_where}: menus are two levels deep at most")
                if not sub.name or len(sub.name.encode()) > SUB_NAME_BYTES:
                    raise MenuError(f"{sub_where}: name must be 1 to {SUB_NAME_BYTES} bytes")
                subs.append(_leaf(sub, sub_where))
            out.append({"name": top.name, "sub_button": subs})
        else:
            out.append(_leaf(top, where))
    return {"button": out}
